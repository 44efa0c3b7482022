"""The independent half of the report's cross-check: another code base, and the history against the config.

1. Every epsilon is recomputed with Google's dp-accounting (not Opacus, which produced the figures):
   each history row (z, q, steps) is ``steps`` self-composed ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``
   events, the rows composed together, under the add/remove-one relation; dp-accounting's
   ``RdpAccountant`` and its ``PLDAccountant`` (privacy loss distributions, pessimistic estimate) give
   one epsilon each at the run's delta. The recorded figure is compared with the one of the same
   kind: RDP records with dp-accounting's RDP, PRV and GDP records with PLD (PRV and PLD both bound the
   exact privacy curve numerically; GDP is a CLT approximation, so only an under-report is flagged).

2. Every recorded history row is checked against what the run's config says a round takes, so a
   tampered history (a smaller q, fewer steps, a larger noise multiplier than configured) cannot hide
   behind a correct recomputation of itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

History = tuple[tuple[float, float, int], ...]

# Two accountants from different code bases agree to far better than this on the same history
# (measured: dp-accounting's RDP vs Opacus' RDP within 0.4%, PLD vs Opacus' PRV within 0.2% once PLD
# is refined); ABS_TOL is the absolute error Opacus' PRV accountant allows itself (eps_error = 0.01).
REL_TOL = 0.01
ABS_TOL = 0.01
# PLD's value grid: coarse first (about 0.03 s a history); refined only when the coarse, pessimistic
# figure does not agree with the record (up to about 2 s a history at the finest).
PLD_INTERVALS = (1e-2, 1e-3, 1e-4)
PLD_MAX_EPSILON = 1000.0  # beyond this the guarantee is vacuous and PLD's grid only costs memory
COMPARED_WITH = {"rdp": "rdp", "prv": "pld", "gdp": "pld"}


@dataclass
class Figure:
    """A dp-accounting epsilon, or why there is none."""

    value: float | None
    error: str | None = None
    detail: str | None = None  # e.g. the PLD discretisation used

    def to_json(self) -> dict[str, Any]:
        ok = self.value is not None and math.isfinite(self.value)
        return {"epsilon": self.value if ok else None,
                "error": self.error if self.error or ok else "infinite epsilon", "detail": self.detail}


def _event(history: History):
    import dp_accounting as dpa

    events = [dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), n)
              for z, q, n in history if n > 0]
    return dpa.ComposedDpEvent(events)


def _quiet() -> None:
    # dp-accounting logs (through absl) every fractional RDP order it drops for not converging;
    # that is its documented behaviour (the order is excluded, the bound stays valid), not news.
    logging.getLogger("absl").setLevel(logging.ERROR)


@lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """(orders, RDP of one sampled Gaussian step at each order), dp-accounting's, computed once per (z, q).

    RDP composes by addition, so a history's RDP is the steps-weighted sum of these vectors; this keeps a
    report of many histories that share (z, q) (every device of a fixed-rate run) fast.
    """
    import dp_accounting as dpa
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(noise_multiplier)))
    return np.asarray(accountant.orders), np.asarray(accountant.rdp)


@lru_cache(maxsize=4096)
def rdp_epsilon(history: History, delta: float) -> Figure:
    """dp-accounting's RDP epsilon of `history` (add/remove one)."""
    from dp_accounting import rdp

    if not any(n for _, _, n in history):
        return Figure(0.0)
    _quiet()
    try:
        total = None
        for z, q, n in history:
            orders, per_step = _rdp_per_step(z, q)
            total = n * per_step if total is None else total + n * per_step
        value = float(rdp.compute_epsilon(orders, total, delta)[0])
    except Exception as exc:  # noqa: BLE001 - numerical failure inside dp-accounting: a finding, not a crash
        return Figure(None, f"dp-accounting RDP failed: {type(exc).__name__}: {exc}")
    return Figure(value) if math.isfinite(value) else Figure(None, f"dp-accounting RDP returned {value}")


@lru_cache(maxsize=4096)
def pld_epsilon(history: History, delta: float, interval: float = PLD_INTERVALS[0]) -> Figure:
    """dp-accounting's PLD epsilon of `history` at value discretisation `interval` (pessimistic)."""
    from dp_accounting import pld

    if not any(n for _, _, n in history):
        return Figure(0.0, detail=f"discretisation {interval:g}")
    _quiet()
    try:
        accountant = pld.PLDAccountant(value_discretization_interval=interval)
        accountant.compose(_event(history))
        value = float(accountant.get_epsilon(delta))
    except Exception as exc:  # noqa: BLE001
        return Figure(None, f"dp-accounting PLD failed: {type(exc).__name__}: {exc}")
    if not math.isfinite(value):
        return Figure(None, f"dp-accounting PLD returned {value}")
    return Figure(value, detail=f"discretisation {interval:g}")


