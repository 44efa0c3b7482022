"""`privrec baseline popularity|content --epsilon E`: the private baselines, run as federated analytics.

The server (`server.analytics.federated_popularity`) sends one `query.popularity` message to every device
through the real ClientApp (`client.app`, via the in-process grid: same Grid interface as a deployment,
no Ray); each device records the release in its ledger and replies with its unit-norm item-set vector;
the server sums and adds Gaussian noise once. The released histogram is then the popularity score
(popularity) or the bias under each device's own text-similarity score (content,
`shared.analytics.content_scores`). Evaluation: full ranking with the project's metric code, own
history excluded; in simulation it runs centrally with the same per-device scoring function a device
would run on its own history (nothing of that profile is released).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.app import app as client_app
from server.analytics import federated_popularity
from shared.analytics import (
    ACCOUNTANT,
    CONTENT_WEIGHT,
    PROFILE_DECAY,
    PROFILE_ITEMS,
    content_scores,
    noise_for_epsilon,
    release_epsilon,
)
from shared.data.store import open_store
from shared.errors import PrivrecError
from shared.metrics import eval_inputs, summarize, target_ranks
from shared.privacy.population import default_population_dir
from simulations.inprocess import InProcessGrid


def _ranks(score_rows, targets: np.ndarray, exclude, batch: int = 256) -> np.ndarray:
    ranks = np.zeros(len(targets), dtype=np.int64)
    for start in range(0, len(targets), batch):
        stop = min(start + batch, len(targets))
        scores = torch.from_numpy(np.stack([score_rows(u) for u in range(start, stop)]))
        ranks[start:stop] = target_ranks(scores, torch.from_numpy(targets[start:stop]), exclude[start:stop])
    return ranks


def run_private_baseline(kind: str, cfg: dict[str, Any], store_dir: str | Path, *, epsilon: float, delta: float,
                         seed: int, text: np.ndarray | None = None) -> dict[str, Any]:
    """Release the DP popularity histogram over every device of the store, then evaluate `kind`.

    `text`: the catalogue's text table (rows = item ids); None = the store's MiniLM features (content only).
    """
    if cfg.get("secure-aggregation"):  # its noise comes from --epsilon, not from a run config the devices share
        raise PrivrecError("config key 'secure-aggregation' = true: the private baselines release their histogram "
                           "without secure aggregation (the server sees each device's vector); set "
                           "secure-aggregation = false")
    z = noise_for_epsilon(epsilon, delta)
    store = open_store(store_dir)
    population = Path(cfg["population-dir"]).expanduser().resolve() if cfg.get("population-dir") \
        else default_population_dir(store_dir)
    device_config = {"data-store": str(store_dir), "state-dir": str(population)}
    grid = InProcessGrid(client_app, store.num_devices, run_config=cfg)
    release = federated_popularity(grid, device_config, num_items=store.num_items, noise_multiplier=z, delta=delta,
                                   release_id=f"baseline-{kind}-seed{seed}", rng=np.random.default_rng(seed))
    if kind == "content" and text is None:
        from shared.text.features import store_text_features

        text = store_text_features(store_dir, progress=False).vectors
    if text is not None:
        text = np.asarray(text, np.float64)
    result: dict[str, Any] = {"baseline": f"{kind} (user-level DP)", "dataset": store.meta.get("dataset"),
                              "users": store.num_users, "devices": release.devices,
                              "declined": release.declined, "failed": release.failed,
                              **_figures(kind, release.histogram, store.all_users(), text, seed)}
    result.update(_privacy(kind, z, epsilon, delta))
    return result


def _figures(kind: str, histogram: np.ndarray, users, text: np.ndarray | None, seed: int) -> dict[str, Any]:
    """valid and test figures of `kind` scored from the released `histogram` (content: + on-device similarity)."""
    out = {}
    for split in ("valid", "test"):
        inputs, targets, exclude = eval_inputs(users.train, users.valid, users.test, split)
        if kind == "popularity":
            ranks = _ranks(lambda u: histogram, targets, exclude)
        else:
            ranks = _ranks(lambda u, inputs=inputs: content_scores(inputs[u], histogram, text), targets, exclude)
        out[split] = summarize({"rank": ranks}, seed=seed)
    return out


def reference_baselines(store_dir: str | Path, *, epsilon: float, delta: float, seed: int) -> dict[str, Any]:
    """Both private baselines at `epsilon`, for printing beside a run (simulation only): ONE release computed
    centrally from every user's training items (the same sum and noise the federated query makes, without
    messages or ledgers: it is a reference, not a release of the run), each baseline evaluated on it."""
    from shared.analytics import item_set_vector, noisy_sum
    from shared.text.features import store_text_features

    z = noise_for_epsilon(epsilon, delta)
    store = open_store(store_dir)
    users = store.all_users()
    histogram = noisy_sum(item_set_vector(users.train, store.num_items), z, np.random.default_rng(seed))
    text = np.asarray(store_text_features(store_dir, progress=False).vectors, np.float64)
    return {kind: {"baseline": f"{kind} (user-level DP, reference computed centrally)",
                   **_figures(kind, histogram, users, text if kind == "content" else None, seed),
                   **_privacy(kind, z, epsilon, delta)} for kind in ("popularity", "content")}


def _privacy(kind: str, z: float, epsilon: float, delta: float) -> dict[str, Any]:
    result: dict[str, Any] = {}
    eps = release_epsilon(z, delta)
    result["privacy"] = {
        "epsilon": eps[ACCOUNTANT], "epsilon-pld": eps["pld"], "requested-epsilon": epsilon, "delta": delta,
        "accountant": f"{ACCOUNTANT} (Opacus; dp-accounting PLD beside it)", "noise-multiplier": z,
        "unit": "one user's whole history", "relation": "add/remove one user",
        "mechanism": "Gaussian on the sum of per-user item-set vectors of L2 norm 1 (sensitivity 1), one release",
        "adversary": "whoever sees the released histogram; NOT the server, which sees each device's vector "
                     "(no secure aggregation yet)",
    }
    if kind == "content":
        result["content"] = {"weight": CONTENT_WEIGHT, "profile-items": PROFILE_ITEMS, "decay": PROFILE_DECAY,
                             "chosen": "a priori, from earlier ML-100K measurements (issue 13 probes on "
                                       "validation/test), not tuned in this run"}
    return result


def statement(result: dict[str, Any]) -> str:
    p = result["privacy"]
    return (f"user-level epsilon {p['epsilon']:.3f} at delta {p['delta']:g} ({p['accountant']}: PLD gives "
            f"{p['epsilon-pld']:.3f}); unit: {p['unit']}; relation: {p['relation']}; mechanism: {p['mechanism']}, "
            f"noise multiplier {p['noise-multiplier']:.4f}; adversary: {p['adversary']}")
