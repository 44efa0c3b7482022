"""Reference results for every federated run: same split, same metric code, no federation, no DP.

* Popularity: items ranked by how often they occur in the *training* histories (never valid/test).
* Centralized SASRec: one model trained with plain Adam on the union of every user's training
  windows -- the SAME non-overlapping windows devices train on (``shared.data.windows.history_windows``)
  -- so the gap to federated/DP results is due to federation and privacy only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from shared.data.windows import history_windows
from shared.errors import PrivrecError
from shared.metrics import eval_inputs, hit_at_k, ndcg_at_k, target_ranks
from shared.model import ModelConfig, SASRec
from shared.training import LocalTrainConfig, train_local

__all__ = ["evaluate_popularity", "popularity_scores", "train_centralized"]


def popularity_scores(train: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """Interaction counts per item from the training histories: float64 ``[num_items + 1]``.

    Index = item id (column 0 = padding, always 0), so it lines up with model score columns.
    """
    counts = np.zeros(num_items + 1, dtype=np.float64)
    for seq in train:
        seq = np.asarray(seq, dtype=np.int64).reshape(-1)
        if seq.size and (seq.min() < 1 or seq.max() > num_items):
            raise PrivrecError(
                f"training history holds an item id outside 1..num_items={num_items}"
            )
        counts += np.bincount(seq, minlength=num_items + 1)[: num_items + 1]
    counts[0] = 0.0
    return counts


def evaluate_popularity(
    train: Sequence[np.ndarray],
    valid: np.ndarray,
    test: np.ndarray,
    num_items: int,
    split: str = "test",
    k: int = 10,
    batch_size: int = 1024,
) -> dict[str, np.ndarray]:
    """Per-user ``{"hit", "ndcg", "rank"}`` of the popularity ranking (history masked, like models)."""
    _, targets, exclude = eval_inputs(train, valid, test, split)
    pop = torch.from_numpy(popularity_scores(train, num_items))
    ranks = np.zeros(targets.shape[0], dtype=np.int64)
    for start in range(0, targets.shape[0], batch_size):
        stop = min(start + batch_size, targets.shape[0])
        scores = pop.unsqueeze(0).expand(stop - start, -1)
        ranks[start:stop] = target_ranks(
            scores, torch.from_numpy(targets[start:stop]), exclude[start:stop]
        )
    return {"hit": hit_at_k(ranks, k), "ndcg": ndcg_at_k(ranks, k), "rank": ranks}


def train_centralized(
    train: Sequence[np.ndarray],
    num_items: int,
    model_cfg: ModelConfig,
    window: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: Callable[[int, int, float], None] | None = None,
    item_text: torch.Tensor | None = None,
) -> SASRec:
    """Plain (non-DP, non-federated) Adam training of a fresh SASRec on all users' windows.

    ``progress(epoch, epochs, mean_loss)`` (1-based epoch) is called after every epoch if given.
    """
    if model_cfg.num_items != num_items:
        raise PrivrecError(
            f"model_cfg.num_items={model_cfg.num_items} differs from num_items={num_items}"
        )
    windows = history_windows(train, window)
    if windows.shape[0] == 0:
        raise PrivrecError(f"no training window of length >= 2 with window={window}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SASRec(model_cfg, item_text)
    cfg = LocalTrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, dp=False, seed=seed)

    def on_epoch(epoch: int, loss: float) -> None:
        if progress is not None:
            progress(epoch + 1, epochs, loss)

    train_local(model, windows, cfg, on_epoch=on_epoch)
    model.eval()
    return model
