"""Per-user chronological leave-one-out split.

Per user: last interaction = test, second-to-last = validation, the rest = train. Users with fewer
than `min_interactions` interactions are dropped (and counted). Items are re-indexed 1..N over the
whole catalogue of the file in order of first appearance; 0 is the padding id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.data.formats import Interactions
from shared.errors import PrivrecError

PAD = "<pad>"


@dataclass(frozen=True)
class SplitData:
    num_items: int  # internal item ids are 1..num_items; 0 is padding
    item_ids: list[str]  # raw id per internal id; item_ids[0] == "<pad>"
    item_titles: list[str | None]  # same indexing; None when unknown
    user_ids: list[str]  # raw id per kept user, in order of first appearance in the file
    train: list[np.ndarray]  # per kept user, int64 internal item ids, chronological
    valid: np.ndarray  # int64 [num_users], the second-to-last item
    test: np.ndarray  # int64 [num_users], the last item
    dropped_users: int  # users with fewer than min_interactions interactions, left out
    item_genres: list[list[str]] | None = None  # same indexing as item_ids; None when no genres are known

    @property
    def num_users(self) -> int:
        return len(self.user_ids)


def index_items(raw_items: list[str]) -> tuple[dict[str, int], np.ndarray]:
    """Map raw item ids to 1..N in order of first appearance; also return each row's internal id."""
    index: dict[str, int] = {}
    internal = np.empty(len(raw_items), dtype=np.int64)
    for row, raw in enumerate(raw_items):
        internal[row] = index.setdefault(raw, len(index) + 1)
    return index, internal


def group_rows_by_user(users: list[str]) -> dict[str, list[int]]:
    """Row numbers per user, users in order of first appearance (dicts keep insertion order)."""
    rows: dict[str, list[int]] = {}
    for row, user in enumerate(users):
        rows.setdefault(user, []).append(row)
    return rows


def leave_one_out(inter: Interactions, min_interactions: int = 3) -> SplitData:
    m = min_interactions
    if isinstance(m, bool) or not isinstance(m, int) or m < 3:
        raise PrivrecError(
            f"min_interactions={min_interactions!r}: must be an integer >= 3 "
            "(one train, one validation and one test item per user)"
        )
    index, internal = index_items(inter.items)
    user_ids: list[str] = []
    train: list[np.ndarray] = []
    valid: list[int] = []
    test: list[int] = []
    dropped = 0
    for user, rows in group_rows_by_user(inter.users).items():
        if len(rows) < min_interactions:
            dropped += 1
            continue
        rows_arr = np.asarray(rows, dtype=np.int64)
        # Stable sort: interactions with equal timestamps keep their file order.
        order = np.argsort(inter.timestamps[rows_arr], kind="stable")
        seq = internal[rows_arr[order]]
        user_ids.append(user)
        train.append(np.ascontiguousarray(seq[:-2]))
        valid.append(int(seq[-2]))
        test.append(int(seq[-1]))
    if not user_ids:
        raise PrivrecError(
            f"{inter.source}: no user has at least {min_interactions} interactions "
            f"({dropped} users, all dropped)"
        )
    item_ids = [PAD] + list(index)
    titles: list[str | None] = [None] + [inter.item_titles.get(raw) for raw in index]
    genres = [[]] + [list(inter.item_genres.get(raw, [])) for raw in index] if inter.item_genres else None
    return SplitData(
        num_items=len(index),
        item_ids=item_ids,
        item_titles=titles,
        user_ids=user_ids,
        train=train,
        valid=np.asarray(valid, dtype=np.int64),
        test=np.asarray(test, dtype=np.int64),
        dropped_users=dropped,
        item_genres=genres,
    )


def dataset_notes(meta: dict) -> list[str]:
    """Console notes on what preparing a store left out or kept as is, from its meta.json."""
    notes = []
    dropped = meta.get("dropped_users") or 0
    if dropped:
        notes.append(f"{dropped} user(s) with fewer than 3 interactions left out (each user needs one train, "
                     "one validation and one test item)")
    duplicates = meta.get("duplicate_rows") or 0
    if duplicates:
        notes.append(f"{duplicates} duplicated row(s) (same user, item and timestamp as an earlier row) kept as "
                     "repeated interactions")
    return notes
