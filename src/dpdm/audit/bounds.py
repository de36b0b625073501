"""Empirical lower bound on ε from one training run (Steinke, Nasr & Jagielski 2023, arXiv:2305.08846).

Setting: m audit examples ("canaries"), each included in the training set independently with probability
1/2 (S_i = ±1). After training, the auditor guesses membership for r of them (abstaining on the rest) and
gets v right. Their theorem for (ε, δ)-DP (the approximate-DP main result; Appendix D states it as an
algorithm): for every v,

    P[≥ v correct] ≤ P[Binomial(r, p_ε) ≥ v] + 2·m·δ·α,   p_ε = e^ε / (1 + e^ε),
    α = max_{i=1..v} P[v − i ≤ Binomial(r, p_ε) < v] / i.

So a run with v correct rejects "the mechanism is (ε, δ)-DP" at level β whenever that right-hand side is
≤ β; the largest such ε is the reported lower bound. The δ term is theirs, computed exactly (not a
looser bound on it). This file only does the statistics; the canaries live in `dpdm.audit.canaries`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats
from scipy.special import expit

# The guess counts tried, as fractions of m (k "in" guesses from the top, k "out" from the bottom).
# Trying several k is paid for by Bonferroni: each k is tested at level β / (number of k's).
K_FRACTIONS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)


def audit_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[≥ v of r guesses correct] for an (ε, δ)-DP mechanism (the theorem above)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need ε >= 0 and δ in [0, 1], got ε={epsilon}, δ={delta}")
    p = float(expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # below[i-1] = P[Binomial = v - i] for i = 1..v; their running sums are P[v - i <= Binomial < v].
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, beta: float,
                        tol: float = 1e-6) -> float:
    """Largest ε that v correct of r guesses (m canaries) rejects at level β; 0 if none.

    Bisection keeps p(lo) <= β: rejecting (lo, δ)-DP also rejects every smaller ε (a mechanism that is
    (ε', δ)-DP with ε' < lo is (lo, δ)-DP too), so lo is a valid bound even if p is not monotone.
    """
    if not 0 < beta < 1:
        raise ValueError(f"β must be in (0, 1), got {beta}")
    p_at = lambda eps: audit_p_value(m=m, r=r, v=v, epsilon=eps, delta=delta)
    if r == 0 or p_at(0.0) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_at(hi) <= beta:
        lo, hi = hi, 2 * hi
        if hi > 1e3:  # unreachable for finite r: p_ε → 1 as ε grows
            return lo
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_at(mid) <= beta else (lo, mid)
    return lo


@dataclass(frozen=True)
class AuditBound:
    epsilon_lower_bound: float  # at confidence 1 − β, over all k tried (Bonferroni)
    beta: float
    delta: float
    m: int
    k: int                      # the k that gave the bound: k "in" + k "out" guesses
    guesses: int                # r = 2k
    correct: int                # v
    ks_tried: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def guess_counts(m: int) -> tuple[int, ...]:
    return tuple(sorted({k for f in K_FRACTIONS if 1 <= (k := int(f * m)) and 2 * k <= m}))


def bound_from_scores(scores, included, *, delta: float, beta: float = 0.05,
                      ks: tuple[int, ...] | None = None) -> AuditBound:
    """Guess "in" for the k highest scores and "out" for the k lowest, for each k; best bound.

    `included` is the truth (S_i = +1). Each k is tested at β/len(ks), so the reported maximum holds at
    confidence 1 − β overall.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = scores.size
    if included.shape != (m,):
        raise ValueError(f"scores and included must have the same length, got {m} and {included.shape}")
    ks = guess_counts(m) if ks is None else tuple(ks)
    if not ks:
        raise ValueError(f"too few canaries (m={m}) to guess")
    order = np.argsort(-scores, kind="stable")
    best = None
    for k in ks:
        v = int(included[order[:k]].sum() + (~included[order[m - k:]]).sum())
        eps = epsilon_lower_bound(m=m, r=2 * k, v=v, delta=delta, beta=beta / len(ks))
        if best is None or eps > best.epsilon_lower_bound:
            best = AuditBound(eps, beta, delta, m, k, 2 * k, v, ks)
    return best
