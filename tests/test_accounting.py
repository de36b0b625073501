"""Accounting against an independent implementation (Google's dp_accounting) and calibration round trips."""
import math

import dp_accounting
import pytest
from opacus.accountants.rdp import RDPAccountant

from dpdm.privacy.accounting import RDP_ORDERS, calibrate_noise_multiplier, max_steps_within_budget, mechanism_epsilon
from dpdm.training.privacy_plan import make_privacy_plan

GRID = [(0.01, 1.0, 1000), (4096 / 60000, 2.5, 4200), (0.001, 0.8, 10000), (0.2, 5.0, 100),
        (256 / 60000, 0.7, 500), (4096 / 60000, 80.0, 4200)]  # the last: the paper's ε ≈ 0.2 regime


def _event(q, sigma, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


@pytest.mark.parametrize("q,sigma,steps", GRID)
def test_rdp_matches_dp_accounting(q, sigma, steps):
    ref = dp_accounting.rdp.RdpAccountant(orders=RDP_ORDERS)
    ref.compose(_event(q, sigma, steps))
    ours = mechanism_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    assert ours == pytest.approx(ref.get_epsilon(1e-5), rel=1e-3)


def test_wider_order_grid_tightens_small_epsilon():
    """At ε ≈ 0.2 Opacus' default orders (≤ 63) put the optimum on the grid's edge and overstate ε."""
    q, sigma, steps = 4096 / 60000, 100.0, 4200
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    default_eps, default_order = acc.get_privacy_spent(delta=1e-5)
    ours = mechanism_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    assert default_order == max(RDPAccountant.DEFAULT_ALPHAS)
    assert ours < default_eps * 0.97


@pytest.mark.parametrize("q,sigma,steps", GRID[:3])
def test_prv_matches_pld_accountant(q, sigma, steps):
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(_event(q, sigma, steps))
    ours = mechanism_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5,
                         accountant="prv")
    # Two numerical "tight" accountants, each with its own discretization error bound.
    assert ours == pytest.approx(pld.get_epsilon(1e-5), rel=0.03)
    # And tight accounting never reports more than RDP's bound.
    assert ours <= mechanism_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("eps", [0.2, 1.0, 10.0])
def test_calibrated_sigma_reproduces_epsilon_within_one_percent(eps, accountant):
    q, steps = 4096 / 60000, 14 * 20
    sigma = calibrate_noise_multiplier(target_epsilon=eps, delta=1e-5, sample_rate=q, steps=steps,
                                       accountant=accountant)
    back = mechanism_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5,
                         accountant=accountant)
    assert back <= eps  # never over budget
    assert back >= 0.99 * eps  # and not wastefully noisy



def _bisection_sigma(eps, q, steps, accountant, rel_tol=1e-3):
    """Reference: plain bisection on σ ∈ (0, ∞), kept apart from the library's root search."""
    at = lambda s: mechanism_epsilon(noise_multiplier=s, sample_rate=q, steps=steps, delta=1e-5,
                                 accountant=accountant)
    lo, hi = 0.0, 1.0
    while at(hi) > eps:
        lo, hi = hi, 2 * hi
    while at(hi) < eps * (1 - rel_tol):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if at(mid) <= eps else (mid, hi)
    return hi


@pytest.mark.parametrize("eps,q,steps,accountant", [
    (10.0, 1024 / 60000, 340, "rdp"), (1.0, 1024 / 60000, 340, "rdp"), (0.2, 4096 / 60000, 4200, "rdp"),
    (50.0, 0.01, 10, "rdp"), (10.0, 1024 / 60000, 340, "prv")])  # PRV: seconds per call, one case
def test_calibration_agrees_with_bisection_in_few_accountant_calls(eps, q, steps, accountant, monkeypatch):
    import dpdm.privacy.accounting as accounting

    calls = []
    real = accounting.mechanism_epsilon
    monkeypatch.setattr(accounting, "mechanism_epsilon", lambda **kw: calls.append(kw) or real(**kw))
    sigma = accounting.calibrate_noise_multiplier(target_epsilon=eps, delta=1e-5, sample_rate=q, steps=steps,
                                                  accountant=accountant)
    assert len(calls) <= 12  # bisection needs ~20-25: every dpdm-train start pays for this search
    monkeypatch.undo()
    back = mechanism_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant=accountant)
    assert eps * (1 - 1e-3) <= back <= eps
    assert sigma == pytest.approx(_bisection_sigma(eps, q, steps, accountant), rel=2e-3)

