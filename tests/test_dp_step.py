"""One real DP-SGD step through the LightningModule: clipping, averaging, chunked logical batches.

Reference: brute-force per-example gradients of the K-averaged loss with the same noise draws, clipped by
hand to norm C and summed, divided by the expected batch size — compared with the gradient the
optimizer hands to Adam (σ = 0, float64).
"""
import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from dpdm.diffusion.loss import denoising_loss_per_example, draw_training_noise
from dpdm.privacy.engine import ENGINES
from dpdm.training.privacy_plan import PrivacyPlan
from tests.helpers import RecordingModule, tiny_denoiser

K, C, E, SEED = 3, 0.05, 8, 0


def _plan(sigma: float) -> PrivacyPlan:
    return PrivacyPlan(enabled=True, target_epsilon=10.0, delta=1e-5, noise_multiplier=sigma,
                       max_grad_norm=C, sample_rate=E / 100, expected_batch_size=E,
                       steps_per_epoch=12, planned_steps=12, max_steps=12, noise_multiplicity=K,
                       accountant="rdp", dataset_size=100)


def _one_step(module, x, y):
    module.recorded = []
    trainer = pl.Trainer(max_steps=1, precision="64-true", accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=len(x)))
    return module.recorded[0]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("max_physical", [6, 4])  # one chunk, and 4 + 2 (a skipped step)
def test_update_is_mean_of_clipped_per_example_gradients(max_physical, engine):
    den = tiny_denoiser(num_classes=3)
    x = torch.rand((6, 1, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    reference_den = copy.deepcopy(den)
    module = RecordingModule(net=den.net, plan=_plan(0.0), preconditioning=den.precond,
                             label_dropout=0.3, ema_rate=0.9, max_physical_batch_size=max_physical,
                             seed=SEED, noise_seed=1, dp_engine=engine)
    got = _one_step(module, x, y)

    # Same diffusion noise as the module: its generator, seeded seed + 2, consumed chunk by chunk.
    g = torch.Generator().manual_seed(SEED + 2)
    params = list(reference_den.parameters())
    expected = [torch.zeros_like(p) for p in params]
    norms = []
    for start in range(0, 6, max_physical):
        xc, yc = x[start:start + max_physical], y[start:start + max_physical]
        tn = draw_training_noise(xc, yc, noise_multiplicity=K, noise_levels=module.noise_levels,
                                 label_dropout=0.3, null_label=3, generator=g)
        for i in range(len(xc)):
            sub = type(tn)(tn.sigma[i:i + 1], tn.noise[i:i + 1], tn.class_labels[i:i + 1])
            grads = torch.autograd.grad(denoising_loss_per_example(reference_den, xc[i:i + 1], sub)[0], params)
            norm = torch.sqrt(sum(gr.square().sum() for gr in grads))
            norms.append(norm.item())
            factor = min(1.0, C / (norm.item() + 1e-6))  # Opacus' clip factor
            for e, gr in zip(expected, grads, strict=True):
                e += factor * gr / E
    assert min(norms) > C, "test must exercise clipping"
    worst = max((a - b).abs().max().item() for a, b in zip(got, expected, strict=True))
    assert worst < 1e-12, worst


def test_each_clipped_per_example_gradient_has_norm_at_most_C():
    den = tiny_denoiser(num_classes=3)
    x = torch.rand((1, 1, 8, 8), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for label in range(3):
        module = RecordingModule(net=copy.deepcopy(den.net), plan=_plan(0.0),
                                 preconditioning=den.precond, max_physical_batch_size=4)
        got = _one_step(module, x, torch.tensor([label]))
        # With one example the step's gradient is its clipped gradient / E.
        norm = torch.sqrt(sum(g.square().sum() for g in got)).item() * E
        assert norm <= C * (1 + 1e-9)
        assert norm > 0.5 * C  # it was clipped down to C, not zeroed


def test_training_stops_at_the_last_step_within_budget():
    den = tiny_denoiser(num_classes=3)
    plan = _plan(0.5)
    plan = type(plan)(**{**plan.to_dict(), "max_steps": 2, "planned_steps": 5})
    module = RecordingModule(net=den.net, plan=plan, preconditioning=den.precond,
                             max_physical_batch_size=8)
    module.recorded = []
    x = torch.rand((10, 1, 8, 8), dtype=torch.float64)
    y = torch.zeros(10, dtype=torch.long)
    trainer = pl.Trainer(max_epochs=1, precision="64-true", accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=2))
    assert module.steps_taken == 2 == len(module.recorded)
    assert module.epsilon_spent() > 0


def test_bf16_mixed_step_clips_and_noises_in_fp32():
    """trainer.precision=bf16-mixed: the forward runs under autocast, but the gradient handed to Adam
    (clipped sum, noise, scaling) is fp32 and within bf16 rounding of the fp32 step (σ = 0)."""
    den = tiny_denoiser(num_classes=3, dtype=torch.float32)
    x = torch.rand((6, 1, 8, 8), generator=torch.Generator().manual_seed(5)) * 2 - 1
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    got = {}
    for precision in ("32-true", "bf16-mixed"):
        module = RecordingModule(net=copy.deepcopy(den.net), plan=_plan(0.0), preconditioning=den.precond,
                                 label_dropout=0.3, max_physical_batch_size=4, seed=SEED, noise_seed=1)
        module.recorded = []
        trainer = pl.Trainer(max_steps=1, precision=precision, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=len(x)))
        got[precision] = module.recorded[0]
    assert all(g.dtype == torch.float32 for g in got["bf16-mixed"])
    err = torch.sqrt(sum((a - b).square().sum() for a, b in zip(got["bf16-mixed"], got["32-true"], strict=True)))
    ref = torch.sqrt(sum(b.square().sum() for b in got["32-true"]))
    assert 0 < err / ref < 0.05, (err / ref).item()
