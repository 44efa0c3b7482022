"""Full-catalogue ranking metrics (HR@k, NDCG@k) and bootstrap confidence intervals.

Conventions
-----------
* Scores are ``[B, N + 1]``: column 0 is padding and never ranked; items are columns ``1..N``.
* Each user's *exclude* items (their history) are masked out before ranking. A target that is also in
  the exclude set is masked too and therefore counts as a **miss** (rank ``N - 1``, the worst rank).
* Ties are broken pessimistically: rank = number of other catalogue items whose score is ``>=`` the
  target's score (0-based), so a constant scorer gets no credit from ties.
* Evaluation inputs (used everywhere, see :func:`eval_inputs`):
  ``split="valid"``: input = train sequence, target = valid item, exclude = train items;
  ``split="test"``: input = train + [valid], target = test item, exclude = train + [valid].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from shared.errors import PrivrecError

__all__ = [
    "bootstrap_ci",
    "eval_inputs",
    "evaluate_histories",
    "hit_at_k",
    "left_pad",
    "ndcg_at_k",
    "summarize",
    "target_ranks",
]


def target_ranks(scores: Tensor, targets: Tensor, exclude: Sequence[np.ndarray]) -> np.ndarray:
    """0-based rank of each target among items ``1..N`` (see module doc for masking and ties)."""
    scores = torch.as_tensor(scores).detach().to(torch.float64).clone()
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    b, width = scores.shape
    if targets.shape[0] != b or len(exclude) != b:
        raise ValueError(
            f"target_ranks: {b} score rows, {targets.shape[0]} targets, {len(exclude)} exclude lists"
        )
    if b == 0:
        return np.zeros(0, dtype=np.int64)
    if int(targets.min()) < 1 or int(targets.max()) >= width:
        raise ValueError(f"target_ranks: targets must be item ids in 1..{width - 1}")
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    for i, ex in enumerate(exclude):
        ex = np.asarray(ex, dtype=np.int64).reshape(-1)
        if ex.size:
            scores[i, torch.from_numpy(ex)] = float("-inf")
    item_scores = scores[:, 1:]  # drop padding column
    target_scores = scores[torch.arange(b), targets]
    ranks = (item_scores >= target_scores[:, None]).sum(dim=1) - 1  # minus the target itself
    return ranks.numpy().astype(np.int64)


def hit_at_k(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per user: 1.0 if the target is in the top k (rank < k), else 0.0."""
    ranks = np.asarray(ranks)
    return (ranks < k).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per user: ``1 / log2(rank + 2)`` if rank < k else 0 (single relevant item)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def bootstrap_ci(
    values: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval.

    * ``weights is None``: ``values`` are per-unit metrics (e.g. per-user HR); the statistic is their
      mean. Units are resampled with replacement ``n_boot`` times.
    * ``weights`` given: a ratio estimator. ``values[i]`` is unit i's metric **sum** and ``weights[i]``
      its count (e.g. a device's summed hits and its number of users); the statistic is
      ``sum(values) / sum(weights)`` over the resampled units (resampling whole units keeps the
      within-unit correlation). Resamples whose weights sum to 0 are dropped.

    Returns ``(nan, nan)`` for no units.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    n = values.shape[0]
    if not (0.0 < level < 1.0):
        raise PrivrecError(f"bootstrap level must be in (0, 1), got level={level!r}")
    if n_boot < 1:
        raise PrivrecError(f"bootstrap n_boot must be >= 1, got n_boot={n_boot!r}")
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64).reshape(-1)
        if weights.shape[0] != n:
            raise ValueError(f"bootstrap_ci: {n} values but {weights.shape[0]} weights")
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 2_000_000 // n)  # bound memory of the index matrix
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        if weights is None:
            stats[start:stop] = values[idx].mean(axis=1)
        else:
            w = weights[idx].sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                stats[start:stop] = np.where(w > 0, values[idx].sum(axis=1) / w, np.nan)
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def eval_inputs(
    train: Sequence[np.ndarray], valid: np.ndarray, test: np.ndarray, split: str
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """(inputs, targets, exclude) for ``split`` in {"valid", "test"} (see module doc)."""
    valid = np.asarray(valid, dtype=np.int64).reshape(-1)
    test = np.asarray(test, dtype=np.int64).reshape(-1)
    if len(train) != valid.shape[0] or len(train) != test.shape[0]:
        raise ValueError(
            f"eval_inputs: {len(train)} train histories, {valid.shape[0]} valid, {test.shape[0]} test"
        )
    train = [np.asarray(t, dtype=np.int64).reshape(-1) for t in train]
    if split == "valid":
        inputs = train
        targets = valid
    elif split == "test":
        inputs = [np.concatenate([t, valid[i : i + 1]]) for i, t in enumerate(train)]
        targets = test
    else:
        raise PrivrecError(f"split must be 'valid' or 'test', got split={split!r}")
    exclude = [np.unique(x) for x in inputs]
    return inputs, targets.copy(), exclude


def left_pad(seqs: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """Last ``max_len`` items of each sequence, left-padded with 0 -> int64 ``[B, max_len]``."""
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64).reshape(-1)[-max_len:]
        if s.size:
            out[i, max_len - s.size :] = s
    return out


def evaluate_histories(
    model,
    inputs: Sequence[np.ndarray],
    targets: np.ndarray,
    exclude: Sequence[np.ndarray],
    k: int = 10,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Per-user ``{"hit", "ndcg", "rank"}`` of ``model`` (eval mode, no grad; mode restored after)."""
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if len(inputs) != targets.shape[0] or len(exclude) != targets.shape[0]:
        raise ValueError("evaluate_histories: inputs, targets and exclude differ in length")
    max_len = model.cfg.max_len
    ranks = np.zeros(targets.shape[0], dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, targets.shape[0], batch_size):
                stop = min(start + batch_size, targets.shape[0])
                batch = torch.from_numpy(left_pad(inputs[start:stop], max_len))
                scores = model.predict_next(batch)
                ranks[start:stop] = target_ranks(
                    scores, torch.from_numpy(targets[start:stop]), list(exclude[start:stop])
                )
    finally:
        model.train(was_training)
    return {"hit": hit_at_k(ranks, k), "ndcg": ndcg_at_k(ranks, k), "rank": ranks}


def summarize(per_user: dict[str, np.ndarray], k: int = 10, seed: int = 0) -> dict:
    """``{"hr@k", "hr@k-ci", "ndcg@k", "ndcg@k-ci", "users"}`` with 95% percentile-bootstrap CIs.

    Recomputes hit/ndcg from ``per_user["rank"]`` at this ``k`` when ranks are present.
    """
    if "rank" in per_user:
        ranks = np.asarray(per_user["rank"])
        hit, ndcg = hit_at_k(ranks, k), ndcg_at_k(ranks, k)
    else:
        hit, ndcg = np.asarray(per_user["hit"], float), np.asarray(per_user["ndcg"], float)
    n = int(hit.shape[0])
    mean = (lambda a: float(a.mean())) if n else (lambda a: float("nan"))
    return {
        f"hr@{k}": mean(hit),
        f"hr@{k}-ci": list(bootstrap_ci(hit, seed=seed)),
        f"ndcg@{k}": mean(ndcg),
        f"ndcg@{k}-ci": list(bootstrap_ci(ndcg, seed=seed)),
        "users": n,
    }
