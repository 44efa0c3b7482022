"""The server's per-device privacy records cost a round its cohort, not the population (issue 15).

privacy.json and checkpoint/state.json used to hold every device's record and were rewritten whole after
every round: at 100,000 devices the bytes written per round grew with every device ever seen. Now each
round appends the records it changed to `privacy-devices.jsonl` (shared/privacy/device_journal.py);
privacy.json holds every record once, when the run ends. Checked here: the bytes a round writes do not
grow with the devices seen, a crash loses no device record (nor one of a round that crashed before its
checkpoint), resume restores them all, a torn last line is cut off and a damaged or short journal refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

import server.app
import server.checkpoint
import server.run_dir
from client.app import app as client_app
from server.app import main as server_main
from shared.errors import PrivrecError
from shared.privacy.device_journal import JOURNAL, JOURNAL_KEY, DeviceJournal, privacy_record, read_journal
from shared.privacy.population import default_population_dir
from simulations.inprocess import InProcessGrid, serve
from tests.synthetic import walk_store
from tools.report.load import load_run

SMALL = {"max-len": 16, "window": 12, "hidden-size": 16, "num-blocks": 1, "local-epochs": 1, "eval-every": 0,
         "central-eval": False, "deterministic-devices": True}


def _config(tmp_path: Path, num_devices: int, **overrides) -> dict:
    store = walk_store(tmp_path / f"store-{num_devices}", num_users=num_devices, num_items=30)
    return {**SMALL, "data-store": str(store), "run-dir": str(tmp_path / "runs"), "run-name": "r", **overrides}


def _context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def _ledger_epsilons(run_config: dict) -> dict[str, float]:
    """device id -> the epsilon of its ledger's latest round (every device that ever spent)."""
    population = default_population_dir(run_config["data-store"])
    return {p.parent.name.removeprefix("device-"): float(json.loads(p.read_text())["rounds"][-1]["epsilon"])
            for p in population.glob("device-*/privacy-ledger.json")}


# ------------------------------------------------------------------------------ the cost of a round


def test_the_bytes_a_round_writes_to_its_records_do_not_grow_with_the_devices_seen(tmp_path, monkeypatch):
    """40 devices, 4 a round, 8 rounds: the devices seen grow from 4 to about 30, the records a round writes
    (privacy.json, checkpoint/state.json, the journal) must not. Before: every record, every round."""
    per_round: list[int] = []
    real_json, real_synced, real_append = (server.run_dir.write_json_atomic, server.checkpoint.write_synced,
                                           DeviceJournal.append)

    def count(data: bytes) -> None:
        per_round[-1] += len(data)

    def write_json(path: Path, payload) -> None:
        if path.name == "privacy.json":
            count((json.dumps(payload, indent=1) + "\n").encode())
        real_json(path, payload)

    def write_synced(path: Path, data: bytes) -> None:
        if path.name == "state.json":
            count(data)
        real_synced(path, data)

    def append(self, *args, **kwargs) -> int:
        written = real_append(self, *args, **kwargs)
        per_round[-1] += written
        return written

    real_end = server.app.FederatedRun._end_of_round

    def end_of_round(self, server_round, arrays):
        per_round.append(0)
        return real_end(self, server_round, arrays)

    monkeypatch.setattr(server.run_dir, "write_json_atomic", write_json)
    monkeypatch.setattr(server.checkpoint, "write_synced", write_synced)
    monkeypatch.setattr(DeviceJournal, "append", append)
    monkeypatch.setattr(server.app.FederatedRun, "_end_of_round", end_of_round)
    run_config = _config(tmp_path, 40, **{"num-rounds": 8, "devices-per-round": 4})
    serve(server_main, InProcessGrid(client_app, 40), _context(run_config))

    seen = len(privacy_record(tmp_path / "runs" / "r")["devices"])
    assert seen >= 20, "the test means something only if the devices seen grow well past one cohort"
    rounds = per_round[1:8]  # rounds 1..7 (round 8 also writes every record once, into the final privacy.json)
    assert max(rounds) < 1.3 * min(rounds), rounds


