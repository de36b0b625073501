"""Checkpoint and resume through the real dpdm-train: a SIGKILLed run resumed from last.ckpt ends where an
uninterrupted run ends (same steps, ε, accountant history, RNG states and weights), and resumes that would
change the mechanism or exceed the budget are refused without touching the earlier run's files.
"""
import copy
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.helpers import BIN, REPO, cli_env, run_cli

# 40 examples, B = 10: 4 DP-SGD steps per epoch, 8 in all; tiny, so the test stays fast on a busy CPU.
SHRINK = ["experiment=smoke", "debug=tiny", "trainer.max_epochs=2", "privacy.noise_seed=123", "data.sampler_seed=5",
          "seed=0"]
TOTAL_STEPS = 8


def _env():
    return cli_env()


def _train(*extra, timeout=600):
    return subprocess.run([str(BIN / "dpdm-train"), *SHRINK, *extra], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _train_here(*extra):
    """dpdm-train in this process (tests.helpers.run_cli): a refusal is checked without ~10 s of imports."""
    return run_cli("dpdm-train", *SHRINK, *extra)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _files(run_dir):
    return {rel: (run_dir / rel).read_bytes()
            for rel in ("privacy.json", "summary.json", "config.yaml", "checkpoints/last.ckpt")}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    proc = _train(f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _wait_for_first_checkpoint(proc, ckpt, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "the run ended before it could be killed"
        if ckpt.is_file():
            try:
                return _load(ckpt)  # fully written
            except Exception:
                pass
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def _killed_at_first_checkpoint(args, run_dir):
    """Start dpdm-train with `args` into `run_dir` and SIGKILL it once its first checkpoint is written:
    (that checkpoint, the last one the killed run left)."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([str(BIN / "dpdm-train"), *args, f"hydra.run.dir={run_dir}"], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = _wait_for_first_checkpoint(proc, ckpt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return first, _load(ckpt)


def test_sigkilled_run_resumes_to_the_same_result(full_run, tmp_path):
    run_dir = tmp_path / "killed"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    first, killed_at = _killed_at_first_checkpoint(SHRINK, run_dir)
    assert first["global_step"] > 0
    assert 0 < killed_at["global_step"] < TOTAL_STEPS, "killed too late: the run had finished"
    assert not (run_dir / "summary.json").exists()
    # A copy of the killed run whose checkpoint lacks the training time (as those written before dpdm kept it).
    old_dir = tmp_path / "killed_old_checkpoint"
    (old_dir / "checkpoints").mkdir(parents=True)
    old_ckpt = copy.deepcopy(killed_at)  # the helper loaded it; killed_at itself is read again below
    del old_ckpt["dpdm"]["training_seconds"]
    torch.save(old_ckpt, old_dir / "checkpoints" / "last.ckpt")
    # The killed call's CSV log (written at epoch ends, so maybe not yet when the kill came: then a stand-in).
    metrics = run_dir / "csv" / "metrics.csv"
    if not metrics.is_file():
        metrics.parent.mkdir(exist_ok=True)
        metrics.write_text("epoch,step\n0,3\n")
    earlier_metrics = metrics.read_text()

    # Resume into the same run dir, with the same overrides.
    proc = _train(f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    full = json.loads((full_run / "privacy.json").read_text())
    resumed = json.loads((run_dir / "privacy.json").read_text())
    assert resumed["steps"] == full["steps"] == TOTAL_STEPS
    assert resumed["epsilon"] == pytest.approx(full["epsilon"], rel=1e-9)
    # Both seeds were fixed for this test: the record says the guarantee does not hold against their holder.
    assert full["known_seeds"] == resumed["known_seeds"] == ["privacy.noise_seed", "data.sampler_seed"]
    assert "does not hold against anyone who knows the seed" in full["warning"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizer_steps"] == TOTAL_STEPS
    # Lightning's CSV logger would have deleted the killed call's metrics; they are kept beside the new ones.
    assert (run_dir / "csv" / "metrics.before_resume1.csv").read_text() == earlier_metrics
    assert "privacy/epsilon" in (run_dir / "csv" / "metrics.csv").read_text()
    # The run's wall time counts the killed call's training up to its checkpoint as well as the resumed call's.
    before = killed_at["dpdm"]["training_seconds"]
    assert before > 0
    assert summary["resumed"] == {"at_step": killed_at["global_step"], "training_s_before": before,
                                  "wall_time_s_this_call": summary["resumed"]["wall_time_s_this_call"]}
    assert summary["wall_time_s"] == pytest.approx(summary["resumed"]["wall_time_s_this_call"] + before, abs=0.06)
    full_summary = json.loads((full_run / "summary.json").read_text())
    assert "resumed" not in full_summary
    assert 0 < _load(full_run / "checkpoints/last.ckpt")["dpdm"]["training_seconds"] <= full_summary["wall_time_s"]
    # Resumed from a checkpoint without it, the earlier time is unknown: the summary says so and counts this call.
    proc = _train(f"ckpt_path={old_dir / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={old_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "does not record its training time" in proc.stdout + proc.stderr
    old_summary = json.loads((old_dir / "summary.json").read_text())
    assert old_summary["resumed"]["training_s_before"] is None
    assert old_summary["wall_time_s"] == old_summary["resumed"]["wall_time_s_this_call"]

    a, b = _load(full_run / "checkpoints/last.ckpt"), _load(ckpt)
    assert a["global_step"] == b["global_step"] == TOTAL_STEPS
    # Accountant history, DP-noise and diffusion-noise generators, data-sampler generator: all restored.
    assert a["dpdm"]["accountant"]["history"] == b["dpdm"]["accountant"]["history"]
    assert torch.equal(a["dpdm"]["noise_rng"], b["dpdm"]["noise_rng"])
    assert torch.equal(a["dpdm"]["diffusion_rng"], b["dpdm"]["diffusion_rng"])
    dm_key = next(k for k in a if "sampler_generator_state" in (a[k] if isinstance(a[k], dict) else {}))
    assert torch.equal(a[dm_key]["sampler_generator_state"], b[dm_key]["sampler_generator_state"])
    # Model, EMA and optimizer state: bit for bit (resume at an epoch boundary is exact).
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("ema.") for k in a["state_dict"])
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name])), (i, name)


def test_a_run_resumed_at_an_epoch_end_ends_at_its_planned_steps(tmp_path):
    """fmnist_eps10_cpu's shape: max_steps inside the last epoch (500 of 9 x 58) and a checkpoint every second
    epoch. Lightning 2.6 resumes such a checkpoint by replaying its epoch with one step and then ran one epoch
    too few: a run planned for 500 steps ended at 465 (here 13 of 14). A DP run stops on its planned steps
    alone, so the resumed run takes them all and spends the ε the uninterrupted run spends."""
    args = [a for a in SHRINK if not a.startswith("trainer.max_epochs")] + [
        "trainer.max_epochs=4", "trainer.max_steps=14", "callbacks.model_checkpoint.every_n_epochs=2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    proc = subprocess.run([str(BIN / "dpdm-train"), *args, f"hydra.run.dir={full}"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, killed_at = _killed_at_first_checkpoint(args, resumed)
    assert killed_at["global_step"] == 8  # the end of epoch 1, the first epoch a checkpoint is written at
    proc = subprocess.run([str(BIN / "dpdm-train"), *args, f"hydra.run.dir={resumed}",
                           f"ckpt_path={resumed / 'checkpoints' / 'last.ckpt'}"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "privacy.json").read_text()) for d in (full, resumed))
    assert a["steps"] == b["steps"] == 14
    assert b["epsilon"] == pytest.approx(a["epsilon"], rel=1e-9)
    assert json.loads((resumed / "summary.json").read_text())["optimizer_steps"] == 14
    # Not bit for bit: after the replayed epoch the batches differ from the uninterrupted run's (docs/usage.md).


def test_resuming_a_spent_budget_with_the_same_config_is_refused(full_run):
    before = _files(full_run)
    proc = _train_here(f"ckpt_path={full_run / 'checkpoints/last.ckpt'}", f"hydra.run.dir={full_run}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "privacy budget of this run is spent" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _files(full_run) == before


@pytest.mark.parametrize("override", ["privacy.max_grad_norm=2.0", "loss.noise_multiplicity=3",
                                      "data.batch_size=20"])
def test_resume_that_changes_the_mechanism_is_refused(full_run, tmp_path, override):
    before = _files(full_run)
    proc = _train_here(override, f"ckpt_path={full_run / 'checkpoints/last.ckpt'}",
                  f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Refusing to resume: the config changes the privacy mechanism" in proc.stderr
    key = {"privacy.max_grad_norm=2.0": "max_grad_norm", "loss.noise_multiplicity=3": "noise_multiplicity",
           "data.batch_size=20": "expected_batch_size"}[override]
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _files(full_run) == before
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("override", ["seed=1", "data.subset_size=50"])
def test_resume_on_other_private_data_is_refused(full_run, tmp_path, override):
    # seed=1 draws another 40-example subset (data.seed follows seed): same N, same plan, other people.
    # The accountant's history belongs to the data it was spent on. (subset_size=50 changes N as well.)
    before = _files(full_run)
    proc = _train_here(override, f"ckpt_path={full_run / 'checkpoints/last.ckpt'}",
                  f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("trained on other data" in proc.stderr if override == "seed=1"
            else "changes the privacy mechanism" in proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert _files(full_run) == before


def test_two_resumes_of_one_checkpoint_draw_independent_noise_and_batches(tmp_path):
    """A checkpoint cannot fork the noise: without known seeds it holds no noise or sampler state, and each
    resume draws fresh OS-entropy noise and batches. If both forks replayed the same stream, their weights
    would be identical and their difference noise-free (docs/privacy.md)."""
    private = [a for a in SHRINK if not a.startswith(("privacy.noise_seed", "data.sampler_seed"))]
    origin = tmp_path / "origin"

    def train(*extra):
        return run_cli("dpdm-train", *private, *extra)

    proc = train(f"hydra.run.dir={origin}", "callbacks.model_checkpoint.save_top_k=-1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first_epoch = next((origin / "checkpoints").glob("epoch=0-*.ckpt"))
    state = _load(first_epoch)
    assert "noise_rng" not in state["dpdm"] and "accountant" in state["dpdm"]
    assert not any("sampler_generator_state" in v for v in state.values() if isinstance(v, dict))
    finals = []
    for fork in ("a", "b"):
        proc = train(f"ckpt_path='{first_epoch}'", f"hydra.run.dir={tmp_path / fork}")  # quoted: '=' in name
        assert proc.returncode == 0, proc.stderr[-3000:]
        resumed = json.loads((tmp_path / fork / "privacy.json").read_text())
        assert resumed["steps"] == TOTAL_STEPS  # the accountant continued from the checkpoint
        assert "known_seeds" not in resumed and "warning" not in resumed  # OS entropy: no caveat
        finals.append(_load(tmp_path / fork / "checkpoints" / "last.ckpt")["state_dict"])
    weights = [k for k in finals[0] if not k.startswith("ema.")]
    assert any(not torch.equal(finals[0][k], finals[1][k]) for k in weights)
