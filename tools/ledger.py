"""`privrec ledger PATH`: what one device has spent, read from its own ledger (the device owner's view).

In a deployment the ledger never leaves the device, so `privrec report` (the server's view of a run) cannot check
it; this command is how the person who holds the device reads it. It shows

- the user-level releases the device's data entered (federated analytics and DP-FedAvg rounds of every run that
  used this ledger), grouped by run, each run's composition alone, and **all of them composed**: every release at
  its own noise with no sampling amplification, so the figure holds even for an observer who knows which rounds
  the device took part in. A run's own figure (its privacy.json) is for an observer who does not know that, and
  covers every user, sampled or not; runs do not compose themselves, the ledger does;
- its on-device DP-SGD spend (window-level unit), when it ran any;
- whether it reached its cap (`declined`).

Every figure is recomputed here with Opacus (the product's accountant) and with dp-accounting (another code base);
the figure the device itself recorded after its latest release is checked against them. Exit status 3 when
something disagrees (as `privrec report`), 2 on unreadable input.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

from shared.errors import PrivrecError
from shared.privacy.ledger import LEDGER_FILE, PrivacyLedger, load_ledger
from tools.report import independent
from tools.report.recompute import recompute

RELEASE_NAMES = {"popularity-histogram": "popularity histogram", "cooccurrence-histogram": "co-occurrence",
                 "transition-counts": "transitions", "channel-scorer-round": "round",
                 "content-scorer-round": "round"}


def find_ledger(path: str | Path) -> Path:
    """The ledger file PATH names: the file itself, or the one ledger inside a device folder (deployment:
    `device-<d>/state/device-<d>/privacy-ledger.json`; simulation: `<population>/device-<d>/...`)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise PrivrecError(f"{path}: no such ledger file or device folder")
    found = sorted({p.resolve() for pattern in (LEDGER_FILE, f"*/{LEDGER_FILE}", f"state/*/{LEDGER_FILE}")
                    for p in path.glob(pattern)})
    if not found:
        raise PrivrecError(f"{path}: holds no {LEDGER_FILE} (a device that never trained has none yet)")
    if len(found) > 1:
        raise PrivrecError(f"{path}: holds {len(found)} device ledgers; name one device's folder or file, e.g. "
                           f"{found[0].parent}")
    return found[0]


def _run_of(release_id: str) -> str:
    """The run a release belongs to: its id is `<run id>-<what>` (`-popularity`, `-cooccurrence`, `-round3`)."""
    return release_id.rsplit("-", 1)[0] if "-" in release_id else release_id


def _opacus(history: list[list[float]], delta: float) -> float | None:
    return recompute([tuple(r) for r in history], delta, "rdp")["rdp"].value


def _independent(history: list[list[float]], delta: float) -> dict[str, float | None]:
    figures = independent.recompute(tuple((float(z), float(q), int(n)) for z, q, n in history), delta, None, None)
    return {kind: figure.value for kind, figure in figures.items()}


def _delta(ledger: PrivacyLedger, delta: float | None) -> float:
    if delta is not None:
        if not 0 < delta < 1:
            raise PrivrecError(f"--delta {delta:g}: must be in (0, 1)")
        return delta
    recorded = {float(r["delta"]) for r in ledger.releases if "delta" in r}
    recorded |= {float(r["delta"]) for r in ledger.rounds if r.get("delta") is not None}
    if len(recorded) > 1:
        deltas = ", ".join(map(str, sorted(recorded)))
        raise PrivrecError(f"the ledger's releases were made at several deltas ({deltas}): pass --delta to compose "
                           "them at one")
    return recorded.pop() if recorded else 1e-5


