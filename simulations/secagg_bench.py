"""Bytes and wall time of one training round with and without secure aggregation (issue 14).

In process (no Ray, no network): the real `server.secagg` driver and `client.secagg` mod, around a stub
device whose training is one vector addition, so the figures are the protocol's overhead alone (the
framework's serialization of every message included, as Flower would send it). Bytes are the
serialized records of every instruction and reply of the round.

    PYTHONPATH=. python simulations/secagg_bench.py --devices 16 64 256 --params 53000 --out bench.json

With `--train`, the devices are the real ClientApp (`client.app`) training the default SASRec for one
local epoch on the first N devices of ML-100K (on-device DP off unless `--dp`: cheaper device work makes
the ratio larger, so the figure is the conservative one), and both rounds start from the same initial
model; the ratios then weigh the protocol against real device work. Results go to
simulations/results/secagg-bench-*.json and .md.

    PYTHONPATH=. python -m simulations.secagg_bench --train --devices 16 64 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secagg import secagg_mod
from server.secagg import secure_sum
from shared.secagg import params_from_config
from simulations.inprocess import InProcessGrid, instruction
from simulations.output import log_progress, save_results, timestamped


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


def train_setup(threshold: int, dp: bool, state_dir: str):
    """The real ClientApp on ML-100K: (app, run config, initial model, the round's config record)."""
    import torch

    from client.app import app
    from shared import config
    from shared.data.store import open_store, prepare_store
    from shared.model import ModelConfig, SASRec

    torch.set_num_threads(1)
    store = prepare_store("ml-100k")
    cfg = config.validate({"data-store": str(store), "dp": dp, "local-epochs": 1, "user-dp": False,
                           "secagg-threshold": threshold, "secagg-min-cohort": threshold})
    torch.manual_seed(0)
    model = SASRec(ModelConfig(num_items=open_store(store).num_items, hidden_size=cfg["hidden-size"],
                               num_heads=cfg["num-heads"], num_blocks=cfg["num-blocks"], max_len=cfg["max-len"],
                               dropout=cfg["dropout"]))
    arrays = ArrayRecord(model.state_dict())
    record = {"server-round": 1, "data-store": str(store), "state-dir": state_dir}
    return app, cfg, arrays, record


def one_round(devices: int, num_params: int, secure: bool, threshold: int, train: tuple | None = None) -> dict:
    if train is None:
        cfg = {"device-trains": "all", "user-dp": False, "secagg-threshold": threshold, "secagg-clip-range": 1.0,
               "secagg-quantization-bits": 16, "secagg-min-cohort": threshold}
        app, arrays, record = stub_app(), ArrayRecord({"w": Array(np.zeros(num_params, np.float32))}), \
            {"server-round": 1}
    else:
        app, cfg, arrays, record = train
        cfg = {**cfg, "secagg-threshold": threshold, "secagg-min-cohort": threshold}
    grid = InProcessGrid(app, devices, keep_messages=True, run_config=cfg)
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(record)})
    messages = [instruction(content, n, "train") for n in grid.get_node_ids()]
    started, cpu_started = time.perf_counter(), time.process_time()
    if secure:
        result = secure_sum(grid, messages, params_from_config(cfg))
        assert result.devices == devices
    else:
        replies = grid.send_and_receive(messages)
        _ = {k: sum(r.content.array_records["arrays"][k].numpy().astype(np.float64) for r in replies)
             for k in arrays}
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    sent = sum(record_bytes(m.content) for m in grid.delivered)
    received = sum(record_bytes(r.content) for r in grid.replies)
    # CPU seconds of this one-thread process: on a shared machine, less disturbed than wall time by others' load.
    return {"devices": devices, "secure": secure, "seconds": round(seconds, 3), "cpu-seconds": round(cpu_seconds, 3),
            "bytes-down": sent,
            "bytes-up": received}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--params", type=int, default=53000, help="coordinates per update")
    parser.add_argument("--threshold", type=int, default=8)
    parser.add_argument("--train", action="store_true", help="real ClientApp training on ML-100K devices")
    parser.add_argument("--dp", action="store_true", help="with --train: on-device DP-SGD on")
    parser.add_argument("--repeats", type=int, default=1, help="plain/secure pairs per size; medians reported")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    stem = timestamped("secagg-bench")
    if args.train:  # imports, store, first torch calls: paid once, before any timed round
        with tempfile.TemporaryDirectory() as warm_dir:
            one_round(2, args.params, False, 2, train_setup(2, args.dp, warm_dir))
    else:  # the upload stage reads the trainable scope from shared.model (torch): import it untimed
        import shared.model  # noqa: F401
    for n in args.devices:
        pairs = []
        for _ in range(args.repeats):  # alternating, so a burst of load on the machine hits both arms alike
            with tempfile.TemporaryDirectory() as plain_dir, tempfile.TemporaryDirectory() as secure_dir:
                log_progress(f"{n} devices")
                pairs.append((one_round(n, args.params, False, args.threshold,
                                        train_setup(args.threshold, args.dp, plain_dir) if args.train else None),
                              one_round(n, args.params, True, min(args.threshold, n),
                                        train_setup(min(args.threshold, n), args.dp, secure_dir)
                                        if args.train else None)))
        plain, secure = ({**runs[0], **{k: round(statistics.median(r[k] for r in runs), 3)
                                        for k in ("seconds", "cpu-seconds")}} for runs in zip(*pairs))
        ratio = {"bytes-ratio": round((secure["bytes-up"] + secure["bytes-down"])
                                      / (plain["bytes-up"] + plain["bytes-down"]), 3),
                 "time-ratio": round(secure["seconds"] / plain["seconds"], 2),
                 "cpu-ratio": round(secure["cpu-seconds"] / plain["cpu-seconds"], 2),
                 # each pair ran back to back, under about the same load: its own ratio is the steadier figure
                 "time-ratio-pairs": [round(s["seconds"] / p["seconds"], 2) for p, s in pairs],
                 "cpu-ratio-pairs": [round(s["cpu-seconds"] / p["cpu-seconds"], 2) for p, s in pairs]}
        rows += [plain, {**secure, **ratio}]
        print(json.dumps(plain), "\n" + json.dumps({**secure, **ratio}), flush=True)
        if args.train:  # after every size: a long sweep cut short keeps what it measured
            save_report(stem, args, rows)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)


