"""CPU time of a simulated node's message with the node state it carries late in a large run, before / now.

    python -m simulations.node_state_bench --store DIR [--hosted 25000] [--rate 0.01] [--mirrors 0 8000 16000]

Flower's simulation engine keeps each node's `Context` in the ServerApp's process and pickles it to the
Ray worker that runs the message and back with the reply. A node keeps an in-memory copy of the ledger of
every device it ever trained in `context.state` (client/node.py), so what crosses Ray grows with the devices
a node has trained: at 100,000 devices, 25,000 per node and 1,000 a round, about 16,000 per node by round 100.
Here one node message (the devices of a `--hosted` block sampled at `--rate`, as a Poisson cohort samples
them) goes through that path in-process: the engine pickles the context (`ray.cloudpickle`, protocol 5, as
Ray pickles a task's arguments), the worker unpickles it, the ClientApp runs (ledgers, training, clipping,
summing; one thread), the worker pickles the reply and the context, the engine unpickles them. The context
starts with `--mirrors` ledger copies of devices outside the message (each a copy of a real ledger written
in the warm-up). "before" stores one record per device (the node's state until this change: patched back
in), "now" one record for all of them; the two alternate message by message in one process. Reports the
CPU seconds per device of the whole path and of the four transport steps alone.
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from shared.data.store import open_store, prepare_store
from simulations.output import log_progress, save_results, timestamped
from simulations.scale_bench import arm_config

BEFORE_PREFIX = "privacy-ledger:"  # the previous layout: one context.state record per device


class _PerDeviceRecords:
    """The node's mirrors as they were stored before: a context.state record per device (patched in for 'before')."""

    def __init__(self, context):
        self.context = context

    def get(self, device: str) -> str | None:
        record = self.context.state.get(BEFORE_PREFIX + device)
        return None if record is None else str(record["json"])

    def __setitem__(self, device: str, text: str) -> None:
        from flwr.app import ConfigRecord

        self.context.state[BEFORE_PREFIX + device] = ConfigRecord({"json": text})

    def __bool__(self) -> bool:
        return False  # `_keep_mirrors` has nothing to add: every record was written as it changed


def _fill(context, arm: str, ledgers: dict[str, str]) -> None:
    from flwr.app import ConfigRecord

    if arm == "before":
        for device, text in ledgers.items():
            context.state[BEFORE_PREFIX + device] = ConfigRecord({"json": text})
    elif ledgers:
        context.state["privacy-ledgers"] = ConfigRecord({"devices": list(ledgers), "json": list(ledgers.values())})


