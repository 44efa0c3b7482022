"""Read and validate a run directory for `privrec report` (input format: docs/report-format.md).

Everything the report needs is read here, once; every problem becomes a PrivrecError naming the
file, line or key at fault. Device ledgers are the exception: an unreadable ledger is a finding
about that device (flagged in the report), not a reason to refuse the whole report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.config import ACCOUNTANTS
from shared.errors import PrivrecError
from shared.privacy.device_journal import with_journal_devices

PRIVACY_FORMAT = 1
LEDGER_FORMAT = 1

# Config keys the report shows; absent ones (runs from before issue 3) are shown as null.
CONFIG_KEYS = ("dp", "noise-multiplier", "max-grad-norm", "window", "batch-size", "local-epochs", "delta",
               "accountant", "max-epsilon", "user-dp", "user-noise-multiplier", "user-clipping-norm",
               "num-rounds", "devices-per-round", "deterministic-devices", "public-share")
REQUIRED_CONFIG = ("dp", "delta", "accountant")


@dataclass
class Ledger:
    """One device's own ledger file (simulation only), or why it could not be read."""

    path: Path
    history: list[tuple[float, float, int]] = field(default_factory=list)
    accountant: str | None = None
    epsilon: float | None = None  # epsilon of its latest round entry (released or reserved)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    declined: dict[str, Any] | None = None
    error: str | None = None
    releases: list[str] = field(default_factory=list)  # ids of the user-level releases it recorded
    # their accountant rows [noise multiplier, sample rate, steps], every run that used this ledger
    user_level_rows: list[tuple[float, float, int]] = field(default_factory=list)


@dataclass
class Device:
    device: str
    accountant: str
    history: list[tuple[float, float, int]]
    rounds: list[tuple[int, float]]
    epsilon: float | None
    declined_round: int | None
    ledger: Ledger | None = None  # None: no devices/ folder (deployment)
    source: str = "privacy.json"  # where `history` and `epsilon` come from: "privacy.json" or "ledger"
    # the rounds whose aggregate the server built with this device's update (None: a run from before the
    # server recorded them)
    update_rounds: list[int] | None = None


@dataclass
class UserLevel:
    accountant: str
    history: list[tuple[float, float, int]]
    rounds: list[tuple[int, float]]
    population: int | None
    expected_cohort: float | None


@dataclass
class Privacy:
    delta: float
    accountant: str
    statements: list[dict[str, Any]]
    devices: dict[str, Device]
    user_level: UserLevel | None
    ledgers_present: bool
    source: str = "privacy.json"  # or "ledgers": reconstructed from devices/ (privacy.json missing)
    # "simulation" (<dir>/device-<id>/privacy-ledger.json) or "local deployment" (`privrec deploy local`: each
    # device folder's own state, <dir>/device-<id>/state/device-<id>/privacy-ledger.json)
    ledger_layout: str = "simulation"


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    status: dict[str, Any] | None
    summary: dict[str, Any] | None
    rounds: list[dict[str, Any]]
    privacy: Privacy | None
    privacy_missing_reason: str | None = None


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PrivrecError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise PrivrecError(f"{path}: not valid JSON ({exc}); the file is truncated or corrupt") from None


def _object(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise PrivrecError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _number(value: Any, where: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivrecError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _history(value: Any, where: str) -> list[tuple[float, float, int]]:
    if not isinstance(value, list):
        raise PrivrecError(f"{where}: expected a list of [noise_multiplier, sample_rate, steps], got {value!r}")
    rows = []
    for i, row in enumerate(value):
        ok = isinstance(row, (list, tuple)) and len(row) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in row)
        if not ok or int(row[2]) != row[2] or row[2] < 0 or not 0 < row[1] <= 1 or row[0] <= 0:
            raise PrivrecError(f"{where}[{i}]: {row!r} is not [noise_multiplier > 0, 0 < sample_rate <= 1, steps >= 0]")
        rows.append((float(row[0]), float(row[1]), int(row[2])))
    return rows


def _round_pairs(value: Any, where: str) -> list[tuple[int, float]]:
    if not isinstance(value, list):
        raise PrivrecError(f"{where}: expected a list of [round, epsilon], got {value!r}")
    pairs = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], int)):
            raise PrivrecError(f"{where}[{i}]: {pair!r} is not [round, epsilon]")
        pairs.append((int(pair[0]), _number(pair[1], f"{where}[{i}][1]")))
    return pairs


