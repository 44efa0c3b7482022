"""Device trainings per second with user-level DP, against devices per simulated Flower node (issue 15).

    python -m simulations.scale_bench                                  # ML-100K, devices-per-node 1 64 256
    python -m simulations.scale_bench --store DIR --devices-per-round 1000   # e.g. a `privrec data synth` store

Every arm runs the same federation through the real Flower simulation (`flwr run`, Ray, 2 CPUs, one
per simulated node): user-level DP (DP-FedAvg, Poisson cohorts of expected size --devices-per-round),
no on-device DP-SGD, one local epoch, dropout 0 (so a node may vectorise its devices' rounds,
client/batched.py; --dropout > 0 makes every node train its devices one by one). The end-to-end rate
counts devices trained over the steady rounds' wall time (rounds 2 .. R-1: round 1 pays Ray's start,
the last one the final evaluation).

Pure compute, measured in the same run on this process's one thread and multiplied by the CPUs the
simulation gets (the ideal with no framework at all):
- one device alone: `client.device.train_round` back to back (today's per-device work);
- devices on a node: the ClientApp called in-process with one node message listing a cohort's worth of
  devices (the work a node does: ledgers, vectorised training, clipping and summing), no Flower runtime;
  and, for comparison in the same run, the same with the node path before the one-step round
  (`client.batched.train_batched` for every round; --no-compare-previous skips it).
The Flower engine's overhead for an arm is ideal / end-to-end - 1 against the matching pure compute. Pure
compute is also given by this process's CPU time, which the load of a shared machine moves much less.

Per round, from the ServerApp's log (server/round_clock.py): the seconds of each server phase (cohort
sampling and messages, Flower's send_and_receive where Ray and the nodes work, aggregation, the run
records) and the bytes of run records written; a projection to --projected-rounds rounds fits the run
records' seconds against the devices seen so far. The peak memory of every process of the run, and per
process at that peak. The CPU time of the run's processes over the steady rounds (from /proc, cut at the
ServerApp's round ends), by group (the nodes, the ServerApp with the simulation engine, the SuperLink,
Ray's own), per device trained against the pure compute's CPU time per device: the engine's overhead by
CPU time, which a shared machine's load moves much less than the wall-clock figures.

Writes simulations/results/scale-bench-<time>.json and .md and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import tempfile
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from shared import config
from shared.data.store import open_store, prepare_store
from simulations.output import log_progress, save_results, timestamped


def arm_config(store_dir: Path, run_root: Path, devices_per_node: int, args) -> dict:
    return config.validate({
        "data-store": str(store_dir), "dp": False, "user-dp": True, "user-noise-multiplier": 1.0,
        "user-clipping-norm": 0.5, "local-epochs": 1, "dropout": args.dropout,
        "devices-per-round": args.devices_per_round, "num-rounds": args.rounds, "eval-every": 0,
        "central-eval": False, "fraction-evaluate": 0.01, "devices-per-node": devices_per_node,
        "run-dir": str(run_root), "run-name": f"k{devices_per_node}",
        "population-dir": str(run_root / f"population-k{devices_per_node}")})  # fresh simulated people per arm


def tree_rss_mib(root: int) -> float:
    """Resident memory of process `root` and all its descendants (read from /proc), in MiB."""
    return sum(tree_rss_by_process(root).values())


def _process_name(pid: int) -> str:
    """What a process is: Ray's retitled workers (`ray::ClientAppActor`), else its command's program and module."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split()[0]
    program = Path(words[0]).name
    if program.startswith("python") and len(words) > 1:
        script = words[2] if words[1] == "-m" and len(words) > 2 else Path(words[1]).name
        return f"{program} {script}"
    return program


