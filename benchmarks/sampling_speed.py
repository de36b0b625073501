"""Sampling speed: network evaluations per second in each execution mode, beside the DP training rate.

    python benchmarks/sampling_speed.py --net ddpmpp_tiny          # CPU: modes vs DP training, per sampler
    python benchmarks/sampling_speed.py --net ddpmpp_mnist --batch 1024 --modes eager,fast,compiled  # GPU

Weights are random (speed does not depend on them). Two tables:

1. **Modes**, on one batch at a mid-range σ: images per second through the denoiser forward (one
   network evaluation, NFE, per image) for
     eager      float32, NCHW, torch.no_grad (how dpdm sampled before dpdm.diffusion.inference)
     fast       channels-last + inference mode (what dpdm-sample and dpdm-evaluate do by default)
     compiled   fast + torch.compile of the network (`compile=true`)
   beside the DP *training* rate of the same network: noised images per second through dpdm's DP step
   (forward, per-example backward, clipping, noise, Adam; dp_engine=fold, K=1), so "×training" says how
   many images can be sampled per NFE in the time one image is trained on.
2. **Samplers** (fast mode): samples per second for each sampler preset at its step count, from the
   measured time per NFE (each sampler's cost is linear in its NFE; `--full` runs the whole grid).
Timings are the fastest of `--repeats` runs, interleaved over modes, so a busy machine slows all alike.
Results are appended to benchmarks/results/sampling_speed.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dpdm.diffusion.inference import prepare_for_sampling
from dpdm.diffusion.preconditioning import Denoiser, EDMPreconditioning
from dpdm.diffusion.samplers import latents_from_seeds, run_sampler
from dpdm.utils.allocator import retain_freed_memory

REPO = Path(__file__).resolve().parents[1]
# (sampler preset, what it is); the step counts are the presets'.
PRESETS = [("ddim", "deterministic DDIM"), ("stochastic_ddim", "stochastic DDIM, η = 1"),
           ("edm_heun", "EDM Heun, deterministic"), ("paper_fid", "EDM Heun + churn (paper FID)")]
MODES = ("eager", "fast", "compiled")


def nfe(name: str, num_steps: int) -> int:
    """Network evaluations per sample: Heun makes two per step except the last (to σ = 0)."""
    return 2 * num_steps - 1 if name == "edm_heun" else num_steps


def build_denoiser(net_name: str, device, mode: str) -> Denoiser:
    torch.manual_seed(0)
    den = Denoiser(instantiate(OmegaConf.load(REPO / "conf" / "net" / f"{net_name}.yaml")), EDMPreconditioning())
    if mode == "eager":
        return den.to(device).eval().requires_grad_(False)
    return prepare_for_sampling(den, device, channels_last=True, compile=mode == "compiled")


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def forward_fn(den: Denoiser, mode: str, batch: int, shape, device):
    """One denoiser evaluation of a batch at σ = 1, in the grad mode the sampler of that mode uses."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *shape), generator=gen).to(device)
    sigma = torch.ones(batch, device=device)
    labels = torch.arange(batch, device=device) % max(den.net.num_classes, 1)
    ctx = torch.no_grad if mode == "eager" else torch.inference_mode

    def run():
        with ctx():
            den(x, sigma, labels)
    return run


