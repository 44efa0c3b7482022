"""A whole deployment on one machine, in real processes: SuperLink, one SuperNode per device, the run.

`LocalDeployment` is the building block of `privrec deploy local` and of the deployment tests: it
keeps every process it starts (known PID, own session, own log) and stops all of them on `close()`,
also after an error or Ctrl-C. Its working folder holds Flower's home (connection config), the
SuperLink database, the test certificates and one log per process; the run directory and the
devices' ledgers stay behind after it stops.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.data.devices import CATALOGUE_DIR, DeviceFolder, open_device
from shared.errors import PrivrecError
from tools.deploy.certs import make_certs, make_node_key
from tools.deploy.processes import (
    CONNECTION,
    ProcessGroup,
    Security,
    new_env,
    privrec_command,
    register_node,
    superlink_command,
    write_connection,
)
from tools.launch import _bin, _toml, flower_run_status, free_port, project_root

NODE_KEY = "node.key"  # each device's own EC key lives in its folder, next to its data


class LocalDeployment:
    def __init__(self, workdir: Path, devices_dir: Path, security: Security, host: str = "127.0.0.1",
                 run_path: Path | None = None):
        self.workdir = workdir.resolve()
        self.devices_dir = devices_dir.resolve()
        self.security = security
        self.host = host
        self.port = free_port()
        self.address = f"{host}:{self.port}"
        self.flwr_home = self.workdir / "flwr-home"
        self.env = new_env(self.flwr_home)
        self.processes = ProcessGroup(self.workdir / "logs", self.env, run_path=run_path)
        self.node_ids: dict[str, int] = {}  # device id -> Flower node id (registered with --auth)
        # One database per deployment: it survives a SuperLink restart (runs, registered keys), and
        # a later `deploy local` of the same run (a resume) registers its devices afresh.
        self.database = self.workdir / f"superlink-{time.strftime('%Y%m%d-%H%M%S')}-{self.port}.db"
        write_connection(self.flwr_home, self.address, security.ca_cert)

    # -- SuperLink ------------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60) -> None:
        command = superlink_command(self.security, self.host, self.port, database=self.database)
        started = self.processes.start("superlink", command, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if started.process.poll() is not None:
                raise PrivrecError(f"flower-superlink exited with code {started.process.returncode}; "
                                   f"see {started.log_path}")
            with socket.socket() as sock:
                if sock.connect_ex((self.host, self.port)) == 0:
                    return
            time.sleep(0.2)
        raise PrivrecError(f"flower-superlink did not open {self.address} within {timeout:.0f} s; "
                           f"see {started.log_path}")

    def kill_superlink(self) -> None:
        """The SuperLink's host goes down: the SuperLink, its SuperExec and the ServerApps under it."""
        self.processes.kill("superlink")

    # -- SuperNodes ------------------------------------------------------------------------
    def device(self, index: int) -> DeviceFolder:
        return open_device(self.devices_dir / f"device-{index}")

    def node_key(self, device: DeviceFolder) -> Path:
        key, _ = make_node_key(device.path / NODE_KEY)
        return key

    def register(self, device: DeviceFolder) -> int:
        _, public = make_node_key(device.path / NODE_KEY)
        self.node_ids[device.device_id] = register_node(public, self.env)
        return self.node_ids[device.device_id]

    def start_node(self, index: int, key: Path | None = None, name: str | None = None,
                   extra_env: dict[str, str] | None = None) -> str:
        """Start device `index`'s SuperNode through `privrec deploy node` (key: the device's own, with auth;
        `extra_env`: what differs on this device, e.g. its own PRIVREC_CACHE_DIR)."""
        device = self.device(index)
        if key is None and self.security.auth:
            key = self.node_key(device)
        args = ["deploy", "node", "--data", str(device.path), "--superlink", self.address,
                "--runtime-port", str(free_port())]
        if self.security.insecure:
            args.append("--insecure")
        else:
            args += ["--ca-cert", str(self.security.ca_cert)]
        if key is not None:
            args += ["--key", str(key)]
        name = name or f"node-{index}"
        self.processes.start(name, privrec_command(*args), cwd=self.workdir, extra_env=extra_env)
        return name

    # -- the run ---------------------------------------------------------------------------
    def submit(self, cfg: dict[str, Any], name: str = "run") -> subprocess.Popen:
        """`flwr run . privrec --run-config FILE --stream` for `cfg` (the ServerApp writes the run dir)."""
        overrides = self.workdir / f"{name}-config.toml"
        overrides.write_text(_toml(cfg))
        command = [_bin("flwr"), "run", str(project_root()), CONNECTION, "--stream", "--run-config", str(overrides)]
        return self.processes.start(name, command, cwd=self.workdir).process

    def run_id(self, name: str = "run") -> int | None:
        log = (self.workdir / "logs" / f"{name}.log").read_text(errors="replace")
        # Logs are appended to: a resumed run's log also holds the id of the run it continues.
        found = re.findall(r"Successfully started run (\d+)", log)
        return int(found[-1]) if found else None

    def flower_status(self, name: str = "run") -> str | None:
        run_id = self.run_id(name)
        return flower_run_status(run_id, self.env) if run_id is not None else None

    def wait(self, name: str = "run", timeout: float = 600, on_poll: Callable[[], None] | None = None) -> int:
        process = self.processes.started[name].process
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if on_poll:
                on_poll()
            if time.monotonic() > deadline:
                raise PrivrecError(f"the run did not finish within {timeout:.0f} s; see {self.workdir / 'logs'}")
            time.sleep(0.5)
        if on_poll:
            on_poll()
        return process.returncode

    def close(self) -> None:
        self.processes.close()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prepare_security(workdir: Path, tls_dir: Path | None, insecure: bool, auth: bool) -> Security:
    """Local deployments make their own test certificates unless given a --tls-dir."""
    if not insecure and tls_dir is None:
        tls_dir = workdir / "certs"
        if not (tls_dir / "ca.crt").exists():
            make_certs(tls_dir)
    return Security(tls_dir=tls_dir, insecure=insecure, auth=auth)


