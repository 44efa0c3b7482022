"""Flower deployment processes: the command lines privrec hands to `flower-superlink` / `flower-supernode`.

Everything here builds or runs Flower's own commands with the right flags; nothing re-implements
what they do. `ProcessGroup` starts each process in its own session with a known PID and a log
file, and stops every process it started (and their children: SuperExec, ServerApp, ClientApp).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import PrivrecError
from shared.run_owner import process_start
from tools.deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from tools.launch import Watchdog, _bin, flower_env, free_port, group_number_reused, stop_process_group

CONNECTION = "privrec"  # the connection name privrec writes into $FLWR_HOME/config.toml


@dataclass(frozen=True)
class Security:
    """TLS (on unless `insecure`) and SuperNode authentication (needs TLS)."""

    tls_dir: Path | None = None  # holds ca.crt, server.crt, server.key (`privrec deploy certs`)
    insecure: bool = False
    auth: bool = False

    def __post_init__(self):
        if self.insecure and self.auth:
            raise PrivrecError("--auth needs TLS: node authentication is refused on an --insecure connection")
        if not self.insecure and self.tls_dir is None:
            raise PrivrecError("TLS is on by default: give --tls-dir DIR (make one for testing with "
                               "`privrec deploy certs DIR`), or ask for --insecure explicitly")
        if self.tls_dir is not None and not self.insecure:
            for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
                if not (self.tls_dir / name).is_file():
                    raise PrivrecError(f"--tls-dir {self.tls_dir}: {name} is missing "
                                       "(`privrec deploy certs DIR` writes ca.crt, server.crt, server.key)")

    @property
    def ca_cert(self) -> Path | None:
        return None if self.insecure or self.tls_dir is None else (self.tls_dir / CA_CERT).resolve()


INSECURE_WARNING = ("privrec: WARNING: --insecure: traffic between devices and the SuperLink is NOT encrypted "
                    "and nodes are not authenticated; use it only on a trusted test network")


def superlink_command(security: Security, host: str, port: int, database: Path | None = None) -> list[str]:
    command = [_bin("flower-superlink"), "--host", host, "--port", str(port),
               "--isolation", "subprocess", "--disable-runtime-dependency-installation"]
    if security.insecure:
        command.append("--insecure")
    else:
        tls = security.tls_dir.resolve()
        command += ["--ssl-ca-certfile", str(tls / CA_CERT), "--ssl-certfile", str(tls / SERVER_CERT),
                    "--ssl-keyfile", str(tls / SERVER_KEY)]
    if security.auth:
        command.append("--enable-supernode-auth")
    if database is not None:
        command += ["--database", str(database)]  # runs, nodes and registered keys survive a restart
    return command


def supernode_command(superlink: str, node_config: str, ca_cert: Path | None, insecure: bool,
                      key: Path | None, runtime_port: int) -> list[str]:
    command = [_bin("flower-supernode"), "--superlink", superlink, "--node-config", node_config,
               # The SuperNode serves its ClientApp runtime API on this port: unique per node on one host.
               "--port", str(runtime_port), "--isolation", "subprocess"]
    if insecure:
        command.append("--insecure")
    elif ca_cert is not None:
        command += ["--root-certificates", str(ca_cert)]
    # Without --root-certificates Flower verifies the SuperLink against the system's trusted CAs.
    if key is not None:
        command += ["--auth-supernode-private-key", str(key)]
    return command


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PrivrecError(f"--superlink {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port)


def wait_until_reachable(address: str, log=print, first_wait: float = 1.0, max_wait: float = 30.0,
                         give_up_after: float | None = None) -> None:
    """Retry a TCP connect with exponential backoff, one clear line per failed attempt."""
    host, port = parse_address(address)
    wait, attempt, started = first_wait, 1, time.monotonic()
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                if attempt > 1:
                    log(f"privrec: SuperLink {address} reachable after {attempt} attempts")
                return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        if give_up_after is not None and time.monotonic() - started + wait > give_up_after:
            raise PrivrecError(f"SuperLink {address} unreachable ({reason}) after {attempt} attempts "
                               f"in {time.monotonic() - started:.0f} s")
        log(f"privrec: SuperLink {address} unreachable ({reason}); retrying in {wait:.2f} s (attempt {attempt})")
        time.sleep(wait)
        attempt += 1
        wait = min(max_wait, wait * 2)


def write_connection(flwr_home: Path, address: str, ca_cert: Path | None) -> None:
    """$FLWR_HOME/config.toml with one connection, `privrec`, that `flwr run/list/supernode` use."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{ca_cert}"' if ca_cert is not None else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n')


