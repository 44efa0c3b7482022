"""Run a privrec simulation through Flower's own machinery: a SuperLink in simulation mode + `flwr run`.

We start the SuperLink ourselves (known PID, free port, private FLWR_HOME) instead of Flower's
managed local one, which detaches and outlives the command. The ServerApp and ClientApp are
referenced by module path (`server.app:app`, `client.app:app` in pyproject.toml); nothing here
imports them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import PrivrecError

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


@contextmanager
def simulation_superlink(log_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A SuperLink in simulation mode on a free loopback port; always stopped on exit."""
    flwr_home = Path(tempfile.mkdtemp(prefix="privrec-flwr-"))
    port = free_port()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "privrec"\n\n'
        f'[superlink.privrec]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = flower_env(flwr_home)
    command = [_bin("flower-superlink"), "--simulation", "--insecure", "--isolation", "subprocess",
               "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        _wait_for_port(port, process, log_path)
        yield flwr_home, env
    finally:
        stop_process_group(process)
        stop_processes_with_env("FLWR_HOME", str(flwr_home))
        shutil.rmtree(flwr_home, ignore_errors=True)


def stop_processes_with_env(name: str, value: str, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL, every process whose environment has `name=value`.

    Some Flower helpers (flower-superexec) start their own sessions and outlive the process group
    we kill; they all inherit our private FLWR_HOME, which no one else's processes carry.
    """
    needle = f"{name}={value}".encode() + b"\0"

    def ours() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and needle in (proc / "environ").read_bytes() + b"\0":
                    pids.append(int(proc.name))
            except OSError:  # exited meanwhile, or not readable
                continue
        return [pid for pid in pids if pid != os.getpid()]

    if not Path("/proc").is_dir():  # not Linux: the process-group kill is all we can do
        return
    deadline = time.monotonic() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not ours():
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
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children (Ray, SuperExec) may outlive the leader
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.wait(timeout=grace)


def run_simulation(cfg: dict[str, Any], num_devices: int, run_path: Path,
                   on_poll: Callable[[], None] | None = None, cpus_per_device: int = 1) -> SimulationResult:
    """Run one federated simulation with Flower; the ServerApp writes `run_path`."""
    run_path.mkdir(parents=True, exist_ok=True)
    overrides = run_path / "run-config.toml"
    overrides.write_text(_toml(cfg))
    log_path = run_path / "flower.log"
    with simulation_superlink(log_path) as (_, env):
        command = [_bin("flwr"), "run", str(project_root()), "privrec", "--stream",
                   "--run-config", str(overrides),
                   "--federation-config",
                   f"num-supernodes={num_devices} client-resources-num-cpus={cpus_per_device} "
                   "client-resources-num-gpus=0"]
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                while process.poll() is None:
                    if on_poll:
                        on_poll()
                    time.sleep(1.0)
            finally:
                stop_process_group(process)
        run_id = _started_run_id(log_path)
        status = flower_run_status(run_id, env) if run_id is not None else None
    if on_poll:
        on_poll()
    return SimulationResult(run_id=run_id, flower_status=status, returncode=process.returncode)


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
