"""results/cpu.md: the CPU presets end to end, and their learning curves.

`dpdm-reproduce cpu` runs conf/study/cpu_presets.yaml (each 60-minute preset and its privacy=none
control: train, sample with the preset's sampler, score with the paper's downstream protocol at a
CPU-sized n), then a learning curve per DP run, then writes the page. Every stage is resumable: a
trained run, a sample set and a curve point that exist are reused.

The learning curve scores one checkpoint per epoch (the presets keep them all) with the CNN of the
downstream protocol on a smaller sample set. Minutes on its x axis are the run's training wall time
times step / total steps (DP-SGD steps are equally expensive; the checkpoint files carry no clock).
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import shutil
import statistics
from pathlib import Path

from dpdm.experiments.study import (
    CONFIG_SAMPLER,
    DP,
    NONPRIVATE,
    Study,
    configured_sampler,
    draw,
    drawn_with,
    of_run,
    preset_recipe,
    read_rows,
    recipe_differences,
    run_dataset,
    run_study,
    same_sampler,
)
from dpdm.utils.configs import CONFIG_DIR
from dpdm.utils.jsonio import read_json, write_json_atomic

STUDY_FILE = Path(CONFIG_DIR) / "study" / "cpu_presets.yaml"
CURVE_FILE = "learning_curve.json"
# Target CNN accuracy (%) per preset, from issue 12 (the paper's ε=10 MNIST CNN is 98.1).
TARGETS = {"mnist_eps10_cpu": 90.0, "mnist_eps1_cpu": 80.0, "fmnist_eps10_cpu": 75.0}
# Rows of scripts/study/paper_protocol.sh: a preset's DP run scored at the paper's n (60,000 + 10,000).
PAPER_N_ROWS = "paper_protocol.jsonl"
_EPOCH_CKPT = re.compile(r"epoch=(\d+)-step=(\d+)\.ckpt$")


def epoch_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(optimizer step, checkpoint) of every kept epoch checkpoint, plus last.ckpt at the run's final step."""
    found = {}
    for p in sorted((run_dir / "checkpoints").glob("epoch=*-step=*.ckpt")):
        m = _EPOCH_CKPT.search(p.name)
        if m:
            found[int(m.group(2))] = p
    summary = read_json(run_dir / "summary.json") or {}
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists() and summary.get("optimizer_steps"):
        found.setdefault(int(summary["optimizer_steps"]), last)
    return sorted(found.items())


def curve_settings(evaluation: dict | None = None):
    """The learning curve's protocol: the downstream CNN only, a fifth of the samples held out for model
    selection, the public test split as the reference; `evaluation` (a study's) sets the rest."""
    from dpdm.evaluation.protocol import EvalSettings

    evaluation = dict(evaluation or {})
    ds = {**evaluation.get("downstream", {}), "classifiers": ["cnn"], "val_size": 0.2}
    return EvalSettings.from_dict({**evaluation, "reference_splits": ["test"], "downstream": ds})


def learning_curve(run_dir: Path, *, evaluator, n: int, sampler: dict | None = None, batch_size: int = 500,
                   progress=print) -> list[dict]:
    """CNN accuracy (downstream protocol, real test set) of samples from each epoch checkpoint.

    Points are stored in <run_dir>/learning_curve.json as they are computed, so an interrupted curve
    continues where it stopped. `evaluator` carries the downstream settings (classifiers, held-out size);
    `sampler` (a sampler dict) draws every point with it, and points drawn with another are redone.
    """
    from dpdm.evaluation.synthetic import samples_from_npz

    path = run_dir / CURVE_FILE
    stored = read_json(path) or {}
    summary = read_json(run_dir / "summary.json") or {}
    total, wall = summary.get("optimizer_steps"), summary.get("wall_time_s")
    if not total or not wall:
        raise FileNotFoundError(f"{run_dir}: no finished training run (summary.json); train it first")
    checkpoints = epoch_checkpoints(run_dir)
    by_step = dict(checkpoints)
    # Points from before the sampler was recorded were drawn with the checkpoint's own sampler.
    points = [p for p in stored.get("points", []) if p.get("n") == n and (
        sampler is None or same_sampler(p.get("sampler") or drawn_with(run_dir / "curve" / f"step_{p['step']}",
                                                                       by_step.get(p["step"], Path("-"))), sampler))]
    done = {p["step"] for p in points}
    for step, ckpt in checkpoints:
        if step in done:
            continue
        out = run_dir / "curve" / f"step_{step}"
        draw(ckpt, out, n=n, batch_size=batch_size, spec=sampler, extra=[], log_path=run_dir / "curve" / "sample.log",
             progress=progress)
        samples, _ = samples_from_npz(out / "samples.npz")
        m = evaluator.evaluate(samples, metrics=["downstream", "real_cnn_on_synthetic"]).metrics
        point = {"step": step, "minutes": wall * step / total / 60, "n": n, "checkpoint": ckpt.name,
                 "sampler": (read_json(out / "sampler.json") or {}).get("sampler"),
                 "agreement": m.get("eval/real_cnn_acc_on_synthetic"),
                 **{k.removeprefix("eval/"): v for k, v in m.items() if k.startswith("eval/acc_")}}
        points.append(point)
        points.sort(key=lambda p: p["step"])
        write_json_atomic(path, {"run_dir": str(run_dir), "train_wall_s": wall, "steps": total, "points": points})
        progress(f"    curve {run_dir.parent.name} step {step} ({point['minutes']:.1f} min): "
                 f"CNN {_pct(point.get('acc_cnn'))}, agreement {_pct(point['agreement'])}")
    return points


