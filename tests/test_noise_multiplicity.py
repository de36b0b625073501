"""The per-example gradient that reaches clipping is the gradient of the K-averaged loss.

Reference: brute-force autograd, one example at a time, of ℓ_i = mean_k λ(σ_ik)‖D(x_i + σ_ik n_ik) − x_i‖²
with the same noise draws, in float64.
"""
import pytest
import torch

from dpdm.diffusion.loss import TrainingNoise, denoising_loss_per_example, draw_training_noise
from dpdm.diffusion.noise_levels import LogNormalSigma
from dpdm.privacy.noise_multiplicity import NoiseMultiplicityGradSampleHooks
from tests.helpers import tiny_denoiser


def _noise_for(tn: TrainingNoise, i: int) -> TrainingNoise:
    labels = None if tn.class_labels is None else tn.class_labels[i:i + 1]
    return TrainingNoise(tn.sigma[i:i + 1], tn.noise[i:i + 1], labels)


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("conditional", [True, False])
def test_per_example_grad_equals_bruteforce_of_k_averaged_loss(K, conditional):
    B = 5
    den = tiny_denoiser(num_classes=3 if conditional else 0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((B, 1, 8, 8), generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 3, (B,), generator=g) if conditional else None
    tn = draw_training_noise(x, y, noise_multiplicity=K, sigma_dist=LogNormalSigma(),
                             label_dropout=0.3, null_label=den.null_label, generator=g)

    # Reference first, on the plain module (no hooks).
    params = [p for p in den.parameters() if p.requires_grad]
    ref = []
    for i in range(B):
        loss_i = denoising_loss_per_example(den, x[i:i + 1], _noise_for(tn, i))[0]
        ref.append(torch.autograd.grad(loss_i, params))

    hooks = NoiseMultiplicityGradSampleHooks(den.net, noise_multiplicity=K)
    try:
        denoising_loss_per_example(den, x, tn).mean().backward()
        worst = 0.0
        for j, p in enumerate(params):
            assert p.grad_sample.shape == (B, *p.shape)
            for i in range(B):
                worst = max(worst, (p.grad_sample[i] - ref[i][j]).abs().max().item())
        assert worst < 1e-10, worst
        # The reference is not trivially zero.
        assert max(r.abs().max().item() for r in ref[0]) > 1e-3
    finally:
        hooks.cleanup()


def test_rows_not_multiple_of_k_are_refused():
    den = tiny_denoiser(num_classes=0)
    hooks = NoiseMultiplicityGradSampleHooks(den.net, noise_multiplicity=4)
    try:
        x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
        out = den(x, torch.ones(6, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="multiple of"):
            out.square().mean().backward()
    finally:
        hooks.cleanup()


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="noise_multiplicity"):
        NoiseMultiplicityGradSampleHooks(tiny_denoiser().net, noise_multiplicity=0)
