"""The source's and the synthetic populations' statistics side by side (docs/synthetic-data.md).

    python -m simulations.synth_stats                                  # ml-100k, 943 and 10,000 users, seed 0
    python -m simulations.synth_stats --like PATH --users 1000 --time-users 0

For the source and for each synthetic population (`shared.data.synth.write_synthetic` into a temporary folder,
read back with privrec's own loader and leave-one-out split):

- history lengths: quantiles and mean;
- item popularity over the source's catalogue: Gini coefficient, share of interactions on the top 1% and
  top 10% of items, items never met;
- next-item predictability on the dataset's OWN split (test item, history masked, shared/metrics.py):
  HR@10 and NDCG@10 of popularity and of a bigram model (count of `last input item -> candidate` in the
  training histories, ties broken by popularity), both fitted on that dataset's training histories.

`--time-users N` also times writing N synthetic users (fit + sample + write; not read back).
Writes simulations/results/synth-stats-<time>.json and .md, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shared.baselines import evaluate_popularity, popularity_scores
from shared.data.formats import Interactions, load_interactions
from shared.data.split import SplitData, leave_one_out
from shared.data.synth import gini, write_synthetic
from shared.metrics import eval_inputs, hit_at_k, ndcg_at_k, target_ranks
from simulations.output import log_progress, save_results, timestamped

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def top_share(counts: np.ndarray, fraction: float) -> float:
    """Share of all interactions that fall on the most popular `fraction` of the catalogue."""
    x = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    top = max(1, int(round(fraction * x.shape[0])))
    return float(x[:top].sum() / x.sum())


def evaluate_bigram(split: SplitData, k: int = 10, batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Per-user hit/ndcg/rank on the test item of `count(last -> j)` + popularity as a tie-break."""
    n = split.num_items
    counts = np.zeros((n + 1, n + 1), dtype=np.float64)
    for seq in split.train:
        if seq.size > 1:
            np.add.at(counts, (seq[:-1], seq[1:]), 1.0)
    pop = popularity_scores(split.train, n)
    tie_break = pop / (pop.max() + 1.0)  # < 1: never outranks one more bigram count
    inputs, targets, exclude = eval_inputs(split.train, split.valid, split.test, "test")
    last = np.array([seq[-1] for seq in inputs], dtype=np.int64)
    ranks = np.zeros(targets.shape[0], dtype=np.int64)
    for start in range(0, targets.shape[0], batch_size):
        stop = min(start + batch_size, targets.shape[0])
        scores = torch.from_numpy(counts[last[start:stop]] + tie_break[None, :])
        ranks[start:stop] = target_ranks(scores, torch.from_numpy(targets[start:stop]), exclude[start:stop])
    return {"hit": hit_at_k(ranks, k), "ndcg": ndcg_at_k(ranks, k), "rank": ranks}


def dataset_statistics(inter: Interactions, catalogue_size: int) -> dict:
    """The statistics of the module docstring for one dataset."""
    _, lengths = np.unique(np.asarray(inter.users, dtype=object), return_counts=True)
    _, item_counts = np.unique(np.asarray(inter.items, dtype=object), return_counts=True)
    counts = np.zeros(max(catalogue_size, item_counts.shape[0]))
    counts[: item_counts.shape[0]] = item_counts
    split = leave_one_out(inter)
    pop = evaluate_popularity(split.train, split.valid, split.test, split.num_items)
    bigram = evaluate_bigram(split)
    return {
        "users": int(lengths.shape[0]),
        "interactions": len(inter),
        "length_quantiles": {f"q{int(q * 100)}": float(np.quantile(lengths, q)) for q in QUANTILES},
        "length_mean": float(lengths.mean()),
        "items_met": int(item_counts.shape[0]),
        "catalogue": int(counts.shape[0]),
        "popularity_gini": gini(counts),
        "top1pct_share": top_share(counts, 0.01),
        "top10pct_share": top_share(counts, 0.10),
        "popularity_ndcg@10": float(pop["ndcg"].mean()),
        "popularity_hr@10": float(pop["hit"].mean()),
        "bigram_ndcg@10": float(bigram["ndcg"].mean()),
        "bigram_hr@10": float(bigram["hit"].mean()),
    }


def markdown(results: dict) -> str:
    names = list(results["datasets"])
    rows = [
        ("users", lambda s: f"{s['users']:,}"),
        ("interactions", lambda s: f"{s['interactions']:,}"),
        *[(f"history length {q}", lambda s, q=q: f"{s['length_quantiles'][q]:.0f}")
          for q in ("q0", "q10", "q25", "q50", "q75", "q90", "q100")],
        ("history length mean", lambda s: f"{s['length_mean']:.1f}"),
        ("items met / catalogue", lambda s: f"{s['items_met']:,} / {s['catalogue']:,}"),
        ("item popularity Gini", lambda s: f"{s['popularity_gini']:.3f}"),
        ("share on top 1% of items", lambda s: f"{s['top1pct_share']:.3f}"),
        ("share on top 10% of items", lambda s: f"{s['top10pct_share']:.3f}"),
        ("popularity NDCG@10 (own split)", lambda s: f"{s['popularity_ndcg@10']:.4f}"),
        ("popularity HR@10 (own split)", lambda s: f"{s['popularity_hr@10']:.4f}"),
        ("bigram NDCG@10 (own split)", lambda s: f"{s['bigram_ndcg@10']:.4f}"),
        ("bigram HR@10 (own split)", lambda s: f"{s['bigram_hr@10']:.4f}"),
    ]
    lines = [f"# Synthetic populations like {results['like']} (seed {results['seed']})", "",
             "| statistic | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(results["datasets"][n]) for n in names) + " |")
    if results.get("timing"):
        t = results["timing"]
        lines += ["", f"Writing {t['users']:,} synthetic users ({t['interactions']:,} interactions; fit, sample and "
                      f"write, not read back): {t['seconds']:.1f} s wall on this machine."]
    lines += ["", f"Command: `{results['command']}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--like", default="ml-100k")
    parser.add_argument("--users", type=int, nargs="+", default=[943, 10_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-users", type=int, default=100_000, help="0: skip the timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.like == "ml-100k":
        from shared.data.fetch import fetch_ml100k

        source = load_interactions(fetch_ml100k())
    else:
        source = load_interactions(Path(args.like).expanduser())
    catalogue = len(set(source.item_titles) | set(source.items))
    command = (f"python -m simulations.synth_stats --like {args.like} --users {' '.join(map(str, args.users))} "
               f"--seed {args.seed} --time-users {args.time_users}")
    results: dict = {"like": args.like, "seed": args.seed, "command": command, "datasets": {}}
    log_progress("source statistics")
    results["datasets"]["source"] = dataset_statistics(source, catalogue)
    with tempfile.TemporaryDirectory(prefix="privrec-synth-") as tmp:
        for users in args.users:
            log_progress(f"synthetic, {users:,} users")
            out = Path(tmp) / f"synth-{users}"
            write_synthetic(source, out, users, args.seed, like=args.like)
            results["datasets"][f"synthetic {users:,}"] = dataset_statistics(load_interactions(out), catalogue)
        if args.time_users:
            log_progress(f"timing {args.time_users:,} users")
            start = time.perf_counter()
            summary = write_synthetic(source, Path(tmp) / "timed", args.time_users, args.seed, like=args.like)
            results["timing"] = {"users": args.time_users, "interactions": summary["interactions"],
                                 "seconds": time.perf_counter() - start}
    save_results(timestamped("synth-stats"), results, markdown(results))


if __name__ == "__main__":
    main()