def images_per_step(row: dict | None) -> float | None:
    """Noised images per optimizer step (B × K) of a study row; None when the row does not say."""
    if not row or not row.get("noised_images") or not row.get("steps"):
        return None
    return row["noised_images"] / row["steps"]


def plot_learning_curves(curves: dict[str, list[dict]], path: Path,
                         per_step: dict[str, float | None] | None = None) -> Path | None:
    """CNN accuracy vs training minutes, one line per preset (PNG), and beside it vs noised images for the
    presets whose images per step (`per_step`) are known: the presets were trained on machines of different
    speed, and the noised images they saw compare across machines where minutes do not. None when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    per_step = {k: v for k, v in (per_step or {}).items() if v}
    fig, axes = plt.subplots(1, 2 if per_step else 1, figsize=(11 if per_step else 6, 4), dpi=120, squeeze=False)
    panels = list(axes[0])
    by_minutes, by_images = panels[0], (panels[1] if per_step else None)
    for name, points in curves.items():
        pts = [p for p in points if p.get("acc_cnn") is not None]
        if not pts:
            continue
        acc = [100 * p["acc_cnn"] for p in pts]
        line, = by_minutes.plot([p["minutes"] for p in pts], acc, marker="o", label=name)
        if by_images is not None and name in per_step:
            by_images.plot([p["step"] * per_step[name] / 1e3 for p in pts], acc, marker="o", label=name,
                           color=line.get_color())
        for ax in panels if name in TARGETS else []:
            ax.axhline(TARGETS[name], ls=":", lw=0.8, color=line.get_color())
    by_minutes.set_xlabel("training wall time (minutes, 2 CPU cores; machines differ up to 3x)")
    if by_images is not None:
        by_images.set_xlabel("noised images seen (thousands: B × K × step)")
    for ax in panels:
        ax.set_ylabel("CNN accuracy on real test set (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Downstream CNN trained on DP samples (dotted: target)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _sampler_of(row: dict) -> dict | None:
    """The sampler behind a row: recorded in it, else in the sample set's sampler.json (rows written
    before the record existed)."""
    if row.get("sampler_spec"):
        return row["sampler_spec"]
    record = read_json(Path(row.get("run_dir", "-")) / f"samples_{row.get('sampler')}" / "sampler.json")
    return (record or {}).get("sampler")


def sampler_label(spec: dict | None) -> str:
    """'edm_heun 14, σ_min 0.05, w 0' for a sampler dict; '–' when the row predates the record."""
    if not spec:
        return "–"
    return (f"{spec.get('name')} {spec.get('num_steps')}, σ_min {spec.get('sigma_min'):g}, "
            f"w {spec.get('guidance', 0.0):g}")


def _epsilon_cell(eps) -> str:
    """ε rounded *up* at the fifth decimal: a shown ε is never below the accountant's, and a run that spent
    9.99998 of a budget of 10 does not read as 10.0000."""
    if eps is None:
        return "–"
    return f"{math.ceil(eps * 1e5 - 1e-9) / 1e5:.5f}"

def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _thousands(n: float) -> str:
    return f"{n / 1e3:,.0f}k"


def _num(v, fmt="{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def rows_of_current_recipes(study: Study, rows: list[dict]) -> dict[str, dict[str, tuple[dict, list[str]]]]:
    """Per variant and mode: the newest row of the recipe the preset composes now, else the newest row,
    each with the recipe fields it differs in (empty when it is the preset's current recipe). A preset
    changed back to an earlier recipe shows that recipe's row, not the newer one of the other."""
    recipes = {v: preset_recipe(study, v) for v in study.variants}
    picked: dict[str, dict[str, tuple[dict, list[str]]]] = {}
    for r in rows:  # file order: newer rows come later
        if r["variant"] not in recipes:
            continue
        diffs = recipe_differences(r, recipes[r["variant"]])
        modes = picked.setdefault(r["variant"], {})
        if r["mode"] not in modes or not diffs or modes[r["mode"]][1]:
            modes[r["mode"]] = (r, diffs)
    return picked


def more_runs_rows(study: Study, study_dir: Path, results_dir: Path) -> dict[str, list[dict]]:
    """Per variant, the DP rows of the studies its `more_runs` names (other training seeds of its recipe).
    A named study must score as this one does (sample n and evaluation settings): else its accuracies
    are not comparable, and it is an error in the study file, not something to skip quietly."""
    out: dict[str, list[dict]] = {}
    for variant, names in study.more_runs.items():
        for name in names:
            other = Study.load(study_dir / f"{name}.yaml")
            if (other.sample_n, other.evaluation) != (study.sample_n, study.evaluation):
                raise ValueError(f"{study.name}: more_runs of {variant} names study {name}, which scores "
                                 f"n={other.sample_n} with {other.evaluation}, unlike this study's n={study.sample_n} "
                                 f"with {study.evaluation}; name only studies scored the same way")
            path = results_dir / f"{name}.jsonl"
            out.setdefault(variant, []).extend(r for r in (read_rows(path) if path.exists() else [])
                                               if r.get("mode") == DP)
    return out


def runs_of_recipe(study: Study, variant: str, shown: dict, rows: list[dict], more: list[dict]) -> list[dict]:
    """Every scored DP run of the recipe `variant` composes now, at the ε and with the sampler of the row
    the page shows (`shown`): the variant's own rows, then those of its more_runs studies; the newest row
    per run dir."""
    recipe = preset_recipe(study, variant)
    by_run: dict[str, dict] = {}
    for r in [*(r for r in rows if r["variant"] == variant and r["mode"] == DP), *more]:
        if (r.get("acc_cnn") is not None and not recipe_differences(r, recipe)
                and r.get("target_epsilon") == shown.get("target_epsilon")
                and same_sampler(_sampler_of(r), _sampler_of(shown))):
            by_run.pop(r.get("run_dir"), None)  # re-inserted last: a run's place is its newest row's
            by_run[r.get("run_dir")] = r
    return list(by_run.values())


def training_cell(row: dict) -> str:
    """'20.1 min (576/s)': the training wall time and the noised images per second it ran at. The presets are
    measured in different sessions on 2-core machines of different speed; the rate tells them apart."""
    wall = row.get("train_wall_s")
    if wall is None:
        return "–"
    rate = f" ({row['noised_images'] / wall:.0f}/s)" if row.get("noised_images") and wall > 0 else ""
    return f"{wall / 60:.1f} min{rate}"


def spread_cell(runs: list[dict]) -> str:
    """'90.8 / 89.7 / 87.9% (89.5 ± 1.5, 3 runs)' of the runs' CNN accuracies; 'one run' for one."""
    accs = [100 * r["acc_cnn"] for r in runs]
    if len(accs) < 2:
        return "one run" if accs else "–"
    return (" / ".join(f"{a:.1f}" for a in accs)
            + f"% ({statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f}, {len(accs)} runs)")


def shown_dp_run(picked_modes: dict[str, tuple[dict, list[str]]], own: Path) -> Path:
    """The DP run whose table row the page shows, so that its curve and grid come from the same run: the
    run the current recipe's row names (a preset changed back to an earlier recipe reuses the run moved
    aside for it, `dp.old<i>`), even where that run is gone (a fresh checkout: its stored curve is shown,
    never that of another recipe's run left in `own`); else the variant's own run dir `own`."""
    row, diffs = picked_modes.get(DP, (None, None))
    if row and not diffs and row.get("run_dir"):
        return Path(row["run_dir"])
    return own


def kept_points(entry: dict | None, run_dir: Path) -> list[dict] | None:
    """The stored curve of `run_dir` in one preset's entry of <study>_curves.json, if it holds one."""
    if not entry:
        return None
    if entry.get("run_dir") == str(run_dir):
        return entry.get("points")
    return (entry.get("other_runs") or {}).get(str(run_dir))


def keep_points(entry: dict | None, run_dir: Path, points: list[dict]) -> dict:
    """The entry with `run_dir`'s curve as the shown one; curves of the preset's other runs stay under
    other_runs, so a preset changed back to an earlier recipe finds its curve without its run dir."""
    others = dict((entry or {}).get("other_runs") or {})
    if entry and entry.get("run_dir") and entry.get("run_dir") != str(run_dir):
        others[entry["run_dir"]] = entry["points"]
    others.pop(str(run_dir), None)
    return {"run_dir": str(run_dir), "points": points, **({"other_runs": others} if others else {})}


def follow_moved_run(curves_path: Path, old: Path, new: Path) -> None:
    """The run that `old` held is now named `new` (moved aside, or named there by its rows when absent):
    its stored curve follows, so the curve of the run trained into `old` next does not overwrite it."""
    kept = read_json(curves_path)
    moved = False
    for entry in (kept or {}).values():
        if entry.get("run_dir") == str(old):
            entry["run_dir"], moved = str(new), True
        others = entry.get("other_runs") or {}
        if str(old) in others:
            others[str(new)], moved = others.pop(str(old)), True
    if moved:
        write_json_atomic(curves_path, kept)


def render_page(study: Study, rows: list[dict], curves: dict[str, list[dict]], *, assets: Path, page: Path,
                curve_n: int, command: str, more_rows: dict[str, list[dict]] | None = None,
                per_step: dict[str, float | None] | None = None, paper_rows: list[dict] | None = None) -> str:
    """The markdown of results/cpu.md from the study's rows and the curves (images are under `assets`);
    `paper_rows` (PAPER_N_ROWS) add the shown DP runs scored at the paper's n."""
    by_variant = rows_of_current_recipes(study, rows)
    stale: list[str] = []
    ds = study.evaluation.get("downstream", {})
    held_out = ds.get("val_size", 10000)
    rel = lambda p: Path(p).relative_to(page.parent).as_posix() if p else None  # noqa: E731
    machines = sorted({r.get("machine", "?") for r in rows})
    recipe_runs: dict[str, list[dict]] = {}  # per variant, every DP run of the recipe it composes now
    lines = [
        "# dpdm on a 2-core CPU: the 60-minute presets", "",
        f"Generated by `{command}` on {_dt.datetime.now():%Y-%m-%d %H:%M} from "
        f"`results/study/{study.name}.jsonl` and the run dirs it names. Machine(s): {', '.join(machines) or '–'}. "
        "No GPU.", "",
        "Protocol (the paper's, at a CPU-sized n): "
        f"{study.sample_n:,} class-balanced samples drawn with each preset's configured sampler (the *sampler* "
        "column; sampling is post-processing, so a preset's sampler can change without retraining); "
        f"{study.sample_n - int(held_out):,} train LogReg / MLP / CNN (Adam 3e-4, batch 128, "
        f"up to {ds.get('max_epochs', 50)} epochs, early stop after {ds.get('patience')} without gain) and "
        f"{int(held_out):,} held-out synthetic samples select the epoch; accuracy on the real test set. The paper "
        "uses 60,000 + 10,000. *Agreement*: a CNN trained on the real training split of the preset's dataset "
        "(measured on the real test set: 99.1% for MNIST, 87.8% for Fashion-MNIST) labels the samples; the share "
        "that matches the requested class. *fd_classifier*: Fréchet distance to the real test "
        "split in that CNN's features (lower is better; not FID). Each preset has a non-private control "
        "(`privacy=none`, same steps and batch): the gap between the two is the cost of privacy at this "
        "compute.", "",
        "## Results", "",
        "| preset | ε spent (δ=1e-5) | σ | B | steps | training | sampler | LogReg | MLP | CNN | CNN target | "
        "CNN, every run of the recipe (mean ± sd) | agreement | fd_classifier | "
        "control: CNN / agreement / fd_classifier |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant in study.variants:
        modes = by_variant.get(variant, {})
        (dp, dp_diffs), (ctl, ctl_diffs) = modes.get(DP, (None, [])), modes.get(NONPRIVATE, (None, []))
        if dp is None:
            target = f"≥ {TARGETS[variant]:g}%" if variant in TARGETS else ""
            lines.append(f"| `{variant}` | not run | | | | | | | | | {target} | | | | |")
            continue
        for mode, diffs in ((DP, dp_diffs), (NONPRIVATE, ctl_diffs)):
            if diffs:
                stale.append(f"`{variant}` {mode}: its newest row was trained before the preset changed "
                             f"({', '.join(diffs)} differ); `dpdm-reproduce cpu --preset {variant} --modes {mode}` "
                             "measures the preset as it is now.")
        control = ("not run" if ctl is None else
                   f"{_pct(ctl.get('acc_cnn'))} / {_pct(ctl.get('agreement'))} / {_num(ctl.get('fd_classifier_test'))}"
                   + (" (earlier recipe)" if ctl_diffs else ""))
        eps = dp.get("epsilon")
        if not dp_diffs:
            recipe_runs[variant] = runs_of_recipe(study, variant, dp, rows, (more_rows or {}).get(variant, []))
        lines.append("| " + " | ".join([
            f"`{variant}`" + (" (earlier recipe)" if dp_diffs else ""), _epsilon_cell(eps),
            _num(dp.get("sigma"), "{:.4g}"),
            str(dp.get("batch_size")), str(dp.get("steps")),
            training_cell(dp),
            sampler_label(_sampler_of(dp)), _pct(dp.get("acc_logreg")), _pct(dp.get("acc_mlp")),
            _pct(dp.get("acc_cnn")),
            f"≥ {TARGETS[variant]:g}%" if variant in TARGETS else "",
            "–" if dp_diffs else spread_cell(recipe_runs[variant]),
            _pct(dp.get("agreement")),
            _num(dp.get("fd_classifier_test")), control]) + " |")
    lines += ["", "ε comes from each run's privacy.json (the accountant over the steps that ran), rounded up at the "
              "fifth decimal. *Training*: wall time, and the noised images (B × K × steps) per second it ran at; "
              "the presets were measured in different sessions, on machines whose speed differs by up to 3x "
              "(`mnist_eps10_cpu`'s recipe trained at 543 noised images/s in 21.4 min on the fastest, at 192/s "
              "in 60.4 min on an AVX2-only AMD EPYC, and at 225/s in 51.6 min there after the engine stopped "
              "copying weights on 2026-12-08; docs/performance.md), so compare minutes only at a similar "
              "rate. Each cell shows "
              "the newest row whose recipe (batch, steps, K, lr, net, noise levels) is what the preset composes "
              "now. *Every run of the recipe*: the CNN of each DP run of that recipe at the same ε, drawn with the "
              "same sampler and scored as above, in this study's rows"
              + (" and in those of the studies it names under `more_runs` (other training seeds: "
                 + ", ".join(f"`{v}`: {', '.join(n)}" for v, n in study.more_runs.items()) + ")"
                 if study.more_runs else "")
              + "; a single run moves by its training seed, so the spread says how far to trust one.", ""]
    if stale:
        lines += ["**Earlier recipes.** " + " ".join(stale), ""]
    lines += paper_n_section(study, by_variant, paper_rows or [], recipe_runs)
    grids = [(v, assets / f"{v}_grid.png") for v in study.variants if (assets / f"{v}_grid.png").exists()]
    if grids:
        lines += ["## Samples", "", "One row per class, from the DP run's scored samples (first 10 of each class).", ""]
        lines += [f"**`{v}`**\n\n![{v}]({rel(p)})\n" for v, p in grids]
    lines += ["## Learning curves", "",
              f"CNN accuracy of the DP runs' epoch checkpoints: the downstream protocol's CNN on {curve_n:,} samples "
              f"per checkpoint ({curve_n - curve_n // 5:,} to train, {curve_n // 5:,} held out), tested on the real "
              "test set; fewer samples than the results table, so lower accuracies. Minutes: training wall time × "
              "step / total steps, on the machine that trained the preset (its rate is in the results table); "
              "noised images (B × K × step) compare the presets across machines.", ""]
    png = assets / "learning_curve.png"
    if png.exists() and any(curves.values()):
        lines += [f"![learning curve]({rel(png)})", ""]
    if any(curves.values()):
        lines += ["| preset | step | noised images | minutes | CNN | agreement |", "|---|---|---|---|---|---|"]
        for name, points in curves.items():
            k = (per_step or {}).get(name)
            lines += [f"| `{name}` | {p['step']} | {_thousands(p['step'] * k) if k else '–'} | {p['minutes']:.1f} | "
                      f"{_pct(p.get('acc_cnn'))} | {_pct(p.get('agreement'))} |" for p in points]
        lines.append("")
    else:
        lines += ["No curve yet.", ""]
    lines += ["## Commands", "", f"All of it (resumable): `{command}`. Per preset it runs:", "", "```",
              *planned_commands(study), "```", "",
              "then scores the samples (`dpdm.experiments.study.score`) and the epoch checkpoints "
              "(`dpdm.experiments.cpu_results.learning_curve`). Study notes: docs/recipes.md.", ""]
    return "\n".join(lines)


def paper_n_row(shown: dict | None, paper_rows: list[dict]) -> dict | None:
    """The newest paper-n row of the run behind a shown row (same dir and training wall time: the dir may
    have held an earlier training), or None."""
    if shown is None:
        return None
    same = [r for r in paper_rows if of_run(r, shown.get("run_dir"), shown.get("train_wall_s"))]
    return same[-1] if same else None


def paper_n_section(study: Study, by_variant: dict, paper_rows: list[dict],
                    runs: dict[str, list[dict]] | None = None) -> list[str]:
    """The shown DP runs scored at the paper's n: what the CPU-sized n of the results table costs. `runs`
    (per variant, every run of its recipe, as the results table's spread column counts them) adds the CNN of
    each of those runs that was also scored at the paper's n."""
    lines = ["## At the paper's n", "",
             "The same DP runs (the results table's rows), scored as the paper scores: 70,000 samples drawn with "
             "the preset's sampler (the first 12,000 are the table's), LogReg / MLP / CNN trained on 60,000 for "
             "up to 50 epochs without early stopping, the epoch chosen on the other 10,000, accuracy on the real "
             "test set. Sampling more is post-processing: the same ε. `bash scripts/study/paper_protocol.sh "
             "<preset> <run dir>` scores one run (half an hour on 2 cores). The table's n is a CPU budget: its CNN "
             "is neither a lower nor an upper bound on this one (docs/recipes.md, \"Scoring at the paper's n\"). "
             "*Every run*: the CNN of each run in the results table's spread column that was scored this way too.",
             "",
             "| preset | LogReg | MLP | CNN | CNN at 12,000 (table) | CNN, every run at the paper's n (mean ± sd) | "
             "agreement | fd_classifier | sampling 70,000 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant in study.variants:
        shown = by_variant.get(variant, {}).get(DP, (None, []))[0]
        row = paper_n_row(shown, paper_rows)
        scored = [p for p in (paper_n_row(r, paper_rows) for r in (runs or {}).get(variant, [])) if p]
        if row is None:
            lines.append(f"| `{variant}` | not measured | | | {_pct((shown or {}).get('acc_cnn'))} | "
                         f"{spread_cell(scored) if scored else ''} | | | |")
            continue
        wall = row.get("sample_wall_s")
        lines.append("| " + " | ".join([
            f"`{variant}`", _pct(row.get("acc_logreg")), _pct(row.get("acc_mlp")), _pct(row.get("acc_cnn")),
            _pct(shown.get("acc_cnn")), spread_cell(scored or [row]), _pct(row.get("agreement")),
            _num(row.get("fd_classifier_test")), "–" if wall is None else f"{wall / 60:.1f} min"]) + " |")
    return lines + [""]


def planned_commands(study: Study, variants: list[str] | None = None) -> list[str]:
    """The training and sampling commands behind each preset of the study (for the page and --dry-run)."""
    out = []
    for variant, overrides in study.variants.items():
        if variants and variant not in variants:
            continue
        base = f"runs/study/{study.name}/{variant}"
        for mode, extra in ((DP, []), (NONPRIVATE, ["privacy=none"])):
            out.append(f"dpdm-train {' '.join([*study.train, *overrides, *extra])} hydra.run.dir={base}/{mode}")
            out.append(f"dpdm-sample ckpt={base}/{mode}/checkpoints/last.ckpt n={study.sample_n} "
                       f"out={base}/{mode}/samples_preset sampler=<the preset's sampler: ...>")
    return out


def reproduce_cpu(*, study_file: Path = STUDY_FILE, variants: list[str] | None = None,
                  modes: list[str] | None = None, runs_dir: Path = Path("runs/study"),
                  results_dir: Path = Path("results/study"), page: Path = Path("results/cpu.md"),
                  curve_n: int = 2000, report_only: bool = False, data_dir: str | None = None,
                  progress=print) -> Path:
    """Run (unless report_only) and render results/cpu.md; returns the page."""
    import os

    from dpdm.evaluation.protocol import Evaluator

    study = Study.load(study_file)
    # Read (and checked) before any training: a study named under more_runs that scores otherwise is a
    # mistake in the study file, better told now than after an hour of training.
    more_rows = more_runs_rows(study, study_file.parent, results_dir)
    # The curves live beside the rows in results/, so the page keeps them when runs/ is gone (a fresh
    # checkout): a run's own learning_curve.json is newer when it exists.
    curves_path = results_dir / f"{study.name}_curves.json"
    if not report_only:
        run_study(study, runs_dir=runs_dir, results_dir=results_dir, variants=variants, modes=modes,
                  downstream=True, data_dir=data_dir, progress=progress,
                  on_moved=lambda old, new: follow_moved_run(curves_path, old, new))
    rows_path = results_dir / f"{study.name}.jsonl"
    rows = read_rows(rows_path) if rows_path.exists() else []
    assets = page.parent / page.stem
    kept = read_json(curves_path) or {}
    curves: dict[str, list[dict]] = {}
    evaluators: dict = {}   # one per dataset
    picked = rows_of_current_recipes(study, rows)
    dp_runs = {v: shown_dp_run(picked.get(v, {}), runs_dir / study.name / v / DP) for v in study.variants}
    for variant in study.variants:
        run_dir = dp_runs[variant]
        if not (run_dir / "summary.json").exists():
            if points := kept_points(kept.get(variant), run_dir):
                curves[variant] = points
            continue
        if report_only or (variants is not None and variant not in variants):
            # Not (re)computed in this call: the page still shows the stored curve.
            stored = (read_json(run_dir / CURVE_FILE) or {}).get("points") or kept_points(kept.get(variant), run_dir)
            curves[variant] = stored or []
        else:
            dataset = run_dataset(run_dir)
            if dataset not in evaluators:
                evaluators[dataset] = Evaluator(dataset=dataset, settings=curve_settings(study.evaluation),
                                                data_dir=data_dir or os.environ.get("DPDM_DATA_DIR", "data"))
            spec = (configured_sampler(study, variant) if study.samplers.get("preset") == CONFIG_SAMPLER
                    else None)
            curves[variant] = learning_curve(run_dir, evaluator=evaluators[dataset], n=curve_n, sampler=spec,
                                             progress=progress)
        grid = run_dir / "samples_preset" / "grid.png"
        if grid.exists():
            assets.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, assets / f"{variant}_grid.png")
    for variant, points in curves.items():
        entry = kept.get(variant) or {}
        if points and (entry.get("run_dir"), entry.get("points")) != (str(dp_runs[variant]), points):
            kept[variant] = keep_points(entry, dp_runs[variant], points)
    if kept:
        write_json_atomic(curves_path, kept)
    # A curve is the shown DP row's run (dp_runs), so that row's B × K turns its steps into noised images.
    per_step = {v: images_per_step(picked.get(v, {}).get(DP, (None, []))[0]) for v in curves}
    plot_learning_curves(curves, assets / "learning_curve.png", per_step)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_page(study, rows, curves, assets=assets, page=page, curve_n=curve_n,
                                command="dpdm-reproduce cpu", more_rows=more_rows, per_step=per_step,
                                paper_rows=read_rows(results_dir / PAPER_N_ROWS)
                                if (results_dir / PAPER_N_ROWS).exists() else []))
    progress(f"wrote {page}")
    return page

