"""Fault injection on the run lifecycle: a stopped run stops, a failed run fails, a crashed run is
told from a live one, and no fault loses recorded privacy spend.

Each fault is checked for: no process left (counted by this test's own environment marker and the
run's private FLWR_HOME, never by name), the run's status, the devices' ledgers (still there, not
lower), and the message of the next command. The real-Flower cases (`slow`) kill `privrec simulate`
mid-run on loopback with a tiny synthetic store.

Ledger deletion and truncation faults are covered with the ledger's new home (the population
folder next to the device store), not here.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from server.run_dir import RunDirectory
from shared import config
from shared.errors import PrivrecError
from shared.privacy.device_journal import privacy_record
from shared.privacy.ledger import LEDGER_FILE
from shared.run_owner import OWNER, RunLock, boot_id, liveness, lock_is_held, read_owner
from tests.synthetic import walk_store
from tools.cli import _previous_run
from tools.cli import main as cli_main
from tools.launch import HOME_OWNER, HOME_PREFIX, _signals_stop_the_run, run_simulation, sweep_stale_homes
from tools.report.load import load_run

ROOT = Path(__file__).resolve().parents[1]
# SASRec runs: `privrec simulate` without a model runs the content-scorer pipeline since issue 13
TINY = ["--set", "model=sasrec", "--set", "max-len=16", "--set", "window=12", "--set", "hidden-size=16",
        "--set", "num-blocks=1",
        "--set", "eval-every=0", "--set", "central-eval=false"]


# ------------------------------------------------------------------------------ helpers
def processes_with(needle: str) -> list[str]:
    """Processes whose environment holds `needle` ("NAME=value"), other than this test process."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int(proc.name) != os.getpid() and \
                    needle.encode() + b"\0" in (proc / "environ").read_bytes() + b"\0":
                found.append(f"{proc.name} {(proc / 'cmdline').read_bytes()[:100]!r}")
        except OSError:  # gone, or not ours to read
            continue
    return found