def _checked(ledger: PrivacyLedger, path: Path) -> None:
    """Every accountant row the summary reads is numbers; else one line naming the ledger and the entry."""
    def numbers(row: Any, at: str) -> None:
        try:
            z, q, n = row
            if not (float(z) > 0 and 0 < float(q) <= 1 and int(n) >= 0):
                raise ValueError
        except (TypeError, ValueError):
            raise PrivrecError(f"privacy ledger {path}: {at} is not [noise multiplier > 0, sample rate in (0, 1], "
                               f"steps >= 0]: {row!r}") from None

    for i, entry in enumerate(ledger.releases):
        if not isinstance(entry, dict):
            raise PrivrecError(f"privacy ledger {path}: releases[{i}] is not an object")
        numbers([entry.get("noise_multiplier"), entry.get("sample_rate"), entry.get("steps")], f"releases[{i}]")
    for i, row in enumerate((ledger.accountant_state or {}).get("history") or []):
        numbers(row, f"accountant_state.history[{i}]")


def summarize(path: Path, delta: float | None = None) -> dict[str, Any]:
    """Everything `privrec ledger` shows, as JSON-able data; `flags` lists what disagrees."""
    if not path.is_file():
        raise PrivrecError(f"{path}: no such ledger file")
    ledger = load_ledger(path, device=path.parent.name.removeprefix("device-"))
    _checked(ledger, path)
    delta = _delta(ledger, delta)
    flags: list[str] = []
    runs: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for entry in ledger.releases:
        runs.setdefault(_run_of(str(entry.get("release", "?"))), []).append(entry)
    history = ledger.user_level_history()
    user_level: dict[str, Any] = {
        "unit": "the device's user(s)' whole history", "relation": "add/remove one user", "delta": delta,
        "releases": len(ledger.releases),
        "runs": [{"run": run, "releases": [{"kind": e.get("kind"), "release": e.get("release"),
                                            "noise-multiplier": e.get("noise_multiplier"),
                                            "mechanism": e.get("mechanism")} for e in entries],
                  "epsilon-alone": _opacus([[e["noise_multiplier"], e["sample_rate"], e["steps"]] for e in entries],
                                           delta)}
                 for run, entries in runs.items()],
        "epsilon": _opacus(history, delta) if history else 0.0,
        "accountant": "Opacus rdp (each release at its noise, sample rate 1: no sampling amplification)",
        "independent": _independent(history, delta) if history else {"rdp": 0.0, "pld": 0.0},
        "recorded": None,
    }
    if ledger.releases:
        last = ledger.releases[-1]
        recorded = last.get("user-level-epsilon")
        user_level["recorded"] = {"epsilon": recorded, "delta": last.get("delta"), "accountant": last.get("accountant")}
        if recorded is not None and last.get("delta") is not None:
            again = _opacus(history, float(last["delta"]))
            if not independent.agrees(float(recorded), again):
                flags.append(f"the device recorded user-level epsilon {float(recorded):.6g} after its latest release; "
                             f"its releases give {again:.6g} (Opacus rdp, delta {last['delta']:g})")
    rdp = user_level["independent"].get("rdp")
    if user_level["epsilon"] is not None and rdp is not None and user_level["epsilon"] < rdp * (1 - 1e-2):
        flags.append(f"user-level epsilon {user_level['epsilon']:.6g} is below dp-accounting's RDP {rdp:.6g}")
    on_device = _on_device(ledger, delta, flags)
    return {"ledger": str(path), "device": ledger.device, "user-level": user_level, "on-device": on_device,
            "declined": ledger.declined, "flags": flags}


