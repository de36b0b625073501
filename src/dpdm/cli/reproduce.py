"""dpdm-reproduce: train the paper's models, sample, evaluate, and write results/<dataset>.md.

    dpdm-reproduce mnist            # ε = 0.2, 1, 10 with the paper's presets (days on one GPU)
    dpdm-reproduce fmnist
    dpdm-reproduce mnist-fast       # experiment=mnist_eps10_fast: one 10-minute GPU job
    dpdm-reproduce mnist --dry-run  # the commands and the estimated cost, nothing run
    dpdm-reproduce mnist --shrink   # the same code path on a tiny configuration (tests; CPU)
    dpdm-reproduce cpu              # the 60-minute CPU presets + controls → results/cpu.md (hours on 2 cores)
    dpdm-reproduce cpu --preset mnist_eps10_cpu --report-only

Without a GPU the paper recipes refuse (exit 2) and prints the estimated time instead of starting a run that would
take years; --allow-cpu starts it anyway. Finished stages are skipped when it is run again, and an
unfinished training run resumes from its last checkpoint.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import time
from pathlib import Path

from dpdm.cli.errors import exit_on_user_error
from dpdm.experiments.reproduce import (
    H200_REFERENCE_IMAGES_PER_S,
    H200_REFERENCE_SOURCE,
    RECIPES,
    Recipe,
    format_duration,
    hardware,
    load_state,
    render_results,
    run_cost,
    run_dir,
    save_state,
    stage_done,
    stages,
    stored_throughput,
    throughput_source,
)

EXIT_REFUSED = 2


def _console(name: str) -> list[str]:
    """The console script next to this Python (the venv's), else the module behind it."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    module = {"dpdm-train": "dpdm.cli.train", "dpdm-sample": "dpdm.cli.sample",
              "dpdm-evaluate": "dpdm.cli.evaluate"}[name]
    return [sys.executable, "-m", module]


def _selected(recipe: Recipe, epsilons: list[float] | None):
    runs = [r for r in recipe.runs if not epsilons or r.epsilon in epsilons]
    if not runs:
        raise ValueError(f"no run of {recipe.name} has ε in {epsilons}; "
                         f"choose from {[r.epsilon for r in recipe.runs]}")
    return runs


def estimate(recipe: Recipe, runs, *, measure: bool, measure_steps: int, measure_examples: int,
             data_dir: str | None) -> tuple[list[dict], dict | None]:
    """The recipe's noised images per run, and a CPU throughput: a stored benchmark figure of this kind of
    device, or (measure=True, or none stored) a few real DP-SGD steps measured now."""
    import torch

    from dpdm.experiments.throughput import device_description

    costs = [run_cost(r) for r in runs]
    device = device_description(torch.device("cpu"))
    throughput = None if measure else stored_throughput(device)
    if throughput is not None and throughput.get("device") != device:
        throughput = {**throughput, "note": f"a different CPU from this machine's: {device}"}
    if throughput is None:
        from dpdm.experiments.throughput import measure_training_throughput

        print(f"measuring DP-SGD throughput on this CPU ({measure_examples} examples × K per step, "
              f"1 warm-up + {measure_steps} timed steps of {runs[-1].experiment}) ...", file=sys.stderr)
        t = measure_training_throughput(runs[-1].experiment, examples=measure_examples, steps=measure_steps,
                                        warmup=1, device="cpu", data_dir=data_dir)
        throughput = {**t.to_dict(), "measured_now": True}
    return costs, throughput


def all_costs(recipe: Recipe) -> dict[str, dict]:
    return {r.experiment: run_cost(r) for r in (*recipe.runs, *recipe.extra_runs)}


