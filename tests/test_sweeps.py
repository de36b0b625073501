"""Hydra multirun sweeps over ε and K: one run dir and one (offline) wandb run per job, grouped by sweep;
dpdm-report's table and CSV; the launcher configs (basic, joblib, SLURM via submitit).

The sweep is the documented command (`dpdm-train -m experiment=smoke privacy.epsilon=...
loss.noise_multiplicity=...`) on the smoke preset shrunk further (64 examples, 2 DP-SGD steps per job,
a tiny network), through the real console scripts.
"""
import csv
import os
import subprocess

import pytest

from dpdm.privacy.accounting import mechanism_epsilon
from tests.helpers import BIN, REPO, compose_config

TINY = ["experiment=smoke", "data.subset_size=64", "data.batch_size=32", "trainer.max_epochs=1",
        "max_physical_batch_size=64", "net.model_channels=8", "net.channel_mult=[1]", "net.num_blocks=1",
        "net.attn_resolutions=[]", "callbacks.sample_grid.per_class=1", "callbacks.sample_grid.num_steps=2"]
EPSILONS, KS = (1, 10), (1, 2)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(DPDM_DATA_DIR=str(REPO / "data"), **extra)
    return env


def _run(args, env, timeout=900):
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 ε × 2 K with the basic launcher (all jobs in one process) and logger=wandb, WANDB_MODE unset."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "s"
    proc = _run([str(BIN / "dpdm-train"), "-m", *TINY, "logger=wandb",
                 f"privacy.epsilon={','.join(map(str, EPSILONS))}",
                 f"loss.noise_multiplicity={','.join(map(str, KS))}", f"hydra.sweep.dir={sweep_dir}"], _env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sweep_dir


def test_each_job_has_its_own_run_dir_with_its_own_mechanism(sweep):
    import json

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        p = json.loads((job / "privacy.json").read_text())
        assert (job / "summary.json").is_file() and (job / "checkpoints" / "last.ckpt").is_file()
        seen.add((p["target_epsilon"], p["noise_multiplicity"]))
        # The job's ε is what the accountant gives for the σ calibrated for its own (ε, q, steps).
        assert p["epsilon"] == pytest.approx(mechanism_epsilon(
            noise_multiplier=p["noise_multiplier"], sample_rate=p["sample_rate"], steps=p["steps"],
            delta=p["delta"], accountant=p["accountant"]), rel=1e-9)
        assert p["epsilon"] <= p["target_epsilon"]
    assert seen == {(float(e), k) for e in EPSILONS for k in KS}


def test_wandb_runs_are_offline_one_per_job_and_grouped_by_sweep(sweep):
    runs = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        offline = list((job / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, f"job {job.name}: {offline}"  # its own run, not the previous job's
        runs[job.name] = offline[0]
        record = next(offline[0].glob("run-*.wandb")).read_bytes()
        # The run record carries the group (the sweep dir) and the job's name (the swept values).
        assert str(sweep).encode() in record
        assert f"{job.name}:privacy.epsilon=".encode() in record
        for key in (b"privacy/epsilon", b"train/expected_noised_images_per_s", b"privacy/epsilon_final"):
            assert key in record, key
        # Private by default: nothing computed from the private data without noise reaches wandb.
        for key in (b"train/loss", b"nonprivate/", b"train/batch_size"):
            assert key not in record, key
        assert list((offline[0] / "files" / "media" / "images").glob("samples_*.png"))  # the sample grid
    assert len({p.name for p in runs.values()}) == 4


def test_dpdm_report_table_and_csv(sweep, tmp_path):
    proc = _run([str(BIN / "dpdm-report"), str(sweep), "--out", str(tmp_path)], _env())
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout
    print(table)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| job | status | overrides | ε target | ε spent | K | steps | final loss (non-private)")
    assert len(lines) == 1 + 4
    with (tmp_path / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    for r in rows:
        assert r["status"] == "done" and r["dataset"] == "mnist"
        # Only the swept overrides are listed per row; the common ones once below the table.
        assert set(r["overrides"].split()) == {f"privacy.epsilon={float(r['epsilon_target']):g}",
                                               f"loss.noise_multiplicity={r['noise_multiplicity']}"}
        assert float(r["epsilon_spent"]) <= float(r["epsilon_target"])
        assert int(r["steps"]) == 2 and float(r["wall_time_s"]) > 0
        assert r["nonprivate_final_loss"] == ""  # not logged unless privacy.log_nonprivate_metrics=true
        assert r["acc_cnn_pct"] == "" and r["fid"] == ""  # not evaluated
    assert "Common to all jobs: `experiment=smoke" in table
    assert (tmp_path / "report.md").read_text().strip() == table.split("\n\nwrote")[0].strip()


def test_dpdm_report_refuses_a_dir_without_runs(tmp_path):
    proc = _run([str(BIN / "dpdm-report"), str(tmp_path)], _env())
    assert proc.returncode == 2 and "no dpdm-train run dirs" in proc.stderr


def test_report_reads_evaluations_and_says_why_fid_is_missing(sweep, tmp_path):
    import json
    import shutil

    from dpdm.experiments.sweeps import NO_INCEPTION, collect

    job = tmp_path / "0"
    shutil.copytree(sweep / "0", job)
    (job / "final").mkdir()
    # eval.json as dpdm-evaluate writes it, without the Inception weights.
    (job / "final" / "eval.json").write_text(json.dumps({
        "metrics": {"eval/acc_cnn": 0.5, "eval/fd_classifier": 1.5},
        "unavailable": {"fid": "FID unavailable: the standard Inception-v3 weights (2015-12-05) were not found"}}))
    (row,) = collect([job])
    assert row["acc_cnn_pct"] == 50.0 and row["fd_classifier"] == 1.5
    assert row["fid"] is None and row["fid_note"] == NO_INCEPTION
    assert row["eval_files"] == "final/eval.json"


# ---- launchers ----------------------------------------------------------------------------------------

def _compose_hydra(overrides):
    return compose_config("train", overrides, hydra_config=True)


def test_joblib_and_slurm_launcher_configs_compose():
    joblib = _compose_hydra(["hydra/launcher=joblib"]).hydra.launcher
    assert joblib._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert joblib.n_jobs == 2 and joblib.prefer == "processes"
    slurm = _compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert slurm._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (slurm.gpus_per_node, slurm.tasks_per_node, slurm.partition) == (1, 1, "gpu")
    assert slurm.max_num_timeout == 0 and slurm.timeout_min >= 24 * 60
    basic = _compose_hydra([]).hydra.launcher
    assert basic._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


@pytest.mark.slow  # a second launcher spawning its own workers (~30 s): `make test-slow`
def test_joblib_launcher_runs_two_jobs(tmp_path):
    sweep_dir = tmp_path / "j"
    proc = _run([str(BIN / "dpdm-train"), "-m", "hydra/launcher=joblib", *TINY, "loss.noise_multiplicity=1",
                 "privacy.epsilon=1,10", f"hydra.sweep.dir={sweep_dir}"], _env(WANDB_MODE="disabled"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    from dpdm.experiments.sweeps import collect

    rows = collect([sweep_dir])
    assert [(r["job"], r["status"], r["epsilon_target"]) for r in rows] == [("0", "done", 1.0), ("1", "done", 10.0)]


def test_wandb_names_follow_the_sweep(tmp_path):
    from omegaconf import OmegaConf

    from dpdm.experiments.tracking import wandb_names

    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": [
        "experiment=smoke", "privacy.epsilon=1,10", "loss.noise_multiplicity=1,8"]}}}), tmp_path / "multirun.yaml")
    job = {"multirun": True, "sweep_dir": str(tmp_path), "job_num": 3,
           "overrides": ["experiment=smoke", "privacy.epsilon=10", "loss.noise_multiplicity=8"]}
    assert wandb_names(job, None) == (str(tmp_path), "3:privacy.epsilon=10,loss.noise_multiplicity=8")
    assert wandb_names(job, "eps-vs-k")[0] == "eps-vs-k"
    assert wandb_names({"multirun": False}, None) == (None, None)
    assert wandb_names({}, "mine") == ("mine", None)