def tree_rss_by_process(root: int) -> dict[str, float]:
    """Resident memory (MiB) of process `root` and all its descendants, per process (`name pid`)."""
    return {name: rss for name, (rss, _) in tree_processes(root).items()}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_processes(root: int) -> dict[str, tuple[float, float]]:
    """(resident MiB, CPU seconds so far: user + system) of process `root` and its descendants, per process."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    out = {}
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        out[f"{_process_name(pid)} {pid}"] = (kib / 1024, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return out


def end_to_end(store_dir: Path, devices_per_node: int, args) -> dict:
    from tools.launch import run_simulation

    run_root = Path(tempfile.mkdtemp(prefix="privrec-scale-"))
    cfg = arm_config(store_dir, run_root, devices_per_node, args)
    peak: list = [0.0, {}, 0.0]
    # (Unix time, CPU seconds so far per process id); by pid, since Ray retitles a worker as it goes
    # (`ray::ClientAppActor`, `ray::ClientAppActor.run` while it runs a message, `ray::IDLE`)
    cpu_samples: list[tuple[float, dict[str, float]]] = []
    last_cpu: dict[str, float] = {}
    titles: dict[str, set[str]] = {}  # pid -> every name it was seen with

    def sample_memory() -> None:  # every second while the run lasts: the launcher, SuperLink, Ray, apps
        both = tree_processes(os.getpid())
        by_pid = {}
        for key, (_, cpu) in both.items():
            name, pid = key.rsplit(" ", 1)
            if pid != str(os.getpid()):
                by_pid[pid] = cpu
                titles.setdefault(pid, set()).add(name)
        cpu_samples.append((time.time(), by_pid))
        last_cpu.update(by_pid)  # a process's CPU seconds as last seen (the run's end removes them)
        processes = {k: rss for k, (rss, _) in both.items()}
        if sum(processes.values()) > peak[0]:
            peak[:2] = [sum(processes.values()), processes]
        # the run's own processes: not this benchmark's, which holds its pure-compute measures
        peak[2] = max(peak[2], sum(v for k, v in processes.items() if not k.endswith(f" {os.getpid()}")))

    started = time.perf_counter()
    result = run_simulation(cfg, open_store(store_dir).num_devices, run_root / cfg["run-name"],
                            on_poll=sample_memory)
    wall = time.perf_counter() - started
    if result.flower_status != "finished:completed":
        raise RuntimeError(f"devices-per-node {devices_per_node}: simulation {result.flower_status}; see {run_root}")
    rows = [json.loads(line) for line in (run_root / cfg["run-name"] / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if 2 <= r["round"] < args.rounds]
    devices = sum(r["devices-trained"] for r in steady)
    seconds = sum(r["seconds"] for r in steady)
    server_rounds = server_seconds(run_root / cfg["run-name"] / "flower.log")
    population = Path(cfg["population-dir"])
    files = [p for p in population.rglob("*") if p.is_file()]
    run_files = [p for p in (run_root / cfg["run-name"]).rglob("*") if p.is_file()]
    return {"devices_per_node": devices_per_node, "steady_rounds": len(steady), "devices_trained": devices,
            "seconds": seconds, "devices_per_s": devices / seconds, "wall_s": wall,
            "devices_per_round": [r["devices-trained"] for r in rows if r["round"] > 0],
            "peak_rss_mib_all_processes": peak[0], "peak_rss_mib_run_processes": peak[2],
            "peak_rss_mib_by_process": dict(sorted(((k, round(v)) for k, v in peak[1].items()), key=lambda kv: -kv[1])),
            "population_files": len(files),
            "population_bytes": sum(p.stat().st_size for p in files), "run_record_files": len(run_files),
            "run_record_bytes": sum(p.stat().st_size for p in run_files), "server_rounds": server_rounds,
            "projection": projection(server_rounds, store_dir, args),
            "cpu_s_by_process": {f"{' / '.join(sorted(titles[pid]))} {pid}": round(v, 2)
                                 for pid, v in sorted(last_cpu.items(), key=lambda kv: -kv[1])},
            "steady_cpu": steady_cpu(cpu_samples, server_rounds, args.rounds, titles)}


def _cpu_at(samples: list[tuple[float, dict[str, float]]], when: float) -> dict[str, float]:
    """Each process's CPU seconds at time `when`, linear between the samples around it (a process not yet
    started counts 0; one gone keeps its last value)."""
    before = [s for s in samples if s[0] <= when]
    after = [s for s in samples if s[0] > when]
    if not before or not after:
        return (before or after)[-1 if before else 0][1]
    (t0, a), (t1, b) = before[-1], after[0]
    share = (when - t0) / (t1 - t0)
    return {k: a.get(k, 0.0) + share * (b.get(k, a.get(k, 0.0)) - a.get(k, 0.0)) for k in set(a) | set(b)}


def _process_group(names: set[str]) -> str:
    """A process's group from every name it had (a Ray worker that ran the ClientApp was also `ray::IDLE`)."""
    if any(name.startswith("ray::ClientAppActor") for name in names):
        return "nodes (Ray workers running the ClientApp)"
    if any("flwr-simulation" in name for name in names):
        return "ServerApp and simulation engine (flwr-simulation)"
    if any("superlink" in name for name in names):
        return "SuperLink"
    return "Ray and the rest (raylet, GCS, launcher, ...)"


