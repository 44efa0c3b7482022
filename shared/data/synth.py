"""Synthetic users drawn from a model fitted to a real dataset, over that dataset's real item catalogue.

What is fitted (`fit_source`), from the source's chronological histories (stable sort on timestamps):

- the history-length distribution: the users' lengths, resampled as they are (empirical);
- the first item of a history: its empirical distribution, smoothed towards item popularity;
- the next item: a first-order Markov chain with popularity back-off,
  ``P(j | i) = (C[i, j] + a * pop(j)) / (C[i] + a)``, with ``C[i, j]`` the source's count of ``i`` directly
  followed by ``j`` within one history, ``C[i]`` its row sum, ``pop`` the item frequencies and ``a`` the
  smoothing strength, calibrated so that synthetic users' last items are as predictable from their previous
  ones as the source's (`bigram_hit_rate`, `calibrate_smoothing`). Sampling needs no dense matrix: with
  probability ``C[i] / (C[i] + a)`` take the successor of a uniformly drawn occurrence of ``i`` as a
  predecessor, else a popularity draw (popularity to a power, calibrated so that the synthetic item
  popularity has the source's Gini coefficient: the chain and the no-repeat rule alone flatten it);
- repeats: when no source user meets an item twice (MovieLens), no synthetic user does either (rejection,
  then an exact draw from the user's unseen items by popularity);
- timestamps: a source user's first timestamp plus gaps drawn from the source's within-user gaps.

Nothing else is kept: synthetic users share no latent taste beyond what one previous item carries. The
generator is not private: it samples the source's own transitions, so a transition only one real person made
can reappear (see docs/synthetic-data.md for what results on such data can and cannot stand for).
Users are generated in chunks, each with its own child of `SeedSequence(seed)`, so the output depends only on
the source and the seed, and memory stays bounded by the chunk, not by the number of users.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from shared.atomic import staged_dir
from shared.data.formats import Interactions, content_sha256
from shared.errors import PrivrecError

MIN_SOURCE_USERS = 10
SMOOTHING_RANGE = (1.0, 1e4)  # where the calibration looks for the smoothing strength
BACKOFF_POWER_RANGE = (0.5, 3.0)
CALIBRATION_STEPS = 7
CALIBRATION_USERS = 2000
CALIBRATION_SEED = 0  # fixed: the fitted model depends on the source only, not on --seed
# Bytes privrec needs to hold one interaction while it reads the file back (Python strings and lists in
# shared/data/formats.py and split.py: measured 285 reading and splitting 1.06M synthetic rows, rounded up).
LOAD_BYTES_PER_INTERACTION = 400
CHUNK_BYTES = 64 * 1024 * 1024  # working memory of one chunk of users
MAX_REJECTION_TRIES = 8
_TITLE_YEAR = re.compile(r"^(.*\S) \((\d{4})\)$")


@dataclass(frozen=True)
class SourceModel:
    """Everything the generator keeps of the source (see the module docstring)."""

    items: list[str]  # raw item ids; index = internal id
    popularity: np.ndarray  # float64 [n_items]: interactions per item
    first_counts: np.ndarray  # float64 [n_items]: histories that start with the item
    succ_offsets: np.ndarray  # int64 [n_items + 1]: successors of item i are successors[off[i]:off[i+1]]
    successors: np.ndarray  # int32 [pairs]: the item that followed, grouped by predecessor
    lengths: np.ndarray  # int64 [users]: history lengths
    starts: np.ndarray  # float64 [users]: first timestamp per user
    gaps: np.ndarray  # float64 [pairs]: time between consecutive interactions of one user
    allow_repeats: bool  # the source has a user meeting an item twice
    integral_times: bool
    smoothing: float
    source: str
    source_sha256: str
    backoff_power: float = 1.0  # back-off and fallback draws follow popularity ** backoff_power
    source_hit_rate: float | None = None  # the source's bigram_hit_rate, when the smoothing was calibrated

    @property
    def num_users(self) -> int:
        return int(self.lengths.shape[0])


def fit_source(inter: Interactions, smoothing: float | None = None) -> SourceModel:
    """Fit the generator's model to `inter`; refuse sources it cannot stand in for."""
    users, user_index = np.unique(np.asarray(inter.users, dtype=object), return_inverse=True)
    if len(users) < MIN_SOURCE_USERS:
        raise PrivrecError(f"{inter.source}: {len(users)} users; a synthetic population needs a source "
                           f"with at least {MIN_SOURCE_USERS}")
    ts = inter.timestamps
    if ts.size and float(ts.min()) == float(ts.max()):
        raise PrivrecError(f"{inter.source}: every timestamp is {float(ts[0])!r}, so the histories have no order "
                           "to learn from; a synthetic population needs a source with timestamps")
    items = list(dict.fromkeys([*inter.item_titles, *inter.items]))  # the catalogue in its order, then the rest
    index = {raw: i for i, raw in enumerate(items)}
    item_of_row = np.fromiter((index[raw] for raw in inter.items), dtype=np.int64, count=len(inter))
    # Chronological histories: by user, then time; equal times keep file order (as shared/data/split.py).
    order = np.lexsort((np.arange(len(inter)), ts, user_index))
    seq_user, seq_item, seq_ts = user_index[order], item_of_row[order], ts[order]
    lengths = np.bincount(seq_user, minlength=len(users)).astype(np.int64)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    same_user = seq_user[1:] == seq_user[:-1]
    prev, nxt = seq_item[:-1][same_user], seq_item[1:][same_user]
    by_prev = np.argsort(prev, kind="stable")
    n = len(items)
    repeats = len(np.unique(seq_user * n + seq_item)) < len(seq_item)
    model = SourceModel(
        items=items,
        popularity=np.bincount(seq_item, minlength=n).astype(np.float64),
        first_counts=np.bincount(seq_item[first], minlength=n).astype(np.float64),
        succ_offsets=np.concatenate([[0], np.cumsum(np.bincount(prev, minlength=n))]).astype(np.int64),
        successors=nxt[by_prev].astype(np.int32),
        lengths=lengths,
        starts=seq_ts[first].astype(np.float64),
        gaps=np.diff(seq_ts)[same_user].astype(np.float64),
        allow_repeats=bool(repeats),
        integral_times=bool(np.all(ts == np.round(ts))),
        smoothing=float(smoothing or 1.0),
        source=inter.source,
        source_sha256=content_sha256(inter),
    )
    if smoothing is None:
        target_hit, target_gini = bigram_hit_rate(seq_user, seq_item, n), gini(model.popularity)
        users = min(CALIBRATION_USERS, max(model.num_users, 500))
        model = replace(model, smoothing=calibrate_smoothing(model, target_hit, users), source_hit_rate=target_hit)
        model = replace(model, backoff_power=calibrate_backoff_power(model, target_gini, users))
        model = replace(model, smoothing=calibrate_smoothing(model, target_hit, users))
    return model


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0: all equal, towards 1: all on one item)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = x.shape[0], x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float((2.0 * np.arange(1, n + 1) - n - 1) @ x / (n * total))