def save_report(stem, args, rows: list[dict]) -> None:
    report = "\n".join([
        "# Secure aggregation overhead per round, real device training (ML-100K, default SASRec, 1 epoch, "
        f"on-device DP {'on' if args.dp else 'off'}, threshold {args.threshold}, 16 bits)", "",
        f"Medians of {args.repeats} alternating plain/secure rounds; wall and CPU seconds of the whole round "
        "(all devices and the server, one after the other in one process).", "",
        "| devices | bytes plain | bytes secure | bytes ratio | s plain | s secure | time ratio | CPU s plain | "
        "CPU s secure | CPU ratio | time ratio per pair | CPU ratio per pair |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {p['devices']} | {p['bytes-up'] + p['bytes-down']} | {s['bytes-up'] + s['bytes-down']} | "
          f"{s['bytes-ratio']} | {p['seconds']} | {s['seconds']} | {s['time-ratio']} | {p['cpu-seconds']} | "
          f"{s['cpu-seconds']} | {s['cpu-ratio']} | {', '.join(map(str, s.get('time-ratio-pairs', [])))} | "
          f"{', '.join(map(str, s.get('cpu-ratio-pairs', [])))} |"
          for p, s in zip(rows[::2], rows[1::2])],
        "", "Ratios of the medians; then each plain/secure pair's own ratio (back to back, under about the same "
        "load from the machine's other users).", "",
        "Targets at 64 devices: bytes ratio <= 2, time ratio <= 1.5."])
    save_results(stem, {"settings": vars(args), "rows": rows}, report)


if __name__ == "__main__":
    main()