def _accountant(value: Any, where: str) -> str:
    if value not in ACCOUNTANTS:
        raise PrivrecError(f"{where}: accountant must be one of {', '.join(ACCOUNTANTS)}, got {value!r}")
    return value


# metrics.jsonl keys the report reads: numbers (or null), and 95% intervals [lo, hi] (or null).
METRIC_NUMBERS = ("devices-trained", "declined", "capped-devices", "epsilon-max", "epsilon-median",
                  "round-epsilon-max", "round-epsilon-median", "user-level-epsilon", "ndcg@10", "hr@10")
METRIC_INTERVALS = ("ndcg@10-ci", "hr@10-ci")


def load_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl: one JSON object per line, each with an integer `round`."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PrivrecError(f"{path}: cannot read ({exc.strerror or exc})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise PrivrecError(f"{path}, line {number}: not valid JSON ({exc}); the line is truncated or "
                               "corrupt") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise PrivrecError(f"{path}, line {number}: expected an object with an integer 'round'")
        for key in METRIC_NUMBERS:
            _number(row.get(key), f"{path}, line {number}: {key}", allow_none=True)
        for key in METRIC_INTERVALS:
            ci = row.get(key)
            if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in ci)):
                raise PrivrecError(f"{path}, line {number}: {key} must be [lo, hi] or null, got {ci!r}")
        rows.append(row)
    return rows


def _round_numbers(value: Any, at: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in value):
        raise PrivrecError(f"{at}: expected a list of round numbers, got {value!r}")
    return value


def _load_ledger(path: Path) -> Ledger:
    ledger = Ledger(path=path)
    if not path.exists():
        ledger.error = "ledger file missing"
        return ledger
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise PrivrecError(f"format {data.get('format') if isinstance(data, dict) else None!r}, "
                               f"expected {LEDGER_FORMAT}")
        state = data.get("accountant_state") or {}
        ledger.history = _history(state.get("history") or [], "accountant_state.history")
        ledger.accountant = state.get("mechanism")
        ledger.rounds = list(data.get("rounds") or [])
        if ledger.rounds:
            ledger.epsilon = _number(ledger.rounds[-1].get("epsilon"), "rounds[-1].epsilon")
            ledger.accountant = ledger.rounds[-1].get("accountant", ledger.accountant)
        ledger.declined = data.get("declined")
        ledger.releases = [str(r["release"]) for r in data.get("releases") or [] if isinstance(r, dict)
                           and "release" in r]
        ledger.user_level_rows = _history([[r["noise_multiplier"], r["sample_rate"], r["steps"]]
                                           for r in data.get("releases") or []], "releases")
    except (OSError, ValueError, PrivrecError, AttributeError, TypeError, KeyError) as exc:
        ledger.error = f"unreadable ({type(exc).__name__}: {exc})"
    return ledger