def test_max_steps_is_the_last_step_within_budget():
    kw = dict(noise_multiplier=1.0, sample_rate=0.01, delta=1e-5)
    T = max_steps_within_budget(target_epsilon=2.0, upper=10**5, **kw)
    assert mechanism_epsilon(steps=T, **kw) <= 2.0 < mechanism_epsilon(steps=T + 1, **kw)


@pytest.mark.parametrize("bad,match", [
    (dict(epsilon=0.0), "epsilon"), (dict(epsilon=-1.0), "epsilon"),
    (dict(delta=1e-3), "delta"), (dict(batch_size=10**6), "batch_size"),
    (dict(noise_multiplicity=0), "noise_multiplicity"), (dict(max_grad_norm=0.0), "max_grad_norm"),
])
def test_bad_privacy_config_is_refused(bad, match):
    kw = dict(enabled=True, epsilon=1.0, delta=1e-5, max_grad_norm=1.0, accountant="rdp",
              noise_multiplier=None, batch_size=256, dataset_size=60000, epochs=1,
              noise_multiplicity=4)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        make_privacy_plan(**kw)


def test_unknown_accountant_is_refused():
    with pytest.raises(ValueError, match="accountant"):
        mechanism_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=1e-5, accountant="gdp?")


def test_trainer_max_steps_shortens_the_plan_and_sigma_is_calibrated_for_it():
    kw = dict(enabled=True, epsilon=10.0, delta=1e-5, max_grad_norm=1.0, accountant="rdp",
              noise_multiplier=None, batch_size=256, dataset_size=60000, epochs=2, noise_multiplicity=1)
    full, short = make_privacy_plan(**kw), make_privacy_plan(**kw, step_limit=350)
    assert full.planned_steps == 468 and short.planned_steps == short.max_steps == 350
    assert short.noise_multiplier < full.noise_multiplier
    eps = mechanism_epsilon(noise_multiplier=short.noise_multiplier, sample_rate=short.sample_rate, steps=350,
                        delta=1e-5)
    assert 9.9 < eps <= 10.0
    assert make_privacy_plan(**kw, step_limit=-1) == full            # Lightning's "no limit"
    assert make_privacy_plan(**kw, step_limit=10**6) == full         # more than the epochs allow
    with pytest.raises(ValueError, match="max_steps"):
        make_privacy_plan(**kw, step_limit=0)


@pytest.mark.parametrize("epsilon,delta,k", [(1.0, 1e-5, 1), (1.0, 1e-5, 2), (0.5, 1e-6, 5), (10.0, 1e-5, 2),
                                             (0.0, 1e-5, 3), (8.0, 1e-5, 100)])
def test_group_privacy_chains_k_neighbouring_datasets(epsilon, delta, k):
    """Reference: apply (ε, δ)-DP along a chain D_0 ~ D_1 ~ ... ~ D_k step by step,
    P[M(D_0) ∈ S] ≤ e^ε P[M(D_1) ∈ S] + δ ≤ ..., accumulating (ε_i, δ_i) one link at a time."""
    from dpdm.privacy.accounting import group_privacy

    eps_i, delta_i = 0.0, 0.0
    for _ in range(k):   # (ε_i, δ_i) then one more link: (ε_i + ε, e^ε·δ_i + δ)
        eps_i, delta_i = eps_i + epsilon, math.exp(epsilon) * delta_i + delta
    got = group_privacy(epsilon, delta, k)
    assert got[0] == pytest.approx(eps_i)
    assert got[1] == pytest.approx(min(delta_i, 1.0), rel=1e-9)
    log_dwork_roth = math.log(k) + (k - 1) * epsilon + math.log(delta)   # Dwork & Roth, Thm 2.2: k·e^{(k−1)ε}·δ
    assert got[1] <= min(math.exp(min(log_dwork_roth, 0.0)), 1.0) * (1 + 1e-12)


def test_group_privacy_refuses_k_below_one():
    from dpdm.privacy.accounting import group_privacy

    with pytest.raises(ValueError, match="examples_per_person"):
        group_privacy(1.0, 1e-5, 0)
