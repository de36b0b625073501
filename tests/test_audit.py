"""The one-run privacy audit: the ε lower bound against independent references, the canaries' exact
effect on a DP-SGD step, and end-to-end audits of the honest mechanism and of a deliberately broken one.

References: (a) δ = 0: the bound solves P[Binomial(r, e^ε/(1+e^ε)) ≥ v] = β, found here by scipy's root
finder on the binomial tail directly, and for v = r in closed form (p^r = β); (b) simulation of exactly
ε-DP randomized response, whose per-canary accuracy is e^ε/(1+e^ε): the bound may exceed the true ε in at
most about a β fraction of runs, and it should come close to ε when m is large.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from scipy.special import expit, logit

from dpdm.audit.bounds import audit_p_value, bound_from_scores, epsilon_lower_bound, guess_counts
from dpdm.audit.canaries import CanaryAuditConfig, CanaryAuditModule, run_canary_audit
from dpdm.training.privacy_plan import PrivacyPlan
from tests.helpers import tiny_denoiser

BETA = 0.05


# --- the bound ---------------------------------------------------------------------------------

@pytest.mark.parametrize("m,r,v", [(1000, 1000, 600), (1000, 200, 150), (500, 100, 100), (50, 20, 17)])
def test_delta_zero_bound_solves_the_binomial_tail_equation(m, r, v):
    eps = epsilon_lower_bound(m=m, r=r, v=v, delta=0.0, beta=BETA)
    tail = lambda e: stats.binom.sf(v - 1, r, 1 / (1 + math.exp(-e))) - BETA
    assert tail(0.0) < 0  # these (r, v) reject ε = 0
    reference = optimize.brentq(tail, 0.0, 50.0, xtol=1e-10)
    assert eps == pytest.approx(reference, abs=1e-5)
    if v == r:  # P[all r correct] = p^r
        assert eps == pytest.approx(logit(BETA ** (1 / r)), abs=1e-5)


def test_no_evidence_gives_zero_and_delta_only_weakens_the_bound():
    assert epsilon_lower_bound(m=1000, r=200, v=100, delta=0.0, beta=BETA) == 0.0
    assert epsilon_lower_bound(m=1000, r=0, v=0, delta=1e-5, beta=BETA) == 0.0
    for v in (120, 150, 190):
        e0 = epsilon_lower_bound(m=1000, r=200, v=v, delta=0.0, beta=BETA)
        e1 = epsilon_lower_bound(m=1000, r=200, v=v, delta=1e-5, beta=BETA)
        e2 = epsilon_lower_bound(m=1000, r=200, v=v, delta=1e-3, beta=BETA)
        assert e2 < e1 <= e0
    # The δ term is 2mδ·α with α <= 1 (a probability divided by i >= 1).
    for eps in (0.5, 2.0):
        p0 = audit_p_value(m=1000, r=200, v=150, epsilon=eps, delta=0.0)
        p1 = audit_p_value(m=1000, r=200, v=150, epsilon=eps, delta=1e-4)
        assert p0 < p1 <= p0 + 2 * 1000 * 1e-4


def _rr_bounds(eps, delta, *, m, r, trials, rng):
    """Lower bounds from `trials` audits of an (ε, δ)-DP randomized response on m canaries.

    Each canary's output reveals S_i with probability δ, else is S_i w.p. e^ε/(1+e^ε) and −S_i otherwise:
    (ε, δ)-DP per canary. The auditor guesses its output on r of the m canaries.
    """
    s = rng.choice([-1, 1], size=(trials, m))
    flip = rng.random((trials, m)) >= expit(eps)
    out = np.where(flip & (rng.random((trials, m)) >= delta), -s, s)
    v = (out[:, :r] == s[:, :r]).sum(axis=1)
    cache = {int(x): epsilon_lower_bound(m=m, r=r, v=int(x), delta=delta, beta=BETA) for x in np.unique(v)}
    return np.array([cache[int(x)] for x in v])


@pytest.mark.parametrize("eps,delta,m,r", [(0.5, 0.0, 1000, 1000), (2.0, 0.0, 1000, 300),
                                           (1.0, 1e-5, 1000, 1000), (4.0, 1e-5, 2000, 500)])
def test_bound_exceeds_true_epsilon_at_most_about_beta_of_the_time(eps, delta, m, r):
    trials = 2000
    bounds = _rr_bounds(eps, delta, m=m, r=r, trials=trials, rng=np.random.default_rng(12))
    false_rate = float(np.mean(bounds > eps))
    # β plus 3 binomial standard deviations of the simulation itself.
    assert false_rate <= BETA + 3 * math.sqrt(BETA * (1 - BETA) / trials), false_rate
    assert np.median(bounds) > 0.5 * eps  # and it is not vacuous


def test_bound_is_close_to_epsilon_for_many_canaries():
    bounds = _rr_bounds(1.0, 0.0, m=100_000, r=100_000, trials=21, rng=np.random.default_rng(3))
    assert 0.95 < np.median(bounds) <= 1.0


def test_guessing_from_scores_with_bonferroni_over_k():
    m = 1000
    rng = np.random.default_rng(0)
    included = rng.random(m) < 0.5
    ks = guess_counts(m)
    assert ks == (5, 10, 25, 50, 100, 250, 500)
    perfect = bound_from_scores(np.where(included, 10.0, -10.0) + rng.normal(0, 0.1, m), included,
                                delta=0.0, beta=BETA)
    # For k <= 250 every guess is right (about 500 canaries are in, 500 out); each k is tested at β/7.
    k250 = logit((BETA / len(ks)) ** (1 / 500))  # 500 of 500 right
    k500_max = logit((BETA / len(ks)) ** (1 / 1000))  # the most any k can give: 1000 of 1000 right
    assert k250 - 1e-5 <= perfect.epsilon_lower_bound <= k500_max + 1e-5
    assert perfect.k >= 250 and perfect.correct >= 500
    # Scores that carry no information: nothing to reject (seeded, so this is deterministic).
    none = bound_from_scores(rng.normal(size=m), included, delta=1e-5, beta=BETA)
    assert none.epsilon_lower_bound == 0.0


# --- canaries in one DP-SGD step -------------------------------------------------------------------

def _plan(sigma, *, q=0.5, C=0.7, B=4):
    return PrivacyPlan(enabled=True, target_epsilon=10.0, delta=1e-5, noise_multiplier=sigma,
                       max_grad_norm=C, sample_rate=q, expected_batch_size=B, steps_per_epoch=2,
                       planned_steps=10, max_steps=10, noise_multiplicity=1, accountant="rdp",
                       dataset_size=8)


def test_canary_rows_add_exactly_C_at_their_coordinate_of_the_clipped_sum():
    """σ = 0: the update with canaries minus the update without them is C·e_{c_i}/B for sampled ones."""
    den = tiny_denoiser(num_classes=3, attention=False)
    params = [p for p in den.net.parameters()]
    total = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(1)
    coords = torch.randperm(total, generator=g)[:60]
    included = torch.arange(60) % 3 != 0
    plan = _plan(0.0)
    module = CanaryAuditModule(net=den.net, plan=plan, preconditioning=den.precond,
                               canary_coords=coords, canary_included=included, canary_seed=5, noise_seed=0)
    opt = module.configure_optimizers()
    counts_before = module.canary_counts.clone()
    real = [torch.randn((3, *p.shape), generator=g, dtype=p.dtype) for p in params]  # 3 real examples

    def update(with_canaries: bool):
        for p, gs in zip(params, real, strict=True):
            p.grad_sample = gs.clone()
        if with_canaries:
            module.before_dp_step()
        opt.pre_step()
        flat = torch.cat([p.grad.flatten() for p in params]).clone()
        if with_canaries:
            module.after_dp_step()
        opt.zero_grad()
        return flat

    with_c, without = update(True), update(False)
    sampled = module.canary_counts - counts_before
    assert sampled[~included].sum() == 0 and 0 < sampled[included].sum() < included.sum()
    expected = torch.zeros(total, dtype=with_c.dtype)
    expected[coords[sampled.bool()]] = plan.max_grad_norm / plan.expected_batch_size
    # rtol: Opacus clips with factor C / (norm + 1e-6), so a norm-C row is scaled by 1 − 1.4e-6.
    torch.testing.assert_close(with_c - without, expected, atol=1e-12, rtol=1e-5)
    # The score is B·(privatized gradient) at the canary's coordinate: the canary's C plus the real part.
    torch.testing.assert_close(module.canary_scores, (with_c[coords] * plan.expected_batch_size).double())


def test_empty_batch_steps_carry_the_canaries():
    den = tiny_denoiser(num_classes=3, attention=False)
    params = list(den.net.parameters())
    coords = torch.arange(0, 40 * 7, 7)
    included = torch.ones(40, dtype=torch.bool)
    module = CanaryAuditModule(net=den.net, plan=_plan(0.0, q=1.0), preconditioning=den.precond,
                               canary_coords=coords, canary_included=included, canary_seed=0, noise_seed=0)
    opt = module.configure_optimizers()
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
    module.before_dp_step()
    opt.pre_step()
    module.after_dp_step()
    assert torch.equal(module.canary_counts, torch.ones(40, dtype=torch.long))
    torch.testing.assert_close(module.canary_scores, torch.full((40,), 0.7, dtype=torch.float64), rtol=1e-5,
                               atol=0)


# --- end to end through a Lightning Trainer --------------------------------------------------------

def _random_data(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8),
            torch.randint(0, 3, (n,), generator=g))


# 50 real examples + 1000 canaries (N' = 550), B = 55: q = 0.1, 3 epochs = 30 DP-SGD steps.
SMALL = dict(epsilon=1.0, delta=1e-5, num_canaries=1000, batch_size=55, epochs=3, seed=0)


def test_audit_of_the_honest_mechanism_stays_below_the_configured_epsilon():
    report = run_canary_audit(CanaryAuditConfig(**SMALL), *_random_data())
    assert report.dataset_size_nominal == 550 and report.sample_rate == pytest.approx(0.1)
    assert report.steps == 30
    assert 0.99 < report.epsilon_spent <= 1.0
    inc = report.canaries_included
    assert report.dataset_size_realised == 50 + inc and 400 < inc < 600
    # Included canaries join batches at rate q, like real examples (5 binomial standard deviations).
    expected = report.sample_rate * report.steps
    assert abs(report.mean_times_sampled - expected) < 5 * math.sqrt(expected * 0.9 / inc)
    assert report.bound.m == 1000 and report.bound.guesses == 2 * report.bound.k
    assert report.bound.epsilon_lower_bound <= report.epsilon_spent


def test_audit_catches_noise_ten_times_smaller_than_the_accountant_assumes(monkeypatch):
    import opacus.optimizers.optimizer as dp_optimizer

    real_noise = dp_optimizer._generate_noise

    def broken(std, reference, generator=None, secure_mode=False):
        return real_noise(std / 10, reference, generator=generator, secure_mode=secure_mode)

    monkeypatch.setattr(dp_optimizer, "_generate_noise", broken)
    report = run_canary_audit(CanaryAuditConfig(**SMALL), *_random_data())
    assert report.epsilon_spent <= 1.0  # the accountant still believes σ
    assert report.bound.epsilon_lower_bound > report.epsilon_spent, report.bound


def test_cli_canary_json_and_user_errors(capsys):
    from dpdm.cli.audit import main

    args = ["canary", "--dataset", "random", "--real", "20", "--canaries", "100", "--batch-size", "14",
            "--epochs", "1", "--epsilon", "2", "--seed", "0"]
    assert main(args + ["--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["dataset_size_nominal"] == 70 and report["sample_rate"] == pytest.approx(0.2)
    assert report["steps"] == 5 and report["config"]["epsilon"] == 2.0
    assert 0 <= report["bound"]["epsilon_lower_bound"] <= report["epsilon_spent"] <= 2.0
    with pytest.raises(SystemExit) as e:  # δ must be < 1/N'
        main(args + ["--delta", "0.05"])
    assert e.value.code == 2 and "delta" in capsys.readouterr().err


def test_step_log_likelihood_ratio_matches_the_gaussian_mixture_densities():
    """The llr score's per-step term vs scipy's normal densities: log[(1−q)φ(o;0,σC) + qφ(o;C,σC)] − log φ(o;0,σC)."""
    from scipy import stats

    from dpdm.audit.canaries import step_log_likelihood_ratio

    o = torch.tensor([-3.0, -0.5, 0.0, 0.4, 1.0, 2.5, 8.0], dtype=torch.float64)
    for q, sigma, C in ((0.05, 0.67, 1.0), (0.3, 2.3, 0.5), (0.001, 0.2, 2.0)):
        got = step_log_likelihood_ratio(o, q=q, sigma=sigma, C=C).numpy()
        x = o.numpy()
        ref = (np.log((1 - q) * stats.norm.pdf(x, 0, sigma * C) + q * stats.norm.pdf(x, C, sigma * C))
               - stats.norm.logpdf(x, 0, sigma * C))
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_llr_score_is_at_least_as_strong_as_the_sum_on_the_subsampled_gaussian():
    """Simulated white-box observations of T steps at σ = 0.67 (ε ≈ 10 in the CLI's setting): the
    likelihood-ratio score separates members better than the plain sum (AUC), as Neyman–Pearson says."""
    from dpdm.audit.canaries import step_log_likelihood_ratio

    g = torch.Generator().manual_seed(0)
    m, T, q, sigma, C = 4000, 100, 0.05, 0.67, 1.0
    member = torch.rand(m, generator=g) < 0.5
    sampled = (torch.rand((m, T), generator=g) < q) & member[:, None]
    o = C * sampled.double() + sigma * C * torch.randn((m, T), generator=g, dtype=torch.float64)
    auc = {}
    for name, score in (("sum", o.sum(1)), ("llr", step_log_likelihood_ratio(o, q=q, sigma=sigma, C=C).sum(1))):
        pos, neg = score[member], score[~member]
        auc[name] = float((pos[:, None] > neg[None, :]).double().mean())
    assert auc["llr"] > auc["sum"] + 0.02, auc
