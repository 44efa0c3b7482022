"""One real Flower simulation: `flower-superlink --simulation` + `flwr run .` with Ray, end to end."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from shared import config
from shared.data.store import open_store
from tests.synthetic import walk_store
from tools.launch import run_simulation

pytestmark = pytest.mark.slow


def _processes_with(marker: str) -> list[str]:
    """Processes whose environment carries `marker`: everything this test started, and their children
    (other people's Flower runs on a shared machine do not count)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                found.append(f"{proc.name} {(proc / 'cmdline').read_bytes()[:120]!r}")
        except OSError:  # gone, or not ours to read
            continue
    return found


@pytest.fixture
def no_stray_processes(monkeypatch):
    marker = f"PRIVREC_TEST_RUN={uuid.uuid4().hex}"
    name, value = marker.split("=")
    monkeypatch.setenv(name, value)  # inherited by the SuperLink, flwr run, Ray and the apps
    yield
    me = str(os.getpid())
    left = [p for p in _processes_with(marker) if not p.startswith(me + " ")]
    if left:  # a process may be in the middle of exiting: give it a moment, then judge
        time.sleep(3)
        left = [p for p in _processes_with(marker) if not p.startswith(me + " ")]
    assert not left, f"Flower/Ray processes were left running: {left}"


def test_flwr_run_simulation_completes(tmp_path, no_stray_processes):
    store_dir = walk_store(tmp_path / "store", num_users=4, num_items=30)
    cfg = config.validate({
        "data-store": str(store_dir), "num-rounds": 2, "devices-per-round": 3, "eval-every": 1,
        "max-len": 16, "window": 12, "hidden-size": 16, "num-blocks": 1, "local-epochs": 2,
        "run-dir": str(tmp_path / "runs"), "run-name": "smoke"})
    run_path = tmp_path / "runs" / "smoke"
    result = run_simulation(cfg, open_store(store_dir).num_devices, run_path)

    # Flower's own verdict, not just an exit code (`flwr run --stream` exits 0 on failure too).
    assert result.flower_status == "finished:completed", (run_path / "flower.log").read_text()[-3000:]
    status = json.loads((run_path / "status.json").read_text())
    assert status["state"] == "completed"
    rows = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["devices-trained"] == 3 for r in rows[1:])
    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["federated-evaluation"]["users"] == 4
    assert summary["privacy"]["all-epsilon-max"] > 0
    # Each device that trained has a ledger; the server's max matches the ledgers.
    # Ledgers belong to the devices: in the population folder beside the store, not in the run.
    ledgers = [json.loads(p.read_text()) for p in (tmp_path / "store.population").glob("*/privacy-ledger.json")]
    assert max(led["rounds"][-1]["epsilon"] for led in ledgers) == pytest.approx(summary["privacy"]["all-epsilon-max"])


def test_failed_run_is_reported_as_failed(tmp_path, no_stray_processes):
    """A ServerApp that fails (its data store is missing) must not look like a success."""
    cfg = config.validate({"data-store": str(tmp_path / "no-such-store"), "num-rounds": 1,
                           "devices-per-round": 1, "run-dir": str(tmp_path / "runs"), "run-name": "broken"})
    run_path = tmp_path / "runs" / "broken"
    result = run_simulation(cfg, 2, run_path)
    assert result.flower_status != "finished:completed"
    assert not (run_path / "summary.json").exists()
    assert json.loads((run_path / "status.json").read_text())["state"] == "failed"

