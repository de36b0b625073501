"""Lightning callbacks: privacy ledger (privacy.json, ε per epoch), the final checkpoint, sample grids, the DP
progress bar, and progress lines in the log for runs without a bar."""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import WandbLogger

from dpdm.privacy.accounting import group_privacy
from dpdm.training.privacy_plan import known_seed_fields
from dpdm.utils.configs import to_plain
from dpdm.utils.images import save_image_grid, to_uint8
from dpdm.utils.jsonio import write_json_atomic


def privacy_report(module) -> dict:
    plan = module.plan
    report = plan.to_dict()
    report["steps"] = module.steps_taken
    report["epsilon"] = module.epsilon_spent() if plan.enabled else None
    if not plan.enabled:
        report["target_epsilon"] = None
    report["mechanism"] = ("Poisson-subsampled Gaussian (DP-SGD): per-example clipping at C, "
                           "noise N(0, σ²C²) per step" if plan.enabled else "none (non-private)")
    report["privacy_unit"] = "one example"
    if plan.enabled:
        report |= known_seed_fields(noise_seed_known=getattr(module, "noise_seed", None) is not None,
                                    sampler_seed_known=_sampler_seed_known(module))
    k = getattr(module, "examples_per_person", 1)
    if plan.enabled and k > 1:
        eps_k, delta_k = group_privacy(report["epsilon"], plan.delta, k)
        report["per_person"] = {
            "examples_per_person": k, "epsilon": eps_k, "delta": delta_k,
            "bound": "group privacy of (ε, δ)-DP: (kε, δ(e^{kε}−1)/(e^ε−1)); loose, see docs/privacy.md"}
    return report


def _sampler_seed_known(module) -> bool:
    trainer = getattr(module, "_trainer", None)  # module.trainer raises when no Trainer is attached
    return bool(getattr(getattr(trainer, "datamodule", None), "sampler_seed_known", False))


class PrivacyLedger(pl.Callback):
    """Writes privacy.json (ε, δ, σ, q, steps, accountant) at every epoch end and at the end of fit."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / "privacy.json"

    def _write(self, pl_module):
        write_json_atomic(self.path, privacy_report(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self._write(pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self._write(pl_module)


class FinalModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt always holds the model at the step training stopped on.

    Lightning 2.6 writes last.ckpt at the end of fit only if it never wrote one. A run whose max_steps falls
    inside an epoch that `every_n_epochs` skips (500 steps of 58 per epoch, every second epoch) would leave
    last.ckpt at the previous saved epoch, and dpdm-sample, the learning curve and dpdm-export would
    release an earlier model than the one privacy.json and summary.json describe.
    """

    def on_train_end(self, trainer, pl_module):
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)


class SampleGrid(pl.Callback):
    """A class-conditional sample grid from the EMA weights every `every_n_epochs` epochs.

    Row r holds class r (for conditional models); the seeds are fixed, so grids are comparable
    across epochs and runs. `sampler` is the run's `sampler=` config; `num_steps` and `guidance`,
    when set, override it (a cheap grid during training).
    """

    def __init__(self, output_dir: str, every_n_epochs: int = 1, per_class: int = 10,
                 num_steps: int | None = 18, guidance: float | None = None, sampler=None):
        self.dir = Path(output_dir) / "samples"
        self.every, self.per_class = every_n_epochs, per_class
        self.sampler = dict(to_plain(sampler) or {})
        overrides = {"num_steps": num_steps, "guidance": guidance}
        self.sampler.update({k: v for k, v in overrides.items() if v is not None})

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch
        if not trainer.is_global_zero or (epoch + 1) % self.every:
            return
        num_classes = getattr(pl_module.denoiser.net, "num_classes", 0)
        rows = num_classes if num_classes > 0 else self.per_class
        n = rows * self.per_class
        labels = (torch.arange(n) // self.per_class) if num_classes > 0 else None
        x = pl_module.sample(seeds=range(n), class_labels=labels, sampler=self.sampler)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"epoch_{epoch:04d}.png"
        save_image_grid(to_uint8(x), path, nrow=self.per_class)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)


class StepClock:
    """Durations of the recent training steps, for a run's ETA and rate. The gap across an epoch end
    (checkpoints, sample grids) is not a step: `new_epoch()` drops it."""

    def __init__(self, window: int = 50):
        self._times: deque[float] = deque(maxlen=window)
        self._last: float | None = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._times.append(now - self._last)
        self._last = now

    def new_epoch(self) -> None:
        self._last = None

    @property
    def steps(self) -> int:
        return len(self._times)

    @property
    def mean_step_s(self) -> float | None:
        return sum(self._times) / len(self._times) if self._times else None


