"""A device's privacy ledger: the durable record of every DP-SGD step it has ever released.

The ledger is the device's own file. It holds the full accountant history (noise multiplier,
sampling rate, steps) so epsilon can be recomputed by anyone, with any accountant, and composes
across rounds and runs. Writes are atomic (temp file, fsync, rename): an interruption leaves the
previous complete ledger, never a half-written one. A simulated node writes its devices' ledgers
inside `shared.atomic.one_sync` (renames without fsyncs, then one `syncfs` barrier before the next
step): a crash before the barrier can leave a file empty or cut short, never one that parses as less
spend. A ledger that cannot be read is an error that stops the device from training; it is never
silently treated as "nothing spent".

Spend is written in two steps around training: `reserve` records the round's steps (and the
epsilon they bring) *before* training starts, `release` marks them released once the update is
ready to leave. A crash in between leaves a "reserved" entry that still counts: the ledger can
over-report a round that was never released, never under-report one that was.

A device whose next round would pass its cap (`max-epsilon`) records `declined` and never trains
again with this ledger, in this run or any later one, private or not.

A non-private round (dp = false) is recorded too (reserved, then released, with `"private": false`):
from then on the device's epsilon is unbounded (`epsilon` is inf in memory; the file stores the flag,
never an infinite number, which JSON cannot hold).

One round at a time: `ledger_lock` holds an exclusive lock on a file beside the ledger from loading
it to releasing the round, so two train messages for one device cannot both start from the same
spend and have the second write lose the first's steps.
"""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.atomic import write_bytes_atomic
from shared.errors import PrivrecError

LEDGER_FILE = "privacy-ledger.json"
LEDGER_FORMAT = 1


@dataclass
class PrivacyLedger:
    device: str
    accountant_state: dict | None = None  # Opacus accountant state_dict: {"history": [[sigma, q, steps]...], ...}
    rounds: list[dict[str, Any]] = field(default_factory=list)  # one entry per reserved/released round
    declined: dict[str, Any] | None = None  # set once the cap was reached: the device never trains again
    # User-level releases (federated analytics, `shared.analytics`): one entry per Gaussian release the device
    # took part in. Their unit is the user's whole history, not one window, so they are composed apart from
    # the DP-SGD history above (see `user_level_history`), never mixed into it.
    releases: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "device": self.device,
            "accountant_state": self.accountant_state,
            "rounds": self.rounds,
            "declined": self.declined,
            "releases": self.releases,
        }

    def user_level_history(self) -> list[list[float]]:
        """Accountant rows [noise multiplier, sample rate, steps] of the user-level releases."""
        return [[float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])] for r in self.releases]

    @property
    def unbounded(self) -> bool:
        """True once a non-private round was reserved: no finite epsilon holds for this device any more."""
        return any(entry.get("private") is False for entry in self.rounds)

    @property
    def epsilon(self) -> float:
        """The epsilon recorded with the latest DP round (0 before any); inf after a non-private round."""
        if self.unbounded:
            return math.inf
        return float(self.rounds[-1]["epsilon"]) if self.rounds else 0.0


def load_ledger(path: Path, device: str) -> PrivacyLedger:
    """The device's ledger, or an empty one if the file does not exist yet."""
    if not path.exists():
        return PrivacyLedger(device=device)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PrivrecError(f"privacy ledger {path} is unreadable ({exc}); refusing to train "
                           "rather than under-report spent privacy") from None
    if not isinstance(data, dict):
        raise PrivrecError(f"privacy ledger {path} is unreadable (not a JSON object); refusing to train")
    return from_json(data, str(path))


def from_json(data: dict[str, Any], where: str) -> PrivacyLedger:
    try:
        if data.get("format") != LEDGER_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {LEDGER_FORMAT}")
        state = data["accountant_state"]
        if state is not None and not isinstance(state.get("history"), list):
            raise ValueError("accountant_state.history is not a list")
        declined = data.get("declined")
        if declined is not None and not isinstance(declined, dict):
            raise ValueError("declined is neither null nor an object")
        releases = data.get("releases", [])  # absent in ledgers written before analytics existed
        if not isinstance(releases, list):
            raise ValueError("releases is not a list")
        return PrivacyLedger(device=str(data["device"]), accountant_state=state, rounds=list(data["rounds"]),
                             declined=declined, releases=list(releases))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PrivrecError(f"privacy ledger {where} is unreadable ({exc}); refusing to train "
                           "rather than under-report spent privacy") from None


def reconcile(path: Path, mirror: PrivacyLedger | None) -> None:
    """Make the file at `path` hold the larger of itself and an in-memory mirror of the ledger.

    The file can go missing or be restored from an old backup while the node keeps running; the
    node's in-memory copy (Flower's context.state) then still knows the true spend. Privacy spend
    only grows, so the record with more released rounds is the right one. Rounds are compared by
    count too: a non-private round adds no DP-SGD steps, but its entry must not be lost either.
    """
    if mirror is None:
        return
    on_disk = load_ledger(path, mirror.device)
    if (_spent_steps(mirror) > _spent_steps(on_disk) or (mirror.declined and not on_disk.declined)
            or (mirror.unbounded and not on_disk.unbounded) or len(mirror.releases) > len(on_disk.releases)
            or len(mirror.rounds) > len(on_disk.rounds)):
        save_ledger(path, mirror)


def _spent_steps(ledger: PrivacyLedger) -> int:
    history = (ledger.accountant_state or {}).get("history") or []
    return sum(int(row[2]) for row in history)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextmanager
def ledger_lock(path: Path) -> Iterator[None]:
    """Exclusive lock for one device's ledger, held from load to release of a round.

    `fcntl.flock` on a separate lock file (the ledger itself is replaced by rename on every write, so
    a lock on it would be a lock on a file that no longer exists). Blocks until the other round ends;
    the operating system drops the lock if the holder dies.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(path), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def reserve(path: Path, ledger: PrivacyLedger, planned_state: dict, entry: dict[str, Any]) -> None:
    """Record a round's spend before training: `planned_state` already includes its steps."""
    ledger.accountant_state = planned_state
    ledger.rounds.append({**entry, "status": "reserved"})
    save_ledger(path, ledger)


def release(path: Path, ledger: PrivacyLedger, **updates: Any) -> None:
    """Mark the reserved round released (its update may now leave the device)."""
    if not ledger.rounds or ledger.rounds[-1].get("status") != "reserved":
        raise PrivrecError(f"privacy ledger {path}: no reserved round to release")
    ledger.rounds[-1].update(updates, status="released")
    save_ledger(path, ledger)


def decline(path: Path, ledger: PrivacyLedger, record: dict[str, Any]) -> None:
    """Record that the device reached its cap; from now on it never trains with this ledger."""
    ledger.declined = record
    save_ledger(path, ledger)


def save_ledger(path: Path, ledger: PrivacyLedger) -> None:
    """Atomically replace the ledger file with `ledger`.

    One line of JSON: the C encoder (an indented dump runs Python's encoder, which was half the cost of
    a simulated node's ledger writes). Cut short anywhere, it no longer parses."""
    write_bytes_atomic(path, (json.dumps(ledger.to_json()) + "\n").encode())
