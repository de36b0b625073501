"""dpdm-audit: empirical checks of privacy — a one-run canary audit of DP-SGD, and a memorization report.

    dpdm-audit canary [--epsilon 1 10] [--canaries 1000] [--epochs 5] [--real 500] [--seed S] [--json]
    dpdm-audit memorization --samples samples.npz [--dataset mnist] [--run RUN_DIR] [--n-heldout 1000] [--json]
                            [--out r.json]

`canary` trains a very small DDPM++ U-Net with DP-SGD through the real training module on a subset of the
training images plus m gradient canaries, and prints the accountant's ε next to the empirical lower
bound (Steinke, Nasr & Jagielski 2023). `memorization` compares the samples' nearest-training-image
distances with those of held-out real images. See docs/privacy.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dpdm.cli.errors import exit_on_user_error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpdm-audit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("canary", help="one-run canary audit: empirical lower bound on ε vs the accountant's ε")
    c.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 10.0], help="target ε (one run each)")
    c.add_argument("--delta", type=float, default=1e-5)
    c.add_argument("--canaries", type=int, default=1000, help="m, the number of gradient canaries")
    c.add_argument("--real", type=int, default=500, help="number of real training images")
    c.add_argument("--batch-size", type=int, default=50, help="expected batch size B (q = B/(N + m/2))")
    c.add_argument("--epochs", type=int, default=5)
    c.add_argument("--max-grad-norm", type=float, default=1.0)
    c.add_argument("--beta", type=float, default=0.05, help="1 − confidence of the lower bound")
    c.add_argument("--dataset", default="mnist", help="cached dataset for the real images, or 'random'")
    c.add_argument("--data-dir", default=None)
    c.add_argument("--seed", type=int, default=None,
                   help="fixes canaries, sampling and noise (default: OS entropy)")
    c.add_argument("--score", choices=("llr", "sum"), default="llr",
                   help="canary score: per-step likelihood ratio (most powerful) or plain sum")
    c.add_argument("--json", action="store_true")

    mem = sub.add_parser("memorization", help="nearest-training-image distances of samples vs held-out images")
    mem.add_argument("--samples", type=Path, required=True, help="samples.npz written by dpdm-sample")
    mem.add_argument("--dataset", default=None, help="training dataset (default: the one stored in the npz)")
    mem.add_argument("--run", type=Path, default=None,
                     help="the run dir that trained the model: compare with the images it trained on "
                          "(its data.subset_size and seed), not the whole training split")
    mem.add_argument("--data-dir", default=None)
    mem.add_argument("--n-heldout", type=int, default=1000, help="held-out (test split) images to compare")
    mem.add_argument("--seed", type=int, default=0, help="which held-out images (a seeded subset)")
    mem.add_argument("--json", action="store_true")
    mem.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    return parser


def _real_images(args):
    import torch

    from dpdm.data import load_split

    g = torch.Generator().manual_seed(args.seed if args.seed is not None else 0)
    if args.dataset == "random":  # the canaries are in gradient space: any valid images will do
        return (torch.randint(0, 256, (args.real, 1, 28, 28), generator=g, dtype=torch.uint8),
                torch.randint(0, 10, (args.real,), generator=g))
    images, labels = load_split(args.dataset, "train", data_dir=args.data_dir)
    if not 1 <= args.real <= images.shape[0]:
        raise ValueError(f"--real must be between 1 and {images.shape[0]}, got {args.real}")
    keep = torch.randperm(images.shape[0], generator=g)[:args.real]
    return images[keep], labels[keep]


def _canary(args) -> int:
    from dpdm.audit.canaries import CanaryAuditConfig, run_canary_audit

    if args.canaries < 4:
        raise ValueError(f"--canaries must be at least 4, got {args.canaries}")
    images, labels = _real_images(args)
    reports = []
    for eps in args.epsilon:
        cfg = CanaryAuditConfig(epsilon=eps, delta=args.delta, num_canaries=args.canaries,
                                batch_size=args.batch_size, epochs=args.epochs,
                                max_grad_norm=args.max_grad_norm, beta=args.beta, seed=args.seed,
                                score=args.score)
        reports.append(run_canary_audit(cfg, images, labels))
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], sort_keys=True))
        return 0
    r0 = reports[0]
    print("one-run canary audit (Steinke, Nasr & Jagielski 2023); white-box: the auditor sees every "
          "privatized gradient")
    print(f"data: {args.dataset}, N = {r0.num_real} real images + m = {args.canaries} gradient canaries "
          f"(each in with prob. 1/2); N' = N + m/2 = {r0.dataset_size_nominal}, q = B/N' = "
          f"{args.batch_size}/{r0.dataset_size_nominal} = {r0.sample_rate:.4g}, δ = {args.delta:g}, "
          f"C = {args.max_grad_norm:g}")
    head = (f"{'target ε':>9} {'ε (rdp)':>8} {'σ':>7} {'steps':>6} {'in':>5} {'sampled':>8} "
            f"{'ε lower bound':>14} {'conf.':>6} {'k':>5} {'correct':>10} {'time':>6}")
    print(head)
    for r in reports:
        b = r.bound
        print(f"{r.config.epsilon:>9g} {r.epsilon_spent:>8.4f} {r.noise_multiplier:>7.4f} {r.steps:>6d} "
              f"{r.canaries_included:>5d} {r.mean_times_sampled:>8.2f} {b.epsilon_lower_bound:>14.3f} "
              f"{1 - b.beta:>6.0%} {b.k:>5d} {f'{b.correct}/{b.guesses}':>10} {r.seconds:>5.0f}s")
    print(f"score: {args.score} ({'Σ_t per-step log-likelihood ratio' if args.score == 'llr' else 'Σ_t B·g_t[c]'}"
          "); guesses: 'in' for the k highest scores, 'out' for the k lowest; "
          f"k tried {r0.bound.ks_tried}, "
          f"each at level β/{len(r0.bound.ks_tried)} (Bonferroni), best shown. 'sampled': mean batches per "
          "included canary.")
    return 0


def _run_training_set(run_dir: Path) -> dict:
    """The dataset, subset size and subset seed a run trained with, from its saved config.yaml."""
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; --run takes the run dir dpdm-train wrote (it holds "
                                "config.yaml)")
    data = OmegaConf.load(path).get("data") or {}
    if "name" not in data:
        raise ValueError(f"{path} has no data.name; is it a dpdm-train run's config?")
    return {"name": data["name"], "subset_size": data.get("subset_size"), "seed": int(data.get("seed") or 0)}


def _memorization(args) -> int:
    import torch

    from dpdm.data import load_split
    from dpdm.data.datamodule import training_subset
    from dpdm.evaluation.memorization import memorization_report
    from dpdm.evaluation.synthetic import samples_from_npz
    from dpdm.utils.jsonio import write_json_atomic

    if not args.samples.is_file():
        raise FileNotFoundError(f"{args.samples} does not exist; pass a samples.npz written by dpdm-sample")
    samples, stored = samples_from_npz(args.samples)
    run_data = _run_training_set(args.run) if args.run is not None else None
    run_dataset = run_data["name"] if run_data is not None else None
    dataset = args.dataset or run_dataset or stored
    if not dataset:
        raise ValueError(f"{args.samples} does not name its dataset; pass --dataset")
    for source, name in (("--run's config", run_dataset), (str(args.samples), stored)):
        if name and name != dataset:
            raise ValueError(f"{source} names dataset {name!r}, not {dataset!r}; pass the matching samples and run")
    train, _ = load_split(dataset, "train", data_dir=args.data_dir)
    if run_data is not None and (keep := training_subset(train.shape[0], run_data["subset_size"],
                                                         run_data["seed"])) is not None:
        train = train[keep]
    test, _ = load_split(dataset, "test", data_dir=args.data_dir)
    if samples.images.shape[1:] != train.shape[1:]:
        raise ValueError(f"samples are {tuple(samples.images.shape[1:])} images but {dataset} has "
                         f"{tuple(train.shape[1:])}")
    if not 1 <= args.n_heldout <= test.shape[0]:
        raise ValueError(f"--n-heldout must be between 1 and {test.shape[0]}, got {args.n_heldout}")
    keep = torch.randperm(test.shape[0], generator=torch.Generator().manual_seed(args.seed))[:args.n_heldout]
    report = memorization_report(samples.images, train, test[keep])
    out = {"samples": str(args.samples), "dataset": dataset, "run": None if args.run is None else str(args.run),
           **report.to_dict()}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, out)
    if args.json:
        print(json.dumps(out, sort_keys=True))
        return 0
    seen = f" (the ones {args.run} trained on)" if args.run is not None else ""
    print(f"memorization report: {report.num_samples} samples vs {report.num_train} {dataset} training "
          f"images{seen}; yardstick: {report.num_heldout} held-out test images (L2, pixels in [0, 1])")
    print(f"{'':26}{'min':>8}{'1%':>8}{'5%':>8}{'median':>8}")
    for name, q in (("d(sample, train)", report.samples_to_train), ("d(held-out, train)", report.heldout_to_train),
                    ("d1/d2 sample", report.samples_ratio), ("d1/d2 held-out", report.heldout_ratio)):
        print(f"{name:26}" + "".join(f"{q[k]:>8.3f}" for k in ("min", "q01", "q05", "median")))
    print(f"samples closer to train than the held-out 1% quantile ({report.threshold:.3f}): "
          f"{report.fraction_below_threshold:.2%} (≈1% if samples were fresh real images)")
    return 0


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return _canary(args) if args.command == "canary" else _memorization(args)


if __name__ == "__main__":
    sys.exit(main())
