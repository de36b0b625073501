"""Training-step throughput: non-private vs dpdm's DP step vs stock Opacus hooks with per-group averaging.

    python benchmarks/train_step.py                      # CPU: tiny U-Net, 32 examples x K=4 (~1 min)
    python benchmarks/train_step.py --preset paper       # paper network, 128 x K=32 (GPU)
    python benchmarks/train_step.py --variants nonprivate,dpdm,dpdm_unfold,dpdm_opacus_hooks,opacus
    python benchmarks/train_step.py --net ddpmpp_tiny_p2 --channels 24 --batch 256 --k 1   # a narrower net
    python benchmarks/train_step.py --net ddpmpp_tiny_p2 --batch 2048 --physical 256 --k 1  # as a CPU preset trains

Every variant trains the same network (same init) on the same batch with the same loss (EDM, K noise
levels per example, Adam). Variants:
  nonprivate          plain autograd, mean loss over the batch
  dpdm                dpdm's DP step (dp_engine=fold: per-example gradients of the K-averaged loss
                      without per-row gradients, then Opacus' DPOptimizer clips and noises)
  dpdm_unfold         the same engine with conv weight gradients by im2col + bmm (dp_engine=fold_unfold)
  dpdm_opacus_hooks   Opacus' grad samplers, the K rows of an example folded inside each layer
  opacus              the baseline: stock Opacus hooks over the B·K rows (one per-sample gradient per
                      noised copy), averaged over each example's K copies before clipping — the DPDM
                      reference code's method
`--physical P` splits each step's B examples into chunks of P, as training does with
`max_physical_batch_size`: per-example gradients are clipped and summed chunk by chunk, and the noise and
the optimizer step come once per logical batch. Without it the B examples run as one chunk.
Timing is interleaved (round robin over variants, `--rounds` rounds of `--steps` steps after warm-up) so
load changes on a shared machine hit all variants alike; the figure is the median step. Peak memory is
CUDA's max allocated bytes on GPU, and on CPU the peak resident set of a separate process running only
that variant with glibc malloc's defaults (peak minus the resident set just before the measured step, after one
warm-up step).
Results are appended to benchmarks/results/train_step.json with machine, versions and settings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dpdm.diffusion.loss import denoising_loss_per_example, draw_training_noise
from dpdm.diffusion.noise_levels import LogNormalSigma
from dpdm.diffusion.preconditioning import Denoiser, EDMPreconditioning
from dpdm.utils.allocator import retain_freed_memory
from dpdm.utils.machine import machine_facts

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    "cpu": dict(net="ddpmpp_tiny", batch=32, k=4, steps=4, warmup=2, rounds=3),
    "paper": dict(net="ddpmpp_mnist", batch=128, k=32, steps=10, warmup=3, rounds=3),
}
VARIANTS = ("nonprivate", "dpdm", "dpdm_unfold", "dpdm_opacus_hooks", "opacus")
DEFAULT_VARIANTS = ("nonprivate", "dpdm", "opacus")
ENGINE_OF = {"dpdm": "fold", "dpdm_unfold": "fold_unfold", "dpdm_opacus_hooks": "opacus"}
SIGMA, C = 1.0, 1.0


def build(net_name: str, device, seed: int = 0, channels: int | None = None) -> Denoiser:
    torch.manual_seed(seed)
    cfg = OmegaConf.load(REPO / "conf" / "net" / f"{net_name}.yaml")
    if channels:  # as `net.model_channels=...` on the dpdm-train command line
        cfg.model_channels = channels
    net = instantiate(cfg)
    return Denoiser(net, EDMPreconditioning()).to(device).train()


def _averaging_dp_optimizer(**kw):
    """The baseline's DPOptimizer: average the K per-row gradients of an example before clipping."""
    from opacus.optimizers import DPOptimizer

    class PerGroupAveragingDPOptimizer(DPOptimizer):
        def __init__(self, *a, noise_multiplicity: int, **k):
            super().__init__(*a, **k)
            self.K = noise_multiplicity

        def clip_and_accumulate(self):
            for p in self.params:
                gs = p.grad_sample
                p.grad_sample = gs.view(gs.shape[0] // self.K, self.K, *gs.shape[1:]).mean(1)
            super().clip_and_accumulate()

    return PerGroupAveragingDPOptimizer(**kw)


def make_step(variant: str, den: Denoiser, *, B: int, K: int, device, precision: str = "fp32",
              physical: int = 0):
    """A closure running one full training step (noise draw, loss, backward, optimizer step) of B examples,
    in chunks of `physical` examples (0: one chunk) as DPDiffusionModule.training_step runs them."""
    from contextlib import nullcontext

    from dpdm.privacy.engine import make_dp_components

    # bf16: autocast around the forward, as Lightning's bf16-mixed; weights, clipping, noise stay fp32.
    amp = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16"
           else nullcontext)

    gen = torch.Generator(device=device).manual_seed(1)
    noise_levels = LogNormalSigma()
    x = torch.rand((B, 1, 28, 28), generator=gen, device=device) * 2 - 1
    y = torch.randint(0, 10, (B,), generator=gen, device=device)
    adam = torch.optim.Adam(den.parameters(), lr=1e-4)
    chunks = [(x[i:i + physical], y[i:i + physical]) for i in range(0, B, physical)] if physical else [(x, y)]
    noise = lambda xc, yc: draw_training_noise(xc, yc, noise_multiplicity=K, noise_levels=noise_levels,
                                               label_dropout=0.1, null_label=den.null_label, generator=gen)
    dp_kw = dict(noise_multiplier=SIGMA, max_grad_norm=C, expected_batch_size=B, loss_reduction="mean",
                 generator=torch.Generator(device=device).manual_seed(2))

    if variant == "nonprivate":
        def step():
            adam.zero_grad(set_to_none=True)
            for xc, yc in chunks:  # weighted so that the chunks' sum is the mean over the B examples
                with amp():
                    loss = denoising_loss_per_example(den, xc, noise(xc, yc)).mean() * (len(xc) / B)
                loss.backward()
            adam.step()
        return step

    if variant == "opacus":
        from opacus.grad_sample.grad_sample_module import GradSampleHooks

        GradSampleHooks(den.net, batch_first=True, loss_reduction="mean", strict=True)
        opt = _averaging_dp_optimizer(optimizer=adam, noise_multiplicity=K, **dp_kw)

        def step():
            for j, (xc, yc) in enumerate(chunks):
                with amp():
                    loss = denoising_loss_per_example(den, xc, noise(xc, yc)).mean()  # mean over the rows
                loss.backward()
                _clip_chunk_or_step(opt, last=j == len(chunks) - 1)
        return step

    # dpdm's own assembly, as dpdm-train builds it (engine + DPOptimizer + accountant hook).
    dp = make_dp_components(den.net, adam, noise_multiplier=SIGMA, max_grad_norm=C, expected_batch_size=B,
                            sample_rate=0.01, noise_multiplicity=K, engine=ENGINE_OF[variant], noise_seed=2)
    engine, opt = dp.per_example, dp.optimizer

    def step():
        for j, (xc, yc) in enumerate(chunks):
            with engine.capture(), amp():
                losses = denoising_loss_per_example(den, xc, noise(xc, yc))
            engine.backward(losses)
            _clip_chunk_or_step(opt, last=j == len(chunks) - 1)
    return step


