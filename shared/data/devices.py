"""On-device data stores for a deployment: one folder per device, plus a public catalogue.

`privrec data split --out DEVICES_DIR` writes:

    DEVICES_DIR/
      catalogue/               what the ServerApp may read: no histories
        catalogue.json         format_version, num_items, num_devices, users_per_device, dataset,
                               items_sha256 (SHA-256 of items.json's bytes), ...
        items.json             raw id and title per internal item id (index 0 = padding); read-only
      device-<d>/              everything device d holds, and nothing of any other device
        device.json            {"format_version": 1, "device-id": "<d>"}
        data/                  a device store (see shared/data/store.py) with this device's users only;
                               its items.json is a hard link to catalogue/items.json (one copy on
                               disk for every device of the machine), its meta.json has items_sha256
        state/                 empty: the device's privacy ledger (and audit.jsonl of what it sent) go here

The catalogue is public and identical for every device, so one file serves them all where they
share a disk; a device folder copied to another machine (cp -r, rsync, tar) carries a full copy and
stays self-contained. A device checks its items.json against items_sha256 when it starts
(`open_device`), and against the hash the server names in every message (`CATALOGUE_KEY`, from the
server's catalogue.json) before it trains or evaluates. Where the file system has no
hard links, or a file reaches its link limit, the catalogue is copied instead.

A SuperNode is started with `--node-config 'data-dir=".../device-<d>/data" state-dir=".../device-<d>/state"
device-id="<d>"'` (`privrec deploy node --data DEVICES_DIR/device-<d>` builds that line). Any app that
writes the same files (a device store is six small files, see store.py) can feed privrec's ClientApp.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.atomic import staged_dir, write_json_synced
from shared.data.split import SplitData
from shared.data.store import ITEMS_FILE, DeviceStore, _write_store_files, open_store
from shared.errors import PrivrecError

DEVICES_FORMAT_VERSION = 1
CATALOGUE_DIR = "catalogue"
CATALOGUE_FILE = "catalogue.json"
DEVICE_FILE = "device.json"
CATALOGUE_KEY = "catalogue-sha256"  # message config: the SHA-256 of the items.json the server reads


def split_devices(store: DeviceStore, out_dir: Path) -> Path:
    """Write one folder per device of `store` under `out_dir` (all or nothing; never over existing data)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # It may hold devices' privacy ledgers: never overwrite them.
        raise PrivrecError(f"--out {out_dir}: already exists and is not empty; choose a new folder")
    try:
        with staged_dir(out_dir, replace=False) as staged:
            catalogue = _write_catalogue(store, staged / CATALOGUE_DIR)
            for d in range(store.num_devices):
                _write_device(store, d, staged / f"device-{d}", catalogue)
            os.sync()  # once for every file above, before the folder is published by a rename
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above): let the staged folder take its place
    except OSError as exc:
        raise PrivrecError(f"--out {out_dir}: cannot write the device folders ({exc.strerror or exc})") from None
    return out_dir


class SharedCatalogue:
    """The catalogue file every device folder links to; a fresh copy when links are impossible."""

    def __init__(self, path: Path):
        self.source = path
        self.sha256 = file_sha256(path)

    def place(self, target: Path) -> None:
        try:
            os.link(self.source, target)
        except OSError as exc:
            shutil.copyfile(self.source, target)
            if exc.errno == errno.EMLINK:  # the file's link limit (ext4: 65,000): link the next ones to the copy
                self.source = target


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _write_catalogue(store: DeviceStore, directory: Path) -> SharedCatalogue:
    directory.mkdir()
    shutil.copyfile(store.path / ITEMS_FILE, directory / ITEMS_FILE)
    os.chmod(directory / ITEMS_FILE, 0o444)  # shared by hard links: never to be edited in place
    catalogue = SharedCatalogue(directory / ITEMS_FILE)
    meta = {k: store.meta.get(k) for k in ("dataset", "source", "content_sha256")}
    write_json_synced(directory / CATALOGUE_FILE, {
        "format_version": DEVICES_FORMAT_VERSION, "num_items": store.num_items,
        "num_devices": store.num_devices, "users_per_device": store.users_per_device,
        "items_sha256": catalogue.sha256, **meta})
    return catalogue


