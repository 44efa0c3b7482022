"""One real Flower simulation: `flower-superlink --simulation` + `flwr run .` with Ray, end to end."""

from __future__ import annotations

import json
import subprocess

import pytest

from shared import config
from shared.data.store import open_store
from shared.launch import run_simulation
from tests.synthetic import walk_store

pytestmark = pytest.mark.slow


def _flower_pids() -> set[str]:
    out = subprocess.run(["pgrep", "-f", "flower-superlink|flower-superexec|flwr-serverapp|raylet"],
                         capture_output=True, text=True)
    return set(out.stdout.split())


@pytest.fixture
def no_stray_processes():
    before = _flower_pids()
    yield
    assert _flower_pids() <= before, "Flower/Ray processes were left running"


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
    ledgers = [json.loads(p.read_text()) for p in (run_path / "devices").glob("*/privacy-ledger.json")]
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