def run_total_steps(trainer, plan) -> float:
    """The steps this run will take: the trainer's, capped at the plan's budget under DP (inf if unbounded)."""
    total = trainer.estimated_stepping_batches
    return min(total, plan.max_steps) if plan.enabled else total


class DPProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar plus what a DP run needs at a glance: noised images/s, ε spent so far and
    the ETA of the whole run (not just the epoch), from the mean duration of the recent steps."""

    def __init__(self, refresh_rate: int = 1, epsilon_every_s: float = 15.0, window: int = 50):
        super().__init__(refresh_rate=refresh_rate)
        # One RDP ε evaluation takes ~0.1 s on a CPU: on a time budget, not per step, so fast GPU steps
        # do not pay for the bar.
        self.eps_every_s = epsilon_every_s
        self._clock = StepClock(window)
        self._eps: tuple[float, float] | None = None  # (time, ε), recomputed every eps_every_s
        self.eta_s: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._clock.tick()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_start(self, trainer, pl_module):
        self._clock.new_epoch()
        super().on_train_epoch_start(trainer, pl_module)

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        plan = getattr(pl_module, "plan", None)
        if plan is None:
            return metrics
        steps = pl_module.steps_taken
        now = time.perf_counter()
        if plan.enabled and (self._eps is None or now - self._eps[0] >= self.eps_every_s
                             or steps >= plan.max_steps):
            self._eps = (now, pl_module.epsilon_spent())
        if plan.enabled and self._eps is not None:
            metrics["ε"] = f"{self._eps[1]:.3g}/{plan.target_epsilon:g}"
            k = getattr(pl_module, "examples_per_person", 1)
            if k > 1:
                metrics[f"ε/person(k={k})"] = f"{group_privacy(self._eps[1], plan.delta, k)[0]:.3g}"
        total = run_total_steps(trainer, plan)
        step_s = self._clock.mean_step_s
        if step_s is not None and math.isfinite(total):
            self.eta_s = max(total - steps, 0) * step_s
            metrics["ETA"] = _hms(self.eta_s)
        return metrics


class ProgressLog(pl.Callback):
    """One log line every `every_s` seconds and at the last step — step, ε spent, noised images/s, ETA — for
    runs without a progress bar (`trainer.enable_progress_bar=false`, as `dpdm-study` trains), whose log
    would otherwise be silent for the hour a CPU preset trains. With a bar it stays quiet (`always` makes
    it log anyway).
    The log outlives the run, so what it shows must not depend on one Poisson batch: the rate counts the
    plan's expected batch, and the rate and ETA appear only once `min_steps` step durations average into
    them (a step's duration grows with its sampled batch size), as the per-epoch rate in the metrics does."""

    def __init__(self, every_s: float = 60.0, always: bool = False, window: int = 50, min_steps: int = 10):
        if not every_s > 0:
            raise ValueError(f"callbacks.progress_log.every_s must be > 0 seconds, got {every_s}")
        if not 1 <= min_steps <= window:
            raise ValueError(f"callbacks.progress_log.min_steps must be in [1, window={window}], got {min_steps}")
        self.every_s, self.always, self.min_steps = float(every_s), always, min_steps
        self._clock = StepClock(window)
        self._next_at = self._total = None
        self._active = False

    def on_train_start(self, trainer, pl_module):
        plan = getattr(pl_module, "plan", None)
        self._active = (plan is not None and trainer.is_global_zero
                        and (trainer.progress_bar_callback is None or self.always))
        if self._active:  # the run's length is fixed by now: computed once, not at every step
            self._total = run_total_steps(trainer, plan)
            self._next_at = time.monotonic() + self.every_s

    def on_train_epoch_start(self, trainer, pl_module):
        self._clock.new_epoch()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._active:  # beside a bar (the usual interactive run): no work at any step
            return
        self._clock.tick()
        now, steps = time.monotonic(), pl_module.steps_taken
        if now < self._next_at and steps < self._total:
            return
        self._next_at = now + self.every_s
        step_s = self._clock.mean_step_s if self._clock.steps >= self.min_steps else None
        logging.getLogger("dpdm.train").info(progress_line(pl_module, steps, self._total, step_s))


def progress_line(pl_module, steps: int, total: float, step_s: float | None) -> str:
    plan = pl_module.plan
    parts = [f"step {steps}/{total:.0f} ({100 * steps / total:.0f}%)" if math.isfinite(total) else f"step {steps}"]
    if plan.enabled:
        parts.append(f"ε {pl_module.epsilon_spent():.3g}/{plan.target_epsilon:g}")
    if step_s:
        parts.append(f"{plan.expected_batch_size * plan.noise_multiplicity / step_s:.0f} noised images/s")
        if math.isfinite(total):
            parts.append(f"ETA {_hms(max(total - steps, 0) * step_s)}")
    return ", ".join(parts)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
