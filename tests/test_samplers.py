"""Samplers driven by the exact denoiser of a 1-D Gaussian mixture, where the target is known exactly.

For y ~ Σ_k π_k N(μ_k, s_k²) and x = y + σ·n the exact denoiser is
E[y | x] = Σ_k r_k(x)·(μ_k + s_k²/(s_k² + σ²)·(x − μ_k)) with r_k ∝ π_k N(x; μ_k, s_k² + σ²);
the class-conditional one keeps component k only.
Tolerance: each statistic within 5 standard errors of its exact value, the SE computed from the target's
own moments at N samples. The seeds are fixed, so the tests are deterministic; a 4-step DDIM run fails
the same tolerance, so it has power.
"""
import math

import pytest
import torch
from scipy import stats

from dpdm.diffusion.preconditioning import VPPreconditioning
from dpdm.diffusion.samplers import (
    SAMPLERS,
    ancestral_sigmas,
    ddim_sampler,
    edm_heun_sampler,
    guided,
    karras_sigmas,
    latents_from_seeds,
    run_sampler,
    stochastic_ddim_sampler,
)
from dpdm.diffusion.seeded_noise import seeded_normal
from tests.helpers import tiny_denoiser

F64 = torch.float64
PI = torch.tensor([0.3, 0.7], dtype=F64)
MU = torch.tensor([-1.5, 1.0], dtype=F64)
S = torch.tensor([0.3, 0.5], dtype=F64)
N = 8000
THRESHOLD = -0.5  # between the components: the fraction below it estimates the first weight


class MixtureDenoiser:
    """Exact E[y | y + σn = x, label] for the mixture; label 2 (= null_label) is unconditional."""

    null_label = 2

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, labels=None):
        self.calls.append(None if labels is None else labels.clone())
        x, sigma = x.to(F64), sigma.to(F64).reshape(-1, 1)
        var = S**2 + sigma**2
        post_mean = MU + S**2 / var * (x - MU)
        logw = torch.log(PI) - 0.5 * (x - MU) ** 2 / var - 0.5 * torch.log(var)
        if labels is not None:
            keep = torch.nn.functional.one_hot(labels.clamp(max=1), 2).bool()
            keep |= (labels == self.null_label)[:, None]
            logw = logw.masked_fill(~keep, -math.inf)
        return (torch.softmax(logw, dim=1) * post_mean).sum(1, keepdim=True)


def target_stats(pi=PI, mu=MU, s=S):
    mean = float((pi * mu).sum())
    d = mu - mean
    var = float((pi * (s**2 + d**2)).sum())
    mu4 = float((pi * (d**4 + 6 * d**2 * s**2 + 3 * s**4)).sum())
    frac = float(sum(p * stats.norm.cdf(THRESHOLD, m, sd) for p, m, sd in zip(pi, mu, s, strict=True)))
    se = {"mean": math.sqrt(var / N), "var": math.sqrt((mu4 - var**2) / N),
          "frac": math.sqrt(frac * (1 - frac) / N)}
    return {"mean": mean, "var": var, "frac": frac}, se


def sample_stats(x):
    x = x.flatten()
    return {"mean": float(x.mean()), "var": float(x.var()), "frac": float((x < THRESHOLD).double().mean())}


def within_tolerance(got, want, se, k=5.0):
    return {key: abs(got[key] - want[key]) <= k * se[key] for key in want}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def latents():
    return latents_from_seeds(range(N), (1,))


# Step counts: the paper's for the stochastic samplers' accuracy (stochastic DDIM: 1000), enough for the
# first-order DDIM's bias to stay well under the tolerance (256; at 50 steps it is ~7 SE of variance).
CASES = {
    "ddim": dict(name="ddim", num_steps=256),
    "stochastic_ddim": dict(name="stochastic_ddim", num_steps=1000, eta=1.0),
    "edm_heun": dict(name="edm_heun", num_steps=32),
    "edm_heun_churn": dict(name="edm_heun", num_steps=64, S_churn=40, S_min=0.05, S_max=50),
}


