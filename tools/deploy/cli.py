"""`privrec data split` and `privrec deploy ...`: registered into the `privrec` parser by tools/cli.py.

    privrec data split --dataset ml-100k --out DEVICES_DIR [--users-per-device N]
    privrec deploy certs DIR [--host NAME ...]
    privrec deploy key KEYFILE
    privrec deploy superlink (--tls-dir DIR | --insecure) [--auth] [--host H] [--port P] [--database FILE]
    privrec deploy node --data DEVICE_DIR --superlink H:P (--ca-cert FILE | --insecure) [--key KEYFILE]
    privrec deploy local --devices N --rounds R [--tls | --insecure] [--auth] [--dataset ...] [--set K=V]
    privrec deploy run-config --devices-dir DIR --devices N --out FILE [--rounds R] [--set K=V]

`local` and `run-config` resolve the run config as `privrec simulate` does (`shared.config.resolve_run`).

`superlink` and `node` are thin wrappers: they check their inputs, print the Flower command they
run, and replace themselves with it (same PID, Flower's own signal handling).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from shared.errors import PrivrecError
from tools.options import EPSILON_HELP, apply_epsilon, run_config_from_args
from tools.progress import Progress


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _exec(command: list[str]) -> int:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    _say("privrec: exec " + " ".join(command))
    os.execvpe(command[0], command, env)
    return 0  # not reached


# ---------------------------------------------------------------------------- data split
def cmd_data_split(args: argparse.Namespace) -> int:
    from shared.data.devices import split_devices
    from shared.data.split import dataset_notes
    from shared.data.store import open_store, prepare_store

    store = open_store(prepare_store(args.dataset, args.users_per_device))
    for note in dataset_notes(store.meta):
        print(f"privrec: note: {note}", flush=True)
    out = split_devices(store, Path(args.out))
    print(f"{store.num_devices} device folders ({store.num_users} users, {args.users_per_device} per device) "
          f"and the public catalogue in {out}")
    return 0


def add_data_split(data_sub) -> None:
    split = data_sub.add_parser("split", help="one folder per device (its histories only) for a deployment")
    split.add_argument("--dataset", default="ml-100k", help="ml-100k, or a path to a MovieLens/RecBole/CSV file")
    split.add_argument("--out", required=True, help="new folder to receive device-<d>/ folders and catalogue/")
    split.add_argument("--users-per-device", type=int, default=1)
    split.set_defaults(func=cmd_data_split)


# ---------------------------------------------------------------------------- deploy
def cmd_certs(args: argparse.Namespace) -> int:
    from tools.deploy.certs import LOCAL_HOSTS, make_certs

    hosts = tuple(dict.fromkeys([*(args.host or []), *LOCAL_HOSTS]))
    make_certs(Path(args.dir), hosts=hosts)
    print(f"test CA and server certificate for {', '.join(hosts)} in {args.dir} (ca.crt, server.crt, server.key); "
          "for testing only")
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    from tools.deploy.certs import make_node_key

    key, public = make_node_key(Path(args.keyfile))
    print(f"node key {key} (keep it on the device), public key {public} (register it: "
          f"flwr supernode register {public} <connection>)")
    return 0


def _security(args: argparse.Namespace):
    from tools.deploy.processes import INSECURE_WARNING, Security

    tls_dir = Path(args.tls_dir) if getattr(args, "tls_dir", None) else None
    if args.insecure:
        if tls_dir is not None:
            raise PrivrecError("give either --tls-dir or --insecure, not both")
        _say(INSECURE_WARNING)
    return Security(tls_dir=tls_dir, insecure=args.insecure, auth=getattr(args, "auth", False))


def cmd_superlink(args: argparse.Namespace) -> int:
    from tools.deploy.processes import superlink_command

    security = _security(args)
    database = Path(args.database) if args.database else None
    return _exec(superlink_command(security, args.host, args.port, database))


def cmd_node(args: argparse.Namespace) -> int:
    from shared.data.devices import open_device
    from tools.deploy.processes import INSECURE_WARNING, free_port, supernode_command, wait_until_reachable

    device = open_device(args.data)
    if args.insecure and (args.ca_cert or args.key):
        raise PrivrecError("--insecure cannot be combined with --ca-cert or --key (authentication needs TLS)")
    if args.insecure:
        _say(INSECURE_WARNING)
    ca_cert = Path(args.ca_cert).resolve() if args.ca_cert else None
    if ca_cert is not None and not ca_cert.is_file():
        raise PrivrecError(f"--ca-cert {args.ca_cert}: no such file")
    key = Path(args.key).resolve() if args.key else None
    if key is not None:
        from tools.deploy.certs import make_node_key

        if not key.is_file():
            raise PrivrecError(f"--key {args.key}: no such file (make one with `privrec deploy key FILE`)")
        make_node_key(key)  # checks it is an EC key Flower accepts
    wait_until_reachable(args.superlink, log=_say)  # a clear line per attempt, with backoff
    command = supernode_command(args.superlink, device.node_config(), ca_cert, args.insecure, key,
                                args.runtime_port or free_port())
    return _exec(command)


def cmd_local(args: argparse.Namespace) -> int:
    from shared.data.devices import split_devices
    from shared.data.store import open_store, prepare_store
    from tools.deploy.local import prepare_security, run_local
    from tools.deploy.processes import INSECURE_WARNING

    if args.tls and args.insecure:
        raise PrivrecError("give either --tls or --insecure, not both")
    if args.devices < 1:
        raise PrivrecError(f"--devices {args.devices}: must be >= 1")
    cfg = _deployment_run_config(args)
    run_path = Path(cfg["run-dir"]) / cfg["run-name"]
    if (run_path / "summary.json").exists():
        raise PrivrecError(f"{run_path} already holds a completed run; pass another --run-name")
    _check_runnable(cfg, args.devices)
    workdir = run_path / "deploy"
    if args.devices_dir:
        devices_dir = Path(args.devices_dir)
    else:
        devices_dir = run_path / "devices"
        if not devices_dir.exists():
            split_devices(open_store(prepare_store(cfg["dataset"], cfg["users-per-device"])), devices_dir)
    _check_device_count(devices_dir, args.devices)
    if args.insecure:
        _say(INSECURE_WARNING)
    workdir.mkdir(parents=True, exist_ok=True)
    security = prepare_security(workdir, Path(args.tls_dir) if args.tls_dir else None, args.insecure, args.auth)
    # SIGTERM and SIGHUP stop everything as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    print(f"privrec: deployment of {args.devices} devices, {cfg['num-rounds']} rounds, run directory {run_path}",
          flush=True)
    try:
        with Progress(run_path, cfg["num-rounds"]) as progress:
            status = run_local(cfg, devices_dir, args.devices, workdir, security, on_poll=progress.poll,
                               run_path=run_path)
    except KeyboardInterrupt:
        # Every process is stopped by now; the run directory says so (and can be resumed).
        if not (run_path / "summary.json").exists():
            from shared.atomic import write_json_atomic

            write_json_atomic(run_path / "status.json", {"state": "interrupted"})
        raise
    state = _run_state(run_path)
    if status != "finished:completed" or state != "completed":
        raise PrivrecError(f"deployment run did not complete (ServerApp status: {state}; Flower: {status}); "
                           f"see {workdir / 'logs'}")
    print(f"run directory: {run_path}; device ledgers: {devices_dir}/device-*/state/")
    return 0


def cmd_run_config(args: argparse.Namespace) -> int:
    """The run config `privrec deploy local` would submit, as a file for `flwr run --run-config FILE`: a
    deployment started by hand gets the same defaults (`flwr run` alone has pyproject.toml's, the schema's)."""
    from shared.atomic import write_bytes_atomic
    from shared.data.devices import CATALOGUE_DIR
    from tools.deploy.local import deployment_config
    from tools.launch import _toml

    if args.devices < 1:
        raise PrivrecError(f"--devices {args.devices}: must be >= 1")
    devices_dir = Path(args.devices_dir)
    if not (devices_dir / CATALOGUE_DIR).is_dir():
        raise PrivrecError(f"--devices-dir {args.devices_dir}: no {CATALOGUE_DIR}/ folder in it "
                           "(make the folders with `privrec data split`)")
    _check_device_count(devices_dir, args.devices)
    cfg = _deployment_run_config(args)
    _check_runnable(cfg, args.devices)
    cfg = deployment_config(cfg, devices_dir, args.devices)
    write_bytes_atomic(Path(args.out), _toml(cfg).encode("utf-8"))
    print(f"run config ({cfg['model']}, {cfg['num-rounds']} rounds, {args.devices} devices, run "
          f"{Path(cfg['run-dir']) / cfg['run-name']}) in {args.out}; submit it with "
          f"`flwr run . <connection> --stream --run-config {args.out}`")
    return 0


def _deployment_run_config(args: argparse.Namespace) -> dict:
    """The resolved run config of a deployment of `args.devices` devices: an absolute run-dir (the SuperLink's
    working folder is not ours), a fixed run-name (the same name resumes), and `devices-per-round` at most the
    devices, as `privrec simulate` records it."""
    from shared.config import clamp_to_population, default_run_name

    cfg = run_config_from_args(args)  # the same defaults as `privrec simulate`: the private pipeline
    cfg["run-dir"] = str(Path(cfg["run-dir"]).expanduser().resolve())
    cfg["run-name"] = cfg["run-name"] or default_run_name()
    clamped = clamp_to_population(cfg, args.devices)
    if clamped:
        print(f"privrec: note: {clamped}", flush=True)
    apply_epsilon(cfg, args.epsilon, args.devices)
    return cfg


def _check_runnable(cfg: dict, num_devices: int) -> None:
    """Refused before any process starts when it cannot run on `num_devices` devices."""
    from shared.config import SCORER_MODELS, check_secure_aggregation

    if cfg["secure-aggregation"]:  # against the real cohort
        wanted = cfg["devices-per-round"] or round(cfg["fraction-train"] * num_devices)
        check_secure_aggregation(cfg, max(1, min(wanted, num_devices)))
    if cfg["model"] in SCORER_MODELS:  # the pipeline's whole budget (the ServerApp checks it again)
        from shared.privacy.pipeline import check_pipeline_budget, planned_sample_rate

        check_pipeline_budget(cfg, planned_sample_rate(cfg, num_devices))


def _check_device_count(devices_dir: Path, wanted: int) -> None:
    available = len(list(devices_dir.glob("device-*")))
    if wanted > available:
        raise PrivrecError(f"--devices {wanted}: {devices_dir} holds only {available} device folders")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_state(run_path: Path) -> str:
    import json

    try:
        return json.loads((run_path / "status.json").read_text()).get("state", "unknown")
    except (OSError, ValueError):
        return "unknown"


def add_deploy(sub, add_config_flags) -> None:
    deploy = sub.add_parser("deploy", help="real Flower processes: SuperLink, SuperNodes, TLS, node keys")
    cmds = deploy.add_subparsers(dest="deploy_command", required=True)

    certs = cmds.add_parser("certs", help="a test CA and server certificate (for local testing only)")
    certs.add_argument("dir")
    certs.add_argument("--host", action="append", help="extra DNS name or IP the server certificate is valid for")
    certs.set_defaults(func=cmd_certs)

    key = cmds.add_parser("key", help="a device's EC key pair for node authentication (KEYFILE, KEYFILE.pub)")
    key.add_argument("keyfile")
    key.set_defaults(func=cmd_key)

    link = cmds.add_parser("superlink", help="start flower-superlink with privrec's flags")
    link.add_argument("--tls-dir", help="folder with ca.crt, server.crt, server.key")
    link.add_argument("--insecure", action="store_true", help="no TLS (warns; test networks only)")
    link.add_argument("--auth", action="store_true", help="only registered SuperNode keys may join")
    link.add_argument("--host", default="127.0.0.1")
    link.add_argument("--port", type=int, default=9092)
    link.add_argument("--database", help="SQLite file: runs and registered nodes survive a restart")
    link.set_defaults(func=cmd_superlink)

    node = cmds.add_parser("node", help="start flower-supernode for one device folder")
    node.add_argument("--data", required=True, help="DEVICES_DIR/device-<d> from `privrec data split`")
    node.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    node.add_argument("--key", help="this device's private key (OpenSSH EC), for node authentication")
    node.add_argument("--ca-cert", help="CA certificate that signed the SuperLink's (default: system CAs)")
    node.add_argument("--insecure", action="store_true", help="no TLS (warns; test networks only)")
    node.add_argument("--runtime-port", type=int, help="local port for the ClientApp runtime (default: a free one)")
    node.set_defaults(func=cmd_node)

    local = cmds.add_parser("local", help="SuperLink + N SuperNodes + the run, on this machine, in real processes")
    _add_run_flags(local, add_config_flags)
    local.add_argument("--users-per-device", type=int)
    local.add_argument("--devices-dir", help="use these device folders (default: split --dataset into the run dir)")
    local.add_argument("--tls", action="store_true", help="TLS with fresh test certificates (the default)")
    local.add_argument("--tls-dir", help="TLS with these certificates (ca.crt, server.crt, server.key)")
    local.add_argument("--insecure", action="store_true", help="no TLS (warns)")
    local.add_argument("--auth", action="store_true", help="every device gets its own EC key; only those join")
    local.set_defaults(func=cmd_local)

    written = cmds.add_parser("run-config", help="the run config `deploy local` would submit, as a file for "
                                                 "`flwr run --run-config` (a deployment started by hand)")
    _add_run_flags(written, add_config_flags)
    written.add_argument("--devices-dir", required=True, help="the folder `privrec data split` made (its catalogue/ "
                                                              "is what the ServerApp reads)")
    written.add_argument("--out", required=True, help="the TOML file to write")
    written.set_defaults(func=cmd_run_config)


def _add_run_flags(parser: argparse.ArgumentParser, add_config_flags) -> None:
    """The run's flags, the same for `deploy local` and `deploy run-config`."""
    add_config_flags(parser)
    parser.add_argument("--devices", type=int, required=True, help="how many devices take part")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--devices-per-round", type=int)
    parser.add_argument("--noise-multiplier", type=float)
    parser.add_argument("--epsilon", type=float, help=EPSILON_HELP)
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--secure-aggregation", action="store_true",
                        help="SecAgg+: the server unmasks only sums (secagg-* keys via --set)")
    parser.add_argument("--run-dir", help="parent folder of run directories (default runs/)")
    parser.add_argument("--run-name", help="run id; the same run-name resumes from its last checkpoint")
