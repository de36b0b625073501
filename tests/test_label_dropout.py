"""loss.label_dropout = 0: a model without the unconditional half that guidance needs.

The presets sample with w = 0, which never evaluates D(x, ∅), so a run may spend every noised copy on the
conditional model (docs/recipes.md, "tried and not kept: no label dropout"). Such a model's null-label
embedding is never trained, so guidance and unconditional draws from it are refused with a message saying
what to do.
"""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dpdm.diffusion.samplers import check_null_label_trained
from dpdm.training.checkpoint import checkpoint_label_dropout, load_checkpoint
from tests.helpers import SHRINK, run_cli

NULL_ROW = "net.map_label.weight"


@pytest.fixture(scope="module")
def run_without_label_dropout(tmp_path_factory) -> Path:
    # Non-private, so that a parameter no example reaches gets no update at all (DP noise would move it).
    run_dir = tmp_path_factory.mktemp("nodrop")
    proc = run_cli("dpdm-train", *SHRINK, "privacy=none", "loss.label_dropout=0", "sampler.num_steps=2",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_without_label_dropout_the_null_label_never_moves_while_the_class_labels_do(run_without_label_dropout):
    ckpt = load_checkpoint(run_without_label_dropout / "checkpoints" / "last.ckpt")
    assert checkpoint_label_dropout(ckpt) == 0.0
    state = ckpt["state_dict"]
    trained, averaged = state[f"denoiser.{NULL_ROW}"], state[f"ema.{NULL_ROW}"]
    # The EMA starts as a copy of the initial weights and follows the trained ones: a row that kept its
    # initial value is equal in both, a row that was trained is not.
    null = trained.shape[0] - 1
    assert torch.equal(trained[null], averaged[null])
    assert not torch.allclose(trained[:null], averaged[:null])


def test_sampling_refuses_guidance_and_unconditional_draws_without_label_dropout(run_without_label_dropout,
                                                                                tmp_path):
    ckpt = f"ckpt={run_without_label_dropout / 'checkpoints' / 'last.ckpt'}"
    for name, args in {"guided": ["sampler.guidance=1"], "unconditional": ["classes=null"]}.items():
        proc = run_cli("dpdm-sample", ckpt, "n=4", f"out={tmp_path / name}", *args)
        assert proc.returncode != 0
        assert "loss.label_dropout=0" in proc.stderr and "sampler.guidance=0" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / name / "samples.npz").exists()
    # dpdm-evaluate draws from a checkpoint too (class-balanced): guidance refused there as well
    proc = run_cli("dpdm-evaluate", f"input={run_without_label_dropout / 'checkpoints' / 'last.ckpt'}",
                   "num_samples=10", "sampler.guidance=1", f"out={tmp_path / 'eval'}")
    assert proc.returncode != 0 and "loss.label_dropout=0" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "eval" / "eval.json").exists()
    proc = run_cli("dpdm-sample", ckpt, "n=4", f"out={tmp_path / 'w0'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(tmp_path / "w0" / "samples.npz")["y"].tolist() == [0, 1, 2, 3]


def test_training_refuses_a_guided_sampler_or_an_out_of_range_dropout_before_writing(tmp_path):
    for name, args, says in [("guided", ["loss.label_dropout=0", "sampler.guidance=1"], "loss.label_dropout=0"),
                             ("range", ["loss.label_dropout=1.5"], "must be in [0, 1]")]:
        run_dir = tmp_path / name
        proc = run_cli("dpdm-train", *SHRINK, *args, f"hydra.run.dir={run_dir}")
        assert proc.returncode != 0 and says in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize("null_label, label_dropout, guidance, unconditional, refused", [
    (10, 0.0, 1.0, False, True), (10, 0.0, 0.0, True, True), (10, 0.0, 0.0, False, False),
    (10, 0.1, 2.0, True, False), (10, None, 1.0, True, False), (None, 0.0, 1.0, True, False)])
def test_the_null_label_check_refuses_exactly_the_draws_that_need_it(null_label, label_dropout, guidance,
                                                                     unconditional, refused):
    denoiser, sampler = SimpleNamespace(null_label=null_label), {"guidance": guidance}
    if refused:
        with pytest.raises(ValueError, match="label_dropout=0"):
            check_null_label_trained(denoiser, label_dropout, sampler, unconditional=unconditional)
    else:
        check_null_label_trained(denoiser, label_dropout, sampler, unconditional=unconditional)
