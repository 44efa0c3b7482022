"""Atomic writes: a reader (or a crash) never sees a half-written file or directory.

Files: written to a temporary file next to the target, fsynced, renamed over it.
Directories: filled in a temporary sibling directory, fsynced, renamed into place.
Many small files written together (`one_sync`): the same renames, made durable by one barrier at the end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.errors import PrivrecError

_deferred = threading.local()  # .dirs: the directories written inside the current `one_sync` (None outside it)
_temp_names = itertools.count()


@contextmanager
def one_sync() -> Iterator[None]:
    """Atomic writes inside skip their own fsyncs; one barrier at the end makes all of them durable.

    For many small files written together (a simulated node's devices' ledgers: two fsyncs per file
    cost more than the devices' training). Whatever must be durable before something happens next
    (a ledger's reservation before training, its release before the update leaves) is written inside
    and the next step comes after the block. The barrier is `syncfs` of each file system written on
    (dirty data and the journal, the renames included), and is skipped when nothing was written.
    A crash inside can leave a written file old, or empty or cut short, which its reader refuses (a
    ledger that cannot be read stops the device); nothing has been released then. An error inside
    skips the barrier: whatever was to follow the block does not happen either.
    """
    outer = getattr(_deferred, "dirs", None)
    written: set[Path] = set() if outer is None else outer
    _deferred.dirs = written
    try:
        yield
    finally:
        _deferred.dirs = outer
    if outer is None and written:
        sync_filesystems(written)


def sync_filesystems(paths: Iterable[Path]) -> None:
    """Make every completed write on the file systems holding `paths` durable: one `syncfs` each.

    Unlike `os.sync()` it leaves other file systems alone; like it, it also waits for other writers'
    dirty data on the same file system (wall time, not CPU time). Falls back to `os.sync()` where the
    C library has no `syncfs`."""
    one_per_device: dict[int, Path] = {}
    for path in paths:
        one_per_device.setdefault(os.stat(path).st_dev, Path(path))
    syncfs = _syncfs()
    if syncfs is None:
        os.sync()
        return
    for path in one_per_device.values():
        fd = os.open(path, os.O_RDONLY)
        try:
            if syncfs(fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"syncfs: {os.strerror(code)}", str(path))
        finally:
            os.close(fd)


_libc: list = []


def _syncfs():
    if not _libc:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name, use_errno=True) if name else None
        _libc.append(getattr(libc, "syncfs", None))
    return _libc[0]


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: the old content or the new, never a mix."""
    path = Path(path)
    deferred = getattr(_deferred, "dirs", None)
    if deferred is not None:
        _replace_unsynced(path, data)
        deferred.add(path.parent)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _replace_unsynced(path: Path, data: bytes) -> None:
    """`write_bytes_atomic` without its fsyncs (inside `one_sync`, whose barrier follows). The temporary
    name is unique to this process and thread (no random names drawn: this runs once per ledger write)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{next(_temp_names)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
