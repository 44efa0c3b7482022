"""What one device does under `model = content-scorer` or `channel-scorer`: its gradient of the scorer, and its
own evaluation.

Plain torch/numpy (`shared.scorer`); the Flower message handling lives in `client/app.py`. The device computes
its profile and proximities from its own history; only the weights `global - gradient` and scalar counts leave
it (the channel scorer's channels also use the released co-occurrence the model carries, and the device removes
its own contribution to it from its training features). The server clips that update and adds the noise
(DP-FedAvg): the guarantee is user-level against whoever sees the released models, not against the server. With
`secure-aggregation = true`, `client.secagg.secagg_mod` clips it on the device, adds the device's noise share and
masks it: the server sees only sums, and the guarantee also holds against it.

Every round the device takes part in is recorded in its ledger as a user-level release *before* the update
leaves, without sampling amplification (the device knows it was sampled): an over-statement of what the run's
accountant counts for it, never an under-statement. A device whose next release would pass its cap
(`max-epsilon` > 0) declines and sends nothing but the refusal.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import torch

from shared.analytics import COOC_GAP_DECAY
from shared.config import RunConfig
from shared.data.store import ITEMS_FILE, DeviceData
from shared.errors import PrivrecError
from shared.privacy.accounting import epsilon_from_state
from shared.privacy.ledger import ledger_lock, load_ledger, save_ledger
from shared.scorer import (
    Catalogue,
    ChannelScorer,
    ContentScorer,
    channel_user_gradient,
    evaluation_sums,
    fedsgd_update,
    read_catalogue,
    sasrec_channel_config,
    scorer_from_state,
    sent_back,
    user_gradient,
)

ROUND_RELEASE = "content-scorer-round"
CHANNEL_ROUND_RELEASE = "channel-scorer-round"
SECURE_ROUND = ("clipped on the device + its Gaussian share N(0, (z C)^2 / secagg-min-cohort), masked under secure "
                "aggregation (the server sees only sums of at least secagg-min-cohort devices)")


def public_side(store_dir: str | Path, expected_key: str | None) -> Catalogue:
    """The public item side from this device's copy of the catalogue; `expected_key` (the server's text
    features) must match. Kept per process: it is public and the same for every message of a run."""
    items = Path(store_dir) / ITEMS_FILE
    return _public_side(str(store_dir), items.stat().st_mtime_ns, expected_key)


@lru_cache(maxsize=4)
def _public_side(store_dir: str, items_mtime_ns: int, expected_key: str | None) -> Catalogue:
    from shared.text.features import store_text_features

    features = store_text_features(store_dir)
    if expected_key is not None and str(expected_key) != features.key:
        raise PrivrecError(f"{store_dir}: this catalogue's text features are {features.key}, but the global model "
                           f"was built on {expected_key}: the catalogues differ")
    return read_catalogue(Path(store_dir) / ITEMS_FILE, features.vectors)


def _model(catalogue: Catalogue, global_state: Mapping[str, torch.Tensor], run: RunConfig
           ) -> ContentScorer | ChannelScorer:
    return scorer_from_state(global_state, catalogue, run.pipeline.model, sasrec_channel_config(run, catalogue))


@lru_cache(maxsize=4)
def _consenting(store_dir: str, seed: int, public_share: float) -> frozenset[int]:
    from shared.consent import consenting_draw
    from shared.data.store import open_store

    return frozenset(int(d) for d in consenting_draw(seed, public_share, open_store(store_dir).num_devices))


def is_consenting(run: RunConfig, store_dir: str | Path, device_index: int) -> bool:
    """Whether this simulated device's user is in the consenting cohort (`public-share`), drawn as the server draws
    it from the run seed."""
    if run.federation.public_share <= 0:
        return False
    return device_index in _consenting(str(store_dir), run.federation.seed, run.federation.public_share)


def train_scorer(data: DeviceData, catalogue: Catalogue, global_state: Mapping[str, torch.Tensor], run: RunConfig,
                 *, ledger_path: Path, device: str, release_id: str,
                 consenting: bool = False) -> tuple[dict | None, dict]:
    """(weights to send, or None when the device declines; the reply's metrics).

    A `consenting` device (its history already trained the SASRec channel on the server) sends the global weights
    back unchanged: a zero update, so the round's sum holds nothing of it (its SASRec scores are fitted to its own
    items and would overstate that channel; `simulations/consent_channel.py`) while the noise stays the same.
    It reads nothing of its data for it, so its ledger records no release."""
    if consenting:
        return sent_back(global_state), {"num-examples": 1, "steps": 0, "consenting": 1}
    z = run.user_dp.noise_multiplier
    with ledger_lock(ledger_path):
        ledger = load_ledger(ledger_path, device)
        history = ledger.user_level_history() + [[z, 1.0, 1]]
        epsilon = epsilon_from_state({"history": history, "mechanism": "rdp"}, run.device.delta, "rdp")
        cap = run.device.max_epsilon
        if cap > 0 and epsilon > cap:
            return None, {"declined": 1, "num-examples": 0, "steps": 0}
        kind = CHANNEL_ROUND_RELEASE if run.pipeline.model == "channel-scorer" else ROUND_RELEASE
        ledger.releases.append({"kind": kind, "release": release_id, "unit": "user",
                                "relation": "add/remove one user",
                                "mechanism": SECURE_ROUND if run.secure_aggregation.enabled else
                                "server-side clipped sum + Gaussian (the server sees this update)",
                                "noise_multiplier": z, "sample_rate": 1.0, "steps": 1,
                                "user-level-epsilon": epsilon, "delta": run.device.delta, "accountant": "rdp"})
        save_ledger(ledger_path, ledger)  # recorded before the update leaves: over-report, never under-report
    model = _model(catalogue, global_state, run)
    if isinstance(model, ChannelScorer):
        grads = channel_user_gradient(model, catalogue, data.train, run.pipeline.scorer_targets,
                                      run.pipeline.profile_items, run.pipeline.profile_decay,
                                      run.pipeline.cooc_window, COOC_GAP_DECAY)
    else:
        grads = user_gradient(model, catalogue, data.train, run.pipeline.scorer_targets, run.pipeline.profile_items,
                              run.pipeline.profile_decay)
    # FedAvg weight 1 and a config step count: nothing in the metrics depends on the device's data. With a
    # consenting cohort every reply says whether it is one (Flower aggregates only replies with the same keys).
    return fedsgd_update(model, grads), {"num-examples": 1, "steps": 1,
                                         **({"consenting": 0} if run.federation.public_share > 0 else {})}


def evaluate_scorer(data: DeviceData, catalogue: Catalogue, global_state: Mapping[str, torch.Tensor],
                    run: RunConfig) -> dict[str, float | int]:
    """HR@10 / NDCG@10 sums over this device's users (validation and test items), scored on the device."""
    model = _model(catalogue, global_state, run)
    return {"num-examples": len(data.test),
            **evaluation_sums(model, catalogue, data.train, data.valid, data.test, run.pipeline.profile_items,
                              run.pipeline.profile_decay)}


__all__ = ["evaluate_scorer", "is_consenting", "public_side", "train_scorer"]