def refusal_message(recipe: Recipe, costs: list[dict], throughput: dict) -> str:
    total = sum(c["noised_images"] for c in costs)
    per_run = "; ".join(f"{c['experiment']}: {c['steps']} steps × B={c['batch_size']} × K={c['noise_multiplicity']}"
                        for c in costs)
    cpu_s = total / throughput["images_per_s"]
    gpu_s = total / H200_REFERENCE_IMAGES_PER_S
    return "\n".join([
        f"dpdm-reproduce {recipe.name}: no GPU here (torch.cuda.is_available() is False); refusing to start.",
        f"  recipe: {per_run} = {total:.4g} noised images in total",
        f"  throughput: {throughput['images_per_s']:.3g} noised images/s, {throughput_source(throughput)}",
        f"  estimated training time on this machine: {format_duration(cpu_s)} (sampling and evaluation extra)",
        f"  on one H200: about {format_duration(gpu_s)} at {H200_REFERENCE_IMAGES_PER_S:.0f} noised images/s "
        f"({H200_REFERENCE_SOURCE})",
        f"  run it on a GPU machine (make reproduce-{recipe.name}); --allow-cpu starts it here anyway, "
        "--shrink runs the same code path on a tiny configuration.",
        "  what a CPU can do: results/cpu.md has the 60-minute CPU presets (ε, wall time, LogReg / MLP / CNN "
        "accuracy, learning curves); make reproduce-cpu regenerates it."])


