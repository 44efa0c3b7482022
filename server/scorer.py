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

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from server.analytics import Release, federated_cooccurrence, federated_popularity, federated_transitions
from server.run_dir import RunDirectory
from shared.analytics import cooc_from_release, top_items
from shared.config import RunConfig
from shared.data.store import DeviceStore
from shared.metrics import hit_at_k, ndcg_at_k
from shared.model import SASRec
from shared.scorer import (
    COOC_CHANNEL,
    SASREC_CHANNEL,
    TRANSITION_CHANNEL,
    TRANSITION_THRESHOLD,
    Catalogue,
    ChannelScorer,
    ContentScorer,
    evaluation_ranks,
    popularity_bias,
    sasrec_channel_config,
    scorer_from_state,
)
from shared.secagg import SecAggParams

log = logging.getLogger("flwr")

POPULARITY_FILE = "popularity.json"
COOCCURRENCE_FILE = "cooccurrence.json"
TRANSITIONS_FILE = "transitions.json"


def released_popularity(grid: Grid, run: RunConfig, run_dir: RunDirectory, device_config: Mapping[str, Any], *,
                        num_items: int, num_devices: int, secure: SecAggParams | None = None) -> np.ndarray:
    """The run's one popularity release (from `popularity.json` when a resumed run already made it)."""

    def release() -> Release:
        sample_nodes(grid, num_devices, 0)  # waits until every device has joined: each one contributes
        return federated_popularity(grid, device_config, num_items=num_items,
                                    noise_multiplier=run.pipeline.popularity_noise_multiplier, delta=run.device.delta,
                                    release_id=f"{run_dir.path.name}-popularity", rng=np.random.default_rng(),
                                    secure=secure)

    saved = recorded_release(run_dir, POPULARITY_FILE, "popularity", release,
                             lambda made: {"histogram": made.histogram.tolist(),
                                           "secure-aggregation": secure is not None})
    return np.asarray(saved["histogram"], dtype=np.float64)


