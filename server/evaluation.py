"""Central evaluation of the global model: a SIMULATION-ONLY convenience.

It reads every user's held-out items from the simulation store, which no real server can do.
Results are labelled "central" everywhere they appear; federated evaluation is the deployable one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from shared.data.store import DeviceStore
from shared.metrics import eval_inputs, evaluate_histories, summarize
from shared.model import ModelConfig, SASRec


def central_evaluation(model_cfg: ModelConfig, state: Mapping[str, torch.Tensor], store: DeviceStore,
                       seed: int = 0) -> dict[str, Any]:
    model = SASRec.from_state(model_cfg, state)
    users = store.all_users()
    out: dict[str, Any] = {"label": "central (simulation only: reads every user's held-out items)"}
    for split in ("valid", "test"):
        inputs, targets, exclude = eval_inputs(users.train, users.valid, users.test, split)
        summary = summarize(evaluate_histories(model, inputs, targets, exclude, k=10), k=10, seed=seed)
        out.update({f"{split}-{k}": v for k, v in summary.items()})
    return out
