"""Spend belongs to the device (issue 9, finding 3) and the server's record of it (finding 8).

A device's ledger outlives runs (simulated ledgers live in a population folder beside the store);
a lost ledger is never a reset to zero: the population's list, the server's record of what it has
seen, and the reply check each stop it. The server counts devices by device id, writes its
checkpoint before model.pt, and refuses to resume with another deploy-devices.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

import server.app
from client.app import app as client_app
from server.app import main as server_main
from server.checkpoint import load_checkpoint, save_checkpoint
from server.strategy import build_strategy
from shared import config
from shared.data.devices import open_device, split_devices
from shared.data.store import open_store
from shared.errors import PrivrecError
from shared.privacy.device_journal import JOURNAL, privacy_record, read_journal
from shared.privacy.population import TRAINED_FILE, default_population_dir, keep_listed, trained_devices
from simulations.inprocess import InProcessGrid, serve
from tests.synthetic import walk_store

SMALL = {"max-len": 16, "window": 12, "hidden-size": 16, "num-blocks": 1, "local-epochs": 1, "eval-every": 0,
         "central-eval": False, "deterministic-devices": True}
NUM_DEVICES = 3


class DyingGrid(InProcessGrid):
    """The link drops at the third train round: the ServerApp stops after round 2's checkpoint."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trains = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.trains += 1
            if self.trains == 3:
                raise ConnectionError("SuperLink went away")
        return super().send_and_receive(messages, timeout=timeout)


def _context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _simulation(tmp_path: Path, **overrides) -> dict:
    store = walk_store(tmp_path / "store", num_users=NUM_DEVICES, num_items=30)
    return {**SMALL, "data-store": str(store), "num-rounds": 2, "devices-per-round": NUM_DEVICES,
            "run-dir": str(tmp_path / "runs"), **overrides}


def _ledger(population: Path, device: int) -> Path:
    return population / f"device-{device}" / "privacy-ledger.json"


def _epsilon(path: Path) -> float:
    return float(json.loads(path.read_text())["rounds"][-1]["epsilon"])


# ----------------------------------------------------------------------------- ledgers outlive runs


def test_a_device_in_two_runs_composes_both(tmp_path):
    """The measured defect: a device in two runs reported the same epsilon twice (each run started at 0)."""
    base = _simulation(tmp_path)
    serve(server_main, InProcessGrid(client_app, NUM_DEVICES), _context({**base, "run-name": "first"}))
    population = default_population_dir(base["data-store"])
    after_first = _epsilon(_ledger(population, 0))
    serve(server_main, InProcessGrid(client_app, NUM_DEVICES), _context({**base, "run-name": "second"}))
    ledger = json.loads(_ledger(population, 0).read_text())
    assert [(r["run"], r["round"]) for r in ledger["rounds"]] == [("first", 1), ("first", 2), ("second", 1),
                                                                  ("second", 2)]
    assert _epsilon(_ledger(population, 0)) > after_first * 1.2
    summary = json.loads((tmp_path / "runs" / "second" / "summary.json").read_text())
    assert summary["privacy"]["all-epsilon-max"] == pytest.approx(max(
        _epsilon(_ledger(population, d)) for d in range(NUM_DEVICES)))
    assert trained_devices(population) == {"0", "1", "2"}
    assert not (tmp_path / "runs" / "second" / "devices").exists()  # nothing per run


def test_a_fresh_population_folder_gives_fresh_devices(tmp_path):
    base = _simulation(tmp_path, **{"num-rounds": 1})
    for name in ("a", "b"):
        serve(server_main, InProcessGrid(client_app, NUM_DEVICES),
                    _context({**base, "run-name": name, "population-dir": str(tmp_path / f"people-{name}")}))
    assert _epsilon(_ledger(tmp_path / "people-a", 0)) == pytest.approx(_epsilon(_ledger(tmp_path / "people-b", 0)))
    config_b = json.loads((tmp_path / "runs" / "b" / "config.json").read_text())
    assert config_b["population-dir"] == str((tmp_path / "people-b").resolve())


def test_deleted_ledger_between_runs_is_refused_never_reset(tmp_path):
    base = _simulation(tmp_path, **{"num-rounds": 1})
    serve(server_main, InProcessGrid(client_app, NUM_DEVICES), _context({**base, "run-name": "first"}))
    population = default_population_dir(base["data-store"])
    _ledger(population, 0).unlink()
    grid = InProcessGrid(client_app, NUM_DEVICES, keep_messages=True)
    serve(server_main, grid, _context({**base, "run-name": "second"}))
    assert not _ledger(population, 0).exists()  # not recreated from zero
    failed = [r for r in grid.replies if r.has_error()]
    assert len(failed) == 1 and "has trained before" in failed[0].error.reason
    rows = _rows(tmp_path / "runs" / "second")
    assert rows[1]["failures"] == 1 and rows[1]["devices-trained"] == NUM_DEVICES - 1
    privacy = json.loads((tmp_path / "runs" / "second" / "privacy.json").read_text())
    assert "0" not in privacy["devices"]