@pytest.mark.parametrize("case", CASES)
def test_sampler_draws_the_mixture(case, latents):
    x = run_sampler(MixtureDenoiser(), latents, noise_seeds=range(N), net_dtype=F64, **CASES[case])
    want, se = target_stats()
    got = sample_stats(x)
    ok = within_tolerance(got, want, se)
    assert all(ok.values()), f"{case}: got {got}, want {want} ± 5·{se}"


def test_the_tolerance_rejects_a_coarse_sampler(latents):
    x = run_sampler(MixtureDenoiser(), latents, name="ddim", num_steps=4, net_dtype=F64)
    want, se = target_stats()
    assert not all(within_tolerance(sample_stats(x), want, se).values())


@pytest.mark.parametrize("label", [0, 1])
def test_class_conditional_sampling_draws_one_component(label, latents):
    labels = torch.full((N,), label)
    x = run_sampler(MixtureDenoiser(), latents, name="edm_heun", num_steps=32, class_labels=labels,
                    net_dtype=F64)
    one = torch.zeros(2, dtype=F64)
    one[label] = 1
    want, se = target_stats(pi=one)
    got = sample_stats(x)
    assert abs(got["mean"] - want["mean"]) <= 5 * se["mean"]
    assert abs(got["var"] - want["var"]) <= 5 * se["var"]


# ---- batch-size independence, guidance, plumbing ---------------------------------------------------

def _run(denoiser, seeds, spec, labels=None, net_dtype=F64, shape=(1,)):
    lat = latents_from_seeds(seeds, shape)
    return run_sampler(denoiser, lat, noise_seeds=seeds, class_labels=labels, net_dtype=net_dtype,
                       **spec)


SMALL = {"ddim": dict(name="ddim", num_steps=6),
         "stochastic_ddim": dict(name="stochastic_ddim", num_steps=6),
         "edm_heun_churn": dict(name="edm_heun", num_steps=6, S_churn=10)}


@pytest.mark.parametrize("case", SMALL)
def test_a_sample_does_not_depend_on_its_batch(case):
    seeds = list(range(100, 164))
    batch = _run(MixtureDenoiser(), seeds, SMALL[case])
    single = torch.cat([_run(MixtureDenoiser(), [s], SMALL[case]) for s in seeds])
    assert torch.equal(batch, single)


def test_ddim_sample_does_not_depend_on_its_batch_with_a_unet():
    """Batch 64 vs batch 1 through a real (tiny, float64) U-Net, with guidance's doubled batch."""
    den = tiny_denoiser(dtype=F64).eval()
    seeds = list(range(64))
    labels = torch.arange(64) % 3
    spec, shape = dict(name="ddim", num_steps=3, guidance=0.5), (1, 8, 8)
    batch = _run(den, seeds, spec, labels, shape=shape)
    single = torch.cat([_run(den, [s], spec, labels[s:s + 1], shape=shape) for s in (0, 17, 63)])
    torch.testing.assert_close(batch[[0, 17, 63]], single, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", SAMPLERS)
def test_guidance_zero_is_exactly_the_conditional_sampler(name):
    seeds = list(range(32))
    labels = torch.arange(32) % 2
    guided_den = MixtureDenoiser()
    x_guided = _run(guided_den, seeds, dict(name=name, num_steps=8, guidance=0.0), labels)
    # The conditional sampler: a plain denoiser with the labels baked in, no guidance machinery.
    mix = MixtureDenoiser()
    conditional = lambda x, sigma, _labels: mix(x, sigma, labels)
    x_cond = _run(conditional, seeds, dict(name=name, num_steps=8))
    assert torch.equal(x_guided, x_cond)
    assert all(c is not None and not (c == MixtureDenoiser.null_label).any() for c in guided_den.calls)


def test_guided_denoiser_is_the_cfg_combination():
    mix, w = MixtureDenoiser(), 1.7
    x = torch.linspace(-3, 3, 11, dtype=F64).view(-1, 1)
    sigma = torch.full((11,), 0.8, dtype=F64)
    labels = torch.arange(11) % 2
    want = (1 + w) * mix(x, sigma, labels) - w * mix(x, sigma, torch.full_like(labels, 2))
    torch.testing.assert_close(guided(mix, x, sigma, labels, w, 2), want, rtol=1e-14, atol=1e-14)


def test_guidance_needs_labels():
    with pytest.raises(ValueError, match="class-conditional"):
        _run(MixtureDenoiser(), [0, 1], dict(name="ddim", num_steps=2, guidance=1.0))


def test_stochastic_ddim_with_eta_zero_is_ddim_and_churn_zero_is_deterministic():
    lat = latents_from_seeds(range(16), (1,))
    sig = karras_sigmas(10)
    kw = dict(net_dtype=F64, noise_seeds=range(16))
    assert torch.equal(stochastic_ddim_sampler(MixtureDenoiser(), lat, sig, eta=0.0, **kw),
                       ddim_sampler(MixtureDenoiser(), lat, sig, **kw))
    a = edm_heun_sampler(MixtureDenoiser(), lat, sig, net_dtype=F64, noise_seeds=range(16))
    b = edm_heun_sampler(MixtureDenoiser(), lat, sig, net_dtype=F64, noise_seeds=range(100, 116))
    assert torch.equal(a, b)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, 3.0])
