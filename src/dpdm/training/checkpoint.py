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


def checkpoint_label_dropout(ckpt: dict) -> float | None:
    """The loss.label_dropout the checkpoint's run trained with; None where not stored (runs before
    2026-12-05 stored no loss config: they all trained with the default 0.1 or set it by hand)."""
    value = ((ckpt["dpdm"].get("build_config") or {}).get("loss") or {}).get("label_dropout")
    return None if value is None else float(value)


def sampler_for(ckpt: dict, configured, command_line: tuple[bool, frozenset[str]], log=None) -> dict:
    """The sampler to draw with.

    `command_line` is (whether it names a sampler, the sampler keys it sets), as `sampler_on_command_line`
    reads them. A named sampler (`sampler=ddim ...`) is used as configured. Otherwise the training run's
    own sampler (a preset's grid and guidance travel with its checkpoint) is the base, and keys set on the
    command line (`sampler.guidance=1`) change just those keys of it: "this run's sampler with w = 1".
    Without a stored sampler (checkpoints from before presets stored one), the configured one.
    """
    from dpdm.utils.configs import to_plain

    named, keys = command_line
    stored = checkpoint_sampler(ckpt)
    configured = dict(to_plain(configured))
    if named or not stored:
        return configured
    chosen = dict(stored)
    for key in keys:
        if key in configured:
            chosen[key] = configured[key]
        else:  # ~sampler.<key>
            chosen.pop(key, None)
    if log is not None:
        shown = ", ".join(f"{k}={chosen[k]}" for k in ("name", "num_steps", "guidance", "sigma_min") if k in chosen)
        changed = f"; changed on the command line: {', '.join(sorted(keys))}" if keys else ""
        log(f"sampling with the training run's sampler ({shown}){changed}. sampler.<key>=... changes one key "
            "of it, sampler=<name> draws with another sampler's preset instead")
    return chosen


def sampler_on_command_line() -> tuple[bool, frozenset[str]]:
    """(whether this Hydra command line names the sampler group, the sampler keys it sets or deletes).
    Outside a Hydra main (a config composed in code) the composed sampler is what the caller asked for:
    (True, ∅)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True, frozenset()
    named, keys = False, set()
    for override in HydraConfig.get().overrides.task:
        path = override.lstrip("+~").split("=", 1)[0]
        if path == "sampler":
            named = True
        elif path.startswith("sampler."):
            keys.add(path.split(".", 2)[1])
    return named, frozenset(keys)


def preconditioning_config(build_config: dict) -> dict:
    """The preconditioning's config in a checkpoint's build config. Checkpoints written before the
    `denoiser` group was renamed `preconditioning` store it under "denoiser"; both stay loadable."""
    for key in ("preconditioning", "denoiser"):
        if key in build_config:
            return build_config[key]
    raise CheckpointError("checkpoint's build config names no preconditioning; it was not written by dpdm-train")


def build_denoiser(ckpt: dict) -> Denoiser:
    """A freshly initialized denoiser of the network a checkpoint was trained with (seed torch first)."""
    cfg = ckpt["dpdm"].get("build_config")
    if not cfg:
        raise CheckpointError("checkpoint lacks its build config; it was not written by dpdm-train")
    return Denoiser(instantiate(cfg["net"]), instantiate(preconditioning_config(cfg)))


# The EMA weights are what one samples from; the raw weights are what the DP step clipped and noised.
WEIGHT_PREFIXES = {"ema": "ema.", "raw": "denoiser."}


def load_denoiser(ckpt: dict, weights: str = "ema") -> Denoiser:
    """The denoiser of a training checkpoint (its EMA or raw weights), in eval mode and frozen."""
    if weights not in WEIGHT_PREFIXES:
        raise ValueError(f"weights={weights!r}: choose one of {sorted(WEIGHT_PREFIXES)}")
    denoiser = build_denoiser(ckpt)
    prefix = WEIGHT_PREFIXES[weights]
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint holds no {weights} weights ('{prefix}*'); a dpdm-export file "
                              "keeps only the EMA weights, so use a training checkpoint (last.ckpt)")
    denoiser.load_state_dict(state)
    return denoiser.eval().requires_grad_(False)