def _on_device(ledger: PrivacyLedger, delta: float, flags: list[str]) -> dict[str, Any] | None:
    """The window-level DP-SGD spend (None when the device never ran DP-SGD)."""
    history = (ledger.accountant_state or {}).get("history") or []
    if not ledger.rounds and not history:
        return None
    private = [r for r in ledger.rounds if r.get("private", True)]
    accountant = str((ledger.accountant_state or {}).get("mechanism") or "rdp")
    rows = [(float(z), float(q), int(n)) for z, q, n in history]
    mine = recompute(rows, delta, accountant)
    out = {"unit": (private[-1].get("unit") if private else None) or "one window of the device's history",
           "relation": (private[-1].get("relation") if private else None) or "add/remove one window",
           "rounds": len(private), "runs": len({r.get("run") for r in private}),
           "non-private-rounds": len(ledger.rounds) - len(private), "unbounded": ledger.unbounded,
           "epsilon": None if ledger.unbounded else ledger.epsilon, "accountant": accountant, "delta": delta,
           "recomputed": {k: v.value for k, v in mine.items()},
           "independent": _independent([list(r) for r in rows], delta) if rows else {"rdp": 0.0, "pld": 0.0}}
    recorded_delta = private[-1].get("delta") if private else None
    if not ledger.unbounded and private and recorded_delta is not None:
        again = recompute(rows, float(recorded_delta), accountant)[accountant].value
        if not independent.agrees(ledger.epsilon, again):
            flags.append(f"the device recorded on-device epsilon {ledger.epsilon:.6g}; its DP-SGD history gives "
                         f"{again} ({accountant}, delta {recorded_delta:g})")
    return out


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def render(summary: dict[str, Any]) -> str:
    u = summary["user-level"]
    lines = [f"device {summary['device']}: {summary['ledger']}"]
    if not u["releases"]:
        lines.append("user-level releases: none")
    else:
        lines.append(f"user-level releases: {u['releases']} in {len(u['runs'])} run(s) (unit: {u['unit']}; "
                     f"{u['relation']})")
        for run in u["runs"]:
            parts = []
            for r in run["releases"]:
                name = RELEASE_NAMES.get(str(r["kind"]), str(r["kind"]))
                if name == "round":
                    name = f"round {str(r['release']).rsplit('round', 1)[-1]}"
                parts.append(f"{name} z {r['noise-multiplier']:g}")
            lines.append(f"  run {run['run']}: {', '.join(parts)} -> epsilon {_fmt(run['epsilon-alone'])} alone")
        ind = u["independent"]
        lines.append(
            f"  all runs composed: user-level epsilon {_fmt(u['epsilon'])} at delta {u['delta']:g} ({u['accountant']}; "
            f"dp-accounting RDP {_fmt(ind.get('rdp'))}, PLD {_fmt(ind.get('pld'))}). It holds even for someone who "
            "knows which rounds this device took part in; each run's own figure (its privacy.json) is for an "
            "observer who does not know that, and covers every user, sampled or not.")
        rec = u["recorded"]
        if rec and rec["epsilon"] is not None:
            lines.append(f"  recorded by the device after its latest release: {float(rec['epsilon']):.3f} at delta "
                         f"{rec['delta']:g} ({rec['accountant']})")
    d = summary["on-device"]
    if d is None:
        lines.append("on-device DP-SGD: none")
    elif d["unbounded"]:
        lines.append(f"on-device DP-SGD: epsilon unbounded: {d['non-private-rounds']} non-private round(s) recorded")
    else:
        rec = d["recomputed"]
        lines.append(f"on-device DP-SGD: epsilon {_fmt(d['epsilon'])} at delta {d['delta']:g} over {d['rounds']} "
                     f"round(s) in {d['runs']} run(s) (unit: {d['unit']}; {d['relation']}; {d['accountant']}; "
                     f"recomputed RDP {_fmt(rec.get('rdp'))}, PRV {_fmt(rec.get('prv'))}; dp-accounting RDP "
                     f"{_fmt(d['independent'].get('rdp'))}, PLD {_fmt(d['independent'].get('pld'))})")
    declined = summary["declined"]
    lines.append("cap: " + ("not reached" if not declined else
                            f"reached in run {declined.get('run')} round {declined.get('round')} (cap "
                            f"{declined.get('cap')}): this device never trains again with this ledger"))
    for flag in summary["flags"]:
        lines.append(f"FLAGGED: {flag}")
    return "\n".join(lines)


def to_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, default=str)
