"""Reading dpdm checkpoints outside of Lightning (sampling, evaluation, accounting)."""
from __future__ import annotations

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
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}). Use an earlier checkpoint "
                              "or retrain; the file was left untouched.") from None
    if "dpdm" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a dpdm-train checkpoint (no dpdm state)")
    return ckpt


def checkpoint_dataset(ckpt: dict) -> str | None:
    """The training dataset's name (data.name) stored with a dpdm-train checkpoint, if any."""
    return (ckpt["dpdm"].get("build_config") or {}).get("data", {}).get("name")


def load_ema_denoiser(ckpt: dict) -> Denoiser:
    """The EMA denoiser of a training checkpoint, rebuilt from the config stored with it."""
    cfg = ckpt["dpdm"].get("build_config")
    if not cfg:
        raise CheckpointError("checkpoint lacks its build config; it was not written by dpdm-train")
    denoiser = Denoiser(instantiate(cfg["net"]), instantiate(cfg["denoiser"]))
    prefix = "ema."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    denoiser.load_state_dict(state)
    return denoiser.eval().requires_grad_(False)
