"""Cross-check: recompute every epsilon from its history and compare, with Opacus and with dp-accounting.

For each device (and for user-level DP-FedAvg) the epsilon is recomputed from the recorded
accountant history with Opacus' RDP and PRV (and GDP when the run used it): the recomputation
with the run's own accountant must reproduce the reported figure (a disagreement beyond REL_TOL
is flagged). Independently, `tools.report.independent` recomputes it with another code base
(dp-accounting's RDP and PLD accountants; more than 1% apart, or an under-report, is flagged)
and checks every history row against the run's config (and the device's data where the device
store is at hand). Where the device ledgers are in the run directory (simulation), the
ledger's own figure is checked against its own history, and against the server's record: a
ledger that shows LESS spend than the server saw is the dangerous direction (a device that would
keep training past its real budget). In the scorer pipelines every round a device's update went into
is a user-level release its ledger must list before the update leaves (client/scorer.py); a round the
server counted that the ledger lacks is the same dangerous direction.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from shared.config import ACCOUNTANTS, SCORER_MODELS
from shared.errors import PrivrecError
from shared.privacy.accounting import epsilon_from_state, prv_too_costly
from tools.report import independent
from tools.report.independent import Expected, Figure
from tools.report.load import Device, Privacy, UserLevel

# Relative tolerance of "the same epsilon": the reported figure and a recomputation with the same
# accountant on the same history run the same deterministic code, so only float formatting
# differs; 1e-6 is far above that and far below any real disagreement. ABS_TOL covers epsilon 0.
REL_TOL = 1e-6
ABS_TOL = 1e-9
SECOND = ("rdp", "prv")  # always shown, whatever the run's accountant

History = tuple[tuple[float, float, int], ...]


@dataclass
class Epsilon:
    """A recomputed epsilon, or why there is none."""

    value: float | None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        ok = self.value is not None and math.isfinite(self.value)
        return {"epsilon": self.value if ok else None,
                "error": self.error if self.error or ok else "infinite epsilon"}


@dataclass
class Flag:
    code: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "detail": self.detail}


@dataclass
class DeviceCheck:
    device: Device
    recomputed: dict[str, Epsilon]
    ledger_recomputed: Epsilon | None = None
    # the user-level releases in its ledger, every run on the store, composed (Opacus RDP, no amplification)
    ledger_user_level: Epsilon | None = None
    flags: list[Flag] = field(default_factory=list)
    independent: dict[str, Figure] = field(default_factory=dict)  # dp-accounting: "rdp", "pld"
    expected: Expected | None = None  # what the config (and device data) say each history row must be


@dataclass
class UserLevelCheck:
    user_level: UserLevel
    reported: float | None
    recomputed: dict[str, Epsilon]
    flags: list[Flag] = field(default_factory=list)
    independent: dict[str, Figure] = field(default_factory=dict)
    expected: Expected | None = None


@dataclass
class CrossCheck:
    devices: list[DeviceCheck]
    user_level: UserLevelCheck | None
    statements: list[dict[str, Any]]  # each statement plus its recomputation and check
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl against the records


def same(a: float | None, b: float | None) -> bool:
    """Equal within REL_TOL (relative) or ABS_TOL (absolute); two infinities are equal."""
    if a is None or b is None:
        return False
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= max(REL_TOL * max(abs(a), abs(b)), ABS_TOL)


def below(a: float | None, b: float | None) -> bool:
    """a < b beyond the tolerance."""
    return a is not None and b is not None and a < b and not same(a, b)


def merged(history: History) -> History:
    """Identical (sigma, q) rows summed: composition is order-independent, and it is much faster."""
    steps: dict[tuple[float, float], int] = defaultdict(int)
    for sigma, q, n in history:
        steps[(sigma, q)] += n
    return tuple((s, q, n) for (s, q), n in steps.items())


@lru_cache(maxsize=4096)
def _epsilon(history: History, delta: float, accountant: str) -> Epsilon:
    # PRV (and GDP far outside its CLT regime) can raise or return inf/nan on extreme histories:
    # that is a finding to show as "n/a (reason)", never a crash.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = epsilon_from_state({"history": [list(r) for r in history], "mechanism": accountant},
                                       delta, accountant)
    except PrivrecError as exc:
        return Epsilon(None, str(exc))
    except Exception as exc:  # noqa: BLE001 - numerical failure inside Opacus
        return Epsilon(None, f"{accountant} accountant failed: {type(exc).__name__}: {exc}")
    if not math.isfinite(value):
        return Epsilon(None, f"{accountant} accountant returned {value}")
    return Epsilon(value)


def recompute(history: list[tuple[float, float, int]], delta: float, run_accountant: str) -> dict[str, Epsilon]:
    """Epsilon with RDP and PRV (and the run's accountant if it is neither) of `history`.

    The history is merged by (sigma, q) first: composition is order-independent, so this changes
    the result only by float rounding (measured: ~1e-15 relative for RDP, ~1e-12 for PRV, far
    below REL_TOL) and makes RDP with q < 1 and PRV many times faster on long histories.
    """
    rows = merged(tuple(history))
    out = {}
    for accountant in dict.fromkeys((*SECOND, run_accountant)):
        skip = prv_too_costly(rows, delta) if accountant == "prv" != run_accountant else None
        out[accountant] = Epsilon(None, f"skipped: {skip}") if skip else _epsilon(rows, delta, accountant)
    return out


# PRV as the *second* accountant is skipped when its grid would not fit (shared.privacy.accounting,
# the same guard `privrec calibrate` uses); as the run's own accountant it is always computed,
# because the device computed it too.


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"


def _independent(result: DeviceCheck | UserLevelCheck, history: list[tuple[float, float, int]], recorded: float | None,
                 accountant: str, delta: float, expected: Expected | None, rounds: int,
                 per_round: Callable[[float], int] | None) -> None:
    """dp-accounting's figures against the record, and the history against the config: flags into `result`."""
    opacus_rdp = result.recomputed.get("rdp")
    result.independent = independent.recompute(merged(tuple(history)), delta, recorded,
                                               opacus_rdp.value if opacus_rdp else None)
    found = independent.compare(recorded, accountant, result.independent)
    if found:
        result.flags.append(Flag(*found))
    if expected is not None:
        result.expected = expected
        result.flags += [Flag(code, detail) for code, detail in
                         independent.check_history(history, rounds, expected, per_round)]


def check_device(device: Device, delta: float, run_accountant: str, expected: Expected | None = None,
                 epochs: int | None = None) -> DeviceCheck:
    """The Opacus recomputation and the ledger checks, then the independent ones (dp-accounting, config)."""
    result = DeviceCheck(device=device, recomputed=recompute(device.history, delta, device.accountant))
    if device.source == "ledger" and device.ledger is not None:  # the ledger is the only record, unreadable
        result.flags.append(Flag("ledger-unreadable", f"{device.ledger.path.name}: {device.ledger.error}"))
        return result
    _check_records(result, delta, run_accountant)
    ledger = device.ledger
    if ledger is not None and not ledger.error and ledger.user_level_rows:
        result.ledger_user_level = _epsilon(merged(tuple(ledger.user_level_rows)), delta, "rdp")
    per_round = (lambda q: independent.steps_for(q, epochs)) if isinstance(epochs, int) and epochs > 0 else None
    _independent(result, device.history, device.epsilon, device.accountant, delta, expected, len(device.rounds),
                 per_round)
    return result


def _check_records(result: DeviceCheck, delta: float, run_accountant: str) -> None:
    device, flags = result.device, result.flags
    acc = device.accountant
    if acc != run_accountant:
        flags.append(Flag("accountant-mismatch", f"device used accountant {acc}, the run {run_accountant}"))
    mine = result.recomputed[acc]
    if mine.value is None:
        flags.append(Flag("unverifiable", f"recomputation with {acc} failed: {mine.error}"))
    elif not same(device.epsilon, mine.value):
        flags.append(Flag("reported-epsilon-mismatch",
                          f"{device.source} records epsilon {_fmt(device.epsilon)}, its history gives "
                          f"{_fmt(mine.value)} ({acc})"))
    eps = [e for _, e in device.rounds]
    if any(later < earlier and not same(later, earlier) for earlier, later in zip(eps, eps[1:])):
        flags.append(Flag("epsilon-decreased", f"reported epsilon went down between rounds: {eps}"))
    ledger = device.ledger
    if ledger is None:  # deployment: the ledgers are on the devices
        return
    if ledger.error:
        flags.append(Flag("ledger-unreadable", f"{ledger.path.name}: {ledger.error}"))
        return
    ledger_acc = ledger.accountant or acc
    result.ledger_recomputed = _epsilon(merged(tuple(ledger.history)), delta, ledger_acc) \
        if ledger_acc in ACCOUNTANTS else Epsilon(None, f"unknown accountant {ledger_acc!r}")
    lr = result.ledger_recomputed
    if lr.value is None:
        flags.append(Flag("ledger-unverifiable", f"recomputing the ledger's history failed: {lr.error}"))
    elif not same(ledger.epsilon if ledger.epsilon is not None else 0.0, lr.value):
        flags.append(Flag("ledger-epsilon-mismatch",
                          f"ledger records epsilon {_fmt(ledger.epsilon)}, its own history gives {_fmt(lr.value)} "
                          f"({ledger_acc})"))
    # (b) the dangerous direction: the device's own record shows less spend than the server saw.
    ledger_eps = ledger.epsilon if ledger.epsilon is not None else 0.0
    if below(ledger_eps, device.epsilon) or below(lr.value, mine.value):
        flags.append(Flag("ledger-below-server",
                          f"ledger shows less spend than the server saw: ledger epsilon {_fmt(ledger_eps)} "
                          f"(history gives {_fmt(lr.value)}), server {_fmt(device.epsilon)} "
                          f"(history gives {_fmt(mine.value)})"))


def check_round_releases(result: DeviceCheck, run_id: str) -> None:
    """Scorer pipelines: every round whose aggregate held this device's update is a release the device's ledger
    records, under the id `<run id>-round<r>`, before the update leaves; flag the rounds it lacks."""
    device, ledger = result.device, result.device.ledger
    if device.update_rounds is None or ledger is None or ledger.error:
        return  # a run from before the server recorded them; a deployment; an unreadable ledger (flagged already)
    recorded = set(ledger.releases)
    missing = [r for r in device.update_rounds if f"{run_id}-round{r}" not in recorded]
    if missing:
        result.flags.append(Flag("ledger-missing-round",
                                 f"the server counted this device's update in round(s) {missing}, but its ledger "
                                 f"records no user-level release for them (ids {run_id}-round<r>)"))


def check_user_level(user_level: UserLevel, delta: float, expected: Expected | None = None) -> UserLevelCheck:
    reported = user_level.rounds[-1][1] if user_level.rounds else None
    acc = user_level.accountant
    result = UserLevelCheck(user_level=user_level, reported=reported,
                            recomputed=recompute(user_level.history, delta, acc))
    mine = result.recomputed[acc]
    if mine.value is None:
        result.flags.append(Flag("unverifiable", f"recomputation with {acc} failed: {mine.error}"))
    elif reported is not None and not same(reported, mine.value):
        result.flags.append(Flag("reported-epsilon-mismatch",
                                 f"last reported user-level epsilon {_fmt(reported)}, its history gives "
                                 f"{_fmt(mine.value)} ({acc})"))
    # One release per round: a history row is 1 "step" per round at the cohort's sampling rate.
    _independent(result, user_level.history, reported, acc, delta, expected, len(user_level.rounds), lambda q: 1)
    return result


def _check_statement(statement: dict[str, Any], devices: list[DeviceCheck],
                     user_level: UserLevelCheck | None) -> dict[str, Any]:
    """A statement must not claim less than the spend it summarises (max over devices)."""
    mechanism = str(statement.get("mechanism", ""))
    claimed = statement.get("epsilon")
    basis, value, second = None, None, None
    if "user" in mechanism.lower():
        if user_level is not None:
            basis = "user-level epsilon recomputed from its history (run's accountant)"
            value = user_level.recomputed[user_level.user_level.accountant].value
            second = _independent_value(user_level.independent, user_level.user_level.accountant)
    else:
        basis = "maximum over devices of the epsilon recomputed from each history (run's accountant)"
        values = [d.recomputed[d.device.accountant].value for d in devices]
        value = max((v for v in values if v is not None), default=0.0)
        second = max((v for d in devices if (v := _independent_value(d.independent, d.device.accountant))
                      is not None), default=None)
    understated = isinstance(claimed, (int, float)) and below(float(claimed), value)
    # The claim must not be below the second code base's figure either (its own tolerance: 1%).
    under_second = (isinstance(claimed, (int, float)) and second is not None and float(claimed) < second
                    and not independent.agrees(float(claimed), second))
    detail = ("nothing in privacy.json to check it against" if basis is None else
              f"statement claims epsilon {_fmt(claimed)} but the recomputation gives {_fmt(value)}" if understated
              else f"statement claims epsilon {_fmt(claimed)} but dp-accounting gives {_fmt(second)}" if under_second
              else None)
    return {"statement": statement, "basis": basis, "recomputed": value,
            "ok": basis is not None and not understated and not under_second, "detail": detail}


def _independent_value(figures: dict[str, Figure], accountant: str) -> float | None:
    figure = figures.get(independent.COMPARED_WITH[accountant])
    return figure.value if figure is not None else None


def _check_metrics(rows: list[dict[str, Any]], devices: list[DeviceCheck],
                   user_level: UserLevelCheck | None) -> list[dict[str, Any]]:
    """The per-round figures (live display, plots) must not show less spend than the records."""
    checks = []
    pairs = [("epsilon-max", "maximum over devices that trained in this run of their latest epsilon",
              max((d.device.rounds[-1][1] for d in devices if d.device.rounds), default=None))]
    if user_level is not None:
        pairs.append(("user-level-epsilon", "user-level epsilon after the last round", user_level.reported))
    for key, basis, record in pairs:
        shown = next((r[key] for r in reversed(rows) if r.get(key) is not None), None)
        if record is None or shown is None:
            continue
        ok = not below(float(shown), record)
        checks.append({"key": key, "metrics": float(shown), "record": record, "basis": basis, "ok": ok,
                       "detail": None if ok else f"metrics.jsonl's last {key} {_fmt(shown)} is below the "
                                                 f"{basis}, {_fmt(record)}"})
    return checks


def cross_check(privacy: Privacy, rows: list[dict[str, Any]] | None = None,
                config: dict[str, Any] | None = None, run_id: str | None = None) -> CrossCheck:
    """Every check; `config` (the run's config.json) enables the history-against-config checks, and with `run_id`
    (the id the run's messages carried: its folder's name) the ledgers' round releases."""
    windows = independent.device_windows(config) if config else None
    epochs = config.get("local-epochs") if config else None

    def expected(device: str) -> Expected | None:
        if not config:
            return None
        return independent.expected_for(config, (windows or {}).get(device))

    devices = [check_device(d, privacy.delta, privacy.accountant, expected(d.device), epochs)
               for d in sorted(privacy.devices.values(), key=lambda d: (not d.device.isdigit(),
                                                                        int(d.device) if d.device.isdigit() else 0,
                                                                        d.device))]
    if config and run_id and config.get("model") in SCORER_MODELS:
        for result in devices:
            check_round_releases(result, run_id)
    user_level = None
    if privacy.user_level:
        user_expected = independent.expected_user_level(config, privacy.user_level.population) if config else None
        user_level = check_user_level(privacy.user_level, privacy.delta, user_expected)
    statements = [_check_statement(s, devices, user_level) for s in privacy.statements]
    return CrossCheck(devices=devices, user_level=user_level, statements=statements,
                      metrics=_check_metrics(rows or [], devices, user_level))
