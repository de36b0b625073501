"""The Gaussian noise of DP-SGD, on the real path (make_dp_components on a tiny DDPM++ U-Net), and
Poisson batches (varying size, empty ones) through the LightningModule.

Noise: with noise multiplier σ, clip norm C and expected batch size E, the update handed to Adam is
(Σ_i clip(g_i) + N(0, σ²C² I)) / E, so per coordinate the noise has mean 0 and std σC/E.
Test: over all n coordinates z_j = noise_j / (σC/E); Σ z_j² ~ χ²(n) and Σ z_j / √n ~ N(0, 1).
Both are tested two-sided at false-alarm rate α = 1e-6 each. The same statistic computed against a
σ mis-scaled by √2 or 2 (either way) must reject — so the test has the power to catch such a bug.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from opacus.data_loader import DPDataLoader
from scipy import stats
from torch.utils.data import TensorDataset

from dpdm.diffusion.loss import denoising_loss_per_example, draw_training_noise
from dpdm.diffusion.noise_levels import LogNormalSigma
from dpdm.privacy.engine import make_dp_components
from dpdm.privacy.grads_opacus import set_empty_grad_samples
from dpdm.training.module import DPDiffusionModule
from dpdm.training.privacy_plan import PrivacyPlan
from tests.helpers import tiny_denoiser

ALPHA = 1e-6
SIGMA, C, E = 1.3, 0.7, 16


def noise_test(values: np.ndarray, std: float) -> tuple[bool, bool]:
    """(mean ok, variance ok) at two-sided false-alarm rate ALPHA for i.i.d. N(0, std²) values."""
    z = values.ravel() / std
    n = z.size
    crit = stats.norm.isf(ALPHA / 2)
    mean_ok = abs(z.sum() / math.sqrt(n)) < crit
    s = float(np.square(z).sum())
    var_ok = stats.chi2.ppf(ALPHA / 2, n) < s < stats.chi2.isf(ALPHA / 2, n)
    return bool(mean_ok), bool(var_ok)


def _components(net, sigma, *, K=1, secure_mode=False, noise_seed=None):
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    return make_dp_components(net, opt, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=E,
                              sample_rate=E / 1000, noise_multiplicity=K, secure_mode=secure_mode,
                              noise_seed=noise_seed)


def _flat_grad(net) -> np.ndarray:
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()]).detach().numpy()


def _assert_std_and_power(noise: np.ndarray):
    std = SIGMA * C / E
    assert noise.size > 10_000
    assert noise_test(noise, std) == (True, True)
    # Power: a √2 or 2 error in σ (either direction) would be caught by the variance test.
    for wrong in (math.sqrt(2), 2.0, 1 / math.sqrt(2), 0.5):
        assert noise_test(noise, std * wrong)[1] is False, wrong
    # And a noise that were missing the 1/E (or divided twice) is far off.
    assert noise_test(noise, std * E)[1] is False and noise_test(noise, std / E)[1] is False


@pytest.mark.parametrize("secure_mode", [False, True])
def test_empty_batch_step_is_pure_noise_with_std_sigma_C_over_E(secure_mode):
    net = tiny_denoiser().net
    dp = _components(net, SIGMA, secure_mode=secure_mode)
    samples = []
    for _ in range(3):  # three empty Poisson batches: three independent noise draws
        set_empty_grad_samples(net)
        assert dp.optimizer.pre_step() is not False
        samples.append(_flat_grad(net))
        dp.optimizer.zero_grad()
    noise = np.concatenate(samples)
    _assert_std_and_power(noise)
    assert not np.allclose(samples[0], samples[1])  # fresh noise each step
    assert sum(n for _, _, n in dp.accountant.history) == 3  # empty steps are accounted


@pytest.mark.parametrize("K", [1, 3])
def test_real_batch_noise_is_the_difference_to_the_sigma_zero_update(K):
    """Same data, same diffusion draws, same clipping: update(σ) − update(0) is the noise alone."""
    den = tiny_denoiser(num_classes=3)
    g = torch.Generator().manual_seed(0)
    B = 5
    x = torch.rand((B, 1, 8, 8), generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 3, (B,), generator=g)
    tn = draw_training_noise(x, y, noise_multiplicity=K, noise_levels=LogNormalSigma(), label_dropout=0.1,
                             null_label=den.null_label, generator=g)
    updates, norms = {}, None
    for sigma in (0.0, SIGMA):
        d = copy.deepcopy(den)
        dp = _components(d.net, sigma, K=K)
        with dp.per_example.capture():
            losses = denoising_loss_per_example(d, x, tn)
        dp.per_example.backward(losses)
        norms = torch.stack([p.grad_sample.reshape(B, -1).norm(dim=1) for p in d.net.parameters()]).norm(dim=0)
        dp.optimizer.pre_step()
        updates[sigma] = _flat_grad(d.net)
    assert norms.min() > C  # the clean part is clipped, so it is not just zero
    assert np.abs(updates[0.0]).max() > 1e-4
    _assert_std_and_power(updates[SIGMA] - updates[0.0])


def test_noise_seed_reproduces_and_os_entropy_does_not():
    def draw(seed):
        net = tiny_denoiser().net
        dp = _components(net, SIGMA, noise_seed=seed)
        set_empty_grad_samples(net)
        dp.optimizer.pre_step()
        return _flat_grad(net)

    assert np.array_equal(draw(7), draw(7))
    assert not np.allclose(draw(None), draw(None))


# --- Poisson batches through the LightningModule --------------------------------------------------

N, Q = 40, 1 / 40  # expected batch size 1: about (1 − 1/40)^40 ≈ 36% of batches are empty


class CountingModule(DPDiffusionModule):
    sizes: list

    def training_step(self, batch, batch_idx):
        self.sizes.append(int(batch[0].shape[0]))
        return super().training_step(batch, batch_idx)


def test_poisson_batches_vary_and_empty_ones_are_noise_only_steps_that_are_accounted():
    den = tiny_denoiser(num_classes=3, attention=False)
    steps = int(1 / Q)
    plan = PrivacyPlan(enabled=True, target_epsilon=100.0, delta=1e-3, noise_multiplier=1.0,
                       max_grad_norm=1.0, sample_rate=Q, expected_batch_size=1, steps_per_epoch=steps,
                       planned_steps=steps, max_steps=steps, noise_multiplicity=2, accountant="rdp",
                       dataset_size=N)
    module = CountingModule(net=den.net, plan=plan, preconditioning=den.precond, max_physical_batch_size=2,
                            ema_rate=0.9, noise_seed=3)
    module.sizes = []
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand((N, 1, 8, 8), generator=g, dtype=torch.float64) * 2 - 1,
                         torch.randint(0, 3, (N,), generator=g))
    loader = DPDataLoader(data, sample_rate=Q, generator=torch.Generator().manual_seed(11))
    before = [p.detach().clone() for p in module.denoiser.parameters()]
    trainer = pl.Trainer(max_epochs=1, precision="64-true", accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)

    sizes = module.sizes
    assert len(sizes) == steps
    assert 0 in sizes, sizes  # empty batches occurred ...
    assert len(set(sizes)) >= 3 and max(sizes) > 2, sizes  # ... sizes vary, and some need two chunks
    # Every logical batch, empty or not, is one DP-SGD step, counted by the accountant and by Lightning.
    assert module.steps_taken == steps == trainer.global_step
    assert module.dp.accountant.history == [(1.0, Q, steps)]
    assert 0 < module.epsilon_spent() < math.inf
    after = list(module.denoiser.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