def _write_device(store: DeviceStore, device: int, directory: Path, catalogue: SharedCatalogue) -> None:
    data = store.device(device)
    (directory / "data").mkdir(parents=True)
    (directory / "state").mkdir()
    # items.json is placed from the shared catalogue, so the split needs no item lists of its own.
    split = SplitData(num_items=store.num_items, item_ids=[], item_titles=[],
                      user_ids=[str(u) for u in range(data.num_users)], train=data.train, valid=data.valid,
                      test=data.test, dropped_users=0)
    meta = {k: store.meta.get(k) for k in ("dataset", "source", "content_sha256")}
    _write_store_files(split, directory / "data", max(1, data.num_users),
                       {**meta, "device": str(device), "items_sha256": catalogue.sha256},
                       place_items=catalogue.place, sync_each=False)
    (directory / DEVICE_FILE).write_text(json.dumps({"format_version": DEVICES_FORMAT_VERSION,
                                                     "device-id": str(device)}) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class DeviceFolder:
    path: Path
    device_id: str

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    def node_config(self) -> str:
        """The `flower-supernode --node-config` value for this device (read by client/app.py)."""
        return (f'data-dir="{self.data_dir.resolve()}" state-dir="{self.state_dir.resolve()}" '
                f'device-id="{self.device_id}" audit-log="{self.audit_log.resolve()}"')

    @property
    def audit_log(self) -> Path:
        """Every reply this device sends, recorded by client/audit.py."""
        return self.state_dir / "audit.jsonl"


def open_device(path: str | Path) -> DeviceFolder:
    """A device folder written by `split_devices`, checked enough to fail early with a clear message."""
    path = Path(path).expanduser()
    info_path = path / DEVICE_FILE
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        device_id = str(info["device-id"])
    except FileNotFoundError:
        raise PrivrecError(f"{info_path}: missing; --data must be a device folder written by "
                           "`privrec data split` (DEVICES_DIR/device-<d>)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrivrecError(f"{info_path}: unreadable ({exc})") from None
    if '"' in str(path.resolve()):
        raise PrivrecError(f"{path}: a device folder path must not contain '\"'")
    store = open_store(path / "data")  # raises a named error if the histories are missing or damaged
    _check_catalogue(path / "data" / ITEMS_FILE, store.meta.get("items_sha256"))
    (path / "state").mkdir(exist_ok=True)
    return DeviceFolder(path=path, device_id=device_id)


def check_server_catalogue(store_dir: str | Path, server_sha256: str) -> None:
    """A deployed device holds the catalogue the server names (the same items behind the same indices)."""
    _check_items_sha256(Path(store_dir) / ITEMS_FILE, server_sha256,
                        lambda items, found: f"{items}: SHA-256 {found[:12]}... is not the server's catalogue "
                                             f"({server_sha256[:12]}...): this device was split from other data; "
                                             "give it the folder `privrec data split` wrote with the server's "
                                             "catalogue")


def _check_catalogue(items: Path, expected: str | None) -> None:
    """The device's catalogue is the one it was split with (the server's catalogue.json names the same hash)."""
    if expected is None:  # device folders written before the hash was recorded
        return
    _check_items_sha256(items, expected,
                        lambda items, found: f"{items}: SHA-256 {found[:12]}... differs from items_sha256 "
                                             f"{expected[:12]}... in {items.parent / 'meta.json'}: the catalogue "
                                             "was changed or damaged; copy it again from "
                                             "DEVICES_DIR/catalogue/items.json")


def _check_items_sha256(items: Path, expected: str, mismatch: Callable[[Path, str], str]) -> None:
    """`items` hashes to `expected`, else a PrivrecError worded by `mismatch(items, found)`."""
    try:
        found = file_sha256(items)
    except OSError as exc:
        raise PrivrecError(f"{items}: cannot read ({exc.strerror or exc})") from None
    if found != expected:
        raise PrivrecError(mismatch(items, found))


def read_catalogue(path: str | Path) -> dict:
    """The public catalogue the ServerApp reads in a deployment: catalogue.json plus items.json's path."""
    path = Path(path).expanduser()
    file = path / CATALOGUE_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrivrecError(f"{file}: missing; config key 'catalogue' must name DEVICES_DIR/catalogue "
                           "written by `privrec data split`") from None
    except (OSError, ValueError) as exc:
        raise PrivrecError(f"{file}: unreadable ({exc})") from None
    for key in ("num_items", "num_devices"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 1:
            raise PrivrecError(f"{file}: key {key!r} is {meta.get(key)!r}, expected an integer >= 1")
    if not (path / ITEMS_FILE).is_file():
        raise PrivrecError(f"{path / ITEMS_FILE}: missing")
    return {**meta, "items_path": path / ITEMS_FILE}
