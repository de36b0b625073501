"""End to end through the real console scripts: dpdm-train (shrunk smoke preset) → dpdm-sample.

Checks the run directory's files and that privacy.json's ε is what the accountant gives for the
mechanism (σ, q) and the number of steps that actually ran.
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dpdm.privacy.accounting import mechanism_epsilon
from dpdm.training.checkpoint import load_checkpoint
from tests.helpers import BIN, REPO, SHRINK, cli_env, run_cli

# The run's own sampler (a preset's choice), which dpdm-sample uses unless told otherwise.
RUN_SAMPLER = ["sampler.num_steps=2", "sampler.guidance=1.5", "sampler.sigma_min=0.05"]


def _subprocess(args, cwd=REPO):
    env = cli_env()
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _run(args, env=None):
    """The console script args[0] with its arguments, run in this process (tests.helpers.run_cli)."""
    return run_cli(Path(args[0]).name, *args[1:], env=env)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    # Through the installed console script in its own process: the entry point itself is under test here.
    run_dir = tmp_path_factory.mktemp("smoke")
    proc = _subprocess([str(BIN / "dpdm-train"), *SHRINK, *RUN_SAMPLER, f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _console(run_dir).write_text(proc.stdout + proc.stderr)
    return run_dir


def _console(run_dir: Path) -> Path:
    """What the fixture's dpdm-train printed (kept beside the run dir, not in it)."""
    return run_dir.with_name(run_dir.name + "_console.txt")


def test_the_console_states_the_mechanism_once_and_no_unactionable_warnings(smoke_run):
    """A real process (pytest would swallow warnings in this one): one line states the mechanism before
    training; Lightning's eval-mode warning (the EMA copy), its pytree deprecation notice and its
    advertisement do not appear."""
    text = _console(smoke_run).read_text()
    plan = [line for line in text.splitlines() if "privacy: (ε=" in line]
    assert len(plan) == 1, text[-3000:]
    for fact in ("δ=0.0001", "with RDP", "σ=", "C=1.0", "q=0.25000", "B=100 of N=400", "K=2", "8 steps"):
        assert fact in plan[0], (fact, plan[0])
    assert text.index(plan[0]) < text.index("Epoch 0")
    for noise in ("module(s) in eval mode at the start", "LeafSpec", "no `validation_step`", "💡 Tip",
                  "TPU available"):
        assert noise not in text, noise


def test_run_dir_has_config_checkpoint_privacy_grids_summary(smoke_run):
    for rel in ["config.yaml", "checkpoints/last.ckpt", "privacy.json", "summary.json",
                "samples/epoch_0000.png", "samples/epoch_0001.png", "csv/metrics.csv"]:
        assert (smoke_run / rel).is_file(), rel
    machine = json.loads((smoke_run / "summary.json").read_text())["machine"]
    assert machine["cpu_count"] == os.cpu_count() and machine["cpu_isa"] and machine["torch"] == torch.__version__


