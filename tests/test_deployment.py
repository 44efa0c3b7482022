"""Real deployment on loopback: a TLS SuperLink with node authentication, real SuperNodes, real runs.

One SuperLink and three registered SuperNodes serve every test in this module (starting them costs
more than a round). Each test submits its own run. Every process is started with a known PID in its
own session and stopped at the end, even when a test fails; ports are free ones, never fixed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from client.audit import read_audit
from shared import config
from shared.data.devices import split_devices
from shared.data.store import open_store
from shared.run_owner import lock_is_held
from tests.synthetic import walk_store
from tests.test_deploy_units import assert_only_weights_and_scalars, expected_shapes
from tools.deploy.local import LocalDeployment, deployment_config, prepare_security
from tools.deploy.processes import flower_descendants, session_pids

pytestmark = pytest.mark.slow

NUM_ITEMS = 30
REGISTERED = 3  # devices 0..2 are registered; device 3 has a key nobody registered
MODEL = {"max-len": 16, "window": 12, "hidden-size": 16, "num-blocks": 1, "local-epochs": 1}


def _flower_pids(flwr_home: Path) -> set[str]:
    """Flower processes started for this deployment: they all inherit its private FLWR_HOME.

    (Matching on the environment, not on names alone: other people's tests may run Flower in parallel.)
    """
    out = subprocess.run(["pgrep", "-f", "flower-superlink|flower-supernode|flower-superexec|flwr-serverapp|"
                                        "flwr-clientapp"], capture_output=True, text=True)
    ours = set()
    for pid in out.stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"FLWR_HOME={flwr_home}".encode() in environ:
            ours.add(pid)
    return ours




def _leads_a_session(pid: int) -> bool:
    try:
        return os.getsid(pid) == pid
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    store = open_store(walk_store(root / "store", num_users=REGISTERED + 1, num_items=NUM_ITEMS))
    devices = split_devices(store, root / "devices")
    workdir = root / "deploy"
    workdir.mkdir()
    deployment = LocalDeployment(workdir, devices, prepare_security(workdir, None, insecure=False, auth=True))
    try:
        deployment.start_superlink()
        for index in range(REGISTERED):
            deployment.register(deployment.device(index))
            deployment.start_node(index)
        yield deployment
    finally:
        deployment.close()
        # Every session we started is gone (SuperExec, ServerApp and ClientApp children included) ...
        # (A session whose number leads a live session again is a stranger's: our leaders are all reaped now,
        # and pid numbers wrap within minutes when processes start by the thousand.)
        left = [pid for session in deployment.processes.sessions if not _leads_a_session(session)
                for pid in session_pids(session)]
        assert not left, subprocess.run(["ps", "-o", "pid,stat,args", "-p", ",".join(map(str, left))],
                                        capture_output=True, text=True).stdout
        # ... and no Flower process started for this deployment survives.
        assert not _flower_pids(deployment.flwr_home)


def _run_config(cluster: LocalDeployment, tmp_path: Path, name: str, **overrides) -> dict:
    cfg = config.validate({**MODEL, "num-rounds": 2, "devices-per-round": REGISTERED, "eval-every": 0,
                           "run-dir": str(tmp_path / "runs"), "run-name": name, **overrides})
    return deployment_config(cfg, cluster.devices_dir, REGISTERED)


def _rows(run_path: Path) -> list[dict]:
    path = run_path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _ledger(cluster: LocalDeployment, index: int) -> dict | None:
    path = cluster.devices_dir / f"device-{index}" / "state" / f"device-{index}" / "privacy-ledger.json"
    return json.loads(path.read_text()) if path.exists() else None


def _logs(cluster: LocalDeployment) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                     for p in sorted(cluster.processes.log_dir.glob("*.log")))


def _wait_for(predicate, timeout: float, what: str, cluster: LocalDeployment) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{_logs(cluster)}")
        time.sleep(0.5)


def _reconnected(node_log: Path, since: int) -> bool:
    """After `since` (a log offset), the node either never lost the SuperLink or has got it back."""
    text = node_log.read_text(errors="replace")[since:]
    failed, back = text.rfind("Connection attempt failed"), text.rfind("Connection successful")
    return failed == -1 or back > failed


def _finish(cluster: LocalDeployment, name: str, run_path: Path) -> None:
    code = cluster.wait(name, timeout=600)  # a limit for a hung run only: 340 s seen on a heavily loaded machine
    log = (cluster.processes.log_dir / f"{name}.log").read_text(errors="replace")
    assert cluster.flower_status(name) == "finished:completed", log[-3000:]
    assert code == 0
    assert json.loads((run_path / "status.json").read_text())["state"] == "completed"


def test_tls_and_node_auth_two_dp_rounds_end_to_end(cluster, tmp_path):
    # An intruder with a key of its own that nobody registered tries to join as well.
    intruder = cluster.start_node(REGISTERED, key=cluster.node_key(cluster.device(REGISTERED)), name="intruder")
    cfg = _run_config(cluster, tmp_path, "e2e")
    cluster.submit(cfg, name="e2e")
    run_path = tmp_path / "runs" / "e2e"
    _finish(cluster, "e2e", run_path)

    rows = _rows(run_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["devices-trained"] for r in rows[1:]] == [REGISTERED, REGISTERED]
    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["federated-evaluation"]["users"] == REGISTERED  # one user per registered device
    assert 0 <= summary["federated-evaluation"]["test-ndcg@10"] <= 1
    assert summary["central-evaluation"] is None  # a deployment never reads users' data on the server
    epsilons = []
    for index in range(REGISTERED):
        ledger = _ledger(cluster, index)
        eps = [r["epsilon"] for r in ledger["rounds"] if r["run"] == "e2e"]
        assert [r["round"] for r in ledger["rounds"] if r["run"] == "e2e"] == [1, 2]
        assert 0 < eps[0] < eps[1]  # on-device DP, cumulative
        epsilons.append(eps[-1])
        audit = [e for e in read_audit(cluster.device(index).audit_log) if e["round"] in (1, 2)]
        assert [e["type"] for e in audit][-3:] == ["train", "train", "evaluate"]
        assert_only_weights_and_scalars(audit, expected_shapes(cfg, NUM_ITEMS))
    assert summary["privacy"]["all-epsilon-max"] == pytest.approx(max(epsilons))

    # The unregistered node was refused and never trained.
    started = cluster.processes.started[intruder]
    _wait_for(lambda: started.process.poll() is not None, 60, "the intruder to be refused", cluster)
    assert started.process.returncode != 0
    assert "Failed to activate SuperNode" in started.log_path.read_text(errors="replace")
    assert _ledger(cluster, REGISTERED) is None and not cluster.device(REGISTERED).audit_log.exists()
    cluster.processes.stop(intruder)


def test_a_device_frozen_through_a_round_never_trains_for_it_when_it_comes_back(cluster, tmp_path):
    """A round's messages expire when the server stops waiting (`round-timeout`, server/expiring_grid.py).

    Device 0's SuperNode is frozen (SIGSTOP) before the run: the SuperLink still lists it online (it misses
    heartbeats for 36 s or more before it is marked offline), so round 1 sends it a message it cannot pull,
    and ends without it after 15 s. Thawed then, the node must not get that message: under Flower's default
    time-to-live (12 h) it trained for round 1 and spent budget on a reply nobody reads."""
    node = cluster.processes.started["node-0"].process
    frozen = [*session_pids(node.pid), *(pid for pid in flower_descendants(node.pid))]
    cfg = _run_config(cluster, tmp_path, "frozen", **{"round-timeout": 15.0})
    run_path = tmp_path / "runs" / "frozen"
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        cluster.submit(cfg, name="frozen")
        _wait_for(lambda: len(_rows(run_path)) >= 2, 180, "round 1 to end without the frozen node", cluster)
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    _finish(cluster, "frozen", run_path)

    rows = _rows(run_path)
    # The scenario happened: the frozen node was asked in round 1 (its message waited at the SuperLink) and
    # did not reply. (On a loaded machine the others' first replies can miss the 15 s as well.)
    assert rows[1]["devices-asked"] == REGISTERED and rows[1]["no-reply"] + rows[1]["failures"] >= 1, rows[1]
    rounds = [r["round"] for r in _ledger(cluster, 0)["rounds"] if r["run"] == "frozen"]
    assert 1 not in rounds, "the thawed device trained for a round the server had given up on"
    assert set(rounds) <= {2}, rounds  # round 2 if it was asked again (its heartbeats lapsed while frozen)


def test_faults_a_node_dies_mid_round_then_the_superlink_restarts_and_the_run_resumes(cluster, tmp_path):
    """Both faults in one run (each round of a real deployment costs tens of seconds here).

    Round 1: one SuperNode is SIGKILLed after receiving its model; the round completes with the
    others once `round-timeout` expires. Then the SuperLink goes down (taking the ServerApp with it)
    and comes back; the killed node is restarted; the run is submitted again with the same
    run-name and continues with round 2, with the node back in, instead of starting over.
    """
    victim = REGISTERED - 1
    node_log = cluster.processes.started[f"node-{victim}"].log_path
    received_before = node_log.read_text(errors="replace").count("Receiving: train message")
    before = (_ledger(cluster, victim) or {"rounds": []})["rounds"]  # earlier runs' spend, if any
    cfg = _run_config(cluster, tmp_path, "faults", **{"round-timeout": 60.0})
    run_path = tmp_path / "runs" / "faults"
    cluster.submit(cfg, name="faults-1")

    # -- a SuperNode killed mid-round
    _wait_for(lambda: node_log.read_text(errors="replace").count("Receiving: train message") > received_before,
              180, "the victim to receive its round-1 model", cluster)
    cluster.processes.kill(f"node-{victim}")  # SIGKILL to its whole session, ClientApp included
    checkpoint = run_path / "checkpoint" / "state.json"
    _wait_for(checkpoint.exists, 240, "round 1 to complete without the victim", cluster)
    rows = _rows(run_path)
    assert rows[1]["round"] == 1 and rows[1]["devices-trained"] == REGISTERED - 1
    # Written before the update would have been sent, or not at all; never half-written.
    interrupted = (_ledger(cluster, victim) or {"rounds": []})["rounds"]

    # -- the SuperLink (and with it the ServerApp) goes down after round 1
    cluster.kill_superlink()  # SIGKILL to the SuperLink and to the ServerApp, which Flower detaches from it
    cluster.processes.stop("faults-1")
    assert not lock_is_held(run_path)  # the old ServerApp is gone: it cannot send round 2 to the new SuperLink
    assert not (run_path / "summary.json").exists()
    done = json.loads(checkpoint.read_text())["round"]
    assert done == 1

    survivors = {i: cluster.processes.started[f"node-{i}"].log_path for i in range(REGISTERED) if i != victim}
    since = {i: len(path.read_text(errors="replace")) for i, path in survivors.items()}
    cluster.start_superlink()  # same port and database: registrations survive, live nodes reconnect
    cluster.start_node(victim)  # same folder and key: the device rejoins as the same node
    # The restarted SuperLink lists the survivors as online at once (its database says so) even while
    # they are still backing off (Flower retries every <= 20 s). A round sent before they are back may
    # time out on them: wait for them as an operator would, then resubmit with a patient round timeout.
    _wait_for(lambda: all(_reconnected(path, since[i]) for i, path in survivors.items()), 120,
              "the surviving nodes to reconnect", cluster)
    cluster.submit({**cfg, "round-timeout": 300.0}, name="faults-2")  # the same run (same run-name) again
    _finish(cluster, "faults-2", run_path)

    log = (cluster.processes.log_dir / "faults-2.log").read_text(errors="replace")
    assert "resuming run faults after round 1 of 2" in log
    rows = _rows(run_path)
    assert [r["round"] for r in rows] == [0, 1, 2]  # continued, not started over
    assert rows[2]["devices-trained"] == REGISTERED, _logs(cluster)  # the killed node is back
    for index in range(REGISTERED):
        rounds = [r["round"] for r in _ledger(cluster, index)["rounds"] if r["run"] == "faults"]
        assert rounds[-1] == 2 and rounds == sorted(rounds)
    after = _ledger(cluster, victim)
    # The ledger survived the kill: earlier entries are all still there, and epsilon never went down.
    assert after["rounds"][:len(interrupted)] == interrupted
    assert after["rounds"][:len(before)] == before
    eps = [r["epsilon"] for r in after["rounds"]]
    assert eps == sorted(eps) and eps[-1] > max([r["epsilon"] for r in interrupted] + [0.0])