def steady_cpu(samples: list[tuple[float, dict[str, float]]], rows: list[dict], rounds: int,
               titles: dict[str, set[str]]) -> dict | None:
    """CPU seconds of the run's processes over the steady rounds (from the end of round 1 to the end of round
    R-1, the ServerApp's `at` times), by group of processes: what the rates by CPU time are computed from."""
    at = {row["round"]: row.get("at") for row in rows}
    start, end = at.get(1), at.get(rounds - 1)
    if start is None or end is None or len(samples) < 2 or end <= start:
        return None
    first, last = _cpu_at(samples, start), _cpu_at(samples, end)
    groups: dict[str, float] = {}
    for name, cpu in last.items():
        group = _process_group(titles.get(name, {name}))
        groups[group] = groups.get(group, 0.0) + cpu - first.get(name, 0.0)
    server_cpu = sum(row.get("cpu", 0.0) for row in rows if 2 <= row["round"] < rounds)
    return {"seconds": end - start, "cpu_s_by_group": {k: round(v, 3) for k, v in groups.items()},
            "cpu_s_all": round(sum(groups.values()), 3), "serverapp_process_cpu_s": round(server_cpu, 3),
            "samples": sum(1 for t, _ in samples if start <= t <= end)}


SERVER_LINE = re.compile(r"privrec: round (\d+) server seconds (\{.*\})")


def server_seconds(log_path: Path) -> list[dict]:
    """The ServerApp's per-round line (server/round_clock.py): seconds per phase and record bytes."""
    rows = []
    for line in log_path.read_text(errors="replace").splitlines():
        match = SERVER_LINE.search(line)
        if match:
            rows.append({"round": int(match.group(1)), **json.loads(match.group(2))})
    return rows


def non_training(row: dict) -> float:
    """A round's server wall time outside Flower's send_and_receive (where Ray and the nodes work)."""
    return row["wall"] - row.get("send-and-receive", 0.0)


RECORD_PHASES = ("metrics", "privacy-record", "checkpoint", "model")  # the run records a round writes


