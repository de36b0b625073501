"""results/cpu.md: the page from a study's rows and run dirs, the epoch checkpoints of a learning curve,
and `dpdm-reproduce cpu --dry-run` listing what it would run. The real train → sample → score path of
the same study code is covered end to end in test_study.py (including a learning curve)."""
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from dpdm.experiments.cpu_results import epoch_checkpoints, reproduce_cpu
from dpdm.experiments.study import Study, preset_recipe
from tests.helpers import BIN, REPO


def _row(variant, mode, **kw):
    base = {"study": "cpu_mini", "variant": variant, "mode": mode, "sampler": "preset", "batch_size": 1024,
            "steps": 340, "K": 1, "noised_images": 348160, "train_wall_s": 2700.0, "machine": "test cpu"}
    return {**base, **kw}


def _fake_run(run_dir: Path, steps=(58, 116), total=120, wall=600.0):
    (run_dir / "checkpoints").mkdir(parents=True)
    for e, s in enumerate(steps):
        (run_dir / "checkpoints" / f"epoch={e}-step={s}.ckpt").write_bytes(b"x")
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run_dir / "summary.json").write_text(json.dumps({"optimizer_steps": total, "wall_time_s": wall}))
    (run_dir / "config.yaml").write_text("data: {name: mnist}\n")


def test_epoch_checkpoints_are_ordered_by_step_and_end_with_the_last(tmp_path):
    _fake_run(tmp_path / "run", steps=(116, 58))
    got = epoch_checkpoints(tmp_path / "run")
    assert [s for s, _ in got] == [58, 116, 120]
    assert got[-1][1].name == "last.ckpt" and got[0][1].name == "epoch=1-step=58.ckpt"