def run(store_dir: Path, hosted: int, rate: float, mirrors: list[int], messages: int) -> dict:
    import ray.cloudpickle as cloudpickle
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    import client.node
    from client.app import app as client_app
    from shared.device_nodes import NODE_DEVICES, device_node_id
    from shared.model import model_for
    from simulations.inprocess import instruction, node_context

    torch.set_num_threads(1)
    store = open_store(store_dir)
    hosted = min(hosted, store.num_devices)
    args = argparse.Namespace(dropout=0.0, devices_per_round=max(1, round(rate * store.num_devices)), rounds=2)
    configs = {arm: arm_config(store_dir, Path(tempfile.mkdtemp(prefix=f"privrec-node-state-{arm}-")), hosted, args)
               for arm in ("before", "now")}
    torch.manual_seed(0)
    state = model_for(configs["now"], store.num_items).state_dict()
    rng = np.random.default_rng(0)

    def message(cfg, devices: list[int], server_round: int):
        content = RecordDict({
            "arrays": ArrayRecord(state),
            "config": ConfigRecord({"data-store": str(store_dir), "state-dir": cfg["population-dir"],
                                    "run-id": "bench", "server-round": server_round}),
            NODE_DEVICES: ConfigRecord({"devices": devices, "ids": [device_node_id(d) for d in devices]})})
        return instruction(content, 1, "train", round_=server_round)

    def one(arm: str, held: bytes, devices: list[int], server_round: int) -> tuple[bytes, float, float]:
        """The node's context as the engine holds it between messages (pickled here, so that one arm's live
        objects never slow the other's garbage collection) through one message: (the context after it, CPU
        seconds of the whole path, of its four pickling steps alone)."""
        patches = [mock.patch("client.node._mirrors", _PerDeviceRecords)] if arm == "before" else []
        for patch in patches:
            patch.start()
        try:
            context = pickle.loads(held)  # untimed: the engine's live copy
            start = time.process_time()
            sent = cloudpickle.dumps((message(configs[arm], devices, server_round), context), protocol=5)
            del context
            msg, worker_context = pickle.loads(sent)
            transport = time.process_time() - start
            reply = client_app(msg, worker_context)
            middle = time.process_time()
            back = cloudpickle.dumps((reply, worker_context), protocol=5)
            del worker_context
            reply, updated = pickle.loads(back)
            end = time.process_time()
        finally:
            for patch in patches:
                patch.stop()
        assert not reply.has_error(), reply.error.reason
        return cloudpickle.dumps(updated, protocol=5), end - start, transport + end - middle

    # warm-up (untimed): imports, the first pass; one real ledger to copy into the mirrors
    warm = one("now", pickle.dumps(node_context(1, {"partition-id": 0, "num-partitions": 1}, configs["now"])),
               [hosted - 2, hosted - 1], 1)[0]
    sample = json.loads(client.node._mirrors(pickle.loads(warm))[str(hosted - 1)])
    results = {}
    for count in mirrors:
        ledgers = {}
        for device in range(hosted, hosted + count):  # devices outside the messages' block: never listed
            sample["device"] = str(device)
            ledgers[str(device)] = json.dumps(sample)
        contexts = {}
        for arm in ("before", "now"):
            context = node_context(1, {"partition-id": 0, "num-partitions": 1}, configs[arm])
            _fill(context, arm, ledgers)
            contexts[arm] = pickle.dumps(context, protocol=5)
            del context
        figures = {arm: {"cpu_per_device_ms": [], "transport_per_device_ms": []} for arm in contexts}
        for position in range(messages):
            devices = [d for d in range(hosted) if rng.random() < rate]
            for arm in ("before", "now") if position % 2 else ("now", "before"):
                contexts[arm], cpu, transport = one(arm, contexts[arm], devices, 2 + position)
                figures[arm]["cpu_per_device_ms"].append(1000 * cpu / len(devices))
                figures[arm]["transport_per_device_ms"].append(1000 * transport / len(devices))
        results[str(count)] = figures
        before, now = (float(np.median(figures[a]["cpu_per_device_ms"])) for a in ("before", "now"))
        log_progress(f"{count} mirrors: before {before:.2f} ms/device, now {now:.2f}, before / now {before / now:.2f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="a prepared device store (default: ML-100K)")
    parser.add_argument("--hosted", type=int, default=25000, help="devices the node hosts")
    parser.add_argument("--rate", type=float, default=0.01, help="each hosted device's chance to be in the message")
    parser.add_argument("--mirrors", type=int, nargs="+", default=[0, 8000, 16000],
                        help="ledger copies the node's state holds when the timed messages start")
    parser.add_argument("--messages", type=int, default=6, help="timed messages per arm and mirror count")
    args = parser.parse_args()
    store_dir = Path(args.store) if args.store else prepare_store("ml-100k")
    stem = timestamped("node-state")
    figures = run(store_dir, args.hosted, args.rate, args.mirrors, args.messages)
    lines = [f"# CPU time of a node message with its state carried through the engine's pickling ({stem.name})", "",
             f"Store {store_dir.name}, a node hosting {args.hosted} devices, each in the message with chance "
             f"{args.rate}; one thread, in-process; {args.messages} messages per arm, alternated.", "",
             "| mirrors in the state | before: ms CPU per device (median) | now | before / now | "
             "pickling alone: before | now |", "|---|---|---|---|---|---|"]
    for count, arms in figures.items():
        b, n = (float(np.median(arms[a]["cpu_per_device_ms"])) for a in ("before", "now"))
        tb, tn = (float(np.median(arms[a]["transport_per_device_ms"])) for a in ("before", "now"))
        lines.append(f"| {count} | {b:.2f} | {n:.2f} | {b / n:.2f} | {tb:.2f} | {tn:.2f} |")
    save_results(stem, {"store": str(store_dir), **vars(args), "figures": figures}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
