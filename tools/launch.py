"""Run a privrec simulation through Flower's own machinery: a SuperLink in simulation mode + `flwr run`.

We start the SuperLink ourselves (known PID, free port, private FLWR_HOME) instead of Flower's
managed local one, which detaches and outlives the command. The ServerApp and ClientApp are
referenced by module path (`server.app:app`, `client.app:app` in pyproject.toml); nothing here
imports them.

A stopped run stops: the launcher holds the run directory's lock (shared/run_owner.py) for the
run's life, turns SIGTERM and SIGHUP into the same clean stop as Ctrl-C, and starts a watchdog
(`python -m tools.launch --watch`, in a session of its own) that outlives a `kill -9` of the
launcher. Every process of the run (SuperLink, SuperExec, `flwr run`, Ray's GCS, raylet, agents
and workers) carries the run's private FLWR_HOME in its environment; whoever stops the run kills
them all by that marker, then records `interrupted` in status.json unless the run had completed
or failed by itself.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.atomic import write_bytes_atomic, write_json_atomic
from shared.errors import PrivrecError
from shared.resume import check_resumable
from shared.run_owner import LOCK_ENV, RunLock, boot_id, process_alive, process_start

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_root() -> Path:
    """The Flower App folder (`flwr run` packs it); privrec must run from its source tree."""
    if not (PROJECT_ROOT / "pyproject.toml").exists():
        raise PrivrecError(f"{PROJECT_ROOT} has no pyproject.toml: `privrec simulate` needs the privrec "
                           "source tree (install it with `pip install -e .`)")
    return PROJECT_ROOT


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # Our dependencies are installed already; don't let Flower `uv sync` them per run.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
        # Flower starts its helpers (flower-superexec, flwr-serverapp) by name: put this
        # interpreter's scripts first, so a venv works without being activated.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    return env


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (works without an activated venv)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


@dataclass
class SimulationResult:
    run_id: int | None
    flower_status: str | None  # e.g. "finished:completed"
    returncode: int


HOME_PREFIX = "privrec-flwr-"
HOME_OWNER = "privrec-owner.json"  # in the temporary Flower home: which launcher made it


def simulation_env(flwr_home: Path, locked_run: Path | None, ray_address: str | None = None) -> dict[str, str]:
    env = flower_env(flwr_home)
    if ray_address:
        # Flower's Ray backend calls ray.init() without an address, which honours RAY_ADDRESS: the
        # simulation joins the user's cluster (docs/multi-node.md). That cluster's processes are not
        # ours: they do not carry our FLWR_HOME, so stopping the run stops only our driver (whose
        # actors Ray then ends), never the cluster.
        env["RAY_ADDRESS"] = ray_address
    else:
        # Our own Ray, never a cluster found by accident (RAY_ADDRESS in the shell, or the latest
        # `ray start` on this machine, which ray.init() would otherwise join).
        env["RAY_ADDRESS"] = "local"
        # Ray binds its GCS, raylet, agents and workers to the node's IP on all interfaces unless it
        # believes multi-node clusters are off (its Windows/macOS default): then all of it is loopback.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if locked_run is not None:
        env[LOCK_ENV] = str(locked_run)  # tells the ServerApp that we hold this run's lock for it
    return env


@contextmanager
def simulation_superlink(log_path: Path, run_path: Path | None = None, lock: RunLock | None = None,
                         ray_address: str | None = None) -> Iterator[tuple[Path, dict[str, str]]]:
    """A SuperLink in simulation mode on a free loopback port; always stopped on exit, also when the
    launcher is killed (a watchdog stops everything then and marks the run `interrupted`)."""
    sweep_stale_homes()
    flwr_home = Path(tempfile.mkdtemp(prefix=HOME_PREFIX))
    write_json_atomic(flwr_home / HOME_OWNER, {"pid": os.getpid(), "pid-start": process_start(os.getpid()),
                                               "boot-id": boot_id()})
    port = free_port()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "privrec"\n\n'
        f'[superlink.privrec]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    run_path = run_path or log_path.parent
    env = simulation_env(flwr_home, run_path if lock is not None else None, ray_address)
    watchdog = Watchdog.start(flwr_home, run_path, lock)
    command = [_bin("flower-superlink"), "--simulation", "--insecure", "--isolation", "subprocess",
               "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"]
    try:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        try:
            _wait_for_port(port, process, log_path)
            yield flwr_home, env
        finally:
            stop_process_group(process)
    finally:
        stop_processes_with_env("FLWR_HOME", str(flwr_home))
        shutil.rmtree(flwr_home, ignore_errors=True)
        watchdog.dismiss()


class Watchdog:
    """A process that outlives the launcher: when the launcher dies without dismissing it (kill -9),
    it stops every process of the run, marks the run `interrupted` and removes the Flower home.

    It learns of the launcher's death from a pipe whose only writer is the launcher (EOF when the
    launcher's process ends, however it ends), and it holds the run directory's lock (a shared open
    file description) until it has cleaned up, so no new run starts among the old run's processes.
    """

    def __init__(self, process: subprocess.Popen, pipe: int):
        self.process = process
        self.pipe = pipe

    @classmethod
    def start(cls, flwr_home: Path, run_path: Path | None, lock: RunLock | None) -> Watchdog:
        """Watch the processes that carry FLWR_HOME=`flwr_home`; `run_path` (if any) is marked on a kill."""
        read_end, write_end = os.pipe()
        fds = [read_end] + ([lock.fd] if lock is not None else [])
        env = {k: v for k, v in os.environ.items() if k != "FLWR_HOME"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        command = [sys.executable, "-m", "tools.launch", "--watch", str(flwr_home), str(run_path or "-"),
                   str(os.getpid())]
        process = subprocess.Popen(command,
                                   stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   pass_fds=fds, env=env, start_new_session=True)
        os.close(read_end)
        return cls(process, write_end)

    def dismiss(self) -> None:
        """The launcher cleaned up itself: the watchdog only checks, then exits (and drops the lock)."""
        with suppress(OSError):
            os.write(self.pipe, b"done\n")
        with suppress(OSError):
            os.close(self.pipe)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def watch(flwr_home: Path, run_path: Path | None, launcher: int) -> None:
    """The watchdog's body (`python -m tools.launch --watch FLWR_HOME RUN_PATH|- LAUNCHER_PID`)."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    message = sys.stdin.buffer.read()  # returns at the launcher's end, clean or not
    launcher_died = message != b"done\n"
    before = read_status(run_path) if launcher_died and run_path else None
    stop_processes_with_env("FLWR_HOME", str(flwr_home))
    if launcher_died and run_path:
        mark_interrupted(run_path, before, f"its launcher (pid {launcher}) died before the run ended")
    if flwr_home.name.startswith(HOME_PREFIX):  # a temporary home; a deployment's own stays
        shutil.rmtree(flwr_home, ignore_errors=True)