def load_privacy(path: Path, run_path: Path, ledgers_dir: Path | None = None) -> Privacy:
    where = path.name
    data = with_journal_devices(_object(path), path)  # a run still going, or one that crashed: from its journal
    if data.get("format") != PRIVACY_FORMAT:
        raise PrivrecError(f"{path}: format {data.get('format')!r} is not supported (this privrec reads format "
                           f"{PRIVACY_FORMAT})")
    for key in ("delta", "accountant", "statements", "devices"):
        if key not in data:
            raise PrivrecError(f"{path}: missing key {key!r}")
    delta = _number(data["delta"], f"{where}: delta")
    if not 0 < delta < 1:
        raise PrivrecError(f"{path}: delta must be in (0, 1), got {delta!r}")
    accountant = _accountant(data["accountant"], f"{where}: accountant")
    statements = data["statements"]
    if not isinstance(statements, list) or not all(isinstance(s, dict) and "mechanism" in s for s in statements):
        raise PrivrecError(f"{path}: statements must be a list of objects with a 'mechanism'")
    if not isinstance(data["devices"], dict):
        raise PrivrecError(f"{path}: devices must be an object keyed by device id")
    ledgers_dir = ledgers_dir or run_path / "devices"
    ledgers_present = ledgers_dir.is_dir()
    devices = {}
    for device_id, entry in data["devices"].items():
        at = f"{where}: devices[{device_id!r}]"
        if not isinstance(entry, dict):
            raise PrivrecError(f"{at}: expected an object")
        for key in ("history", "rounds", "epsilon"):
            if key not in entry:
                raise PrivrecError(f"{at}: missing key {key!r}")
        declined = entry.get("declined-round")
        if declined is not None and not isinstance(declined, int):
            raise PrivrecError(f"{at}.declined-round: expected a round number or null, got {declined!r}")
        devices[str(device_id)] = Device(
            device=str(device_id),
            accountant=_accountant(entry.get("accountant", accountant), f"{at}.accountant"),
            history=_history(entry["history"], f"{at}.history"),
            rounds=_round_pairs(entry["rounds"], f"{at}.rounds"),
            epsilon=_number(entry["epsilon"], f"{at}.epsilon", allow_none=True),
            declined_round=declined,
            ledger=_load_ledger(_ledger_file(ledgers_dir, str(device_id))) if ledgers_present else None,
            update_rounds=_round_numbers(entry.get("update-rounds"), f"{at}.update-rounds"),
        )
    user_level = None
    raw = data.get("user-level")
    if raw is not None:
        at = f"{where}: user-level"
        if not isinstance(raw, dict):
            raise PrivrecError(f"{at}: expected an object or null")
        user_level = UserLevel(
            accountant=_accountant(raw.get("accountant", accountant), f"{at}.accountant"),
            history=_history(raw.get("history", []), f"{at}.history"),
            rounds=_round_pairs(raw.get("rounds", []), f"{at}.rounds"),
            population=raw.get("population"), expected_cohort=raw.get("expected-cohort"))
    deployed = any(d.ledger is not None and d.ledger.path.parent.parent.name == "state" for d in devices.values())
    return Privacy(delta=delta, accountant=accountant, statements=statements, devices=devices,
                   user_level=user_level, ledgers_present=ledgers_present,
                   ledger_layout="local deployment" if deployed else "simulation")


def _ledger_file(ledgers_dir: Path, device_id: str) -> Path:
    """A device's ledger: `<dir>/device-<id>/privacy-ledger.json` (simulation), or, in the device folders of
    `privrec deploy local`, the folder's own state `<dir>/device-<id>/state/device-<id>/privacy-ledger.json`.
    Neither there: the first, whose absence the cross-check flags."""
    flat = ledgers_dir / f"device-{device_id}" / "privacy-ledger.json"
    nested = ledgers_dir / f"device-{device_id}" / "state" / f"device-{device_id}" / "privacy-ledger.json"
    return nested if not flat.exists() and nested.exists() else flat


NUMERIC_CONFIG = ("noise-multiplier", "max-grad-norm", "window", "batch-size", "local-epochs", "max-epsilon",
                  "user-noise-multiplier", "user-clipping-norm", "num-rounds", "devices-per-round")


def _check_config(config: dict[str, Any], path: Path) -> None:
    for key in REQUIRED_CONFIG:
        if key not in config:
            raise PrivrecError(f"{path}: missing key {key!r}")
    delta = _number(config["delta"], f"{path}: delta")
    if not 0 < delta < 1:
        raise PrivrecError(f"{path}: delta must be in (0, 1), got {delta!r}")
    _accountant(config["accountant"], f"{path}: accountant")
    for key in NUMERIC_CONFIG:
        _number(config.get(key), f"{path}: {key}", allow_none=True)


