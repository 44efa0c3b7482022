"""What `transition-release = true` adds to what travels and to a device's round (issue 15).

    python -m simulations.transition_cost                     # ML-100K, 100 devices, K = 512 (the default)
    python -m simulations.transition_cost --items 256 512 1682 --devices 50

The channel scorer's model travels in every train and evaluate message (its frozen, released buffers included:
`server.scorer.initial_scorer`); a train reply carries only the trained weights (`shared.scorer.sent_back`), one
device per message (the scorers do not run with
devices-per-node > 1). For the model the server would ship on ML-100K (the default's releases, noise included)
without and with the transition release over the top K items, this measures the bytes of the message's
`ArrayRecord` (Flower's own serialisation of each array) and, per device, the time of its round (its gradient,
`shared.scorer.channel_user_gradient`, and the weights it returns), of its evaluation (scoring its validation
and test items) and of its contribution to the transition release (`shared.analytics.transition_sum`), median
over the devices, one thread.

Writes simulations/results/transition-cost-<time>.{json,md} and prints the Markdown.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from simulations.output import save_results, timestamped


def message_bytes(state: dict) -> int:
    """Bytes of the model's arrays as Flower serialises them in a message (`ArrayRecord` of the state dict)."""
    from flwr.app import ArrayRecord

    record = ArrayRecord({k: v.detach().clone() for k, v in state.items()})
    return int(sum(len(array.data) for array in record.values()))


def measure(items_list, devices: int, seed: int) -> dict:
    from server.scorer import initial_scorer
    from shared import config
    from shared.analytics import (
        COOC_GAP_DECAY,
        cooc_from_release,
        cooc_vector,
        gaussian_release,
        item_set_vector,
        noisy_sum,
        top_items,
        transition_sum,
    )
    from shared.data.store import ITEMS_FILE, open_store, prepare_store
    from shared.scorer import (
        TRANSITION_THRESHOLD,
        channel_user_gradient,
        evaluation_sums,
        fedsgd_update,
        read_catalogue,
    )
    from shared.text.features import store_text_features

    torch.set_num_threads(1)
    cfg = config.resolve_run()  # what `privrec simulate` runs with no options
    store_dir = prepare_store("ml-100k", 1)
    store = open_store(store_dir)
    users = store.all_users()
    catalogue = read_catalogue(store_dir / ITEMS_FILE, store_text_features(store_dir, progress=False).vectors)
    rng = np.random.default_rng(seed)
    histogram = noisy_sum(item_set_vector(users.train, store.num_items), cfg["popularity-noise-multiplier"], rng)
    cooc_items = top_items(histogram, cfg["cooc-items"])
    cooc = cooc_from_release(gaussian_release(cooc_vector(users.train, cooc_items, cfg["cooc-window"]),
                                              cfg["cooc-noise-multiplier"], rng), len(cooc_items))
    chosen = rng.choice(len(users.train), size=min(devices, len(users.train)), replace=False)
    z_t = cfg["transition-noise-multiplier"]
    rows = []
    for k in [None, *items_list]:
        transitions = None
        if k is not None:
            t_items = top_items(histogram, k)
            transitions = (t_items, gaussian_release(transition_sum(users.train, t_items), z_t, rng),
                           TRANSITION_THRESHOLD * z_t)
        model = initial_scorer(catalogue, histogram, seed, (cooc_items, cooc), transitions)
        train_s, eval_s, release_s = [], [], []
        for u in chosen:
            started = time.perf_counter()
            grads = channel_user_gradient(model, catalogue, [users.train[u]], cfg["scorer-targets"],
                                          cfg["profile-items"], cfg["profile-decay"], cfg["cooc-window"],
                                          COOC_GAP_DECAY)
            reply = fedsgd_update(model, grads)
            train_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            evaluation_sums(model, catalogue, [users.train[u]], users.valid[u:u + 1], users.test[u:u + 1],
                            cfg["profile-items"], cfg["profile-decay"])
            eval_s.append(time.perf_counter() - started)
            if k is not None:
                started = time.perf_counter()
                transition_sum([users.train[u]], transitions[0])
                release_s.append(time.perf_counter() - started)
        rows.append({"transition-items": k, "message-bytes": message_bytes(model.state_dict()),
                     "reply-bytes": message_bytes(reply),
                     "weights": int(sum(p.numel() for p in model.parameters())),
                     "device-round-ms": 1000 * float(np.median(train_s)),
                     "device-evaluate-ms": 1000 * float(np.median(eval_s)),
                     "device-transition-contribution-ms": 1000 * float(np.median(release_s)) if release_s else None,
                     "transition-contribution-bytes": 8 * k * k if k is not None else None})
    return {"made": time.strftime("%Y-%m-%d %H:%M:%S"), "devices": len(chosen), "seed": seed,
            "dataset": "ml-100k (real, 943 users)", "rows": rows}


def markdown(results: dict) -> str:
    lines = [f"# What the transition release adds to a channel-scorer message and round ({results['made']})", "",
             f"ML-100K, the default pipeline's releases (noise included), {results['devices']} devices, median per "
             "device, one thread. `message` = the model's `ArrayRecord` bytes (Flower's serialisation), which every "
             "train and evaluate message carries (one device per message); `reply` = the same for what a device "
             "sends back from a round (`shared.scorer.sent_back`: the trained weights only).", "",
             "| transition release over the top K items | trained weights | model message | train reply | device "
             "round (gradient + reply weights) | device evaluation | device's transition contribution (time; bytes "
             "sent once) |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        k = r["transition-items"]
        contribution = "-" if k is None else (f"{r['device-transition-contribution-ms']:.1f} ms; "
                                              f"{r['transition-contribution-bytes'] / 2**20:.2f} MiB")
        lines.append(f"| {'off (the default)' if k is None else k} | {r['weights']} | "
                     f"{r['message-bytes'] / 2**10:,.0f} KiB | {r['reply-bytes'] / 2**10:,.1f} KiB | "
                     f"{r['device-round-ms']:.1f} ms | "
                     f"{r['device-evaluate-ms']:.1f} ms | {contribution} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[512])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    results = measure(args.items, args.devices, args.seed)
    from pathlib import Path

    save_results(Path(args.out) if args.out else timestamped("transition-cost"), results, markdown(results))


if __name__ == "__main__":
    main()