def register_node(public_key: Path, env: dict[str, str]) -> int:
    """`flwr supernode register KEY.pub privrec`: only registered public keys may join (with --auth)."""
    out = subprocess.run([_bin("flwr"), "supernode", "register", str(public_key), CONNECTION, "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=60)
    try:
        reply = json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError:
        reply = {}
    if not reply.get("success"):
        raise PrivrecError(f"registering {public_key} failed: {(out.stdout + out.stderr).strip()[-400:]}")
    return int(reply["node-id"])


def session_pids(session: int) -> list[int]:
    """Processes still in a session we started (children that made process groups of their own included)."""
    out = subprocess.run(["pgrep", "-s", str(session)], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def flower_descendants(pid: int) -> list[int]:
    """The processes Flower started under `pid` with `--parent-pid`, at any depth: a SuperLink's (or a
    SuperNode's) SuperExec and the ServerApps (ClientApps) under it.

    Flower starts its SuperExec in a session of its own, so signalling `pid`'s session misses them. Each
    polls its parent and stops itself once the parent is gone, but in one CI run the ServerApp outlived its
    stopped SuperLink by 27 s: long enough to reach the restarted SuperLink and send a round that two
    devices trained for and the SuperLink then refused (the run had been marked finished), spending their
    budgets for nothing."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "--parent-pid" in args[:-1] and args[args.index("--parent-pid") + 1].isdigit():
            children.setdefault(int(args[args.index("--parent-pid") + 1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def _kill_session(process: subprocess.Popen, timeout: float = 10) -> None:
    # The session id is the PID of a process we started in a new session: only our processes are in it,
    # unless that process was reaped and the number went to another session's leader.
    deadline = time.monotonic() + timeout
    while not group_number_reused(process) and (pids := session_pids(process.pid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


@dataclass
class Started:
    name: str
    process: subprocess.Popen
    log_path: Path


@dataclass
class ProcessGroup:
    """Processes started by privrec, each with a known PID and log; `close()` stops them all."""

    log_dir: Path
    env: dict[str, str]
    started: dict[str, Started] = field(default_factory=dict)
    sessions: list[int] = field(default_factory=list)  # every session ever started, stopped ones included
    run_path: Path | None = None  # marked `interrupted` if our process is killed before `close()`
    watchdog: Watchdog | None = None

    def start(self, name: str, command: list[str], cwd: Path | None = None,
              extra_env: dict[str, str] | None = None) -> Started:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.watchdog is None and "FLWR_HOME" in self.env:
            # Our processes live in sessions of their own: if we die without close() (kill -9), the
            # watchdog stops every process that carries this deployment's FLWR_HOME.
            self.watchdog = Watchdog.start(Path(self.env["FLWR_HOME"]), self.run_path, None)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(command, env={**self.env, **(extra_env or {})}, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=cwd, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.started[name] = Started(name, process, log_path)
        self.sessions.append(process.pid)
        return self.started[name]

    def stop(self, name: str, grace: float = 10) -> None:
        if name in self.started:
            process = self.started.pop(name).process
            stop_process_group(process, grace=grace)
            _kill_session(process)

    def kill(self, name: str) -> None:
        """SIGKILL to the whole session and to the Flower processes started under it in sessions of their
        own (SuperExec, ServerApp, ClientApp), no clean shutdown: a host that crashes or loses power."""
        started = self.started.pop(name, None)
        if started is None:
            return
        # Found while their parent still lives (and while its number is still ours).
        detached = {} if group_number_reused(started.process) else {
            pid: process_start(pid) for pid in flower_descendants(started.process.pid)}
        for pid in detached:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not group_number_reused(started.process):
            try:
                os.killpg(started.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        started.process.wait(timeout=30)
        _kill_session(started.process)
        deadline = time.monotonic() + 10
        while any(start and process_start(pid) == start for pid, start in detached.items()) \
                and time.monotonic() < deadline:  # a zombie has exited: its locks and sockets are released
            time.sleep(0.05)

    def pids(self) -> dict[str, int]:
        return {name: s.process.pid for name, s in self.started.items()}

    def close(self) -> None:
        for name in reversed(list(self.started)):
            self.stop(name)
        if self.watchdog is not None:
            self.watchdog.dismiss()
            self.watchdog = None

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def new_env(flwr_home: Path) -> dict[str, str]:
    env = flower_env(flwr_home)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # so `privrec` runs from any folder
    return env


def privrec_command(*args: str) -> list[str]:
    """This interpreter's `privrec` CLI (works without an activated venv)."""
    return [sys.executable, "-m", "tools.cli", *args]


__all__ = ["CONNECTION", "INSECURE_WARNING", "ProcessGroup", "Security", "Started", "free_port", "new_env",
           "parse_address", "privrec_command", "register_node", "superlink_command", "supernode_command",
           "wait_until_reachable", "write_connection"]
