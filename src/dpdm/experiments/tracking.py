"""Experiment tracking around dpdm-train's loggers: wandb offline by default, grouped by sweep.

- `configure_wandb(cfg)`, before the loggers are built: WANDB_MODE defaults to offline (no account, no
  network; a user's WANDB_MODE wins), a wandb run left open by an earlier job of the same process (the
  basic launcher runs every job of a sweep in one process; joblib reuses workers) is finished so that
  each job gets its own run, and in a multirun the group is the sweep and the name the job's overrides.
- `log_run_config(loggers, cfg, plan)`: the resolved config and the privacy plan to every logger
  (wandb's run config; the CSV logger's hparams.yaml), so dashboards can filter and group by them.
- `finish_loggers(loggers, summary)`: the run's final ε, steps and wall time into wandb's summary, then
  close the wandb run (flushing offline files).
"""
from __future__ import annotations

import os
import sys

from omegaconf import DictConfig, OmegaConf, open_dict


def hydra_job() -> dict:
    """Mode, sweep dir, job number and overrides of the running Hydra job ({} outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return {}
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {"multirun": hc.mode == RunMode.MULTIRUN, "sweep_dir": str(hc.sweep.dir),
            "job_num": hc.job.get("num"), "override_dirname": hc.job.override_dirname,
            "overrides": list(hc.overrides.task)}


def sweep_keys(sweep_dir) -> list[str]:
    """The keys a multirun sweeps over (`privacy.epsilon=1,10` → privacy.epsilon), read from the
    multirun.yaml Hydra writes into the sweep dir before launching; [] when there is none."""
    from pathlib import Path

    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return []
    task = OmegaConf.load(path).hydra.overrides.task
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(task)) if o.is_sweep_override()]


def job_label(overrides: list[str], keys: list[str]) -> str:
    """The job's overrides of the swept keys, e.g. 'privacy.epsilon=1,loss.noise_multiplicity=8'."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return ",".join(o.input_line for o in parsed if o.key_or_group in keys)


def wandb_names(job: dict, sweep_name: str | None) -> tuple[str | None, str | None]:
    """(group, name) of a job's wandb run: the sweep (sweep_name, else the sweep dir) and the job
    (its number and the values of the swept keys)."""
    if not job.get("multirun"):
        return sweep_name, None
    group = sweep_name if sweep_name is not None else job["sweep_dir"]
    label = job_label(job["overrides"], sweep_keys(job["sweep_dir"]))
    name = f"{job['job_num']}:{label}" if label else str(job["job_num"])
    # wandb limits group names to 128 characters: keep the end, where a sweep dir's timestamp is.
    return str(group)[-128:], name


def configure_wandb(cfg: DictConfig) -> None:
    loggers = cfg.get("logger") or {}
    wandb_cfgs = [c for c in loggers.values() if str(c.get("_target_", "")).endswith("WandbLogger")]
    if not wandb_cfgs:
        return
    os.environ.setdefault("WANDB_MODE", "offline")
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()  # an earlier job's run (e.g. it failed before finishing)
    group, name = wandb_names(hydra_job(), cfg.get("sweep_name"))
    for c in wandb_cfgs:
        with open_dict(c):
            if c.get("group") is None and group is not None:
                c.group = group
            if c.get("name") is None and name is not None:
                c.name = name


def log_run_config(loggers, cfg: DictConfig, plan) -> None:
    params = {"config": OmegaConf.to_container(cfg, resolve=True), "privacy_plan": plan.to_dict()}
    job = hydra_job()
    if job:
        params["hydra"] = {"overrides": job["overrides"], "sweep_dir": job["sweep_dir"] if job["multirun"] else None}
    for logger in loggers:
        logger.log_hyperparams(params)


def finish_loggers(loggers, summary: dict) -> None:
    from pytorch_lightning.loggers import WandbLogger
    from pytorch_lightning.utilities import rank_zero_only

    if rank_zero_only.rank != 0:  # under DDP only rank 0 holds a real wandb run
        return

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            privacy = summary.get("privacy") or {}
            logger.experiment.summary.update({
                "privacy/epsilon_final": privacy.get("epsilon"), "privacy/steps_final": privacy.get("steps"),
                "wall_time_s": summary.get("wall_time_s"), "optimizer_steps": summary.get("optimizer_steps")})
            logger.experiment.finish()