def load_run(path: str | Path) -> Run:
    """The run directory at `path`, validated; PrivrecError naming the file at fault otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PrivrecError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise PrivrecError(f"{path} is not a directory (give a run directory, runs/<run-id>)")
    if not (path / "config.json").is_file():
        raise PrivrecError(f"{path} is not a run directory: it has no config.json (give runs/<run-id>)")
    config = _object(path / "config.json")
    _check_config(config, path / "config.json")
    if not (path / "metrics.jsonl").is_file():
        raise PrivrecError(f"{path} has no metrics.jsonl: the run never recorded a round, nothing to report")
    rounds = load_metrics(path / "metrics.jsonl")
    status = _object(path / "status.json") if (path / "status.json").exists() else None
    if status is not None and status.get("state") == "running":
        # "running" is what a crashed run leaves behind too: ask its owner record which it is.
        from shared.run_owner import liveness

        verdict, why = liveness(path)
        status = {**status, "state": "crashed" if verdict == "crashed" else "running", "reason": why}
    summary = _object(path / "summary.json") if (path / "summary.json").exists() else None
    privacy, reason = None, None
    if (path / "privacy.json").exists():
        privacy = load_privacy(path / "privacy.json", path, _ledgers_dir(path, config))
    else:
        privacy = privacy_from_ledgers(path, config)
        reason = ("privacy.json is missing: this run was made by a privrec version that did not write it "
                  "(or stopped before round 1), so there is no server record to check the devices against"
                  + ("; the on-device figures below are reconstructed from the device ledgers in devices/"
                     if privacy else " and no device ledgers in the run directory"))
    return Run(path=path, config=config, status=status, summary=summary, rounds=rounds, privacy=privacy,
               privacy_missing_reason=reason)


def _ledgers_dir(path: Path, config: dict[str, Any]) -> Path:
    """Where the run's simulated devices keep their ledgers: the population folder the run names in
    config.json (shared by every run on its store), or devices/ in runs from before populations."""
    population = config.get("population-dir")
    return Path(population) if population and not (path / "devices").is_dir() else path / "devices"


def privacy_from_ledgers(path: Path, config: dict[str, Any]) -> Privacy | None:
    """Older simulation runs (no privacy.json): each device's own ledger is its only record.

    The on-device statement is rebuilt from the config (shared.privacy.statement) with the
    largest ledger epsilon; the cross-check then tests each ledger against its own history.
    """
    from shared.privacy.statement import privacy_statement

    files = sorted((path / "devices").glob("device-*/privacy-ledger.json"))
    if not files or not config.get("dp"):
        return None
    accountant, delta = config["accountant"], float(config["delta"])
    devices = {}
    for file in files:
        device_id = file.parent.name.removeprefix("device-")
        ledger = _load_ledger(file)
        mine = [e for e in ledger.rounds if isinstance(e, dict) and e.get("run") in (None, path.name)]
        declined = ledger.declined if isinstance(ledger.declined, dict) else {}
        devices[device_id] = Device(
            device=device_id, accountant=ledger.accountant if ledger.accountant in ACCOUNTANTS else accountant,
            history=ledger.history, epsilon=ledger.epsilon,
            rounds=[(int(e["round"]), float(e["epsilon"])) for e in mine if "round" in e and "epsilon" in e],
            declined_round=declined.get("round"), ledger=ledger if ledger.error else None, source="ledger")
    epsilon = max((d.epsilon for d in devices.values() if d.epsilon is not None), default=0.0)
    terms = privacy_statement(config)
    statement = {
        "mechanism": "on-device DP-SGD",
        "sentence": f"Each device's updates in this run are ({epsilon:.2f}, {delta:g})-differentially private "
                    f"for any single window of up to {config.get('window')} consecutive interactions of its user's "
                    f"history (so any single interaction, not a whole history), against {terms['adversary']} "
                    "(on-device DP-SGD; reconstructed from the device ledgers, as privacy.json is missing).",
        "epsilon": epsilon, "delta": delta, "unit": terms["privacy-unit"], "adversary": terms["adversary"],
        "accountant": accountant, "sampling": terms["sampling"]}
    return Privacy(delta=delta, accountant=accountant, statements=[statement], devices=devices, user_level=None,
                   ledgers_present=True, source="ledgers")


def finite_or_none(value: float | None) -> float | None:
    """JSON has no infinity: non-finite numbers become null (the report says why next to them)."""
    return value if value is not None and math.isfinite(value) else None