def training_rate(net_name: str, device, batch: int, repeats: int) -> float:
    """Noised images per second through dpdm's DP step (benchmarks/train_step.py's `dpdm` variant)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_step import build, make_step

    step = make_step("dpdm", build(net_name, device), B=batch, K=1, device=device)
    step()  # warm-up
    return batch / min(timed(step, device) for _ in range(repeats))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="ddpmpp_mnist", help="a conf/net/ name")
    ap.add_argument("--batch", type=int, default=None, help="images per forward (default 500 CPU, 1024 GPU)")
    ap.add_argument("--train-batch", type=int, default=256, help="examples per DP training step (K = 1)")
    ap.add_argument("--modes", default="eager,fast", help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--no-training", action="store_true", help="skip the DP training rate")
    ap.add_argument("--no-samplers", action="store_true", help="skip the per-sampler table")
    ap.add_argument("--measure-steps", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="run all sampler steps instead of extrapolating")
    ap.add_argument("--repeats", type=int, default=3, help="report the fastest of this many runs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="leave glibc malloc alone (how dpdm-sample ran before it tuned it)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sampling_speed.json")
    args = ap.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        ap.error(f"unknown modes {sorted(set(modes) - set(MODES))}; choose from {', '.join(MODES)}")
    batch = args.batch or (1024 if device.type == "cuda" else 500)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_tuned = False if args.no_malloc_tuning else retain_freed_memory()
    torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"

    dens = {m: build_denoiser(args.net, device, m) for m in modes}
    net = dens[modes[0]].net
    shape = (net.in_channels, net.img_resolution, net.img_resolution)
    runs = {m: forward_fn(dens[m], m, batch, shape, device) for m in modes}
    for m in modes:  # warm-up (and compilation)
        t = timed(runs[m], device)
        if m == "compiled":
            print(f"# compiled in {t:.1f}s (first call)", flush=True)
    best = {m: float("inf") for m in modes}
    for _ in range(args.repeats):  # interleaved
        for m in modes:
            best[m] = min(best[m], timed(runs[m], device))
    train = None if args.no_training else training_rate(args.net, device, args.train_batch, args.repeats)

    print(f"# {args.net}; {where}; forward batch {batch}; malloc tuned: {malloc_tuned}; torch {torch.__version__}")
    print("| mode | network evals/s | × eager | × DP training |\n|---|---|---|---|")
    eager = batch / best["eager"] if "eager" in best else None
    results = {"modes": {}, "training_noised_images_per_s": train}
    for m in modes:
        rate = batch / best[m]
        results["modes"][m] = rate
        print(f"| {m} | {rate:.0f} | {'–' if eager is None else f'{rate / eager:.2f}'} | "
              f"{'–' if train is None else f'{rate / train:.2f}'} |")
    if train is not None:
        print(f"| DP training (dpdm, B={args.train_batch}, K=1) | {train:.0f} noised img/s | | 1.00 |")

    rows = []
    if not args.no_samplers:
        m = "fast" if "fast" in dens else modes[0]
        den = dens[m]
        print(f"\n| sampler ({m}) | steps | NFE/sample | s/batch of {batch} | samples/s |\n|---|---|---|---|---|")
        seeds = list(range(batch))
        labels = torch.arange(batch, device=device) % max(net.num_classes, 1)
        lat = latents_from_seeds(seeds, shape, device=device)
        for preset, label in PRESETS:
            spec = dict(OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "sampler" / f"{preset}.yaml")))
            steps = int(spec["num_steps"])
            k = steps if args.full else min(steps, args.measure_steps)
            run = partial(run_sampler, den, lat, class_labels=labels, noise_seeds=seeds, **{**spec, "num_steps": k})
            t = min(timed(run, device) for _ in range(max(1, args.repeats - 1)))
            t_full = t * nfe(spec["name"], steps) / nfe(spec["name"], k)
            row = {"preset": preset, "steps": steps, "nfe": nfe(spec["name"], steps),
                   "seconds_per_batch": t_full, "samples_per_s": batch / t_full,
                   "extrapolated_from_steps": None if k == steps else k}
            rows.append(row)
            print(f"| {label} (`sampler={preset}`) | {steps} | {row['nfe']} | {t_full:.4g} | "
                  f"{row['samples_per_s']:.4g} |", flush=True)
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "net": args.net,
              "device": where, "batch": batch, "train_batch": args.train_batch, "malloc_tuned": malloc_tuned,
              "torch": torch.__version__, **results, "samplers": rows}
    if args.out:
        history = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(history + [record], indent=2) + "\n")
        print(f"appended to {args.out}")
    return record


if __name__ == "__main__":
    main()
