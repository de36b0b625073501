"""Evaluation during training: FID / fd_classifier / downstream accuracy on the EMA weights.

`SyntheticDataEvaluation` draws a fixed-seed, class-balanced synthetic set from `pl_module.sample`
(the EMA denoiser) every `every_n_epochs` epochs and at the end of fit, runs `dpdm.evaluation`'s
protocol on it and sends the metrics, under the same `eval/...` names as dpdm-evaluate, to every
logger (CSV, wandb) and to `<output_dir>/eval/<name>_epoch_XXXX.json` (`<name>_final.json` at the end).
ε spent per epoch is logged by the module itself (`privacy/epsilon`) and recorded in these files.
Fixed seeds make successive evaluations differ only through the model.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from dpdm.evaluation import EvalSettings, Evaluator, draw_synthetic_set
from dpdm.evaluation.protocol import private_data_metrics, private_data_uses
from dpdm.utils.configs import to_plain
from dpdm.utils.images import to_uint8
from dpdm.utils.jsonio import write_json_atomic

__all__ = ["SyntheticDataEvaluation"]

log = logging.getLogger("dpdm.train")


def check_release(name: str, settings: EvalSettings, log_nonprivate_metrics: bool) -> None:
    """Refuse an evaluation that reads the private training split unless non-private metrics are on."""
    uses = private_data_uses(settings)
    if uses and not log_nonprivate_metrics:
        raise ValueError(
            f"callbacks.{name} would compute {'; '.join(uses)}: the training split is the private data, and "
            "these metrics would leave the run without DP. Use the public test split "
            f"(callbacks.{name}.evaluation.reference_splits=[test], "
            f"callbacks.{name}.evaluation.real_classifier.train_split=test: the defaults), or set "
            "privacy.log_nonprivate_metrics=true to log them as labelled non-private diagnostics.")


class SyntheticDataEvaluation(pl.Callback):
    """Evaluate samples of the EMA denoiser every `every_n_epochs` epochs (None: never) and at the end."""

    def __init__(self, *, output_dir: str, dataset: str, data_dir: str | None = None, name: str = "eval",
                 every_n_epochs: int | None = 1, at_end: bool = True, num_samples: int = 5000, seed: int = 0,
                 sample_batch_size: int = 500, sampler: dict | None = None, num_steps: int | None = None,
                 evaluation: dict | None = None, log_nonprivate_metrics: bool = False) -> None:
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1 or null, got {every_n_epochs}")
        self.dir = Path(output_dir) / "eval"
        self.name, self.every, self.at_end = name, every_n_epochs, at_end
        self.num_samples, self.seed, self.batch_size = num_samples, seed, sample_batch_size
        # The run's sampler= config; `num_steps`, when set, overrides its step count (cheaper evaluations).
        self.sampler = dict(to_plain(sampler) or {})
        if num_steps is not None:
            self.sampler["num_steps"] = int(num_steps)
        self.settings = EvalSettings.from_dict(to_plain(evaluation))
        check_release(name, self.settings, log_nonprivate_metrics)
        self.dataset, self.data_dir = dataset, data_dir
        self._evaluator: Evaluator | None = None
        self._last_step: int | None = None
        self._last_result: dict | None = None

    # ---- hooks -----------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.every is None or (epoch + 1) % self.every or not trainer.is_global_zero:
            return
        self._run(trainer, pl_module, tag=f"epoch_{epoch:04d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end and trainer.is_global_zero:
            self._run(trainer, pl_module, tag="final")

    # ---- work ------------------------------------------------------------------------------------
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, tag: str) -> None:
        if self._last_step == trainer.global_step and self._last_result is not None:
            # These weights were evaluated at the last epoch end already (same step): reuse that.
            result = self._last_result
        else:
            result = self._evaluate(trainer, pl_module)
            self._log(trainer, pl_module, result["metrics"], final=tag == "final")
        self._last_step, self._last_result = trainer.global_step, result
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / f"{self.name}_{tag}.json", result)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        t0 = time.time()
        if self._evaluator is None:
            self._evaluator = Evaluator(dataset=self.dataset, data_dir=self.data_dir, settings=self.settings,
                                        device=pl_module.device)
        net = getattr(getattr(pl_module, "denoiser", None), "net", None)
        num_classes = int(getattr(net, "num_classes", 0) or 0)

        def sample_fn(seeds, labels):
            return to_uint8(pl_module.sample(seeds=seeds, class_labels=labels, sampler=self.sampler))

        needs_held_out = "downstream" in self.settings.metrics
        held_out = self.settings.downstream.held_out_count(self.num_samples) if needs_held_out else 0
        samples, val = draw_synthetic_set(sample_fn, num_samples=self.num_samples, num_held_out=held_out,
                                          num_classes=num_classes, seed=self.seed, batch_size=self.batch_size)
        report = self._evaluator.evaluate(samples, held_out=val)
        # Metrics computed from the training split (only with the opt-in switch) are named as such.
        for k in private_data_metrics(self.settings, report.metrics):
            report.metrics[f"nonprivate/{k}"] = report.metrics.pop(k)
        eps = pl_module.epsilon_spent() if hasattr(pl_module, "epsilon_spent") else None
        result = {"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                  "epsilon": None if eps is None or eps == float("inf") else eps, **report.to_dict(),
                  "sampler": self.sampler, "seconds": round(time.time() - t0, 1)}
        log.info("%s at step %d: %s", self.name, trainer.global_step,
                 ", ".join(f"{k}={v:.4g}" for k, v in report.metrics.items()) or "no metric available")
        return result

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float],
             *, final: bool) -> None:
        """At an epoch end through Lightning (same row and step as privacy/epsilon); after fit, where
        self.log() is not allowed, straight to the loggers at the last step. Same names either way."""
        if not metrics:
            return
        if not final:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True)
            return
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "epoch": float(trainer.current_epoch)}, step=trainer.global_step)
            logger.save()
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)
