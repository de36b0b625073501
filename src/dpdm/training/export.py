"""The file a data holder can publish: EMA weights + build config + privacy record, as safetensors.

A training checkpoint is a pickle holding the optimizer, Lightning's loop state and (with known seeds)
generator states. An export holds only what sampling needs and what the guarantee says, in a format
that cannot run code when loaded (safetensors: raw tensors plus a str → str metadata table):

    tensors   the EMA denoiser's state dict (the weights dpdm-sample draws with)
    metadata  format, build_config (JSON: net, preconditioning, data, sampler, loss), privacy (JSON: the plan
              and the ε recomputed from the checkpoint's accountant history for the steps that ran)

dpdm-sample and dpdm-evaluate read an export wherever they read a checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from dpdm.utils.files import atomic_path

FORMAT = "dpdm-export-v1"
EMA_PREFIX = "ema."


def privacy_record(ckpt: dict) -> dict:
    """The plan of the run that wrote `ckpt`, with steps and ε from its accountant history."""
    from dpdm.privacy.accounting import epsilon_from_history, steps_in_history
    from dpdm.training.privacy_plan import known_seed_fields

    state = ckpt["dpdm"]
    plan = dict(state.get("plan") or {})
    history = (state.get("accountant") or {}).get("history", [])
    steps = steps_in_history(history)
    record = {**plan, "steps": steps if plan.get("enabled") else int(ckpt.get("global_step", 0))}
    if plan.get("enabled"):
        record["epsilon"] = (epsilon_from_history(history, delta=plan["delta"], accountant=plan["accountant"])
                             if steps else 0.0)
        # dpdm-train saves the noise and batch streams only when their seeds were fixed (known).
        record |= known_seed_fields(
            noise_seed_known="noise_rng" in state,
            sampler_seed_known=any(isinstance(v, dict) and "sampler_generator_state" in v for v in ckpt.values()))
    else:
        record.update(epsilon=None, target_epsilon=None)
    return record


def export_checkpoint(ckpt: dict, out: Path) -> dict:
    """Write the export of a loaded dpdm-train checkpoint to `out` (atomically); its privacy record."""
    from safetensors.torch import save_file

    if not (ckpt["dpdm"].get("build_config")):
        raise ValueError("the checkpoint lacks its build config; it was not written by dpdm-train")
    ema = {k[len(EMA_PREFIX):]: v.detach().cpu().contiguous() for k, v in ckpt["state_dict"].items()
           if k.startswith(EMA_PREFIX)}
    if not ema:
        raise ValueError("the checkpoint holds no EMA weights (state_dict keys 'ema.*')")
    record = privacy_record(ckpt)
    meta = {"format": FORMAT, "build_config": json.dumps(ckpt["dpdm"]["build_config"], sort_keys=True),
            "privacy": json.dumps(record, sort_keys=True)}
    with atomic_path(out) as tmp:
        save_file(ema, str(tmp), metadata=meta)
    return record


def load_export(path: Path) -> dict:
    """An export, in the shape of a checkpoint (`state_dict` with `ema.*` keys, `dpdm` with the build
    config and plan), so that every reader of checkpoints reads it too."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); export it "
                         "again with dpdm-export") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a dpdm export (format "
                         f"{meta.get('format')!r}, expected {FORMAT!r}); make one with dpdm-export")
    privacy = json.loads(meta["privacy"])
    return {"state_dict": {EMA_PREFIX + k: v for k, v in tensors.items()},
            "dpdm": {"build_config": json.loads(meta["build_config"]), "plan": privacy,
                     "exported_privacy": privacy},
            "global_step": privacy.get("steps", 0)}


def describe(record: dict) -> str:
    if not record.get("enabled"):
        return "privacy: none (a non-private model: do not publish it as private)"
    return (f"(ε={record['epsilon']:.4f}, δ={record['delta']:g}) after {record['steps']} steps, "
            f"σ={record['noise_multiplier']:.4g}, q={record['sample_rate']:.4g}, K={record['noise_multiplicity']}, "
            f"{record['accountant']} accountant")


def is_export(path: Path) -> bool:
    return Path(path).suffix == ".safetensors"


__all__ = ["FORMAT", "describe", "export_checkpoint", "is_export", "load_export", "privacy_record"]