def process_tree(roots: set[int]) -> dict[int, str]:
    """pid -> start time of `roots` and all their descendants, found by parent links (Ray's workers
    and agents retitle themselves, which blanks their environment: a marker alone misses them)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split() if proc.name.isdigit() else None
        except OSError:
            continue
        if fields:
            children.setdefault(int(fields[1]), []).append(int(proc.name))
            starts[int(proc.name)] = fields[19]
    found, todo = {}, [pid for pid in roots if pid in starts]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = starts[pid]
            todo.extend(children.get(pid, []))
    return found


def survivors(snapshot: dict[int, str], timeout: float = 30) -> list[str]:
    """The processes of `snapshot` still running (same pid and start time) after up to `timeout` s."""
    def alive() -> list[str]:
        left = []
        for pid, start in snapshot.items():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[19] == start and stat.rsplit(")", 1)[1].split()[0] != "Z":
                left.append(f"{pid} {stat[:60]}")
        return left

    deadline = time.monotonic() + timeout
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def run_tree(launcher: int, flwr_home: str) -> dict[int, str]:
    marked = {int(p.split()[0]) for p in processes_with(f"FLWR_HOME={flwr_home}")}
    tree = process_tree(marked | {launcher})
    assert any(b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in tree if Path(f"/proc/{pid}").exists())
    return tree


def wait_until_gone(needle: str, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := processes_with(needle)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture
def marker(monkeypatch) -> str:
    """An environment variable that everything this test starts inherits (and nobody else carries)."""
    value = uuid.uuid4().hex
    monkeypatch.setenv("PRIVREC_FAULT_TEST", value)
    yield f"PRIVREC_FAULT_TEST={value}"
    left = wait_until_gone(f"PRIVREC_FAULT_TEST={value}", timeout=20)
    for line in left:  # never leave anything behind, even when the test failed
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes left running: {left}"


def ledger_spend(root: Path) -> dict[str, tuple[int, float]]:
    """Every device ledger under `root`: (rounds recorded, latest epsilon)."""
    spend = {}
    for path in root.rglob(LEDGER_FILE):
        ledger = json.loads(path.read_text())
        spend[str(path)] = (len(ledger["rounds"]), ledger["rounds"][-1]["epsilon"] if ledger["rounds"] else 0.0)
    return spend


def assert_no_spend_lost(before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]]) -> None:
    assert before, "the fault came before any device trained: nothing was checked"
    assert set(before) <= set(after), f"ledgers disappeared: {set(before) - set(after)}"
    for path, (rounds, epsilon) in before.items():
        assert after[path][0] >= rounds and after[path][1] >= epsilon, (path, before[path], after[path])


def status(run_path: Path) -> dict:
    return json.loads((run_path / "status.json").read_text())


def simulate_command(store: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tools.cli", "simulate", "--set", f"data-store={store}", "--run-dir", str(runs),
            "--run-name", name, *TINY, *extra]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def wait_for_round(run_path: Path, process: subprocess.Popen, wanted: int, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended early: {(run_path / 'flower.log').read_text()[-2000:]}"
        try:
            rows = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
            if rows and rows[-1]["round"] >= wanted:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"round {wanted} not reached within {timeout} s")


def listening_addresses(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state that processes `pids` hold."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1])
    return found


def is_loopback(hex_address: str) -> bool:
    host = hex_address.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian bytes: 127.x.x.x ends in 7F
        return host.endswith("7F")
    # IPv6: ::1, or IPv4-mapped ::ffff:127.x.x.x
    return host == "00000000000000000000000001000000" or (host[:24] == "0000000000000000FFFF0000"
                                                           and host.endswith("7F"))


# ------------------------------------------------------------------------------ real runs (slow)
@pytest.mark.slow
def test_sigterm_stops_every_process_marks_the_run_interrupted_and_loses_no_spend(tmp_path, marker):
    store, runs = walk_store(tmp_path / "store", num_users=4, num_items=30), tmp_path / "runs"
    run_path = runs / "t1"
    launcher = subprocess.Popen(simulate_command(store, runs, "t1", "--rounds", "40", "--devices-per-round", "3",
                                                 "--set", "local-epochs=20"),
                                env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_round(run_path, launcher, 1)
        flwr_home = read_owner(run_path)["flwr-home"]
        ours = {int(p.split()[0]) for p in processes_with(f"FLWR_HOME={flwr_home}")}
        # Ray's GCS, raylet, agents and workers, the SuperLink: all on loopback (defect 7).
        addresses = listening_addresses(ours)
        assert addresses and all(is_loopback(a) for a in addresses), addresses

        # A second run on the same directory is refused, in one line, without touching the first (defect 3).
        metrics_before = (run_path / "metrics.jsonl").read_bytes()
        second = subprocess.run(simulate_command(store, runs, "t1", "--rounds", "40", "--devices-per-round", "3"),
                                env=cli_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert len(second.stderr.strip().splitlines()) == 1 and "in use by another run" in second.stderr
        assert str(launcher.pid) in second.stderr
        assert (run_path / "metrics.jsonl").read_bytes()[:len(metrics_before)] == metrics_before

        spend_at_kill = ledger_spend(tmp_path)
        tree = run_tree(launcher.pid, flwr_home)
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130
    assert "interrupted" in stderr.strip().splitlines()[-1] and "resume" in stderr.strip().splitlines()[-1]
    assert not wait_until_gone(f"FLWR_HOME={flwr_home}", timeout=15)
    assert not survivors(tree, timeout=15)  # Ray's retitled agents and workers included
    assert not Path(flwr_home).exists()
    assert status(run_path)["state"] == "interrupted" and "SIGTERM" in status(run_path)["reason"]
    assert not (run_path / "summary.json").exists()
    time.sleep(3)  # nothing trains any more: the ledgers stay where the kill left them, never lower
    after = ledger_spend(tmp_path)
    assert_no_spend_lost(spend_at_kill, after)
    assert after == ledger_spend(tmp_path)

    # The next command: a resume with another noise multiplier is refused and rewrites nothing (defect 4).
    files = {name: (run_path / name).read_bytes() for name in ("config.json", "run-config.toml", "status.json")}
    refused = subprocess.run(simulate_command(store, runs, "t1", "--rounds", "40", "--devices-per-round", "3",
                                              "--noise-multiplier", "3.5"),
                             env=cli_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "noise-multiplier" in refused.stderr.strip().splitlines()[-1]
    assert "ended interrupted (stopped by SIGTERM); resuming after round" in refused.stdout
    assert files == {name: (run_path / name).read_bytes() for name in files}


@pytest.mark.slow
def test_kill_9_of_the_launcher_stops_the_run_through_its_watchdog(tmp_path, marker):
    store, runs = walk_store(tmp_path / "store", num_users=4, num_items=30), tmp_path / "runs"
    run_path = runs / "t2"
    launcher = subprocess.Popen(simulate_command(store, runs, "t2", "--rounds", "40", "--devices-per-round", "3",
                                                 "--set", "local-epochs=20"),
                                env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        wait_for_round(run_path, launcher, 1)
        flwr_home = read_owner(run_path)["flwr-home"]
        spend_at_kill = ledger_spend(tmp_path)
        tree = run_tree(launcher.pid, flwr_home)
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and its process group, no clean-up of its own
        launcher.wait(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert not wait_until_gone(f"FLWR_HOME={flwr_home}", timeout=40)
    assert not survivors(tree, timeout=15)
    deadline = time.monotonic() + 30
    while (lock_is_held(run_path) or Path(flwr_home).exists()) and time.monotonic() < deadline:
        time.sleep(0.5)  # the watchdog holds the lock until it has cleaned up
    assert not Path(flwr_home).exists() and not lock_is_held(run_path)
    assert status(run_path)["state"] == "interrupted"
    assert f"launcher (pid {launcher.pid}) died" in status(run_path)["reason"]
    assert not (run_path / "summary.json").exists()
    time.sleep(3)
    after = ledger_spend(tmp_path)
    assert_no_spend_lost(spend_at_kill, after)
    assert after == ledger_spend(tmp_path)
    # The next command says what happened.
    assert "ended interrupted (its launcher" in _previous_run(run_path)


# ------------------------------------------------------------------------------ fast faults
LAUNCHER = """
import subprocess, sys, time
from pathlib import Path
from shared.atomic import write_json_atomic
from tools.launch import Watchdog
from shared.run_owner import RunLock
run_path, home = Path(sys.argv[1]), Path(sys.argv[2])
lock = RunLock.acquire(run_path, role="launcher")
Watchdog.start(home, run_path, lock)
write_json_atomic(run_path / "status.json", {"state": "running"})
env = {"FLWR_HOME": str(home), "PATH": "/usr/bin:/bin"}
subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)  # a Flower process, in its own session
print("ready", flush=True)
time.sleep(300)
"""


DEPLOY_LAUNCHER = """
import sys, time
from pathlib import Path
from tools.deploy.processes import ProcessGroup
run_path, home = Path(sys.argv[1]), Path(sys.argv[2])
group = ProcessGroup(run_path / "logs", {"FLWR_HOME": str(home), "PATH": "/usr/bin:/bin"}, run_path=run_path)
group.start("superlink", ["sleep", "300"])  # stands in for `privrec deploy local`'s SuperLink and SuperNodes
group.start("node-0", ["sleep", "300"])
print("ready", flush=True)
time.sleep(300)
"""


def test_a_killed_local_deployment_stops_its_processes(tmp_path, marker):
    run_path, home = tmp_path / "runs" / "d", tmp_path / "deploy" / "flwr-home"
    run_path.mkdir(parents=True)
    (run_path / "status.json").write_text('{"state": "running"}')
    launcher = subprocess.Popen([sys.executable, "-c", DEPLOY_LAUNCHER, str(run_path), str(home)], env=cli_env(),
                                stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline().strip() == "ready"
        assert len(processes_with(f"FLWR_HOME={home}")) == 2
        launcher.kill()
        launcher.wait(timeout=10)
        assert not wait_until_gone(f"FLWR_HOME={home}", timeout=20)
        deadline = time.monotonic() + 20
        while status(run_path)["state"] != "interrupted" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status(run_path)["state"] == "interrupted"
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_watchdog_stops_the_run_and_frees_the_lock_when_the_launcher_is_killed(tmp_path, marker):
    run_path, home = tmp_path / "runs" / "w", Path(tempfile.mkdtemp(prefix=HOME_PREFIX))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(run_path), str(home)], env=cli_env(),
                                stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline().strip() == "ready"
        assert processes_with(f"FLWR_HOME={home}") and lock_is_held(run_path)
        launcher.kill()
        launcher.wait(timeout=10)
        assert not wait_until_gone(f"FLWR_HOME={home}", timeout=20)
        deadline = time.monotonic() + 20
        while lock_is_held(run_path) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not lock_is_held(run_path) and not home.exists()
        assert status(run_path)["state"] == "interrupted"
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_sigterm_and_sighup_stop_the_run_like_ctrl_c():
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        with pytest.raises(KeyboardInterrupt), _signals_stop_the_run() as stop:
            os.kill(os.getpid(), sig)
            time.sleep(1)
        assert signal.Signals(sig).name in stop.cause
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored after the run


def test_a_second_run_on_a_locked_directory_is_refused_before_writing_anything(tmp_path, monkeypatch):
    cfg = config.validate({"data-store": str(tmp_path / "store"), "run-dir": str(tmp_path), "run-name": "r"})
    first = RunLock.acquire(tmp_path / "r", role="launcher")
    before = sorted(p.name for p in (tmp_path / "r").iterdir())

    def no_flower(*args, **kwargs):
        raise AssertionError("Flower must not start for a refused run")

    monkeypatch.setattr("tools.launch.subprocess.Popen", no_flower)
    with pytest.raises(PrivrecError, match=rf"in use by another run \(pid {os.getpid()} on "):
        run_simulation(cfg, 2, tmp_path / "r")
    # The ServerApp refuses too, when nobody launched it locally (a deployment).
    with pytest.raises(PrivrecError, match="in use by another run"):
        RunDirectory.claim(tmp_path, "r", cfg)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before
    first.release()
    RunDirectory.claim(tmp_path, "r", cfg).release()  # free again once the first run ends


def _fake_checkpoint(run_path: Path, cfg: dict) -> None:
    from shared.resume import CHECKPOINT_DIR, MUST_MATCH

    (run_path / CHECKPOINT_DIR).mkdir(parents=True)
    (run_path / CHECKPOINT_DIR / "state.json").write_text(json.dumps(
        {"format": 1, "round": 2, "config": {k: cfg[k] for k in MUST_MATCH}, "epsilon-by-device": {}}))
    for name, text in (("config.json", '{"old": 1}'), ("run-config.toml", "old = 1\n"),
                       ("status.json", '{"state": "interrupted"}')):
        (run_path / name).write_text(text)


def test_a_refused_resume_rewrites_nothing(tmp_path, monkeypatch):
    cfg = config.validate({"data-store": str(tmp_path / "store"), "run-dir": str(tmp_path), "run-name": "r",
                           "num-rounds": 4, "noise-multiplier": 1.0})
    _fake_checkpoint(tmp_path / "r", cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
    monkeypatch.setattr("tools.launch.subprocess.Popen", lambda *a, **k: pytest.fail("Flower started"))
    other = {**cfg, "noise-multiplier": 2.0}
    with pytest.raises(PrivrecError, match="'noise-multiplier' = 1.0, this run has 2.0"):
        run_simulation(other, 2, tmp_path / "r")
    with pytest.raises(PrivrecError, match="'noise-multiplier' = 1.0, this run has 2.0"):
        RunDirectory.claim(tmp_path, "r", other)  # the ServerApp's own check, also before any write
    after = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file() and p.name not in
             ("run.lock", OWNER)}
    assert after == before


def test_a_crashed_run_is_told_from_a_live_one(tmp_path, capsys):
    run_path = tmp_path / "r"
    lock = RunLock.acquire(run_path, role="launcher")
    (run_path / "status.json").write_text('{"state": "running"}')
    assert liveness(run_path)[0] == "live"
    assert _previous_run(run_path) is None  # a live run: the launcher refuses it with the owner's details
    lock.release()
    # The owner died (here: a process that has exited) without marking the run.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = json.loads((run_path / OWNER).read_text())
    (run_path / OWNER).write_text(json.dumps({**owner, "pid": dead.pid, "pid-start": "1"}))
    verdict, why = liveness(run_path)
    assert verdict == "crashed" and f"pid {dead.pid}" in why and "is gone" in why
    assert "the run crashed" in _previous_run(run_path) and "no checkpoint: starting at round 1" in \
        _previous_run(run_path)
    # `privrec report` says so as well.
    from tests.report_fixture import write_run

    report_run = write_run(tmp_path / "rep", state="running")
    (report_run / OWNER).write_text(json.dumps({**owner, "pid": dead.pid, "pid-start": "1"}))
    assert load_run(report_run).status["state"] == "crashed"
    assert cli_main(["report", str(report_run), "--out", str(tmp_path / "out")]) == 0
    assert "run state: crashed (the run crashed" in capsys.readouterr().out


def test_stale_flower_homes_are_swept_and_their_processes_stopped(tmp_path, marker):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = (Path(tempfile.mkdtemp(prefix=HOME_PREFIX)) for _ in range(2))
    (stale / HOME_OWNER).write_text(json.dumps({"pid": dead.pid, "pid-start": "1", "boot-id": ""}))
    (live / HOME_OWNER).write_text(json.dumps({"pid": os.getpid(), "pid-start": "", "boot-id": boot_id()}))
    orphan = subprocess.Popen(["sleep", "300"], env={**os.environ, "FLWR_HOME": str(stale)})
    try:
        sweep_stale_homes()
        assert orphan.wait(timeout=20) is not None
        assert not stale.exists() and live.exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
        shutil.rmtree(live, ignore_errors=True)


def test_a_full_disk_fails_the_run_keeps_the_spend_and_frees_the_directory(tmp_path, monkeypatch):
    """ENOSPC on the run directory from round 2 on: the ServerApp stops, the ledgers keep every round
    they recorded, the lock is released, and the next command says the run crashed and resumes it."""
    from flwr.app import Context, RecordDict

    import server.run_dir
    from client.app import app as client_app
    from server.app import main
    from simulations.inprocess import InProcessGrid, serve

    store = walk_store(tmp_path / "store", num_users=4, num_items=30)
    cfg = config.validate({"data-store": str(store), "num-rounds": 3, "devices-per-round": 3, "eval-every": 0,
                           "central-eval": False, "max-len": 16, "window": 12, "hidden-size": 16, "num-blocks": 1,
                           "run-dir": str(tmp_path / "runs"), "run-name": "full", "deterministic-devices": True})
    run_path = tmp_path / "runs" / "full"
    real_write = server.run_dir.write_bytes_atomic
    writes = {"metrics": 0}

    def disk_fills_up(path: Path, data: bytes) -> None:
        if path.name == "metrics.jsonl":
            writes["metrics"] += 1
        if writes["metrics"] >= 3:  # round 0 and round 1 were recorded; then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(server.run_dir, "write_bytes_atomic", disk_fills_up)
    monkeypatch.setattr(server.run_dir, "write_json_atomic",
                        lambda path, payload: disk_fills_up(path, json.dumps(payload).encode()))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
    with pytest.raises(OSError, match="No space left"):
        serve(main, InProcessGrid(client_app, 4), context)

    assert not (run_path / "summary.json").exists()
    assert not lock_is_held(run_path)
    # status.json could not be written either: it still says "running", and the owner record tells the truth.
    assert status(run_path)["state"] == "running"
    assert liveness(run_path)[0] == "crashed"
    # Every device that trained in round 1 or 2 keeps its ledger; privacy.json (round 1) never claims more.
    spend = ledger_spend(tmp_path)
    recorded = privacy_record(run_path)["devices"]  # crashed: from privacy.json's journal of device records
    assert len(spend) >= len(recorded) > 0
    for ledger_path, (_, epsilon) in spend.items():
        device = Path(ledger_path).parent.name.removeprefix("device-")
        if device in recorded:
            assert epsilon >= recorded[device]["epsilon"] - 1e-12
    line = _previous_run(run_path)
    assert "the run crashed" in line and "resuming after round 1" in line


def test_a_run_owned_by_another_host_is_judged_by_its_heartbeat(tmp_path):
    run_path = tmp_path / "r"
    run_path.mkdir()
    owner = {"pid": 1, "host": "another-host", "boot-id": "x", "started": time.time() - 600}
    (run_path / OWNER).write_text(json.dumps({**owner, "heartbeat": time.time() - 5}))
    assert liveness(run_path)[0] == "live"
    (run_path / OWNER).write_text(json.dumps({**owner, "heartbeat": time.time() - 600}))
    verdict, why = liveness(run_path)
    assert verdict == "crashed" and "no heartbeat" in why and "another-host" in why


# ------------------------------------------------------------------------------ ledger faults
# Deleted ledgers: tests/test_device_spend.py (between runs, on resume, the population list, the
# server's seen spend). A truncated ledger is the same fault seen through a crash or a full disk.


def test_a_truncated_ledger_is_refused_never_reset_and_the_failure_is_shown(tmp_path):
    from flwr.app import Context, RecordDict

    from client.app import app as client_app
    from server.app import main as server_main
    from shared.privacy.population import default_population_dir
    from simulations.inprocess import InProcessGrid, serve

    devices = 3
    store = walk_store(tmp_path / "store", num_users=devices, num_items=30)
    run_config = {"max-len": 16, "window": 12, "hidden-size": 16, "num-blocks": 1, "eval-every": 0,
                  "central-eval": False, "deterministic-devices": True, "data-store": str(store),
                  "num-rounds": 1, "devices-per-round": devices, "run-dir": str(tmp_path / "runs")}

    def run(name: str) -> InProcessGrid:
        grid = InProcessGrid(client_app, devices, keep_messages=True)
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                          run_config={**run_config, "run-name": name})
        serve(server_main, grid, context)
        return grid

    run("first")
    ledger = default_population_dir(str(store)) / "device-0" / LEDGER_FILE
    whole = ledger.read_bytes()
    ledger.write_bytes(whole[: len(whole) // 2])  # a torn write: the file ends mid-JSON
    grid = run("second")
    assert ledger.read_bytes() == whole[: len(whole) // 2]  # left for the operator, never replaced by zero
    errors = [reply.error.reason for reply in grid.replies if reply.has_error()]
    assert len(errors) == 1 and "unreadable" in errors[0] and "refusing to train" in errors[0]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "second" / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in rows if row.get("devices-asked")]
    assert trained[-1]["failures"] == 1 and "unreadable" in trained[-1]["first-error"]