def run_stage(stage, state: dict, *, env: dict, log_dir: Path) -> int:
    argv = [*_console(stage.argv[0]), *stage.argv[1:]]
    resumed = None
    if stage.name == "train":
        ckpt = stage.output.parent / "checkpoints" / "last.ckpt"
        if ckpt.exists() and not stage.output.exists():
            resumed = f"ckpt_path={ckpt}"  # a killed run continues where its last checkpoint left it
            argv.append(resumed)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{stage.name}.log"
    print(f"[{stage.run.experiment}] {stage.name}: {stage.command}{' ' + resumed if resumed else ''}\n"
          f"    log: {log_path}", flush=True)
    t0 = time.time()
    with log_path.open("a") as log:
        rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.time() - t0
    rec = {"command": stage.command, "rc": rc, "wall_s": round(wall, 1),
           "ended": _dt.datetime.now().isoformat(timespec="seconds")}
    previous = state.setdefault("stages", {}).get(stage.name)
    if resumed:
        rec["resumed_with"] = resumed
        rec["wall_s"] = round(wall + (previous or {}).get("wall_s", 0.0), 1)  # all attempts together
    state["stages"][stage.name] = rec
    print(f"    {'done' if rc == 0 else f'FAILED (exit {rc})'} in {format_duration(wall)}", flush=True)
    if rc != 0:
        tail = log_path.read_text().splitlines()[-15:]
        print("    " + "\n    ".join(tail), file=sys.stderr)
    return rc


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpdm-reproduce", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("recipe", choices=sorted([*RECIPES, "cpu"]))
    parser.add_argument("--preset", action="append",
                        help="cpu: only this preset (repeatable; default all of conf/study/cpu_presets.yaml)")
    parser.add_argument("--modes", default=None, help="cpu: dp, nonprivate or dp,nonprivate (default both)")
    parser.add_argument("--curve-samples", type=int, default=2000,
                        help="cpu: samples per checkpoint of the learning curve")
    parser.add_argument("--allow-cpu", action="store_true", help="start even without a GPU")
    parser.add_argument("--shrink", action="store_true",
                        help="tiny network, few steps and samples, small classifier budget (CPU; tests)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the cost; run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="only (re)write the results page from the run dirs that exist")
    parser.add_argument("--epsilon", type=float, action="append",
                        help="only the run(s) with this ε (repeatable)")
    parser.add_argument("--runs-dir", help="run dirs go under it (default runs/reproduce, "
                                           "runs/reproduce-shrunk with --shrink)")
    parser.add_argument("--results", help="the results page (default results/<dataset>.md; "
                                          "<runs-dir>/<dataset>.md with --shrink)")
    parser.add_argument("--measure", action="store_true",
                        help="measure CPU throughput now instead of using the stored benchmark figure")
    parser.add_argument("--measure-steps", type=int, default=2)
    parser.add_argument("--measure-examples", type=int, default=4)
    parser.add_argument("--acc-samples", type=int, default=None, help="default 70000 (60000 + 10000 held out)")
    parser.add_argument("--fid-samples", type=int, default=None, help="default 60000")
    parser.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for dpdm-train (repeatable), e.g. ++trainer.max_time=00:00:05:00 "
                             "stops training at that wall-clock time (ε: the accountant's for the steps that ran)")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for dpdm-evaluate (repeatable), e.g. "
                             "evaluation.downstream.val_size=2000 with --acc-samples 12000")
    args = parser.parse_args(argv)

    if args.recipe == "cpu":
        from dpdm.experiments.cpu_results import reproduce_cpu

        if args.dry_run:
            from dpdm.experiments.cpu_results import STUDY_FILE, planned_commands
            from dpdm.experiments.study import Study

            print("\n".join(planned_commands(Study.load(STUDY_FILE), args.preset)))
            return 0
        reproduce_cpu(variants=args.preset, modes=args.modes.split(",") if args.modes else None,
                      page=Path(args.results or "results/cpu.md"), curve_n=args.curve_samples,
                      report_only=args.report_only)
        return 0

    import torch

    recipe = RECIPES[args.recipe]
    runs = _selected(recipe, args.epsilon)
    runs_root = Path(args.runs_dir or ("runs/reproduce-shrunk" if args.shrink else "runs/reproduce"))
    results = Path(args.results or (runs_root / Path(recipe.results).name if args.shrink else recipe.results))
    eval_cache = runs_root / "eval_cache" if args.shrink else None
    sizes = {k: v for k, v in (("acc_samples", args.acc_samples), ("fid_samples", args.fid_samples)) if v}
    plan = [st for r in runs for st in stages(r, runs_root, shrink=args.shrink, eval_cache=eval_cache, **sizes,
                                              train_overrides=tuple(args.train_override),
                                              eval_overrides=tuple(args.eval_override))]
    data_dir = os.environ.get("DPDM_DATA_DIR")

    if args.report_only or args.dry_run:
        costs, throughput = (None, None)
        if not args.shrink:
            costs = all_costs(recipe)
            throughput = stored_throughput()
        if args.dry_run:
            print("\n".join(st.command for st in plan))
            if costs:
                total = sum(costs[r.experiment]["noised_images"] for r in runs)
                print(f"# {total:.4g} noised images; one H200 ≈ {format_duration(total / H200_REFERENCE_IMAGES_PER_S)} "
                      f"({H200_REFERENCE_SOURCE})")
            return 0
        _write(results, render_results(recipe, runs_root, shrink=args.shrink, throughput=throughput, costs=costs,
                                       command=f"dpdm-reproduce {recipe.name}"))
        return 0

    if not torch.cuda.is_available() and not (args.allow_cpu or args.shrink):
        costs, throughput = estimate(recipe, runs, measure=args.measure, measure_steps=args.measure_steps,
                                     measure_examples=args.measure_examples, data_dir=data_dir)
        print(refusal_message(recipe, costs, throughput), file=sys.stderr)
        return EXIT_REFUSED

    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    hw = hardware()
    failed = None
    ran: set[str] = set()  # runs with a stage (re)done now: their later stages use new inputs, so rerun too
    for st in plan:
        d = run_dir(runs_root, st.run)
        state = load_state(d)
        if st.run.experiment not in ran and stage_done(st, state):
            print(f"[{st.run.experiment}] {st.name}: done earlier, skipped")
            continue
        state["hardware"] = hw
        ran.add(st.run.experiment)
        rc = run_stage(st, state, env=env, log_dir=d / "logs")
        save_state(d, state)
        if rc != 0:
            failed = st
            break
    costs = None if args.shrink else all_costs(recipe)
    _write(results, render_results(recipe, runs_root, shrink=args.shrink, costs=costs,
                                   throughput=None if args.shrink else stored_throughput(),
                                   command=f"dpdm-reproduce {recipe.name}" + (" --shrink" if args.shrink else "")))
    if failed is not None:
        print(f"error: {failed.name} of {failed.run.experiment} failed; see {run_dir(runs_root, failed.run)}/logs/"
              f"{failed.name}.log. Run the same command again to continue from there.", file=sys.stderr)
        return 1
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
