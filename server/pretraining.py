"""Optional non-private pretraining on a consenting cohort, before any private round.

Some users agree to share their training histories (a public or opted-in cohort). The server trains
the initial global model on exactly those histories, centrally and without DP; private federated
fine-tuning then starts from a model that already knows item popularity and co-occurrence, so the
noisy on-device updates only have to refine it. The consenting users get no privacy guarantee for
the histories they shared; everybody else's guarantee is unchanged (their data is not touched here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from shared.baselines import train_centralized
from shared.coldstart import held_out_items, without_items
from shared.config import RunConfig
from shared.consent import consenting_devices
from shared.data.store import DeviceStore
from shared.metrics import eval_inputs, evaluate_histories
from shared.model import ModelConfig, SASRec

PRETRAIN_LR = 0.001  # the centralized baseline's settings (`privrec baseline centralized`)
PRETRAIN_BATCH = 64


def pretrain(cfg: RunConfig | Mapping[str, Any], store: DeviceStore, model_cfg: ModelConfig,
             item_text: torch.Tensor | None = None) -> tuple[SASRec, dict[str, Any]]:
    run = RunConfig.of(cfg)
    devices = consenting_devices(run, store.num_devices)
    histories = [seq for d in devices for seq in store.device(int(d)).train]
    held_out = held_out_items(run, store.num_items)
    if held_out is not None:  # the cold-start protocol holds its items out of every training history
        histories = without_items(histories, held_out)
    model = train_centralized(histories, store.num_items, model_cfg, window=run.device.window,
                              epochs=run.federation.public_epochs, lr=PRETRAIN_LR, batch_size=PRETRAIN_BATCH,
                              seed=run.federation.seed, item_text=item_text)
    info = {"consenting-devices": int(devices.size), "consenting-users": len(histories),
            "interactions": int(sum(len(h) for h in histories)), "epochs": run.federation.public_epochs}
    return model, info


def pretraining_reference(model: SASRec, store: DeviceStore) -> dict[str, Any]:
    """The pretrained model alone on every user's validation and test items (full ranking, own history
    excluded): what the consenting cohort gives without any private round. Simulation only: it reads every
    user's held-out items on the server."""
    users = store.all_users()
    out: dict[str, Any] = {"label": "pretraining only (simulation only: reads every user's held-out items)"}
    for split in ("valid", "test"):
        per_user = evaluate_histories(model, *eval_inputs(users.train, users.valid, users.test, split))
        out[f"{split}-hr@10"] = float(per_user["hit"].mean())
        out[f"{split}-ndcg@10"] = float(per_user["ndcg"].mean())
    return out
