"""Per-example gradient norms of a run's training loss, against its clipping norm C.

A NON-PRIVATE DIAGNOSTIC: it reads training examples and prints statistics of their gradients without
noise. It is for studies on public data (MNIST here), never for a run on private data.

    python scripts/study/grad_norms.py RUN_DIR [--examples 256] [--out results/study/X.json]

For each checkpoint of RUN_DIR (and the network at initialization) it draws the run's own training
noise (its K, noise-level distribution and label dropout) on random training examples and reports the
quantiles of ‖∇ℓ_i‖ and the fraction above C. At the last checkpoint it also fixes σ on a grid (K = 1)
to show how the norm depends on the noise level. The raw weights (`denoiser.*`) are used, since those
are what the DP step clips, not the EMA.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dpdm.data.cache import load_split
from dpdm.diffusion.loss import TrainingNoise, denoising_loss_per_example, draw_training_noise
from dpdm.diffusion.preconditioning import Denoiser
from dpdm.experiments.cpu_results import epoch_checkpoints
from dpdm.privacy.engine import make_per_example_engine
from dpdm.training.checkpoint import build_denoiser, load_checkpoint, load_denoiser
from dpdm.utils.images import from_uint8

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SIGMA_GRID = (0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 80.0)
CHUNK = 64


def denoiser_at(ckpt: dict, *, initial: bool, seed: int) -> Denoiser:
    if initial:
        torch.manual_seed(seed)  # a fresh initialization of the run's network, the same on every call
        denoiser = build_denoiser(ckpt)
    else:
        denoiser = load_denoiser(ckpt, weights="raw")
    return denoiser.train().requires_grad_(True)  # as the DP step sees it


def per_example_norms(denoiser: Denoiser, x, draw_noise, *, K: int, pixel_reduction: str) -> torch.Tensor:
    engine = make_per_example_engine(denoiser.net, noise_multiplicity=K)
    params = [p for p in denoiser.net.parameters() if p.requires_grad]
    norms = []
    try:
        for start in range(0, len(x), CHUNK):
            xc = x[start:start + CHUNK]
            tn = draw_noise(start, xc)
            with engine.capture():
                losses = denoising_loss_per_example(denoiser, xc, tn, pixel_reduction=pixel_reduction)
            engine.backward(losses)
            norms.append(sum(p.grad_sample.flatten(1).square().sum(1) for p in params).sqrt())
            for p in params:
                p.grad_sample = None
    finally:
        engine.cleanup()  # the next call (another K on the same network) attaches its own hooks
    return torch.cat(norms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cfg = OmegaConf.load(args.run_dir / "config.yaml")
    ckpts = epoch_checkpoints(args.run_dir)  # (step, path); last.ckpt only where no epoch ckpt has its step
    if not ckpts:
        raise SystemExit(f"no checkpoints (epoch=*-step=*.ckpt, last.ckpt) under {args.run_dir}/checkpoints")
    K = int(cfg.loss.noise_multiplicity)
    C = float(cfg.privacy.max_grad_norm) if cfg.privacy.enabled else None  # privacy=none clips nothing
    pixel_reduction, label_dropout = cfg.loss.pixel_reduction, float(cfg.loss.label_dropout)
    noise_levels = instantiate(cfg.noise_levels)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_split(cfg.data.name, "train", data_dir=cfg.data.data_dir)
    idx = torch.randperm(len(images), generator=gen)[:args.examples]
    x, y = from_uint8(images[idx]), labels[idx]

    def summary(norms: torch.Tensor) -> dict:
        q = torch.quantile(norms, torch.tensor(QUANTILES))
        return {"quantiles": dict(zip(map(str, QUANTILES), [round(v, 1) for v in q.tolist()], strict=True)),
                "fraction_above_C": None if C is None else round(float((norms > C).float().mean()), 4)}

    report = {"run_dir": str(args.run_dir), "C": C, "K": K, "examples": args.examples,
              "diagnostic": "non-private (public data only)", "by_step": {}, "by_sigma": {}}
    for label, path, initial in [("init", ckpts[0][1], True)] + [(str(step), p, False) for step, p in ckpts]:
        denoiser = denoiser_at(load_checkpoint(path), initial=initial, seed=args.seed)
        gen.manual_seed(args.seed + 1)  # the same examples' noise at every step

        def draw(start, xc, denoiser=denoiser):
            return draw_training_noise(xc, y[start:start + len(xc)], noise_multiplicity=K,
                                       noise_levels=noise_levels, label_dropout=label_dropout,
                                       null_label=denoiser.null_label, generator=gen)
        s = summary(per_example_norms(denoiser, x, draw, K=K, pixel_reduction=pixel_reduction))
        report["by_step"][label] = s
        clipped = "no clipping (privacy=none)" if C is None else f"above C = {C:g}: {s['fraction_above_C']:.1%}"
        print(f"step {label:>4}: ‖∇ℓ_i‖ quantiles {list(s['quantiles'].values())}, {clipped}", flush=True)
    for sigma in SIGMA_GRID:
        gen.manual_seed(args.seed + 2)

        def fixed(start, xc, sigma=sigma):
            n = len(xc)
            return TrainingNoise(sigma=torch.full((n, 1), sigma),
                                 noise=torch.randn((n, 1, *xc.shape[1:]), generator=gen),
                                 class_labels=y[start:start + n, None].clone())
        s = summary(per_example_norms(denoiser, x, fixed, K=1, pixel_reduction=pixel_reduction))
        report["by_sigma"][str(sigma)] = s
        print(f"σ = {sigma:5g} (K = 1, last checkpoint): median ‖∇ℓ_i‖ {s['quantiles']['0.5']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
