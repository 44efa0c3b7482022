"""privrec benchmark on MovieLens-100K: step cost of DP, framework overhead, accuracy vs references.

    python -m simulations.benchmark                      # everything, defaults below
    python -m simulations.benchmark --parts steps        # (a) only
    python -m simulations.benchmark --parts accuracy --seeds 0 1 2 --rounds 20 --noise 0.5 1.0 2.0

(a) steps:      median time of one local DP-SGD step over one plain step, same model and batch,
                for each Opacus grad-sample mode (one thread, after warm-up).
(b) throughput: devices trained per second end to end in a Flower/Ray simulation (`flwr run`,
                training rounds only, round 1 excluded as Ray start-up), over the pure local-compute
                rate of the same device updates run back to back in this process, times the number
                of CPUs Ray gets. The ratio minus one is the framework's overhead.
(c) accuracy:   test NDCG@10 / HR@10 after a fixed budget of rounds for FedAvg without DP and with
                DP at several noise multipliers, against `privrec baseline centralized` and
                popularity on the same split; mean and standard deviation over seeds. These runs use
                the in-process federation (simulations/inprocess.py: the same ServerApp and ClientApp
                code, no Ray transport) so that many rounds fit in the time budget.

Writes simulations/results/benchmark-<time>.json and prints a Markdown summary.
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


# ------------------------------------------------------------------------------------- (a)
def bench_steps(cfg: dict, store_dir: Path, repeats: int = 30) -> dict:
    from opacus import PrivacyEngine

    from client.device import training_windows
    from shared.model import model_for
    from shared.training import SequenceLoss, sequence_loss, split_windows

    torch.set_num_threads(1)
    store = open_store(store_dir)
    # A batch the size a device really trains on: `batch-size` windows from real users.
    windows = np.concatenate([training_windows(store.device(d), cfg["window"]) for d in range(20)])
    batch = windows[: cfg["batch-size"]]
    inputs, targets = split_windows(batch)
    results: dict = {"batch": int(batch.shape[0]), "window": cfg["window"], "num_items": store.num_items}

    def timed(step) -> float:
        return median_seconds(step, repeats, warmup=5)

    plain_model = model_for(cfg, store.num_items)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=1e-3)
    results["plain_s"] = timed(lambda: _step(plain_model, plain_opt, sequence_loss, inputs, targets))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets),
                                         batch_size=len(inputs))
    for mode in ("hooks", "ghost"):
        model = model_for(cfg, store.num_items)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        engine = PrivacyEngine(accountant="rdp")
        made = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                   max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode,
                                   **({"criterion": SequenceLoss()} if mode == "ghost" else {}))
        dp_model, dp_opt = made[0], made[1]
        criterion = made[2] if mode == "ghost" else sequence_loss  # ghost: (module, optimizer, criterion, loader)
        results[f"dp_{mode}_s"] = timed(lambda m=dp_model, o=dp_opt, c=criterion: _step(m, o, c, inputs, targets))
        results[f"dp_{mode}_over_plain"] = results[f"dp_{mode}_s"] / results["plain_s"]
    return results


def _step(model, optimizer, criterion, inputs, targets) -> None:
    optimizer.zero_grad()
    criterion(model(inputs), targets).backward()
    optimizer.step()


# ------------------------------------------------------------------------------------- (b)
def bench_throughput(cfg: dict, store_dir: Path, rounds: int, devices_per_round: int) -> dict:
    from client.device import load_device, train_round
    from shared.model import model_for
    from tools.launch import run_simulation

    store = open_store(store_dir)
    run_root = Path(tempfile.mkdtemp(prefix="privrec-bench-"))
    run_cfg = {**cfg, "num-rounds": rounds, "devices-per-round": devices_per_round, "eval-every": 0,
               "central-eval": False, "fraction-evaluate": 0.01, "run-dir": str(run_root), "run-name": "throughput",
               "data-store": str(store_dir), "population-dir": str(run_root / "population")}  # fresh simulated people
    run_cfg = config.validate(run_cfg)
    started = time.perf_counter()
    result = run_simulation(run_cfg, store.num_devices, run_root / "throughput")
    wall = time.perf_counter() - started
    if result.flower_status != "finished:completed":
        raise RuntimeError(f"throughput simulation failed: {result.flower_status}; see {run_root}")
    rows = [json.loads(line) for line in (run_root / "throughput" / "metrics.jsonl").read_text().splitlines()]
    # Rounds 2..R-1: not round 1 (Ray start-up), not the last (it also runs the final evaluation).
    steady = [r for r in rows if 2 <= r["round"] < rounds]
    devices = sum(r["devices-trained"] for r in steady)
    seconds = sum(r["seconds"] for r in steady)
    e2e_rate = devices / seconds

    # The same kind of work with no framework: device updates back to back, one thread.
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    sample = rng.choice(store.num_devices, size=min(64, store.num_devices), replace=False)
    state = model_for(run_cfg, store.num_items).state_dict()
    ledger_dir = Path(tempfile.mkdtemp(prefix="privrec-bench-ledgers-"))
    start = time.perf_counter()
    for device in sample:
        data, num_items = load_device(store_dir, int(device))
        train_round(data, num_items, state, run_cfg, ledger_dir / f"{device}.json", str(device), "bench", 1)
    local_rate_one_cpu = len(sample) / (time.perf_counter() - start)
    cpus = os.cpu_count() or 1
    ideal = local_rate_one_cpu * cpus
    return {"rounds": rounds, "devices_per_round": devices_per_round, "steady_rounds": len(steady),
            "wall_s": wall, "e2e_devices_per_s": e2e_rate, "local_devices_per_s_one_cpu": local_rate_one_cpu,
            "cpus": cpus, "ideal_devices_per_s": ideal, "overhead": ideal / e2e_rate - 1}


# ------------------------------------------------------------------------------------- (c)
def federated_run(cfg: dict, store_dir: Path, overrides: dict) -> dict:
    from client.app import app as client_app
    from server.app import FederatedRun
    from server.run_dir import RunDirectory
    from simulations.inprocess import InProcessGrid

    torch.set_num_threads(1)
    run_root = Path(tempfile.mkdtemp(prefix="privrec-acc-"))
    # Every arm trains fresh simulated people: its own population folder, so no arm inherits another's spend.
    run_cfg = config.validate({**cfg, **overrides, "data-store": str(store_dir), "eval-every": 0,
                               "central-eval": False, "run-dir": str(run_root), "run-name": "acc",
                               "population-dir": str(run_root / "population"), "deterministic-devices": True})
    run_dir = RunDirectory.create(run_cfg["run-dir"], run_cfg["run-name"])
    started = time.perf_counter()
    grid = InProcessGrid(client_app, open_store(store_dir).num_devices, run_config=run_cfg)
    FederatedRun(run_cfg, run_dir, grid).execute()
    summary = json.loads((run_dir.path / "summary.json").read_text())
    fed = summary["federated-evaluation"]
    privacy = summary["privacy"]
    return {"ndcg@10": fed["test-ndcg@10"], "hr@10": fed["test-hr@10"],
            "epsilon_max": privacy.get("all-epsilon-max"), "epsilon_median": privacy.get("all-epsilon-median"),
            "user_level_epsilon": (privacy.get("user-level") or {}).get("epsilon"),
            "capped_devices": privacy.get("capped-devices", 0), "stopped_early": summary.get("stopped-early"),
            "seconds": time.perf_counter() - started}


def centralized_run(cfg: dict, store_dir: Path, seed: int, epochs: int) -> dict:
    from shared.baselines import train_centralized
    from shared.metrics import eval_inputs, evaluate_histories, summarize
    from shared.model import ModelConfig

    torch.set_num_threads(1)
    store = open_store(store_dir)
    users = store.all_users()
    model_cfg = ModelConfig.from_run_config(cfg, store.num_items)
    model = train_centralized(users.train, store.num_items, model_cfg, window=cfg["window"],
                              epochs=epochs, lr=0.001, batch_size=64, seed=seed)
    inputs, targets, exclude = eval_inputs(users.train, users.valid, users.test, "test")
    summary = summarize(evaluate_histories(model, inputs, targets, exclude), seed=seed)
    return {"ndcg@10": summary["ndcg@10"], "hr@10": summary["hr@10"]}


def _accuracy_task(task: tuple) -> tuple[str, int, dict]:
    """One (arm, seed) cell of the accuracy table; runs in its own process, one thread."""
    arm, seed, cfg, store_dir, settings, central_epochs = task
    logging.getLogger("flwr").setLevel(logging.WARNING)
    if arm == "centralized":
        result = centralized_run(cfg, store_dir, seed, central_epochs)
    elif arm == "fedavg-no-dp":
        result = federated_run(cfg, store_dir, {**settings, "seed": seed, "dp": False})
    else:
        z = float(arm.rsplit("-z", 1)[1])
        result = federated_run(cfg, store_dir, {**settings, "seed": seed, "noise-multiplier": z})
    log_progress(f"{arm} seed {seed}: NDCG@10 {result['ndcg@10']:.4f} HR@10 {result['hr@10']:.4f}")
    return arm, seed, result


def bench_accuracy(cfg: dict, store_dir: Path, seeds: list[int], noises: list[float], central_epochs: int,
                   settings: dict, jobs: int) -> dict:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from shared.baselines import evaluate_popularity
    from shared.metrics import summarize

    store = open_store(store_dir)
    users = store.all_users()
    popularity = summarize(evaluate_popularity(users.train, users.valid, users.test, store.num_items, split="test"))
    arm_names = ["centralized", "fedavg-no-dp"] + [f"fedavg-dp-z{z:g}" for z in noises]
    tasks = [(arm, seed, cfg, store_dir, settings, central_epochs) for seed in seeds for arm in arm_names]
    arms: dict[str, list[dict]] = {name: [] for name in arm_names}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for arm, _seed, result in pool.map(_accuracy_task, tasks):
            arms[arm].append(result)
    table = {name: _mean_sd(runs) for name, runs in arms.items()}
    central = table["centralized"]["ndcg@10_mean"]
    for row in table.values():
        row["ndcg@10_vs_centralized"] = row["ndcg@10_mean"] / central if central else None
    return {"settings": settings, "central_epochs": central_epochs, "seeds": seeds,
            "popularity": {"ndcg@10": popularity["ndcg@10"], "hr@10": popularity["hr@10"]},
            "arms": table, "runs": arms}


def _mean_sd(runs: list[dict]) -> dict:
    out = {}
    for key in ("ndcg@10", "hr@10", "epsilon_max", "epsilon_median"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[f"{key}_mean"] = float(np.mean(values))
            out[f"{key}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    out["n"] = len(runs)
    return out


# ------------------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    lines = [f"# privrec benchmark ({results['started']}, {results['machine']})", ""]
    if "steps" in results:
        s = results["steps"]
        lines += ["## (a) local step time (one thread, batch of "
                  f"{s['batch']} windows of {s['window']}, {s['num_items']} items)", "",
                  "| step | median ms | / plain |", "|---|---|---|",
                  f"| plain Adam | {s['plain_s'] * 1e3:.1f} | 1.00 |"]
        for mode in ("hooks", "ghost"):
            lines.append(f"| DP-SGD ({mode}) | {s[f'dp_{mode}_s'] * 1e3:.1f} | {s[f'dp_{mode}_over_plain']:.2f} |")
        lines.append("")
    if "throughput" in results:
        t = results["throughput"]
        lines += ["## (b) end-to-end simulation throughput", "",
                  f"- Flower/Ray simulation: {t['e2e_devices_per_s']:.2f} devices/s "
                  f"({t['devices_per_round']} devices per round, {t['steady_rounds']} steady rounds)",
                  f"- pure local compute: {t['local_devices_per_s_one_cpu']:.2f} devices/s on one CPU, "
                  f"ideal {t['ideal_devices_per_s']:.2f} on {t['cpus']}",
                  f"- framework overhead: {t['overhead'] * 100:.0f}% over pure local compute", ""]
    if "accuracy" in results:
        a = results["accuracy"]
        lines += [f"## (c) test accuracy after {a['settings'].get('num-rounds')} rounds "
                  f"({a['settings']}), seeds {a['seeds']}", "",
                  "| arm | NDCG@10 | HR@10 | / centralized NDCG | epsilon max (delta 1e-5, RDP) |",
                  "|---|---|---|---|---|"]
        for name, row in a["arms"].items():
            eps = f"{row['epsilon_max_mean']:.1f}" if "epsilon_max_mean" in row else "-"
            lines.append(f"| {name} | {row['ndcg@10_mean']:.4f} ± {row['ndcg@10_sd']:.4f} | "
                         f"{row['hr@10_mean']:.4f} ± {row['hr@10_sd']:.4f} | "
                         f"{row['ndcg@10_vs_centralized']:.2f} | {eps} |")
        pop = a["popularity"]
        lines.append(f"| popularity | {pop['ndcg@10']:.4f} | {pop['hr@10']:.4f} | - | - |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["steps", "throughput", "accuracy"],
                        choices=["steps", "throughput", "accuracy"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices-per-round", type=int, default=64)
    parser.add_argument("--local-epochs", type=int, default=None)
    parser.add_argument("--local-lr", type=float, default=None)
    parser.add_argument("--noise", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    parser.add_argument("--central-epochs", type=int, default=30)
    parser.add_argument("--throughput-rounds", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="accuracy runs in parallel (one thread each)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config key, for every arm")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)

    extra = dict(pair.split("=", 1) for pair in args.set)
    cfg = config.validate(extra)
    store_dir = prepare_store(cfg["dataset"], cfg["users-per-device"])
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "config": cfg}
    if "steps" in args.parts:
        log_progress("(a) step times")
        results["steps"] = bench_steps(cfg, store_dir)
    if "throughput" in args.parts:
        log_progress("(b) throughput (Flower + Ray)")
        results["throughput"] = bench_throughput(cfg, store_dir, args.throughput_rounds, args.devices_per_round)
    if "accuracy" in args.parts:
        settings = {"num-rounds": args.rounds, "devices-per-round": args.devices_per_round}
        if args.local_epochs is not None:
            settings["local-epochs"] = args.local_epochs
        if args.local_lr is not None:
            settings["local-lr"] = args.local_lr
        log_progress(f"(c) accuracy: {settings}, seeds {args.seeds}, noise {args.noise}")
        results["accuracy"] = bench_accuracy(cfg, store_dir, args.seeds, args.noise, args.central_epochs,
                                             settings, args.jobs)
    save_results(timestamped("benchmark"), results, markdown(results))


if __name__ == "__main__":
    main()
