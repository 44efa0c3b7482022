"""Privacy-utility trade-off on MovieLens-100K: NDCG@10 / HR@10 against epsilon, per mechanism.

    python -m simulations.privacy_sweep --epsilons 1 2 4 8 --rounds 30 --seeds 0 \
        --references simulations/results/benchmark-20261123-124139.json

For every target epsilon and mechanism the noise is calibrated with Opacus' accountant
(`shared.privacy.calibration`) before training, and the per-device cap (`max-epsilon`) makes the
target a hard bound:

* on-device DP-SGD (window-level): noise for a device that joins `--joins` rounds of
  local-epochs x ceil(1 / q) steps at q = sample-rate (the same for every device, whatever its
  window count); devices sampled more often decline once the next round would pass the target.
* user-level DP-FedAvg: noise for `--rounds` releases at q = devices-per-round / devices.
* both: each mechanism at the target, for its own unit.

Every arm uses the same levers (`--set` overrides them), reported with the table. Reference arms:
the same federation without DP, the model after pretraining only (when `public-share` > 0),
plain FedAvg without pretraining and DP, centralized SASRec and popularity. Writes
simulations/results/privacy-sweep-<time>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from shared import config
from shared.data.store import open_store, prepare_store
from shared.privacy.calibration import calibrate_noise
from shared.training import dp_steps_per_epoch
from simulations.output import log_progress, save_results, timestamped

MECHANISMS = ("on-device", "user-level", "both")
# The levers chosen by the exploration in the README ("Privacy-utility trade-off").
LEVERS = {"public-share": 0.1, "device-trains": "no-item-tables", "local-epochs": 1, "devices-per-round": 64}


def arm_settings(mechanism: str, epsilon: float, cfg: dict, num_devices: int, rounds: int, joins: int) -> dict:
    """Config overrides that hold `mechanism` to `epsilon` (at cfg's delta and accountant)."""
    out: dict = {"dp": False, "user-dp": False}
    if mechanism in ("on-device", "both"):
        # Every device's round is the same: local-epochs x ceil(1 / sample-rate) steps at q = sample-rate.
        steps = joins * cfg["local-epochs"] * dp_steps_per_epoch(cfg["sample-rate"])
        z = calibrate_noise(epsilon, cfg["delta"], cfg["sample-rate"], steps, cfg["accountant"])
        out.update({"dp": True, "noise-multiplier": round(z, 4), "max-epsilon": epsilon})
    if mechanism in ("user-level", "both"):
        q = cfg["devices-per-round"] / num_devices
        z = calibrate_noise(epsilon, cfg["delta"], q, rounds, cfg["accountant"])
        out.update({"user-dp": True, "user-noise-multiplier": round(z, 4)})
    return out


def _task(task: tuple) -> tuple[str, dict]:
    import torch

    from simulations.benchmark import centralized_run, federated_run

    name, seed, cfg, store_dir, overrides = task
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    started = time.perf_counter()
    if name == "centralized":
        result = centralized_run(cfg, store_dir, seed, epochs=30)
    elif name == "pretraining only":
        result = pretraining_only(cfg, store_dir, seed)
    else:
        result = federated_run(cfg, store_dir, {**overrides, "seed": seed})
    result["seconds"] = time.perf_counter() - started
    log_progress(f"{name} seed {seed}: NDCG@10 {result['ndcg@10']:.4f} HR@10 {result['hr@10']:.4f} "
                 f"eps {result.get('epsilon_max')} user-eps {result.get('user_level_epsilon')}")
    return name, {**result, "seed": seed, "overrides": overrides}


def pretraining_only(cfg: dict, store_dir: Path, seed: int) -> dict:
    """The global model before any private round: trained on the consenting cohort only."""
    from server.pretraining import pretrain
    from shared.metrics import eval_inputs, evaluate_histories, summarize
    from shared.model import ModelConfig

    store = open_store(store_dir)
    run_cfg = config.validate({**cfg, "seed": seed})
    model, _ = pretrain(run_cfg, store, ModelConfig.from_run_config(run_cfg, store.num_items))
    users = store.all_users()
    inputs, targets, exclude = eval_inputs(users.train, users.valid, users.test, "test")
    summary = summarize(evaluate_histories(model, inputs, targets, exclude), seed=seed)
    return {"ndcg@10": summary["ndcg@10"], "hr@10": summary["hr@10"]}


def plan(args, cfg: dict, num_devices: int) -> list[tuple[str, dict]]:
    arms = [("no DP", {"dp": False}), ("pretraining only", {}),
            ("FedAvg, no DP, no levers", {"dp": False, "public-share": 0.0, "device-trains": "all"})]
    if cfg["public-share"] == 0:
        arms.pop(1)
    for mechanism in args.mechanisms:
        for eps in args.epsilons:
            arms.append((f"{mechanism} eps {eps:g}", arm_settings(mechanism, eps, cfg, num_devices, args.rounds,
                                                                  args.joins)))
    if args.centralized:
        arms.append(("centralized", {}))
    return arms


def markdown(result: dict) -> str:
    lines = ["| arm | NDCG@10 | HR@10 | on-device epsilon, max (median) | user-level epsilon | capped devices |",
             "|---|---|---|---|---|---|"]
    for name, runs in result["arms"].items():
        r = runs[0] if len(runs) == 1 else _mean(runs)
        dev = "-" if r.get("epsilon_max") is None else f"{r['epsilon_max']:.2f} ({r['epsilon_median']:.2f})"
        user = "-" if r.get("user_level_epsilon") is None else f"{r['user_level_epsilon']:.2f}"
        lines.append(f"| {name} | {r['ndcg@10']:.4f} | {r['hr@10']:.4f} | {dev} | {user} | "
                     f"{r.get('capped_devices', 0) or 0} |")
    pop = result["popularity"]
    lines.append(f"| popularity | {pop['ndcg@10']:.4f} | {pop['hr@10']:.4f} | - | - | - |")
    for name, values in result.get("references", {}).items():
        lines.append(f"| {name} | {values['ndcg@10']:.4f} | {values['hr@10']:.4f} | - | - | - |")
    return "\n".join(lines)


def _mean(runs: list[dict]) -> dict:
    keys = ("ndcg@10", "hr@10", "epsilon_max", "epsilon_median", "user_level_epsilon", "capped_devices")
    return {k: (sum(r[k] for r in runs) / len(runs) if all(r.get(k) is not None for r in runs) else None)
            for k in keys}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("ndcg@10", "hr@10")):
        for mechanism, marker in zip(MECHANISMS, "osD"):
            points = sorted((float(n.rsplit(" ", 1)[1]), _mean(runs)[metric])
                            for n, runs in result["arms"].items() if n.startswith(mechanism + " eps"))
            if points:
                ax.plot(*zip(*points), marker=marker, label=f"{mechanism} DP")
        refs = [("no DP", "-"), ("pretraining only", ":"), ("FedAvg, no DP, no levers", "-."), ("centralized", "--")]
        for name, style in refs:
            if name in result["arms"]:
                ax.axhline(_mean(result["arms"][name])[metric], linestyle=style, color="grey", label=name)
        for (name, values), color in zip(result.get("references", {}).items(), ("black", "purple")):
            ax.axhline(values[metric], linestyle="--", color=color, label=name)
        ax.axhline(result["popularity"][metric], linestyle="--", color="red", label="popularity")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"target epsilon (delta {result['delta']:g}, {result['accountant'].upper()})")
        ax.set_ylabel(f"test {metric.upper()}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("privrec on MovieLens-100K: accuracy vs privacy budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1, 2, 4, 8])
    parser.add_argument("--mechanisms", nargs="+", choices=MECHANISMS, default=list(MECHANISMS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--joins", type=int, default=4, help="rounds a typical device may join within its budget")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--centralized", action="store_true", help="also train the centralized reference")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a lever")
    parser.add_argument("--references", metavar="BENCHMARK.json",
                        help="draw the centralized and non-private FedAvg means of a simulations.benchmark result")
    parser.add_argument("--replot", metavar="SWEEP.json", help="redraw an earlier sweep's table and plot, no training")
    args = parser.parse_args()
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        if args.references:
            result["references"] = benchmark_references(Path(args.references))
        stem = Path(args.replot).with_suffix("")
        write_outputs(result, stem)
        return
    store_dir = prepare_store("ml-100k")
    store = open_store(store_dir)
    base = config.validate({**LEVERS, **dict(pair.split("=", 1) for pair in args.set), "num-rounds": args.rounds})
    arms = plan(args, base, store.num_devices)
    tasks = [(name, seed, base, store_dir, overrides) for seed in args.seeds for name, overrides in arms]
    result = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": args.rounds, "seeds": args.seeds,
              "joins": args.joins, "delta": base["delta"], "accountant": base["accountant"],
              "levers": {k: base[k] for k in ("public-share", "device-trains", "local-optimizer", "local-epochs",
                                              "local-lr", "devices-per-round", "batch-size", "window",
                                              "user-clipping-norm", "max-grad-norm", "strategy")},
              "arms": {name: [] for name, _ in arms}}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for name, run in pool.map(_task, tasks):
            result["arms"][name].append(run)
    from shared.baselines import evaluate_popularity
    from shared.metrics import summarize

    users = store.all_users()
    pop = summarize(evaluate_popularity(users.train, users.valid, users.test, store.num_items, split="test"))
    result["popularity"] = {"ndcg@10": pop["ndcg@10"], "hr@10": pop["hr@10"]}
    if args.references:
        result["references"] = benchmark_references(Path(args.references))
    write_outputs(result, timestamped("privacy-sweep"))


def benchmark_references(path: Path) -> dict:
    arms = json.loads(path.read_text())["accuracy"]["arms"]
    label = {"centralized": "centralized (benchmark)",
             "fedavg-no-dp": "FedAvg, no DP, 40 rounds x 5 epochs (benchmark)"}
    return {label[k]: {"ndcg@10": arms[k]["ndcg@10_mean"], "hr@10": arms[k]["hr@10_mean"]} for k in label}


def write_outputs(result: dict, stem: Path) -> None:
    save_results(stem, result, markdown(result))
    plot(result, stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
