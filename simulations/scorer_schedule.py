"""How the default content-scorer schedule was chosen (issue 13): a central replay of the pipeline's arithmetic.

    python -m simulations.scorer_schedule                      # the settings below, seeds 0 1 (~5 min, one thread)
    python -m simulations.scorer_schedule --settings 0.25,10,2.48,0.2 --seeds 0

ML-100K, one user per device. Exactly what `privrec simulate` does with `model = content-scorer`, without
Flower: the DP popularity release (z = 4), then rounds in which every user joins with probability q, its
gradient of `shared.scorer.user_gradient` is clipped to 1, N(0, z^2) is added to the sum, the sum is divided
by q N, and Flower's FedAdam update (beta1 0.9, beta2 0.99, tau 1e-3, its bias-corrected step) is applied.
Each setting's z gives a whole-run epsilon of 1.99 (Opacus RDP, delta 1e-5). It reports validation NDCG@10
(what the choice may look at) and test NDCG@10 (reported, not used to choose). The choice it informed is
the developers', made before the runs the README reports, and is not counted in any run's epsilon.

Writes simulations/results/scorer-schedule-<time>.json and .md, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from shared.analytics import item_set_vector
from shared.data.store import open_store, prepare_store
from shared.metrics import ndcg_at_k
from shared.scorer import ContentScorer, evaluation_ranks, popularity_bias, public_catalogue, user_gradient
from shared.text.features import store_text_features
from simulations.output import log_progress, save_results, timestamped

POPULARITY_Z, CLIP, TARGETS, PROFILE_ITEMS, DECAY = 4.0, 1.0, 10, 5, 0.8
# (q, rounds, z, server-lr): each z reaches epsilon 1.99 with the popularity release (Opacus RDP, delta 1e-5)
SETTINGS = [(1.0, 10, 8.11, 0.1), (1.0, 10, 8.11, 0.2), (1.0, 10, 8.11, 0.3), (0.5, 20, 5.94, 0.1),
            (0.5, 20, 5.94, 0.2), (0.25, 10, 2.48, 0.2), (0.25, 10, 2.48, 0.3)]


def fedadam_state(model: torch.nn.Module) -> dict:
    """Flower FedAdam's first and second moments, zero before round 1."""
    trained = [(k, p) for k, p in model.named_parameters() if p.requires_grad]  # not a frozen SASRec channel
    return {"m": {k: torch.zeros_like(p) for k, p in trained}, "v": {k: torch.zeros_like(p) for k, p in trained}}


def fedadam_step(model: torch.nn.Module, state: dict, delta: dict, r: int, lr: float, tau: float = 1e-3) -> None:
    """Flower's FedAdam (beta1 0.9, beta2 0.99, tau (Flower's 1e-3 by default), its bias-corrected step) from the
    round-r mean update."""
    m, v = state["m"], state["v"]
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k not in m:  # frozen
                continue
            m[k] = 0.9 * m[k] + 0.1 * delta[k]
            v[k] = 0.99 * v[k] + 0.01 * delta[k] * delta[k]
            step = lr * np.sqrt(1 - 0.99 ** (r + 1)) / (1 - 0.9 ** (r + 1))
            p += step * m[k] / (v[k].sqrt() + tau)


def run(data: dict, q: float, rounds: int, z: float, lr: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    catalogue, users = data["catalogue"], data["users"]
    n = len(users.train)
    released = data["items"] + rng.normal(0.0, POPULARITY_Z, data["items"].shape)
    released[0] = 0.0
    model = ContentScorer(catalogue.num_items, catalogue.text.shape[1])
    model.popularity.copy_(popularity_bias(released))
    adam = fedadam_state(model)
    for r in range(1, rounds + 1):
        total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
        for u in range(n):
            if rng.random() >= q:
                continue
            grads = user_gradient(model, catalogue, [users.train[u]], TARGETS, PROFILE_ITEMS, DECAY)
            norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads.values())))
            for k in total:
                total[k] -= grads[k] * min(1.0, CLIP / (norm + 1e-12))
        fedadam_step(model, adam, {k: (total[k] + torch.from_numpy(rng.normal(0.0, z * CLIP, p.shape)).float())
                                   / (q * n) for k, p in model.named_parameters()}, r, lr)
    return {split: float(ndcg_at_k(evaluation_ranks(model, catalogue, users.train, users.valid, users.test, split,
                                                    PROFILE_ITEMS, DECAY)).mean()) for split in ("valid", "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--settings", nargs="*", help="q,rounds,z,lr (default: the list in this file)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = [tuple(float(x) for x in s.split(",")) for s in args.settings] if args.settings else SETTINGS
    store_dir = prepare_store("ml-100k", 1)
    store = open_store(store_dir)
    users = store.all_users()
    data = {"users": users, "items": item_set_vector(users.train, store.num_items),
            "catalogue": public_catalogue(store_text_features(store_dir, progress=False).vectors, store.item_ids,
                                          store.item_titles)}
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "seeds": args.seeds, "rows": []}
    lines = ["| q | rounds | z | server-lr | seed | valid NDCG@10 | test NDCG@10 |", "|---|---|---|---|---|---|---|"]
    for q, rounds, z, lr in settings:
        for seed in args.seeds:
            row = {"q": q, "rounds": int(rounds), "z": z, "lr": lr, "seed": seed,
                   **run(data, q, int(rounds), z, lr, seed)}
            results["rows"].append(row)
            lines.append(f"| {q:g} | {int(rounds)} | {z:g} | {lr:g} | {seed} | {row['valid']:.4f} "
                         f"| {row['test']:.4f} |")
            log_progress(lines[-1])
    save_results(timestamped("scorer-schedule"), results, "\n".join(lines))


if __name__ == "__main__":
    main()
