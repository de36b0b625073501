"""dpdm-evaluate: the paper's evaluation of a samples.npz or a checkpoint; writes eval.json and a table.

    dpdm-evaluate <run>/final/samples.npz
    dpdm-evaluate <run>/checkpoints/last.ckpt num_samples=60000 sampler=paper_fid
    dpdm-evaluate input=samples.npz evaluation.metrics=[fd_classifier] out=<dir>

The input may be given bare (first argument) or as `input=`; everything else is a Hydra override of
conf/evaluate.yaml.
"""
from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dpdm.cli import CONFIG_DIR
from dpdm.cli.errors import exit_on_user_error
from dpdm.utils.files import atomic_path

log = logging.getLogger("dpdm.evaluate")

# Hydra flags that take a value: the value must not be mistaken for the bare input path.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


def positional_input_to_override(args: list[str]) -> list[str]:
    """`dpdm-evaluate x.npz k=v` → `input=x.npz k=v` (quoted when the path has characters Hydra parses)."""
    out, converted, prev = [], False, None
    for arg in args:
        if not converted and "=" not in arg and not arg.startswith("-") and prev not in _VALUE_FLAGS:
            value = arg if re.fullmatch(r"[\w./~+-]+", arg) else "'" + arg.replace("'", r"\'") + "'"
            out.append(f"input={value}")
            converted = True
        else:
            out.append(arg)
        prev = arg
    return out


def _device(name: str):
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _from_checkpoint(cfg: DictConfig, path: Path, out: Path, settings, device):
    """Draw the evaluation set from the checkpoint's EMA weights; returns (samples, held_out, dataset, meta)."""
    import numpy as np
    import torch

    from dpdm.cli.sample import draw_samples
    from dpdm.diffusion.inference import prepare_for_sampling
    from dpdm.diffusion.samplers import check_null_label_trained
    from dpdm.evaluation import draw_synthetic_set
    from dpdm.training.checkpoint import (
        checkpoint_dataset,
        checkpoint_label_dropout,
        load_checkpoint,
        load_denoiser,
        sampler_for,
        sampler_on_command_line,
    )

    ckpt = load_checkpoint(path)
    denoiser = prepare_for_sampling(load_denoiser(ckpt), device, channels_last=cfg.channels_last,
                                    compile=cfg.compile)
    net = denoiser.net
    shape = denoiser.image_shape
    num_classes = int(getattr(net, "num_classes", 0) or 0)
    # The downstream protocol's model-selection set is drawn on top of num_samples, so the
    # classifiers train on exactly num_samples (the paper: 60,000).
    wants_held_out = "downstream" in settings.metrics
    held_out = settings.downstream.held_out_count(int(cfg.num_samples)) if wants_held_out else 0

    sampler = sampler_for(ckpt, cfg.sampler, sampler_on_command_line(), log=log.info)
    # draw_synthetic_set labels every sample: only guidance can reach the null label here
    check_null_label_trained(denoiser, checkpoint_label_dropout(ckpt), sampler, unconditional=False)

    def sample_fn(seeds, labels):
        # Seeds are consecutive from seeds[0], as draw_samples numbers them; it batches and logs progress.
        return draw_samples(denoiser, n=len(seeds), labels=labels, seed=seeds[0], sampler_cfg=sampler,
                            batch_size=int(cfg.batch_size), image_shape=shape, device=device)

    t0 = time.time()
    total = int(cfg.num_samples) + held_out
    samples, val = draw_synthetic_set(sample_fn, num_samples=int(cfg.num_samples), num_held_out=held_out,
                                      num_classes=num_classes, seed=int(cfg.seed), batch_size=total)
    log.info("drew %d + %d samples in %.0fs", len(samples), 0 if val is None else len(val), time.time() - t0)
    dataset = checkpoint_dataset(ckpt)
    if cfg.save_samples:
        x = samples.images if val is None else torch.cat([samples.images, val.images])
        y = samples.labels if val is None else torch.cat([samples.labels, val.labels])
        with atomic_path(out / "eval_samples.npz", suffix=".npz") as tmp:
            np.savez_compressed(tmp, x=x.numpy(), y=y.numpy(), dataset=np.array(dataset or ""))
    meta = {"sampler": sampler, "seed": int(cfg.seed),
            "privacy": _privacy_of(ckpt)}
    return samples, val, dataset, meta