def agrees(recorded: float | None, recomputed: float | None) -> bool:
    """Within REL_TOL (relative) or ABS_TOL (absolute) of each other."""
    if recorded is None or recomputed is None:
        return False
    return abs(recorded - recomputed) <= max(REL_TOL * max(abs(recorded), abs(recomputed)), ABS_TOL)


def recompute(history: History, delta: float, recorded: float | None, rdp_hint: float | None) -> dict[str, Figure]:
    """{"rdp": ..., "pld": ...}; PLD is refined until it agrees with `recorded` or its grid is at its finest.

    `rdp_hint` (any RDP epsilon of the history, an upper bound) skips PLD where it would be vacuous.
    """
    out = {"rdp": rdp_epsilon(history, delta)}
    bound = out["rdp"].value if out["rdp"].value is not None else rdp_hint
    if bound is not None and bound > PLD_MAX_EPSILON:
        out["pld"] = Figure(None, f"PLD skipped: RDP epsilon {bound:.6g} > {PLD_MAX_EPSILON:g} (vacuous; its grid "
                                  "would need gigabytes)")
        return out
    for interval in PLD_INTERVALS:
        out["pld"] = pld_epsilon(history, delta, interval)
        if out["pld"].value is None or recorded is None or agrees(recorded, out["pld"].value):
            break
    return out


def compare(recorded: float | None, accountant: str, figures: dict[str, Figure]) -> tuple[str, str] | None:
    """(flag code, detail) when the record disagrees with the independent figure of its kind, else None.

    `under-reported`: the record is below dp-accounting's figure beyond tolerance (the dangerous
    direction). `independent-mismatch`: above it (RDP and PRV records only: a GDP figure above PLD is
    GDP's approximation erring on the safe side).
    """
    kind = COMPARED_WITH[accountant]
    figure = figures.get(kind)
    if recorded is None or figure is None or figure.value is None or agrees(recorded, figure.value):
        return None
    relative = (recorded - figure.value) / figure.value if figure.value else math.inf
    what = (f"recorded epsilon {recorded:.6g} ({accountant}) vs dp-accounting {kind.upper()} {figure.value:.6g} "
            f"({relative:+.2%})")
    if recorded < figure.value:
        return "under-reported", what
    if accountant == "gdp":
        return None
    return "independent-mismatch", what


# --------------------------------------------------------------------------- history against the config
@dataclass(frozen=True)
class Expected:
    """What the config says every round of one device takes: (z, q, steps per round); q None = unknown."""

    noise_multiplier: float | None
    sample_rate: float | None
    steps_per_round: int | None
    basis: str  # where q comes from: "config sample-rate", "device data (n windows)", "unknown"
    # model = content-scorer: the popularity release [z_pop, 1, 1] the user-level history starts with
    leading_release: tuple[float, float, int] | None = None
    # model = channel-scorer: the further analytics releases after it (the co-occurrence [z_cooc, 1, 1], and with
    # transition-release the transitions [z_transitions, 1, 1])
    further_releases: tuple[tuple[float, float, int], ...] = ()


def steps_for(sample_rate: float, epochs: int) -> int:
    """local-epochs x ceil(1/q): the DP steps of one round at Poisson rate q (tolerant of 1/q's float error)."""
    return int(epochs) * math.ceil(1.0 / sample_rate - 1e-9)


def expected_for(config: dict[str, Any], windows: int | None) -> Expected:
    z = config.get("noise-multiplier")
    epochs = config.get("local-epochs")
    q = config.get("sample-rate")
    if isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q <= 1:
        basis = "config sample-rate"
    elif windows is not None and isinstance(config.get("batch-size"), int) and windows > 0:
        q, basis = 1.0 / math.ceil(windows / config["batch-size"]), f"device data ({windows} windows)"
    else:
        q, basis = None, "unknown"
    steps = steps_for(q, epochs) if q is not None and isinstance(epochs, int) else None
    return Expected(float(z) if isinstance(z, (int, float)) else None, q, steps, basis)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)


