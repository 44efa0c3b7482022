"""Server side of `model = content-scorer` / `channel-scorer`: the analytics releases, then the initial model.

The release is federated analytics (`server.analytics.federated_popularity`, the one the private baselines
use) over every device; its result becomes the `popularity` buffer of the model every round ships, so it is
released once and never again. It is recorded in the run directory (`popularity.json`) as soon as it exists:
a resumed run reuses it instead of releasing a second histogram the accountant would not count.

`channel-scorer` adds a second release before the rounds: the windowed co-occurrence among the `cooc-items`
items the released popularity ranks highest (`server.analytics.federated_cooccurrence`; the item list is
post-processing of the first release), recorded in `cooccurrence.json` and reused on resume in the same way.
With `transition-release = true` a third: the directed transition counts among the `transition-items` items the
released popularity ranks highest (`server.analytics.federated_transitions`, `transitions.json`; not under secure
aggregation, which the config refuses with it). They become frozen buffers of the model every round ships.

With `secure-aggregation = true` both releases run under SecAgg+ (`secure`: the devices add the noise, the
server unmasks only the sum), as the rounds do (`server.secagg.SecureAggregationGrid`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from server.analytics import federated_cooccurrence, federated_popularity, federated_transitions
from server.run_dir import RunDirectory
from shared.analytics import cooc_from_release, top_items
from shared.config import RunConfig
from shared.data.store import DeviceStore
from shared.metrics import hit_at_k, ndcg_at_k
from shared.scorer import (
    COOC_CHANNEL,
    TRANSITION_CHANNEL,
    TRANSITION_THRESHOLD,
    Catalogue,
    ChannelScorer,
    ContentScorer,
    evaluation_ranks,
    popularity_bias,
)
from shared.secagg import SecAggParams

log = logging.getLogger("flwr")

POPULARITY_FILE = "popularity.json"
COOCCURRENCE_FILE = "cooccurrence.json"
TRANSITIONS_FILE = "transitions.json"


def released_popularity(grid: Grid, run: RunConfig, run_dir: RunDirectory, device_config: Mapping[str, Any], *,
                        num_items: int, num_devices: int, secure: SecAggParams | None = None) -> np.ndarray:
    """The run's one popularity release (from `popularity.json` when a resumed run already made it)."""
    path = run_dir.path / POPULARITY_FILE
    if path.exists():
        return np.asarray(json.loads(path.read_text())["histogram"], dtype=np.float64)
    sample_nodes(grid, num_devices, 0)  # waits until every device has joined: each one contributes
    release = federated_popularity(grid, device_config, num_items=num_items,
                                   noise_multiplier=run.pipeline.popularity_noise_multiplier, delta=run.device.delta,
                                   release_id=f"{run_dir.path.name}-popularity", rng=np.random.default_rng(),
                                   secure=secure)
    run_dir.write_json(POPULARITY_FILE, {"histogram": release.histogram.tolist(),
                                         "noise-multiplier": release.noise_multiplier, "devices": release.devices,
                                         "declined": release.declined, "failed": release.failed,
                                         "secure-aggregation": secure is not None})
    log.info("privrec: popularity released (user-level DP, noise multiplier %s) over %d devices "
             "(%d declined, %d failed)", release.noise_multiplier, release.devices, release.declined, release.failed)
    return release.histogram


