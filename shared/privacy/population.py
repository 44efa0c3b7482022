"""Which devices of a population have ever spent privacy: for them a missing ledger is an error.

A device's ledger belongs to the device, not to a run. Ledgers live in a state folder that outlives
runs: a deployed device's own `state/` folder, or, for simulated devices, a population folder next to
the device store that every run on that store shares (`default_population_dir`):

    <state folder>/trained-devices                      one device id per line, appended, never rewritten
    <state folder>/device-<id>/privacy-ledger.json      the device's ledger (shared/privacy/ledger.py)

A device is listed once its ledger exists, before its update leaves. From then on a missing ledger
file stops the device ("train from zero" would under-report everything it spent before); nothing in
privrec removes a line from the list. If the whole folder is lost, the server still knows: it sends
each device the spend it has already seen from it, and `check_seen_spend` refuses to train below it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shared.errors import PrivrecError
from shared.privacy.accounting import history_steps
from shared.privacy.ledger import load_ledger

TRAINED_FILE = "trained-devices"


def default_population_dir(store_dir: str | Path) -> Path:
    """Simulated devices' ledgers: `<store>.population/` beside the store, shared by every run on it.

    Beside, not inside: rebuilding a damaged store replaces its folder, and must not take the ledgers."""
    store = Path(store_dir).expanduser().resolve()
    return store.with_name(store.name + ".population")


@dataclass
class _Listed:
    """What this process has read of one list file: the file (inode), how far, and the devices in it."""

    inode: int
    offset: int  # bytes read, up to the end of the last complete line
    devices: set[str]


_read_so_far: dict[Path, _Listed] = {}  # list file -> what was read of it (a node reads its list every message)


def trained_devices(folder: str | Path) -> set[str]:
    """The devices listed in `folder`'s list (a copy).

    The list is only ever appended to, so a process reads each byte of it once: later calls read what was
    appended since (at 100,000 devices, reading the whole list twice per node message cost 0.16 s a message).
    A list replaced or cut short (another inode, or shorter than what was read) is read again from the
    start; a last line without its newline (an append in progress) counts as it reads now and is read
    again next time.
    """
    path = Path(folder) / TRAINED_FILE
    try:
        with open(path, "rb") as handle:
            inode, size = os.fstat(handle.fileno()).st_ino, os.fstat(handle.fileno()).st_size
            known = _read_so_far.get(path)
            if known is None or known.inode != inode or size < known.offset:
                known = _Listed(inode=inode, offset=0, devices=set())
            handle.seek(known.offset)
            data = handle.read()
    except FileNotFoundError:
        _read_so_far.pop(path, None)
        return set()
    except OSError as exc:
        raise PrivrecError(f"{path} is unreadable ({exc}); refusing to train without knowing which devices "
                           "have spent privacy") from None
    complete = data[: data.rfind(b"\n") + 1]
    try:
        text = complete.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PrivrecError(f"{path} is unreadable ({exc}); refusing to train without knowing which devices "
                           "have spent privacy") from None
    known.devices.update(line.strip() for line in text.splitlines() if line.strip())
    known.offset += len(complete)
    _read_so_far[path] = known
    tail = data[len(complete):].decode("utf-8", errors="replace").strip()  # listed too, as it reads so far
    return known.devices | {tail} if tail else set(known.devices)


def mark_trained(folder: str | Path, device: str) -> None:
    """List `device` (once). One O_APPEND write per line: devices of one population may append at once."""
    if device in trained_devices(folder):
        return
    _append(folder, [device])


def _append(folder: str | Path, devices: list[str]) -> None:
    path = Path(folder) / TRAINED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, "".join(f"{device}\n" for device in devices).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def keep_all_listed(folder: str | Path, ledgers: dict[str, Path]) -> None:
    """`keep_listed` for many devices (device -> ledger path): the list is read once and appended once."""
    listed = trained_devices(folder)
    for device, path in ledgers.items():
        if not path.exists() and device in listed:
            keep_listed(folder, device, path)  # raises: listed, but its ledger is gone
    new = [device for device, path in ledgers.items() if device not in listed and path.exists()]
    if new:
        _append(folder, new)


def keep_listed(folder: str | Path, device: str, ledger_path: Path) -> None:
    """List a device whose ledger exists; refuse one that is listed but whose ledger is gone."""
    if ledger_path.exists():
        mark_trained(folder, device)
    elif device in trained_devices(folder):
        raise PrivrecError(f"privacy ledger {ledger_path} is missing, but device {device} has trained before "
                           f"(listed in {Path(folder) / TRAINED_FILE}); refusing to train from zero: restore "
                           "the ledger from a backup")


def check_seen_spend(ledger_path: Path, device: str, seen_steps: int) -> None:
    """Refuse to train when the ledger records fewer DP steps than the server has already seen from the device.

    `load_ledger` cannot tell a lost file from a device that never trained; the server's record (its
    checkpointed tally of this device's replies) can. A ledger below it was lost or restored from an old
    copy, and training on would restart the device's spend from there.
    """
    ledger = load_ledger(ledger_path, device)
    mine = history_steps(ledger.accountant_state)
    if mine < seen_steps:
        raise PrivrecError(f"privacy ledger {ledger_path} records {mine} DP steps, fewer than the {seen_steps} the "
                           f"server has already seen from device {device}; refusing to train rather than "
                           "under-report its spend: restore the ledger from a backup")
