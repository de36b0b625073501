"""Reproduction recipes of the paper's tables: which presets, which stages, what they cost, and the
results page (results/<dataset>.md) with our numbers beside the paper's.

A recipe is a list of runs (experiment presets); each run goes through five stages, each one console
command (dpdm-train, dpdm-sample, dpdm-evaluate), so the results page can list the exact commands:

  train       dpdm-train experiment=<preset> hydra.run.dir=<runs>/<preset>
  sample_acc  dpdm-sample ... sampler=paper_accuracy n=70000   (60,000 to train on + 10,000 held out)
  eval_acc    dpdm-evaluate <samples> (LogReg / MLP / CNN, fd_classifier, real-CNN check)
  sample_fid  dpdm-sample ... sampler=paper_fid n=60000
  eval_fid    dpdm-evaluate <samples> (FID, fd_classifier)

The paper reports accuracy and FID from different sampler settings of the same model; so do we.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from dpdm.experiments.paper import headline
from dpdm.experiments.sweeps import NO_INCEPTION, fid_note
from dpdm.utils.jsonio import read_json, write_json_atomic

ACC_SAMPLES = 70_000   # dpdm-evaluate splits off 10,000 (stratified) for model selection: 60,000 train
FID_SAMPLES = 60_000   # FID against the 60,000 training images (the paper's reference set)
ACC_METRICS = ("downstream", "fd_classifier", "real_cnn_on_synthetic")
FID_METRICS = ("fid", "fd_classifier")
# DESIGN.md's reference measurement on one H200 (the paper's network, stock Opacus hooks grouping K rows,
# 128 examples × K=32 per step, fp32/TF32, eager). Not measured by dpdm: quoted, and labelled as such.
H200_REFERENCE_IMAGES_PER_S = 8000.0
H200_REFERENCE_SOURCE = ("DESIGN.md's reference figure for the paper network under DP on one H200 "
                         "(stock Opacus hooks, 4096 noised images per forward); not measured by dpdm")
# The checkout's throughput records (benchmarks/training_throughput.py), relative to where dpdm-reproduce runs;
# without them (an installed dpdm elsewhere) the cost estimate measures a few steps instead.
BENCHMARK_FILE = Path("benchmarks") / "results" / "training_throughput.json"


@dataclass(frozen=True)
class RunSpec:
    experiment: str                     # conf/experiment/<experiment>.yaml
    epsilon: float
    fid_stage: bool = True              # a separate paper_fid sampling pass (False: FID on the acc samples)
    classifiers: tuple[str, ...] = ("logreg", "mlp", "cnn")


@dataclass(frozen=True)
class Recipe:
    name: str                           # dpdm-reproduce <name>
    dataset: str                        # conf/data name
    title: str
    runs: tuple[RunSpec, ...]
    results: str                        # the results page, relative to the repository
    extra_runs: tuple[RunSpec, ...] = field(default=())   # shown on the same page when they exist


FAST = RunSpec("mnist_eps10_fast", 10.0, fid_stage=False, classifiers=("cnn",))
RECIPES: dict[str, Recipe] = {
    "mnist": Recipe("mnist", "mnist", "MNIST",
                    tuple(RunSpec(f"mnist_eps{e}", float(e)) for e in ("0.2", "1", "10")),
                    "results/mnist.md", extra_runs=(FAST,)),
    "fmnist": Recipe("fmnist", "fashion_mnist", "Fashion-MNIST",
                     tuple(RunSpec(f"fmnist_eps{e}", float(e)) for e in ("0.2", "1", "10")),
                     "results/fmnist.md"),
    # The compute-budget preset: train → sample → evaluate in one 10-minute GPU job.
    "mnist-fast": Recipe("mnist-fast", "mnist", "MNIST", (FAST,), "results/mnist.md",
                         extra_runs=tuple(RunSpec(f"mnist_eps{e}", float(e)) for e in ("0.2", "1", "10"))),
}

# --shrink: the same stages on a tiny network, a few steps and samples, a small classifier budget. For
# testing the code path end to end on a CPU; its numbers mean nothing.
SHRINK_TRAIN = ["debug=tiny", "data.subset_size=128", "data.batch_size=64", "trainer.accelerator=cpu",
                "net.model_channels=8", "net.channel_mult=[1]", "net.num_blocks=1", "net.attn_resolutions=[]",
                "loss.noise_multiplicity=2"]
SHRINK_ACC_SAMPLES, SHRINK_FID_SAMPLES = 60, 20
SHRINK_SAMPLE = ["sampler.num_steps=2", "device=cpu"]
SHRINK_EVAL = ["evaluation.reference_splits=[test]", "evaluation.real_classifier.num_train=1000",
               "evaluation.real_classifier.max_epochs=1", "evaluation.downstream.max_epochs=1",
               "evaluation.downstream.val_size=0.2", "device=cpu"]


@dataclass(frozen=True)
class Stage:
    run: RunSpec
    name: str                           # train | sample_acc | eval_acc | sample_fid | eval_fid
    argv: tuple[str, ...]               # the command, console script first
    output: Path                        # exists once the stage is done

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def run_dir(runs_root: Path, run: RunSpec) -> Path:
    return Path(runs_root) / run.experiment


def stages(run: RunSpec, runs_root: Path, *, shrink: bool = False, eval_cache: Path | None = None,
           acc_samples: int = ACC_SAMPLES, fid_samples: int = FID_SAMPLES,
           train_overrides: tuple[str, ...] = (), eval_overrides: tuple[str, ...] = ()) -> list[Stage]:
    """The run's commands. `train_overrides` / `eval_overrides` go last on dpdm-train / dpdm-evaluate's command
    lines (so they win), and into the recorded commands the results page prints."""
    d = run_dir(runs_root, run)
    ckpt = d / "checkpoints" / "last.ckpt"
    train_extra = [*(SHRINK_TRAIN if shrink else []), *train_overrides]
    sample_extra = SHRINK_SAMPLE if shrink else []
    eval_extra = [*(SHRINK_EVAL if shrink else []), *([f"evaluation.cache_dir={eval_cache}"] if eval_cache else []),
                  *eval_overrides]
    n_acc = SHRINK_ACC_SAMPLES if shrink else acc_samples
    n_fid = SHRINK_FID_SAMPLES if shrink else fid_samples
    acc_metrics = ACC_METRICS if run.fid_stage else ("fid", *ACC_METRICS)
    out = [
        Stage(run, "train", ("dpdm-train", f"experiment={run.experiment}", f"hydra.run.dir={d}", *train_extra),
              d / "summary.json"),
        Stage(run, "sample_acc", ("dpdm-sample", f"ckpt={ckpt}", "sampler=paper_accuracy", f"n={n_acc}",
                                  f"out={d / 'samples_accuracy'}", "overwrite=true", *sample_extra),
              d / "samples_accuracy" / "samples.npz"),
        Stage(run, "eval_acc", ("dpdm-evaluate", str(d / "samples_accuracy" / "samples.npz"),
                                f"evaluation.metrics=[{','.join(acc_metrics)}]",
                                f"evaluation.downstream.classifiers=[{','.join(run.classifiers)}]", *eval_extra),
              d / "samples_accuracy" / "eval.json"),
    ]
    if run.fid_stage:
        out += [
            Stage(run, "sample_fid", ("dpdm-sample", f"ckpt={ckpt}", "sampler=paper_fid", f"n={n_fid}",
                                      f"out={d / 'samples_fid'}", "overwrite=true", *sample_extra),
                  d / "samples_fid" / "samples.npz"),
            Stage(run, "eval_fid", ("dpdm-evaluate", str(d / "samples_fid" / "samples.npz"),
                                    f"evaluation.metrics=[{','.join(FID_METRICS)}]", *eval_extra),
                  d / "samples_fid" / "eval.json"),
        ]
    return out


# ---- cost ----------------------------------------------------------------------------------------------

def run_cost(run: RunSpec, *, overrides: list[str] | None = None) -> dict[str, Any]:
    """The privacy plan of a run as dpdm-train would make it, and its total noised images (steps × B × K)."""
    from dpdm.data import dataset_info
    from dpdm.training.privacy_plan import make_privacy_plan
    from dpdm.utils.configs import compose

    cfg = compose("train", [f"experiment={run.experiment}", "output_dir=unused", *(overrides or [])])
    n = cfg.data.get("subset_size") or dataset_info(cfg.data.name).num_train
    p = cfg.privacy
    with warnings.catch_warnings():
        # Opacus' RDP analysis warns when the optimal order is at the end of its α grid (large σ at small ε):
        # noise for an estimate of the cost, which depends on steps, B and K only.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        plan = make_privacy_plan(enabled=p.enabled, epsilon=p.epsilon, delta=p.delta, max_grad_norm=p.max_grad_norm,
                                 accountant=p.accountant, noise_multiplier=p.noise_multiplier,
                                 batch_size=cfg.data.batch_size, dataset_size=n, epochs=cfg.trainer.max_epochs,
                                 noise_multiplicity=cfg.loss.noise_multiplicity,
                                 step_limit=cfg.trainer.get("max_steps"))
    images = plan.planned_steps * plan.expected_batch_size * plan.noise_multiplicity
    return {"experiment": run.experiment, "steps": plan.planned_steps, "batch_size": plan.expected_batch_size,
            "noise_multiplicity": plan.noise_multiplicity, "noise_multiplier": plan.noise_multiplier,
            "epochs": int(cfg.trainer.max_epochs), "noised_images": images}


def stored_throughput(device: str | None = None) -> dict | None:
    """The newest benchmark record (benchmarks/training_throughput.py) for `device`, else the newest CPU one."""
    try:
        records = json.loads(BENCHMARK_FILE.read_text())
    except (OSError, ValueError):
        return None
    if device is not None and not device.startswith("cpu"):
        records = [r for r in records if r.get("device") == device]   # a GPU: only its own figures
    else:
        records = [r for r in records if str(r.get("device", "")).startswith("cpu")]
    same = [r for r in records if r.get("device") == device]
    return max(same or records, key=lambda r: r.get("date", "")) if records else None


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    if seconds < 2 * 365 * 86400:
        return f"{seconds / 86400:.0f} days"
    return f"{seconds / (365 * 86400):.1f} years"


# ---- hardware, state -----------------------------------------------------------------------------------

def hardware() -> dict[str, Any]:
    """The machine a reproduction ran on, in reproduce.json: utils.machine's facts under this file's keys."""
    from dpdm.utils.machine import machine_facts

    facts = machine_facts()
    return {"gpus": facts["gpus"], "cpu": facts["cpu"], "cpu_isa": facts["cpu_isa"], "cpu_cores": facts["cpu_count"],
            "torch": facts["torch"], "python": platform.python_version()}


def describe_hardware(hw: dict) -> str:
    gpu = ", ".join(hw.get("gpus") or []) or "no GPU"
    isa = f", {hw['cpu_isa']}" if hw.get("cpu_isa") else ""
    return f"{gpu}; CPU {hw.get('cpu')} ({hw.get('cpu_cores')} cores{isa}); torch {hw.get('torch')}"


def state_path(d: Path) -> Path:
    return Path(d) / "reproduce.json"


def load_state(d: Path) -> dict:
    return read_json(state_path(d)) or {}


def save_state(d: Path, state: dict) -> None:
    state_path(d).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_path(d), state, sort_keys=False)  # stages in the order they ran


def stage_done(stage: Stage, state: dict) -> bool:
    """Done: the recorded command is this one, it succeeded, and its output is there."""
    rec = state.get("stages", {}).get(stage.name)
    return bool(rec) and rec.get("command") == stage.command and rec.get("rc") == 0 and stage.output.exists()


# ---- the results page ----------------------------------------------------------------------------------

def collect_run(run: RunSpec, runs_root: Path) -> dict[str, Any]:
    d = run_dir(runs_root, run)
    acc = read_json(d / "samples_accuracy" / "eval.json")
    fid = read_json(d / "samples_fid" / "eval.json") if run.fid_stage else acc
    return {"spec": run, "dir": d, "state": load_state(d), "privacy": read_json(d / "privacy.json"),
            "summary": read_json(d / "summary.json"), "acc": acc, "fid": fid}


def _pct(result: dict | None, key: str) -> str | None:
    v = (result or {}).get("metrics", {}).get(key)
    return None if v is None else f"{100 * v:.2f}"


def fid_cell(result: dict | None) -> str:
    if result is None:
        return "not run"
    v = result.get("metrics", {}).get("eval/fid")
    if v is not None:
        return f"{v:.2f}"
    return fid_note(result.get("unavailable") or {}) or "not computed"


def status_of(r: dict) -> str:
    if r["summary"] is None:
        return "not run" if not r["state"] else "training unfinished"
    done = [s for s, rec in r["state"].get("stages", {}).items() if rec.get("rc") == 0]
    wanted = 5 if r["spec"].fid_stage else 3
    status = "done" if len(done) >= wanted else f"{len(done)}/{wanted} stages"
    p = r["privacy"] or {}
    if p.get("enabled") and p.get("steps", 0) < p.get("planned_steps", 0):
        # e.g. a time-boxed run (++trainer.max_time): its ε is the accountant's for the steps that ran
        status += f"; stopped at step {p['steps']} of {p['planned_steps']}"
    return status


def training_rate(r: dict) -> float | None:
    """Noised images per second of training: steps × expected B × K over the run's wall time (Poisson batches
    vary around B, so this is the planned work per second)."""
    p, wall = r["privacy"] or {}, (r["summary"] or {}).get("wall_time_s")
    if not (p.get("enabled") and wall):
        return None
    return p["steps"] * p["expected_batch_size"] * p["noise_multiplicity"] / wall


def protocol_of(acc: dict | None) -> str:
    """The downstream protocol an eval.json ran: synthetic training / held-out counts and the epoch cap."""
    d = ((acc or {}).get("details") or {}).get("downstream")
    if not d:
        return ""
    return (f"{d['num_train']:,} + {d['num_held_out']:,} held out, "
            f"≤ {d.get('settings', {}).get('max_epochs', '?')} epochs")


def _results_table(rows: list[dict], dataset: str) -> list[str]:
    lines = ["| ε | status | ε spent | FID | paper FID | LogReg | paper | MLP | paper | CNN | paper |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spec, paper = r["spec"], headline(dataset, r["spec"].epsilon) or {}
        eps = (r["privacy"] or {}).get("epsilon")
        ours = partial(_ours, r["acc"])
        lines.append("| " + " | ".join([
            f"{spec.epsilon:g} (`{spec.experiment}`)", status_of(r), "" if eps is None else f"{eps:.4g}",
            fid_cell(r["fid"]), _paper(paper, "fid"), ours("eval/acc_logreg"), _paper(paper, "logreg"),
            ours("eval/acc_mlp"), _paper(paper, "mlp"), ours("eval/acc_cnn"), _paper(paper, "cnn")]) + " |")
    return lines


def _ours(acc: dict | None, key: str) -> str:
    return "not run" if acc is None else (_pct(acc, key) or "–")


def _paper(paper: dict, key: str) -> str:
    v = paper.get(key)
    return "" if v is None else (f"{v:g}" if key == "fid" else f"{v:.1f}")


def _diagnostics(rows: list[dict]) -> list[str]:
    lines = ["| run | fd_classifier (accuracy samples) | fd_classifier (FID samples) | "
             "real-data CNN accuracy on samples (%) |",
             "|---|---|---|---|"]
    for r in rows:
        def fd(res):
            v = (res or {}).get("metrics", {}).get("eval/fd_classifier",
                                                   (res or {}).get("metrics", {}).get("eval/fd_classifier_test"))
            return "" if v is None else f"{v:.3g}"

        lines.append(f"| `{r['spec'].experiment}` | {fd(r['acc'])} | "
                     f"{fd(r['fid']) if r['spec'].fid_stage else '(same samples)'} | "
                     f"{_pct(r['acc'], 'eval/real_cnn_acc_on_synthetic') or ''} |")
    return lines


def _cost_lines(costs: list[dict], extra: list[dict], throughput: dict | None) -> list[str]:
    total = sum(c["noised_images"] for c in costs)
    lines = ["| run | epochs | steps | B | K | σ | noised images (steps × B × K) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| `{c['experiment']}` | {c['epochs']} | {c['steps']} | {c['batch_size']} | {c['noise_multiplicity']} | "
              f"{c['noise_multiplier']:.4g} | {c['noised_images']:.4g} |" for c in costs + extra]
    names = ", ".join(c["experiment"] for c in costs)
    lines += ["", f"The paper recipe ({names}): {total:.4g} noised images of training."]
    for label, n in [("the paper recipe", total)] + [(f"`{c['experiment']}`", c["noised_images"]) for c in extra]:
        line = (f"- {label}: one H200 ≈ {format_duration(n / H200_REFERENCE_IMAGES_PER_S)} of training at "
                f"{H200_REFERENCE_IMAGES_PER_S:.0f} noised images/s ({H200_REFERENCE_SOURCE})")
        if throughput:
            line += (f"; the benchmarked CPU ≈ {format_duration(n / throughput['images_per_s'])} at "
                     f"{throughput['images_per_s']:.3g} noised images/s ({throughput_source(throughput)})")
        lines.append(line + ".")
    lines.append("- Sampling and evaluation come on top: the FID sampler alone is 60,000 samples × 1999 network "
                 "evaluations per run.")
    return lines


def throughput_source(t: dict) -> str:
    what = (f"{t['steps']} DP-SGD steps of `{t['experiment']}`'s network, {t['examples_per_step']} examples × "
            f"K={t['noise_multiplicity']} per step, on {t['device']}")
    if t.get("measured_now"):
        return f"measured now: {what}"
    load = t.get("loadavg_before")
    busy = f"; load average {load[0]:.1f} when it started" if load else ""
    note = f" ({t['note']})" if t.get("note") else ""
    return (f"benchmark figure measured on {t.get('date', '?')} by benchmarks/training_throughput.py: "
            f"{what}{busy}{note}")


STAGE_ORDER = ("train", "sample_acc", "eval_acc", "sample_fid", "eval_fid")


def render_results(recipe: Recipe, runs_root: Path, *, shrink: bool = False, throughput: dict | None = None,
                   costs: dict[str, dict] | None = None, command: str | None = None) -> str:
    """The results page. `costs` (experiment → run_cost) adds the cost section."""
    main_specs = recipe.runs if recipe.name != "mnist-fast" else recipe.extra_runs
    fast_specs = (recipe.extra_runs if recipe.name != "mnist-fast" else recipe.runs)
    rows = [collect_run(s, runs_root) for s in main_specs]
    fast = [collect_run(s, runs_root) for s in fast_specs]
    everything = rows + fast
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"# {recipe.title}: DPDM reproduction", ""]
    if shrink:
        lines += ["> **SHRUNK configuration** (`--shrink`: tiny network, a few steps and samples, small "
                  "classifier budget): this page tests the code path; its numbers mean nothing.", ""]
    lines += [f"Generated by `{command or 'dpdm-reproduce ' + recipe.name}` on {now} from the run dirs under "
              f"`{runs_root}`. Paper: Dockhorn et al., DPDM (TMLR 2023), δ = 1e-5; accuracies in % on the real "
              "test set, classifiers trained on 60,000 synthetic samples (model selection on 10,000 held-out "
              "synthetic ones); FID against the training set. As in the paper, accuracy comes from the "
              "accuracy-oriented sampler (`sampler=paper_accuracy`: DDIM, 50 steps) and FID from the FID-oriented "
              "one (`sampler=paper_fid`: EDM churn + Heun, 1000 steps), both from the same model.", ""]
    lines += ["## Results", "", *_results_table(rows, recipe.dataset), ""]
    if not any(r["state"].get("stages") for r in everything):
        lines += [f"Nothing has run yet: `make reproduce-{recipe.name}` on a GPU machine fills this page "
                  "(the cost is estimated below).", ""]
    if any(r["fid"] and fid_cell(r["fid"]) == NO_INCEPTION for r in everything):
        lines += [f"FID \"{NO_INCEPTION}\": the standard Inception-v3 file was not on the machine that "
                  "evaluated (docs/evaluation.md says how to provide it); no other network is substituted.", ""]
    if fast:
        lines += ["## Compute-budget preset", "",
                  "`experiment=mnist_eps10_fast`: the paper's network at ε = 10 with B = 2048, K = 2, 20 epochs "
                  "(580 DP-SGD steps, 2.4M noised images), chosen for ≤ 6 minutes of training on one H200 so that "
                  "train → sample → evaluate fits a 10-minute GPU job (`make reproduce-mnist-fast`). CNN only; "
                  "FID (if the Inception weights are there) on the same DDIM-50 samples. `scripts/gpu/checks.sh` "
                  "runs it inside one 15-minute device lease: training stops at a wall-clock limit (the status "
                  "then names the step; ε is the accountant's for the steps that ran) and the CNN trains on 10,000 "
                  "samples and selects on 2,000 more (the CPU presets' protocol): \"CNN trained on\" says "
                  "which protocol scored a row.", ""]
        if all(r["summary"] is None for r in fast):
            lines += ["**Not measured on GPU**: this preset has not been run on an H200 yet; its settings come "
                      "from reasoning over the paper's ablations and DESIGN.md's throughput figures, and its "
                      "noise-level shift (+1.2) from the CPU studies' trend with compute, extrapolated "
                      "(docs/experiments.md).", ""]
        lines += ["| run | status | ε spent | CNN | CNN trained on | paper CNN (full recipe) | FID | "
                  "training wall time | noised images/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in fast:
            eps = (r["privacy"] or {}).get("epsilon")
            wall = (r["summary"] or {}).get("wall_time_s")
            rate = training_rate(r)
            lines.append(f"| `{r['spec'].experiment}` | {status_of(r)} | {'' if eps is None else f'{eps:.4g}'} | "
                         f"{_pct(r['acc'], 'eval/acc_cnn') or ('not run' if r['acc'] is None else '–')} | "
                         f"{protocol_of(r['acc'])} | "
                         f"{_paper(headline(recipe.dataset, r['spec'].epsilon) or {}, 'cnn')} | "
                         f"{fid_cell(r['fid'])} | {'' if wall is None else format_duration(wall)} | "
                         f"{'' if rate is None else f'{rate:,.0f}'} |")
        lines.append("")
    lines += ["## Offline diagnostics (not in the paper)", "",
              "fd_classifier: Fréchet distance in a real-data CNN's features (not FID; docs/evaluation.md). "
              "Real-data CNN accuracy on samples: do class-y samples look like y?", "", *_diagnostics(everything), ""]
    lines += ["## Hardware and wall time", ""]
    ran = [r for r in everything if r["state"].get("stages")]
    if not ran:
        lines += ["Nothing has run yet.", ""]
    else:
        for hw in {describe_hardware(r["state"].get("hardware", {})) for r in ran}:
            lines.append(f"- {hw}")
        lines += ["", "| run | stage | wall time | finished |", "|---|---|---|---|"]
        for r in ran:
            recorded = r["state"]["stages"]
            for name, rec in sorted(recorded.items(), key=lambda kv: STAGE_ORDER.index(kv[0])):
                status = "" if rec.get("rc") == 0 else f" (failed, exit {rec.get('rc')})"
                lines.append(f"| `{r['spec'].experiment}` | {name}{status} | {format_duration(rec['wall_s'])} | "
                             f"{rec.get('ended', '')} |")
        total = sum(rec["wall_s"] for r in ran for rec in r["state"]["stages"].values())
        lines += ["", f"Total wall time of the stages: {format_duration(total)}.", ""]
    lines += ["## Privacy", "", "| run | ε target | ε spent | δ | σ | q | steps | K | accountant |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in everything:
        p = r["privacy"]
        if p:
            lines.append(f"| `{r['spec'].experiment}` | {p['target_epsilon']:g} | {p['epsilon']:.4g} | "
                         f"{p['delta']:g} | "
                         f"{p['noise_multiplier']:.4g} | {p['sample_rate']:.4g} | {p['steps']} | "
                         f"{p['noise_multiplicity']} | {p['accountant']} |")
        else:
            lines.append(f"| `{r['spec'].experiment}` | {r['spec'].epsilon:g} | not run | | | | | | |")
    lines.append("")
    if costs:
        main = [costs[spec.experiment] for spec in main_specs if spec.experiment in costs]
        extra = [costs[spec.experiment] for spec in fast_specs if spec.experiment in costs]
        lines += ["## Cost", "", *_cost_lines(main, extra, throughput), ""]
    lines += ["## Commands", "", f"All of it: `{command or 'dpdm-reproduce ' + recipe.name}` (resumable: finished "
              "stages are skipped, an unfinished training run resumes from its last checkpoint). Stage by stage, "
              "exactly what it runs:", "", "```"]
    for r in everything:
        recorded = r["state"].get("stages", {})
        for st in stages(r["spec"], runs_root, shrink=shrink,
                         eval_cache=Path(runs_root) / "eval_cache" if shrink else None):
            lines.append(recorded.get(st.name, {}).get("command", st.command))
    lines += ["```", ""]
    return "\n".join(lines)
