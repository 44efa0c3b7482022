"""Central evaluation of the global model: a SIMULATION-ONLY convenience.

It reads every user's held-out items from the simulation store, which no real server can do.
Results are labelled "central" everywhere they appear; federated evaluation is the deployable one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from shared.coldstart import cold_items, split_summary
from shared.data.store import DeviceStore
from shared.metrics import eval_inputs, evaluate_histories
from shared.model import ModelConfig, SASRec


def central_evaluation(model_cfg: ModelConfig, state: Mapping[str, torch.Tensor], store: DeviceStore,
                       seed: int = 0, item_text: torch.Tensor | None = None,
                       cold_share: float = 0.0) -> dict[str, Any]:
    """valid/test HR@10 and NDCG@10; with the cold-start protocol on, also test-cold-* and test-warm-*."""
    model = SASRec.from_state(model_cfg, state, item_text)
    users = store.all_users()
    cold = cold_items(store.num_items, cold_share, seed)
    out: dict[str, Any] = {"label": "central (simulation only: reads every user's held-out items)"}
    for split in ("valid", "test"):
        inputs, targets, exclude = eval_inputs(users.train, users.valid, users.test, split)
        parts = split_summary(evaluate_histories(model, inputs, targets, exclude, k=10), targets, cold, seed=seed)
        out.update({f"{split}-{k}": v for k, v in parts["all"].items()})
        if cold_share and split == "test":
            for name in ("cold", "warm"):
                out.update({f"test-{name}-{k}": v for k, v in parts[name].items()})
    return out
