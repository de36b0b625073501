"""The four preconditionings and the noise-level distributions against their defining identities (float64).

References are computed independently of the code under test: the VP scale s(t) by numerical quadrature
of β(t), v-prediction's target from Salimans & Ho's definition v = α·n − s·y, the distributions through
scipy's own laws or the DPDM reference's formula for t(λ).
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from dpdm.diffusion.loss import TrainingNoise, denoising_loss_per_example
from dpdm.diffusion.noise_levels import LogNormalSigma, LogSNRCosine, VELogUniform, VPUniformT, check_compatible
from dpdm.diffusion.preconditioning import (
    Denoiser,
    EDMPreconditioning,
    VEPreconditioning,
    VPPreconditioning,
    VPredictionPreconditioning,
)
from dpdm.diffusion.schedules import vp_sigma, vp_sigma_inv

F64 = torch.float64
ALL = {"edm": EDMPreconditioning(), "vp": VPPreconditioning(), "ve": VEPreconditioning(),
       "v": VPredictionPreconditioning()}
SIGMAS = torch.logspace(-3, 2, 41, dtype=F64)  # 0.001 .. 100


def _draws(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = 0.6 * torch.randn(n, dtype=F64, generator=g)
    noise = torch.randn(n, dtype=F64, generator=g)
    sigma = torch.exp(torch.empty(n, dtype=F64).uniform_(math.log(1e-3), math.log(100), generator=g))
    return y, noise, sigma


def effective_target(p, y, noise, sigma):
    """F_target = (y − c_skip·x)/c_out: what F must output for D(x; σ) = y exactly."""
    return (y - p.c_skip(sigma) * (y + sigma * noise)) / p.c_out(sigma)


@pytest.mark.parametrize("name", ALL)
def test_loss_weight_makes_the_effective_weight_one(name):
    p = ALL[name]
    torch.testing.assert_close(p.loss_weight(SIGMAS) * p.c_out(SIGMAS) ** 2,
                               torch.ones_like(SIGMAS), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_denoiser_with_the_target_network_returns_clean_data(name):
    """Wiring: Denoiser feeds c_in·x and c_noise to F and returns c_skip·x + c_out·F."""
    p = ALL[name]
    y, noise, sigma = _draws()
    x = (y + sigma * noise).view(-1, 1)

    class Oracle(torch.nn.Module):
        def forward(self, x_in, c_noise, labels):
            torch.testing.assert_close(x_in, p.c_in(sigma.view(-1, 1)) * x)
            torch.testing.assert_close(c_noise, p.c_noise(sigma))
            return effective_target(p, y, noise, sigma).view(-1, 1)

    torch.testing.assert_close(Denoiser(Oracle(), p)(x, sigma).flatten(), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_loss_equals_unit_weight_regression_on_the_effective_target(name):
    """λ(σ)·‖D − y‖² = ‖F − F_target‖² through the training loss itself (B=4 examples, K=3 levels)."""
    p = ALL[name]
    B, K = 4, 3
    y, noise, sigma = _draws(B * K, seed=1)
    x0 = y.view(B * K, 1, 1, 1)[::K].contiguous()  # one clean value per example
    y_rep = x0.repeat_interleave(K, 0).flatten()
    tn = TrainingNoise(sigma=sigma.view(B, K), noise=noise.view(B, K, 1, 1, 1), class_labels=None)

    class Fixed(torch.nn.Module):  # some network output, a function of its inputs only
        def forward(self, x_in, c_noise, labels):
            return torch.sin(3 * x_in) + 0.1 * c_noise.view(-1, 1, 1, 1)

    den = Denoiser(Fixed(), p)
    loss = denoising_loss_per_example(den, x0, tn)
    x_noisy = y_rep + sigma * noise
    F = torch.sin(3 * p.c_in(sigma) * x_noisy) + 0.1 * p.c_noise(sigma)
    expected = (F - effective_target(p, y_rep, noise, sigma)).square().view(B, K).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_edm_limits_and_unit_variances():
    p, sd = EDMPreconditioning(), math.sqrt(1 / 3)
    tiny, huge = torch.tensor(1e-9, dtype=F64), torch.tensor(1e9, dtype=F64)
    assert abs(float(p.c_skip(tiny)) - 1) < 1e-15 and float(p.c_out(tiny)) < 1e-8
    assert float(p.c_skip(huge)) < 1e-15 and abs(float(p.c_out(huge)) - sd) < 1e-12
    # Unit-variance network input and effective target for data of variance σ_data² (EDM App. B.6).
    torch.testing.assert_close(p.c_in(SIGMAS) ** 2 * (SIGMAS**2 + sd**2), torch.ones_like(SIGMAS))
    c_skip, c_out = p.c_skip(SIGMAS), p.c_out(SIGMAS)
    target_var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * SIGMAS**2) / c_out**2
    torch.testing.assert_close(target_var, torch.ones_like(SIGMAS), rtol=1e-12, atol=0)
    # The loss weight of the paper (EDM Table 1): (σ² + σ_data²)/(σ·σ_data)².
    torch.testing.assert_close(p.loss_weight(SIGMAS), (SIGMAS**2 + 1 / 3) / (SIGMAS**2 / 3))


def test_vp_predicts_the_noise_and_matches_the_sde():
    p = VPPreconditioning()
    y, noise, sigma = _draws()
    torch.testing.assert_close(effective_target(p, y, noise, sigma), noise, rtol=1e-12, atol=1e-12)
    for t in (1e-5, 0.01, 0.3, 0.7, 1.0):
        # s(t) = exp(−½∫₀ᵗ β(u) du) by quadrature, β(u) = β_min + β_d·u (Song et al. 2021, VP SDE).
        integral, _ = integrate.quad(lambda u: 0.1 + 19.9 * u, 0, t)
        s_t = math.exp(-0.5 * integral)
        sigma_t = math.sqrt(1 / s_t**2 - 1)  # x_t = s·y + s·σ·n with s² + (sσ)² = 1
        st = torch.tensor(sigma_t, dtype=F64)
        assert float(vp_sigma(torch.tensor(t, dtype=F64), beta_d=19.9, beta_min=0.1)) == pytest.approx(
            sigma_t, rel=1e-10)
        assert float(p.c_in(st)) == pytest.approx(s_t, rel=1e-10)
        assert float(p.c_noise(st)) == pytest.approx(999 * t, rel=1e-9, abs=1e-9)
    assert p.sigma_domain[1] == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-12)


def test_ve_predicts_minus_the_noise():
    p = VEPreconditioning()
    y, noise, sigma = _draws()
    torch.testing.assert_close(effective_target(p, y, noise, sigma), -noise, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.c_noise(SIGMAS), torch.log(SIGMAS / 2))
    torch.testing.assert_close(p.c_in(SIGMAS), torch.ones_like(SIGMAS))


def test_v_prediction_predicts_v_on_the_vp_state():
    p = VPredictionPreconditioning()
    y, noise, sigma = _draws()
    alpha, s = 1 / torch.sqrt(1 + sigma**2), sigma / torch.sqrt(1 + sigma**2)  # α² + s² = 1
    # Network input is the VP state z = α·y + s·n, the target is v = α·n − s·y (Salimans & Ho 2022).
    torch.testing.assert_close(p.c_in(sigma) * (y + sigma * noise), alpha * y + s * noise)
    torch.testing.assert_close(effective_target(p, y, noise, sigma), alpha * noise - s * y,
                               rtol=1e-10, atol=1e-12)
    # "SNR + 1" weighting with SNR = α²/s², and EDM's form at σ_data = 1 with F's sign flipped.
    torch.testing.assert_close(p.loss_weight(sigma), alpha**2 / s**2 + 1)
    edm1 = EDMPreconditioning(sigma_data=1.0)
    for f in ("c_skip", "c_in", "loss_weight"):
        torch.testing.assert_close(getattr(p, f)(SIGMAS), getattr(edm1, f)(SIGMAS))
    torch.testing.assert_close(p.c_out(SIGMAS), -edm1.c_out(SIGMAS))
    # c_noise is the cosine-schedule time: tan(π t / 2) = σ.
    torch.testing.assert_close(torch.tan(math.pi / 2 * p.c_noise(SIGMAS)), SIGMAS)


# ---- noise-level distributions ---------------------------------------------------------------------

def _sample(dist, n=20000, seed=0):
    return dist.sample((n,), generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_lognormal_is_scipys_lognormal():
    d = LogNormalSigma(P_mean=-1.2, P_std=1.2)
    ref = stats.lognorm(s=1.2, scale=math.exp(-1.2))
    assert stats.kstest(_sample(d).numpy(), ref.cdf).pvalue > 1e-3
    torch.testing.assert_close(d.cdf(SIGMAS), torch.from_numpy(ref.cdf(SIGMAS.numpy())))


def test_vp_uniform_t_is_uniform_in_time():
    d = VPUniformT()
    t = vp_sigma_inv(_sample(d), beta_d=19.9, beta_min=0.1).numpy()
    assert stats.kstest(t, stats.uniform(loc=1e-5, scale=1 - 1e-5).cdf).pvalue > 1e-3


def test_ve_log_uniform_is_uniform_in_log_sigma():
    d = VELogUniform(sigma_min=0.02, sigma_max=100)
    ln = np.log(_sample(d).numpy())
    lo, hi = math.log(0.02), math.log(100)
    assert ln.min() >= lo - 1e-12 and ln.max() <= hi + 1e-12
    assert stats.kstest(ln, stats.uniform(loc=lo, scale=hi - lo).cdf).pvalue > 1e-3


def test_logsnr_cosine_matches_dpdm_time_parameterization():
    d = LogSNRCosine(logsnr_min=-9, logsnr_max=13)
    lam = -2 * np.log(_sample(d).numpy())
    assert lam.min() >= -9 - 1e-9 and lam.max() <= 13 + 1e-9
    # DPDM's reference (its v-prediction loss): t(λ) = (2/π)·arccos(1/sqrt(1 + e^{−λ})) ~ uniform.
    t_of = lambda lam: 2 / np.pi * np.arccos(1 / np.sqrt(1 + np.exp(-lam)))
    t = t_of(lam)
    lo, hi = t_of(13.0), t_of(-9.0)
    assert stats.kstest(t, stats.uniform(loc=lo, scale=hi - lo).cdf).pvalue > 1e-3


@pytest.mark.parametrize("dist", [LogNormalSigma(), VPUniformT(), VELogUniform(), LogSNRCosine()],
                         ids=lambda d: type(d).__name__)
def test_shift_scales_every_draw_and_the_cdf(dist):
    shifted = type(dist)(**{**dist.__dict__, "log_sigma_shift": 1.5})
    torch.testing.assert_close(_sample(shifted, 100), _sample(dist, 100) * math.exp(1.5))
    torch.testing.assert_close(shifted.cdf(SIGMAS * math.exp(1.5)), dist.cdf(SIGMAS))
    # Moves mass toward high noise: at every σ, the shifted CDF is below the original one.
    assert bool((shifted.cdf(SIGMAS) <= dist.cdf(SIGMAS)).all())


def test_compatible_pairs_pass_and_vp_refuses_noise_beyond_its_domain():
    for p in ALL.values():
        for d in (LogNormalSigma(), VPUniformT(), VELogUniform(), LogSNRCosine()):
            check_compatible(p, d)
    for p in (EDMPreconditioning(), VEPreconditioning(), VPredictionPreconditioning()):
        check_compatible(p, LogNormalSigma(log_sigma_shift=5.0))
    with pytest.raises(ValueError, match=r"VPPreconditioning.*noise_levels.log_sigma_shift"):
        check_compatible(VPPreconditioning(), LogNormalSigma(log_sigma_shift=2.0))
    with pytest.raises(ValueError, match="outside"):
        check_compatible(VPPreconditioning(), VELogUniform(sigma_max=1000.0))


@pytest.mark.parametrize("bad", [lambda: LogNormalSigma(P_std=0), lambda: VELogUniform(1.0, 0.5),
                                 lambda: LogSNRCosine(3, -3), lambda: VPUniformT(eps_t=0),
                                 lambda: EDMPreconditioning(sigma_data=0), lambda: VPPreconditioning(M=1)])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        bad()
