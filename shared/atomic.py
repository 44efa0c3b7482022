"""Atomic writes: a reader (or a crash) never sees a half-written file or directory.

Files: written to a temporary file next to the target, fsynced, renamed over it.
Directories: filled in a temporary sibling directory, fsynced, renamed into place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.errors import PrivrecError

_deferred = threading.local()


@contextmanager
def one_sync() -> Iterator[None]:
    """Atomic writes inside skip their own fsyncs; one `os.sync()` at the end makes all of them durable.

    For many small files written together (a simulated node's devices' ledgers: two fsyncs per file
    cost more than the devices' training). Whatever must be durable before something happens next
    (a ledger's reservation before training, its release before the update leaves) is written inside
    and the next step comes after the block. A crash inside can leave a written file empty or old, which
    its reader refuses (a ledger that cannot be read stops the device); nothing has been released then.
    """
    outer = getattr(_deferred, "active", False)
    _deferred.active = True
    try:
        yield
    finally:
        _deferred.active = outer
    if not outer:
        os.sync()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: the old content or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    deferred = getattr(_deferred, "active", False)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if not deferred:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not deferred:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=1) + "\n").encode())


def write_synced(path: Path, data: bytes) -> None:
    """Write bytes and fsync them, so a later rename publishes complete data."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_synced(path: Path, obj: object) -> None:
    write_synced(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_staging_dir(target: Path) -> Path:
    """An empty temporary directory next to `target` (same filesystem, so rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(staged, 0o755)  # mkdtemp makes 0700; the published dir should read like any other
    return staged


def publish_dir(staged: Path, target: Path, replace: bool = True) -> bool:
    """Atomically move a fully written staging directory to `target`.

    With `replace`, an existing `target` is swapped out. Without it, or when another process
    publishes the same target concurrently, the existing directory wins and `staged` is discarded
    (returns False): readers never see a directory disappear under them.
    """
    fsync_dir(staged)
    old = None
    if replace and target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(target, old)
        except FileNotFoundError:
            old = None
    try:
        os.rename(staged, target)
        published = True
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(staged, ignore_errors=True)
        published = False
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return published


@contextmanager
def staged_dir(target: Path, replace: bool = True, *, making: str = "", writing: str = "") -> Iterator[Path]:
    """Fill the yielded staging directory; on success it is published as `target`, on any error removed.

    Given `making` and `writing`, the file system's refusals become one-line PrivrecErrors: `<parent of
    target>: cannot create <making> (...)` for the staging directory, `<target>: cannot write <writing> (...)`
    while filling or publishing it.
    """
    try:
        staged = make_staging_dir(target)
    except OSError as exc:
        if not making:
            raise
        raise PrivrecError(f"{target.parent}: cannot create {making} ({exc})") from None
    try:
        yield staged
        publish_dir(staged, target, replace)
    except BaseException as exc:
        shutil.rmtree(staged, ignore_errors=True)
        if writing and isinstance(exc, OSError):
            raise PrivrecError(f"{target}: cannot write {writing} ({exc})") from None
        raise