def test_privacy_json_holds_every_record_when_the_run_ends_and_names_the_journal_before(tmp_path, monkeypatch):
    snapshots = []
    real_json = server.run_dir.write_json_atomic

    def write_json(path: Path, payload) -> None:
        if path.name == "privacy.json":
            snapshots.append(payload)
        real_json(path, payload)

    monkeypatch.setattr(server.run_dir, "write_json_atomic", write_json)
    run_config = _config(tmp_path, 6, **{"num-rounds": 3, "devices-per-round": 3})
    serve(server_main, InProcessGrid(client_app, 6), _context(run_config))
    during, final = snapshots[:-1], snapshots[-1]
    assert all(JOURNAL_KEY in p and "devices" not in p for p in during)
    assert JOURNAL_KEY not in final
    run = tmp_path / "runs" / "r"
    assert final["devices"] == read_journal(run / JOURNAL).records
    assert set(final["devices"]) == set(_ledger_epsilons(run_config))


# ------------------------------------------------------------------------------ crashes and resume


def test_a_crash_before_a_checkpoint_loses_no_device_record_and_resume_restores_them_all(tmp_path, monkeypatch):
    """Round 3 is booked (its records appended) and then the checkpoint write fails: the resumed run keeps
    round 3's records as well as those the checkpoint covers. Every device whose ledger shows spend ends
    with a record of that very spend, also one that trained only in the crashed round."""
    real = server.app.save_checkpoint

    def crash_in_round_three(run_path, server_round, *args, **kwargs):
        if server_round == 3:
            raise OSError("disk full")
        real(run_path, server_round, *args, **kwargs)

    run_config = _config(tmp_path, 12, **{"num-rounds": 5, "devices-per-round": 3})
    monkeypatch.setattr(server.app, "save_checkpoint", crash_in_round_three)
    with pytest.raises(OSError, match="disk full"):
        serve(server_main, InProcessGrid(client_app, 12), _context(run_config))
    run = tmp_path / "runs" / "r"
    crashed = privacy_record(run)["devices"]  # a crashed run: its records are read from the journal
    spent = _ledger_epsilons(run_config)
    assert set(crashed) == set(spent) and len(spent) > 3
    in_round_three = {d for d, r in crashed.items() if any(rnd == 3 for rnd, _ in r["rounds"])}
    assert len(in_round_three) == 3
    assert load_run(run).privacy.devices.keys() == crashed.keys()  # `privrec report` reads the journal too

    monkeypatch.setattr(server.app, "save_checkpoint", real)
    serve(server_main, InProcessGrid(client_app, 12), _context(run_config))  # resumes after round 2
    final = json.loads((run / "privacy.json").read_text())["devices"]
    spent = _ledger_epsilons(run_config)
    assert set(final) == set(spent)
    for device, epsilon in spent.items():
        assert final[device]["epsilon"] == pytest.approx(epsilon, rel=1e-9), device
    assert all(any(rnd == 3 for rnd, _ in final[d]["rounds"]) for d in in_round_three)
    assert load_run(run).privacy.devices.keys() == final.keys()


def test_a_torn_last_line_is_cut_off_on_resume(tmp_path, monkeypatch):
    """A crash while appending leaves a partial last line: it is not a record, and the resumed run appends
    after the last complete one (the file stays readable line by line)."""
    class Dying(InProcessGrid):
        trains = 0

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == "train":
                Dying.trains += 1
                if Dying.trains == 3:
                    raise ConnectionError("SuperLink went away")
            return super().send_and_receive(messages, timeout=timeout)

    run_config = _config(tmp_path, 6, **{"num-rounds": 3, "devices-per-round": 3})
    with pytest.raises(ConnectionError):
        serve(server_main, Dying(client_app, 6), _context(run_config))
    journal = tmp_path / "runs" / "r" / JOURNAL
    before = read_journal(journal)
    with open(journal, "ab") as handle:
        handle.write(b'{"round": 3, "node": 1, "device": "0", "rec')
    assert read_journal(journal).records == before.records
    serve(server_main, InProcessGrid(client_app, 6), _context(run_config))
    lines = journal.read_bytes().splitlines(keepends=True)
    assert all(line.endswith(b"\n") and json.loads(line) for line in lines)
    final = json.loads((tmp_path / "runs" / "r" / "privacy.json").read_text())["devices"]
    assert set(final) == set(_ledger_epsilons(run_config))


