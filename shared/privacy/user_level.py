"""User-level DP for federated averaging (DP-FedAvg, McMahan et al. 2018), in plain numpy.

Privacy unit: everything one device contributes in a round (its whole model update, so a whole
user history when one user is one device). Mechanism per round:

1. Poisson sampling: every eligible device joins the round independently with probability q.
2. Each device's update (its returned weights minus the global weights) is clipped to L2 norm C
   over all trainable arrays together.
3. The clipped updates are summed, Gaussian noise of standard deviation z * C is added to every
   trainable coordinate, and the sum is divided by the *expected* cohort size q * N (the
   fixed-denominator estimator). Adding or removing one device changes the sum by at most C,
   whatever number of replies actually arrived, so a round with fewer replies than planned (a
   device failed, declined or was not sampled) is never under-noised.

The release is the sampled Gaussian mechanism with noise multiplier z and sampling rate q, once
per round; Opacus' accountants compose it over rounds (`shared.privacy.accounting`).
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Mapping, Sequence

import numpy as np

from shared.privacy.accounting import epsilon_from_state

__all__ = ["clip_update", "noisy_mean_update", "poisson_cohort", "user_level_epsilon", "user_level_state"]


def clip_update(update: Mapping[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], float]:
    """`update` scaled to L2 norm at most `clip` (all arrays together); returns (clipped, original norm)."""
    norm = float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in update.values())))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (np.asarray(a, dtype=np.float64) * scale) for k, a in update.items()}, norm


def noisy_mean_update(clipped: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str],
                      shapes: Mapping[str, tuple[int, ...]], noise_std: float, expected_cohort: float,
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(sum of clipped updates + N(0, noise_std^2)) / expected_cohort, for every key in `keys`.

    With no reply at all the result is pure noise: the round is still a release and is accounted.
    """
    out = {}
    for key in keys:
        total = np.zeros(shapes[key], dtype=np.float64)
        for update in clipped:
            total += update[key]
        total += rng.normal(0.0, noise_std, size=shapes[key])
        out[key] = total / expected_cohort
    return out


_OS_ENTROPY = random.SystemRandom  # the class itself, as imported (a test may swap the module's name for a seeded one)


def poisson_cohort(nodes: Sequence[int], sample_rate: float, rng: random.Random) -> list[int]:
    """Each node independently with probability `sample_rate` (the sampling the accountant assumes).

    With OS entropy (`random.SystemRandom`) the draws are read in one call: the same 53-bit uniform per node
    that `SystemRandom.random` reads one call at a time (one read per device was 0.1 s a round at 100,000)."""
    if not isinstance(rng, _OS_ENTROPY):
        return [node for node in nodes if rng.random() < sample_rate]
    nodes = list(nodes)
    draws = (np.frombuffer(os.urandom(8 * len(nodes)), dtype="<u8") >> np.uint64(11)) * 2.0 ** -53
    return [nodes[i] for i in np.flatnonzero(draws < sample_rate)]


def user_level_state(noise_multiplier: float, sample_rate: float, rounds: int, accountant: str) -> dict:
    """Accountant state of `rounds` DP-FedAvg releases (one sampled Gaussian step per round)."""
    history = [[float(noise_multiplier), float(sample_rate), int(rounds)]] if rounds > 0 else []
    return {"history": history, "mechanism": accountant}


@functools.lru_cache(maxsize=256)
def user_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
                       accountant: str) -> float:
    """Population-level epsilon after `rounds` rounds of DP-FedAvg. Cached: a server asks for the same
    round's figure for its metrics row and again for privacy.json.

    With the RDP accountant the per-round RDP curve is computed once per (z, q) and scaled by the rounds:
    exactly what Opacus' `RDPAccountant` computes (`compute_rdp` is the one-step curve times the steps),
    without re-evaluating every order each round (~0.25 s a round, a sixth of a 256-device round)."""
    if accountant != "rdp" or rounds <= 0:
        return epsilon_from_state(user_level_state(noise_multiplier, sample_rate, rounds, accountant), delta,
                                  accountant)
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders, per_round = _rdp_per_round(float(noise_multiplier), float(sample_rate))
    eps, _ = get_privacy_spent(orders=orders, rdp=per_round * int(rounds), delta=float(delta))
    return float(eps) if not np.isnan(eps) else float("inf")


@functools.lru_cache(maxsize=64)
def _rdp_per_round(noise_multiplier: float, sample_rate: float) -> tuple[list, np.ndarray]:
    """One sampled Gaussian release's RDP at Opacus' default orders (read-only: shared by every caller)."""
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    orders = list(RDPAccountant.DEFAULT_ALPHAS)
    curve = np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders))
    curve.setflags(write=False)
    return orders, curve
