"""A simulated node's ledger writes survive a crash: nothing a reply carried is missing afterwards.

A node writes its devices' ledgers inside `shared.atomic.one_sync` (renames without fsyncs, then one
barrier). The crash model here: a power cut leaves each ledger file as it was at its last durability
point (the barrier, or a lone write's own fsyncs), and nothing written since. Checked: a crash right
after a node's reply was made loses no released round, a crash during training or halfway through the
releases keeps every reservation, a second round never lowers the first; and the check itself fails on
a node whose writes are not made durable before the reply. A ledger cut short anywhere is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import client.node
import shared.atomic
import shared.privacy.ledger
from client.app import app as client_app
from shared import config
from shared.atomic import one_sync, write_bytes_atomic
from shared.device_nodes import NODE_DEVICES
from shared.errors import PrivrecError
from shared.model import model_for
from shared.privacy.ledger import PrivacyLedger, load_ledger, save_ledger
from simulations.inprocess import InProcessGrid, instruction, node_context
from tests.synthetic import walk_store

NUM_DEVICES = 6
NUM_ITEMS = 30
SMALL = {"max-len": 5, "window": 6, "hidden-size": 16, "num-heads": 2, "num-blocks": 1, "dropout": 0.0,
         "local-lr": 0.02, "batch-size": 3, "deterministic-devices": True, "dp": False, "user-dp": True}


class Crash(Exception):
    """The process dies here."""


class CrashableDisk:
    """The ledger files under `root` as a power cut would leave them: each as at its last durability point."""

    def __init__(self, root: Path, monkeypatch, *, barrier_works: bool = True):
        self.root = root
        self.durable: dict[Path, bytes] = {}
        real_sync, real_fsync_dir = shared.atomic.sync_filesystems, shared.atomic.fsync_dir

        def sync_filesystems(paths):  # `one_sync`'s barrier: every write so far on the file system
            real_sync(paths)
            if barrier_works:
                self._snapshot(self.root)

        def fsync_dir(path):  # a lone atomic write: its file was fsynced, the rename is made durable here
            real_fsync_dir(path)
            self._snapshot(Path(path))

        monkeypatch.setattr(shared.atomic, "sync_filesystems", sync_filesystems)
        monkeypatch.setattr(shared.atomic, "fsync_dir", fsync_dir)

    def _snapshot(self, under: Path) -> None:
        for path in Path(under).glob("**/privacy-ledger.json"):
            self.durable[path] = path.read_bytes()

    def crash(self) -> None:
        for path in self.root.glob("**/privacy-ledger.json"):
            if path in self.durable:
                path.write_bytes(self.durable[path])
            else:
                path.unlink()


def _setup(tmp_path):
    store = walk_store(tmp_path / "store", num_users=NUM_DEVICES, num_items=NUM_ITEMS)
    cfg = config.validate({**SMALL, "data-store": str(store)})
    return cfg, store, model_for(cfg, NUM_ITEMS).state_dict(), tmp_path / "population"


def _node_round(cfg, store, state, population, context, server_round: int):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    devices = list(range(NUM_DEVICES))
    content = RecordDict({"arrays": ArrayRecord(state),
                          "config": ConfigRecord({"data-store": str(store), "state-dir": str(population),
                                                  "run-id": "t", "server-round": server_round}),
                          NODE_DEVICES: ConfigRecord({"devices": devices, "ids": [d + 1 for d in devices]})})
    return InProcessGrid(client_app, 1, run_config=cfg)._run_client(
        instruction(content, 1, "train", round_=server_round), context)


def _context(cfg):
    return node_context(1, {"partition-id": 0, "num-partitions": 1}, cfg)


def _rounds_on_disk(population: Path) -> dict[str, list[tuple[int, str]]]:
    """device -> (round, status) of every round its ledger file records (a file that does not parse fails)."""
    return {str(d): [(int(r["round"]), r["status"]) for r in
                     load_ledger(population / f"device-{d}" / "privacy-ledger.json", str(d)).rounds]
            for d in range(NUM_DEVICES)}


def _released_in(reply) -> set[str]:
    """The devices whose update the node's reply carries (every listed device that did not decline)."""
    record = reply.content.config_records[NODE_DEVICES]
    metrics = json.loads(str(record["metrics"]))
    return {str(node_id - 1) for node_id, m in zip(record["ids"], metrics) if not m.get("declined")}


def _lost_after_crash(tmp_path, monkeypatch, *, barrier_works: bool) -> dict[str, list]:
    """Two node rounds, a crash right after the second reply was made: the released rounds the disk lost."""
    cfg, store, state, population = _setup(tmp_path)
    disk = CrashableDisk(tmp_path, monkeypatch, barrier_works=barrier_works)
    context = _context(cfg)
    released: dict[str, list[int]] = {}
    for server_round in (1, 2):
        reply = _node_round(cfg, store, state, population, context, server_round)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        for device in _released_in(reply):
            released.setdefault(device, []).append(server_round)
    disk.crash()
    lost = {}
    for device, rounds in released.items():
        path = population / f"device-{device}" / "privacy-ledger.json"
        on_disk = {r for r, status in _rounds_on_disk(population)[device] if status == "released"} \
            if path.exists() else set()
        if set(rounds) - on_disk:
            lost[device] = sorted(set(rounds) - on_disk)
    assert released, "no device trained: nothing was checked"
    return lost


def test_a_crash_right_after_the_reply_loses_no_released_round(tmp_path, monkeypatch):
    assert _lost_after_crash(tmp_path, monkeypatch, barrier_works=True) == {}