def deployment_config(cfg: dict[str, Any], devices_dir: Path, num_devices: int) -> dict[str, Any]:
    """The run config for a deployment: the server reads the catalogue only; no central evaluation."""
    return {**cfg, "catalogue": str((devices_dir / CATALOGUE_DIR).resolve()), "deploy-devices": num_devices,
            "central-eval": False, "deterministic-devices": False, "data-store": ""}


def run_local(cfg: dict[str, Any], devices_dir: Path, num_devices: int, workdir: Path, security: Security,
              on_poll: Callable[[], None] | None = None, log: Callable[[str], None] = print,
              run_path: Path | None = None) -> str | None:
    """Start everything, run to the end, stop everything (also if we are killed: see ProcessGroup);
    returns Flower's verdict on the run."""
    with LocalDeployment(workdir, devices_dir, security, run_path=run_path) as deployment:
        deployment.start_superlink()
        log(f"privrec: SuperLink on {deployment.address} "
            f"({'insecure' if security.insecure else 'TLS'}{', node authentication' if security.auth else ''}); "
            f"logs in {deployment.processes.log_dir}")
        for index in range(num_devices):
            if security.auth:
                deployment.register(deployment.device(index))
            deployment.start_node(index)
        log(f"privrec: {num_devices} SuperNodes started (PIDs "
            f"{', '.join(str(p) for n, p in deployment.processes.pids().items() if n.startswith('node-'))})")
        deployment.submit(deployment_config(cfg, devices_dir, num_devices))
        deployment.wait(on_poll=on_poll, timeout=max(600.0, cfg["num-rounds"] * cfg["round-timeout"] * 2))
        return deployment.flower_status()
