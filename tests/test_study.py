"""dpdm-study end to end, shrunk: a variant and its non-private control are trained, sampled, scored."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_train_cli import SHRINK

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_study_trains_samples_and_scores_each_variant_with_its_control(tmp_path):
    spec = {
        "train": [*SHRINK, "callbacks.model_checkpoint.save_top_k=-1"],   # every epoch's checkpoint (curve)
        "controls": True,
        "sample": {"n": 20, "batch_size": 20},
        "samplers": {"ddim2": ["sampler=ddim", "sampler.num_steps=2"]},
        "variants": {"shifted": ["noise.log_sigma_shift=1.0"]},
        "evaluation": {"cache_dir": str(tmp_path / "cache"),
                       "real_classifier": {"num_train": 1000, "max_epochs": 1, "lr": 1e-3}},
    }
    study = tmp_path / "tiny_study.yaml"
    study.write_text(yaml.safe_dump(spec))
    env = dict(os.environ, WANDB_MODE="disabled", DPDM_DATA_DIR=str(REPO / "data"))
    cmd = [str(BIN / "dpdm-study"), "run", str(study), "--runs-dir", str(tmp_path / "runs"),
           "--results", str(tmp_path / "results")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results" / "tiny_study.jsonl").read_text().splitlines()]
    assert {(r["variant"], r["mode"]) for r in rows} == {("shifted", "dp"), ("shifted", "nonprivate")}
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

    # The learning curve of results/cpu.md: each epoch checkpoint sampled and scored by the downstream CNN.
    from dpdm.evaluation.protocol import EvalSettings, Evaluator
    from dpdm.experiments.cpu_results import learning_curve

    run = tmp_path / "runs" / "tiny_study" / "shifted" / "dp"
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


def test_unknown_study_key_and_missing_file_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variants: {a: []}\nepochs: 3\n")
    for path, msg in ((bad, "unknown keys"), (tmp_path / "none.yaml", "not found")):
        proc = subprocess.run([str(BIN / "dpdm-study"), "run", str(path)], capture_output=True, text=True)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
