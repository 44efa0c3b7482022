"""Windows: the privacy unit of on-device DP training (neighbouring relation: add/remove one window)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.coldstart import without_items
from shared.errors import PrivrecError


def make_windows(train_seq: np.ndarray, window: int) -> np.ndarray:
    """Cut a chronological training sequence into non-overlapping windows of `window` items.

    Windows are aligned to the most recent end: the last window ends at the newest item, and only
    the oldest window may be shorter than `window`. A leftover shorter than 2 items is dropped (it
    holds no input -> target pair). Each window is left-padded with 0 to length `window`; rows are
    returned oldest first as an int64 array of shape [n_windows, window] ([0, window] if none).

    Privacy: windows do not overlap, so every interaction belongs to at most one window, i.e. to at
    most one DP-SGD training example, and DP-SGD's guarantee (add/remove one window) covers any single
    window. For a single interaction that covers *replacing* its item (one window changes: group
    privacy of two add/remove steps), but not *inserting or deleting* it: windows are cut from the
    newest item backwards, so an insertion or deletion shifts every older window. Overlapping
    (sliding) windows would let one interaction influence several examples and break even the
    replacement claim.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2:
        raise PrivrecError(f"window={window!r}: must be an integer >= 2 (an input and a target)")
    window = int(window)
    seq = np.asarray(train_seq)
    if seq.ndim != 1:
        raise PrivrecError(f"make_windows: train_seq must be 1-D, got shape {seq.shape}")
    seq = seq.astype(np.int64, copy=False)

    n_full, leftover = divmod(len(seq), window)
    full = seq[leftover:].reshape(n_full, window)  # aligned to the most recent end
    if leftover < 2:
        return np.array(full, dtype=np.int64)  # copy: callers may write into it
    head = np.zeros((1, window), dtype=np.int64)
    head[0, window - leftover :] = seq[:leftover]
    return np.concatenate([head, full], axis=0)


def history_windows(histories: Sequence[np.ndarray], window: int, held_out: np.ndarray | None = None) -> np.ndarray:
    """The training examples of a set of histories: each one's `make_windows`, stacked, int64 ``[n, window]``.

    Devices (their own users), server-side pretraining and the centralized baseline all cut here.
    `held_out` items (the cold-start protocol) are removed from the histories first, so no window holds one.
    """
    if held_out is not None:
        histories = without_items(histories, held_out)
    parts = [w for w in (make_windows(np.asarray(seq, dtype=np.int64), window) for seq in histories) if w.shape[0]]
    return np.concatenate(parts) if parts else np.zeros((0, window), dtype=np.int64)
