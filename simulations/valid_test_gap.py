"""Why the federated models score higher on validation than on test (issue 12, third session).

    python -m simulations.valid_test_gap --arm rows-epochs1-lr01 --rounds 100 --seed 0

Trains the non-private federation of `simulations.fedopt` (`--arm`, `--rounds`) and `privrec baseline
centralized`'s model (`shared.baselines.train_centralized`, 30 epochs), then scores both on probes that
move the input or the target by one item:

- valid: input train, target the validation item (the standard validation figure);
- test: input train + validation item, target the test item (the standard test figure);
- test-skip: input train, target the test item (the validation item left out of the input);
- valid-skip: input train without its last item, target the validation item;
- insample-last: input train without its last item, target that last item (a training target).

If the validation item leaked into training, valid would score like insample-last while valid-skip and
test-skip fell; if the input were the cause, valid-skip would lose the advantage. A third table splits the
federated model's users by how many rounds before the evaluated round their device last trained.
Results: simulations/results/valid-test-gap-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from simulations.fedopt import ARMS, _initial_weights, federated_rounds
from simulations.output import log_progress, save_results, timestamped


def probes(train, valid, test) -> dict[str, tuple[list, np.ndarray, list]]:
    """(inputs, targets, exclude) per probe; exclude is always every item of the input and what precedes the target."""
    both = [np.r_[t, v] for t, v in zip(train, valid)]
    return {
        "valid": (list(train), valid, [np.unique(t) for t in train]),
        "test": (both, test, [np.unique(b) for b in both]),
        "test-skip": (list(train), test, [np.unique(b) for b in both]),
        "valid-skip": ([t[:-1] for t in train], valid, [np.unique(t) for t in train]),
        "insample-last": ([t[:-1] for t in train], np.array([t[-1] for t in train]),
                          [np.unique(t[:-1]) for t in train]),
    }


def score(model, cases: dict) -> dict[str, np.ndarray]:
    from shared.metrics import evaluate_histories

    return {name: evaluate_histories(model, *case)["ndcg"] for name, case in cases.items()}


def main() -> None:
    import torch

    from shared.baselines import train_centralized
    from shared.data.store import open_store, prepare_store
    from shared.model import ModelConfig, SASRec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", default="rows-epochs1-lr01", choices=list(ARMS))
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    store = open_store(prepare_store("ml-100k"))
    users = store.all_users()
    train = [np.asarray(t, dtype=np.int64) for t in users.train]
    cases = probes(train, np.asarray(users.valid), np.asarray(users.test))
    short = np.array([len(t) < 50 for t in train])  # one training window

    ema = _initial_weights(store, args.seed)
    for _rnd, weights in federated_rounds(store, ARMS[args.arm], args.seed, args.rounds, 50):
        ema = {k: 0.98 * ema[k] + 0.02 * weights[k] for k in ema}
    log_progress(f"{args.arm}: {args.rounds} rounds done")
    models = {}
    for name, state in [("federated global", weights), ("federated EMA 0.98", ema)]:
        models[name] = SASRec(ModelConfig(num_items=store.num_items))
        models[name].load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    models["centralized, 30 epochs"] = train_centralized(users.train, store.num_items,
                                                         ModelConfig(num_items=store.num_items), window=50, epochs=30,
                                                         lr=0.001, batch_size=64, seed=args.seed)
    per_model = {name: score(model, cases) for name, model in models.items()}

    # Rounds since each device last trained, at the evaluated round (the cohort draws of federated_rounds).
    rng, last = random.Random(args.seed), {}
    for rnd in range(1, args.rounds + 1):
        for device in rng.sample(range(store.num_devices), ARMS[args.arm].cohort):
            last[device] = rnd
    age = np.array([args.rounds - last.get(d, -10**9) for d in range(store.num_devices)])
    buckets = [(0, 0), (1, 4), (5, 14), (15, 39), (40, 10**9)]
    recency = []
    for lo, hi in buckets:
        chosen = (age >= lo) & (age <= hi)
        fed = per_model["federated global"]
        recency.append({"rounds-since-trained": f"{lo}-{hi if hi < 10**9 else 'never/more'}",
                        "users": int(chosen.sum()),
                        "valid": float(fed["valid"][chosen].mean()), "test": float(fed["test"][chosen].mean())})

    table = {name: {probe: {"ndcg@10": float(v.mean()), "short-users": float(v[short].mean()),
                            "long-users": float(v[~short].mean())} for probe, v in res.items()}
             for name, res in per_model.items()}
    lines = ["| model | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    lines += [f"| {name} | " + " | ".join(f"{res[p]['ndcg@10']:.4f}" for p in cases) + " |"
              for name, res in table.items()]
    lines += ["", "| federated global: rounds since the device last trained | users | valid | test |",
              "|---|---|---|---|"]
    lines += [f"| {r['rounds-since-trained']} | {r['users']} | {r['valid']:.4f} | {r['test']:.4f} |" for r in recency]
    save_results(timestamped("valid-test-gap"),
                 {"argv": vars(args), "probes": table, "recency": recency,
                  "seconds": round(time.perf_counter() - started, 1)}, "\n".join(lines))


if __name__ == "__main__":
    main()
