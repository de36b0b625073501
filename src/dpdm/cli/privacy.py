"""dpdm-privacy: plan a DP-SGD budget (σ for a target ε) and audit a finished run's ε.

    dpdm-privacy sigma --epsilon 10 --delta 1e-5 --sample-rate 0.068 --epochs 300 [--accountant rdp|prv]
    dpdm-privacy sigma --epsilon 10 --delta 1e-5 --batch-size 4096 --dataset-size 60000 --epochs 300
    dpdm-privacy epsilon RUN_DIR [--json]

`sigma` uses the same functions as training (steps = epochs · ⌊1/q⌋, bisection to within 0.1% below
the target). `epsilon` recomputes ε from the accountant history stored in RUN_DIR/checkpoints/last.ckpt,
with the accountant named in the run's privacy plan, and compares it with RUN_DIR/privacy.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from dpdm.cli.errors import exit_on_user_error
from dpdm.privacy.accounting import (
    ACCOUNTANTS,
    calibrate_noise_multiplier,
    epsilon_from_history,
    mechanism_epsilon,
    steps_in_history,
)
from dpdm.training.privacy_plan import make_privacy_plan, steps_per_epoch

# ε in privacy.json and the recomputation run the same accountant on the same history.
AGREEMENT_REL_TOL = 1e-6
EXIT_MISMATCH = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpdm-privacy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sigma", help="noise multiplier σ that reaches a target (ε, δ)")
    s.add_argument("--epsilon", type=float, required=True, help="target ε")
    s.add_argument("--delta", type=float, required=True, help="δ (must be < 1/N)")
    rate = s.add_mutually_exclusive_group(required=True)
    rate.add_argument("--sample-rate", type=float, help="Poisson sampling rate q")
    rate.add_argument("--batch-size", type=int, help="expected batch size B (with --dataset-size: q = B/N)")
    s.add_argument("--dataset-size", type=int, help="N, the number of private training examples")
    length = s.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=int, help="epochs; steps = epochs · ⌊1/q⌋, as in training")
    length.add_argument("--steps", type=int, help="number of DP-SGD steps")
    s.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    e = sub.add_parser("epsilon", help="recompute a run's ε from its checkpoint and compare with privacy.json")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _sigma(args, parser) -> dict:
    if args.batch_size is not None:
        if args.dataset_size is None:
            parser.error("--batch-size needs --dataset-size (q = B/N)")
        if args.epochs is not None:
            # Exactly the plan dpdm-train makes (and its checks, e.g. δ < 1/N).
            plan = make_privacy_plan(enabled=True, epsilon=args.epsilon, delta=args.delta, max_grad_norm=1.0,
                                     accountant=args.accountant, noise_multiplier=None,
                                     batch_size=args.batch_size, dataset_size=args.dataset_size,
                                     epochs=args.epochs, noise_multiplicity=1)
            q, steps, sigma = plan.sample_rate, plan.planned_steps, plan.noise_multiplier
        else:
            if not 1 <= args.batch_size <= args.dataset_size:
                raise ValueError(f"--batch-size={args.batch_size} must be between 1 and --dataset-size")
            q, steps, sigma = args.batch_size / args.dataset_size, args.steps, None
    else:
        q = args.sample_rate
        if not 0 < q <= 1:
            raise ValueError(f"--sample-rate must be in (0, 1], got {q}")
        steps = args.steps if args.steps is not None else args.epochs * steps_per_epoch(q)
        sigma = None
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if steps < 1:
        raise ValueError(f"the number of steps must be >= 1, got {steps}")
    if not 0 < args.delta < 1:
        raise ValueError(f"--delta must be in (0, 1), got {args.delta}")
    if args.dataset_size is not None and not args.delta < 1 / args.dataset_size:
        raise ValueError(f"--delta={args.delta} must be < 1/N = {1 / args.dataset_size:.3g}")
    if sigma is None:
        sigma = calibrate_noise_multiplier(target_epsilon=args.epsilon, delta=args.delta, sample_rate=q,
                                           steps=steps, accountant=args.accountant)
    eps = mechanism_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=args.delta,
                        accountant=args.accountant)
    return {"noise_multiplier": sigma, "epsilon": eps, "target_epsilon": args.epsilon, "delta": args.delta,
            "sample_rate": q, "steps": steps, "accountant": args.accountant,
            "dataset_size": args.dataset_size,
            "expected_batch_size": args.batch_size if args.batch_size is not None else None}


def _read_run(run_dir: Path) -> tuple[dict, dict]:
    from dpdm.training.checkpoint import load_checkpoint  # heavy imports only when needed

    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    ledger_path = run_dir / "privacy.json"
    if not ledger_path.is_file():
        raise FileNotFoundError(f"{ledger_path} does not exist; is {run_dir} a dpdm-train run directory?")
    try:
        ledger = json.loads(ledger_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{ledger_path} is corrupted ({type(e).__name__}: {e})") from None
    if not isinstance(ledger, dict):
        raise ValueError(f"{ledger_path} is corrupted (not a JSON object)")
    return ckpt["dpdm"], ledger


def _epsilon(args) -> tuple[dict, bool]:
    state, ledger = _read_run(args.run_dir)
    plan = state.get("plan") or {}
    if not plan.get("enabled"):
        return ({"run_dir": str(args.run_dir), "enabled": False, "accountant": None, "epsilon": None,
                 "privacy_json_epsilon": ledger.get("epsilon"), "agree": ledger.get("epsilon") is None},
                ledger.get("epsilon") is None)
    accountant = plan.get("accountant")
    acc_state = state.get("accountant")
    if not acc_state or "history" not in acc_state:
        raise ValueError(f"the checkpoint of {args.run_dir} has no accountant history")
    if acc_state.get("mechanism", accountant) != accountant:
        raise ValueError(f"the checkpoint's accountant ({acc_state.get('mechanism')}) is not the one "
                         f"named in its plan ({accountant})")
    history = [(float(s), float(q), int(n)) for s, q, n in acc_state["history"]]
    steps = steps_in_history(history)
    delta = float(plan["delta"])
    eps = epsilon_from_history(history, delta=delta, accountant=accountant)
    recorded = ledger.get("epsilon")
    agree = (recorded is not None and ledger.get("steps") == steps and ledger.get("accountant") == accountant
             and math.isclose(float(recorded), eps, rel_tol=AGREEMENT_REL_TOL, abs_tol=1e-12))
    return ({"run_dir": str(args.run_dir), "enabled": True, "accountant": accountant, "delta": delta,
             "epsilon": eps, "steps": steps, "history": history,
             "target_epsilon": plan.get("target_epsilon"), "privacy_json_epsilon": recorded,
             "privacy_json_steps": ledger.get("steps"), "privacy_json_accountant": ledger.get("accountant"),
             "agree": agree}, agree)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "sigma":
        out = _sigma(args, parser)
        if args.json:
            print(json.dumps(out, sort_keys=True))
        else:
            print(f"noise multiplier σ = {out['noise_multiplier']:.6g}  "
                  f"(q = {out['sample_rate']:.6g}, steps = {out['steps']}, δ = {out['delta']:g}, "
                  f"accountant: {out['accountant']})")
            print(f"reproduces ε = {out['epsilon']:.6g} (target {out['target_epsilon']:g})")
        return 0

    out, agree = _epsilon(args)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    elif not out["enabled"]:
        print(f"{args.run_dir}: non-private run (privacy disabled); no ε to report")
    else:
        print(f"accountant: {out['accountant']}, δ = {out['delta']:g}, {out['steps']} steps "
              f"(history {out['history']})")
        print(f"ε recomputed from checkpoint: {out['epsilon']:.6g}")
        print(f"ε in privacy.json:            {out['privacy_json_epsilon']}"
              f" ({out['privacy_json_steps']} steps, accountant {out['privacy_json_accountant']})")
        print("agree" if agree else "MISMATCH")
    if not agree:
        print(f"error: privacy.json of {args.run_dir} does not match the checkpoint's accountant history "
              "(the checkpoint and privacy.json come from different points of training, or one was edited)",
              file=sys.stderr)
        return EXIT_MISMATCH
    return 0


if __name__ == "__main__":
    sys.exit(main())
