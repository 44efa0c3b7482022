"""The cold-start protocol: items nobody trained on, evaluated apart from the rest.

A random share of the catalogue (drawn from the run seed, the same on the server and every device) is
removed from every training history before windows are cut, so no training example ever holds one.
Evaluation inputs are the users' real histories, unchanged; test events are then reported three ways:
all of them, those whose target is a held-out ("cold") item, and the rest ("warm").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared.config import RunConfig
from shared.errors import PrivrecError
from shared.metrics import summarize


def cold_items(num_items: int, share: float, seed: int) -> np.ndarray:
    """Sorted ids (1..num_items) of the held-out items: round(share * num_items) of them."""
    if not 0 <= share < 1:
        raise PrivrecError(f"cold-item-share = {share!r}: must be in [0, 1)")
    count = int(round(share * num_items))
    rng = np.random.default_rng([int(seed), 0xC01D])  # its own stream: independent of other seeded draws
    return np.sort(rng.choice(np.arange(1, num_items + 1), size=count, replace=False)).astype(np.int64)


def held_out_items(cfg: RunConfig | Mapping[str, Any], num_items: int) -> np.ndarray | None:
    """The run's cold items (`cold-item-share`, `seed`), or None when the protocol is off.

    Every reader of training histories (devices, server-side pretraining) holds out the same items.
    """
    run = RunConfig.of(cfg)
    share = run.data.cold_item_share
    return cold_items(num_items, share, run.federation.seed) if share else None


def without_items(histories: Sequence[np.ndarray], items: np.ndarray) -> list[np.ndarray]:
    """Each history with every occurrence of `items` removed (order of the rest kept)."""
    if len(items) == 0:
        return [np.asarray(h, dtype=np.int64) for h in histories]
    return [np.asarray(h, dtype=np.int64)[~np.isin(h, items)] for h in histories]


def split_summary(per_user: dict[str, np.ndarray], targets: np.ndarray, cold: np.ndarray, k: int = 10,
                  seed: int = 0) -> dict[str, dict]:
    """HR@k / NDCG@k (with CIs) over all events, cold-target events and warm-target events."""
    is_cold = np.isin(np.asarray(targets), cold)
    out = {"all": summarize(per_user, k=k, seed=seed)}
    for name, mask in (("cold", is_cold), ("warm", ~is_cold)):
        part = summarize({key: np.asarray(v)[mask] for key, v in per_user.items()}, k=k, seed=seed)
        # No such event: None, not NaN (run files are strict JSON).
        out[name] = {key: (None if mask.sum() == 0 and key != "users" else v) for key, v in part.items()}
    return out
