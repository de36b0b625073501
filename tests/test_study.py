"""dpdm-study end to end, shrunk: a variant and its non-private control are trained, sampled, scored (what it
then does with a trained variant, in `make test-slow`); the rescoring script and the rows it writes."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import BIN, REPO, SHRINK, cli_env


def _tiny_study(tmp_path: Path, *, controls: bool):
    """A one-variant study on the smoke config, run once: (spec, study file, command, env, first run)."""
    spec = {
        "train": [*SHRINK, "callbacks.model_checkpoint.save_top_k=-1",    # every epoch's checkpoint (curve)
                  "sampler.num_steps=2"],                                   # the variants' own sampler: cheap
        "controls": controls,
        "sample": {"n": 20, "batch_size": 20},
        "samplers": {"ddim2": ["sampler=ddim", "sampler.num_steps=2"], "own": "config"},
        "variants": {"shifted": ["noise_levels.log_sigma_shift=1.0"]},
        "evaluation": {"cache_dir": str(tmp_path / "cache"),
                       "real_classifier": {"num_train": 1000, "max_epochs": 1, "lr": 1e-3},
                       "downstream": {"classifiers": ["cnn"], "val_size": 0.2, "max_epochs": 1}},
    }
    study = tmp_path / "tiny_study.yaml"
    study.write_text(yaml.safe_dump(spec))
    env = cli_env()
    cmd = [str(BIN / "dpdm-study"), "run", str(study), "--runs-dir", str(tmp_path / "runs"),
           "--results", str(tmp_path / "results")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return spec, study, cmd, env, proc


def test_study_trains_samples_and_scores_each_variant_with_its_control(tmp_path):
    _, study, cmd, env, proc = _tiny_study(tmp_path, controls=True)
    rows = [json.loads(line) for line in (tmp_path / "results" / "tiny_study.jsonl").read_text().splitlines()]
    assert {(r["variant"], r["mode"], r["sampler"]) for r in rows} == {
        (v, m, s) for v in ["shifted"] for m in ("dp", "nonprivate") for s in ("ddim2", "own")}
    # Each row records the sampler that drew its samples: the listed overrides, or the variant's own.
    from dpdm.experiments.study import Study, configured_sampler

    own = configured_sampler(Study.load(study), "shifted")
    for r in rows:
        assert r["sampler_spec"]["name"] == ("ddim" if r["sampler"] == "ddim2" else own["name"])
        assert r["sampler_spec"]["num_steps"] == (2 if r["sampler"] == "ddim2" else own["num_steps"])
    for r in rows:
        assert 0.0 <= r["agreement"] <= 1.0 and r["fd_classifier_test"] > 0
        assert r["steps"] == 8 and r["noised_images"] == 8 * 100 * 2  # 2 epochs of q = 100/400, K = 2
        assert r["sample_n"] == 20 and r["train_wall_s"] > 0
        dp = r["mode"] == "dp"
        assert (r["epsilon"] is not None and r["epsilon"] <= 10 + 1e-9) if dp else r["epsilon"] is None
        privacy = json.loads((Path(r["run_dir"]) / "privacy.json").read_text())
        assert privacy.get("epsilon") == r["epsilon"]
        assert r["noise"]["log_sigma_shift"] == 1.0  # the variant's override reached dpdm-train
    # The markdown table has one line per (variant, sampler), DP and control side by side.
    assert "| shifted | ddim2 |" in proc.stdout
    # A second run reuses every trained model and sample set: nothing is retrained.
    again = subprocess.run(cmd + ["--variants", "shifted", "--modes", "dp"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "trained already" in again.stdout
    assert "sampled" not in again.stdout and again.stdout.count("scored already") == 2


# What a study does with a variant it trained earlier (~2 min on 2 cores; `make test-slow`): sample it again
# when its configured sampler changes, score it by the downstream protocol, draw its learning curve. The
# default suite keeps the study's run itself (above) and the seed-0 copy of a protocol row (unit tests below).
@pytest.mark.slow
def test_study_resamples_rescores_and_draws_the_learning_curve_of_a_trained_variant(tmp_path):
    spec, study, cmd, env, _ = _tiny_study(tmp_path, controls=False)
    # The variant's configured sampler changes after training: its samples are drawn and scored again
    # with the new one (the old set is kept aside), the listed sampler's are reused, nothing is retrained.
    spec["train"][-1] = "sampler.num_steps=3"
    study.write_text(yaml.safe_dump(spec))
    changed = subprocess.run(cmd + ["--variants", "shifted", "--modes", "dp"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert changed.returncode == 0, changed.stdout[-2000:] + changed.stderr[-3000:]
    assert "trained already" in changed.stdout and changed.stdout.count("sampled 20 with") == 1
    run = tmp_path / "runs" / "tiny_study" / "shifted" / "dp"
    assert (run / "samples_own.old1" / "samples.npz").exists()
    newest = json.loads((tmp_path / "results" / "tiny_study.jsonl").read_text().splitlines()[-1])
    assert newest["sampler"] == "own" and newest["sampler_spec"]["num_steps"] == 3
    assert "sampler.num_steps=3" in " ".join(newest["sampler_overrides"])

    # --downstream scores the same samples again with the paper's classifiers, and the row records the
    # protocol it used: rescore.sh copies such a row as protocol seed 0 only beside seeds of that protocol.
    scored = subprocess.run(cmd + ["--variants", "shifted", "--modes", "dp", "--downstream"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert scored.returncode == 0, scored.stdout[-2000:] + scored.stderr[-3000:]
    assert "sampled 20 with" not in scored.stdout and scored.stdout.count(", CNN ") == 2, scored.stdout
    newest = json.loads((tmp_path / "results" / "tiny_study.jsonl").read_text().splitlines()[-1])
    assert newest["downstream_protocol"] == {"val_size": 0.2, "max_epochs": 1, "batch_size": 128, "lr": 3e-4,
                                             "patience": None, "seed": 0}
    from dpdm.experiments.protocol_seeds import seed_row_from_study

    npz, seeds = run / "samples_own" / "samples.npz", tmp_path / "results" / "t_protocol_seeds.jsonl"
    row, why = seed_row_from_study(npz, "tiny", tmp_path / "results", seeds, {"val_size": 0.2, "max_epochs": 1}, [1])
    assert (row["protocol_seed"], row["acc_cnn"], row["run_dir"]) == (0, newest["acc_cnn"], str(run)), why
    row, why = seed_row_from_study(npz, "tiny", tmp_path / "results", seeds, {"val_size": 2000, "max_epochs": 1}, [1])
    assert row is None and "val_size 0.2 against val_size 2000" in why

    # The learning curve of results/cpu.md: each epoch checkpoint sampled and scored by the downstream CNN.
    from dpdm.evaluation.protocol import EvalSettings, Evaluator
    from dpdm.experiments.cpu_results import learning_curve

    settings = EvalSettings.from_dict({**spec["evaluation"], "reference_splits": ["test"],
                                       "downstream": {"classifiers": ["cnn"], "val_size": 0.2, "max_epochs": 1}})
    evaluator = Evaluator(dataset="mnist", data_dir=REPO / "data", settings=settings)
    points = learning_curve(run, evaluator=evaluator, n=20, batch_size=20, progress=lambda *a: None)
    assert [p["step"] for p in points] == [4, 8]                       # 4 steps per epoch, 2 epochs
    wall = json.loads((run / "summary.json").read_text())["wall_time_s"]
    assert points[1]["minutes"] == pytest.approx(wall / 60) and points[0]["minutes"] == pytest.approx(wall / 120)
    assert all(0.0 <= p["acc_cnn"] <= 1.0 and 0.0 <= p["agreement"] <= 1.0 for p in points)
    assert (run / "curve" / "step_4" / "samples.npz").exists()
    # Computed points are kept: a second call samples nothing new.
    stamp = (run / "curve" / "step_4" / "samples.npz").stat().st_mtime_ns
    assert learning_curve(run, evaluator=evaluator, n=20, batch_size=20, progress=lambda *a: None) == points
    assert (run / "curve" / "step_4" / "samples.npz").stat().st_mtime_ns == stamp
    # Asked for another sampler, the curve redoes every point with it.
    ddim = {"name": "ddim", "num_steps": 2, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "guidance": 0.0}
    redone = learning_curve(run, evaluator=evaluator, n=20, batch_size=20, sampler=ddim, progress=lambda *a: None)
    assert [p["step"] for p in redone] == [4, 8] and all(p["sampler"] == ddim for p in redone)
    assert (run / "curve" / "step_4.old1" / "samples.npz").exists()


def test_sampler_overrides_make_dpdm_sample_compose_exactly_that_sampler():
    """Hydra's own parser is the reference: the overrides of a sampler dict compose back to the same dict,
    for every sampler config shipped and for values the grammar treats specially (inf, floats, ints)."""
    from dpdm.experiments.study import sampler_overrides
    from dpdm.utils.configs import compose, to_plain

    specs = [to_plain(compose("sample", ["ckpt=x", "out=y", f"sampler={p.stem}"]).sampler)
             for p in sorted((REPO / "conf" / "sampler").glob("*.yaml"))]
    specs.append({**specs[0], "guidance": 1.5, "num_steps": 7, "sigma_min": 0.05})
    specs.append({"name": "edm_heun", "num_steps": 14, "sigma_min": 0.05, "sigma_max": 80.0, "rho": 7.0,
                  "guidance": 0.0, "S_churn": 0.0, "S_min": 0.0, "S_max": float("inf"), "S_noise": 1.0})
    for spec in specs:
        got = to_plain(compose("sample", ["ckpt=x", "out=y", *sampler_overrides(spec)]).sampler)
        assert got == spec


def test_unknown_study_key_and_missing_file_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants: {a: []}\nepochs: 3\n")
    for path, msg in ((bad, "unknown keys"), (tmp_path / "none.yaml", "not found")):
        proc = subprocess.run([str(BIN / "dpdm-study"), "run", str(path)], capture_output=True, text=True)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr


def _trained_run(run_dir: Path, overrides: list[str], wall: float) -> None:
    """What dpdm-train leaves in a finished run dir, as far as a study reads it."""
    from omegaconf import OmegaConf

    from dpdm.utils.configs import compose

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(compose("train", [*overrides, "output_dir=x"]),
                                                           resolve=True))
    (run_dir / "summary.json").write_text(json.dumps({"optimizer_steps": 340, "wall_time_s": wall}))


def fake_training(monkeypatch) -> list[list[str]]:
    """Stands in for the dpdm-train a study calls: each call leaves a finished run dir (its wall time
    distinct, so rows of different runs differ) and appends the overrides it was given to the list."""
    from dpdm.experiments import study as study_mod

    trained = []

    def fake_dpdm_train(cmd, log_path):
        run_dir = Path(next(a for a in cmd if a.startswith("hydra.run.dir=")).partition("=")[2])
        overrides = [a for a in cmd[1:] if not a.startswith(("hydra.run.dir=", "+trainer."))]
        _trained_run(run_dir, overrides, wall=100.0 + len(trained))
        trained.append(overrides)
        return 1.0

    monkeypatch.setattr(study_mod, "_run", fake_dpdm_train)
    return trained


def test_a_run_trained_for_another_recipe_is_kept_aside_and_trained_again(tmp_path, monkeypatch):
    """A preset changed after its run was trained (here its batch): the study must not reuse that run,
    nor the row that scored it, and must not delete it either."""
    from dpdm.experiments.study import Study, _scored, recipe_changes, train_run

    trained = fake_training(monkeypatch)
    study = Study(name="s", train=["experiment=fmnist_eps10_cpu"], variants={"v": []}, samplers={"own": "config"})
    run = train_run(study, "v", "dp", tmp_path, progress=lambda *a: None)
    assert len(trained) == 1 and recipe_changes(run, ["experiment=fmnist_eps10_cpu"]) == []
    # Unchanged recipe: reused. A changed sampler or checkpoint schedule changes no weights: reused too.
    study.train += ["sampler.guidance=1", "callbacks.model_checkpoint.every_n_epochs=1"]
    said = []
    assert train_run(study, "v", "dp", tmp_path, progress=said.append) == run and len(trained) == 1
    assert "trained already" in said[0]
    # Another batch size: the old run is moved aside whole and a new one trained in its place.
    study.train += ["data.batch_size=512", "optim.lr=3e-4"]
    said = []
    assert train_run(study, "v", "dp", tmp_path, progress=said.append) == run and len(trained) == 2
    assert "data.batch_size: 1024 → 512" in said[0] and "optim.lr: 0.001 → 0.0003" in said[0]
    assert (tmp_path / "s" / "v" / "dp.old1" / "summary.json").exists()
    # The row that scored the old run names the same directory but not this training run.
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"variant": "v", "mode": "dp", "sampler": "own", "run_dir": str(run),
                                "sample_n": 10, "train_wall_s": 100.0, "acc_cnn": 0.5}) + "\n")
    assert _scored(rows, "v", "dp", "own", run, 10, True, train_wall_s=100.0)
    assert not _scored(rows, "v", "dp", "own", run, 10, True, train_wall_s=101.0)


def test_a_row_names_its_run_by_directory_and_training_wall_time():
    """`of_run` is how every rows reader (study, rescoring seeds, results/cpu.md) tells a run from an
    earlier training in the same directory; a path and its string name the same run."""
    from dpdm.experiments.study import of_run

    row = {"run_dir": "runs/s/v/dp", "train_wall_s": 1234.5}
    assert of_run(row, Path("runs/s/v/dp"), 1234.5) and of_run(row, "runs/s/v/dp", 1234.5)
    assert not of_run(row, Path("runs/s/v/dp"), 1234.6)            # trained again in the same dir
    assert not of_run(row, Path("runs/s/v/dp.old1"), 1234.5)       # moved aside: its rows moved with it
    assert not of_run({"run_dir": "runs/s/v/dp"}, Path("runs/s/v/dp"), 1234.5)   # a row without a wall time


def test_runs_from_before_the_group_renames_are_still_their_recipe(tmp_path):
    """Runs trained before `denoiser`/`noise` became `preconditioning`/`noise_levels` (and before optim
    was a Hydra partial, and lr_schedule existed) store the old layout; the same recipe must not read as
    changed."""
    import yaml as pyyaml

    from dpdm.experiments.study import recipe_changes

    run = tmp_path / "run"
    _trained_run(run, ["experiment=mnist_eps10_cpu"], wall=1.0)
    cfg = pyyaml.safe_load((run / "config.yaml").read_text())
    cfg["denoiser"], cfg["noise"] = cfg.pop("preconditioning"), cfg.pop("noise_levels")
    cfg["optim"] = {k: v for k, v in cfg["optim"].items() if not k.startswith("_")}
    del cfg["lr_schedule"]  # runs from before lr decay existed trained at a constant lr
    del cfg["ema"]["warmup_offset"]  # nor an EMA warm-up offset: they warmed up with (1+t)/(10+t)
    (run / "config.yaml").write_text(pyyaml.safe_dump(cfg))
    assert recipe_changes(run, ["experiment=mnist_eps10_cpu"]) == []
    assert recipe_changes(run, ["experiment=mnist_eps10_cpu", "lr_schedule.kind=cosine",
                                "lr_schedule.final_fraction=0.5"]) == [
        "lr_schedule.final_fraction: 1.0 → 0.5", "lr_schedule.kind: constant → cosine"]
    assert recipe_changes(run, ["experiment=mnist_eps10_cpu", "noise_levels.log_sigma_shift=1.0"]) == [
        "noise_levels.log_sigma_shift: 1.6 → 1.0"]
    assert recipe_changes(run, ["experiment=mnist_eps10_cpu", "ema.warmup_offset=4"]) == [
        "ema.warmup_offset: 10 → 4"]


def test_a_study_file_given_for_a_rows_file_is_told_so(tmp_path, capsys):
    from dpdm.cli.study import main

    study = tmp_path / "s.yaml"
    study.write_text("train: [experiment=quickstart]\nvariants: {a: []}\n")
    with pytest.raises((SystemExit, ValueError)):
        main(["table", str(study)])
    said = capsys.readouterr().err
    assert "s.yaml, line 1, is not a JSON row" in said and "results/study/<study>.jsonl" in said


def test_training_precision_is_part_of_the_recipe(tmp_path):
    """bf16-mixed trains other weights than 32-true: a run of one is not reused for the other, and a row
    of one is not counted as a run of the other's recipe (results/cpu.md's spread column)."""
    from dpdm.experiments.study import Study, preset_recipe, recipe_changes, recipe_differences, run_facts

    run = tmp_path / "run"
    _trained_run(run, ["experiment=fmnist_eps10_cpu"], wall=1.0)
    assert recipe_changes(run, ["experiment=fmnist_eps10_cpu"]) == []
    assert recipe_changes(run, ["experiment=fmnist_eps10_cpu", "trainer.precision=bf16-mixed"]) == [
        "trainer.precision: 32-true → bf16-mixed"]
    row = run_facts(run)
    assert row["precision"] == "32-true"
    study = Study(name="s", train=["experiment=fmnist_eps10_cpu"], samplers={"own": "config"},
                  variants={"fp32": [], "bf16": ["trainer.precision=bf16-mixed"]})
    assert "precision" not in recipe_differences(row, preset_recipe(study, "fp32"))
    assert "precision" in recipe_differences(row, preset_recipe(study, "bf16"))
    # A row from before the field existed is not called different for it.
    del row["precision"]
    assert "precision" not in recipe_differences(row, preset_recipe(study, "bf16"))


def test_a_resumed_runs_row_says_which_calls_its_wall_time_covers(tmp_path):
    """A run resumed from a checkpoint (dpdm-train's summary.json `resumed` block) is scored with its whole
    wall time and the record of its parts; a run trained in one call has no such record."""
    from dpdm.experiments.study import run_facts

    run = tmp_path / "run"
    _trained_run(run, ["experiment=fmnist_eps10_cpu"], wall=1.0)
    assert "train_resumed" not in run_facts(run)
    resumed = {"at_step": 290, "wall_time_s_this_call": 1500.0, "training_s_before": None}
    (run / "summary.json").write_text(json.dumps({"optimizer_steps": 500, "wall_time_s": 1500.0,
                                                  "resumed": resumed}))
    row = run_facts(run)
    assert row["train_wall_s"] == 1500.0 and row["train_resumed"] == resumed


def test_variants_whose_controls_compose_the_same_recipe_share_one_control_run(tmp_path, monkeypatch):
    """privacy=none erases the only difference between an ε = 10 and an ε = 1 preset: their non-private
    controls are one training run, trained once; their DP runs stay separate."""
    from dpdm.experiments.study import Study, train_run

    trained = fake_training(monkeypatch)
    study = Study(name="s", train=["experiment=mnist_eps10_cpu"],
                  variants={"eps10": [], "eps1": ["privacy=eps1"], "wide": ["net.model_channels=40"]},
                  samplers={"own": "config"})
    quiet = lambda *a: None  # noqa: E731
    first = train_run(study, "eps10", "nonprivate", tmp_path, progress=quiet)
    said = []
    assert train_run(study, "eps1", "nonprivate", tmp_path, progress=said.append) == first
    assert len(trained) == 1 and "reuses" in said[0]
    # Another recipe (a wider net) and the DP runs (their σ differ) train their own.
    assert train_run(study, "wide", "nonprivate", tmp_path, progress=quiet) != first
    assert train_run(study, "eps10", "dp", tmp_path, progress=quiet) != train_run(study, "eps1", "dp", tmp_path,
                                                                                   progress=quiet)
    assert len(trained) == 4


@pytest.mark.parametrize("path", sorted((REPO / "conf" / "study").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_committed_study_composes_each_run_it_would_train(path):
    # A typo in a study file would otherwise surface only when the queue reaches that variant, maybe an
    # hour into an unattended run; composing is what dpdm-train does first, so it fails the same way.
    from dpdm.experiments.study import DP, NONPRIVATE, Study, composed_config, run_overrides

    study = Study.load(path)
    for variant in study.variants:
        for mode in ((DP, NONPRIVATE) if study.controls else (DP,)):
            cfg = composed_config(tuple(run_overrides(study, variant, mode)))
            assert cfg["privacy"]["enabled"] is (mode == DP), (variant, mode)


# cpu_presets keeps the rows of a preset's earlier recipes on purpose (results/cpu.md marks them).
_STUDIES_WITH_ROWS = [p for p in sorted((REPO / "conf" / "study").glob("*.yaml"))
                      if p.stem != "cpu_presets" and (REPO / "results" / "study" / f"{p.stem}.jsonl").exists()]


@pytest.mark.parametrize("path", _STUDIES_WITH_ROWS, ids=lambda p: p.stem)
def test_each_committed_row_is_the_recipe_its_study_composes_now(path):
    # Studies start from presets, and presets move on: a study that no longer pins the recipe its rows
    # were trained with would train its pending runs (a control, a seed) as another recipe, and the table
    # would set the two side by side as if they were one.
    from dpdm.experiments.study import Study, preset_recipe, recipe_differences

    study = Study.load(path)
    newest = {}
    for line in (REPO / "results" / "study" / f"{path.stem}.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["variant"] in study.variants:
            newest[row["variant"], row["mode"]] = row
    stale = {}
    for (variant, mode), row in newest.items():
        if diffs := recipe_differences(row, preset_recipe(study, variant, mode)):
            stale[f"{variant}/{mode}"] = diffs
    assert not stale, f"{path.name} composes another recipe than its rows record: {stale}"


def test_a_run_moved_aside_is_reused_by_whatever_still_composes_its_recipe(tmp_path, monkeypatch):
    """mnist_eps10_cpu moved on after its control was trained; mnist_eps1_cpu's control is still that run's
    recipe, now under nonprivate.old1, and a preset changed back finds its own old run: neither retrains."""
    from dpdm.experiments.study import Study, train_run

    trained = fake_training(monkeypatch)
    quiet = lambda *a: None  # noqa: E731
    before = Study(name="s", train=["experiment=mnist_eps10_cpu"],
                   variants={"eps10": [], "eps1": ["privacy=eps1"]}, samplers={"own": "config"})
    first = train_run(before, "eps10", "nonprivate", tmp_path, progress=quiet)
    # Both variants' rows scored that one run; an unrelated row names the same directory, another training.
    rows = tmp_path / "rows.jsonl"
    row = {"mode": "nonprivate", "sampler": "own", "run_dir": str(first), "train_wall_s": 100.0}
    rows.write_text("".join(json.dumps({**row, "variant": v, **extra}) + "\n" for v, extra in
                            [("eps10", {}), ("eps1", {}), ("eps10", {"train_wall_s": 7.0})]))
    after = Study(name="s", train=["experiment=mnist_eps10_cpu"],
                  variants={"eps10": ["optim.lr=5e-3"], "eps1": ["privacy=eps1"]}, samplers={"own": "config"})
    second = train_run(after, "eps10", "nonprivate", tmp_path, progress=quiet, rows_path=rows)
    assert second == first and len(trained) == 2          # retrained in place; the first moved aside
    kept = first.with_name("nonprivate.old1")
    # The rows that scored the moved run follow it; the other one, of a training not here, takes the next
    # free name before the new run is trained into the directory it named.
    assert [json.loads(line)["run_dir"] for line in rows.read_text().splitlines()] == [
        str(kept), str(kept), str(first.with_name("nonprivate.old2"))]
    assert train_run(after, "eps1", "nonprivate", tmp_path, progress=quiet) == kept
    said = []
    assert train_run(before, "eps10", "nonprivate", tmp_path, progress=said.append, rows_path=rows) == kept
    assert len(trained) == 2 and "moved it to nonprivate.old3" in said[0] and "reuses" in said[1]


def test_rows_record_the_lr_decay_and_older_rows_read_as_constant():
    from dpdm.experiments.study import composed_config, config_recipe, recipe_differences

    decayed = config_recipe(composed_config(("experiment=mnist_eps10_cpu", "lr_schedule.kind=linear",
                                             "lr_schedule.final_fraction=0.5")))
    assert decayed["lr_schedule"] == {"kind": "linear", "final_fraction": 0.5}
    constant = config_recipe(composed_config(("experiment=mnist_eps10_cpu",)))
    assert constant["lr_schedule"] == {"kind": "constant", "final_fraction": 1.0}
    assert recipe_differences(constant, decayed) == ["lr_schedule.final_fraction", "lr_schedule.kind"]
    older_row = {k: v for k, v in constant.items() if k != "lr_schedule"}
    assert recipe_differences(older_row, decayed) == []
    # The full-resolution output conv (off: 0) tells rows apart; rows from before it existed read as off.
    unpatched = config_recipe(composed_config(("experiment=mnist_eps10_cpu", "+net.unpatch_channels=8")))
    assert (constant["net"]["unpatch_channels"], unpatched["net"]["unpatch_channels"]) == (0, 8)
    assert recipe_differences(constant, unpatched) == ["net.unpatch_channels"]
    older_net = {**constant, "net": {k: v for k, v in constant["net"].items() if k != "unpatch_channels"}}
    assert recipe_differences(older_net, constant) == []
    assert recipe_differences(older_net, unpatched) == ["net.unpatch_channels"]  # it ran with the default, 0
    refined = config_recipe(composed_config(("experiment=mnist_eps10_cpu", "+net.unpatch_channels=8",
                                             "+net.full_res_blocks=1")))
    assert (unpatched["net"]["full_res_blocks"], refined["net"]["full_res_blocks"]) == (0, 1)
    assert recipe_differences(unpatched, refined) == ["net.full_res_blocks"]


def test_a_run_is_not_moved_aside_onto_a_name_that_rows_give_an_absent_run(tmp_path, monkeypatch):
    """A fresh checkout: rows (committed) name dp.old1 for a run whose dir is not here. The run moved aside
    now must take another name, or the page would show it under dp.old1's row and curve."""
    from dpdm.experiments.study import Study, train_run

    fake_training(monkeypatch)
    quiet = lambda *a: None  # noqa: E731
    study = Study(name="s", train=["experiment=mnist_eps10_cpu"], variants={"v": []}, samplers={"own": "config"})
    first = train_run(study, "v", "dp", tmp_path, progress=quiet)
    rows = tmp_path / "rows.jsonl"
    absent = first.with_name("dp.old1")
    rows.write_text(json.dumps({"variant": "v", "mode": "dp", "run_dir": str(absent), "train_wall_s": 1.0}) + "\n")
    changed = Study(name="s", train=["experiment=mnist_eps10_cpu"], variants={"v": ["optim.lr=5e-3"]},
                    samplers={"own": "config"})
    said = []
    train_run(changed, "v", "dp", tmp_path, progress=said.append, rows_path=rows)
    assert not absent.exists() and (first.with_name("dp.old2") / "summary.json").exists()
    assert "moved it to dp.old2" in said[0]


def test_rows_naming_an_absent_run_follow_it_to_old_names_before_a_run_is_trained_there(tmp_path, monkeypatch):
    """A fresh checkout: committed rows name dp for two earlier trainings (told apart by wall time) whose
    dirs are not here, and dp.old1 for a third. Training into dp must first point those rows at free old
    names, the run scored last at the last name, and say so to `on_moved` (the stored curve follows it);
    rows of other dirs and of the new run are left alone."""
    from dpdm.experiments.study import Study, _scored, train_run

    trained = fake_training(monkeypatch)
    study = Study(name="s", train=["experiment=mnist_eps10_cpu"], variants={"v": []}, samplers={"own": "config"})
    run = tmp_path / "s" / "v" / "dp"
    rows = tmp_path / "rows.jsonl"
    given = [(str(run), 5.0), (str(run.with_name("dp.old1")), 3.0), (str(run), 9.0), (str(run), 5.0),
             (str(run.with_name("nonprivate")), 9.0)]
    rows.write_text("".join(json.dumps({"variant": "v", "mode": "dp", "sampler": "own", "sample_n": 10,
                                        "run_dir": d, "train_wall_s": w}) + "\n" for d, w in given))
    moved, said = [], []
    assert train_run(study, "v", "dp", tmp_path, progress=said.append, rows_path=rows,
                     on_moved=lambda a, b: moved.append((a, b))) == run
    assert len(trained) == 1 and (run / "summary.json").exists()
    # wall 9.0's last row comes before wall 5.0's: 9.0 takes dp.old2, 5.0 (scored last) dp.old3.
    assert [json.loads(line)["run_dir"] for line in rows.read_text().splitlines()] == [
        str(run.with_name(n)) for n in ("dp.old3", "dp.old1", "dp.old2", "dp.old3", "nonprivate")]
    assert moved == [(run, run.with_name("dp.old3"))]
    assert "2 run(s) not here" in said[0] and "dp.old2, dp.old3" in said[0]
    # The new run is not taken for any of them: it has not been scored.
    assert not _scored(rows, "v", "dp", "own", run, 10, False, train_wall_s=100.0)


def test_a_run_moved_aside_for_a_changed_recipe_is_told_to_on_moved(tmp_path, monkeypatch):
    from dpdm.experiments.study import Study, train_run

    fake_training(monkeypatch)
    study = Study(name="s", train=["experiment=mnist_eps10_cpu"], variants={"v": []}, samplers={"own": "config"})
    run = train_run(study, "v", "dp", tmp_path, progress=lambda *a: None)
    moved = []
    study.variants["v"] = ["optim.lr=5e-3"]
    train_run(study, "v", "dp", tmp_path, progress=lambda *a: None, rows_path=tmp_path / "none.jsonl",
              on_moved=lambda a, b: moved.append((a, b)))
    assert moved == [(run, run.with_name("dp.old1"))]


def test_rescoring_rows_beside_the_studys_follow_the_run_and_its_samples_when_it_moves(tmp_path, monkeypatch):
    """scripts/study/rescore.sh appends rows (protocol seeds, precision / recall) beside the study's, naming
    the run by dir and wall time and its samples by path: when the run is moved aside, or trained over in a
    fresh checkout, they follow it like the study's own rows; rows of another training are left alone."""
    from dpdm.experiments.study import Study, train_run

    fake_training(monkeypatch)
    quiet = lambda *a: None  # noqa: E731
    study = Study(name="s", train=["experiment=mnist_eps10_cpu"], variants={"v": []}, samplers={"own": "config"})
    run = train_run(study, "v", "dp", tmp_path, progress=quiet)
    rows, seeds = tmp_path / "s.jsonl", tmp_path / "s_protocol_seeds.jsonl"
    rows.write_text(json.dumps({"variant": "v", "mode": "dp", "run_dir": str(run), "train_wall_s": 100.0}) + "\n")
    rescored = {"samples": str(run / "samples_preset" / "samples.npz"), "run_dir": str(run)}
    seeds.write_text("".join(json.dumps({**rescored, "train_wall_s": w}) + "\n" for w in (100.0, 50.0)))
    study.variants["v"] = ["optim.lr=5e-3"]
    train_run(study, "v", "dp", tmp_path, progress=quiet, rows_path=rows)
    moved, other = [json.loads(line) for line in seeds.read_text().splitlines()]
    assert moved == {"samples": str(run.with_name("dp.old1") / "samples_preset" / "samples.npz"),
                     "run_dir": str(run.with_name("dp.old1")), "train_wall_s": 100.0}
    # The other training (wall 50) is not here either: it takes the next free name before dp is trained.
    assert other["run_dir"] == str(run.with_name("dp.old2"))
    assert other["samples"] == str(run.with_name("dp.old2") / "samples_preset" / "samples.npz")
    assert json.loads(rows.read_text())["run_dir"] == str(run.with_name("dp.old1"))


def rescore(npz: Path, tmp_path: Path, results: Path, seeds: str = "1", **env: str) -> subprocess.CompletedProcess:
    """scripts/study/rescore.sh with dpdm-evaluate faked through its BIN override: every CNN scores 0.5,
    precision 0.8, recall 0.1."""
    import sys

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')   # keeps the venv
    (fake_bin / "python").chmod(0o755)
    (fake_bin / "dpdm-evaluate").write_text(
        "#!/bin/sh\nfor a; do case $a in out=*) out=${a#out=};; esac; done\nmkdir -p \"$out\"\n"
        "echo '{\"metrics\": {\"eval/acc_cnn\": 0.5, \"eval/best_epoch_cnn\": 3, \"eval/precision_test\": 0.8,"
        " \"eval/recall_test\": 0.1}}' > \"$out/eval.json\"\n")
    (fake_bin / "dpdm-evaluate").chmod(0o755)
    return subprocess.run(["bash", str(REPO / "scripts" / "study" / "rescore.sh"), "label", str(npz)],
                          env={**cli_env(), "BIN": str(fake_bin), "ROWS_DIR": str(results), "PREFIX": "t",
                               "SEEDS": seeds, **env}, capture_output=True, text=True)


def sampled_run(tmp_path: Path, monkeypatch) -> tuple:
    """A (fake-)trained study run under tmp_path, cwd there, with a samples file: (study, run, npz, rows dir)."""
    from dpdm.experiments.study import Study, train_run

    fake_training(monkeypatch)
    monkeypatch.chdir(tmp_path)
    study = Study(name="s", train=["experiment=mnist_eps10_cpu"], variants={"v": []}, samplers={"own": "config"})
    run = train_run(study, "v", "dp", Path("runs"), progress=lambda *a: None)
    npz = run / "samples_preset" / "samples.npz"
    npz.parent.mkdir()
    np.savez(npz, x=np.zeros((4, 1, 2, 2), np.uint8), y=np.arange(4))
    results = tmp_path / "results"
    results.mkdir()
    return study, run, npz, results


def test_rescore_script_rows_name_their_run_so_a_move_carries_them(tmp_path, monkeypatch):
    """scripts/study/rescore.sh (dpdm-evaluate faked through its BIN override) records the run its samples
    came from as the study's rows do (run_facts: dir and wall time); the study then moves them with it."""
    from dpdm.experiments.study import run_facts, train_run

    study, run, npz, results = sampled_run(tmp_path, monkeypatch)
    done = rescore(npz, tmp_path, results)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for f in ("t_protocol_seeds.jsonl", "t_precision_recall.jsonl")
            for line in (results / f).read_text().splitlines()]
    assert [(r["run_dir"], r["train_wall_s"]) for r in rows] == [(str(run), run_facts(run)["train_wall_s"])] * 2
    assert rows[0]["acc_cnn"] == 0.5 and rows[1]["recall_test"] == 0.1
    study.variants["v"] = ["optim.lr=5e-3"]
    train_run(study, "v", "dp", Path("runs"), progress=lambda *a: None, rows_path=results / "s.jsonl")
    moved = [json.loads(line) for f in ("t_protocol_seeds.jsonl", "t_precision_recall.jsonl")
             for line in (results / f).read_text().splitlines()]
    assert {(r["run_dir"], r["samples"]) for r in moved} == {
        (str(run.with_name("dp.old1")), str(run.with_name("dp.old1") / "samples_preset" / "samples.npz"))}


