"""Who owns a run directory: one exclusive lock for the life of a run, and an owner record.

    run.lock    an fcntl.flock held by the process that runs the run (the `privrec simulate` or
                `privrec deploy local` launcher, or the ServerApp when nobody launched it locally);
                the kernel drops it when that process dies, however it dies
    owner.json  pid, host, boot id and start time of that process, and a heartbeat it refreshes

A second run on the same directory is refused before it writes anything. `privrec report` and a
resume tell a live run from a crashed one with `liveness()`: on this host the lock itself answers;
from another host a stale heartbeat does. (The lock is local to a host: a run directory on a network
file system shared by two hosts is not protected against a run from the other host.)
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.atomic import write_json_atomic
from shared.errors import PrivrecError

LOCK = "run.lock"
OWNER = "owner.json"
HEARTBEAT_SECONDS = 10.0
STALE_AFTER = 120.0  # seconds without a heartbeat after which another host calls the run crashed
# Set by a launcher for everything it starts: the ServerApp then knows the lock is held on its behalf.
LOCK_ENV = "PRIVREC_RUN_LOCK"


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """The kernel's start time of `pid` (clock ticks since boot): a pid plus this names one process.
    "" for a process that is gone or a zombie (exited, not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return "" if fields[0] == "Z" else fields[19]


def process_alive(pid: int, start: str = "") -> bool:
    """Whether `pid` runs on this host, and (given `start`) is still the same process, not a reused pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    return not start or not Path("/proc").is_dir() or process_start(pid) == start


@dataclass
class RunLock:
    """The exclusive lock on one run directory; `release()` (or the process's death) gives it up."""

    path: Path
    fd: int
    owner: dict[str, Any] = field(default_factory=dict)
    _last_beat: float = 0.0

    @classmethod
    def acquire(cls, run_path: Path, role: str) -> RunLock:
        run_path.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PrivrecError(f"run directory {run_path} is in use by another run "
                               f"({describe_owner(read_owner(run_path))}); wait for it to end, stop it, "
                               "or choose another run-name") from None
        lock = cls(run_path, fd)
        lock.owner = {"pid": os.getpid(), "pid-start": process_start(os.getpid()), "host": socket.gethostname(),
                      "boot-id": boot_id(), "role": role, "started": time.time()}
        lock.heartbeat(force=True)
        return lock

    def heartbeat(self, force: bool = False, **extra: Any) -> None:
        """Refresh owner.json (at most every HEARTBEAT_SECONDS unless forced)."""
        now = time.time()
        if not force and not extra and now - self._last_beat < HEARTBEAT_SECONDS:
            return
        self.owner.update(extra)
        write_json_atomic(self.path / OWNER, {**self.owner, "heartbeat": now})
        self._last_beat = now

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_owner(run_path: Path) -> dict[str, Any] | None:
    import json

    try:
        owner = json.loads((run_path / OWNER).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def describe_owner(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "owner unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {started}"


def lock_is_held(run_path: Path) -> bool:
    """Whether some process on this host holds the run's lock (never blocks)."""
    if not (run_path / LOCK).exists():
        return False
    fd = os.open(run_path / LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return False


def liveness(run_path: Path) -> tuple[str, str]:
    """("live" | "crashed" | "unknown", one sentence why) for a run whose status says `running`."""
    owner = read_owner(run_path)
    if owner is None:
        return "unknown", f"{run_path} has no {OWNER} (a run made before privrec recorded its owner)"
    who = describe_owner(owner)
    age = time.time() - float(owner.get("heartbeat", 0))
    if owner.get("host") == socket.gethostname() and owner.get("boot-id") == boot_id():
        if lock_is_held(run_path):
            return "live", f"the run is live ({who}, heartbeat {age:.0f} s ago)"
        gone = "is gone" if not process_alive(int(owner.get("pid", 0)), owner.get("pid-start", "")) else \
            "no longer holds the run lock"
        return "crashed", f"the run crashed: its owner ({who}) {gone}; last heartbeat {age:.0f} s ago"
    if owner.get("host") == socket.gethostname():
        return "crashed", f"the run crashed: this host rebooted since its owner ({who}) started it"
    if age > STALE_AFTER:
        return "crashed", f"the run looks crashed: no heartbeat from its owner ({who}) for {age:.0f} s"
    return "live", f"the run looks live ({who}, heartbeat {age:.0f} s ago)"
