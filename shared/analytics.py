"""Federated analytics for the private baselines (issue 13, item 1): plain math, no Flower.

One release: a user-level DP item-popularity histogram. Each user contributes their set of training
items weighted 1/sqrt(n) (n distinct items), a vector of L2 norm exactly 1, so adding or removing one
user moves the sum by at most 1 in L2. The server adds N(0, z^2) to every coordinate of the sum once
(a single Gaussian mechanism: q = 1, one step), with z calibrated for the requested epsilon at delta.

The content baseline adds, on the device, the cosine between every item's public text vector and a
recency-weighted profile of the user's own last items; nothing about that profile leaves the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from shared.errors import PrivrecError

# Content baseline: fixed before this command existed, NOT tuned on the split it is reported on. They come
# from earlier measurements on ML-100K (issue 13's probes chose the similarity weight 8-12 on validation;
# simulations/private_pipeline.py's a-priori arm uses 8, last 5 items, decay 0.8 and reports test figures).
CONTENT_WEIGHT = 8.0
PROFILE_ITEMS = 5
PROFILE_DECAY = 0.8
ACCOUNTANT = "rdp"  # Opacus' RDP accountant calibrates; dp-accounting's PLD gives the tighter figure beside it


def check_release_request(epsilon: float, delta: float) -> None:
    """PrivrecError naming the value when the requested budget cannot be a DP release."""
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise PrivrecError(f"--epsilon {epsilon}: must be a finite number > 0")
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and 0 < delta < 1):
        raise PrivrecError(f"--delta {delta}: must be in (0, 1)")


def noise_for_epsilon(epsilon: float, delta: float) -> float:
    """Noise multiplier of one Gaussian release (sensitivity 1) reaching at most `epsilon` at `delta`."""
    from shared.privacy.calibration import calibrate_noise

    check_release_request(epsilon, delta)
    return float(calibrate_noise(epsilon, delta, sample_rate=1.0, steps=1, accountant=ACCOUNTANT))


def release_epsilon(noise_multiplier: float, delta: float) -> dict[str, float]:
    """Epsilon of one Gaussian release at `delta`: Opacus' RDP (the calibrating one) and dp-accounting's PLD."""
    import dp_accounting as dpa
    from dp_accounting.pld import pld_privacy_accountant

    from shared.privacy.accounting import epsilon_from_state

    rdp = epsilon_from_state({"history": [[noise_multiplier, 1.0, 1]], "mechanism": "rdp"}, delta, "rdp")
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dpa.GaussianDpEvent(noise_multiplier))
    return {"rdp": float(rdp), "pld": float(pld.get_epsilon(delta))}


def item_set_vector(train: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """A device's contribution: sum over its users of (the user's distinct training items) / sqrt(n).

    Each user's part has L2 norm exactly 1 (0 for a user with no training items), so the sum over all
    devices has L2 sensitivity 1 under adding or removing one user. Index = item id (0 = padding).
    """
    vector = np.zeros(num_items + 1, dtype=np.float64)
    for seq in train:
        items = np.unique(np.asarray(seq, dtype=np.int64).reshape(-1))
        if items.size:
            vector[items] += 1.0 / math.sqrt(items.size)
    return vector


def noisy_sum(total: np.ndarray, noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """The released histogram: `total` + N(0, z^2) on every item coordinate (padding stays 0)."""
    released = total + rng.normal(0.0, noise_multiplier, total.shape)
    released[0] = 0.0
    return released


def popularity_bias(released: np.ndarray) -> np.ndarray:
    """Score bias from the released histogram: log1p of its positive part."""
    return np.log1p(np.maximum(released, 0.0))


def content_profile(history: np.ndarray, text: np.ndarray, items: int = PROFILE_ITEMS,
                    decay: float = PROFILE_DECAY) -> np.ndarray:
    """Unit vector: decay^k-weighted sum of the text vectors of the user's last `items` items (k = 0 newest)."""
    last = np.asarray(history, dtype=np.int64).reshape(-1)[-items:][::-1]
    profile = (decay ** np.arange(len(last))) @ text[last] if len(last) else np.zeros(text.shape[1])
    return profile / (np.linalg.norm(profile) + 1e-12)


def content_scores(history: np.ndarray, released: np.ndarray, text: np.ndarray,
                   weight: float = CONTENT_WEIGHT) -> np.ndarray:
    """One device's scores for every item: DP popularity bias + weight * cos(item text, own profile).

    `text` rows are unit-normalised here (row 0, padding, may be zero). Runs on the device: it needs
    only the released histogram, the public text table and the device's own history.
    """
    unit = text / (np.linalg.norm(text, axis=1, keepdims=True) + 1e-12)
    return popularity_bias(released) + weight * (unit @ content_profile(history, unit))


# ---------------------------------------------------------------- windowed co-occurrence (channel-scorer)
# Among the K items the released popularity ranks highest (post-processing of that release), each user's
# unordered item pairs at distance d <= window in its training sequence, weighted gap_decay^(d-1); the user's
# vector over the K (K - 1) / 2 pairs is L2-normalised, so one user moves the sum by at most 1 in L2.
COOC_GAP_DECAY = 0.9


