"""The LightningModule: denoiser + EMA + DP optimizer + accountant, wired for manual optimization.

One training step = one logical Poisson batch (one DP-SGD step, one accountant step, one EMA update).
The logical batch is processed in physical chunks of at most `max_physical_batch_size` examples; chunks
before the last are "skipped" optimizer steps that only clip and accumulate (as Opacus'
BatchMemoryManager does), so noise is added exactly once per logical batch. Manual optimization keeps
Lightning's global_step equal to the number of real steps.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import pytorch_lightning as pl
import torch
from torch import nn

from dpdm.diffusion.loss import check_label_dropout, denoising_loss_per_example, draw_training_noise
from dpdm.diffusion.noise_levels import LogNormalSigma, NoiseLevels, check_compatible
from dpdm.diffusion.preconditioning import Denoiser, EDMPreconditioning
from dpdm.diffusion.samplers import sample_from_seeds
from dpdm.privacy.accounting import accountant_epsilon, steps_in_history
from dpdm.privacy.engine import DPComponents, check_engine, make_dp_components
from dpdm.privacy.grads_opacus import set_empty_grad_samples
from dpdm.training.ema import check_ema_warmup_offset, ema_rate_at, make_ema_copy, update_ema
from dpdm.training.lr_schedule import check_lr_schedule, make_lr_scheduler
from dpdm.training.privacy_plan import PrivacyPlan
from dpdm.utils.seeds import derived_seed

# Any change to these between a checkpoint and a resumed run changes the mechanism being accounted.
MECHANISM_KEYS = ("enabled", "target_epsilon", "delta", "noise_multiplier", "max_grad_norm",
                  "sample_rate", "expected_batch_size", "accountant", "dataset_size",
                  "noise_multiplicity", "max_steps")


class PrivacyBudgetExhausted(RuntimeError):
    pass


def check_same_mechanism(old: dict, new: dict) -> None:
    """Refuse to resume a checkpoint (plan `old`) under a config whose plan `new` changes the mechanism."""
    diff = {k: (old.get(k), new.get(k)) for k in MECHANISM_KEYS if old.get(k) != new.get(k)}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ValueError("Refusing to resume: the config changes the privacy mechanism of the "
                         f"checkpointed run ({lines}). Resume with the original settings or start a "
                         "new run.")


def budget_exhausted(plan: PrivacyPlan, steps: int, epsilon: float) -> PrivacyBudgetExhausted:
    return PrivacyBudgetExhausted(
        f"The privacy budget of this run is spent: {steps} DP-SGD steps taken, "
        f"ε={epsilon:.4g} of {plan.target_epsilon} (δ={plan.delta}). "
        "Training further would exceed it; start a new run (new output dir) with a new budget.")


class DPDiffusionModule(pl.LightningModule):
    def __init__(self, *, net: nn.Module, plan: PrivacyPlan,
                 preconditioning: EDMPreconditioning | None = None,
                 noise_levels: NoiseLevels | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 label_dropout: float = 0.1, pixel_reduction: str = "sum", ema_rate: float = 0.999,
                 ema_warmup: bool = False, ema_warmup_offset: float = 10.0,
                 lr_schedule: str = "constant", lr_final_fraction: float = 1.0,
                 max_physical_batch_size: int = 256, secure_mode: bool = False,
                 seed: int = 0, noise_seed: int | None = None, dp_engine: str = "fold",
                 log_nonprivate_metrics: bool = False):
        super().__init__()
        # The scalar settings go into the checkpoint's hyper_parameters. The net, preconditioning, noise
        # levels and optimizer are objects (pickled, they would make checkpoints unloadable with
        # weights_only=True); their configs travel as `build_config` instead, the plan as dpdm.plan.
        self.save_hyperparameters(ignore=["net", "plan", "preconditioning", "noise_levels", "optimizer"],
                                  logger=False)
        self.automatic_optimization = False
        self.denoiser = Denoiser(net, preconditioning or EDMPreconditioning())
        self.noise_levels = noise_levels or LogNormalSigma()
        check_compatible(self.denoiser.precond, self.noise_levels)
        self.ema = make_ema_copy(self.denoiser)
        self.plan = plan
        self.K = plan.noise_multiplicity
        check_label_dropout(label_dropout)
        self.label_dropout, self.pixel_reduction = label_dropout, pixel_reduction
        self.make_optimizer = optimizer or partial(torch.optim.Adam, lr=3e-4)
        if ema_warmup:
            check_ema_warmup_offset(ema_warmup_offset)
        self.ema_rate, self.ema_warmup, self.ema_warmup_offset = ema_rate, ema_warmup, float(ema_warmup_offset)
        check_lr_schedule(lr_schedule, lr_final_fraction)
        self.lr_schedule, self.lr_final_fraction = lr_schedule, lr_final_fraction
        self.max_physical = max_physical_batch_size
        self.secure_mode, self.seed, self.noise_seed = secure_mode, seed, noise_seed
        self.dp_engine = check_engine(dp_engine)
        # Off by default: the training loss and the sampled batch size are computed from the private data
        # without noise; `privacy.log_nonprivate_metrics=true` logs them under nonprivate/ (docs/privacy.md).
        self.log_nonprivate = log_nonprivate_metrics
        self._epoch_step_time, self._epoch_steps = 0.0, 0
        self.dp: DPComponents | None = None
        self._restored: dict | None = None
        self._diffusion_gen: torch.Generator | None = None
        self.build_config: dict | None = None  # net/denoiser/data config, for rebuilding from a ckpt
        # The training time of the steps this module holds, carried across resumes so that a resumed run
        # reports the whole run's time. A killed call's steps after its last checkpoint are redone on
        # resume, so their time is not counted. None: resumed from a checkpoint that did not record it.
        self.training_seconds_before: float | None = 0.0
        self.resumed_at_step: int | None = None
        self._clock_start: float | None = None

    # ---- optimizer, privacy engine ---------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self._dp_optimizer()
        # Decays over the plan's calibrated steps (public), stepped by hand once per logical batch.
        scheduler = make_lr_scheduler(optimizer, kind=self.lr_schedule, total_steps=self.plan.planned_steps,
                                      final_fraction=self.lr_final_fraction)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _dp_optimizer(self):
        inner = self.make_optimizer(self.denoiser.parameters())
        if not self.plan.enabled:
            return inner
        if self.dp is None:
            self.dp = make_dp_components(
                self.denoiser.net, inner, noise_multiplier=self.plan.noise_multiplier,
                max_grad_norm=self.plan.max_grad_norm,
                expected_batch_size=self.plan.expected_batch_size,
                sample_rate=self.plan.sample_rate, noise_multiplicity=self.K,
                accountant=self.plan.accountant, secure_mode=self.secure_mode,
                noise_seed=self.noise_seed, engine=self.dp_engine)
        else:  # a second fit() on the same module: keep hooks/accountant, rewrap the new optimizer
            self.dp.optimizer.original_optimizer = inner
        if self._restored is not None:
            self.dp.accountant.load_state_dict(self._restored["accountant"])
            if "noise_rng" in self._restored:
                self.dp.noise_generator.set_state(self._restored["noise_rng"])
        return self.dp.optimizer

    @property
    def steps_taken(self) -> int:
        if self.dp is None:
            return int(self.global_step)
        # Opacus merges consecutive identical steps into (σ, q, count) entries; len() counts entries.
        return steps_in_history(self.dp.accountant.history)

    def epsilon_spent(self) -> float:
        if not self.plan.enabled:
            return float("inf")
        if self.steps_taken == 0:
            return 0.0
        return accountant_epsilon(self.dp.accountant, self.plan.delta)

    def on_train_start(self):
        if self.plan.enabled and self.steps_taken >= self.plan.max_steps:
            raise budget_exhausted(self.plan, self.steps_taken, self.epsilon_spent())
        self._clock_start = time.monotonic()
        if self._restored is not None:
            self.resumed_at_step = self.steps_taken
            self.training_seconds_before = self._restored.get("training_seconds")

    def training_seconds(self) -> float | None:
        """Seconds of training behind the steps taken so far, this call's and (after a resume) the earlier
        calls' up to the checkpoint it resumed from; None when that checkpoint did not record them."""
        if self.training_seconds_before is None:
            return None
        return self.training_seconds_before + (0.0 if self._clock_start is None
                                               else time.monotonic() - self._clock_start)

    # ---- one DP-SGD step per logical batch ---------------------------------------------------------
    def _diffusion_generator(self) -> torch.Generator:
        if self._diffusion_gen is None:
            self._diffusion_gen = torch.Generator(device=self.device).manual_seed(self.seed + 2)
            if self.global_rank > 0:
                # Data-parallel (trainer=ddp): each rank draws the diffusion noise of its own examples
                # from its own stream (one shared stream would give example i of every rank the same
                # draws). Rank 0 keeps the single-process stream; checkpoints hold rank 0's state, so a
                # resumed rank r > 0 starts a fresh stream keyed by the steps already taken.
                self._diffusion_gen.manual_seed(derived_seed(self.seed + 2, self.global_rank,
                                                             self.steps_taken))
            elif self._restored is not None and "diffusion_rng" in self._restored:
                self._diffusion_gen.set_state(self._restored["diffusion_rng"])
        return self._diffusion_gen

    def _chunk_loss(self, x, y):
        tn = draw_training_noise(x, y, noise_multiplicity=self.K, noise_levels=self.noise_levels,
                                 label_dropout=self.label_dropout, null_label=self.denoiser.null_label,
                                 generator=self._diffusion_generator())
        return denoising_loss_per_example(self.denoiser, x, tn, pixel_reduction=self.pixel_reduction)

    def training_step(self, batch, batch_idx):
        if self.plan.enabled and self.steps_taken >= self.plan.max_steps:
            self.trainer.should_stop = True  # budget guard: never take a step past the budget
            return None
        t0 = time.perf_counter()
        x, y = batch
        opt = self.optimizers()
        n = x.shape[0]
        bounds = list(range(0, n, self.max_physical)) or [0]
        total = torch.zeros((), device=self.device)
        for j, start in enumerate(bounds):
            xc, yc = x[start:start + self.max_physical], y[start:start + self.max_physical]
            if len(xc) == 0:
                set_empty_grad_samples(self.denoiser.net)  # empty Poisson batch: noise-only step
            else:
                if self.plan.enabled:
                    # DP: the engine turns the per-example losses into p.grad_sample (∇ℓ_i each).
                    with self.dp.per_example.capture():
                        losses = self._chunk_loss(xc, yc)
                    self.dp.per_example.backward(losses)
                else:
                    # Non-private: weight chunks so the sum is the mean over the logical batch.
                    losses = self._chunk_loss(xc, yc)
                    self.manual_backward(losses.mean() * (len(xc) / n))
                total = total + losses.detach().sum()
            if j < len(bounds) - 1 and self.plan.enabled:
                with self._full_precision():
                    self.dp.optimizer.signal_skip_step(True)
                    self.dp.optimizer.step()
                    self.dp.optimizer.zero_grad()
        with self._full_precision():
            self.before_dp_step()
            opt.step()
            self.after_dp_step()
            opt.zero_grad()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
            self.log("lr", scheduler.get_last_lr()[0], on_step=True, on_epoch=False, batch_size=max(n, 1))
        # After the step: steps_taken already counts it, so the rate uses the index of this step.
        update_ema(self.ema, self.denoiser,
                   ema_rate_at(self.steps_taken - 1, self.ema_rate, self.ema_warmup, self.ema_warmup_offset))
        dt = time.perf_counter() - t0
        self._epoch_step_time += dt
        self._epoch_steps += 1
        if self.log_nonprivate:
            self.log_dict({"nonprivate/train_loss": total / max(n, 1), "nonprivate/batch_size": float(n),
                           "nonprivate/noised_images_per_s": n * self.K / dt},
                          on_step=True, on_epoch=False, prog_bar=False, batch_size=max(n, 1))
        # The console bar's rate uses the plan's expected batch (public), never the sampled one; not logged.
        self.log("img/s", self.plan.expected_batch_size * self.K / dt, prog_bar=True, on_step=True,
                 on_epoch=False, logger=False, batch_size=max(n, 1))
        return None

    def _full_precision(self):
        # Under bf16-mixed, Lightning runs training_step inside autocast, which would make Opacus'
        # clipping sums, noise addition and Adam run in bf16: the DP step itself stays fp32.
        return torch.autocast(self.device.type, enabled=False)

    # Extension points around the one real optimizer step of a logical batch, used by the privacy
    # canary audit (dpdm.audit.canaries): before it, p.grad_sample holds the last chunk's per-example gradients
    # (clipping has not happened yet); after it, p.grad holds the privatized (clipped + noised) gradient.
    def before_dp_step(self) -> None:
        pass

    def after_dp_step(self) -> None:
        pass

    def on_train_epoch_end(self):
        if self._epoch_steps:
            # Throughput over the epoch's steps at the expected batch: no single batch's size shows.
            self.log("train/expected_noised_images_per_s",
                     self._epoch_steps * self.plan.expected_batch_size * self.K / self._epoch_step_time)
            self._epoch_step_time, self._epoch_steps = 0.0, 0
        eps = self.epsilon_spent()
        self.log("privacy/epsilon", eps if self.plan.enabled else -1.0)  # the bar shows ε itself
        self.log("privacy/steps", float(self.steps_taken))

    # ---- sampling with the EMA weights -------------------------------------------------------------
    @torch.no_grad()
    def sample(self, *, seeds, class_labels=None, sampler=None, shape=None,
               **overrides) -> torch.Tensor:
        """Images in [-1, 1] from the EMA denoiser, one latent per seed.

        `sampler` is a `sampler=` config (name, num_steps, guidance, options; default: EDM Heun, 18 steps);
        keyword `overrides` (e.g. num_steps=, guidance=) replace its entries.
        """
        self.ema.eval()
        spec = {"name": "edm_heun", "num_steps": 18, **dict(sampler or {}), **overrides}
        x = sample_from_seeds(self.ema, seeds, sampler=spec, class_labels=class_labels,
                              shape=shape or self.image_shape, device=self.device)
        return x.clamp(-1, 1).float()

    @property
    def image_shape(self):
        return self.denoiser.image_shape

    # ---- privacy state is training state ---------------------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        state = {"plan": self.plan.to_dict(), "build_config": self.build_config}
        if self.dp is not None:
            state["accountant"] = self.dp.accountant.state_dict()
            if self.noise_seed is not None:
                # Only a run with a known noise seed (reproducible by choice, no guarantee against whoever
                # knows the seed) carries its noise stream on. Otherwise the state is not saved: a resume
                # draws fresh OS-entropy noise, so two runs forked from one checkpoint never share noise
                # (their difference would be noise-free), and a shared checkpoint reveals no past noise.
                state["noise_rng"] = self.dp.noise_generator.get_state()
        if self._diffusion_gen is not None:
            state["diffusion_rng"] = self._diffusion_gen.get_state()
        if (seconds := self.training_seconds()) is not None:
            state["training_seconds"] = seconds
        checkpoint["dpdm"] = state

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("dpdm")
        if state is None:
            raise ValueError("This checkpoint has no dpdm privacy state; it was not written by dpdm-train.")
        check_same_mechanism(state["plan"], self.plan.to_dict())
        self._restored = state