def test_ancestral_step_keeps_the_marginal_variance(eta):
    for s, s_next in [(80.0, 50.0), (1.0, 0.3), (0.01, 0.0)]:
        down, up = ancestral_sigmas(s, s_next, eta)
        assert down**2 + up**2 == pytest.approx(s_next**2, rel=1e-12, abs=1e-15)
        assert 0 <= up <= s_next and down <= s_next
    assert ancestral_sigmas(1.0, 0.5, 1.0)[0] == pytest.approx(0.25)  # η = 1: σ_down = σ'²/σ


def test_karras_grid_is_edm_eq5():
    s = karras_sigmas(5, sigma_min=0.002, sigma_max=80, rho=7)
    assert len(s) == 6 and s[-1] == 0
    assert float(s[0]) == pytest.approx(80) and float(s[4]) == pytest.approx(0.002)
    mid = (80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert float(s[2]) == pytest.approx(mid, rel=1e-12)
    assert bool((s[:-1] > s[1:]).all())


def test_seeded_normal_is_standard_normal_and_per_sample():
    z = seeded_normal(torch.arange(1000), 7, (4, 8))
    assert z.shape == (1000, 4, 8) and z.dtype == F64
    flat = z.flatten().numpy()
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    assert abs(flat.mean()) < 5 / math.sqrt(flat.size) and abs(flat.var() - 1) < 5 * math.sqrt(2 / flat.size)
    # Uncorrelated across neighbouring elements, seeds and steps.
    other_step = seeded_normal(torch.arange(1000), 8, (4, 8)).flatten()
    for a, b in [(z.flatten()[:-1], z.flatten()[1:]), (z[:-1].flatten(), z[1:].flatten()),
                 (z.flatten(), other_step)]:
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / math.sqrt(a.numel())
    # A row is a function of its own seed and the step only.
    torch.testing.assert_close(seeded_normal([3, 999], 7, (4, 8)), z[[3, 999]], rtol=0, atol=0)


def test_run_sampler_refuses_unknown_names_options_and_grids_outside_the_domain():
    lat = latents_from_seeds([0], (1,))
    with pytest.raises(ValueError, match="unknown sampler"):
        run_sampler(MixtureDenoiser(), lat, name="euler", num_steps=2)
    with pytest.raises(ValueError, match="S_churn"):
        run_sampler(MixtureDenoiser(), lat, name="ddim", num_steps=2, S_churn=1.0)

    class VP(MixtureDenoiser):
        precond = VPPreconditioning()

    with pytest.raises(ValueError, match="sigma_max"):
        run_sampler(VP(), lat, name="ddim", num_steps=2, sigma_max=500.0, net_dtype=F64)
