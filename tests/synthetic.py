"""Tiny learnable interaction data for fast tests: each user walks the catalogue in steps of +1."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.data.split import SplitData
from shared.data.store import write_store


def walk_split(num_users: int = 12, num_items: int = 24, seed: int = 0) -> SplitData:
    """Users whose next item is always (current + 1) mod num_items: a sequence model learns it fast."""
    rng = np.random.default_rng(seed)
    train, valid, test = [], [], []
    for _ in range(num_users):
        length = int(rng.integers(14, 22))
        start = int(rng.integers(0, num_items))
        seq = (start + np.arange(length)) % num_items + 1
        train.append(seq[:-2].astype(np.int64))
        valid.append(int(seq[-2]))
        test.append(int(seq[-1]))
    return SplitData(num_items=num_items, item_ids=["<pad>"] + [f"i{i}" for i in range(1, num_items + 1)],
                     item_titles=[None] + [f"Item {i}" for i in range(1, num_items + 1)],
                     user_ids=[f"u{u}" for u in range(num_users)], train=train,
                     valid=np.array(valid, dtype=np.int64), test=np.array(test, dtype=np.int64),
                     dropped_users=0)


def walk_store(directory: Path, users_per_device: int = 1, **kwargs) -> Path:
    return write_store(walk_split(**kwargs), directory, users_per_device=users_per_device,
                       meta_extra={"dataset": "synthetic-walk", "source": "tests/synthetic.py"})