def test_nothing_non_private_is_logged_by_default(smoke_run):
    """The training loss and the sampled batch sizes are functions of the private batch without noise: by
    default they appear nowhere (docs/privacy.md, "What a run releases")."""
    header = (smoke_run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "privacy/epsilon" in header and "train/expected_noised_images_per_s" in header
    assert not [c for c in header if c.startswith("nonprivate/") or c in ("train/loss", "train/batch_size")]
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert "nonprivate" not in summary and "train_loss_last" not in summary


def test_the_nonprivate_switch_logs_labelled_diagnostics(tmp_path):
    proc = _run([str(BIN / "dpdm-train"), *SHRINK, "privacy.log_nonprivate_metrics=true",
                 "callbacks.sample_grid.every_n_epochs=5", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"nonprivate/train_loss", "nonprivate/batch_size", "nonprivate/noised_images_per_s"} <= set(header)
    assert json.loads((tmp_path / "summary.json").read_text())["nonprivate"]["train_loss_last"] > 0


def test_privacy_json_matches_accountant_for_steps_taken(smoke_run):
    p = json.loads((smoke_run / "privacy.json").read_text())
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert p["steps"] == summary["optimizer_steps"] == 2 * int(1 / p["sample_rate"])
    assert p["sample_rate"] == pytest.approx(100 / 400)
    expected = mechanism_epsilon(noise_multiplier=p["noise_multiplier"], sample_rate=p["sample_rate"],
                             steps=p["steps"], delta=p["delta"], accountant=p["accountant"])
    assert p["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert p["epsilon"] <= p["target_epsilon"]
    assert p["accountant"] == "rdp" and p["noise_multiplicity"] == 2
    ckpt = torch.load(smoke_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    steps_in_ckpt = sum(n for _, _, n in ckpt["dpdm"]["accountant"]["history"])
    assert steps_in_ckpt == p["steps"]


def test_sample_cli_writes_npz_and_grid(smoke_run):
    out = smoke_run / "final"
    proc = _run([str(BIN / "dpdm-sample"), f"ckpt={smoke_run / 'checkpoints/last.ckpt'}", "n=20",
                 f"out={out}", "sampler.num_steps=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = np.load(out / "samples.npz")
    assert data["x"].dtype == np.uint8 and data["x"].shape == (20, 1, 28, 28)
    assert data["y"].dtype == np.int64 and sorted(set(data["y"].tolist())) == list(range(10))
    assert data["x"].std() > 0
    assert str(data["dataset"]) == "mnist"  # the training data's name, from the checkpoint
    assert (out / "grid.png").is_file()
    # A second run refuses to overwrite the earlier result.
    again = _run([str(BIN / "dpdm-sample"), f"ckpt={smoke_run / 'checkpoints/last.ckpt'}", "n=5",
                  f"out={out}"])
    assert again.returncode != 0 and "exists" in again.stderr
    assert np.load(out / "samples.npz")["x"].shape[0] == 20


def test_resuming_a_spent_budget_is_refused(smoke_run, tmp_path):
    ckpt = smoke_run / "checkpoints/last.ckpt"
    before = ckpt.read_bytes()
    proc = _run([str(BIN / "dpdm-train"), *SHRINK, "trainer.max_epochs=3", f"ckpt_path={ckpt}",
                 f"hydra.run.dir={tmp_path}"])
    assert proc.returncode != 0
    assert "privacy mechanism" in proc.stderr or "budget" in proc.stderr, proc.stderr[-2000:]
    assert ckpt.read_bytes() == before


def test_corrupted_checkpoint_gives_one_clear_message(smoke_run, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes((smoke_run / "checkpoints/last.ckpt").read_bytes()[:1000])
    proc = _run([str(BIN / "dpdm-sample"), f"ckpt={bad}", "n=2", f"out={tmp_path / 'o'}"])
    assert proc.returncode == 2
    assert "corrupted or truncated" in proc.stderr
    assert "Traceback" not in proc.stderr


def _cached_mnist():
    """MNIST's splits as a source hands them over (from this checkout's verified cache)."""
    import numpy as np

    from dpdm.data import load_split

    return {split: tuple(np.asarray(t) for t in load_split("mnist", split, data_dir=REPO / "data"))
            for split in ("train", "test")}


def test_a_missing_builtin_dataset_is_prepared_by_dpdm_train_itself(tmp_path, monkeypatch):
    """No data/ and no `dpdm-data`: the data module's prepare_data fills the verified cache (through the
    same pinned checks as dpdm-data; here the pip source hands over this checkout's MNIST arrays)."""
    from dpdm.data.sources import pypi

    splits = _cached_mnist()
    calls = []
    monkeypatch.setattr(pypi, "read_splits", lambda name, **kw: calls.append(name) or splits)
    empty = tmp_path / "no_data_yet"
    proc = _run([str(BIN / "dpdm-train"), "experiment=smoke", "debug=tiny", f"hydra.run.dir={tmp_path / 'r'}"],
                env={"DPDM_DATA_DIR": str(empty)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert calls == ["mnist"]
    assert (empty / "mnist" / "checksums.json").is_file() and (tmp_path / "r" / "privacy.json").is_file()
    assert "mnist: verified" in proc.stderr


def test_a_damaged_builtin_cache_is_reported_by_dpdm_train_with_what_to_do(tmp_path):
    """prepare_data only checks that a cache was written; setup verifies its files as it reads them (each
    file hashed once per run). A damaged one stops the run with one message and is left as it was."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(REPO / "data" / "mnist", data / "mnist")
    damaged = data / "mnist" / "test.npz"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    proc = _run([str(BIN / "dpdm-train"), *SHRINK, f"hydra.run.dir={tmp_path / 'r'}"],
                env={"DPDM_DATA_DIR": str(data)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "test.npz sha256" in proc.stderr and "dpdm-data mnist" in proc.stderr
    assert damaged.stat().st_size == 1000 and not (tmp_path / "r" / "privacy.json").exists()


def test_other_ranks_wait_for_the_cache_rank_zero_writes(monkeypatch):
    from types import SimpleNamespace

    from dpdm.cli.train import prepare_data_once

    monkeypatch.setenv("LOCAL_RANK", "1")
    polls = []

    def written_after_two_polls():
        polls.append(1)
        return len(polls) > 2

    def not_on_this_rank():
        raise AssertionError("only local rank 0 prepares the data")

    dm = SimpleNamespace(name="mnist", cache_dir=Path("/nowhere/mnist"), is_prepared=written_after_two_polls,
                         prepare_data=not_on_this_rank)
    prepare_data_once(dm, poll_s=0)
    assert len(polls) == 3
    dm.is_prepared = lambda: False
    with pytest.raises(TimeoutError, match="not prepared in /nowhere/mnist within 0 s"):
        prepare_data_once(dm, wait_s=0, poll_s=0)


def test_a_dataset_no_source_can_provide_says_how_to_get_it(tmp_path, monkeypatch):
    from dpdm.data import DatasetMissingError
    from dpdm.data.sources import pypi, torchvision

    def offline(name, **kw):
        raise DatasetMissingError("no network (test)")

    monkeypatch.setattr(pypi, "read_splits", offline)
    monkeypatch.setattr(torchvision, "read_splits", offline)
    env_dir = tmp_path / "empty"
    proc = _run([str(BIN / "dpdm-train"), *SHRINK, f"hydra.run.dir={tmp_path / 'r'}"],
                env={"DPDM_DATA_DIR": str(env_dir)})
    assert proc.returncode == 2
    assert "could not prepare mnist" in proc.stderr and "dpdm-data mnist" in proc.stderr
    assert not (env_dir / "mnist" / "checksums.json").exists() and not (tmp_path / "r" / "privacy.json").exists()


def test_non_private_baseline_runs(tmp_path):
    proc = _run([str(BIN / "dpdm-train"), *SHRINK, "privacy=none", "trainer.max_epochs=1",
                 f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    p = json.loads((tmp_path / "privacy.json").read_text())
    assert p["enabled"] is False and p["epsilon"] is None
    assert p["steps"] == int(1 / p["sample_rate"])


def test_trainer_max_steps_stops_the_run_and_the_accountant_plans_for_it(tmp_path):
    run_dir = tmp_path / "short"
    proc = _run([str(BIN / "dpdm-train"), *SHRINK, "trainer.max_steps=3", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    p = json.loads((run_dir / "privacy.json").read_text())
    assert p["steps"] == p["planned_steps"] == 3  # 2 epochs of q = 1/4 would be 8 steps
    # σ was calibrated for 3 steps, so those 3 steps spend (almost) the whole budget.
    eps = mechanism_epsilon(noise_multiplier=p["noise_multiplier"], sample_rate=p["sample_rate"], steps=3,
                        delta=p["delta"])
    assert abs(p["epsilon"] - eps) < 1e-9 and 0.98 * p["target_epsilon"] < eps <= p["target_epsilon"]


def test_a_run_without_a_bar_logs_its_progress_to_train_log(tmp_path):
    """dpdm-study trains without a progress bar: the run's log then gets the step, ε and ETA lines."""
    proc = _run([str(BIN / "dpdm-train"), *SHRINK, "trainer.max_steps=3", "+trainer.enable_progress_bar=false",
                 f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (tmp_path / "train.log").read_text().splitlines() if "] - step " in line]
    assert lines, (tmp_path / "train.log").read_text()[-2000:]
    p = json.loads((tmp_path / "privacy.json").read_text())
    # 3 steps leave 2 step durations, under the 10 a rate needs: no figure rests on one Poisson batch's size
    assert lines[-1].split("] - ")[1] == f"step 3/3 (100%), ε {p['epsilon']:.3g}/{p['target_epsilon']:g}"


def test_last_checkpoint_holds_the_final_step_when_max_steps_ends_in_an_epoch_that_is_not_saved(tmp_path):
    # q = 1/4: 4 steps per epoch. Checkpoints every second epoch save step 8; step 10 ends inside the third
    # epoch (index 2), which every_n_epochs skips. Stock Lightning 2.6 leaves last.ckpt at step 8 here.
    run_dir = tmp_path / "mid_epoch"
    proc = _run([str(BIN / "dpdm-train"), *SHRINK, "trainer.max_epochs=4", "trainer.max_steps=10",
                 "callbacks.model_checkpoint.every_n_epochs=2", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "epoch=1-step=8.ckpt").is_file()
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # what dpdm-sample and dpdm-export read
    summary = json.loads((run_dir / "summary.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert last["global_step"] == summary["optimizer_steps"] == privacy["steps"] == 10


def test_a_wall_clock_limit_stops_the_run_and_epsilon_covers_the_steps_that_ran(tmp_path):
    # scripts/gpu/checks.sh time-boxes the GPU preset with Lightning's max_time (whole seconds). 200 planned
    # steps with a sample grid every epoch take far longer than the 1 s limit on any machine; Lightning checks
    # the clock after each step, so at least one runs. σ stays calibrated for all 200; ε is spent for those run.
    run_dir = tmp_path / "boxed"
    proc = _run([str(BIN / "dpdm-train"), *SHRINK, "trainer.max_epochs=50", "++trainer.max_time=00:00:00:01",
                 f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    p = json.loads((run_dir / "privacy.json").read_text())
    assert 1 <= p["steps"] < p["planned_steps"] == 200
    eps = mechanism_epsilon(noise_multiplier=p["noise_multiplier"], sample_rate=p["sample_rate"], steps=p["steps"],
                            delta=p["delta"])
    assert p["epsilon"] == pytest.approx(eps, rel=1e-9) and eps < p["target_epsilon"]
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # what dpdm-sample then draws from
    assert last["global_step"] == json.loads((run_dir / "summary.json").read_text())["optimizer_steps"] == p["steps"]


def test_a_run_stopped_before_its_first_step_names_no_checkpoint(tmp_path):
    run_dir = tmp_path / "zero"
    proc = _run([str(BIN / "dpdm-train"), *SHRINK, "++trainer.max_time=00:00:00:00", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizer_steps"] == 0 and summary["privacy"]["epsilon"] == 0
    assert summary["last_checkpoint"] is None and not (run_dir / "checkpoints" / "last.ckpt").exists()


def test_sample_cli_uses_the_training_runs_sampler_with_the_keys_the_command_line_sets(smoke_run, tmp_path):
    ckpt = f"ckpt={smoke_run / 'checkpoints/last.ckpt'}"

    def sample(name, *args):
        proc = _run([str(BIN / "dpdm-sample"), ckpt, "n=10", f"out={tmp_path / name}", *args])
        assert proc.returncode == 0, proc.stderr[-3000:]
        return np.load(tmp_path / name / "samples.npz")["x"], proc.stdout + proc.stderr

    x_own, log = sample("own")
    assert "training run's sampler" in log and "guidance=1.5" in log and "sigma_min=0.05" in log
    # Naming a sampler draws with that preset and the given keys only: here, the run's own values.
    x_same, log = sample("same", "sampler=edm_heun", "sampler.num_steps=2", "sampler.guidance=1.5",
                         "sampler.sigma_min=0.05")
    assert "training run's sampler" not in log
    assert np.array_equal(x_own, x_same)  # the stored sampler is exactly the run's
    # One key alone changes that key of the run's sampler (2 steps and w = 1.5 stay), not the preset's
    # defaults (32 steps, w = 0).
    x_key, log = sample("key", "sampler.sigma_min=0.1")
    assert "changed on the command line: sigma_min" in log and "guidance=1.5" in log
    x_named, _ = sample("named", "sampler=edm_heun", "sampler.num_steps=2", "sampler.guidance=1.5",
                        "sampler.sigma_min=0.1")
    assert np.array_equal(x_key, x_named) and not np.array_equal(x_key, x_own)


def test_sample_grid_has_one_row_per_class():
    import torch

    from dpdm.cli.sample import grid_rows

    y = torch.arange(1000) % 10  # balanced, as dpdm-sample draws them
    idx, nrow = grid_rows(y)
    assert nrow == 10 and len(idx) == 100
    assert (y[idx].reshape(10, 10) == torch.arange(10).reshape(10, 1)).all()
    idx, nrow = grid_rows(torch.tensor([3, 3, 3, 5, 5]))  # few per class: rows as long as the rarest class
    assert nrow == 2 and idx.tolist() == [0, 1, 3, 4]
    idx, nrow = grid_rows(torch.full((250,), -1))
    assert nrow == 10 and idx.tolist() == list(range(100))


def test_a_smoke_run_writes_what_it_wrote_before_the_redesign(tmp_path):
    """Issue 14's redesign (model group, renames) must not change what a run releases: the run directory's
    files and privacy.json are compared with tests/golden/smoke_tiny_run.json, recorded by the code before
    it. The checkpoint may gain keys (hyper_parameters); what it must still hold is checked elsewhere."""
    golden = json.loads((REPO / "tests" / "golden" / "smoke_tiny_run.json").read_text())
    proc = _run([str(BIN / "dpdm-train"), "experiment=smoke", "debug=tiny", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == golden["files"]
    privacy = json.loads((tmp_path / "privacy.json").read_text())
    # Issue 15 added what the privacy unit is (the golden run predates it); nothing else may change.
    assert set(privacy) - set(golden["privacy"]) == {"privacy_unit"} and privacy["privacy_unit"] == "one example"
    for key, value in golden["privacy"].items():
        assert privacy[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    # summary.json later gained the machine its wall time was measured on; nothing else may change.
    summary_keys = set(json.loads((tmp_path / "summary.json").read_text()))
    assert summary_keys - set(golden["summary_keys"]) == {"machine"} and set(golden["summary_keys"]) <= summary_keys
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # Later the training time, so that a resumed run reports the whole run's (as summary.json's wall time).
    assert set(ckpt["dpdm"]) == {"accountant", "build_config", "diffusion_rng", "plan", "training_seconds"}