def projection(rows: list[dict], store_dir: Path, args) -> dict | None:
    """`projected-rounds` rounds from the measured ones. The run records' seconds as a + b D(r), fitted over
    rounds 1..R, D(r) = N (1 - (1 - q)^r) the devices that have trained by round r (what the records hold);
    the rest of the non-training time and send_and_receive at their medians over the steady rounds. Whatever
    grows on the nodes (their ledgers' in-memory mirrors) is not in it: 5 rounds do not show it."""
    steady = [r for r in rows if 2 <= r["round"] < args.rounds]
    trained = [r for r in rows if r["round"] >= 1]
    if len(steady) < 1 or len(trained) < 2:
        return None
    n = open_store(store_dir).num_devices
    q = args.devices_per_round / n

    def distinct(r: int) -> float:
        return n * (1 - (1 - q) ** r)

    def records(row: dict) -> float:
        return sum(row.get(p, 0.0) for p in RECORD_PHASES)

    slope, intercept = np.polyfit([distinct(r["round"]) for r in trained], [records(r) for r in trained], 1)
    train = float(np.median([r["send-and-receive"] for r in steady]))
    rest = float(np.median([non_training(r) - records(r) for r in steady]))
    total_rounds = args.projected_rounds
    record_s = [max(0.0, intercept + slope * distinct(r)) for r in range(1, total_rounds + 1)]
    return {"rounds": total_rounds, "send_and_receive_s_per_round": train, "other_non_training_s_per_round": rest,
            "record_s_fixed": float(intercept), "record_s_per_device_seen": float(slope),
            "record_s_last_round": record_s[-1], "total_record_s": float(sum(record_s)),
            "total_non_training_s": float(sum(record_s) + rest * total_rounds),
            "total_s": float((train + rest) * total_rounds + sum(record_s))}


def pure_one_device(store_dir: Path, args) -> tuple[float, float]:
    """Devices per second of `train_round` back to back, one thread, no framework (by wall, by CPU time)."""
    from client.device import load_device, train_round
    from shared.model import model_for

    torch.set_num_threads(1)
    store = open_store(store_dir)
    cfg = arm_config(store_dir, Path(tempfile.mkdtemp(prefix="privrec-scale-pure-")), 1, args)
    state = model_for(cfg, store.num_items).state_dict()
    sample = np.random.default_rng(0).choice(store.num_devices, size=min(args.pure_devices, store.num_devices),
                                             replace=False)
    ledgers = Path(cfg["population-dir"])
    data, num_items = load_device(store_dir, store.num_devices - 1)  # warm-up (imports), untimed
    train_round(data, num_items, state, cfg, ledgers / "warm-up" / "ledger.json", "warm-up", "bench", 1)
    start, cpu = time.perf_counter(), time.process_time()
    for device in sample:
        data, num_items = load_device(store_dir, int(device))
        train_round(data, num_items, state, cfg, ledgers / f"device-{device}" / "ledger.json", str(device),
                    "bench", 1)
    return len(sample) / (time.perf_counter() - start), len(sample) / (time.process_time() - cpu)


def pure_node(store_dir: Path, devices_per_node: int, args, previous: bool = False) -> tuple[float, float]:
    """Devices per second of one node message listing a cohort's share of a node's devices, in-process:
    (by wall time, by this process's CPU time). `previous`: every round through the several-epoch path
    (`client.batched.train_batched`: a copy of the weights per device), as nodes trained before the one-step
    path (`client.batched.train_one_epoch`), for a comparison within one run."""
    from unittest import mock

    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from client.app import app as client_app
    from shared.device_nodes import NODE_DEVICES, device_node_id
    from shared.model import model_for
    from simulations.inprocess import instruction, node_context

    torch.set_num_threads(1)
    store = open_store(store_dir)
    cfg = arm_config(store_dir, Path(tempfile.mkdtemp(prefix="privrec-scale-pure-")), devices_per_node, args)
    state = model_for(cfg, store.num_items).state_dict()
    rate = args.devices_per_round / store.num_devices
    rng = np.random.default_rng(0)

    def node_round(devices: list[int], server_round: int = 2) -> tuple[float, float]:
        content = RecordDict({
            "arrays": ArrayRecord(state),
            "config": ConfigRecord({"data-store": str(store_dir), "state-dir": cfg["population-dir"],
                                    "run-id": "bench", "server-round": server_round}),
            NODE_DEVICES: ConfigRecord({"devices": devices, "ids": [device_node_id(d) for d in devices]})})
        context = node_context(1, {"partition-id": 0, "num-partitions": 1}, cfg)
        start, cpu = time.perf_counter(), time.process_time()
        with ExitStack() as patches:
            if previous:  # the rule before: one batch per epoch and dropout 0 vectorised, through train_batched
                patches.enter_context(mock.patch("client.node.one_epoch", lambda model, cfg: False))
                patches.enter_context(mock.patch("client.node.vectorisable", lambda run, mu, n: (
                    not run.device.dp and mu == 0 and run.model.dropout == 0 and 1 <= n <= run.device.batch_size)))
            client_app(instruction(content, 1, "train"), context)
        return time.perf_counter() - start, time.process_time() - cpu

    heaviest = max(range(min(200, store.num_devices)), key=lambda d: sum(map(len, store.device(d).train)))
    # untimed: imports, the first pass, the first optimizer of a device trained alone (the heaviest)
    node_round([store.num_devices - 2, store.num_devices - 1, heaviest], server_round=1)
    done, seconds, cpu_seconds = 0, 0.0, 0.0
    for block in range(0, min(store.num_devices, max(args.pure_devices, devices_per_node)), devices_per_node):
        devices = [d for d in range(block, min(block + devices_per_node, store.num_devices)) if rng.random() < rate]
        if devices:
            wall, cpu = node_round(devices)
            seconds, cpu_seconds, done = seconds + wall, cpu_seconds + cpu, done + len(devices)
    return done / seconds, done / cpu_seconds


