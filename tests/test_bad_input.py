"""Bad input to dpdm-train / dpdm-sample: one clear message, exit code 2, no traceback, nothing earlier
overwritten, and no training started (each case fails within seconds of startup)."""
from pathlib import Path

import pytest
import torch

from tests.helpers import run_cli

SHRINK = ["experiment=smoke", "debug=tiny"]


def _run(script, args, env_extra=None):
    return run_cli(script, *args, env=env_extra)  # in this process: a refusal costs no start-up imports


def _assert_one_clear_message(proc, expected):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Error in call to target" not in proc.stderr, proc.stderr
    assert proc.stderr.count("error:") == 1, proc.stderr[-3000:]
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert "Epoch 0" not in proc.stderr  # refused before training


def _truncated_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "dpdm": {}}, path)
    path.write_bytes(path.read_bytes()[:600])
    return path


def _garbage_checkpoint(path: Path) -> Path:
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    return path


TRAIN_CASES = {
    "epsilon_zero": (["privacy.epsilon=0"], "privacy.epsilon must be > 0"),
    "delta_at_least_1_over_N": (["privacy.delta=0.025"], "privacy.delta=0.025 must be in (0, 1/N)"),
    "K_below_1": (["loss.noise_multiplicity=0"], "noise_multiplicity must be >= 1"),
    "batch_larger_than_dataset": (["data.batch_size=41"], "exceeds the 40 training examples"),
    "unknown_dataset": (["data.name=imagenet"], "unknown dataset 'imagenet'"),
    "missing_checkpoint": (["ckpt_path={tmp}/nope.ckpt"], "does not exist"),
    "truncated_checkpoint": (["ckpt_path={truncated}"], "corrupted or truncated"),
    "corrupted_checkpoint": (["ckpt_path={garbage}"], "corrupted or truncated"),
    "code_in_checkpoint": (["ckpt_path={evil}"], "could run code from the file"),
    # Configs that would run another mechanism than the accountant counts (training/config_guard.py).
    "fixed_batches_with_privacy": (["data.poisson_sampling=false"],
                                   "data.poisson_sampling=false with privacy enabled is refused"),
    "fp16_precision": (["trainer.precision=16-mixed"], "trainer.precision=16-mixed is refused"),
    "lightning_replaces_the_sampler": (["trainer.use_distributed_sampler=true"],
                                       "trainer.use_distributed_sampler=true with privacy enabled is refused"),
    "gradient_accumulation": (["+trainer.accumulate_grad_batches=2"], "accumulate_grad_batches=2 is refused"),
    "fewer_batches_per_epoch": (["+trainer.limit_train_batches=0.5"], "limit_train_batches=0.5 is refused"),
    # Nothing computed from the private training split leaves the run unless asked for (docs/privacy.md).
    "eval_against_training_split": (["callbacks=eval", "callbacks.eval_fid.evaluation.reference_splits=[train]"],
                                    "the training split is the private data"),
}


class _RunsCodeWhenUnpickled:
    """A checkpoint entry whose unpickling creates a file: stands for any code an attacker ships."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _code_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {}, "dpdm": {}, "extra": _RunsCodeWhenUnpickled(path.with_suffix(".pwned"))}, path)
    return path


def test_the_code_checkpoint_really_runs_code_when_fully_unpickled(tmp_path):
    # What the refusal protects against: the same file under weights_only=False creates its marker.
    ckpt = _code_checkpoint(tmp_path / "evil.ckpt")
    torch.load(ckpt, weights_only=False)
    assert (tmp_path / "evil.pwned").exists()


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_bad_input(case, tmp_path):
    args, expected = TRAIN_CASES[case]
    subs = {"tmp": tmp_path, "truncated": _truncated_checkpoint(tmp_path / "t.ckpt"),
            "garbage": _garbage_checkpoint(tmp_path / "g.ckpt"), "evil": _code_checkpoint(tmp_path / "evil.ckpt")}
    args = [a.format(**subs) for a in args]
    run_dir = tmp_path / "run"
    proc = _run("dpdm-train", [*SHRINK, *args, f"hydra.run.dir={run_dir}"])
    _assert_one_clear_message(proc, expected)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "privacy.json").exists()
    assert not (run_dir / "config.yaml").exists()  # refused before anything was written
    assert not (tmp_path / "evil.pwned").exists()  # no code from a checkpoint ran


def test_train_missing_data_it_cannot_fetch_says_how_to_get_it(tmp_path):
    # MNIST and Fashion-MNIST are fetched by dpdm-train itself (test_train_cli.py); CelebA cannot be.
    proc = _run("dpdm-train", [*SHRINK, "data=celeba32", f"hydra.run.dir={tmp_path / 'run'}"],
                env_extra={"DPDM_DATA_DIR": str(tmp_path / "empty")})
    _assert_one_clear_message(proc, "dpdm-data celeba32")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_train_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = _run("dpdm-train", [*SHRINK, f"hydra.run.dir={blocker / 'run'}"])
    _assert_one_clear_message(proc, "cannot be created or written")
    assert blocker.read_text() == ""


def test_train_refuses_to_overwrite_an_earlier_run_dir(tmp_path):
    run_dir = tmp_path / "finished"
    (run_dir / "checkpoints").mkdir(parents=True)
    earlier = {"privacy.json": b'{"epsilon": 1.0}', "summary.json": b"{}",
               "checkpoints/last.ckpt": b"earlier checkpoint", "config.yaml": b"earlier: config\n"}
    for rel, data in earlier.items():
        (run_dir / rel).write_bytes(data)
    proc = _run("dpdm-train", [*SHRINK, f"hydra.run.dir={run_dir}"])
    _assert_one_clear_message(proc, "already holds an earlier run's results")
    assert "ckpt_path=" in proc.stderr  # says how to continue that run instead
    for rel, data in earlier.items():
        assert (run_dir / rel).read_bytes() == data, rel


@pytest.mark.parametrize("kind", ["truncated", "garbage", "code"])
def test_sample_bad_checkpoint(kind, tmp_path):
    ckpt = {"truncated": lambda: _truncated_checkpoint(tmp_path / "t.ckpt"),
            "garbage": lambda: _garbage_checkpoint(tmp_path / "g.ckpt"),
            "code": lambda: _code_checkpoint(tmp_path / "evil.ckpt")}[kind]()
    proc = _run("dpdm-sample", [f"ckpt={ckpt}", "n=2", f"out={tmp_path / 'o'}"])
    _assert_one_clear_message(proc, "could run code" if kind == "code" else "corrupted or truncated")
    assert not (tmp_path / "o" / "samples.npz").exists()
    assert not (tmp_path / "evil.pwned").exists()


@pytest.mark.parametrize("tool", ["dpdm-evaluate", "dpdm-privacy"])
def test_evaluate_and_privacy_refuse_a_checkpoint_that_would_run_code(tool, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = _code_checkpoint(run / "checkpoints" / "last.ckpt")
    args = [str(ckpt), f"out={tmp_path / 'o'}"] if tool == "dpdm-evaluate" else ["epsilon", str(run)]
    proc = _run(tool, args)
    _assert_one_clear_message(proc, "could run code")
    assert not (run / "checkpoints" / "last.pwned").exists()