def released_cooccurrence(grid: Grid, run: RunConfig, run_dir: RunDirectory, device_config: Mapping[str, Any],
                          histogram: np.ndarray, secure: SecAggParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(item ids, released symmetric co-occurrence among them): the run's one co-occurrence release, among the
    items the released popularity ranks highest (from `cooccurrence.json` when a resumed run already made it)."""
    path = run_dir.path / COOCCURRENCE_FILE
    items = top_items(histogram, run.pipeline.cooc_items)
    if path.exists():
        saved = json.loads(path.read_text())
        return np.asarray(saved["items"], dtype=np.int64), cooc_from_release(np.asarray(saved["pairs"]),
                                                                             len(saved["items"]))
    release = federated_cooccurrence(grid, device_config, items=items, window=run.pipeline.cooc_window,
                                     noise_multiplier=run.pipeline.cooc_noise_multiplier, delta=run.device.delta,
                                     release_id=f"{run_dir.path.name}-cooccurrence", rng=np.random.default_rng(),
                                     secure=secure)
    run_dir.write_json(COOCCURRENCE_FILE, {"items": items.tolist(), "pairs": release.histogram.tolist(),
                                           "window": run.pipeline.cooc_window,
                                           "noise-multiplier": release.noise_multiplier, "devices": release.devices,
                                           "declined": release.declined, "failed": release.failed,
                                           "secure-aggregation": secure is not None})
    log.info("privrec: co-occurrence among the top %d items released (user-level DP, noise multiplier %s) over "
             "%d devices (%d declined, %d failed)", len(items), release.noise_multiplier, release.devices,
             release.declined, release.failed)
    return items, cooc_from_release(release.histogram, len(items))


def released_transitions(grid: Grid, run: RunConfig, run_dir: RunDirectory, device_config: Mapping[str, Any],
                         histogram: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(item ids, released directed [K, K] transition counts, threshold): the run's one transition release
    (`transition-release = true`), among the items the released popularity ranks highest (from `transitions.json`
    when a resumed run already made it). The threshold TRANSITION_THRESHOLD x the noise multiplier is public."""
    path = run_dir.path / TRANSITIONS_FILE
    z = run.pipeline.transition_noise_multiplier
    if path.exists():
        saved = json.loads(path.read_text())
        items = np.asarray(saved["items"], dtype=np.int64)
        return items, np.asarray(saved["counts"], dtype=np.float64).reshape(len(items), len(items)), \
            TRANSITION_THRESHOLD * float(saved["noise-multiplier"])
    items = top_items(histogram, run.pipeline.transition_items)
    release = federated_transitions(grid, device_config, items=items, noise_multiplier=z, delta=run.device.delta,
                                    release_id=f"{run_dir.path.name}-transitions", rng=np.random.default_rng())
    run_dir.write_json(TRANSITIONS_FILE, {"items": items.tolist(), "counts": release.histogram.tolist(),
                                          "noise-multiplier": release.noise_multiplier, "devices": release.devices,
                                          "declined": release.declined, "failed": release.failed})
    log.info("privrec: transitions among the top %d items released (user-level DP, noise multiplier %s) over %d "
             "devices (%d declined, %d failed)", len(items), release.noise_multiplier, release.devices,
             release.declined, release.failed)
    return items, release.histogram.reshape(len(items), len(items)), TRANSITION_THRESHOLD * release.noise_multiplier


def initial_scorer(catalogue: Catalogue, histogram: np.ndarray, seed: int,
                   cooc: tuple[np.ndarray, np.ndarray] | None = None,
                   transitions: tuple[np.ndarray, np.ndarray, float] | None = None) -> ContentScorer | ChannelScorer:
    """The scorer before any round: the content scorer, or with `cooc` (item ids, matrix) the channel scorer, with
    `transitions` (item ids, released directed counts, threshold) its transition channel too."""
    torch.manual_seed(seed)
    if cooc is None:
        model = ContentScorer(catalogue.num_items, catalogue.text.shape[1])
    else:
        items, matrix = cooc
        model = ChannelScorer(catalogue.num_items, len(items), 0 if transitions is None else len(transitions[0]))
        model.cooc_items.copy_(torch.from_numpy(items.astype(np.float32)))
        model.cooc.copy_(torch.from_numpy(matrix.astype(np.float32)))
        if transitions is not None:
            t_items, released, threshold = transitions
            model.transition_items.copy_(torch.from_numpy(np.asarray(t_items, dtype=np.float32)))
            model.transitions.copy_(torch.from_numpy(np.asarray(released, dtype=np.float32)))
            model.transition_threshold.fill_(float(threshold))
    model.popularity.copy_(popularity_bias(histogram))
    return model


def load_scorer(state: Mapping[str, torch.Tensor], catalogue: Catalogue, model: str) -> ContentScorer | ChannelScorer:
    kind = ChannelScorer if model == "channel-scorer" else ContentScorer
    return kind.from_state(state, catalogue.num_items, catalogue.text.shape[1])


def central_scorer_evaluation(state: Mapping[str, torch.Tensor], catalogue: Catalogue, store: DeviceStore,
                              run: RunConfig) -> dict[str, Any]:
    """Simulation only: every user's validation and test items, scored as each device would score its own."""
    model = load_scorer(state, catalogue, run.pipeline.model)
    users = store.all_users()
    out: dict[str, Any] = {"label": "central (simulation only: reads every user's held-out items)"}
    for split in ("valid", "test"):
        ranks = evaluation_ranks(model, catalogue, users.train, users.valid, users.test, split,
                                 run.pipeline.profile_items, run.pipeline.profile_decay)
        out[f"{split}-hr@10"] = float(hit_at_k(ranks).mean())
        out[f"{split}-ndcg@10"] = float(ndcg_at_k(ranks).mean())
    return out


def scorer_architecture(catalogue: Catalogue, run: RunConfig, text_info: Mapping[str, Any]) -> dict[str, Any]:
    """What model.pt needs beside its weights to be used again (the text table is rebuilt from the catalogue)."""
    return {"model": run.pipeline.model, "num_items": catalogue.num_items, "dim": int(catalogue.text.shape[1]),
            "profile-items": run.pipeline.profile_items, "profile-decay": run.pipeline.profile_decay,
            "item-text": dict(text_info),
            **({"cooc-channel": COOC_CHANNEL} if run.pipeline.model == "channel-scorer" else {}),
            **({"transition-channel": TRANSITION_CHANNEL}
               if run.pipeline.model == "channel-scorer" and run.pipeline.transition_release else {})}


__all__ = ["COOCCURRENCE_FILE", "POPULARITY_FILE", "TRANSITIONS_FILE", "central_scorer_evaluation", "initial_scorer",
           "load_scorer", "released_cooccurrence", "released_popularity", "released_transitions",
           "scorer_architecture"]