def top_items(released_popularity: np.ndarray, k: int) -> np.ndarray:
    """The k item ids the released popularity ranks highest (padding 0 excluded): public post-processing."""
    order = np.argsort(-np.asarray(released_popularity, dtype=np.float64), kind="stable")
    return order[order > 0][:k].astype(np.int64)


def pair_index(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the upper triangle without diagonal of a k x k matrix: the coordinates of the release."""
    return np.triu_indices(k, 1)


def own_cooc_matrix(seq: np.ndarray, items: np.ndarray, window: int, gap_decay: float = COOC_GAP_DECAY
                    ) -> np.ndarray:
    """One user's contribution as a symmetric [K, K] matrix (zero diagonal) over `items` positions: its pair
    weights at distance <= `window`, L2-normalised over the upper triangle (all zero without a pair)."""
    k = len(items)
    position = np.full(int(max(items.max(initial=0), np.max(seq, initial=0))) + 1, -1, dtype=np.int64)
    position[items] = np.arange(k)
    seq = position[np.asarray(seq, dtype=np.int64).reshape(-1)]
    out = np.zeros((k, k))
    for gap in range(1, window + 1):
        a, b = seq[:-gap], seq[gap:]
        kept = (a >= 0) & (b >= 0) & (a != b)
        lo, hi = np.minimum(a[kept], b[kept]), np.maximum(a[kept], b[kept])
        np.add.at(out, (lo, hi), gap_decay ** (gap - 1))
    norm = np.linalg.norm(out)
    if norm > 0:
        out /= norm
    return out + out.T


def cooc_vector(train: Sequence[np.ndarray], items: np.ndarray, window: int,
                gap_decay: float = COOC_GAP_DECAY) -> np.ndarray:
    """A device's contribution to the co-occurrence release: the sum over its users of their unit-norm pair
    vectors (the upper triangles of `own_cooc_matrix`), length K (K - 1) / 2."""
    rows, cols = pair_index(len(items))
    total = np.zeros(len(rows))
    for seq in train:
        total += own_cooc_matrix(seq, items, window, gap_decay)[rows, cols]
    return total


def cooc_from_release(released: np.ndarray, k: int) -> np.ndarray:
    """The symmetric [K, K] matrix (zero diagonal) of a released pair vector."""
    rows, cols = pair_index(k)
    out = np.zeros((k, k))
    out[rows, cols] = released
    return out + out.T


def gaussian_release(total: np.ndarray, noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """`total` + N(0, z^2) on every released coordinate (sensitivity 1: the Gaussian mechanism)."""
    return total + rng.normal(0.0, noise_multiplier, total.shape)


# ---------------------------------------------------------------- next-item transitions (channel-scorer, opt-in)
# `transition-release = true`: among the K items the released popularity ranks highest (post-processing), each
# user's counts of directed consecutive pairs (previous item -> next item, previous != next) in its training
# sequence; the user's K x K count matrix is L2-normalised (norm exactly 1; 0 without such a pair), so adding or
# removing one user moves the sum by at most 1 in L2: one Gaussian mechanism of sensitivity 1.
def transition_sum(train: Sequence[np.ndarray], items: np.ndarray) -> np.ndarray:
    """Sum over the users of `train` of their L2-normalised directed transition counts among `items`, [K, K]
    (row = previous item's position in `items`, column = next item's). A device's contribution is this over its
    own users; the simulation computes it over every user at once (the same numbers)."""
    k = len(items)
    seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in train]
    out = np.zeros(k * k)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    if not len(seqs) or lengths.max(initial=0) < 2:
        return out.reshape(k, k)
    flat = np.concatenate(seqs)
    position = np.full(int(max(flat.max(initial=0), np.max(items, initial=0))) + 1, -1, dtype=np.int64)
    position[np.asarray(items, dtype=np.int64)] = np.arange(k)
    flat = position[flat]
    owner = np.repeat(np.arange(len(seqs)), lengths)
    a, b = flat[:-1], flat[1:]
    kept = (owner[:-1] == owner[1:]) & (a >= 0) & (b >= 0) & (a != b)  # within one user, both among `items`
    keys, counts = np.unique(owner[:-1][kept] * (k * k) + a[kept] * k + b[kept], return_counts=True)
    if not len(keys):
        return out.reshape(k, k)
    users = keys // (k * k)
    norms = np.sqrt(np.bincount(users, weights=counts.astype(np.float64) ** 2, minlength=len(seqs)))
    out = np.bincount(keys % (k * k), weights=counts / norms[users], minlength=k * k)
    return out.reshape(k, k)


def own_transition_matrix(seq: np.ndarray, items: np.ndarray) -> np.ndarray:
    """One user's contribution [K, K] (its L2-normalised directed transition counts among `items`)."""
    return transition_sum([seq], items)