def markdown(results: dict) -> str:
    cpus = results["cpus"]
    lines = [f"# Device trainings per second, user-level DP ({results['started']}, {results['machine']})", "",
             f"{results['dataset']}: {results['devices']} devices, expected cohort {results['devices_per_round']} "
             f"(Poisson, user-level DP), one local epoch, dropout {results['dropout']}, no on-device DP-SGD, "
             f"{results['rounds']} rounds (steady rounds 2..{results['rounds'] - 1} timed), Ray workers at niceness "
             f"{results.get('ray_worker_niceness', 15)}. Load average at the start: {results['load_average']}.", "",
             "| devices per node | Flower nodes | end to end (devices/s) | x devices-per-node 1 | "
             "pure compute, ideal on 2 CPUs (devices/s) | Flower engine overhead | "
             "pure compute by CPU time, ideal on 2 CPUs |", "|---|---|---|---|---|---|---|"]
    base = next((a["devices_per_s"] for a in results["arms"] if a["devices_per_node"] == 1), None)
    for arm in results["arms"]:
        pure = arm["pure_devices_per_s_one_cpu"] * cpus
        versus_one = f"{arm['devices_per_s'] / base:.2f}" if base else "-"
        lines.append(f"| {arm['devices_per_node']} | {arm['nodes']} | {arm['devices_per_s']:.1f} | "
                     f"{versus_one} | {pure:.1f} | {pure / arm['devices_per_s'] - 1:+.0%} | "
                     f"{arm['pure_cpu_devices_per_s_one_cpu'] * cpus:.1f} |")
    previous = [a for a in results["arms"] if "previous_devices_per_s_one_cpu" in a]
    if previous:
        lines += ["", "Pure compute of a node, this run, against the node path before the one-step round (every "
                  "round through `client.batched.train_batched`: a copy of the weights and Adam moments per device, "
                  "vmap over devices of equal window count), ideal on 2 CPUs:", "",
                  "| devices per node | one-step path, wall (devices/s) | before, wall | speed-up, wall | "
                  "one-step path, CPU time | before, CPU time | speed-up, CPU time |", "|---|---|---|---|---|---|---|"]
        for arm in previous:
            now, before = arm["pure_devices_per_s_one_cpu"], arm["previous_devices_per_s_one_cpu"]
            now_cpu, before_cpu = arm["pure_cpu_devices_per_s_one_cpu"], arm["previous_cpu_devices_per_s_one_cpu"]
            lines.append(f"| {arm['devices_per_node']} | {now * cpus:.1f} | {before * cpus:.1f} | {now / before:.2f} | "
                         f"{now_cpu * cpus:.1f} | {before_cpu * cpus:.1f} | {now_cpu / before_cpu:.2f} |")
    lines += ["", "| devices per node | peak memory, all processes (MiB) | devices trained | population files "
              "(ledgers, locks, list) | population MB | run record files | run record MB |",
              "|---|---|---|---|---|---|---|"]
    for arm in results["arms"]:
        lines.append(f"| {arm['devices_per_node']} | {arm['peak_rss_mib_all_processes']:.0f} | "
                     f"{sum(arm['devices_per_round'])} | {arm['population_files']} | "
                     f"{arm['population_bytes'] / 1e6:.1f} | {arm['run_record_files']} | "
                     f"{arm['run_record_bytes'] / 1e6:.1f} |")
    with_cpu = [a for a in results["arms"] if a.get("steady_cpu")]
    if with_cpu:
        lines += ["", "CPU time of the run's processes over the steady rounds (sampled from /proc every second, cut at "
                  "the ServerApp's round ends), per device trained, against the pure compute's CPU time per device "
                  "(the engine's overhead by CPU time: what a machine without other load would see if the run's "
                  "processes never waited for a core):", "",
                  "| devices per node | devices trained | nodes (ms/device) | ServerApp + engine | SuperLink | "
                  "Ray and the rest | all (ms/device) | pure compute (ms/device) | nodes over pure | all over pure |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arm in with_cpu:
            cpu, devices = arm["steady_cpu"], arm["devices_trained"]
            pure_ms = 1000 / arm["pure_cpu_devices_per_s_one_cpu"]

            def ms(group: str, cpu=cpu, devices=devices) -> float:
                return 1000 * sum(v for k, v in cpu["cpu_s_by_group"].items() if k.startswith(group)) / devices

            nodes, everything = ms("nodes"), 1000 * cpu["cpu_s_all"] / devices
            lines.append(f"| {arm['devices_per_node']} | {devices} | {nodes:.2f} | {ms('ServerApp'):.2f} | "
                         f"{ms('SuperLink'):.2f} | {ms('Ray and'):.2f} | {everything:.2f} | {pure_ms:.2f} | "
                         f"{nodes / pure_ms - 1:+.0%} | {everything / pure_ms - 1:+.0%} |")
    for arm in results["arms"]:
        top = ", ".join(f"{name} {mib}" for name, mib in list(arm.get("peak_rss_mib_by_process", {}).items())[:10])
        lines += ["", f"At the memory peak, devices-per-node {arm['devices_per_node']}, MiB per process (largest "
                  f"first; this benchmark's own process holds its pure-compute measures): {top}. Peak of the "
                  f"run's processes alone: {arm.get('peak_rss_mib_run_processes', 0):.0f} MiB."]
    phases = ("configure-train", "send-and-receive", "aggregate-train", "metrics", "privacy-record",
              "checkpoint", "model", "other", "cpu")
    for arm in results["arms"]:
        lines += ["", f"Server seconds per round, devices-per-node {arm['devices_per_node']} (ServerApp log, "
                  "server/round_clock.py; send-and-receive is Ray, the SuperLink and the nodes' work):", "",
                  "| round | wall | " + " | ".join(phases) + " | non-training | record bytes |",
                  "|---" * (len(phases) + 5) + "|"]
        for row in arm.get("server_rounds", []):
            lines.append(f"| {row['round']} | {row['wall']:.2f} | "
                         + " | ".join(f"{row.get(p, 0.0):.2f}" for p in phases)
                         + f" | {non_training(row):.2f} | {row.get('record-bytes', 0):,} |")
        if arm.get("projection"):
            p = arm["projection"]
            lines += ["", f"Projection to {p['rounds']} rounds (medians of the steady rounds; the run records fitted "
                      f"against the devices seen): send-and-receive {p['send_and_receive_s_per_round']:.1f} s/round, "
                      f"other non-training {p['other_non_training_s_per_round']:.2f} s/round, run records "
                      f"{p['record_s_fixed']:.3f} s + {p['record_s_per_device_seen'] * 1e6:.2f} us per device seen "
                      f"({p['record_s_last_round']:.2f} s in round {p['rounds']}, {p['total_record_s'] / 60:.1f} min "
                      f"in all); total {p['total_s'] / 60:.1f} min, of which non-training "
                      f"{p['total_non_training_s'] / 60:.1f} min. Not in it: costs that grow on the nodes."]
    lines += ["", f"Pure compute of one device alone (`train_round`, one thread): "
              f"{results['pure_one_device_per_s']:.1f} devices/s, ideal {results['pure_one_device_per_s'] * cpus:.1f} "
              f"on {cpus} CPUs (by CPU time {results['pure_one_device_cpu_per_s'] * cpus:.1f}); peak RSS of this "
              f"process {results['peak_rss_mib']:.0f} MiB. The machine is shared: wall-clock rates fall with its load, "
              "CPU-time rates much less; ratios within one run are the comparable figures.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="a prepared device store (default: ML-100K)")
    parser.add_argument("--devices-per-node", nargs="+", type=int, default=[1, 64, 256])
    parser.add_argument("--devices-per-round", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--projected-rounds", type=int, default=100, help="rounds the projection is made for")
    parser.add_argument("--pure-devices", type=int, default=256, help="devices timed for pure compute")
    parser.add_argument("--no-compare-previous", dest="compare_previous", action="store_false",
                        help="skip timing the node path before the one-step round (train_batched for every round)")
    parser.add_argument("--ray-worker-niceness", type=int, default=0,
                        help="niceness of Ray's worker processes (Ray's own default is 15; the pure compute runs at "
                             "this process's, 0): on a shared machine niceness 15 hands the nodes' cores to every "
                             "other job")
    args = parser.parse_args()
    # Read by the raylet that `flwr run` starts (the launch passes this environment down)
    os.environ["RAY_worker_niceness"] = str(args.ray_worker_niceness)
    warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap's SDPA fallback
    store_dir = Path(args.store) if args.store else prepare_store("ml-100k")
    store = open_store(store_dir)
    cpus = os.cpu_count() or 1
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "machine": f"{cpus} CPUs, torch {torch.__version__}", "cpus": cpus,
                     "load_average": [round(x, 1) for x in os.getloadavg()],
                     "dataset": store.meta.get("dataset", str(store_dir)), "devices": store.num_devices,
                     "devices_per_round": args.devices_per_round, "rounds": args.rounds, "dropout": args.dropout,
                     "ray_worker_niceness": args.ray_worker_niceness, "arms": []}
    log_progress("pure compute, one device alone")
    results["pure_one_device_per_s"], results["pure_one_device_cpu_per_s"] = pure_one_device(store_dir, args)
    for k in args.devices_per_node:
        log_progress(f"devices-per-node {k}: pure compute of a node")
        arm = {}
        if k == 1:
            pure, pure_cpu = results["pure_one_device_per_s"], results["pure_one_device_cpu_per_s"]
        else:
            pure, pure_cpu = pure_node(store_dir, k, args)
            if args.compare_previous:
                log_progress(f"devices-per-node {k}: pure compute of a node, the path before the one-step round")
                previous, previous_cpu = pure_node(store_dir, k, args, previous=True)
                arm.update(previous_devices_per_s_one_cpu=previous, previous_cpu_devices_per_s_one_cpu=previous_cpu)
        log_progress(f"devices-per-node {k}: Flower simulation")
        arm.update(end_to_end(store_dir, k, args))
        arm.update(nodes=-(-store.num_devices // k), pure_devices_per_s_one_cpu=pure,
                   pure_cpu_devices_per_s_one_cpu=pure_cpu)
        results["arms"].append(arm)
        log_progress(f"devices-per-node {k}: {arm['devices_per_s']:.1f} devices/s end to end, "
                     f"pure {pure * cpus:.1f} on {cpus} CPUs")
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    save_results(timestamped("scale-bench"), results, markdown(results))


if __name__ == "__main__":
    main()
