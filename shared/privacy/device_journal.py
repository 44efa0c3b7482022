"""The server's per-device privacy records, written as a journal: a round costs its cohort, not the population.

`privacy.json` keys every device that ever replied to its record (accountant history, epsilon per round,
the round it declined, refusals). At 100,000 devices, rewriting all of them after every round costs
more than the round's own bookkeeping, so while a run goes on the records live in an append-only file
beside it:

    runs/<run-id>/privacy-devices.jsonl   one line per record that changed in a round, appended after
                                          the round (one write, fsynced), never rewritten:
                                          {"round": r, "node": n, "device": "7", "epsilon": e or null,
                                           "record": {...the device's whole privacy.json entry...}}

A device's record is its last line (each line is the whole cumulative record, not a change). While the
run goes on `privacy.json` has no `devices` but `"devices-journal": "privacy-devices.jsonl"`; when the
run ends (completed, stopped early, or failed on a round) it is written once more with every record
under `devices`, as documented. `privacy_record(run_dir)` reads either: what every reader of a run's
privacy record should call.

Crash safety: a line is complete once its newline is on disk. A crash while appending can leave a
torn last line, never a torn earlier one: `read_journal` ignores a torn last line (the round it belonged
to had not been checkpointed) and `DeviceJournal.resume` cuts it off before appending. A complete line
that does not parse, or a journal shorter than the checkpoint says it covered, is refused: records
were lost. Records appended after the last checkpoint (a round that crashed before its checkpoint) are
kept on resume: the devices did spend, and the server's record of spend never goes down.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.atomic import write_bytes_atomic
from shared.errors import PrivrecError

JOURNAL = "privacy-devices.jsonl"
JOURNAL_KEY = "devices-journal"  # privacy.json while the run goes on: where its `devices` are


@dataclass
class JournalState:
    """What the journal holds: each device's latest record, its largest reported epsilon, its node id."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    epsilons: dict[str, float] = field(default_factory=dict)
    node_devices: dict[int, str] = field(default_factory=dict)
    size: int = 0  # bytes of complete lines


def read_journal(path: Path, *, min_bytes: int = 0) -> JournalState:
    """Every complete line of the journal at `path` (none if it does not exist).

    Refuses (PrivrecError naming the file and line) a complete line that does not parse, and a
    journal holding fewer than `min_bytes` bytes of complete lines (the checkpoint counted more).
    """
    state = JournalState()
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as exc:
        raise PrivrecError(f"{path}: unreadable ({exc})") from None
    complete = data[: data.rfind(b"\n") + 1]  # a torn last line (a crash while appending) is not a record
    for number, line in enumerate(complete.splitlines(), start=1):
        try:
            entry = json.loads(line)
            device, record = str(entry["device"]), entry["record"]
            if not isinstance(record, dict):
                raise ValueError("record is not an object")
            state.records[device] = record
            if entry.get("epsilon") is not None:
                state.epsilons[device] = max(float(entry["epsilon"]), state.epsilons.get(device, 0.0))
            if entry.get("node") is not None:
                state.node_devices[int(entry["node"])] = device
        except (ValueError, KeyError, TypeError) as exc:
            raise PrivrecError(f"{path} line {number}: not a device record ({exc}); the server's privacy records "
                               "are damaged") from None
    state.size = len(complete)
    if state.size < min_bytes:
        raise PrivrecError(f"{path} holds {state.size} bytes of device records, fewer than the {min_bytes} its "
                           "checkpoint covered: device records were lost; restore the file from a backup")
    return state


class DeviceJournal:
    """The ServerApp's writer of `privacy-devices.jsonl` (one per run directory)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.size = 0

    def start(self) -> None:
        """A run that starts over (no checkpoint to resume): an empty journal, as privacy.json starts empty."""
        self._replace(b"")

    def resume(self, min_bytes: int) -> JournalState:
        """The records to resume with; a torn last line is cut off so the next append starts a new line."""
        state = read_journal(self.path, min_bytes=min_bytes)
        if self.path.exists() and self.path.stat().st_size != state.size:
            with open(self.path, "r+b") as handle:
                handle.truncate(state.size)
                os.fsync(handle.fileno())
        self.size = state.size
        return state

    def append(self, server_round: int, changed: dict[str, int | None], records: dict[str, dict[str, Any]],
               epsilons: dict[str, float]) -> int:
        """Append the records of the `changed` devices (device -> node id), one write, fsynced; the bytes written."""
        if not changed:
            return 0
        data = "".join(json.dumps({"round": server_round, "node": node, "device": device,
                                   "epsilon": epsilons.get(device), "record": records[device]}) + "\n"
                       for device, node in changed.items()).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except BaseException:
            try:  # a partial append (a full disk) must not leave a torn line for the next one to follow
                os.ftruncate(fd, self.size)
            except OSError:
                pass  # a torn last line is ignored by readers and cut off on resume
            raise
        finally:
            os.close(fd)
        self.size += len(data)
        return len(data)

    def _replace(self, data: bytes) -> None:
        write_bytes_atomic(self.path, data)
        self.size = len(data)


def privacy_record(run_dir: str | Path) -> dict[str, Any]:
    """`runs/<run-id>/privacy.json` with every device's record under `devices`, read from the journal
    when the run has not written them there (it is still going, or it crashed)."""
    path = Path(run_dir) / "privacy.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrivrecError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PrivrecError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise PrivrecError(f"{path}: expected a JSON object")
    return with_journal_devices(data, path)


def with_journal_devices(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """privacy.json's content `data` (read from `path`) with `devices` filled in from the journal it names."""
    journal = data.pop(JOURNAL_KEY, None)
    if journal is not None and "devices" not in data:
        if not isinstance(journal, str) or Path(journal).name != journal:
            raise PrivrecError(f"{path}: {JOURNAL_KEY} must name a file beside it, got {journal!r}")
        data["devices"] = read_journal(Path(path).parent / journal).records
    return data
