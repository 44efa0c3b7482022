"""CPU time of one simulated node's train message, the dispatch of today against the one before, in one run.

    python -m simulations.node_message_bench [--devices 236] [--rounds 3] [--dropout 0 0.2]

The ClientApp is called in-process on one thread (`client.app`, ledgers included), on ML-100K (the
`scale_bench` arm's config: user-level DP, one local epoch, no on-device DP), with one message listing
`--devices` consecutive devices. "before" patches the node's dispatch back to its previous rule: only
devices of one batch and dropout 0 in the vectorised pass (`client.batched`), every other device
trained alone with `train_local`; "now" is the code as it is (devices of several batches and dropout
vectorised too). The two alternate message by message, each on its own population directory, so both
see the same machine load; the ratio is of CPU time (`time.process_time`), the comparable figure on a
shared machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from shared.data.store import open_store, prepare_store
from simulations.output import log_progress, save_results, timestamped
from simulations.scale_bench import arm_config


def _before(run, proximal_mu: float, num_windows: int) -> bool:
    return (not run.device.dp and proximal_mu == 0 and run.model.dropout == 0
            and 1 <= num_windows <= run.device.batch_size)


def node_seconds(store_dir: Path, devices: list[int], dropout: float, rounds: int) -> dict[str, list[float]]:
    """CPU seconds of each message, per dispatch, alternating before / now (round 1 untimed for both)."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from client.app import app as client_app
    from shared.device_nodes import NODE_DEVICES, device_node_id
    from shared.model import model_for
    from simulations.inprocess import instruction, node_context

    torch.set_num_threads(1)
    store = open_store(store_dir)
    args = argparse.Namespace(dropout=dropout, devices_per_round=len(devices), rounds=rounds + 1)
    configs = {arm: arm_config(store_dir, Path(tempfile.mkdtemp(prefix=f"privrec-node-{arm}-")), len(devices), args)
               for arm in ("before", "now")}
    torch.manual_seed(0)
    state = model_for(configs["now"], store.num_items).state_dict()
    seconds: dict[str, list[float]] = {"before": [], "now": []}
    for server_round in range(1, rounds + 2):
        for arm in ("before", "now") if server_round % 2 else ("now", "before"):
            cfg = configs[arm]
            content = RecordDict({
                "arrays": ArrayRecord(state),
                "config": ConfigRecord({"data-store": str(store_dir), "state-dir": cfg["population-dir"],
                                        "run-id": "bench", "server-round": server_round}),
                NODE_DEVICES: ConfigRecord({"devices": devices, "ids": [device_node_id(d) for d in devices]})})
            context = node_context(1, {"partition-id": 0, "num-partitions": 1}, cfg)
            with ExitStack() as patches:
                if arm == "before":
                    patches.enter_context(mock.patch("client.node.vectorisable", _before))
                cpu = time.process_time()
                client_app(instruction(content, 1, "train"), context)
                if server_round > 1:
                    seconds[arm].append(time.process_time() - cpu)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=236, help="devices the node message lists")
    parser.add_argument("--rounds", type=int, default=3, help="timed messages per dispatch and dropout")
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.2])
    parser.add_argument("--store", help="a prepared device store (default: ML-100K)")
    args = parser.parse_args()
    store_dir = Path(args.store) if args.store else prepare_store("ml-100k")
    store = open_store(store_dir)
    devices = list(range(min(args.devices, store.num_devices)))
    stem = timestamped("node-message")
    results = {"store": str(store_dir), "devices": len(devices), "rounds": args.rounds, "dropouts": {}}
    lines = [f"# CPU time of one node message of {len(devices)} devices ({stem.name}, one thread, in-process)", "",
             "| dropout | before: CPU s per message (median, all) | now | before / now |", "|---|---|---|---|"]
    for dropout in args.dropout:
        seconds = node_seconds(store_dir, devices, dropout, args.rounds)
        before, now = float(np.median(seconds["before"])), float(np.median(seconds["now"]))
        results["dropouts"][str(dropout)] = {**seconds, "ratio": before / now}
        lines.append(f"| {dropout} | {before:.2f} ({', '.join(f'{s:.2f}' for s in seconds['before'])}) | "
                     f"{now:.2f} ({', '.join(f'{s:.2f}' for s in seconds['now'])}) | {before / now:.2f} |")
        log_progress(lines[-1])
    save_results(stem, results, "\n".join(lines))


if __name__ == "__main__":
    main()