def sweep_stale_homes() -> None:
    """Remove Flower homes (and stop their processes) left by launchers that died with their watchdog."""
    for home in Path(tempfile.gettempdir()).glob(HOME_PREFIX + "*"):
        try:
            if home.stat().st_uid != os.getuid():
                continue
            owner = json.loads((home / HOME_OWNER).read_text())
        except (OSError, ValueError):
            continue  # not ours, or made by a privrec that recorded no owner: leave it
        same_boot = owner.get("boot-id") == boot_id()
        if same_boot and process_alive(int(owner.get("pid", 0)), owner.get("pid-start", "")):
            continue
        stop_processes_with_env("FLWR_HOME", str(home))
        shutil.rmtree(home, ignore_errors=True)


def read_status(run_path: Path) -> dict[str, Any] | None:
    try:
        status = json.loads((run_path / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def mark_interrupted(run_path: Path, before: dict[str, Any] | None, reason: str) -> None:
    """After every process of the run is stopped: status.json says `interrupted` unless the run had
    completed, or had failed by itself (`before`: the status when the stop began)."""
    if (run_path / "summary.json").exists() or (before or {}).get("state") in ("completed", "failed"):
        return
    if not run_path.is_dir():
        return
    rows = 0
    with suppress(OSError):
        rows = sum(1 for line in (run_path / "metrics.jsonl").read_text().splitlines() if line.strip())
    with suppress(OSError):  # a full disk must not hide the stop itself
        write_json_atomic(run_path / "status.json",
                          {"state": "interrupted", "time": time.time(), "reason": reason,
                           "last-round": rows - 1 if rows else None})


def processes_with_env(name: str, value: str) -> dict[int, str]:
    """pid -> start time of every process whose environment has `name=value`, and of all their
    descendants: Ray's agents and workers retitle themselves (setproctitle), which blanks their
    /proc/PID/environ, so they are found as children of the raylet that carries the marker."""
    needle = b"\0" + f"{name}={value}".encode() + b"\0"
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    marked = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (proc / "environ").read_bytes()
        except OSError:  # exited meanwhile, or not readable
            continue
        pid = int(proc.name)
        children.setdefault(int(fields[1]), []).append(pid)
        starts[pid] = fields[19]
        if needle in b"\0" + environ + b"\0":
            marked.append(pid)
    found, todo = set(), list(marked)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    found.discard(os.getpid())
    return {pid: starts[pid] for pid in found}


def stop_processes_with_env(name: str, value: str, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL, every process whose environment has `name=value`, and their descendants.

    Some Flower helpers (flower-superexec) start their own sessions and outlive the process group
    we kill; they all inherit our private FLWR_HOME, which no one else's processes carry. Processes
    seen once are followed by pid and start time even after their parent dies (Ray's agents are
    then orphans without a readable marker).
    """
    if not Path("/proc").is_dir():  # not Linux: the process-group kill is all we can do
        return
    tracked = processes_with_env(name, value)

    def alive() -> list[int]:
        tracked.update(processes_with_env(name, value))
        return [pid for pid, start in tracked.items() if process_start(pid) == start]  # zombies are done

    for sig in (signal.SIGTERM, signal.SIGKILL):
        signalled: set[int] = set()  # one SIGTERM each (a second can cut a clean shutdown short)
        deadline = time.monotonic() + grace
        while (left := alive()) and time.monotonic() < deadline:
            for pid in left:
                if sig == signal.SIGKILL or pid not in signalled:
                    with suppress(OSError):
                        os.kill(pid, sig)
                    signalled.add(pid)
            time.sleep(0.2)
        if not left:
            return


def _wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PrivrecError(f"flower-superlink exited with code {process.returncode}; see {log_path}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise PrivrecError(f"flower-superlink did not open port {port} within {timeout:.0f}s; see {log_path}")


def stop_process_group(process: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process and everything it started (its session), then SIGKILL stragglers."""
    if process.returncode is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _wait_unreaped(process, grace)  # its zombie keeps the group's number ours for the SIGKILL below
    if not group_number_reused(process):
        try:
            os.killpg(process.pid, signal.SIGKILL)  # children (Ray, SuperExec) may outlive the leader
        except (ProcessLookupError, PermissionError):
            pass
    if process.poll() is None:
        process.wait(timeout=grace)


def group_number_reused(process: subprocess.Popen) -> bool:
    """Whether `process` (started in a session of its own) was reaped and its pid now leads someone else's
    process group or session. Once the leader is reaped and its group empty the number is free, and with
    pid_max 32768 the numbers wrap within minutes when processes start by the thousand (a Flower ClientApp
    per message, several runs or test workers at once): signalling it would stop a stranger's processes."""
    if process.returncode is None:  # not reaped: the leader (or its zombie) still holds the number
        return False
    try:
        return os.getpgid(process.pid) == process.pid or os.getsid(process.pid) == process.pid
    except OSError:  # no process has that number: the group, if any, is still ours (stragglers hold it)
        return False


def _wait_unreaped(process: subprocess.Popen, timeout: float) -> None:
    """Wait until `process` exits, without reaping it (WNOWAIT)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return
        except ChildProcessError:  # reaped already
            return
        time.sleep(0.05)


def simulated_nodes(cfg: dict[str, Any], num_devices: int) -> int:
    """Flower nodes a simulation of `num_devices` devices needs: one per `devices-per-node` devices."""
    return math.ceil(num_devices / cfg.get("devices-per-node", 1))


def run_simulation(cfg: dict[str, Any], num_devices: int, run_path: Path,
                   on_poll: Callable[[], None] | None = None, cpus_per_device: int = 1,
                   ray_address: str | None = None) -> SimulationResult:
    """Run one federated simulation with Flower; the ServerApp writes `run_path`.

    `ray_address` (HOST:PORT of a running Ray cluster's head, this machine being one of its nodes)
    runs the devices on that cluster; without it the run starts its own Ray on loopback.

    Refused with a PrivrecError, before anything is written: a run directory another run holds, and
    a checkpoint this config cannot continue. SIGINT, SIGTERM and SIGHUP stop every process of the
    run, mark it `interrupted` and raise KeyboardInterrupt.
    """
    run_path = Path(run_path)
    lock = RunLock.acquire(run_path, role="launcher")
    try:
        check_resumable(run_path, cfg)
        overrides = run_path / "run-config.toml"
        write_bytes_atomic(overrides, _toml(cfg).encode())
        with _signals_stop_the_run() as stop:
            try:
                return _simulate(cfg, num_devices, run_path, overrides, lock, on_poll, cpus_per_device, stop,
                                 ray_address)
            except KeyboardInterrupt:
                # Every process of the run is stopped by now (the context managers' exits).
                mark_interrupted(run_path, stop.status_before, f"stopped by {stop.cause}")
                raise
    finally:
        lock.release()


def _simulate(cfg: dict[str, Any], num_devices: int, run_path: Path, overrides: Path, lock: RunLock,
              on_poll: Callable[[], None] | None, cpus_per_device: int, stop: _Stop,
              ray_address: str | None = None) -> SimulationResult:
    log_path = run_path / "flower.log"
    with simulation_superlink(log_path, run_path, lock, ray_address) as (flwr_home, env):
        lock.heartbeat(**{"flwr-home": str(flwr_home)})
        command = [_bin("flwr"), "run", str(project_root()), "privrec", "--stream",
                   "--run-config", str(overrides),
                   "--federation-config",
                   f"num-supernodes={simulated_nodes(cfg, num_devices)} "
                   f"client-resources-num-cpus={cpus_per_device} "
                   "client-resources-num-gpus=0"]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                while process.poll() is None:
                    if on_poll:
                        on_poll()
                    lock.heartbeat()
                    time.sleep(1.0)
            except KeyboardInterrupt:
                stop.status_before = read_status(run_path)  # before our signals reach the ServerApp
                raise
            finally:
                stop_process_group(process)
        run_id = _started_run_id(log_path)
        status = flower_run_status(run_id, env) if run_id is not None else None
    if on_poll:
        on_poll()
    return SimulationResult(run_id=run_id, flower_status=status, returncode=process.returncode)


@dataclass
class _Stop:
    cause: str = "Ctrl-C (SIGINT)"
    status_before: dict[str, Any] | None = None


@contextmanager
def _signals_stop_the_run() -> Iterator[_Stop]:
    """SIGTERM and SIGHUP stop the run as Ctrl-C does (KeyboardInterrupt); further signals are ignored
    while the run's processes are being stopped (a kill -9 still ends the launcher: the watchdog)."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in handled}

    def handler(signum, frame):
        for sig in handled:
            signal.signal(sig, signal.SIG_IGN)
        stop.cause = signal.Signals(signum).name if signum != signal.SIGINT else "Ctrl-C (SIGINT)"
        raise KeyboardInterrupt

    for sig in handled:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _started_run_id(log_path: Path) -> int | None:
    match = re.search(r"Successfully started run (\d+)", log_path.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def flower_run_status(run_id: int, env: dict[str, str]) -> str | None:
    """Flower's own verdict on a run ("finished:completed", "finished:failed", ...)."""
    out = subprocess.run([_bin("flwr"), "list", "privrec", "--run-id", str(run_id), "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=60)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        return None
    return runs[0].get("status") if runs else None


def _toml(values: dict[str, Any]) -> str:
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(str(value))  # JSON string escaping is valid TOML basic-string escaping
        lines.append(f"{key} = {text}")
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # never hand Flower a file it cannot parse
    return text


if __name__ == "__main__" and sys.argv[1:2] == ["--watch"]:
    watch(Path(sys.argv[2]), None if sys.argv[3] == "-" else Path(sys.argv[3]), int(sys.argv[4]))
