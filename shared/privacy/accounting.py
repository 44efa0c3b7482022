"""Privacy-accounting math on JSON-serialisable accountant states (plain Python + Opacus accountants).

An *accountant state* is what Opacus' ``IAccountant.state_dict()`` returns, made JSON-friendly::

    {"history": [[noise_multiplier, sample_rate, steps], ...], "mechanism": "rdp" | "prv" | "gdp"}

Every DP-SGD step a device ever took is in its history, so ``epsilon_from_state`` gives the
cumulative epsilon over all rounds (composition), never a per-round figure.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

from shared.config import ACCOUNTANTS
from shared.errors import PrivrecError

__all__ = [
    "ACCOUNTANTS",
    "check_fixed_parameters",
    "compose_history",
    "epsilon_from_state",
    "from_json_state",
    "history_steps",
    "make_accountant",
    "prv_grid_points",
    "prv_too_costly",
    "to_json_state",
]


def _check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise PrivrecError(
            f"accountant must be one of {', '.join(ACCOUNTANTS)}; got accountant={accountant!r}"
        )
    return accountant


def make_accountant(accountant: str):
    """A fresh Opacus accountant (``gdp``'s "experimental" construction warning is silenced)."""
    from opacus.accountants import create_accountant

    _check_accountant(accountant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_accountant(mechanism=accountant)


def _history_rows(state: dict | None) -> list[tuple[float, float, int]]:
    if not state:
        return []
    if not isinstance(state, dict) or "history" not in state:
        raise PrivrecError(f"accountant_state must be a dict with a 'history' key, got {state!r}")
    rows = []
    for row in state["history"] or []:
        try:
            sigma, q, steps = row
            rows.append((float(sigma), float(q), int(steps)))
        except (TypeError, ValueError) as exc:
            raise PrivrecError(
                f"accountant_state history entry {row!r} is not [noise_multiplier, sample_rate, steps]"
            ) from exc
    return rows


def to_json_state(state: dict) -> dict:
    """Opacus ``state_dict()`` (OrderedDict with tuples) -> plain JSON-serialisable dict."""
    return {
        "history": [[float(s), float(q), int(n)] for s, q, n in _history_rows(state)],
        "mechanism": str(state["mechanism"]),
    }


def from_json_state(state: dict, accountant: str) -> dict:
    """JSON state -> what ``IAccountant.load_state_dict`` expects (tuples), checking the mechanism."""
    _check_accountant(accountant)
    mechanism = state.get("mechanism", accountant)
    if mechanism != accountant:
        raise PrivrecError(
            f"accountant_state was recorded with accountant={mechanism!r} but accountant={accountant!r} "
            "was requested: a device must keep one accountant for all its rounds"
        )
    return {"history": list(_history_rows(state)), "mechanism": mechanism}


def history_steps(state: dict | None) -> int:
    """Total number of DP-SGD steps recorded in a state (0 for None)."""
    return sum(n for _, _, n in _history_rows(state))


def check_fixed_parameters(
    state: dict | None, noise_multiplier: float, sample_rate: float, accountant: str
) -> None:
    """``gdp`` can only compose identical steps: raise a clear PrivrecError if (sigma, q) changed.

    (Opacus' GaussianAccountant would raise a bare ValueError in the middle of a round, after
    having popped its history.) ``rdp``/``prv`` compose heterogeneous histories correctly.
    """
    if accountant != "gdp":
        return
    for sigma, q, _ in _history_rows(state):
        if sigma != float(noise_multiplier) or q != float(sample_rate):
            raise PrivrecError(
                "accountant='gdp' needs the same noise_multiplier and sample rate in every round: "
                f"previous rounds used noise_multiplier={sigma}, sample_rate={q}; this round has "
                f"noise_multiplier={noise_multiplier}, sample_rate={sample_rate} (the run config's "
                "noise-multiplier and sample-rate must not change across a device's runs). "
                "Use accountant='rdp' or 'prv' for changing parameters."
            )


def epsilon_from_state(
    accountant_state: dict | None, delta: float, accountant: str = "rdp"
) -> float:
    """Cumulative epsilon at ``delta`` of every step in ``accountant_state``; 0.0 with no history."""
    _check_accountant(accountant)
    if not (isinstance(delta, (int, float)) and 0.0 < float(delta) < 1.0):
        raise PrivrecError(f"delta must be in (0, 1), got delta={delta!r}")
    rows = _history_rows(accountant_state)
    if not rows:
        return 0.0
    state = from_json_state(accountant_state, accountant)
    if accountant == "gdp" and len({(s, q) for s, q, _ in rows}) > 1:
        raise PrivrecError(
            "accountant='gdp' cannot compose a history with different (noise_multiplier, sample_rate) "
            f"entries: {rows}"
        )
    acc = make_accountant(accountant)
    acc.load_state_dict(state)
    eps = float(acc.get_epsilon(delta=float(delta)))
    return eps if not math.isnan(eps) else math.inf


def compose_history(state_a: dict | None, state_b: dict | None) -> dict:
    """State whose history is a's steps followed by b's (adjacent identical (sigma, q) merged).

    Both states must use the same mechanism. Composition is order-independent for rdp/prv/gdp,
    so this equals one accountant that took all steps of a and b.
    """
    mechs = {s["mechanism"] for s in (state_a, state_b) if s and "mechanism" in s}
    if len(mechs) > 1:
        raise PrivrecError(
            f"cannot compose accountant states of different mechanisms: {sorted(mechs)}"
        )
    mechanism = mechs.pop() if mechs else "rdp"
    merged: list[list[Any]] = []
    for sigma, q, n in _history_rows(state_a) + _history_rows(state_b):
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1][2] += n
        else:
            merged.append([sigma, q, n])
    return {"history": merged, "mechanism": mechanism}


# PRV (Opacus, after Gopi et al.) discretises the composed privacy loss on a grid it sizes before
# computing anything: the domain [-L, L] from RDP bounds, and a mesh that shrinks as 1/sqrt(total
# steps). Peak memory measured here: 165-175 bytes per grid point (7.5 million points: 1.6 GB, 8 s);
# 100,000 rounds x 1,000 steps at q = 0.01 reached 19.7 GB before it was killed. The guard sizes the
# grid the same way Opacus will and refuses beyond PRV_MAX_BYTES.
PRV_BYTES_PER_POINT = 200
PRV_MAX_BYTES = 2_000_000_000
PRV_EPS_ERROR = 0.01  # Opacus' defaults in PRVAccountant.get_epsilon: eps_error 0.01, delta_error delta/1000


def prv_grid_points(history: list[tuple[float, float, int]] | tuple, delta: float) -> int:
    """Points of the grid Opacus' PRV accountant would build for `history` at `delta` (no PRV computed)."""
    import numpy as np
    from opacus.accountants.analysis.prv import Domain, PoissonSubsampledGaussianPRV, compute_safe_domain_size

    rows = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not rows:
        return 0
    delta_error = delta / 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half_width = compute_safe_domain_size(
            prvs=[PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in rows],
            max_self_compositions=[n for _, _, n in rows], eps_error=PRV_EPS_ERROR, delta_error=delta_error)
    if not math.isfinite(half_width):
        return sys.maxsize
    mesh = PRV_EPS_ERROR / np.sqrt(sum(n for _, _, n in rows) * np.log(12 / delta_error) / 2)
    return Domain.create_aligned(-half_width, half_width, mesh).size


def prv_too_costly(history: list[tuple[float, float, int]] | tuple, delta: float,
                   max_bytes: int = PRV_MAX_BYTES) -> str | None:
    """Why PRV must not be computed for `history` (its grid would need more than `max_bytes`), or None."""
    points = prv_grid_points(history, delta)
    need = points * PRV_BYTES_PER_POINT
    if need <= max_bytes:
        return None
    steps = sum(int(n) for _, _, n in history)
    return (f"PRV would discretise {steps:,} steps on a grid of {points:,} points (about {need / 1e9:,.1f} GB; "
            f"the limit is {max_bytes / 1e9:.1f} GB)")