def test_the_crash_check_fails_a_node_whose_writes_are_not_made_durable_before_the_reply(tmp_path, monkeypatch):
    """The same check against a node that renames without a working barrier: it must see the loss."""
    lost = _lost_after_crash(tmp_path, monkeypatch, barrier_works=False)
    assert set(lost) == {str(d) for d in range(NUM_DEVICES)}


@pytest.mark.parametrize("where", ["training", "halfway-through-the-releases"])
def test_a_crash_before_the_reply_keeps_every_reservation(tmp_path, monkeypatch, where):
    cfg, store, state, population = _setup(tmp_path)
    disk = CrashableDisk(tmp_path, monkeypatch)
    context = _context(cfg)
    assert not _node_round(cfg, store, state, population, context, 1).has_error()
    if where == "training":
        def dies(*args, **kwargs):
            raise Crash

        monkeypatch.setattr(client.node, "train_one_epoch", dies)
    else:
        real_release, releases = shared.privacy.ledger.release, []

        def release(path, ledger, **updates):
            if len(releases) == NUM_DEVICES // 2:
                raise Crash
            releases.append(path)
            real_release(path, ledger, **updates)

        monkeypatch.setattr("client.device.release", release)
    reply = _node_round(cfg, store, state, population, context, 2)
    assert reply.has_error()  # no update left the node
    disk.crash()
    for device, rounds in _rounds_on_disk(population).items():
        assert rounds[0] == (1, "released")
        # round 2's spend counts (reserved: over-reported, never lost); its release may or may not have landed
        assert rounds[1][0] == 2 and rounds[1][1] in ("reserved", "released"), device
        assert len(rounds) == 2


def test_one_sync_makes_no_barrier_when_nothing_was_written(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(shared.atomic, "sync_filesystems", calls.append)
    with one_sync():
        pass
    assert calls == []
    with one_sync():
        write_bytes_atomic(tmp_path / "a" / "f", b"x")
        with one_sync():  # nested: the outer block's one barrier
            write_bytes_atomic(tmp_path / "b" / "f", b"y")
    assert [sorted(p.name for p in paths) for paths in calls] == [["a", "b"]]
    assert (tmp_path / "a" / "f").read_bytes() == b"x" and not list(tmp_path.glob("*/.f.*"))


def test_the_barrier_syncs_the_file_system(tmp_path):
    """`sync_filesystems` reaches the C library's syncfs and raises on its failure."""
    shared.atomic.sync_filesystems([tmp_path])
    with pytest.raises(OSError):
        shared.atomic.sync_filesystems([tmp_path / "missing"])


def test_a_ledger_cut_short_anywhere_is_refused(tmp_path):
    path = tmp_path / "device-0" / "privacy-ledger.json"
    ledger = PrivacyLedger(device="0", accountant_state={"history": [[1.0, 0.5, 2]], "mechanism": "rdp"},
                           rounds=[{"run": "t", "round": 1, "private": True, "epsilon": 1.5, "status": "released"}])
    save_ledger(path, ledger)
    whole = path.read_bytes()
    assert load_ledger(path, "0").rounds == ledger.rounds
    for cut in range(len(whole) - 1):  # all but the final newline
        path.write_bytes(whole[:cut])
        with pytest.raises(PrivrecError, match="unreadable"):
            load_ledger(path, "0")


def _through_the_engine(context):
    """What Flower's simulation engine does to a node's context around each message: pickled to a Ray
    worker and back (Ray pickles with its cloudpickle, protocol 5)."""
    import pickle

    import ray.cloudpickle

    return pickle.loads(ray.cloudpickle.dumps(context, protocol=5))


def test_a_node_keeps_its_ledger_copies_in_one_state_record(tmp_path):
    """The engine pickles a node's whole state with every message: one record for all of its devices' ledger
    copies, not one per device it ever trained (at 25,000 devices a node, up to 16,000 records by round 100)."""
    cfg, store, state, population = _setup(tmp_path)
    context = _context(cfg)
    assert not _node_round(cfg, store, state, population, context, 1).has_error()
    assert list(context.state.keys()) == [client.node.MIRRORS]
    copies = client.node._mirrors(context)
    assert set(copies) == {str(d) for d in range(NUM_DEVICES)}
    for device, text in copies.items():  # each copy is the ledger as released, to the byte
        path = population / f"device-{device}" / "privacy-ledger.json"
        assert (text + "\n").encode() == path.read_bytes()


def test_a_node_restores_its_devices_lost_or_stale_ledgers_from_its_state(tmp_path):
    """The in-memory copies still do what they are for after crossing the engine: a ledger file that went
    missing, or was put back from an older copy, is brought back up to the spend the node saw."""
    cfg, store, state, population = _setup(tmp_path)
    context = _context(cfg)
    ledger = {d: population / f"device-{d}" / "privacy-ledger.json" for d in range(NUM_DEVICES)}
    assert not _node_round(cfg, store, state, population, context, 1).has_error()
    after_round_1 = ledger[2].read_bytes()
    context = _through_the_engine(context)
    assert not _node_round(cfg, store, state, population, context, 2).has_error()
    context = _through_the_engine(context)
    ledger[1].unlink()  # lost
    ledger[2].write_bytes(after_round_1)  # restored from an older backup
    assert not _node_round(cfg, store, state, population, context, 3).has_error()
    rounds = _rounds_on_disk(population)
    for device in ("1", "2"):
        assert rounds[device] == [(1, "released"), (2, "released"), (3, "released")], device