def _clip_chunk_or_step(opt, *, last: bool) -> None:
    """As training_step: every chunk but the last is clipped and summed by a skipped Opacus step; the last
    one's step adds the noise once and updates the weights."""
    if not last:
        opt.signal_skip_step(True)
    opt.step()
    opt.zero_grad()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, n: int, device) -> list[float]:
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _proc_status_bytes(field: str) -> int:
    # VmHWM (peak RSS) starts afresh at exec, unlike ru_maxrss, which a child inherits from its parent.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    try:  # Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def worker_peak_memory(args) -> None:
    """Child process: one variant, warm-up + one step; prints peak RSS growth in bytes."""
    device = torch.device("cpu")
    torch.set_num_threads(args.threads) if args.threads else None
    den = build(args.net, device, channels=args.channels)
    step = make_step(args.worker, den, B=args.batch, K=args.k, device=device, precision=args.precision,
                     physical=args.physical)
    step()  # warm-up: allocator pools, Adam state, lazily built buffers
    before = _proc_status_bytes("VmRSS")
    _reset_peak_rss()
    step()
    print(json.dumps({"peak_bytes": max(_proc_status_bytes("VmHWM") - before, 0)}))


def measure(args) -> tuple[dict, dict]:
    """(the table's rows, each variant's step closure)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {}
    for v in args.variants:
        den = build(args.net, device, channels=args.channels)  # same init for every variant
        steps[v] = make_step(v, den, B=args.batch, K=args.k, device=device, precision=args.precision,
                             physical=args.physical)
        timed_steps(steps[v], args.warmup, device)
    times = {v: [] for v in args.variants}
    peak = {}
    for r in range(args.rounds):
        for v in args.variants:
            if device.type == "cuda" and r == 0:
                torch.cuda.reset_peak_memory_stats()
            times[v] += timed_steps(steps[v], args.steps, device)
            if device.type == "cuda" and r == 0:
                peak[v] = torch.cuda.max_memory_allocated()
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{v} {args.batch * args.k / statistics.median(times[v]):.0f} img/s" for v in args.variants),
            file=sys.stderr, flush=True)
    if device.type == "cpu" and not args.no_memory:
        for v in args.variants:
            cmd = [sys.executable, __file__, "--worker", v, "--net", args.net, "--batch", str(args.batch),
                   "--channels", str(args.channels or 0),
                   "--k", str(args.k), "--threads", str(args.threads or 0), "--precision", args.precision,
                   "--physical", str(args.physical)]
            # Peak-RSS growth of one step is only visible with glibc's defaults (freed memory returned
            # to the OS); with the tuning, memory retained from the warm-up step hides it.
            cmd += ["--no-malloc-tuning"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            peak[v] = json.loads(out.strip().splitlines()[-1])["peak_bytes"]
    rows = {}
    for v in args.variants:
        med = statistics.median(times[v])
        rows[v] = {"median_step_s": med, "noised_images_per_s": args.batch * args.k / med,
                   "peak_memory_bytes": peak.get(v), "steps_timed": len(times[v])}
    return rows, steps


def profile_steps(steps: dict, top: int, device) -> None:
    """One more step of each variant under torch.profiler: its `top` ops by self CPU time, to stdout (where
    the table's time goes; on a GPU, CPU time is launch overhead, so read it there as such)."""
    from torch.profiler import ProfilerActivity, profile

    for v, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
            sync(device)
        print(f"\n{v}: one step, the {top} ops with the most self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))


def print_table(rows: dict, args) -> None:
    ref_np = rows.get("nonprivate", {}).get("noised_images_per_s")
    ref_op = rows.get("opacus", {}).get("noised_images_per_s")
    n_img = args.batch * args.k
    where = args.device
    if str(args.device).startswith("cpu"):
        facts = machine_facts()
        where += f" ({', '.join([facts['cpu'], facts['cpu_isa'], *facts['cpu_bf16_flags']])})"
    width = f" at model_channels {args.channels}" if args.channels else ""
    chunks = f" in chunks of {args.physical}" if args.physical and args.physical < args.batch else ""
    print(f"\n{args.net}{width}, {args.batch} examples{chunks} x K={args.k} = {n_img} noised images/step, "
          f"{where}, {args.precision}, {torch.get_num_threads()} threads, "
          f"malloc {'tuned' if args.malloc_tuned else 'default'}")
    print(f"{'variant':<19}{'img/s':>10}{'step s':>9}{'vs non-private':>16}{'vs opacus':>11}"
          f"{'peak MiB':>10}{'bytes/img':>11}")
    for v, r in rows.items():
        ips = r["noised_images_per_s"]
        mem = r["peak_memory_bytes"]
        print(f"{v:<19}{ips:>10.0f}{r['median_step_s']:>9.3f}"
              f"{(f'{ips / ref_np:.2f}x' if ref_np else '-'):>16}"
              f"{(f'{ips / ref_op:.2f}x' if ref_op else '-'):>11}"
              f"{(f'{mem / 2**20:.0f}' if mem is not None else '-'):>10}"
              f"{(f'{mem / n_img:.0f}' if mem is not None else '-'):>11}")


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__}
    facts = machine_facts()
    info.update({k: facts[k] for k in ("cpu", "cpu_isa", "cpu_bf16_flags", "cpu_bf16_kernels")})
    import opacus
    info["opacus"] = opacus.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="cpu (default without a GPU) or paper (default with one)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--net", default=None, help="a conf/net/ name")
    ap.add_argument("--channels", type=int, default=0,
                    help="the net's model_channels (0 = the conf/net/ file's), e.g. 24 for a narrower net")
    ap.add_argument("--batch", type=int, default=None, help="examples per step (B)")
    ap.add_argument("--physical", type=int, default=0, metavar="P",
                    help="examples per physical chunk, as max_physical_batch_size (0 = the whole batch at once)")
    ap.add_argument("--k", type=int, default=None, help="noise multiplicity K")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16 = autocast forward (Lightning's bf16-mixed); fp32 weights and clipping")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=",".join(VARIANTS))
    ap.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="leave glibc malloc's defaults (dpdm-train tunes it: dpdm.utils.allocator)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one more step of each variant and print its N costliest ops")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # As dpdm-train does (dpdm.utils.allocator), for every variant alike.
    args.malloc_tuned = False if args.no_malloc_tuning else retain_freed_memory()

    if args.worker:
        for k, v in PRESETS["cpu"].items():
            if getattr(args, k, None) is None:
                setattr(args, k, v)
        return worker_peak_memory(args)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("paper" if args.device.startswith("cuda") else "cpu")
    for k, v in PRESETS[preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    if args.physical < 0:
        ap.error(f"--physical must be 0 (one chunk) or a positive number of examples, got {args.physical}")

    t0 = time.perf_counter()
    rows, steps = measure(args)
    print_table(rows, args)
    if args.profile:
        profile_steps(steps, args.profile, torch.device(args.device))
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "preset": preset,
              "settings": {k: getattr(args, k) for k in ("device", "net", "channels", "batch", "physical", "k",
                                                          "steps", "warmup", "rounds", "threads", "precision",
                                                          "malloc_tuned")},
              "torch_threads": torch.get_num_threads(), "machine": machine(), "results": rows,
              "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(out.read_text()) if out.exists() else []
    history.append(record)
    out.write_text(json.dumps(history, indent=1) + "\n")
    print(f"appended to {out} (wall {record['wall_s']} s)")


if __name__ == "__main__":
    main()