def test_rescore_script_scores_seeds_alone_when_told_precision_recall_is_there(tmp_path, monkeypatch):
    """PR=0: a run whose precision / recall was scored earlier (SEEDS="") gets its protocol seeds without a
    second precision / recall row; by default both are appended."""
    _, run, npz, results = sampled_run(tmp_path, monkeypatch)
    done = rescore(npz, tmp_path, results, seeds="")  # PR unset: the default scores precision / recall
    assert done.returncode == 0, done.stdout + done.stderr
    done = rescore(npz, tmp_path, results, seeds="1 2", PR="0")
    assert done.returncode == 0, done.stdout + done.stderr
    pr = (results / "t_precision_recall.jsonl").read_text().splitlines()
    seeds = [json.loads(line)["protocol_seed"]
             for line in (results / "t_protocol_seeds.jsonl").read_text().splitlines()]
    assert len(pr) == 1 and seeds == [1, 2]


def test_rescore_script_copies_the_studys_own_score_as_protocol_seed_0_once(tmp_path, monkeypatch, capsys):
    """Seed 0 of the four protocol seeds is the study's own downstream score of the run: rescore.sh copies
    it beside the seeds it scores, once, and only from a row scored by the same protocol and the same
    training (not an earlier run in the same dir) and sample set (not one of another size)."""
    from dpdm.experiments.study import run_facts

    _, run, npz, results = sampled_run(tmp_path, monkeypatch)
    wall = run_facts(run)["train_wall_s"]
    protocol = {"val_size": 2000, "max_epochs": 30, "batch_size": 128, "lr": 3e-4, "patience": 5, "seed": 0}
    mine = {"study": "s", "variant": "v", "mode": "dp", "sampler": "preset", "run_dir": str(run), "acc_cnn": 0.77,
            "sample_n": 4}
    (results / "s.jsonl").write_text(
        json.dumps({**mine, "train_wall_s": wall + 1, "acc_cnn": 0.1, "downstream_protocol": protocol}) + "\n"
        + json.dumps({**mine, "train_wall_s": wall, "downstream_protocol": {**protocol, "max_epochs": 80}}) + "\n"
        + json.dumps({**mine, "train_wall_s": wall, "sample_n": 3, "acc_cnn": 0.2, "downstream_protocol": protocol})
        + "\n")
    seeds_file = results / "t_protocol_seeds.jsonl"
    # The script's seed-0 step, called in-process as rescore.sh calls it (each script run costs 4 Python
    # starts), around one run of the script itself.
    from dpdm.experiments.protocol_seeds import main as copy_seed_0

    protocol_of_rescore = {"val_size": 2000, "max_epochs": 30, "patience": 5}   # what rescore.sh passes
    args = ["label", str(npz), str(results), str(seeds_file), json.dumps(protocol_of_rescore), "1"]
    assert copy_seed_0(args) == 0 and not seeds_file.exists()   # rows of another protocol or sample set
    said = capsys.readouterr().out
    assert "protocol seed 0 not copied" in said and "max_epochs 80 against max_epochs 30" in said

    with (results / "s.jsonl").open("a") as f:               # the study scores it by the protocol
        f.write(json.dumps({**mine, "train_wall_s": wall, "downstream_protocol": protocol}) + "\n")
    done = rescore(npz, tmp_path, results)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in seeds_file.read_text().splitlines()]
    assert [r["protocol_seed"] for r in rows] == [1, 0]
    assert rows[1]["acc_cnn"] == 0.77 and rows[1]["source"] == f"the study's row in {results / 's.jsonl'}"
    assert (rows[1]["run_dir"], rows[1]["train_wall_s"], rows[1]["samples"]) == (str(run), wall, str(npz))
    assert copy_seed_0(args) == 0 and "already in" in capsys.readouterr().out     # copied once
    assert [json.loads(r)["protocol_seed"] for r in seeds_file.read_text().splitlines()] == [1, 0]

    # A row from before rows recorded their protocol: the study file's evaluation settings stand in.
    (results / "s.jsonl").write_text(json.dumps({**mine, "train_wall_s": wall}) + "\n")
    seeds_file.unlink()
    study_dir = tmp_path / "conf" / "study"
    study_dir.mkdir(parents=True)
    (study_dir / "s.yaml").write_text("variants: {v: []}\nevaluation: {downstream: {val_size: 600}}\n")
    args[-1] = "1 2"
    assert copy_seed_0(args) == 0 and not seeds_file.exists()
    assert "val_size 600 against max_epochs 30, patience 5, val_size 2000" in capsys.readouterr().out
    (study_dir / "s.yaml").write_text(
        "variants: {v: []}\nevaluation: {downstream: {val_size: 2000, max_epochs: 30, patience: 5}}\n")
    assert copy_seed_0(args) == 0
    assert [json.loads(r)["protocol_seed"] for r in seeds_file.read_text().splitlines()] == [0]