def check_history(history: list[tuple[float, float, int]], rounds_trained: int, expected: Expected,
                  per_round: Callable[[float], int] | None) -> list[tuple[str, str]]:
    """(flag code, detail) for every way `history` departs from what the config says it must hold.

    `per_round(q)` is the steps one round takes at rate q (None: unknown). Rows may hold earlier runs'
    rounds too (a device's ledger spans runs), so the step count must be at least, not exactly, the
    rounds of this run times a round's steps.
    """
    flags = []
    round_steps = 0
    lead = expected.leading_release
    for release in ((lead, *expected.further_releases) if lead is not None else ()):
        if history and all(_close(float(a), float(b)) for a, b in zip(history[0], release)):
            history = history[1:]  # an analytics release (popularity, co-occurrence): its own mechanism, not a round
    for i, (z, q, n) in enumerate(history):
        row = f"history row {i} [{z:g}, {q:.6g}, {n}]"
        if expected.noise_multiplier is not None and not _close(z, expected.noise_multiplier):
            worse = " (more noise than configured: the recorded history understates the spend)" \
                if z > expected.noise_multiplier else ""
            flags.append(("history-noise-mismatch",
                          f"{row}: noise multiplier {z:g}, configured {expected.noise_multiplier:g}" + worse))
        if expected.sample_rate is not None:
            if not _close(q, expected.sample_rate):
                worse = " (smaller than the real one: the recorded history understates the spend)" \
                    if q < expected.sample_rate else ""
                flags.append(("history-sample-rate-mismatch",
                              f"{row}: sample rate {q:.6g}, expected {expected.sample_rate:.6g} from "
                              f"{expected.basis}" + worse))
        elif per_round is not None and abs(1.0 / q - round(1.0 / q)) > 1e-6 / q:
            # Without sample-rate in the config and without the device's data, q = 1/ceil(n/batch) is
            # still known to be the reciprocal of a whole number of batches.
            flags.append(("history-sample-rate-mismatch",
                          f"{row}: sample rate {q:.6g} is not 1/ceil(windows/batch-size) for any window count"))
        if per_round is not None:
            steps = per_round(expected.sample_rate or q)
            if n % steps:
                flags.append(("history-steps-mismatch",
                              f"{row}: {n} steps is not a whole number of rounds of {steps} steps"))
            round_steps = max(round_steps, steps)
    total = sum(n for _, _, n in history)
    if round_steps and total < rounds_trained * round_steps:
        flags.append(("history-steps-missing",
                      f"history holds {total} steps; the {rounds_trained} round(s) trained in this run take "
                      f"{rounds_trained * round_steps} ({round_steps} each)"))
    return flags


def device_windows(config: dict[str, Any]) -> dict[str, int] | None:
    """Each device's training window count from the run's device store (simulation), or None without one.

    Counted the way a device counts them (cold-start items held out, non-overlapping windows).
    """
    store_dir = config.get("data-store")
    if not isinstance(store_dir, str) or not store_dir or not isinstance(config.get("window"), int):
        return None
    path = Path(store_dir).expanduser()
    if not path.is_dir():
        return None
    from shared.coldstart import held_out_items
    from shared.data.store import open_store
    from shared.data.windows import history_windows
    from shared.errors import PrivrecError

    try:
        store = open_store(path)
        held_out = held_out_items({"cold-item-share": config.get("cold-item-share") or 0.0,
                                   "seed": config.get("seed", 0)}, store.num_items)
        counts = {str(device): len(history_windows(store.device(device).train, config["window"], held_out))
                  for device in range(store.num_devices)}
    except (PrivrecError, OSError, ValueError, KeyError):
        return None  # not this run's store any more: fall back to the config-only checks
    return counts


def expected_user_level(config: dict[str, Any], population: int | None) -> Expected:
    """DP-FedAvg: one sampled Gaussian release per round at z = user-noise-multiplier, q = cohort / population."""
    z = config.get("user-noise-multiplier")
    q, basis = None, "unknown"
    if isinstance(population, int) and population > 0:
        wanted = config.get("devices-per-round") or 0
        if not wanted and isinstance(config.get("fraction-train"), (int, float)):
            wanted = int(round(config["fraction-train"] * population))
        if wanted:
            q, basis = max(1, min(int(wanted), population)) / population, f"devices-per-round over {population}"
    lead, further = None, ()
    if config.get("model") in ("content-scorer", "channel-scorer") and \
            isinstance(config.get("popularity-noise-multiplier"), (int, float)):
        lead = (float(config["popularity-noise-multiplier"]), 1.0, 1)
    if config.get("model") == "channel-scorer" and isinstance(config.get("cooc-noise-multiplier"), (int, float)):
        further = ((float(config["cooc-noise-multiplier"]), 1.0, 1),)
        if config.get("transition-release") is True and \
                isinstance(config.get("transition-noise-multiplier"), (int, float)):
            further += ((float(config["transition-noise-multiplier"]), 1.0, 1),)
    return Expected(float(z) if isinstance(z, (int, float)) else None, q, 1, basis, lead, further)
