"""How many rounds does federated training need? Test NDCG@10 of the global model vs rounds.

    python -m simulations.convergence --rounds 120 --every 20 --seeds 0 1 --set dp=false --set local-epochs=5

Runs the in-process federation (same ServerApp/ClientApp code as `privrec simulate`, no Ray) with
central evaluation of the global model every `--every` rounds (simulation only: it reads every
user's held-out items), one process per seed. Writes simulations/results/convergence-<time>.json
and prints the curve next to the centralized reference given with --centralized.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from shared import config
from shared.atomic import write_json_atomic
from shared.data.store import open_store, prepare_store
from simulations.output import timestamped


def curve(task: tuple) -> dict:
    import torch

    from client.app import app as client_app
    from server.app import FederatedRun
    from server.run_dir import RunDirectory
    from simulations.inprocess import InProcessGrid

    seed, overrides, rounds, every = task
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    store_dir = prepare_store("ml-100k")
    run_root = Path(tempfile.mkdtemp(prefix="privrec-curve-"))
    cfg = config.validate({**overrides, "seed": seed, "num-rounds": rounds, "eval-every": every,
                           "fraction-evaluate": 0.001, "central-eval": True, "data-store": str(store_dir),
                           "run-dir": str(run_root), "run-name": "curve", "deterministic-devices": True,
                           "population-dir": str(run_root / "population")})  # fresh simulated people per curve
    run_dir = RunDirectory.create(cfg["run-dir"], cfg["run-name"])
    FederatedRun(cfg, run_dir, InProcessGrid(client_app, open_store(store_dir).num_devices, run_config=cfg)).execute()
    rows = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    return {"seed": seed, "points": [{"round": r["round"], "ndcg@10": r["central"]["test-ndcg@10"],
                                      "hr@10": r["central"]["test-hr@10"]} for r in rows if "central" in r]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=120)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--centralized", type=float, default=None, help="centralized NDCG@10 to compare with")
    args = parser.parse_args()
    overrides = dict(pair.split("=", 1) for pair in args.set)
    config.validate(overrides)  # fail fast on a typo
    tasks = [(seed, overrides, args.rounds, args.every) for seed in args.seeds]
    with ProcessPoolExecutor(max_workers=len(tasks), mp_context=get_context("spawn")) as pool:
        curves = list(pool.map(curve, tasks))
    result = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": overrides, "rounds": args.rounds,
              "centralized_ndcg@10": args.centralized, "curves": curves}
    out = timestamped("convergence").with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    rounds = [p["round"] for p in curves[0]["points"]]
    print("| round | " + " | ".join(f"NDCG@10 seed {c['seed']}" for c in curves) + " | mean / centralized |")
    print("|---|" + "---|" * (len(curves) + 1))
    for i, r in enumerate(rounds):
        values = [c["points"][i]["ndcg@10"] for c in curves]
        ratio = f"{sum(values) / len(values) / args.centralized:.2f}" if args.centralized else "-"
        print(f"| {r} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {ratio} |")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
