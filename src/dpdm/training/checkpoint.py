"""Reading dpdm checkpoints outside of Lightning (sampling, evaluation, accounting)."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from hydra.utils import instantiate

from dpdm.diffusion.preconditioning import Denoiser


class CheckpointError(ValueError):
    pass


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    from dpdm.training.export import is_export, load_export

    if is_export(path):  # a dpdm-export file: EMA weights and build config only
        return load_export(path)
    try:
        # weights_only: tensors and plain containers only. A checkpoint is a pickle, and unpickling
        # arbitrary objects runs code from the file; dpdm-sample / -evaluate / -privacy take files from
        # other people. Everything dpdm and Lightning store passes this allow-list.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise CheckpointError(
                f"checkpoint {path} holds Python objects other than tensors and plain containers; "
                "unpickling them could run code from the file, so dpdm refuses to load it. dpdm-train "
                "checkpoints never hold such objects: use a checkpoint written by dpdm-train (or "
                "dpdm-export), from a source you trust.") from None
        raise _corrupted(path, e) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise _corrupted(path, e) from None
    if not isinstance(ckpt, dict) or "dpdm" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a dpdm-train checkpoint (no dpdm state)")
    return ckpt


def _corrupted(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}). Use an earlier checkpoint "
                           "or retrain; the file was left untouched.")


def checkpoint_dataset(ckpt: dict) -> str | None:
    """The training dataset's name (data.name) stored with a dpdm-train checkpoint, if any."""
    return (ckpt["dpdm"].get("build_config") or {}).get("data", {}).get("name")


def checkpoint_sampler(ckpt: dict) -> dict | None:
    """The sampler config of the run that wrote the checkpoint (its preset's `sampler:`), if stored."""
    return (ckpt["dpdm"].get("build_config") or {}).get("sampler")


def sampler_for(ckpt: dict, configured, overridden: bool, log=None) -> dict:
    """The sampler to draw with: the command line's when it names one (`sampler=`, `sampler.*=`), else the
    training run's own (a preset's guidance and grid travel with its checkpoint), else the configured one."""
    from dpdm.utils.configs import to_plain

    stored = checkpoint_sampler(ckpt)
    if overridden or not stored:
        return dict(to_plain(configured))
    if log is not None:
        shown = ", ".join(f"{k}={v}" for k, v in stored.items() if k in ("name", "num_steps", "guidance", "sigma_min"))
        log(f"sampling with the training run's sampler ({shown}); pass sampler=... or sampler.<key>=... to change it")
    return dict(stored)


def sampler_overridden() -> bool:
    """Whether this Hydra command line sets the sampler group or any of its keys (True outside a Hydra
    main, e.g. a config composed in code: then the composed sampler is what the caller asked for)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    return any(o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "sampler"
               for o in HydraConfig.get().overrides.task)


def preconditioning_config(build_config: dict) -> dict:
    """The preconditioning's config in a checkpoint's build config. Checkpoints written before the
    `denoiser` group was renamed `preconditioning` store it under "denoiser"; both stay loadable."""
    for key in ("preconditioning", "denoiser"):
        if key in build_config:
            return build_config[key]
    raise CheckpointError("checkpoint's build config names no preconditioning; it was not written by dpdm-train")


def load_ema_denoiser(ckpt: dict) -> Denoiser:
    """The EMA denoiser of a training checkpoint, rebuilt from the config stored with it."""
    cfg = ckpt["dpdm"].get("build_config")
    if not cfg:
        raise CheckpointError("checkpoint lacks its build config; it was not written by dpdm-train")
    denoiser = Denoiser(instantiate(cfg["net"]), instantiate(preconditioning_config(cfg)))
    prefix = "ema."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    denoiser.load_state_dict(state)
    return denoiser.eval().requires_grad_(False)