def test_page_has_each_preset_with_eps_accuracies_target_control_and_curve(tmp_path):
    study = tmp_path / "cpu_mini.yaml"
    study.write_text(yaml.safe_dump({
        "train": [], "controls": True, "sample": {"n": 12000}, "samplers": {"preset": []},
        "evaluation": {"downstream": {"val_size": 2000, "max_epochs": 30, "patience": 5}},
        "variants": {"mnist_eps10_cpu": ["experiment=mnist_eps10_cpu"],
                     "mnist_eps1_cpu": ["experiment=mnist_eps1_cpu"]}}))
    results = tmp_path / "results"
    (results / "study").mkdir(parents=True)
    heun = {"name": "edm_heun", "num_steps": 14, "sigma_min": 0.05, "guidance": 0.0}
    rows = [_row("mnist_eps10_cpu", "dp", epsilon=9.9999816, sigma=0.58, acc_logreg=0.81, acc_mlp=0.86, acc_cnn=0.923,
                 agreement=0.97, fd_classifier_test=120.5, sampler_spec=heun),
            _row("mnist_eps10_cpu", "nonprivate", epsilon=None, acc_cnn=0.975, agreement=0.995,
                 fd_classifier_test=40.0)]
    (results / "study" / "cpu_mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "runs" / "cpu_mini" / "mnist_eps10_cpu" / "dp"
    _fake_run(run)
    (run / "learning_curve.json").write_text(json.dumps({"points": [
        {"step": 58, "minutes": 4.8, "n": 2000, "acc_cnn": 0.5, "agreement": 0.6},
        {"step": 120, "minutes": 10.0, "n": 2000, "acc_cnn": 0.9, "agreement": 0.95}]}))
    page = reproduce_cpu(study_file=study, runs_dir=tmp_path / "runs", results_dir=results / "study",
                         page=results / "cpu.md", report_only=True, progress=lambda *a: None)
    text = page.read_text()
    line = next(x for x in text.splitlines() if x.startswith("| `mnist_eps10_cpu`"))
    for cell in ("9.99999", "0.58", "1024", "340", "45.0 min (129/s)", "edm_heun 14, σ_min 0.05, w 0", "81.0%", "86.0%",
                 "92.3%", "≥ 90%", "97.0%", "120.5",
                 "97.5% / 99.5% / 40.0"):   # 45.0 min: 2700 s; 129/s: 348,160 noised images / 2700 s
        assert cell in line, (cell, line)
    assert "| `mnist_eps10_cpu` | 10.0000" not in text   # ε rounded up at the 5th decimal, not shown as 10
    assert "| `mnist_eps1_cpu` | not run |" in text
    assert "10,000 train LogReg / MLP / CNN" in text and "2,000 held-out" in text   # the n actually used
    # the curve's points; 123k: step 120 × the row's 348,160 / 340 = 1,024 noised images per step
    assert "| `mnist_eps10_cpu` | 120 | 123k | 10.0 | 90.0% | 95.0% |" in text
    assert (results / "cpu" / "learning_curve.png").stat().st_size > 1000
    assert "![learning curve](cpu/learning_curve.png)" in text
    assert "dpdm-train experiment=mnist_eps10_cpu privacy=none" in text                 # the control's command


def test_the_curve_is_also_drawn_against_noised_images_where_the_row_says_b_times_k(tmp_path):
    """Minutes mix machines of different speed; noised images (B × K × step) do not. The second panel needs
    the row's B × K: 696,320 images over 680 steps is 1,024 per step (B = 1024, K = 1); K = 2 at B = 512
    gives the same; a row without them gets no second panel rather than a guessed one."""
    from PIL import Image

    from dpdm.experiments.cpu_results import images_per_step, plot_learning_curves

    pytest.importorskip("matplotlib")

    assert images_per_step({"noised_images": 696320, "steps": 680}) == 1024
    assert images_per_step({"noised_images": 512 * 2 * 680, "steps": 680, "K": 2}) == 1024
    assert images_per_step({"steps": 680}) is None and images_per_step(None) is None
    one = plot_learning_curves({"mnist_eps10_cpu": _curve(0.9)}, tmp_path / "one.png", {"mnist_eps10_cpu": None})
    two = plot_learning_curves({"mnist_eps10_cpu": _curve(0.9)}, tmp_path / "two.png", {"mnist_eps10_cpu": 1024.0})
    width = {p.name: Image.open(p).size[0] for p in (one, two)}
    assert width["two.png"] > 1.6 * width["one.png"], width


def test_dry_run_lists_every_preset_and_its_control():
    proc = subprocess.run([str(BIN / "dpdm-reproduce"), "cpu", "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for preset in ("mnist_eps10_cpu", "mnist_eps1_cpu", "fmnist_eps10_cpu"):
        assert f"dpdm-train experiment={preset} hydra.run.dir=" in proc.stdout
        assert f"dpdm-train experiment={preset} privacy=none hydra.run.dir=" in proc.stdout


def _two_preset_study(tmp_path):
    study = tmp_path / "cpu_mini.yaml"
    study.write_text(yaml.safe_dump({
        "train": [], "controls": False, "sample": {"n": 12000}, "samplers": {"preset": []},
        "variants": {"mnist_eps10_cpu": ["experiment=mnist_eps10_cpu"],
                     "mnist_eps1_cpu": ["experiment=mnist_eps1_cpu"]}}))
    (tmp_path / "results" / "study").mkdir(parents=True)
    return study


def _curve(acc):
    return [{"step": 58, "minutes": 4.8, "n": 2000, "acc_cnn": acc / 2, "agreement": 0.5},
            {"step": 120, "minutes": 10.0, "n": 2000, "acc_cnn": acc, "agreement": 0.9}]


def _curve_lines(page: Path) -> list[str]:
    return [x for x in page.read_text().splitlines() if x.startswith("| `mnist_eps") and x.count("|") == 7]


def test_curves_stay_on_the_page_when_the_run_dirs_are_gone(tmp_path):
    """results/ keeps each preset's curve (<study>_curves.json): a fresh checkout has no runs/, and the
    page must not lose a curve it showed."""
    study, results = _two_preset_study(tmp_path), tmp_path / "results"
    run = tmp_path / "runs" / "cpu_mini" / "mnist_eps10_cpu" / "dp"
    _fake_run(run)
    (run / "learning_curve.json").write_text(json.dumps({"points": _curve(0.88)}))
    kwargs = dict(study_file=study, runs_dir=tmp_path / "runs", results_dir=results / "study",
                  page=results / "cpu.md", report_only=True, progress=lambda *a: None)
    reproduce_cpu(**kwargs)
    kept = json.loads((results / "study" / "cpu_mini_curves.json").read_text())
    assert kept["mnist_eps10_cpu"]["points"] == _curve(0.88) and "mnist_eps1_cpu" not in kept
    before = _curve_lines(results / "cpu.md")
    assert len(before) == 2 and "88.0%" in before[1]

    import shutil
    shutil.rmtree(tmp_path / "runs")
    reproduce_cpu(**kwargs)
    assert _curve_lines(results / "cpu.md") == before
    assert (results / "cpu" / "learning_curve.png").stat().st_size > 1000


def test_computing_one_presets_curve_keeps_the_others_stored_curve(tmp_path, monkeypatch):
    """`dpdm-reproduce cpu --preset X` (re)computes X's curve only; every other preset's stored curve stays
    on the page and in results/."""
    from dpdm.experiments import cpu_results

    study, results = _two_preset_study(tmp_path), tmp_path / "results"
    runs = tmp_path / "runs" / "cpu_mini"
    for variant in ("mnist_eps10_cpu", "mnist_eps1_cpu"):
        _fake_run(runs / variant / "dp")
    (runs / "mnist_eps10_cpu" / "dp" / "learning_curve.json").write_text(json.dumps({"points": _curve(0.88)}))
    computed = []
    monkeypatch.setattr(cpu_results, "run_study", lambda *a, **k: None)
    monkeypatch.setattr("dpdm.evaluation.protocol.Evaluator", lambda **k: None)

    def fake_curve(run_dir, **kw):
        computed.append(run_dir.parent.name)
        return _curve(0.77)

    monkeypatch.setattr(cpu_results, "learning_curve", fake_curve)
    reproduce_cpu(study_file=study, variants=["mnist_eps1_cpu"], runs_dir=tmp_path / "runs",
                  results_dir=results / "study", page=results / "cpu.md", progress=lambda *a: None)
    assert computed == ["mnist_eps1_cpu"]
    lines = _curve_lines(results / "cpu.md")
    assert [x.split("|")[1].strip() for x in lines] == ["`mnist_eps10_cpu`"] * 2 + ["`mnist_eps1_cpu`"] * 2
    assert "88.0%" in lines[1] and "77.0%" in lines[3]
    kept = json.loads((results / "study" / "cpu_mini_curves.json").read_text())
    assert kept["mnist_eps1_cpu"]["points"] == _curve(0.77) and kept["mnist_eps10_cpu"]["points"] == _curve(0.88)


def test_the_paper_n_section_shows_the_score_of_the_shown_runs_own_samples(tmp_path):
    """A paper-n row is shown beside the table's CNN only for the run the table shows (same dir and training
    wall time); a row of an earlier training in the same dir is not that run's."""
    study = _two_preset_study(tmp_path)
    results = tmp_path / "results"
    loaded = Study.load(study)
    runs = {v: f"runs/study/cpu_mini/{v}/dp" for v in ("mnist_eps10_cpu", "mnist_eps1_cpu")}
    rows = [_row(v, "dp", **preset_recipe(loaded, v), run_dir=runs[v], acc_cnn=cnn)
            for v, cnn in (("mnist_eps10_cpu", 0.953), ("mnist_eps1_cpu", 0.90))]
    (results / "study" / "cpu_mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paper = [{"preset": "mnist_eps10_cpu", "run_dir": runs["mnist_eps10_cpu"], "train_wall_s": 2700.0,
              "acc_logreg": 0.9, "acc_mlp": 0.92, "acc_cnn": 0.968, "agreement": 0.88,
              "fd_classifier_test": 45.31, "sample_wall_s": 630},
             {"preset": "mnist_eps1_cpu", "run_dir": runs["mnist_eps1_cpu"], "train_wall_s": 1200.0,  # another run
              "acc_logreg": 0.5, "acc_mlp": 0.5, "acc_cnn": 0.5}]
    (results / "study" / "paper_protocol.jsonl").write_text("".join(json.dumps(r) + "\n" for r in paper))
    page = reproduce_cpu(study_file=study, runs_dir=tmp_path / "runs", results_dir=results / "study",
                         page=results / "cpu.md", report_only=True, progress=lambda *a: None)
    section = page.read_text().split("## At the paper's n")[1].split("\n## ")[0]
    assert "| `mnist_eps10_cpu` | 90.0% | 92.0% | 96.8% | 95.3% | one run | 88.0% | 45.3 | 10.5 min |" in section
    assert "| `mnist_eps1_cpu` | not measured | | | 90.0% |" in section and "50.0%" not in section


def test_the_page_shows_the_row_of_the_recipe_the_preset_composes_now(tmp_path):
    """A preset changed back to an earlier recipe shows that recipe's row, not the newer row of the other;
    a preset whose every row is of another recipe shows the newest, marked, with what differs."""
    study = _two_preset_study(tmp_path)
    results = tmp_path / "results"
    # The presets' recipes as conf/ composes them now, so the test follows a preset when it moves on.
    loaded = Study.load(study)
    recipe = preset_recipe(loaded, "mnist_eps10_cpu")
    other = {**recipe, "batch_size": recipe["batch_size"] + 512, "steps": 280}
    rows = [_row("mnist_eps10_cpu", "dp", **recipe, acc_cnn=0.926),                 # the preset's recipe
            _row("mnist_eps10_cpu", "dp", **other, acc_cnn=0.80),                  # newer, another recipe
            _row("mnist_eps1_cpu", "dp", **{**preset_recipe(loaded, "mnist_eps1_cpu"), "lr": 5e-4},
                 acc_cnn=0.70)]                                                      # only another recipe (lr)
    (results / "study" / "cpu_mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = reproduce_cpu(study_file=study, runs_dir=tmp_path / "runs", results_dir=results / "study",
                         page=results / "cpu.md", report_only=True, progress=lambda *a: None)
    lines = page.read_text().splitlines()
    eps10 = next(x for x in lines if x.startswith("| `mnist_eps10_cpu`"))
    assert "92.6%" in eps10 and "80.0%" not in eps10 and "earlier recipe" not in eps10
    eps1 = next(x for x in lines if x.startswith("| `mnist_eps1_cpu`"))
    assert eps1.startswith("| `mnist_eps1_cpu` (earlier recipe) |") and "70.0%" in eps1
    note = next(x for x in lines if x.startswith("**Earlier recipes.**"))
    assert "`mnist_eps1_cpu` dp" in note and "lr differ" in note and "mnist_eps10_cpu" not in note


def test_a_preset_changed_back_shows_the_curve_and_grid_of_the_run_its_row_names(tmp_path):
    """When a preset returns to an earlier recipe, its row names the run moved aside for that recipe
    (dp.old1); the curve and the grid on the page must come from that run, not from the newer run of
    another recipe still sitting in dp/."""
    study = _two_preset_study(tmp_path)
    results = tmp_path / "results"
    recipe = preset_recipe(Study.load(study), "mnist_eps10_cpu")
    other = {**recipe, "lr": recipe["lr"] * 3}
    base = tmp_path / "runs" / "cpu_mini" / "mnist_eps10_cpu"
    for name, acc, pixel in (("dp.old1", 0.88, b"old"), ("dp", 0.66, b"new")):
        _fake_run(base / name)
        (base / name / "learning_curve.json").write_text(json.dumps({"points": _curve(acc)}))
        (base / name / "samples_preset").mkdir()
        (base / name / "samples_preset" / "grid.png").write_bytes(pixel)
    rows = [_row("mnist_eps10_cpu", "dp", **recipe, acc_cnn=0.926, run_dir=str(base / "dp.old1")),
            _row("mnist_eps10_cpu", "dp", **other, acc_cnn=0.80, run_dir=str(base / "dp"))]
    (results / "study" / "cpu_mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = reproduce_cpu(study_file=study, runs_dir=tmp_path / "runs", results_dir=results / "study",
                         page=results / "cpu.md", report_only=True, progress=lambda *a: None)
    lines = _curve_lines(page)
    assert len(lines) == 2 and "88.0%" in lines[1]
    assert (results / "cpu" / "mnist_eps10_cpu_grid.png").read_bytes() == b"old"
    kept = json.loads((results / "study" / "cpu_mini_curves.json").read_text())
    assert kept["mnist_eps10_cpu"] == {"run_dir": str(base / "dp.old1"), "points": _curve(0.88)}


def test_a_fresh_checkout_shows_the_stored_curve_of_the_run_the_current_row_names(tmp_path):
    """A preset tried on another recipe and changed back, in a checkout whose runs/ holds only the tried
    run (dp/): the page shows the curve stored for the run the current recipe's row names, not dp/'s."""
    study = _two_preset_study(tmp_path)
    results = tmp_path / "results"
    recipe = preset_recipe(Study.load(study), "mnist_eps10_cpu")
    other = {**recipe, "lr": recipe["lr"] * 3}
    base = tmp_path / "runs" / "cpu_mini" / "mnist_eps10_cpu"
    old, tried = base / "dp.old1", base / "dp"
    curves_file = results / "study" / "cpu_mini_curves.json"
    curves_file.write_text(json.dumps({"mnist_eps10_cpu": {"run_dir": str(old), "points": _curve(0.88)}}))
    _fake_run(tried)
    (tried / "learning_curve.json").write_text(json.dumps({"points": _curve(0.66)}))
    rows_file = results / "study" / "cpu_mini.jsonl"
    kwargs = dict(study_file=study, runs_dir=tmp_path / "runs", results_dir=results / "study",
                  page=results / "cpu.md", report_only=True, progress=lambda *a: None)

    # Only the tried recipe has a row: the page shows it, marked, with its run's curve; the old curve is kept.
    rows_file.write_text(json.dumps(_row("mnist_eps10_cpu", "dp", **other, acc_cnn=0.80, run_dir=str(tried))) + "\n")
    lines = _curve_lines(reproduce_cpu(**kwargs))
    assert len(lines) == 2 and "66.0%" in lines[1]
    assert json.loads(curves_file.read_text())["mnist_eps10_cpu"] == {
        "run_dir": str(tried), "points": _curve(0.66), "other_runs": {str(old): _curve(0.88)}}

    # The current recipe's row (its run dir gone) comes first in the file: its stored curve is back.
    rows_file.write_text(json.dumps(_row("mnist_eps10_cpu", "dp", **recipe, acc_cnn=0.926, run_dir=str(old)))
                         + "\n" + rows_file.read_text())
    lines = _curve_lines(reproduce_cpu(**kwargs))
    assert len(lines) == 2 and "88.0%" in lines[1] and "66.0%" not in "".join(lines)
    assert json.loads(curves_file.read_text())["mnist_eps10_cpu"] == {
        "run_dir": str(old), "points": _curve(0.88), "other_runs": {str(tried): _curve(0.66)}}


def test_a_stored_curve_follows_its_run_when_another_run_is_trained_in_its_dir(tmp_path, monkeypatch):
    """The study moves a run (or the rows of an absent one) from dp to dp.old1 before training dp again:
    the curve stored for dp must follow, so the new run's curve does not overwrite it and a preset
    changed back still shows its own."""
    from dpdm.experiments import cpu_results

    study, results = _two_preset_study(tmp_path), tmp_path / "results"
    dp = tmp_path / "runs" / "cpu_mini" / "mnist_eps1_cpu" / "dp"
    curves_path = results / "study" / "cpu_mini_curves.json"
    curves_path.write_text(json.dumps({
        "mnist_eps1_cpu": {"run_dir": str(dp), "points": _curve(0.80),
                           "other_runs": {str(dp.with_name("dp.old9")): _curve(0.70)}},
        "mnist_eps10_cpu": {"run_dir": "elsewhere", "points": _curve(0.90), "other_runs": {str(dp): _curve(0.6)}}}))

    def fake_study(*a, on_moved, **k):   # what train_run does: tell of the move, then train into dp
        on_moved(dp, dp.with_name("dp.old1"))
        _fake_run(dp)

    monkeypatch.setattr(cpu_results, "run_study", fake_study)
    monkeypatch.setattr("dpdm.evaluation.protocol.Evaluator", lambda **k: None)
    monkeypatch.setattr(cpu_results, "learning_curve", lambda run_dir, **kw: _curve(0.95))
    reproduce_cpu(study_file=study, variants=["mnist_eps1_cpu"], runs_dir=tmp_path / "runs",
                  results_dir=results / "study", page=results / "cpu.md", progress=lambda *a: None)
    kept = json.loads(curves_path.read_text())
    assert kept["mnist_eps1_cpu"] == {"run_dir": str(dp), "points": _curve(0.95), "other_runs": {
        str(dp.with_name("dp.old9")): _curve(0.70), str(dp.with_name("dp.old1")): _curve(0.80)}}
    assert kept["mnist_eps10_cpu"]["other_runs"] == {str(dp.with_name("dp.old1")): _curve(0.6)}
    # A move that no stored curve names leaves the file as it is.
    before = curves_path.stat().st_mtime_ns
    cpu_results.follow_moved_run(curves_path, dp.with_name("elsewhere"), dp.with_name("elsewhere.old1"))
    assert curves_path.stat().st_mtime_ns == before and json.loads(curves_path.read_text()) == kept


def _study_with_more_runs(tmp_path, seeds_evaluation):
    scoring = {"sample": {"n": 12000}, "samplers": {"preset": []},
               "evaluation": {"downstream": {"val_size": 2000, "max_epochs": 30, "patience": 5}}}
    study = tmp_path / "cpu_mini.yaml"
    study.write_text(yaml.safe_dump({**scoring, "train": [], "controls": False,
                                     "more_runs": {"mnist_eps10_cpu": ["seeds_mini"]},
                                     "variants": {"mnist_eps10_cpu": ["experiment=mnist_eps10_cpu"]}}))
    (tmp_path / "seeds_mini.yaml").write_text(yaml.safe_dump({
        **scoring, "evaluation": seeds_evaluation, "train": ["experiment=mnist_eps10_cpu"], "controls": False,
        "variants": {"seed1": ["seed=1"]}}))
    (tmp_path / "results" / "study").mkdir(parents=True)
    return study


HEUN = {"name": "edm_heun", "num_steps": 14, "sigma_min": 0.05, "guidance": 0.0}


def _recipe_rows(study):
    """The preset's recipe, and a row's fields for a DP run of it at ε = 10 drawn with HEUN."""
    recipe = preset_recipe(Study.load(study), "mnist_eps10_cpu")
    return recipe, {**recipe, "sampler_spec": HEUN, "target_epsilon": 10.0}


def _page_of(tmp_path, study, own, seeds):
    """results/cpu.md (report only) from the preset's own rows and those of its more_runs study."""
    results = tmp_path / "results" / "study"
    for name, rows in (("cpu_mini", own), ("seeds_mini", seeds)):
        (results / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = reproduce_cpu(study_file=study, runs_dir=tmp_path / "runs", results_dir=results,
                         page=tmp_path / "results" / "cpu.md", report_only=True, progress=lambda *a: None)
    return page.read_text()


def test_the_page_shows_every_run_of_the_presets_recipe_from_the_studies_it_names(tmp_path):
    """The spread column lists the preset's own run and the other studies' runs of the same recipe, ε and
    sampler (the newest row per run), and leaves out other recipes, samplers, budgets and controls."""
    study = _study_with_more_runs(tmp_path, {"downstream": {"val_size": 2000, "max_epochs": 30, "patience": 5}})
    recipe, same = _recipe_rows(study)
    own = [_row("mnist_eps10_cpu", "dp", **same, acc_cnn=0.926, run_dir="runs/a")]
    seeds = [_row("seed1", "dp", **same, acc_cnn=0.70, run_dir="runs/b"),           # rescored below
             _row("seed1", "dp", **same, acc_cnn=0.88, run_dir="runs/c"),
             _row("seed1", "dp", **same, acc_cnn=0.91, run_dir="runs/b"),           # b's newest row
             _row("lr", "dp", **{**same, "lr": recipe["lr"] * 3}, acc_cnn=0.50, run_dir="runs/d"),
             _row("w2", "dp", **{**same, "sampler_spec": {**HEUN, "guidance": 2.0}}, acc_cnn=0.40, run_dir="runs/e"),
             _row("eps1", "dp", **{**same, "target_epsilon": 1.0}, acc_cnn=0.30, run_dir="runs/f"),
             _row("seed1", "nonprivate", **same, acc_cnn=0.99, run_dir="runs/g")]
    text = _page_of(tmp_path, study, own, seeds)
    line = next(x for x in text.splitlines() if x.startswith("| `mnist_eps10_cpu`"))
    # 92.6, 88.0 and 91.0: mean 90.53, sample sd sqrt(((2.067)² + (2.533)² + (0.467)²) / 2) = 2.34
    assert "| 92.6 / 88.0 / 91.0% (90.5 ± 2.3, 3 runs) |" in line, line
    assert "`mnist_eps10_cpu`: seeds_mini" in text


def test_the_paper_n_section_lists_every_run_of_the_recipe_scored_at_the_papers_n(tmp_path):
    """The paper-n spread counts the runs the results table's spread counts (the preset's own and its
    more_runs studies' runs of the same recipe), each by its newest paper-n row; a run of another recipe, or
    an earlier training in a run's dir (another wall time), is left out."""
    study = _study_with_more_runs(tmp_path, {"downstream": {"val_size": 2000, "max_epochs": 30, "patience": 5}})
    recipe, same = _recipe_rows(study)
    own = [_row("mnist_eps10_cpu", "dp", **same, acc_cnn=0.95, run_dir="runs/a")]
    seeds = [_row("seed1", "dp", **same, acc_cnn=0.94, run_dir="runs/c"),
             _row("seed1", "dp", **same, acc_cnn=0.93, run_dir="runs/b"),
             _row("lr", "dp", **{**same, "lr": recipe["lr"] * 3}, acc_cnn=0.90, run_dir="runs/d")]
    paper = [{"run_dir": "runs/a", "train_wall_s": 2700.0, "acc_cnn": 0.96, "sample_wall_s": 600},
             {"run_dir": "runs/c", "train_wall_s": 2700.0, "acc_cnn": 0.90},
             {"run_dir": "runs/c", "train_wall_s": 2700.0, "acc_cnn": 0.93},   # c's newest
             {"run_dir": "runs/b", "train_wall_s": 1200.0, "acc_cnn": 0.10},   # an earlier training in b
             {"run_dir": "runs/d", "train_wall_s": 2700.0, "acc_cnn": 0.20}]   # another recipe
    (tmp_path / "results" / "study" / "paper_protocol.jsonl").write_text("".join(json.dumps(r) + "\n" for r in paper))
    section = _page_of(tmp_path, study, own, seeds).split("## At the paper's n")[1].split("\n## ")[0]
    line = next(x for x in section.splitlines() if x.startswith("| `mnist_eps10_cpu`"))
    # 96.0 and 93.0: mean 94.5, sample sd sqrt(2 × 1.5²) = 2.12
    assert "| 96.0% | 95.0% | 96.0 / 93.0% (94.5 ± 2.1, 2 runs) |" in line, line
    assert "10.0%" not in line and "20.0%" not in line


def test_a_study_named_under_more_runs_must_score_the_same_way(tmp_path):
    study = _study_with_more_runs(tmp_path, {"downstream": {"val_size": 500, "max_epochs": 30, "patience": 5}})
    with pytest.raises(ValueError, match="seeds_mini.*name only studies scored the same way"):
        reproduce_cpu(study_file=study, runs_dir=tmp_path / "runs", results_dir=tmp_path / "results" / "study",
                      page=tmp_path / "results" / "cpu.md", report_only=True, progress=lambda *a: None)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"variants": {"a": []}, "more_runs": {"b": ["seeds_mini"]}}))
    with pytest.raises(ValueError, match=r"more_runs names \['b'\], which are not variants"):
        Study.load(bad)
