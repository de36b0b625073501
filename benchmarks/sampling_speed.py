"""Sampling speed: samples per second for each sampler at its paper step count, on the paper's MNIST net.

    python benchmarks/sampling_speed.py                        # CPU or GPU, whatever is there
    python benchmarks/sampling_speed.py --batch 1024 --full    # run every step instead of extrapolating

Weights are random (speed does not depend on them). Every sampler's cost is linear in its network
evaluations (NFE), so by default each sampler runs a short grid of `--measure-steps` steps after a
warm-up (fastest of `--repeats` runs), and the time per NFE is extrapolated to the full step count;
`--full` runs the whole grid.
Guidance w ≠ 0 doubles the batch the network sees (`--guidance`).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dpdm.diffusion.preconditioning import Denoiser, EDMPreconditioning
from dpdm.diffusion.samplers import latents_from_seeds, run_sampler

REPO = Path(__file__).resolve().parents[1]
# (sampler preset, what it is); the step counts are the presets' (the paper's).
PRESETS = [("ddim", "deterministic DDIM"), ("stochastic_ddim", "stochastic DDIM, η = 1"),
           ("edm_heun", "EDM Heun, deterministic"), ("paper_fid", "EDM Heun + churn (paper FID)")]


def nfe(name: str, num_steps: int) -> int:
    """Network evaluations per sample: Heun makes two per step except the last (to σ = 0)."""
    return 2 * num_steps - 1 if name == "edm_heun" else num_steps


def paper_denoiser(device) -> Denoiser:
    net = instantiate(OmegaConf.load(REPO / "conf" / "net" / "ddpmpp_mnist.yaml"))
    return Denoiser(net, EDMPreconditioning()).to(device).eval().requires_grad_(False)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench(den, spec: dict, *, batch: int, steps: int, guidance: float, device) -> float:
    """Seconds for one batch of `batch` samples with `steps` steps."""
    seeds = list(range(batch))
    labels = torch.arange(batch, device=device) % 10
    lat = latents_from_seeds(seeds, (1, 28, 28), device=device)
    run = lambda: run_sampler(den, lat, class_labels=labels, noise_seeds=seeds,
                              **{**spec, "num_steps": steps, "guidance": guidance})
    return timed(run, device)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=None, help="samples per batch (default 32 CPU, 1024 GPU)")
    ap.add_argument("--measure-steps", type=int, default=4)
    ap.add_argument("--full", action="store_true", help="run all steps instead of extrapolating")
    ap.add_argument("--repeats", type=int, default=3, help="report the fastest of this many runs")
    ap.add_argument("--guidance", type=float, default=0.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    batch = args.batch or (1024 if device.type == "cuda" else 32)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    den = paper_denoiser(device)
    bench(den, {"name": "ddim"}, batch=batch, steps=2, guidance=args.guidance, device=device)  # warm-up
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# {where}; batch {batch}; guidance {args.guidance}; torch {torch.__version__}")
    print("| sampler | steps | NFE/sample | s/batch | samples/s |\n|---|---|---|---|---|")
    rows = []
    for preset, label in PRESETS:
        spec = dict(OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "sampler" / f"{preset}.yaml")))
        steps = int(spec["num_steps"])
        k = steps if args.full else min(steps, args.measure_steps)
        # The fastest run is the least disturbed by whatever else shares the machine.
        t = min(bench(den, spec, batch=batch, steps=k, guidance=args.guidance, device=device)
                for _ in range(args.repeats))
        t_full = t * nfe(spec["name"], steps) / nfe(spec["name"], k)
        row = {"preset": preset, "sampler": label, "steps": steps, "nfe": nfe(spec["name"], steps),
               "batch": batch, "seconds_per_batch": t_full, "samples_per_s": batch / t_full,
               "extrapolated_from_steps": None if k == steps else k, "device": where,
               "guidance": args.guidance}
        rows.append(row)
        print(f"| {label} (`sampler={preset}`) | {steps} | {row['nfe']} | {t_full:.4g} | "
              f"{row['samples_per_s']:.4g} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