def _privacy_of(ckpt: dict) -> dict:
    """(ε, δ) the checkpoint's generator satisfies, recomputed from its accountant history."""
    from dpdm.privacy.accounting import epsilon_from_history, steps_in_history

    state = ckpt.get("dpdm", {})
    plan = state.get("plan") or {}
    if not plan.get("enabled"):
        return {"enabled": False}
    # The steps that ran, as the accountant recorded them, not the plan (a run may stop early).
    history = (state.get("accountant") or {}).get("history", [])
    steps = steps_in_history(history)
    eps = epsilon_from_history(history, delta=plan["delta"], accountant=plan["accountant"])
    return {"enabled": True, "epsilon": eps, "delta": plan["delta"], "steps": steps,
            "accountant": plan["accountant"]}


def run_evaluation(cfg: DictConfig) -> dict:
    from dpdm.evaluation import EvalSettings, Evaluator, samples_from_npz
    from dpdm.utils.jsonio import write_json_atomic

    path = Path(cfg.input).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a samples.npz from dpdm-sample or a "
                                "dpdm-train checkpoint")
    out = Path(cfg.out) if cfg.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    settings = EvalSettings.from_dict(OmegaConf.to_container(cfg.evaluation, resolve=True))
    device = _device(cfg.device)
    t0 = time.time()
    if path.suffix == ".npz":
        samples, stored_dataset = samples_from_npz(path)
        held_out, meta = None, {}
    else:
        samples, held_out, stored_dataset, meta = _from_checkpoint(cfg, path, out, settings, device)
    dataset, dataset_source = _dataset(cfg.dataset, stored_dataset)
    evaluator = Evaluator(dataset=dataset, data_dir=cfg.data_dir, settings=settings, device=device)
    report = evaluator.evaluate(samples, held_out=held_out)
    result = {"input": str(path.resolve()), "dataset": dataset, "dataset_source": dataset_source,
              **report.to_dict(), **meta, "settings": settings.to_dict(),
              "wall_time_s": round(time.time() - t0, 1)}
    write_json_atomic(out / "eval.json", result)
    print(format_table(result))
    print(f"wrote {out / 'eval.json'}")
    return result


def _dataset(configured, stored) -> tuple[str, str]:
    if configured:
        return str(configured), "config"
    if stored:
        return str(stored), "input"
    return "mnist", "assumed"


def format_table(result: dict) -> str:
    """The metrics as an aligned two-column table, then why any metric group is unavailable."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in result["metrics"].items()
            if not k.startswith("eval/best_epoch_")]
    rows += [(f"eval/{group}", "unavailable") for group in result["unavailable"]]
    width = max([len(k) for k, _ in rows] + [6])
    lines = [f"dpdm-evaluate: {result['details']['num_samples']} samples from {result['input']}",
             f"dataset: {result['dataset']} ({result['dataset_source']})"]
    if result["dataset_source"] == "assumed":
        lines[-1] += ": the input does not name its dataset; pass dataset=fashion_mnist if it is not MNIST"
    privacy = result.get("privacy")
    if privacy and privacy.get("enabled"):
        lines.append(f"generator: (ε={privacy['epsilon']:.4g}, δ={privacy['delta']:g})-DP after "
                     f"{privacy['steps']} steps")
    lines += [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"{group}: {why}" for group, why in result["unavailable"].items()]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@exit_on_user_error
def _main(cfg: DictConfig) -> None:
    # force: replace the handlers Hydra installed (stdout), so stdout carries only the table.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", stream=sys.stderr, force=True)
    run_evaluation(cfg)


def main() -> None:
    from dpdm.utils.allocator import retain_freed_memory

    retain_freed_memory()  # sampling frees and reallocates the same activations every step
    sys.argv = [sys.argv[0], *positional_input_to_override(sys.argv[1:])]
    _main()


if __name__ == "__main__":
    main()
