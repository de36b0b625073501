"""dpdm-privacy (run as `python -m dpdm.cli.privacy`): σ for a budget, and a finished run's ε re-derived
from its checkpoint's accountant history against privacy.json."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from dpdm.privacy.accounting import calibrate_noise_multiplier, mechanism_epsilon
from dpdm.training.privacy_plan import make_privacy_plan
from tests.helpers import REPO, cli_env, run_cli

SHRINK = ["experiment=smoke", "data.subset_size=200", "data.batch_size=100", "trainer.max_epochs=1",
          "max_physical_batch_size=64", "callbacks.sample_grid.per_class=2",
          "callbacks.sample_grid.num_steps=3"]


def _env():
    return cli_env()


def cli_subprocess(*args):
    """The real entry point, `python -m dpdm.cli.privacy` (what the console script calls)."""
    return subprocess.run([sys.executable, "-m", "dpdm.cli.privacy", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)


def cli(*args):
    """dpdm-privacy in this process (importing torch + Opacus per subprocess costs seconds)."""
    return run_cli("dpdm-privacy", *map(str, args))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("privacy_cli") / "run"
    proc = run_cli("dpdm-train", *SHRINK, f"hydra.run.dir={d}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


# --- sigma ----------------------------------------------------------------------------------------

def test_sigma_from_rate_and_steps_round_trips():
    proc = cli_subprocess("sigma", "--epsilon", 3, "--delta", 1e-5, "--sample-rate", 0.02, "--steps", 400,
                          "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["noise_multiplier"] == calibrate_noise_multiplier(target_epsilon=3, delta=1e-5,
                                                                 sample_rate=0.02, steps=400)
    assert 0.999 * 3 <= out["epsilon"] <= 3
    assert out["epsilon"] == mechanism_epsilon(noise_multiplier=out["noise_multiplier"], sample_rate=0.02,
                                           steps=400, delta=1e-5)


def test_sigma_epochs_use_floor_of_one_over_q():
    proc = cli("sigma", "--epsilon", 3, "--delta", 1e-5, "--sample-rate", 0.03, "--epochs", 2, "--json")
    assert json.loads(proc.stdout)["steps"] == 2 * 33  # ⌊1/0.03⌋ = 33


def test_sigma_from_batch_and_dataset_size_is_the_training_plan():
    proc = cli("sigma", "--epsilon", 10, "--delta", 1e-5, "--batch-size", 256, "--dataset-size", 60000,
               "--epochs", 3)
    assert proc.returncode == 0, proc.stderr
    plan = make_privacy_plan(enabled=True, epsilon=10, delta=1e-5, max_grad_norm=1.0, accountant="rdp",
                             noise_multiplier=None, batch_size=256, dataset_size=60000, epochs=3,
                             noise_multiplicity=1)
    assert plan.planned_steps == 3 * 234
    assert f"σ = {plan.noise_multiplier:.6g}" in proc.stdout and "steps = 702" in proc.stdout
    assert "accountant: rdp" in proc.stdout and "reproduces ε = " in proc.stdout


def test_sigma_with_prv_accountant():
    proc = cli("sigma", "--epsilon", 2, "--delta", 1e-5, "--sample-rate", 0.05, "--steps", 60,
               "--accountant", "prv", "--json")
    out = json.loads(proc.stdout)
    assert out["accountant"] == "prv" and 0.999 * 2 <= out["epsilon"] <= 2
    # PRV is tighter than RDP: it needs no more noise.
    rdp = calibrate_noise_multiplier(target_epsilon=2, delta=1e-5, sample_rate=0.05, steps=60)
    assert out["noise_multiplier"] <= rdp


@pytest.mark.parametrize("args,match", [
    (["--delta", 1e-2, "--batch-size", 10, "--dataset-size", 1000, "--epochs", 1], "delta"),
    (["--delta", 1e-5, "--sample-rate", 1.5, "--steps", 10], "sample-rate"),
    (["--delta", 1e-5, "--batch-size", 10, "--epochs", 1], "dataset-size"),
    (["--delta", 1e-5, "--sample-rate", 0.1], "epochs"),
])
def test_sigma_bad_arguments_exit_nonzero_with_one_message(args, match):
    proc = cli("sigma", "--epsilon", 1, *args)
    assert proc.returncode != 0
    assert match in proc.stderr and "Traceback" not in proc.stderr


# --- epsilon <run_dir> ------------------------------------------------------------------------------

def test_epsilon_of_a_finished_run_matches_privacy_json(run_dir):
    ledger = json.loads((run_dir / "privacy.json").read_text())
    proc = cli_subprocess("epsilon", run_dir, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["agree"] and out["accountant"] == ledger["accountant"] == "rdp"
    assert out["steps"] == ledger["steps"] == 2
    assert out["epsilon"] == pytest.approx(ledger["epsilon"], rel=1e-9)
    assert out["epsilon"] == pytest.approx(mechanism_epsilon(
        noise_multiplier=ledger["noise_multiplier"], sample_rate=ledger["sample_rate"], steps=2,
        delta=ledger["delta"]), rel=1e-9)
    text = cli("epsilon", run_dir)
    assert text.returncode == 0
    assert "accountant: rdp" in text.stdout and "agree" in text.stdout
    assert f"{out['epsilon']:.6g}" in text.stdout


def _copy(run_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst)
    return dst


def test_edited_privacy_json_is_a_mismatch(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    ledger = json.loads((d / "privacy.json").read_text())
    ledger["epsilon"] *= 0.5
    (d / "privacy.json").write_text(json.dumps(ledger))
    proc = cli("epsilon", d)
    assert proc.returncode != 0 and "MISMATCH" in proc.stdout and "does not match" in proc.stderr


@pytest.mark.parametrize("damage,match", [
    ("missing_dir", "does not exist"),
    ("truncated_ckpt", "corrupted"),
    ("missing_ckpt", "does not exist"),
    ("missing_json", "privacy.json"),
    ("garbage_json", "corrupted"),
])
def test_broken_run_dir_exits_nonzero_with_one_message(run_dir, tmp_path, damage, match):
    d = tmp_path / "nope" if damage == "missing_dir" else _copy(run_dir, tmp_path)
    if damage == "missing_dir":  # through the real entry point: one line on stderr, exit 2
        proc = cli_subprocess("epsilon", d)
        assert proc.returncode == 2 and match in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.strip().count("\n") == 0
        return
    ckpt = d / "checkpoints" / "last.ckpt"
    if damage == "truncated_ckpt":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif damage == "missing_ckpt":
        ckpt.unlink()
    elif damage == "missing_json":
        (d / "privacy.json").unlink()
    elif damage == "garbage_json":
        (d / "privacy.json").write_text("{not json")
    proc = cli("epsilon", d)
    assert proc.returncode != 0
    assert match in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0  # one message
