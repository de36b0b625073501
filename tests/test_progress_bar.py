"""The training progress bar shows noised images/s, ε spent so far (from the accountant) and the run's ETA; without
a bar, ProgressLog writes the same to the log."""
import logging
import re

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from dpdm.training.callbacks import DPProgressBar, ProgressLog, _hms
from dpdm.training.module import DPDiffusionModule
from dpdm.training.privacy_plan import PrivacyPlan
from tests.helpers import tiny_denoiser


class Snapshot(pl.Callback):
    def __init__(self, bar):
        self.bar, self.seen = bar, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = dict(self.bar.get_metrics(trainer, pl_module))
        self.seen.append((pl_module.steps_taken, metrics, self.bar.eta_s))


def _fit_tiny(callbacks, *, enable_progress_bar: bool):
    den = tiny_denoiser(num_classes=3)
    plan = PrivacyPlan(enabled=True, target_epsilon=10.0, delta=1e-5, noise_multiplier=1.0,
                       max_grad_norm=1.0, sample_rate=0.2, expected_batch_size=2, steps_per_epoch=5,
                       planned_steps=10, max_steps=10, noise_multiplicity=2, accountant="rdp",
                       dataset_size=10)
    module = DPDiffusionModule(net=den.net, plan=plan, preconditioning=den.precond)
    trainer = pl.Trainer(max_epochs=2, precision="64-true", accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                         enable_progress_bar=enable_progress_bar, callbacks=callbacks)
    x = torch.rand((10, 1, 8, 8), dtype=torch.float64)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.long)),
                                                     batch_size=2))
    return module


def test_bar_shows_images_per_second_epsilon_and_eta():
    bar = DPProgressBar(epsilon_every_s=0)
    snap = Snapshot(bar)
    module = _fit_tiny([bar, snap], enable_progress_bar=True)
    steps, last, eta_end = snap.seen[-1]
    assert steps == 10
    assert "img/s" in last
    # ε in the bar is the accountant's for the steps taken so far, against the target.
    shown, target = last["ε"].split("/")
    assert float(shown) == pytest.approx(module.epsilon_spent(), rel=1e-2) and float(target) == 10
    early = snap.seen[2][1]
    assert float(early["ε"].split("/")[0]) < float(shown)  # it grows during training
    # ETA counts down to 0:00:00 at the last step of the run (not of the epoch).
    assert last["ETA"] == "0:00:00" and eta_end == 0
    steps_5, _, eta_5 = snap.seen[4]  # end of epoch 1: 5 steps of the run still to go
    assert steps_5 == 5 and eta_5 > 0


def test_hms():
    assert _hms(0) == "0:00:00" and _hms(3725.4) == "1:02:05"


def test_progress_log_writes_step_epsilon_rate_and_eta_when_there_is_no_bar(caplog):
    from opacus.accountants import RDPAccountant

    with caplog.at_level(logging.INFO, logger="dpdm.train"):
        # a line at every step; a rate from 4 step durations on
        _fit_tiny([ProgressLog(every_s=1e-9, min_steps=4)], enable_progress_bar=False)
    lines = _logged(caplog)
    assert len(lines) == 10
    assert lines[0].startswith("step 1/10 (10%), ε ")
    # step k's line has k - 1 durations behind it: no rate or ETA rests on fewer than min_steps of them
    assert ["noised images/s" in line and "ETA" in line for line in lines] == [False] * 4 + [True] * 6
    last = lines[-1]
    assert last.startswith("step 10/10 (100%), ε ") and last.endswith("ETA 0:00:00")
    # ε is the RDP accountant's for the 10 steps of q = 0.2 and σ = 1 (an accountant built here)
    reference = RDPAccountant()
    reference.history = [(1.0, 0.2, 10)]
    shown, target = last.split("ε ")[1].split(",")[0].split("/")
    assert float(shown) == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-2) and target == "10"
    assert re.search(r", (\d+) noised images/s, ", last)


def test_progress_log_keeps_quiet_beside_a_bar_and_spaces_its_lines(caplog):
    with caplog.at_level(logging.INFO, logger="dpdm.train"):
        _fit_tiny([ProgressLog(every_s=1e-9), DPProgressBar(epsilon_every_s=0)], enable_progress_bar=True)
    assert _logged(caplog) == []
    with caplog.at_level(logging.INFO, logger="dpdm.train"):
        _fit_tiny([ProgressLog(every_s=3600)], enable_progress_bar=False)  # only the last step's line in an hour
    assert [line.split(",")[0] for line in _logged(caplog)] == ["step 10/10 (100%)"]


def _logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dpdm.train"]


def test_progress_log_refuses_a_period_that_is_not_positive_and_a_minimum_outside_its_window():
    with pytest.raises(ValueError, match="every_s must be > 0"):
        ProgressLog(every_s=0)
    with pytest.raises(ValueError, match="min_steps must be in"):
        ProgressLog(min_steps=0)
    with pytest.raises(ValueError, match="min_steps must be in"):
        ProgressLog(window=5, min_steps=6)