def test_deleted_ledger_on_resume_is_refused_never_reset(tmp_path):
    """Measured: a device lost its ledger while the server was down and trained rounds 3-5 from zero."""
    run_config = _simulation(tmp_path, **{"num-rounds": 4, "run-name": "r"})
    with pytest.raises(ConnectionError):
        serve(server_main, DyingGrid(client_app, NUM_DEVICES), _context(run_config))
    population = default_population_dir(run_config["data-store"])
    _ledger(population, 1).unlink()
    grid = InProcessGrid(client_app, NUM_DEVICES, keep_messages=True)
    serve(server_main, grid, _context(run_config))
    assert not _ledger(population, 1).exists()
    assert [r["failures"] for r in _rows(tmp_path / "runs" / "r")[3:]] == [1, 1]


def test_population_list_refuses_a_listed_device_without_ledger(tmp_path):
    ledger = tmp_path / "device-4" / "privacy-ledger.json"
    keep_listed(tmp_path, "4", ledger)  # never trained: nothing to list, nothing to refuse
    assert trained_devices(tmp_path) == set()
    ledger.parent.mkdir()
    ledger.write_text("{}")
    keep_listed(tmp_path, "4", ledger)
    keep_listed(tmp_path, "4", ledger)
    assert (tmp_path / TRAINED_FILE).read_text() == "4\n"  # listed once
    ledger.unlink()
    with pytest.raises(PrivrecError, match="device 4 has trained before"):
        keep_listed(tmp_path, "4", ledger)


# ----------------------------------------------------------------------------- what the server has seen


def _deployment(tmp_path: Path, first_node_id: int = 1, **kwargs) -> tuple[InProcessGrid, Path]:
    out = tmp_path / "devices"
    if not out.exists():
        split_devices(open_store(walk_store(tmp_path / "store", num_users=NUM_DEVICES, num_items=30)), out)
    grid = InProcessGrid(client_app, NUM_DEVICES, first_node_id=first_node_id, **kwargs)
    for node_id, context in grid.contexts.items():
        folder = open_device(out / f"device-{node_id - first_node_id}")
        context.node_config = {"data-dir": str(folder.data_dir), "state-dir": str(folder.state_dir),
                               "device-id": folder.device_id}
    return grid, out


def _deployment_config(tmp_path: Path, out: Path) -> dict:
    return {**SMALL, "catalogue": str(out / "catalogue"), "num-rounds": 4, "devices-per-round": NUM_DEVICES,
            "run-dir": str(tmp_path / "runs"), "run-name": "dep", "deterministic-devices": False}


def _lose_everything(out: Path, device: int) -> None:
    """The device's whole state folder is gone (ledger and its population list): only the server remembers."""
    state = out / f"device-{device}" / "state"
    shutil.rmtree(state)
    state.mkdir()


def test_device_refuses_to_train_below_the_spend_the_server_has_seen(tmp_path):
    grid, out = _deployment(tmp_path)
    run_config = _deployment_config(tmp_path, out)
    dying = DyingGrid(client_app, NUM_DEVICES)
    dying.contexts = grid.contexts
    with pytest.raises(ConnectionError):
        serve(server_main, dying, _context(run_config))
    _lose_everything(out, 2)
    grid, _ = _deployment(tmp_path, keep_messages=True)  # same node ids: known devices
    serve(server_main, grid, _context(run_config))
    sent = [m.content.config_records.get("privacy-seen") for m in grid.delivered
            if m.metadata.message_type == "train"]
    assert all(s is not None and s["steps"] > 0 for s in sent)
    failed = [r for r in grid.replies if r.has_error()]
    assert failed and all("fewer than the" in r.error.reason and "device 2" in r.error.reason for r in failed)
    assert not (out / "device-2" / "state" / "device-2" / "privacy-ledger.json").exists()