def bigram_hit_rate(user: np.ndarray, item: np.ndarray, n: int, k: int = 10) -> float:
    """Next-item predictability of histories (rows grouped by user, chronological): the share of users whose
    last item is among the top `k` of a bigram ranker fitted on everyone's earlier transitions (their own
    earlier items excluded from the ranking; ties broken by popularity, then pessimistically)."""
    new = np.r_[True, user[1:] != user[:-1]]
    first = np.flatnonzero(new)
    last = np.r_[first[1:], len(user)] - 1
    is_last = np.zeros(len(user), dtype=bool)
    is_last[last] = True
    kept = ~new[1:] & ~is_last[1:]
    prev, nxt = item[:-1][kept], item[1:][kept]
    order = np.argsort(prev, kind="stable")
    offsets, successors = np.r_[0, np.cumsum(np.bincount(prev, minlength=n))], nxt[order]
    pop = np.bincount(item[~is_last], minlength=n).astype(np.float64)
    tie_break = pop / (pop.max() + 1.0)
    evaluated = np.flatnonzero(last - first >= 2)  # a transition to learn from besides the held-out one
    hits = 0
    batch = max(1, (1 << 24) // n)
    for lo in range(0, len(evaluated), batch):
        users = evaluated[lo:lo + batch]
        b = np.arange(len(users))
        scores = np.tile(tie_break, (len(users), 1))
        p, target = item[last[users] - 1], item[last[users]]
        np.add.at(scores, (*_ragged(b, offsets[p], offsets[p + 1] - offsets[p], successors),), 1.0)
        target_score = scores[b, target]
        scores[_ragged(b, first[users], last[users] - first[users], item)] = -np.inf
        hits += int(((scores >= target_score[:, None]).sum(axis=1) - 1 < k).sum())
    return hits / max(1, len(evaluated))


def _ragged(rows: np.ndarray, starts: np.ndarray, counts: np.ndarray, values: np.ndarray):
    """(row, values[start + j]) for j < count, per row: the index pairs of a ragged gather."""
    total = int(counts.sum())
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(rows, counts), values[np.repeat(starts, counts) + within]


def _sample_all(model: SourceModel, users: int) -> tuple[np.ndarray, np.ndarray]:
    parts = list(generate(model, users, CALIBRATION_SEED))  # the same random numbers for every candidate
    return np.concatenate([part.user for part in parts]), np.concatenate([part.item for part in parts])


def calibrate_smoothing(model: SourceModel, target: float, users: int) -> float:
    """The smoothing `a` under which `users` synthetic users are as predictable (`bigram_hit_rate`) as the
    source: bisection on log a."""
    lo, hi = np.log(SMOOTHING_RANGE[0]), np.log(SMOOTHING_RANGE[1])
    for _ in range(CALIBRATION_STEPS):
        mid = (lo + hi) / 2
        user, item = _sample_all(replace(model, smoothing=float(np.exp(mid))), users)
        if bigram_hit_rate(user, item, len(model.items)) > target:
            lo = mid  # too predictable: smooth more
        else:
            hi = mid
    return float(np.exp((lo + hi) / 2))


def calibrate_backoff_power(model: SourceModel, target: float, users: int) -> float:
    """The power on popularity in back-off draws under which `users` synthetic users' item popularity has the
    source's Gini coefficient (the chain and the no-repeat rule flatten it): bisection."""
    lo, hi = BACKOFF_POWER_RANGE
    for _ in range(CALIBRATION_STEPS):
        mid = (lo + hi) / 2
        _, item = _sample_all(replace(model, backoff_power=mid), users)
        if gini(np.bincount(item, minlength=len(model.items))) < target:
            lo = mid  # too flat: sharpen the back-off
        else:
            hi = mid
    return (lo + hi) / 2


def check_population(users: object, mean_length: float) -> int:
    """`users` as an int, or a one-line refusal naming it (0, negative, or beyond this machine's memory)."""
    if isinstance(users, bool) or not isinstance(users, int) or users < 1:
        raise PrivrecError(f"--users {users!r}: must be a whole number of at least 1")
    rows = users * float(mean_length)
    need, have = rows * LOAD_BYTES_PER_INTERACTION, available_memory()
    if need > have:
        raise PrivrecError(f"--users {users}: about {rows:,.0f} interactions, which privrec needs about "
                           f"{need / 2**30:.1f} GiB to read back; this machine has {have / 2**30:.1f} GiB available")
    return users


def available_memory() -> int:
    """Bytes the kernel reports as available (MemAvailable), else physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SyntheticChunk:
    user: np.ndarray  # int64 [rows]: user number within the whole population (0-based)
    item: np.ndarray  # int64 [rows]: internal item id (index into SourceModel.items)
    timestamp: np.ndarray  # float64 [rows]


def generate(model: SourceModel, users: int, seed: int):
    """Yield `SyntheticChunk`s covering users 0..users-1, rows grouped by user in chronological order."""
    users = check_population(users, float(model.lengths.mean()))
    n = len(model.items)
    max_len = int(model.lengths.max()) if model.allow_repeats else int(min(model.lengths.max(),
                                                                            np.count_nonzero(model.popularity)))
    chunk = int(max(1, min(users, CHUNK_BYTES // (n + 8 * max_len))))
    n_chunks = -(-users // chunk)
    for c, child in enumerate(np.random.SeedSequence(seed).spawn(n_chunks)):
        size = min(chunk, users - c * chunk)
        yield _sample_chunk(model, size, c * chunk, max_len, np.random.default_rng(child))


def _sample_chunk(model: SourceModel, size: int, first_user: int, max_len: int,
                  rng: np.random.Generator) -> SyntheticChunk:
    n = len(model.items)
    a = model.smoothing
    backoff = model.popularity ** model.backoff_power
    pop_cdf = np.cumsum(backoff)
    first_cdf = np.cumsum(model.first_counts)
    lengths = np.minimum(rng.choice(model.lengths, size), max_len)
    lengths = np.sort(lengths)[::-1]  # longest first: the users still growing at step t are a prefix
    active_at = np.searchsorted(-lengths, -np.arange(lengths[0]), side="right")  # users with length > t
    seq = np.zeros((size, lengths[0]), dtype=np.int32)
    seen = None if model.allow_repeats else np.zeros((size, n), dtype=bool)

    def popular(k: int) -> np.ndarray:
        return np.searchsorted(pop_cdf, rng.random(k) * pop_cdf[-1], side="right")

    def successor(prev: np.ndarray) -> np.ndarray:
        lo, count = model.succ_offsets[prev], np.diff(model.succ_offsets)[prev]
        use_chain = rng.random(prev.shape[0]) * (count + a) < count
        pick = lo + (rng.random(prev.shape[0]) * count).astype(np.int64)
        chain = model.successors[np.minimum(pick, len(model.successors) - 1)] if len(model.successors) else 0
        return np.where(use_chain, chain, popular(prev.shape[0]))

    def start(k: int) -> np.ndarray:
        use_first = rng.random(k) * (first_cdf[-1] + a) < first_cdf[-1]
        return np.where(use_first, np.searchsorted(first_cdf, rng.random(k) * first_cdf[-1], side="right"),
                        popular(k))

    for t in range(lengths[0]):
        k = int(active_at[t])
        rows = np.arange(k)
        cand = start(k) if t == 0 else successor(seq[:k, t - 1])
        if seen is not None:
            todo = np.flatnonzero(seen[rows, cand])
            for _ in range(MAX_REJECTION_TRIES):
                if not todo.size:
                    break
                cand[todo] = start(todo.size) if t == 0 else successor(seq[todo, t - 1])
                todo = todo[seen[todo, cand[todo]]]
            for r in todo:  # rare: an exact draw among this user's unseen items, by popularity
                weights = np.where(seen[r], 0.0, backoff)
                cand[r] = np.searchsorted(np.cumsum(weights), rng.random() * weights.sum(), side="right")
            seen[rows, cand] = True
        seq[:k, t] = cand

    # Shuffle users so that user numbers (and hence device grouping) do not follow history length.
    perm = rng.permutation(size)
    lengths, seq = lengths[perm], seq[perm]
    mask = np.arange(seq.shape[1])[None, :] < lengths[:, None]
    user = np.repeat(np.arange(first_user, first_user + size, dtype=np.int64), lengths)
    gaps = model.gaps[rng.integers(0, len(model.gaps), int(lengths.sum()))] if len(model.gaps) else \
        np.zeros(int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    gaps[offsets] = 0.0
    elapsed = np.cumsum(gaps)
    starts = model.starts[rng.integers(0, len(model.starts), size)]
    timestamp = np.repeat(starts - elapsed[offsets], lengths) + elapsed
    return SyntheticChunk(user=user, item=seq[mask].astype(np.int64), timestamp=timestamp)


# ----------------------------------------------------------------------------- writing


def write_synthetic(inter: Interactions, out: str | Path, users: int, seed: int,
                    smoothing: float | None = None, like: str | None = None) -> dict:
    """Fit on `inter`, write `users` synthetic users to `out` as RecBole atomic files; return a summary.

    `out/<name>.inter` (user_id, item_id, timestamp) and `out/<name>.item` (the source's catalogue: titles,
    release years, genres) read back with `shared.data.formats.load_interactions`; `out/SYNTH.json` records
    how they were made. Written into a staging folder and renamed into place: never half-written.
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrivrecError(f"--out {out}: already exists and is not an empty folder; choose a new one")
    check_population(users, len(inter) / max(1, len(set(inter.users))))  # before the fit: it takes seconds
    model = fit_source(inter, smoothing)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", out.resolve().name).strip("._") or "synthetic"
    rows = 0
    item_text = np.asarray(model.items, dtype=object)
    stamp = (lambda t: str(int(t))) if model.integral_times else repr
    with staged_dir(out, making="a folder for the synthetic data", writing="the synthetic data") as staged:
        with open(staged / f"{name}.inter", "w", encoding="utf-8", newline="\n") as f:
            f.write("user_id:token\titem_id:token\ttimestamp:float\n")
            for part in generate(model, users, seed):
                lines = map("{}\t{}\t{}\n".format, (part.user + 1).tolist(), item_text[part.item].tolist(),
                            map(stamp, part.timestamp.tolist()))
                f.writelines(lines)
                rows += len(part.item)
            f.flush()
            os.fsync(f.fileno())
        if inter.item_titles:
            _write_catalogue(staged / f"{name}.item", model.items, inter)
        summary = {
            "generator": "privrec data synth: first-order Markov chain with popularity back-off",
            "like": like or inter.source,
            "source": model.source,
            "source_content_sha256": model.source_sha256,
            "source_users": model.num_users,
            "users": users,
            "interactions": rows,
            "seed": seed,
            "smoothing": model.smoothing,
            "backoff_power": model.backoff_power,
            "source_bigram_hr@10": model.source_hit_rate,
            "repeats_allowed": model.allow_repeats,
            "files": [f"{name}.inter"] + ([f"{name}.item"] if inter.item_titles else []),
        }
        (staged / "SYNTH.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _write_catalogue(path: Path, items: list[str], inter: Interactions) -> None:
    """The source's catalogue as a RecBole .item file that reads back to the same titles and genres."""
    with_genres = bool(inter.item_genres)
    header = ["item_id:token", "movie_title:token_seq", "release_year:token"] + (["class:token_seq"] if
                                                                                  with_genres else [])
    lines = ["\t".join(header)]
    for raw in (raw for raw in items if raw in inter.item_titles):
        title = " ".join(inter.item_titles[raw].split())  # no tabs or newlines inside a field
        match = _TITLE_YEAR.match(title)
        fields = [raw, match.group(1), match.group(2)] if match else [raw, title, ""]
        if with_genres:  # RecBole separates a token_seq by spaces: a genre's own spaces become "_"
            fields.append(" ".join(g.strip().replace(" ", "_") for g in inter.item_genres.get(raw, [])))
        lines.append("\t".join(fields))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
