"""Bytes and wall time of one training round with and without secure aggregation (issue 14).

In process (no Ray, no network): the real `server.secagg` driver and `client.secagg` mod, around a stub
device whose training is one vector addition, so the figures are the protocol's overhead alone (the
framework's serialization of every message included, as Flower would send it). Bytes are the
serialized records of every instruction and reply of the round.

    PYTHONPATH=. python simulations/secagg_bench.py --devices 16 64 256 --params 53000 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secagg import secagg_mod
from server.secagg import secure_sum
from shared.secagg import params_from_config
from simulations.inprocess import InProcessGrid, instruction


def stub_app() -> ClientApp:
    app = ClientApp()

    @app.train(mods=[secagg_mod])
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        rng = np.random.default_rng(context.node_id)
        trained = {k: Array(a.numpy() + rng.normal(0, 0.01, a.numpy().shape).astype(np.float32))
                   for k, a in arrays.items()}
        return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)

    return app


def record_bytes(content: RecordDict) -> int:
    total = 0
    for record in content.array_records.values():
        total += sum(len(a.data) for a in record.values())
    for record in content.config_records.values():
        for v in record.values():
            items = v if isinstance(v, list) else [v]
            total += sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in items)
    for record in content.metric_records.values():
        total += 8 * len(record)
    return total


def one_round(devices: int, num_params: int, secure: bool, threshold: int) -> dict:
    cfg = {"device-trains": "all", "user-dp": False, "secagg-threshold": threshold, "secagg-clip-range": 1.0,
           "secagg-quantization-bits": 16, "secagg-min-cohort": threshold}
    grid = InProcessGrid(stub_app(), devices, keep_messages=True, run_config=cfg)
    arrays = ArrayRecord({"w": Array(np.zeros(num_params, np.float32))})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    messages = [instruction(content, n, "train") for n in grid.get_node_ids()]
    started = time.perf_counter()
    if secure:
        result = secure_sum(grid, messages, params_from_config(cfg))
        assert result.devices == devices
    else:
        replies = grid.send_and_receive(messages)
        _ = sum(r.content.array_records["arrays"]["w"].numpy().astype(np.float64) for r in replies)
    seconds = time.perf_counter() - started
    sent = sum(record_bytes(m.content) for m in grid.delivered)
    received = sum(record_bytes(r.content) for r in grid.replies)
    return {"devices": devices, "secure": secure, "seconds": round(seconds, 3), "bytes-down": sent,
            "bytes-up": received}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--params", type=int, default=53000, help="coordinates per update")
    parser.add_argument("--threshold", type=int, default=8)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for n in args.devices:
        plain = one_round(n, args.params, False, args.threshold)
        secure = one_round(n, args.params, True, min(args.threshold, n))
        ratio = {"bytes-ratio": round((secure["bytes-up"] + secure["bytes-down"])
                                      / (plain["bytes-up"] + plain["bytes-down"]), 3),
                 "time-ratio": round(secure["seconds"] / plain["seconds"], 2)}
        rows += [plain, {**secure, **ratio}]
        print(json.dumps(plain), "\n" + json.dumps({**secure, **ratio}), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
