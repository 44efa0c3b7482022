"""Item representations on MovieLens-100K: ID embeddings vs all-MiniLM-L6-v2 text features vs both.

    python -m simulations.text_items                          # defaults below (about 30 min on 2 cores)
    python -m simulations.text_items --parts cost             # params, bytes per round, step times only

For each `item-representation` (id, text, text+id):

cost:      trainable parameters; bytes of the weights a device receives and sends per round (the
           ArrayRecord's arrays; the frozen text table is not among them: devices build it from the
           public catalogue); median time of one local step, plain Adam and DP-SGD (Opacus hooks), one
           thread, a batch of `batch-size` real windows.
accuracy:  the same in-process federation as simulations/benchmark.py (real ServerApp and ClientApp
           code, no Ray), without DP and with on-device DP-SGD at one noise multiplier for every
           option (so the same sampling, steps and therefore the same epsilon), with the cold-start
           protocol on (`cold-item-share`, default 0.1): test HR@10 / NDCG@10 over all users, and HR@10
           on test events whose target is a held-out (cold) item. Central evaluation of the final global
           model (simulation only).

Writes simulations/results/text-items-<time>.json and .md, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shared import config
from shared.data.store import open_store, prepare_store
from simulations.output import log_progress, median_seconds, save_results, timestamped

OPTIONS = ("id", "text", "text+id")


def _model(cfg: dict, store_dir: Path):
    """A freshly initialised global model for `cfg` (text features from the cache)."""
    from shared.model import model_for
    from shared.text.features import features_for

    features = features_for(cfg, store_dir)
    torch.manual_seed(cfg["seed"])
    return model_for(cfg, open_store(store_dir).num_items, features)


def bench_cost(cfg: dict, store_dir: Path, repeats: int = 20) -> dict:
    from flwr.app import ArrayRecord
    from opacus import PrivacyEngine

    from client.device import training_windows
    from shared.training import split_windows

    torch.set_num_threads(1)
    store = open_store(store_dir)
    windows = np.concatenate([training_windows(store.device(d), cfg["window"]) for d in range(20)])
    inputs, targets = split_windows(windows[: cfg["batch-size"]])
    out = {}
    for option in OPTIONS:
        run_cfg = {**cfg, "item-representation": option}
        model = _model(run_cfg, store_dir)
        record = ArrayRecord(model.state_dict())
        row = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "bytes_per_round_each_way": sum(len(a.data) for a in record.values()),
               "frozen_text_table_bytes": int(model.item_text.numel() * 4) if option != "id" else 0}
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        row["plain_step_s"] = median_seconds(lambda m=model, o=opt: _step(m, o, inputs, targets), repeats, warmup=3)
        dp_model = _model(run_cfg, store_dir)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=len(inputs))
        gsm, dp_opt, _ = PrivacyEngine(accountant="rdp").make_private(
            module=dp_model, optimizer=torch.optim.Adam(dp_model.parameters(), lr=1e-3), data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="hooks")
        row["dp_step_s"] = median_seconds(lambda m=gsm, o=dp_opt: _step(m, o, inputs, targets), repeats, warmup=3)
        out[option] = row
        log_progress(f"cost {option}: {row}")
    return {"batch": int(inputs.shape[0]), "window": cfg["window"], "num_items": store.num_items, "options": out}


def _step(model, optimizer, inputs, targets) -> None:
    from shared.training import sequence_loss

    optimizer.zero_grad()
    sequence_loss(model(inputs), targets).backward()
    optimizer.step()


def federated_run(cfg: dict, store_dir: Path, overrides: dict) -> dict:
    from client.app import app as client_app
    from server.app import FederatedRun
    from server.run_dir import RunDirectory
    from simulations.inprocess import InProcessGrid

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_root = Path(tempfile.mkdtemp(prefix="privrec-text-"))
    run_cfg = config.validate({**cfg, **overrides, "data-store": str(store_dir), "eval-every": 0,
                               "central-eval": True, "fraction-evaluate": 0.01, "run-dir": str(run_root),
                               "run-name": "acc", "deterministic-devices": True,
                               "population-dir": str(run_root / "population")})  # fresh simulated people per arm
    run_dir = RunDirectory.create(run_cfg["run-dir"], run_cfg["run-name"])
    started = time.perf_counter()
    grid = InProcessGrid(client_app, open_store(store_dir).num_devices, run_config=run_cfg)
    FederatedRun(run_cfg, run_dir, grid).execute()
    summary = json.loads((run_dir.path / "summary.json").read_text())
    central = summary["central-evaluation"]
    result = {key: central.get(f"test-{key}") for key in
              ("ndcg@10", "hr@10", "users", "cold-hr@10", "cold-ndcg@10", "cold-users", "cold-hr@10-ci",
               "warm-hr@10", "warm-ndcg@10")}
    result.update(epsilon_max=summary["privacy"].get("all-epsilon-max"),
                  epsilon_median=summary["privacy"].get("all-epsilon-median"),
                  seconds=time.perf_counter() - started, run_dir=str(run_dir.path))
    return result


def _accuracy_task(task: tuple) -> tuple[str, bool, dict]:
    option, dp, cfg, store_dir, settings = task
    result = federated_run(cfg, store_dir, {**settings, "item-representation": option, "dp": dp})
    log_progress(f"{option} dp={dp}: NDCG@10 {result['ndcg@10']:.4f} HR@10 {result['hr@10']:.4f} "
         f"cold HR@10 {result['cold-hr@10']:.4f} ({result['cold-users']} events) eps {result['epsilon_max']} "
         f"{result['seconds']:.0f} s")
    return option, dp, result


def bench_accuracy(cfg: dict, store_dir: Path, settings: dict, jobs: int) -> dict:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    # Encode the catalogue once, before the workers start (they then all hit the cache).
    from shared.text.features import store_text_features

    store_text_features(store_dir)
    tasks = [(option, dp, cfg, store_dir, settings) for dp in (True, False) for option in OPTIONS]
    runs: dict = {option: {} for option in OPTIONS}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for option, dp, result in pool.map(_accuracy_task, tasks):
            runs[option]["dp" if dp else "no-dp"] = result
    for row in runs.values():
        row["dp-loss-ndcg@10"] = row["no-dp"]["ndcg@10"] - row["dp"]["ndcg@10"]
        row["dp-loss-hr@10"] = row["no-dp"]["hr@10"] - row["dp"]["hr@10"]
    return {"settings": settings, "runs": runs}


def markdown(results: dict) -> str:
    lines = [f"# item representations on {results['dataset']} ({results['started']}, {results['machine']})", ""]
    if "cost" in results:
        c = results["cost"]
        lines += [f"## cost (one thread; batch of {c['batch']} windows of {c['window']}, {c['num_items']} items)", "",
                  "| option | trainable params | bytes per round (each way) | plain step ms | DP-SGD step ms (hooks) |",
                  "|---|---|---|---|---|"]
        for option, row in c["options"].items():
            lines.append(f"| {option} | {row['trainable_params']:,} | {row['bytes_per_round_each_way']:,} | "
                         f"{row['plain_step_s'] * 1e3:.1f} | {row['dp_step_s'] * 1e3:.1f} |")
        lines.append("")
    if "accuracy" in results:
        a = results["accuracy"]
        lines += [f"## accuracy ({a['settings']}, seed {results['config']['seed']})", "",
                  "| option | DP | NDCG@10 | HR@10 | cold-item HR@10 (events) | warm HR@10 | epsilon max (median) |",
                  "|---|---|---|---|---|---|---|"]
        for option, row in a["runs"].items():
            for arm in ("no-dp", "dp"):
                r = row[arm]
                eps = f"{r['epsilon_max']:.2f} ({r['epsilon_median']:.2f})" if r["epsilon_max"] else "-"
                lines.append(f"| {option} | {'yes' if arm == 'dp' else 'no'} | {r['ndcg@10']:.4f} | {r['hr@10']:.4f} | "
                             f"{r['cold-hr@10']:.4f} ({r['cold-users']}) | {r['warm-hr@10']:.4f} | {eps} |")
        lines += ["", "| option | DP loss NDCG@10 | DP loss HR@10 |", "|---|---|---|"]
        for option, row in a["runs"].items():
            lines.append(f"| {option} | {row['dp-loss-ndcg@10']:.4f} | {row['dp-loss-hr@10']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["cost", "accuracy"], choices=["cost", "accuracy"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices-per-round", type=int, default=64)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--noise", type=float, default=2.0, help="DP noise multiplier, the same for every option")
    parser.add_argument("--cold-item-share", type=float, default=0.1)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = config.validate(dict(pair.split("=", 1) for pair in args.set))
    store_dir = prepare_store(cfg["dataset"], cfg["users-per-device"])
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "dataset": cfg["dataset"],
                     "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "config": cfg}
    if "cost" in args.parts:
        results["cost"] = bench_cost(cfg, store_dir)
    if "accuracy" in args.parts:
        settings = {"num-rounds": args.rounds, "devices-per-round": args.devices_per_round,
                    "local-epochs": args.local_epochs, "noise-multiplier": args.noise,
                    "cold-item-share": args.cold_item_share}
        log_progress(f"accuracy: {settings}")
        results["accuracy"] = bench_accuracy(cfg, store_dir, settings, args.jobs)
    save_results(timestamped("text-items"), results, markdown(results))


if __name__ == "__main__":
    main()
