"""dpdm-train: the Hydra main. Composes data, network, preconditioning, noise levels, privacy and trainer."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dpdm.cli import CONFIG_DIR
from dpdm.cli.errors import exit_on_user_error
from dpdm.training.builder import build_module, describe_plan

log = logging.getLogger("dpdm.train")


def run_training(cfg: DictConfig) -> dict:
    import pytorch_lightning as pl
    import torch

    from dpdm.diffusion.samplers import check_null_label_trained
    from dpdm.training.config_guard import check_mechanism_config

    check_mechanism_config(cfg)  # a config the accountant would not describe is refused before any write
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not _writable(out):
        raise PermissionError(f"output directory {out} is not writable; choose another with "
                              "hydra.run.dir=<dir>")
    check_run_dir(out, cfg.ckpt_path)
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    dm = instantiate(cfg.data)
    prepare_data_once(dm)
    dm.setup("fit")
    module, plan = build_module(cfg, dm)  # fits cfg.net to the data; model.net follows by interpolation
    # The run's grids and the sampler its checkpoint stores use the configured guidance.
    check_null_label_trained(module.denoiser, module.label_dropout, cfg.sampler, unconditional=False)
    OmegaConf.resolve(cfg)  # from here one consistent, fully interpolated config for every component
    log.info(describe_plan(plan, dm.examples_per_person))
    if (slow := slow_precision_warning(cfg.trainer)) is not None:
        log.warning(slow)
    if cfg.ckpt_path is not None:  # refuse before anything in the run dir is (over)written
        check_resume(cfg.ckpt_path, plan, cfg.data)
    # Callbacks first: one that would release non-private metrics refuses here, before any file is written.
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    from dpdm.experiments.tracking import configure_wandb, finish_loggers, log_run_config

    configure_wandb(cfg)  # offline unless WANDB_MODE is set; one run per sweep job, grouped by sweep
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    if cfg.ckpt_path is not None:
        for kept in keep_earlier_csv_metrics(loggers):
            log.info("kept the earlier calls' metrics as %s", kept)
    log_run_config(loggers, cfg, plan)
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a bar callback then
        from pytorch_lightning.callbacks import ProgressBar
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    t0 = time.time()
    with quiet_start_up():
        trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                              **stop_at_planned_steps(plan, cfg.trainer))
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
    from dpdm.training.callbacks import privacy_report
    from dpdm.utils.jsonio import write_json_atomic
    from dpdm.utils.machine import machine_facts

    this_call = round(time.time() - t0, 1)
    summary = {
        "privacy": privacy_report(module),
        "wall_time_s": run_wall_time(this_call, module.resumed_at_step, module.training_seconds_before),
        "epochs_completed": trainer.current_epoch,
        "optimizer_steps": int(trainer.global_step),
        # None when no step ran (e.g. trainer.max_time reached before the first): nothing was saved
        "last_checkpoint": str(last) if (last := out / "checkpoints" / "last.ckpt").is_file() else None,
        "sample_grids": sorted(str(p) for p in (out / "samples").glob("*.png")),
        "machine": machine_facts(),  # what wall_time_s was measured on
    }
    if module.resumed_at_step is not None:
        summary["resumed"] = {"at_step": module.resumed_at_step, "wall_time_s_this_call": this_call,
                              "training_s_before": module.training_seconds_before}
        if module.training_seconds_before is None:
            log.warning("resumed from a checkpoint that does not record its training time (written before dpdm "
                        "kept it): wall_time_s counts only the %d steps of this call",
                        summary["optimizer_steps"] - module.resumed_at_step)
    if module.log_nonprivate:  # opt-in, labelled: computed from the private data without noise
        summary["nonprivate"] = {"train_loss_last": _last_metric(trainer, "nonprivate/train_loss")}
    if trainer.is_global_zero:  # trainer=ddp: every rank returns here; one writes the run's files
        write_json_atomic(out / "summary.json", summary)
    finish_loggers(loggers, summary)
    eps = summary["privacy"]["epsilon"]
    log.info("done in %.0fs: %d steps, ε=%s; run dir %s", summary["wall_time_s"],
             summary["optimizer_steps"], "n/a" if eps is None else f"{eps:.4f}", out)
    return summary


def stop_at_planned_steps(plan, trainer_cfg) -> dict:
    """Trainer arguments that end a DP run with `trainer.max_steps` set at the steps its σ was calibrated for.

    An uninterrupted run stops there anyway: every Poisson epoch has int(1/q) steps, and the plan is
    min(max_epochs x int(1/q), max_steps). A resumed one need not: Lightning 2.6 resumed a fmnist_eps10_cpu run
    (max_epochs 9, max_steps 500) from its checkpoint at the end of epoch 5 (step 348) by replaying epoch 5
    with one step, then ran epochs 6 and 7 and stopped at 465 steps (its fit loop counts any run with
    max_steps as restarting, so an epoch-end checkpoint's epoch runs again). Without max_epochs it ends as
    planned.
    A run that stops by epochs (max_steps unset) resumes exactly, and a non-private run keeps the config's
    limits (its shuffled epochs have ceil(N/B) steps, not int(1/q)).
    """
    if not plan.enabled or (trainer_cfg.get("max_steps") or -1) < 1:
        return {}
    return {"max_epochs": -1, "max_steps": plan.planned_steps}


def keep_earlier_csv_metrics(loggers) -> list[Path]:
    """Lightning's CSVLogger deletes the metrics.csv it finds when it starts, which in a resumed run is the
    earlier calls' record: move it aside first (metrics.before_resume<i>.csv, the first free i)."""
    from pytorch_lightning.loggers import CSVLogger

    kept = []
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        metrics = Path(logger.log_dir) / "metrics.csv"
        if metrics.is_file():
            i = 1
            while (target := metrics.with_name(f"metrics.before_resume{i}.csv")).exists():
                i += 1
            metrics.rename(target)
            kept.append(target)
    return kept


def run_wall_time(this_call: float, resumed_at_step: int | None, seconds_before: float | None) -> float:
    """A run's training wall time: this call's, plus, for a resumed run, the earlier calls' up to the
    checkpoint it resumed from (unknown for checkpoints written before dpdm recorded it: this call's only)."""
    if resumed_at_step is None or seconds_before is None:
        return this_call
    return round(this_call + seconds_before, 1)


# Start-up lines a user cannot act on. The EMA copy is in eval mode on purpose (it is never trained, and
# Lightning counts its modules); the pytree notice is about Lightning's own use of torch internals; the
# data module serves the test split to the evaluation callbacks, not to a validation loop (there is none);
# the log lines advertise or state the obvious. Everything else Lightning says still shows.
UNACTIONABLE_WARNINGS = (r"Found \d+ module\(s\) in eval mode", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                         r"You passed in a `val_dataloader` but have no `validation_step`")
UNACTIONABLE_LOG_LINES = ("💡 Tip:", "TPU available:")


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(UNACTIONABLE_LOG_LINES)


@contextlib.contextmanager
def quiet_start_up():
    """Within: the warnings and log lines above are dropped; restored afterwards."""
    import warnings

    loggers = [logging.getLogger(n) for n in ("pytorch_lightning.utilities.rank_zero",
                                              "lightning.pytorch.utilities.rank_zero")]
    drop = _DropLines()
    with warnings.catch_warnings():
        for pattern in UNACTIONABLE_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for lg in loggers:
            lg.addFilter(drop)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeFilter(drop)


def prepare_data_once(dm, *, wait_s: float = 3600.0, poll_s: float = 2.0) -> None:
    """The data module's `prepare_data` on local rank 0 only (trainer=ddp starts one process per device
    before any Lightning barrier exists); the other ranks wait for rank 0's cache to be written, then
    each verifies it as it reads it (`setup`)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        dm.prepare_data()
        return
    deadline = time.monotonic() + wait_s
    while not dm.is_prepared():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {os.environ['LOCAL_RANK']}: dataset {dm.name!r} was not prepared in "
                               f"{dm.cache_dir} within {wait_s:.0f} s; prepare it first (`dpdm-data`)")
        time.sleep(poll_s)


# What a finished (or checkpointed) run leaves behind; a new run must not overwrite it.
RESULT_FILES = ("privacy.json", "summary.json", "checkpoints/last.ckpt")


def check_run_dir(out: Path, ckpt_path) -> None:
    """Refuse a run dir holding an earlier run's results, unless this run continues that run."""
    existing = [r for r in RESULT_FILES if (out / r).exists()]
    if not existing:
        return
    if ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(out.resolve()):
        return  # resuming into its own run dir: the run continues there
    raise FileExistsError(
        f"output directory {out} already holds an earlier run's results ({', '.join(existing)}); "
        "refusing to overwrite them. Choose a new hydra.run.dir, or continue that run with "
        f"ckpt_path={out}/checkpoints/last.ckpt hydra.run.dir={out}.")


def check_resume(ckpt_path, plan, data_cfg=None) -> None:
    """Before fit: the checkpoint is readable, has the same mechanism and data, and has budget/steps left."""
    from dpdm.privacy.accounting import epsilon_from_history, steps_in_history
    from dpdm.training.checkpoint import load_checkpoint
    from dpdm.training.config_guard import check_same_data
    from dpdm.training.module import budget_exhausted, check_same_mechanism

    ckpt = load_checkpoint(ckpt_path)
    state = ckpt["dpdm"]
    check_same_mechanism(state["plan"], plan.to_dict())
    if data_cfg is not None and plan.enabled:
        check_same_data(state.get("build_config"), data_cfg)
    if plan.enabled:
        history = (state.get("accountant") or {}).get("history", [])
        steps = steps_in_history(history)
        if steps >= plan.max_steps:
            eps = epsilon_from_history(history, delta=plan.delta, accountant=plan.accountant)
            raise budget_exhausted(plan, steps, eps)
    else:
        steps = int(ckpt.get("global_step", 0))
    if steps >= plan.planned_steps:
        raise ValueError(f"the run in {ckpt_path} already finished its {plan.planned_steps} planned "
                         "steps; nothing to resume. Start a new run (new hydra.run.dir) to train more.")


def slow_precision_warning(trainer_cfg) -> str | None:
    """bf16 on a CPU without oneDNN bf16 kernels is legal and private, but many times slower than fp32."""
    import torch

    from dpdm.utils.machine import cpu_isa, cpu_model, has_cpu_bf16_kernels

    precision = str(trainer_cfg.get("precision", "32-true"))
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not precision.startswith("bf16") or not on_cpu or has_cpu_bf16_kernels():
        return None
    return (f"trainer.precision={precision} on this CPU ({cpu_model()}, {cpu_isa()}) will be much slower than "
            "fp32: it has no bf16 kernels (they need AVX-512, or avx512_bf16 / AMX), and the DP step of the CPU "
            "presets' network ran 9-11x slower in bf16-mixed on such a CPU (docs/performance.md). Use "
            "trainer.precision=32-true here; bf16-mixed pays only on CPUs with bf16 support and on GPUs.")


def _last_metric(trainer, key):
    v = trainer.callback_metrics.get(key)
    return None if v is None else float(v)


def _writable(path: Path) -> bool:
    probe = path / ".write_probe"
    try:
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> None:
    run_training(cfg)


@exit_on_user_error
def check_run_dir_arg(argv: list[str]) -> None:
    """Hydra creates hydra.run.dir before calling the main; catch an unusable one with one message."""
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            path = Path(arg.split("=", 1)[1]).expanduser().absolute()
            probe = path
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
                raise PermissionError(f"output directory {path} cannot be created or written "
                                      f"({probe} is not a writable directory); choose another with "
                                      "hydra.run.dir=<dir>")


def main() -> None:
    check_run_dir_arg(sys.argv[1:])
    from dpdm.utils.allocator import retain_freed_memory

    retain_freed_memory()  # reuse freed step buffers instead of page-faulting them in again
    _hydra_main()


if __name__ == "__main__":
    main()
