"""Privacy-accounting math on JSON-serialisable accountant states (plain Python + Opacus accountants).

An *accountant state* is what Opacus' ``IAccountant.state_dict()`` returns, made JSON-friendly::

    {"history": [[noise_multiplier, sample_rate, steps], ...], "mechanism": "rdp" | "prv" | "gdp"}

Every DP-SGD step a device ever took is in its history, so ``epsilon_from_state`` gives the
cumulative epsilon over all rounds (composition), never a per-round figure.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from shared.errors import PrivrecError

__all__ = [
    "ACCOUNTANTS",
    "check_fixed_parameters",
    "compose_history",
    "epsilon_from_state",
    "from_json_state",
    "history_steps",
    "make_accountant",
    "to_json_state",
]

ACCOUNTANTS = ("rdp", "prv", "gdp")


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
