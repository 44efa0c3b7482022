"""Federated optimization arms for the NON-private federation (issue 12), in one process per run.

    python -m simulations.fedopt --arms fedavg rows --rounds 60 --seeds 0 --every 20
    python -m simulations.fedopt --arms rows-avgm --rounds 200 --seeds 0 1 2 --every 50 --test

A fast stand-in for the ServerApp/ClientApp loop (no Flower transport, no ledgers): per round it samples
`cohort` of the 943 one-user devices of ML-100K, trains each from the global weights with the project's
own `shared.training.train_local` (dp = False), and aggregates with `shared.aggregation` (FedAvg's
window-count-weighted mean, or per-row means of item tables, then a server optimizer). The global model
is evaluated on every user with the code `privrec baseline centralized` uses (`shared.metrics`):
validation items at every `--every` rounds, test items after the last round with `--test`.
Results: simulations/results/fedopt-<time>-<arm>-seed<seed>.json per run, fedopt-<time>-<arms>-seeds<seeds>-table.json
and .md per invocation.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from shared.atomic import write_json_atomic
from simulations.output import log_progress, save_results, timestamped


@dataclass(frozen=True)
class Arm:
    local_optimizer: str = "adam"  # shared.training: adam | sgd
    local_lr: float = 0.005
    local_epochs: int = 5
    batch_size: int = 8
    server: str = "avg"  # shared.aggregation.ServerOptimizer kind
    server_lr: float = 1.0
    server_momentum: float = 0.9
    tau: float = 1e-3
    rows: str = "none"  # per-row means of: none | emb | emb+head
    cohort: int = 64
    lr_decay: float = 1.0  # local lr x decay ** (round / 100)
    server_on: str = "all"  # the arrays the server optimizer steps: all | rows (the item rows; the rest FedAvg)


# The README's FedAvg reference is `fedavg`; every other arm changes it as its name says.
ARMS: dict[str, Arm] = {
    "fedavg": Arm(),
    "rows": Arm(rows="emb"),
    "rows-head": Arm(rows="emb+head"),
    "avgm": Arm(server="avgm", server_lr=1.0, server_momentum=0.5),
    "rows-avgm": Arm(rows="emb", server="avgm", server_lr=1.0, server_momentum=0.5),
    "server-lr2": Arm(server_lr=2.0),
    "fedadam": Arm(server="adam", server_lr=0.01),
    "fedyogi": Arm(server="yogi", server_lr=0.01),
    "sgd": Arm(local_optimizer="sgd", local_lr=0.5),
    "sgd-fedadam": Arm(local_optimizer="sgd", local_lr=0.5, server="adam", server_lr=0.01),
    "epochs1": Arm(local_epochs=1),
    "epochs2-lr01": Arm(local_epochs=2, local_lr=0.01),
    "cohort128": Arm(cohort=128),
    "cohort256": Arm(cohort=256),
    "decay": Arm(lr_decay=0.2),
    "rows-decay": Arm(rows="emb", lr_decay=0.2),
    "sgd-decay": Arm(local_optimizer="sgd", local_lr=0.5, lr_decay=0.2),
    # On top of `rows` (issue 12, second session): less per-round noise at the same device budget.
    "rows-epochs1": Arm(rows="emb", local_epochs=1),
    "rows-epochs1-lr01": Arm(rows="emb", local_epochs=1, local_lr=0.01),
    "rows-cohort128": Arm(rows="emb", cohort=128),
    "rows-cohort256": Arm(rows="emb", cohort=256),
    # On top of `rows`: a larger step for the sparse item rows only (the body keeps FedAvg's step).
    "rows-lr2": Arm(rows="emb", server_lr=2.0, server_on="rows"),
    "rows-avgm-rows": Arm(rows="emb", server="avgm", server_momentum=0.5, server_on="rows"),
    # The same two on top of the best arm so far, `rows-epochs1-lr01` (issue 12, third session): the 1-epoch
    # federation is under-fitted (its validation score runs ahead of test as early centralized epochs do),
    # so a larger step on the sparse item rows is what both add.
    "rows-epochs1-lr01-lr2": Arm(rows="emb", local_epochs=1, local_lr=0.01, server_lr=2.0, server_on="rows"),
    "rows-epochs1-lr01-avgm-rows": Arm(rows="emb", local_epochs=1, local_lr=0.01, server="avgm",
                                       server_momentum=0.5, server_on="rows"),
    # ... and a server rate of 2 on every array (the attention body moves faster too).
    "rows-epochs1-lr01-slr2": Arm(rows="emb", local_epochs=1, local_lr=0.01, server_lr=2.0),
    # Fifth pass: each device reports its plain gradient step (one SGD epoch) and the server runs Adam on
    # the cohort's mean, i.e. centralized Adam with a 64-user batch; one local Adam step is a sign step of
    # size lr on every coordinate, which 64-device averages turn into noise rather than progress.
    "sgd1-fedadam-lr001": Arm(rows="emb", local_optimizer="sgd", local_lr=0.5, local_epochs=1, server="adam",
                              server_lr=0.001, tau=1e-6),
    "sgd1-fedadam-lr003": Arm(rows="emb", local_optimizer="sgd", local_lr=0.5, local_epochs=1, server="adam",
                              server_lr=0.003, tau=1e-6),
}
# Besides the global model, every run also evaluates running averages of it over rounds (Polyak/EMA
# iterate averaging on the server: it costs no training and damps the round-to-round noise).
EMA_DECAYS = (0.9, 0.98)


def parse_arm(spec: str) -> tuple[str, Arm]:
    """`name` from ARMS, or `name:key=value,key=value` to change a named arm."""
    name, _, changes = spec.partition(":")
    base = ARMS[name]
    if not changes:
        return name, base
    types = {k: type(v) for k, v in asdict(base).items()}
    values = dict(pair.split("=", 1) for pair in changes.split(","))
    return spec, replace(base, **{k.replace("-", "_"): types[k.replace("-", "_")](v) for k, v in values.items()})


def evaluate(model, users, split: str) -> dict:
    from shared.metrics import eval_inputs, evaluate_histories, summarize

    inputs, targets, exclude = eval_inputs(users.train, users.valid, users.test, split)
    return summarize(evaluate_histories(model, inputs, targets, exclude))


def federated_rounds(store, arm: Arm, seed: int, rounds: int, window: int):
    """Yield (round, global weights) after each of `rounds` rounds of `arm` over `store`'s one-user devices.

    Windows are cut only for the devices a round samples (a 100,000-device store is never cut whole).
    """
    import torch

    from shared.aggregation import ITEM_ROW_KEYS, ServerOptimizer, mean_update, touched_rows
    from shared.data.windows import make_windows
    from shared.model import ModelConfig, SASRec
    from shared.training import LocalTrainConfig, train_local

    windows: dict[int, np.ndarray] = {}

    def device_windows(device: int) -> np.ndarray:
        if device not in windows:
            windows[device] = np.concatenate([make_windows(s, window) for s in store.device(device).train] or
                                             [np.zeros((0, window), np.int64)])
        return windows[device]

    model_cfg = ModelConfig(num_items=store.num_items)  # the run-config defaults
    torch.manual_seed(seed)
    initial = SASRec(model_cfg)
    local = SASRec(model_cfg)  # a second draw from the seeded generator, as before: the same runs as before
    weights = {k: v.detach().numpy().copy() for k, v in initial.state_dict().items()}
    server = ServerOptimizer(kind=arm.server, lr=arm.server_lr, momentum=arm.server_momentum, tau=arm.tau,
                             keys=server_keys(arm))
    cohort_rng = random.Random(seed)
    for rnd in range(1, rounds + 1):
        cohort = cohort_rng.sample(range(store.num_devices), arm.cohort)
        lr = arm.local_lr * arm.lr_decay ** (rnd / 100)
        updates, counts, masks = [], [], []
        for device in cohort:
            if device_windows(device).shape[0] == 0:
                continue
            local.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
            cfg = LocalTrainConfig(epochs=arm.local_epochs, lr=lr, batch_size=arm.batch_size, dp=False,
                                   optimizer=arm.local_optimizer, seed=seed * 1_000_003 + rnd * 1009 + device)
            result = train_local(local, device_windows(device), cfg)
            update = {k: v.detach().numpy() - weights[k] for k, v in local.state_dict().items()}
            updates.append(update)
            counts.append(result.num_examples)  # FedAvg's weight, as client/device.py reports it
            if arm.rows != "none":
                seen = np.zeros(store.num_items + 1, dtype=bool)
                seen[np.unique(device_windows(device))] = True
                seen[0] = False
                mask = {"item_emb.weight": touched_rows(update["item_emb.weight"])}
                if arm.rows == "emb+head":
                    mask.update({k: seen for k in ITEM_ROW_KEYS[1:]})
                masks.append(mask)
        mean = mean_update(updates, counts, masks if arm.rows != "none" else None)
        weights = server.step(weights, mean)
        yield rnd, weights


def server_keys(arm: Arm) -> tuple[str, ...] | None:
    """The arrays `arm`'s server optimizer steps (None: all): with `server_on = rows`, the item rows that
    `arm.rows` averages per row (the item embedding when it averages none)."""
    from shared.aggregation import ITEM_ROW_KEYS

    if arm.server_on == "all":
        return None
    if arm.server_on != "rows":
        raise ValueError(f"server_on={arm.server_on!r} must be all or rows")
    return ITEM_ROW_KEYS if arm.rows == "emb+head" else ITEM_ROW_KEYS[:1]


def run(task: tuple) -> dict:
    import torch

    from shared.data.store import open_store, prepare_store
    from shared.model import ModelConfig, SASRec

    name, arm, seed, rounds, every, window, test, stem = task
    torch.set_num_threads(1)
    store = open_store(prepare_store("ml-100k"))
    users = store.all_users()
    global_model = SASRec(ModelConfig(num_items=store.num_items))
    initial = _initial_weights(store, seed)  # round 0's model starts every running average
    ema = {d: {k: v.copy() for k, v in initial.items()} for d in EMA_DECAYS}
    curve, started = [], time.perf_counter()
    for rnd, weights in federated_rounds(store, arm, seed, rounds, window):
        for d, avg in ema.items():
            for k in avg:
                avg[k] = d * avg[k] + (1 - d) * weights[k]
        if rnd % every == 0 or rnd == rounds:
            point = {"round": rnd, "seconds": round(time.perf_counter() - started, 1)}
            for prefix, state in [("", weights)] + [(f"ema{d}-", avg) for d, avg in ema.items()]:
                global_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
                point[f"{prefix}valid-ndcg@10"] = evaluate(global_model, users, "valid")["ndcg@10"]
                if test:
                    t = evaluate(global_model, users, "test")
                    point.update({f"{prefix}test-ndcg@10": t["ndcg@10"], f"{prefix}test-hr@10": t["hr@10"]})
            curve.append(point)
            partial = {"arm": name, "settings": asdict(arm), "seed": seed, "rounds": rnd, "planned-rounds": rounds,
                       "curve": curve, "seconds": round(time.perf_counter() - started, 1)}
            write_json_atomic(stem.with_suffix(".json"), partial)  # an interrupted run keeps what it measured
            log_progress(f"{name} seed {seed} round {rnd}: " + ", ".join(f"{k} {v:.4f}" for k, v in point.items()
                                                                           if k.endswith("@10")))
    return partial


def _initial_weights(store, seed: int) -> dict:
    """The round-0 global model of `federated_rounds` (the same seed gives the same initialization)."""
    import torch

    from shared.model import ModelConfig, SASRec

    torch.manual_seed(seed)
    model = SASRec(ModelConfig(num_items=store.num_items))
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def centralized_curve(seed: int, epochs: int = 30, every: int = 2) -> dict:
    """`privrec baseline centralized`'s own training (`train_centralized`'s recipe: a fresh SASRec from `seed`,
    one Adam state over `epochs` epochs, lr 0.001, batch 64, window 50), with validation and test NDCG@10 after
    every `every` epochs. Evaluating in between consumes no randomness, so its last point is the baseline's figure.

    Why: a federated model's validation score runs ahead of its test score; this shows whether the
    centralized trainer does the same on its way to epoch 30 (issue 12, third session).
    """
    import torch

    from shared.data.store import open_store, prepare_store
    from shared.data.windows import history_windows
    from shared.model import ModelConfig, SASRec
    from shared.training import LocalTrainConfig, train_local

    torch.set_num_threads(1)
    store = open_store(prepare_store("ml-100k"))
    users = store.all_users()
    with torch.random.fork_rng(devices=[]):  # as train_centralized builds its model
        torch.manual_seed(seed)
        model = SASRec(ModelConfig(num_items=store.num_items))
    curve = []

    def on_epoch(epoch: int, loss: float) -> None:
        if (epoch + 1) % every == 0 or epoch + 1 == epochs:
            point = {"epoch": epoch + 1, "loss": loss}
            point.update({f"{split}-ndcg@10": evaluate(model, users, split)["ndcg@10"] for split in ("valid", "test")})
            model.train()
            curve.append(point)
            log_progress(f"centralized seed {seed} epoch {epoch + 1}: valid {point['valid-ndcg@10']:.4f}, "
                         f"test {point['test-ndcg@10']:.4f}")

    train_local(model, history_windows(users.train, 50),
                LocalTrainConfig(epochs=epochs, lr=0.001, batch_size=64, dp=False, seed=seed), on_epoch=on_epoch)
    return {"seed": seed, "recipe": f"train_centralized: {epochs} epochs, Adam lr 0.001, batch 64, window 50",
            "curve": curve}


def report(runs: list[dict], centralized: float | None) -> str:
    """One row per arm and evaluated model (the global model, and its running averages over rounds)."""
    lines = ["| arm | model | valid NDCG@10 by round (mean over seeds) | test NDCG@10 mean ± std | / centralized "
             "| seeds | rounds | seconds per run |", "|---|---|---|---|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        common = min(len(m["curve"]) for m in mine)  # an interrupted seed counts up to where all seeds got
        mine = [{**m, "curve": m["curve"][:common], "rounds": m["curve"][common - 1]["round"]} for m in mine]
        prefixes = [""] + [f"ema{d}-" for d in EMA_DECAYS]
        # The model to ship is chosen on validation at the last round (mean over seeds), never on test.
        chosen = max(prefixes, key=lambda p: np.mean([m["curve"][-1][p + "valid-ndcg@10"] for m in mine]))
        for prefix in prefixes:
            points = [f"{p['round']}: {np.mean([m['curve'][i][prefix + 'valid-ndcg@10'] for m in mine]):.4f}"
                      for i, p in enumerate(mine[0]["curve"])]
            tests = [m["curve"][-1].get(prefix + "test-ndcg@10") for m in mine]
            if None in tests:
                test, ratio = "-", "-"
            else:
                std = np.std(tests, ddof=1) if len(tests) > 1 else 0.0
                test = f"{np.mean(tests):.4f} ± {std:.4f}"
                ratio = f"{np.mean(tests) / centralized:.2f}" if centralized else "-"
            model = (f"EMA {prefix[3:-1]} of global" if prefix else "global") + \
                (" (chosen on validation)" if prefix == chosen else "")
            lines.append(f"| {arm} | {model} | {', '.join(points)} | {test} | {ratio} | {len(mine)} | "
                         f"{mine[0]['rounds']} | {np.mean([m['seconds'] for m in mine]):.0f} |")
    return "\n".join(lines)


def run_name(spec: str) -> str:
    """`spec` as a file-name part: no ':' or ',', and no '.', which `Path.with_suffix` would take for a suffix
    (`lr_decay=0.2-seed0` lost everything after the dot)."""
    return spec.replace(":", "_").replace(",", "_").replace(".", "_")


def table_stem(stamp: Path, arms: list[str], seeds: list[int]) -> Path:
    """The stem of a run's table: its time stamp, arms and seeds. Two runs started in the same second (other arms or
    seeds, in parallel) once wrote one `fedopt-<time>.json` and the second overwrote the first's table."""
    return stamp.with_name(f"{stamp.name}-{'+'.join(run_name(a) for a in arms)}-seeds{'-'.join(map(str, seeds))}-table")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["fedavg", "rows"],
                        help=f"named arms ({', '.join(ARMS)}), or name:key=value,... to change one")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--test", action="store_true", help="also evaluate test items at every evaluation")
    parser.add_argument("--summarize", nargs="+", metavar="RUN.json", help="only rebuild the table from run files")
    parser.add_argument("--centralized", type=float, default=0.0818, help="centralized test NDCG@10 (README)")
    parser.add_argument("--centralized-curve", action="store_true",
                        help="only train the centralized baseline (30 epochs) per seed, valid and test every 2 epochs")
    args = parser.parse_args()
    if args.centralized_curve:
        for seed in args.seeds:
            write_json_atomic(timestamped(f"fedopt-centralized-curve-seed{seed}").with_suffix(".json"),
                              centralized_curve(seed))
        return
    if args.summarize:
        runs = [json.loads(Path(f).read_text()) for f in args.summarize]
        save_results(timestamped("fedopt-summary"), {"centralized-test-ndcg@10": args.centralized, "runs": runs},
                     report(runs, args.centralized))
        return
    arms = [parse_arm(spec) for spec in args.arms]
    stamp = timestamped("fedopt")
    tasks = [(name, arm, seed, args.rounds, args.every, args.window, args.test,
              stamp.with_name(f"{stamp.name}-{run_name(name)}-seed{seed}"))
             for name, arm in arms for seed in args.seeds]
    with ProcessPoolExecutor(max_workers=min(args.workers, len(tasks)), mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(run, tasks))
    save_results(table_stem(stamp, [name for name, _ in arms], args.seeds),
                 {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": vars(args),
                  "centralized-test-ndcg@10": args.centralized, "runs": runs},
                 report(runs, args.centralized))


if __name__ == "__main__":
    main()
