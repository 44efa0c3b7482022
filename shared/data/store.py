"""The device store: the on-disk unit a device reads.

Layout of a store directory:

    meta.json           format version, sizes, dataset name, source, content sha256 (written last)
    items.json          raw id and title (and genres, when known) per internal item id (index 0 = padding)
    train_items.npy     every user's train items concatenated, int64
    train_offsets.npy   int64 [num_users + 1]; user i's train items are train_items[off[i]:off[i+1]]
    valid.npy           int64 [num_users]
    test.npy            int64 [num_users]

Device d owns users [d*u, min((d+1)*u, num_users)) for u = users_per_device. Arrays are
memory-mapped, so a device reads only its own users' slices.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from shared.atomic import staged_dir, write_json_synced
from shared.data.fetch import SOURCE_FILE, default_cache_dir, fetch_ml100k
from shared.data.formats import content_sha256, duplicate_rows, load_interactions
from shared.data.split import SplitData, leave_one_out
from shared.errors import PrivrecError

log = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
META_FILE = "meta.json"
ITEMS_FILE = "items.json"
ARRAY_FILES = ("train_items.npy", "train_offsets.npy", "valid.npy", "test.npy")
_RESERVED_META = (
    "format_version", "num_items", "num_users", "num_devices", "users_per_device", "dropped_users",
)  # fmt: skip


@dataclass(frozen=True)
class DeviceData:
    device_id: int  # -1 for DeviceStore.all_users()
    train: list[np.ndarray]  # one chronological int64 array per user of the device
    valid: np.ndarray  # int64 [users on device]
    test: np.ndarray  # int64 [users on device]

    @property
    def num_users(self) -> int:
        return len(self.train)


# ----------------------------------------------------------------------------- writing


def _check_users_per_device(users_per_device: object) -> int:
    u = users_per_device
    if isinstance(u, bool) or not isinstance(u, int) or u < 1:
        raise PrivrecError(f"users-per-device={u!r}: must be an integer >= 1")
    return u


def write_store(
    split: SplitData, out_dir: Path, users_per_device: int = 1, meta_extra: dict | None = None
) -> Path:
    """Write `split` as a device store at `out_dir` (atomically; replaces an existing store)."""
    return _write_store(split, Path(out_dir), users_per_device, meta_extra or {}, replace=True)


def _write_store(
    split: SplitData, out_dir: Path, upd: int, meta_extra: dict, replace: bool
) -> Path:
    upd = _check_users_per_device(upd)
    clash = sorted(set(meta_extra) & set(_RESERVED_META))
    if clash:
        raise PrivrecError(f"meta_extra key {clash[0]!r} is reserved for the store itself")
    if not len(split.train) == len(split.valid) == len(split.test) == len(split.user_ids):
        raise PrivrecError(
            f"inconsistent split: {len(split.user_ids)} users, {len(split.train)} train "
            f"sequences, {len(split.valid)} valid and {len(split.test)} test items"
        )
    with staged_dir(out_dir, replace, making="store directory", writing="the device store") as staged:
        _write_store_files(split, staged, upd, meta_extra)
    return out_dir


def _write_store_files(split: SplitData, directory: Path, upd: int, meta_extra: dict,
                       place_items: Callable[[Path], None] | None = None, sync_each: bool = True) -> None:
    """The store's files in `directory`; `place_items(path)`, when given, puts items.json there instead
    of writing it from `split` (device folders share one catalogue file, shared/data/devices.py).

    `sync_each=False` leaves flushing to the caller, who must sync before publishing (thousands of
    device folders: one sync instead of six fsyncs per folder).
    """
    num_users = len(split.user_ids)
    lengths = np.array([len(t) for t in split.train], dtype=np.int64)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    train_items = (
        np.concatenate([np.asarray(t, dtype=np.int64) for t in split.train])
        if num_users
        else np.zeros(0, dtype=np.int64)
    )
    arrays = {
        "train_items.npy": train_items,
        "train_offsets.npy": offsets,
        "valid.npy": np.asarray(split.valid, dtype=np.int64),
        "test.npy": np.asarray(split.test, dtype=np.int64),
    }
    for name, arr in arrays.items():
        with open(directory / name, "wb") as f:
            np.save(f, arr)
            if sync_each:
                f.flush()
                os.fsync(f.fileno())
    if place_items is not None:
        place_items(directory / ITEMS_FILE)
    else:
        items = {"item_ids": split.item_ids, "item_titles": split.item_titles}
        if split.item_genres is not None:
            items["item_genres"] = split.item_genres
        write_json_synced(directory / ITEMS_FILE, items)
    meta = {
        "format_version": STORE_FORMAT_VERSION,
        "num_items": split.num_items,
        "num_users": num_users,
        "num_devices": -(-num_users // upd),
        "users_per_device": upd,
        "dropped_users": split.dropped_users,
        "dataset": None,
        "source": None,
        "content_sha256": None,
    }
    meta.update(meta_extra)
    if sync_each:
        write_json_synced(directory / META_FILE, meta)  # last: its presence marks a complete store
    else:
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- reading


class DeviceStore:
    """An opened, validated device store. Use `open_store(path)`."""

    def __init__(self, path: Path):
        self.path = path
        self.meta = _read_meta(path)
        self.num_items: int = self.meta["num_items"]
        self.num_users: int = self.meta["num_users"]
        self.num_devices: int = self.meta["num_devices"]
        self.users_per_device: int = self.meta["users_per_device"]
        self._train_items = _load_array(path, "train_items.npy", None)
        self._offsets = _load_array(path, "train_offsets.npy", self.num_users + 1)
        self._valid = _load_array(path, "valid.npy", self.num_users)
        self._test = _load_array(path, "test.npy", self.num_users)
        _check_offsets(path, self._offsets, len(self._train_items))

    @cached_property
    def _items(self) -> dict:
        items_path = self.path / ITEMS_FILE
        data = _read_json(items_path)
        ids = data.get("item_ids") if isinstance(data, dict) else None
        titles = data.get("item_titles") if isinstance(data, dict) else None
        want = self.num_items + 1
        if not isinstance(ids, list) or not isinstance(titles, list):
            raise PrivrecError(
                f"{items_path}: expected keys 'item_ids' and 'item_titles' holding lists"
            )
        if len(ids) != want or len(titles) != want:
            raise PrivrecError(
                f"{items_path}: {len(ids)} ids and {len(titles)} titles, expected {want} "
                f"(num_items={self.num_items} in {META_FILE}, plus padding)"
            )
        genres = data.get("item_genres")
        if genres is None:  # optional: stores of title-only data have none
            genres = [[] for _ in ids]
        if not isinstance(genres, list) or len(genres) != want or not all(
                isinstance(g, list) and all(isinstance(x, str) for x in g) for g in genres):
            raise PrivrecError(f"{items_path}: 'item_genres' must be {want} lists of genre names")
        return {"ids": ids, "titles": titles, "genres": genres}

    @property
    def item_ids(self) -> list[str]:
        return self._items["ids"]

    @property
    def item_titles(self) -> list[str | None]:
        return self._items["titles"]

    @property
    def item_genres(self) -> list[list[str]]:
        return self._items["genres"]

    def device(self, device_id: int) -> DeviceData:
        """The users of one device: [d*u, min((d+1)*u, num_users))."""
        if isinstance(device_id, bool) or not isinstance(device_id, (int, np.integer)):
            raise PrivrecError(f"device id {device_id!r}: must be an integer")
        d = int(device_id)
        if not 0 <= d < self.num_devices:
            raise PrivrecError(
                f"device id {d} out of range: valid ids are 0..{self.num_devices - 1} "
                f"({self.num_devices} devices in {self.path})"
            )
        start = d * self.users_per_device
        return self._users(d, start, min(start + self.users_per_device, self.num_users))

    def all_users(self) -> DeviceData:
        """Every user (central evaluation and baselines only; device_id is -1)."""
        return self._users(-1, 0, self.num_users)

    def _users(self, device_id: int, start: int, stop: int) -> DeviceData:
        offsets = np.asarray(self._offsets[start : stop + 1])
        # Copies of the mmap slices: only these bytes are read, and callers get writable arrays.
        train_block = np.array(self._train_items[offsets[0] : offsets[-1]], dtype=np.int64)
        valid = np.array(self._valid[start:stop], dtype=np.int64)
        test = np.array(self._test[start:stop], dtype=np.int64)
        checks = (("train_items.npy", train_block), ("valid.npy", valid), ("test.npy", test))
        for name, arr in checks:
            if arr.size and (arr.min() < 1 or arr.max() > self.num_items):
                raise PrivrecError(
                    f"{self.path / name}: item ids outside 1..{self.num_items} for users "
                    f"{start}..{stop - 1}; the store is corrupt, rebuild it"
                )
        train = np.split(train_block, (offsets[1:-1] - offsets[0]).tolist())
        return DeviceData(device_id=device_id, train=train, valid=valid, test=test)


def open_store(path: str | Path) -> DeviceStore:
    path = Path(path)
    if not path.is_dir():
        raise PrivrecError(f"{path}: no such device store directory")
    return DeviceStore(path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        msg = f"{path}: missing (not a device store, or an interrupted write)"
        raise PrivrecError(msg) from None
    except json.JSONDecodeError as exc:
        raise PrivrecError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PrivrecError(f"{path}: cannot read ({exc})") from None


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    meta = _read_json(meta_path)
    if not isinstance(meta, dict):
        raise PrivrecError(f"{meta_path}: expected a JSON object")
    version = meta.get("format_version")
    if version != STORE_FORMAT_VERSION:
        raise PrivrecError(
            f"{meta_path}: format_version {version!r} is not supported (expected "
            f"{STORE_FORMAT_VERSION}); rebuild the store"
        )
    for key in _RESERVED_META[1:]:
        value = meta.get(key)
        minimum = 1 if key == "users_per_device" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise PrivrecError(
                f"{meta_path}: key {key!r} is {value!r}, expected an integer >= {minimum}"
            )
    expected_devices = -(-meta["num_users"] // meta["users_per_device"])
    if meta["num_devices"] != expected_devices:
        raise PrivrecError(
            f"{meta_path}: num_devices {meta['num_devices']} is inconsistent with num_users "
            f"{meta['num_users']} and users_per_device {meta['users_per_device']} "
            f"(expected {expected_devices})"
        )
    return meta


def _load_array(path: Path, name: str, length: int | None) -> np.ndarray:
    file = path / name
    if not file.is_file():
        raise PrivrecError(f"{file}: missing (not a device store, or an interrupted write)")
    try:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PrivrecError(f"{file}: not a readable .npy array ({exc})") from None
    if arr.dtype != np.int64 or arr.ndim != 1:
        raise PrivrecError(f"{file}: expected a 1-D int64 array, got {arr.dtype} {arr.shape}")
    if length is not None and len(arr) != length:
        raise PrivrecError(f"{file}: has {len(arr)} entries, expected {length} (from {META_FILE})")
    return arr


def _check_offsets(path: Path, offsets: np.ndarray, num_train: int) -> None:
    file = path / "train_offsets.npy"
    if offsets[0] != 0 or offsets[-1] != num_train or np.any(np.diff(offsets) < 0):
        raise PrivrecError(
            f"{file}: offsets must rise from 0 to {num_train} (the length of train_items.npy)"
        )


# ----------------------------------------------------------------------------- cache


def prepare_store(dataset: str, users_per_device: int = 1, cache_dir: Path | None = None) -> Path:
    """Build (or reuse) the device store for `dataset`: "ml-100k" or a path to a supported file.

    Stores live in `<cache>/stores/<name>-<first 12 hex of content sha256>-u<users_per_device>/`;
    a store whose meta.json exists (written last) and opens cleanly is reused.
    """
    upd = _check_users_per_device(users_per_device)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if dataset == "ml-100k":
        data_path = fetch_ml100k(cache_dir=cache)
        name, source = "ml-100k", _fetch_source(data_path)
    else:
        data_path = Path(dataset).expanduser()
        if not data_path.exists():
            raise PrivrecError(
                f"dataset {dataset!r}: neither 'ml-100k' nor an existing file or directory"
            )
        name, source = _dataset_name(data_path), None
    inter = load_interactions(data_path)
    digest = content_sha256(inter)
    target = cache / "stores" / f"{name}-{digest[:12]}-u{upd}"
    if (target / META_FILE).is_file():
        try:
            open_store(target)
            return target
        except PrivrecError as exc:
            log.warning("rebuilding damaged device store: %s", exc)
    meta_extra = {
        "dataset": name,
        "source": source or inter.source,
        "source_detail": inter.source,
        "content_sha256": digest,
        "duplicate_rows": duplicate_rows(inter),  # shown on the console (shared.data.split.dataset_notes)
    }
    # Replace only a damaged store; if a parallel run publishes the same store first, keep theirs.
    return _write_store(leave_one_out(inter), target, upd, meta_extra, replace=target.exists())


def _fetch_source(data_dir: Path) -> str | None:
    try:
        return json.loads((data_dir / SOURCE_FILE).read_text(encoding="utf-8"))["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _dataset_name(path: Path) -> str:
    """A filesystem-safe name: the directory name, or the file stem (parent dir for u.data etc.)."""
    resolved = path.resolve()
    if resolved.is_dir():
        raw = resolved.name
    elif resolved.name in ("u.data", "ratings.dat"):
        raw = resolved.parent.name
    else:
        raw = resolved.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or "dataset"