def test_a_journal_shorter_than_its_checkpoint_or_damaged_is_refused(tmp_path):
    journal = DeviceJournal(tmp_path / JOURNAL)
    journal.start()
    record = {"accountant": "rdp", "history": [[1.0, 0.5, 2]], "rounds": [[1, 0.7]], "epsilon": 0.7,
              "declined-round": None}
    journal.append(1, {"a": 5, "b": None}, {"a": record, "b": record}, {"a": 0.7})
    state = read_journal(tmp_path / JOURNAL, min_bytes=journal.size)
    assert set(state.records) == {"a", "b"} and state.epsilons == {"a": 0.7} and state.node_devices == {5: "a"}
    with pytest.raises(PrivrecError, match="fewer than the .* its checkpoint covered"):
        read_journal(tmp_path / JOURNAL, min_bytes=journal.size + 1)
    lines = (tmp_path / JOURNAL).read_bytes().splitlines(keepends=True)
    (tmp_path / JOURNAL).write_bytes(b"garbage\n" + lines[1])
    with pytest.raises(PrivrecError, match=rf"{JOURNAL} line 1: not a device record"):
        read_journal(tmp_path / JOURNAL)


def test_a_later_line_of_a_device_replaces_its_record_and_epsilon_never_goes_down(tmp_path):
    journal = DeviceJournal(tmp_path / JOURNAL)
    journal.start()
    first = {"accountant": "rdp", "history": [[1.0, 0.5, 2]], "rounds": [[1, 0.7]], "epsilon": 0.7,
             "declined-round": None}
    second = {**first, "history": [[1.0, 0.5, 4]], "rounds": [[1, 0.7], [2, 1.1]], "epsilon": 1.1}
    journal.append(1, {"a": 5}, {"a": first}, {"a": 0.7})
    journal.append(2, {"a": 9}, {"a": second}, {"a": 1.1})
    state = read_journal(tmp_path / JOURNAL)
    assert state.records == {"a": second} and state.epsilons == {"a": 1.1}
    assert state.node_devices == {5: "a", 9: "a"}


# ------------------------------------------------------------------------------ the population's list


def test_the_population_list_is_read_incrementally_and_again_when_replaced(tmp_path):
    """A node reads the list every message: only what was appended since is read, and a list replaced or
    cut short is read from the start (so a lost list is never remembered as longer than it is)."""
    from shared.privacy.population import TRAINED_FILE, trained_devices

    path = tmp_path / TRAINED_FILE
    path.write_text("".join(f"{d}\n" for d in range(1000)))
    assert trained_devices(tmp_path) == {str(d) for d in range(1000)}
    with open(path, "a") as handle:  # another node appends
        handle.write("1000\n10")
    assert trained_devices(tmp_path) == {str(d) for d in range(1001)} | {"10"}
    with open(path, "a") as handle:  # the append in progress completes
        handle.write("01\n")
    assert trained_devices(tmp_path) == {str(d) for d in range(1002)}
    replaced = tmp_path / "new"
    replaced.write_text("5\n")
    replaced.replace(path)
    assert trained_devices(tmp_path) == {"5"}
    path.unlink()
    assert trained_devices(tmp_path) == set()


def test_a_failed_append_leaves_the_journal_as_it_was_and_the_records_still_to_write(tmp_path, monkeypatch):
    """A full disk halfway through a round's append: no torn line stays behind, and the tally still holds the
    round's records as changed (a later append would write them)."""
    import os

    from server.tally import PrivacyTally

    journal = DeviceJournal(tmp_path / JOURNAL)
    journal.start()
    record = {"accountant": "rdp", "history": [], "rounds": [], "epsilon": 0.0, "declined-round": None}
    journal.append(1, {"a": 1}, {"a": record}, {})
    before = (tmp_path / JOURNAL).read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 40:
            return real_write(fd, data[:40])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space"):
        journal.append(2, {"b": 2, "c": 3}, {"b": record, "c": record}, {})
    monkeypatch.setattr(os, "write", real_write)
    assert (tmp_path / JOURNAL).read_bytes() == before and journal.size == len(before)

    tally = PrivacyTally(records={"b": record}, changed={"b": 2})
    run = server.app.FederatedRun.__new__(server.app.FederatedRun)
    run.strategy, run.journal = type("S", (), {"privacy": tally})(), journal
    monkeypatch.setattr(DeviceJournal, "append", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        run._journal_changed(2)
    assert tally.changed == {"b": 2}