def test_reply_below_the_seen_spend_is_refused_and_devices_count_once(tmp_path):
    """After a restart Flower gives every device a new node id: the server cannot tell it what it saw, so
    it refuses the reply of a device whose spend went down; and a device in two launches counts once."""
    grid, out = _deployment(tmp_path)
    run_config = _deployment_config(tmp_path, out)
    dying = DyingGrid(client_app, NUM_DEVICES)
    dying.contexts = grid.contexts
    with pytest.raises(ConnectionError):
        serve(server_main, dying, _context(run_config))
    run = tmp_path / "runs" / "dep"
    before = privacy_record(run)["devices"]["2"]  # the crashed run's records are in its journal
    _lose_everything(out, 2)
    grid, _ = _deployment(tmp_path, first_node_id=101, keep_messages=True)  # new node ids
    serve(server_main, grid, _context(run_config))
    assert not any(m.content.config_records.get("privacy-seen") for m in grid.delivered[:NUM_DEVICES])
    rows = _rows(run)
    assert rows[3]["refused"] == 1 and rows[3]["devices-trained"] == NUM_DEVICES - 1
    # Round 4: the refused reply told the server which node is device 2; now the device itself refuses.
    assert rows[4]["failures"] == 1 and rows[4]["refused"] == 0
    record = json.loads((run / "privacy.json").read_text())["devices"]["2"]  # completed: every record inline
    assert record["epsilon"] == before["epsilon"] and record["history"] == before["history"]
    assert [r["round"] for r in record["refused"]][0] == 3 and "fewer than the" in record["refused"][0]["reason"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy"]["devices-with-spend"] == NUM_DEVICES  # not 2 x NUM_DEVICES over node ids
    assert rows[-1]["devices-with-spend"] == NUM_DEVICES


# ----------------------------------------------------------------------------- the server's records


def test_model_pt_is_never_ahead_of_the_checkpoint(tmp_path, monkeypatch):
    """A crash between the two files must not leave a released model that the checkpoint does not count."""
    real = server.app.save_checkpoint

    def crash_in_round_two(run_path, server_round, *args, **kwargs):
        if server_round == 2:
            raise OSError("disk full")
        real(run_path, server_round, *args, **kwargs)

    monkeypatch.setattr(server.app, "save_checkpoint", crash_in_round_two)
    run_config = _simulation(tmp_path, **{"num-rounds": 3, "run-name": "r"})
    with pytest.raises(OSError, match="disk full"):
        serve(server_main, InProcessGrid(client_app, NUM_DEVICES), _context(run_config))
    run = tmp_path / "runs" / "r"
    released = torch.load(run / "model.pt", weights_only=True)
    counted = torch.load(run / "checkpoint" / "model.pt", weights_only=True)
    assert json.loads((run / "checkpoint" / "state.json").read_text())["round"] == 1
    assert all(torch.equal(released[k], counted[k]) for k in counted)


@pytest.mark.parametrize("key, other", [("deploy-devices", 4), ("population-dir", "/elsewhere")])
def test_resume_must_match_deploy_devices_and_population(tmp_path, key, other):
    cfg = config.validate({**SMALL, "deploy-devices": 3, "population-dir": "/people"})
    strategy = build_strategy(cfg, num_devices=3, on_train=lambda *a: None, on_evaluate=lambda *a: None)
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, strategy, cfg, journal_bytes=0)
    assert load_checkpoint(tmp_path, cfg).round == 1
    with pytest.raises(PrivrecError, match=key):
        load_checkpoint(tmp_path, {**cfg, key: other})


def test_server_records_do_not_reveal_a_devices_window_count(tmp_path):
    """privacy.json and the checkpoint hold, per device, only what follows from the config and the rounds it
    joined: devices with different history lengths have identical records (finding 8: no window counts)."""
    run_config = _simulation(tmp_path, **{"window": 4, "batch-size": 2, "sample-rate": 0.5, "run-name": "r"})
    store = open_store(run_config["data-store"])
    windows = {len(store.device(d).train[0]) // 4 for d in range(NUM_DEVICES)}
    assert len(windows) > 1, "the devices must differ in window count for this test to mean anything"
    serve(server_main, InProcessGrid(client_app, NUM_DEVICES), _context(run_config))
    run = tmp_path / "runs" / "r"
    for records in (json.loads((run / "privacy.json").read_text())["devices"],
                    read_journal(run / JOURNAL).records):
        assert set(records) == {"0", "1", "2"}
        first = records["0"]
        assert set(first) == {"accountant", "history", "rounds", "epsilon", "declined-round", "update-rounds"}
        assert all(record == first for record in records.values())


def test_a_node_keyed_checkpoint_resumes_keyed_by_device(tmp_path):
    """Checkpoints written before this change (format 1) keyed epsilon and caps by node id: the device-keyed
    tally is rebuilt from their per-device records, so an old run resumes without counting anyone twice."""
    cfg = config.validate({**SMALL, "max-epsilon": 5.0})
    strategy = build_strategy(cfg, num_devices=3, on_train=lambda *a: None, on_evaluate=lambda *a: None)
    save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, strategy, cfg, journal_bytes=0)
    path = tmp_path / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    state.update({"format": 1, "epsilon-by-device": {"9001": 4.9, "9002": 1.5}, "capped": {"9001": 2},
                  "records": {"0": {"node-id": 9001, "accountant": "rdp", "history": [[1.0, 1.0, 4]],
                                    "rounds": [[1, 4.9]], "epsilon": 4.9, "declined-round": 2},
                              "1": {"node-id": 9002, "accountant": "rdp", "history": [[1.0, 1.0, 1]],
                                    "rounds": [[1, 1.5]], "epsilon": 1.5, "declined-round": None}}})
    for key in ("population-dir", "device-journal"):  # what a format-1 checkpoint did not have
        state.pop(key)
    path.write_text(json.dumps(state))
    checkpoint = load_checkpoint(tmp_path, cfg)
    assert checkpoint.epsilon_by_device == {"0": 4.9, "1": 1.5} and checkpoint.capped == {"0": 2}
