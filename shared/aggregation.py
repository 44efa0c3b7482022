"""Server-side aggregation of device updates, in plain numpy (no Flower types): FedAvg's weighted mean,
per-row means of item tables, and the server optimizers that take the mean update as a pseudo-gradient.

Why per-row: an item's embedding row gets a gradient only on a device whose windows hold the item.
FedAvg averages that row's update over the whole cohort, so a row touched by 2 of 64 devices moves
~2/64 of what those devices asked for. `per_row_mean` averages each row of an item table over the
devices that touched it instead. Non-private runs only: which rows a device touched is its data.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from shared.errors import PrivrecError

__all__ = ["ITEM_ROW_KEYS", "ServerOptimizer", "is_frozen", "mean_update", "running_average", "touched_rows"]

# Item-indexed arrays of the ID model: row r belongs to item r (row 0 = padding).
ITEM_ROW_KEYS = ("item_emb.weight", "head.weight", "head.bias")


def is_frozen(key: str, frozen: Collection[str]) -> bool:
    """Whether array `key` is in `frozen`: exact names, or prefixes ending in "." (a frozen submodule's arrays,
    e.g. the channel scorer's `sasrec.`)."""
    return key in frozen or any(name.endswith(".") and key.startswith(name) for name in frozen)


def touched_rows(update: np.ndarray) -> np.ndarray:
    """Rows of one device's update that differ from zero: bool ``[rows]``.

    For `item_emb.weight` these are exactly the items in the device's windows (an embedding row that is
    never looked up gets a zero gradient, and Adam/SGD leave it unchanged).
    """
    update = np.asarray(update)
    return np.any(update.reshape(update.shape[0], -1) != 0, axis=1)


def mean_update(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
                row_masks: Sequence[Mapping[str, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """Weighted mean of device updates (FedAvg), or per-row means for the keys in ``row_masks``.

    ``updates[i][key]``: device i's new weights minus the global weights. ``row_masks[i][key]``: bool
    ``[rows]``, the rows device i touched. A masked key's row r is the weighted mean over the devices
    whose mask holds r; a row no device touched gets the plain weighted mean (usually zero).
    """
    if not updates:
        raise PrivrecError("mean_update: no device updates to aggregate")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(updates),) or np.any(w < 0) or w.sum() <= 0:
        raise PrivrecError(f"mean_update: need one non-negative weight per update with a positive sum, got {weights!r}")
    if row_masks is not None and len(row_masks) != len(updates):
        raise PrivrecError(f"mean_update: {len(row_masks)} row masks for {len(updates)} updates")
    out = {}
    for key in updates[0]:
        stacked = np.stack([np.asarray(u[key], dtype=np.float64) for u in updates])  # [devices, ...]
        total = np.tensordot(w, stacked, axes=1)
        if row_masks is None or key not in row_masks[0]:
            out[key] = total / w.sum()
            continue
        masks = np.stack([np.asarray(m[key], dtype=bool) for m in row_masks])  # [devices, rows]
        if masks.shape != stacked.shape[:2]:
            raise PrivrecError(f"mean_update: row mask of {key!r} has shape {masks.shape[1:]}, "
                               f"the update has {stacked.shape[1]} rows")
        row_weight = w @ masks  # [rows]: weight of the devices that touched each row
        masked = np.tensordot(w, stacked * masks.reshape(masks.shape + (1,) * (stacked.ndim - 2)), axes=1)
        touched = row_weight > 0
        scale = row_weight.reshape((-1,) + (1,) * (stacked.ndim - 2))
        out[key] = np.where(touched.reshape(scale.shape), masked / np.where(scale > 0, scale, 1.0), total / w.sum())
    return out


class ServerOptimizer:
    """Applies the mean update to the global weights, treating ``-update`` as the gradient.

    ``kind``: "avg" (x += lr * update; lr = 1 is FedAvg), "avgm" (heavy-ball momentum, FedAvgM),
    "adam" (FedAdam, Reddi et al. 2021, bias-corrected), "yogi" (FedYogi). ``tau`` is the adaptive
    methods' epsilon. State lives here between rounds (`state_dict` / `load_state_dict` for checkpoints).

    ``keys``: the arrays this optimizer steps (None: all); every other array takes the mean update as it
    is (FedAvg's step). With ``keys=ITEM_ROW_KEYS`` a server rate or momentum acts on the sparse item
    rows only, the rows that per-row averaging already rescales.
    """

    KINDS = ("avg", "avgm", "adam", "yogi")

    def __init__(self, *, kind: str = "avg", lr: float = 1.0, momentum: float = 0.9, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3, keys: Collection[str] | None = None):
        if kind not in self.KINDS:
            raise PrivrecError(f"server optimizer: kind={kind!r} must be one of {', '.join(self.KINDS)}")
        if not lr > 0:
            raise PrivrecError(f"server optimizer: lr={lr!r} must be > 0")
        self.kind, self.lr, self.momentum, self.beta1, self.beta2, self.tau = kind, lr, momentum, beta1, beta2, tau
        self.keys = None if keys is None else frozenset(keys)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.steps = 0

    def step(self, weights: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """New global weights (same dtypes as ``weights``) from this round's mean update."""
        self.steps += 1
        new = {}
        for key, x in weights.items():
            d = np.asarray(update[key], dtype=np.float64)
            if self.keys is not None and key not in self.keys:
                new[key] = (np.asarray(x, dtype=np.float64) + d).astype(np.asarray(x).dtype)
                continue
            if self.kind == "avg":
                step = d
            elif self.kind == "avgm":
                self.m[key] = self.momentum * self.m.get(key, 0.0) + d
                step = self.m[key]
            else:
                self.m[key] = self.beta1 * self.m.get(key, 0.0) + (1 - self.beta1) * d
                v = self.v.get(key, np.zeros_like(d))
                if self.kind == "adam":
                    v = self.beta2 * v + (1 - self.beta2) * d * d
                else:  # Yogi: v moves toward d^2 additively, never faster than Adam's
                    v = v - (1 - self.beta2) * d * d * np.sign(v - d * d)
                self.v[key] = v
                m_hat = self.m[key] / (1 - self.beta1 ** self.steps)
                v_hat = v / (1 - self.beta2 ** self.steps)
                step = m_hat / (np.sqrt(v_hat) + self.tau)
            new[key] = (np.asarray(x, dtype=np.float64) + self.lr * step).astype(np.asarray(x).dtype)
        return new

    def state_dict(self) -> dict:
        return {"kind": self.kind, "steps": self.steps, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: Mapping) -> None:
        if state["kind"] != self.kind:
            raise PrivrecError(f"server optimizer: checkpoint is for {state['kind']!r}, not {self.kind!r}")
        self.steps, self.m, self.v = int(state["steps"]), dict(state["m"]), dict(state["v"])


def running_average(average: Mapping[str, np.ndarray] | None, weights: Mapping[str, np.ndarray],
                    decay: float) -> dict[str, np.ndarray]:
    """Exponential moving average of the global weights over rounds (``decay`` per round; None starts it).

    Training continues from the global weights; the average is the model to evaluate and release. It damps
    the round-to-round noise of a constant-rate federation at no training cost.
    """
    if not 0.0 <= decay < 1.0:
        raise PrivrecError(f"running_average: decay={decay!r} must be in [0, 1)")
    if average is None:
        return {k: np.array(v, copy=True) for k, v in weights.items()}
    return {k: (decay * np.asarray(average[k], dtype=np.float64)
                + (1 - decay) * np.asarray(weights[k], dtype=np.float64)).astype(np.asarray(weights[k]).dtype)
            for k in weights}
