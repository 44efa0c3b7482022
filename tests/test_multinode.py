"""`privrec simulate --ray-address`: one simulation over a two-node Ray cluster (both nodes on loopback).

The cluster is the user's, started with `ray start` as docs/multi-node.md says: a head and a worker that
joins it, each with one CPU (separate resource sets), so Flower's actor pool (one actor per CPU at
`client-resources-num-cpus=1`) must put one ClientApp actor on each node. The test checks from Ray's
own records (GCS actor table) that each node hosted ClientApp actors, and from each node's worker
logs that the actors there ran ClientApp work; that stopping the run left the cluster running (the
launcher stops only what it started); and, after the cluster is stopped, that nothing is left.

The cluster is stopped by killing the processes that carry this test's marker, not with `ray stop`,
which stops every Ray process of the user on the machine (other people's runs included).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from shared import config
from shared.data.store import open_store
from shared.errors import PrivrecError
from tests.synthetic import walk_store
from tools.cli import _ray_address
from tools.launch import free_port, processes_with_env, run_simulation, simulation_env, stop_processes_with_env

MARKER = "PRIVREC_TEST_CLUSTER"


def _ray_start(env: dict[str, str], *args: str) -> None:
    ray = Path(sys.executable).parent / "ray"
    out = subprocess.run([str(ray), "start", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                          "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
                          f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                          f"--runtime-env-agent-port={free_port()}", *args],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def _cluster_report(env: dict[str, str]) -> dict:
    """Nodes and ClientApp actors per node id, from the cluster's GCS (a driver of its own, then gone)."""
    script = (
        "import json, ray\n"
        "ray.init(logging_level='ERROR', include_dashboard=False)\n"
        "from ray._private import state\n"
        "nodes = {n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}\n"
        "actors = [{'node': a['Address']['NodeID'], 'pid': a.get('Pid'), 'class': a['ActorClassName']}\n"
        "          for a in state.actors().values()]\n"
        "tasks = {}  # worker id -> its profile events ('task::ClientAppActor.run' per ClientApp call)\n"
        "for worker, events in state.state.profile_events().items():\n"
        "    tasks[worker] = [e['event_type'] for e in events]\n"
        "print(json.dumps({'nodes': nodes, 'actors': actors, 'tasks': tasks}))\n"
        "ray.shutdown()\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cluster_daemons(marker: str) -> set[int]:
    """The cluster's GCS server and raylets (its workers come and go)."""
    daemons = set()
    for pid in processes_with_env(MARKER, marker):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name in ("raylet", "gcs_server"):
            daemons.add(pid)
    return daemons


@pytest.mark.slow
def test_simulation_runs_on_both_nodes_of_a_ray_cluster(tmp_path):
    marker = uuid.uuid4().hex
    env = dict(os.environ, **{MARKER: marker, "RAY_ADDRESS": ""})
    head_port = free_port()
    address = f"127.0.0.1:{head_port}"
    temp_dir = Path("/tmp") / f"ray-{marker[:8]}"  # Ray's socket paths must stay short: not pytest's tmp_path
    try:
        _ray_start(env, "--head", f"--port={head_port}", f"--ray-client-server-port={free_port()}",
                   "--include-dashboard=false", f"--temp-dir={temp_dir}", '--resources={"test-head": 1}')
        _ray_start(env, f"--address={address}", '--resources={"test-worker": 1}')
        cluster = {**env, "RAY_ADDRESS": address}
        nodes = _cluster_report(cluster)["nodes"]
        assert len(nodes) == 2 and all(r.get("CPU") == 1 for r in nodes.values()), nodes
        raylets = _cluster_daemons(marker)
        assert len(raylets) == 3, raylets  # one GCS, two raylets

        store_dir = walk_store(tmp_path / "store", num_users=6, num_items=30)
        cfg = config.validate({
            "data-store": str(store_dir), "num-rounds": 2, "devices-per-round": 6, "eval-every": 2,
            "max-len": 16, "window": 12, "hidden-size": 16, "num-blocks": 1, "local-epochs": 1,
            "run-dir": str(tmp_path / "runs"), "run-name": "cluster"})
        run_path = tmp_path / "runs" / "cluster"
        result = run_simulation(cfg, open_store(store_dir).num_devices, run_path, ray_address=address)
        assert result.flower_status == "finished:completed", (run_path / "flower.log").read_text()[-3000:]
        assert json.loads((run_path / "status.json").read_text())["state"] == "completed"

        # The launcher stopped what it started, not the user's cluster.
        report = _cluster_report(cluster)
        assert report["nodes"].keys() == nodes.keys(), "the run stopped a node of the user's cluster"
        assert _cluster_daemons(marker) == raylets, "the run stopped a process of the user's cluster"
        # Each node hosted ClientApp actors ...
        client_actors = [a for a in report["actors"] if a["class"] == "ClientAppActor"]
        assert {a["node"] for a in client_actors} == set(nodes), report
        # ... and each node's actors executed ClientApp work (`ClientAppActor.run`). Profile events name
        # the worker; the worker's log file names give its pid, which the actor table ties to a node.
        logs = temp_dir / "session_latest" / "logs"
        worker_pid = {p.stem.split("_")[0].removeprefix("python-core-worker-"): int(p.stem.rsplit("_", 1)[1])
                      for p in logs.glob("python-core-worker-*_*.log")}
        node_of_pid = {a["pid"]: a["node"] for a in client_actors}
        runs_per_node = {node: 0 for node in nodes}
        for worker, names in report["tasks"].items():
            node = node_of_pid.get(worker_pid.get(worker))
            if node is not None:
                runs_per_node[node] += names.count("task::ClientAppActor.run")
        assert all(runs_per_node.values()), (runs_per_node, report["tasks"], worker_pid, node_of_pid)
    finally:
        stop_processes_with_env(MARKER, marker)
        left = processes_with_env(MARKER, marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes were left running: {left}"


def test_local_runs_never_join_a_cluster_they_find(tmp_path, monkeypatch):
    """Without --ray-address, a RAY_ADDRESS in the shell (or the latest `ray start` on the machine,
    which ray.init() joins when RAY_ADDRESS is unset) must not take the run onto someone's cluster."""
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")
    local = simulation_env(tmp_path, None)
    assert local["RAY_ADDRESS"] == "local" and local["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    cluster = simulation_env(tmp_path, None, "10.0.0.5:6379")
    assert cluster["RAY_ADDRESS"] == "10.0.0.5:6379" and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in cluster


@pytest.mark.parametrize("bad", ["10.0.0.5", ":6379", "head:port", "head:0", "head:70000"])
def test_bad_ray_address_is_one_line(bad):
    with pytest.raises(PrivrecError, match="--ray-address"):
        _ray_address(bad)
    assert _ray_address("10.0.0.5:6379") == "10.0.0.5:6379"
