"""A device's part in federated analytics: its clipped contribution, recorded in its ledger before it leaves.

The device records the release it joins in its privacy ledger (`PrivacyLedger.releases`, user-level unit)
*before* replying, under the ledger lock, and declines when the composed user-level epsilon of all its
releases would pass its cap (`max-epsilon` > 0). The DP-SGD spend (window-level unit) is a separate
record: the two units differ, and the ledger keeps them apart rather than adding unlike epsilons.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.analytics import cooc_vector, item_set_vector, transition_sum
from shared.data.store import DeviceData
from shared.privacy.accounting import epsilon_from_state
from shared.privacy.ledger import ledger_lock, load_ledger, save_ledger

POPULARITY_RELEASE = "popularity-histogram"
COOCCURRENCE_RELEASE = "cooccurrence-histogram"
TRANSITION_RELEASE = "transition-counts"
SECURE_MECHANISM = ("gaussian-sum from device noise shares N(0, z^2 / m), masked under secure aggregation (the "
                    "server sees only sums of at least m devices; m = secagg-release-min-cohort, or "
                    "secagg-min-cohort when it is 0)")


def answer_popularity_query(data: DeviceData, num_items: int, *, ledger_path: Path, device: str,
                            noise_multiplier: float, delta: float, max_epsilon: float,
                            release_id: str, secure: bool = False) -> tuple[np.ndarray | None, float]:
    """(the device's unit-norm item-set vector, or None when it declines; its user-level epsilon after it)."""
    epsilon = _record_release(POPULARITY_RELEASE, ledger_path=ledger_path, device=device,
                              noise_multiplier=noise_multiplier, delta=delta, max_epsilon=max_epsilon,
                              release_id=release_id, secure=secure)
    if epsilon is None:
        return None, _spent(ledger_path, device, delta)
    return item_set_vector(data.train, num_items), epsilon


def answer_cooccurrence_query(data: DeviceData, items: np.ndarray, window: int, *, ledger_path: Path, device: str,
                              noise_multiplier: float, delta: float, max_epsilon: float,
                              release_id: str, secure: bool = False) -> tuple[np.ndarray | None, float]:
    """(the device's windowed co-occurrence vector among `items`, each user's part of L2 norm <= 1, or None
    when it declines; its user-level epsilon after it). `items` comes from the released popularity (public)."""
    epsilon = _record_release(COOCCURRENCE_RELEASE, ledger_path=ledger_path, device=device,
                              noise_multiplier=noise_multiplier, delta=delta, max_epsilon=max_epsilon,
                              release_id=release_id, secure=secure)
    if epsilon is None:
        return None, _spent(ledger_path, device, delta)
    return cooc_vector(data.train, np.asarray(items, dtype=np.int64), window), epsilon


def answer_transition_query(data: DeviceData, items: np.ndarray, *, ledger_path: Path, device: str,
                            noise_multiplier: float, delta: float, max_epsilon: float,
                            release_id: str, secure: bool = False) -> tuple[np.ndarray | None, float]:
    """(the device's directed transition counts among `items`, flattened [K * K], each user's part of L2 norm <= 1,
    or None when it declines; its user-level epsilon after it). `items` comes from the released popularity."""
    epsilon = _record_release(TRANSITION_RELEASE, ledger_path=ledger_path, device=device,
                              noise_multiplier=noise_multiplier, delta=delta, max_epsilon=max_epsilon,
                              release_id=release_id, secure=secure)
    if epsilon is None:
        return None, _spent(ledger_path, device, delta)
    return transition_sum(data.train, np.asarray(items, dtype=np.int64)).reshape(-1), epsilon


def _record_release(kind: str, *, ledger_path: Path, device: str, noise_multiplier: float, delta: float,
                    max_epsilon: float, release_id: str, secure: bool = False) -> float | None:
    """Record one Gaussian release (q = 1, one step) in the ledger before anything leaves; None = declined.
    `secure`: the device adds its noise share and masks its vector (secure aggregation), the server sees sums."""
    with ledger_lock(ledger_path):
        ledger = load_ledger(ledger_path, device)
        history = ledger.user_level_history() + [[noise_multiplier, 1.0, 1]]
        epsilon = epsilon_from_state({"history": history, "mechanism": "rdp"}, delta, "rdp")
        if max_epsilon > 0 and epsilon > max_epsilon:
            return None
        ledger.releases.append({"kind": kind, "release": release_id, "unit": "user",
                                "relation": "add/remove one user",
                                "mechanism": SECURE_MECHANISM if secure else "gaussian-sum",
                                "noise_multiplier": noise_multiplier, "sample_rate": 1.0, "steps": 1,
                                "user-level-epsilon": epsilon, "delta": delta, "accountant": "rdp"})
        save_ledger(ledger_path, ledger)  # recorded before the vector leaves: over-report, never under-report
    return epsilon


def _spent(ledger_path: Path, device: str, delta: float) -> float:
    """The device's user-level epsilon so far (after a refusal)."""
    with ledger_lock(ledger_path):
        ledger = load_ledger(ledger_path, device)
    return epsilon_from_state({"history": ledger.user_level_history(), "mechanism": "rdp"}, delta, "rdp") \
        if ledger.releases else 0.0
