"""Empirical lower bound on epsilon from one training run (Steinke, Nasr and Jagielski, 2023).

"Privacy Auditing with One (1) Training Run" (arXiv:2305.08846). The auditor inserts m canaries,
each included in the training data independently with probability 1/2, trains once, scores every
canary, and guesses "in" for the k+ highest scores and "out" for the k- lowest (abstaining on the
rest): r = k+ + k- guesses, v of them correct. Their main theorem: if the training is
(epsilon, delta)-DP for adding or removing one canary, then for every v

    P[W >= v] <= P[Binomial(r, p) >= v] + 2 m delta max_{i = 1..v} P[v - i <= Binomial(r, p) < v] / i,
    with p = e^epsilon / (1 + e^epsilon)

(the first term alone is the pure-DP bound: each guess is no better than randomised response).
Observing v correct guesses where that right-hand side is below beta therefore rejects
(epsilon, delta)-DP at confidence 1 - beta; the largest such epsilon is the empirical lower bound.
It is a lower bound on the true epsilon whatever the attack, so it must never exceed a correct
claim, and a weak attack only makes it smaller.

Implemented here from that statement with scipy's binomial distribution (no code copied).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from shared.errors import PrivrecError

__all__ = ["epsilon_lower_bound", "guess", "p_value"]


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[at least v of r guesses correct] for an (epsilon, delta)-DP training run."""
    _check_counts(m, r, v)
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))  # randomised response's accuracy at epsilon
    tail = float(stats.binom.sf(v - 1, r, p))  # P[B >= v]
    # P[v - i <= B < v] = cdf(v - 1) - cdf(v - i - 1), for i = 1..v, at once.
    cdf = stats.binom.cdf(np.arange(-1, v), r, p)  # cdf[j + 1] = P[B <= j], j = -1..v-1
    window = cdf[-1] - cdf[-2::-1]  # i = 1..v
    spread = float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * spread)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """Largest epsilon that v correct guesses out of r (m canaries) reject at confidence 1 - beta (0: none)."""
    _check_counts(m, r, v)
    if not 0 < delta < 1 or not 0 < beta < 1:
        raise PrivrecError(f"audit: delta and beta must be in (0, 1), got delta={delta!r}, beta={beta!r}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    # p_value grows with epsilon (p does, and every term is monotone in p for v > r p); bracket, then bisect.
    hi = 1.0
    while p_value(m, r, v, hi, delta) < beta:
        hi *= 2.0
        if hi > 1e4:
            return math.inf
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo  # p_value(lo) < beta: lo is rejected, so the bound errs low


def guess(scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int) -> tuple[int, int]:
    """(r, v): guess "in" for the k_in highest scores and "out" for the k_out lowest; v = correct guesses."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    if scores.shape != included.shape or k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise PrivrecError(f"audit: need k_in + k_out <= m canaries, got k_in={k_in}, k_out={k_out}, m={m}")
    order = np.argsort(scores, kind="stable")
    correct = int(np.sum(included[order[m - k_in:]])) if k_in else 0
    correct += int(np.sum(~included[order[:k_out]])) if k_out else 0
    return k_in + k_out, correct


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise PrivrecError(f"audit: need 0 <= correct <= guesses <= canaries, got v={v}, r={r}, m={m}")