def released_cooccurrence(grid: Grid, run: RunConfig, run_dir: RunDirectory, device_config: Mapping[str, Any],
                          histogram: np.ndarray, secure: SecAggParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(item ids, released symmetric co-occurrence among them): the run's one co-occurrence release, among the
    items the released popularity ranks highest (from `cooccurrence.json` when a resumed run already made it)."""
    items = top_items(histogram, run.pipeline.cooc_items)
    saved = recorded_release(
        run_dir, COOCCURRENCE_FILE, f"co-occurrence among the top {len(items)} items",
        lambda: federated_cooccurrence(grid, device_config, items=items, window=run.pipeline.cooc_window,
                                       noise_multiplier=run.pipeline.cooc_noise_multiplier, delta=run.device.delta,
                                       release_id=f"{run_dir.path.name}-cooccurrence", rng=np.random.default_rng(),
                                       secure=secure),
        lambda made: {"items": items.tolist(), "pairs": made.histogram.tolist(), "window": run.pipeline.cooc_window,
                      "secure-aggregation": secure is not None})
    return (np.asarray(saved["items"], dtype=np.int64),
            cooc_from_release(np.asarray(saved["pairs"], dtype=np.float64), len(saved["items"])))


def released_transitions(grid: Grid, run: RunConfig, run_dir: RunDirectory, device_config: Mapping[str, Any],
                         histogram: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(item ids, released directed [K, K] transition counts, threshold): the run's one transition release
    (`transition-release = true`), among the items the released popularity ranks highest (from `transitions.json`
    when a resumed run already made it). The threshold TRANSITION_THRESHOLD x the noise multiplier is public."""
    items = top_items(histogram, run.pipeline.transition_items)
    saved = recorded_release(
        run_dir, TRANSITIONS_FILE, f"transitions among the top {len(items)} items",
        lambda: federated_transitions(grid, device_config, items=items,
                                      noise_multiplier=run.pipeline.transition_noise_multiplier,
                                      delta=run.device.delta, release_id=f"{run_dir.path.name}-transitions",
                                      rng=np.random.default_rng()),
        lambda made: {"items": items.tolist(), "counts": made.histogram.tolist()})
    k = len(saved["items"])
    return (np.asarray(saved["items"], dtype=np.int64),
            np.asarray(saved["counts"], dtype=np.float64).reshape(k, k),
            TRANSITION_THRESHOLD * float(saved["noise-multiplier"]))


def recorded_release(run_dir: RunDirectory, name: str, what: str, release: Callable[[], Release],
                     fields: Callable[[Release], dict[str, Any]]) -> dict[str, Any]:
    """The run's one `what` release as its record `name` in the run directory holds it.

    A resumed run that already made it reads the record back: the devices are not asked again, so their ledgers
    are not charged twice and the accountant's one release stays one. Otherwise `release()` makes it, and its
    record (`fields(release)` and the release's noise and head counts) is written atomically before anything
    uses it: a crash after the devices paid leaves no record or the whole one; with none, a resume asks the
    devices again and they pay again (counted twice, never lost).
    """
    path = run_dir.path / name
    if path.exists():
        return json.loads(path.read_text())
    made = release()
    record = {**fields(made), "noise-multiplier": made.noise_multiplier, "devices": made.devices,
              "declined": made.declined, "failed": made.failed}
    run_dir.write_json(name, record)
    log.info("privrec: %s released (user-level DP, noise multiplier %s) over %d devices (%d declined, %d failed)",
             what, made.noise_multiplier, made.devices, made.declined, made.failed)
    return record


def initial_scorer(catalogue: Catalogue, histogram: np.ndarray, seed: int,
                   cooc: tuple[np.ndarray, np.ndarray] | None = None,
                   transitions: tuple[np.ndarray, np.ndarray, float] | None = None,
                   sasrec: SASRec | None = None) -> ContentScorer | ChannelScorer:
    """The scorer before any round: the content scorer, or with `cooc` (item ids, matrix) the channel scorer, with
    `transitions` (item ids, released directed counts, threshold) its transition channel too, with `sasrec` (a
    consenting cohort's pretrained SASRec) its SASRec channel."""
    torch.manual_seed(seed)
    if cooc is None:
        model = ContentScorer(catalogue.num_items, catalogue.text.shape[1])
    else:
        items, matrix = cooc
        model = ChannelScorer(catalogue.num_items, len(items), 0 if transitions is None else len(transitions[0]),
                              sasrec)
        model.cooc_items.copy_(torch.from_numpy(items.astype(np.float32)))
        model.cooc.copy_(torch.from_numpy(matrix.astype(np.float32)))
        if transitions is not None:
            t_items, released, threshold = transitions
            model.transition_items.copy_(torch.from_numpy(np.asarray(t_items, dtype=np.float32)))
            model.transitions.copy_(torch.from_numpy(np.asarray(released, dtype=np.float32)))
            model.transition_threshold.fill_(float(threshold))
    model.popularity.copy_(popularity_bias(histogram))
    return model


def load_scorer(state: Mapping[str, torch.Tensor], catalogue: Catalogue,
                run: RunConfig) -> ContentScorer | ChannelScorer:
    return scorer_from_state(state, catalogue, run.pipeline.model, sasrec_channel_config(run, catalogue))


def central_scorer_evaluation(state: Mapping[str, torch.Tensor], catalogue: Catalogue, store: DeviceStore,
                              run: RunConfig) -> dict[str, Any]:
    """Simulation only: every user's validation and test items, scored as each device would score its own."""
    model = load_scorer(state, catalogue, run)
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
               if run.pipeline.model == "channel-scorer" and run.pipeline.transition_release else {}),
            **({"sasrec-channel": {"what": SASREC_CHANNEL, **dataclasses.asdict(sasrec)}}
               if (sasrec := sasrec_channel_config(run, catalogue)) is not None else {})}


__all__ = ["COOCCURRENCE_FILE", "POPULARITY_FILE", "TRANSITIONS_FILE", "central_scorer_evaluation", "initial_scorer",
           "load_scorer", "recorded_release", "released_cooccurrence", "released_popularity", "released_transitions",
           "scorer_architecture"]
