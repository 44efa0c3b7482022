"""Item text features: the public catalogue's text, encoded once and cached.

Only the catalogue goes in (raw item id, title, genres: `items.json` of a device store); no
interaction, history or user file is ever read here, so encoding costs no privacy.

Cache: `<cache>/text-features/<dataset>-<catalogue sha>-<encoder id>.npz`, holding the vectors and
the full hashes they were made from. A changed catalogue (any title, genre, id or their order) or
encoder gives another key, so it is re-encoded; a cache file whose recorded hashes or shape do not
match what is asked for is never used (it is re-encoded and replaced, atomically).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from shared.atomic import write_bytes_atomic
from shared.config import RunConfig
from shared.errors import PrivrecError

log = logging.getLogger(__name__)

TEXT_FORMAT = 1  # bump when item_text() changes: it is part of the catalogue hash
CACHE_FOLDER = "text-features"


class Encoder(Protocol):
    encoder_id: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> np.ndarray: ...


def item_text(raw_id: str, title: str | None, genres: Sequence[str] | None = None) -> str:
    """The text one item is known by: its title (with year, as the catalogue gives it) and genres.

    A missing or blank title falls back to the raw id, so no item is encoded from an empty string.
    """
    title = " ".join(str(title).split()) if title is not None else ""
    genres = [" ".join(str(g).split()) for g in (genres or []) if str(g).strip()]
    text = title or f"item {raw_id}"
    return f"{text}. Genres: {', '.join(genres)}" if genres else text


@dataclass(frozen=True)
class Catalogue:
    """The public item catalogue, indexed like the model (index 0 = padding)."""

    dataset: str
    item_ids: list[str]
    titles: list[str | None]
    genres: list[list[str]]

    def texts(self) -> list[str]:
        """One text per item 1..N (padding excluded)."""
        return [item_text(self.item_ids[i], self.titles[i], self.genres[i]) for i in range(1, len(self.item_ids))]

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1


def catalogue_sha256(texts: Sequence[str]) -> str:
    payload = json.dumps({"format": TEXT_FORMAT, "texts": list(texts)}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def read_catalogue(store_dir: str | Path, meta_file: str = "meta.json") -> Catalogue:
    """The catalogue of a device store (or run directory: meta_file="dataset.json"), from its metadata and
    `items.json` only: no user data."""
    from shared.data.store import ITEMS_FILE, _read_json

    store_dir = Path(store_dir)
    meta = _read_json(store_dir / meta_file)
    where = store_dir / ITEMS_FILE
    items = _read_json(where)
    if not isinstance(items, dict) or not isinstance(items.get("item_ids"), list):
        raise PrivrecError(f"{where}: expected an object with an 'item_ids' list")
    ids = [str(i) for i in items["item_ids"]]
    titles = items.get("item_titles") or [None] * len(ids)
    genres = items.get("item_genres") or [[] for _ in ids]
    if not isinstance(titles, list) or len(titles) != len(ids):
        raise PrivrecError(f"{where}: 'item_titles' must be a list of {len(ids)} entries, like 'item_ids'")
    if not isinstance(genres, list) or len(genres) != len(ids) or not all(isinstance(g, list) for g in genres):
        raise PrivrecError(f"{where}: 'item_genres' must be {len(ids)} lists, like 'item_ids'")
    for index, title in enumerate(titles):
        if title is not None and not isinstance(title, str):
            raise PrivrecError(f"{where}: item_titles[{index}] is {title!r}, expected a string or null")
    dataset = str(meta.get("dataset") or "dataset") if isinstance(meta, dict) else "dataset"
    return Catalogue(dataset=dataset, item_ids=ids, titles=list(titles), genres=[list(map(str, g)) for g in genres])


@dataclass(frozen=True)
class TextFeatures:
    vectors: np.ndarray  # float32 [num_items + 1, dim]; row 0 (padding) is zero
    dataset: str
    catalogue_sha256: str
    encoder_id: str

    @property
    def key(self) -> str:
        return cache_key(self.dataset, self.catalogue_sha256, self.encoder_id)


def cache_key(dataset: str, catalogue_sha: str, encoder_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("._") or "dataset"
    return f"{safe}-{catalogue_sha[:16]}-{encoder_id[:16]}"


def _resolve(encoder) -> tuple[str, Callable[[], Encoder]]:
    """(encoder id, how to get the encoder) for None (MiniLM), an encoder, or an encoder class."""
    if encoder is None:
        from shared.text.encoder import ENCODER_ID, TextEncoder

        return ENCODER_ID, TextEncoder  # id known without loading 90 MB of weights
    if isinstance(encoder, type):
        return encoder.encoder_id, encoder
    return encoder.encoder_id, lambda: encoder


def text_features(catalogue: Catalogue, cache_dir: str | Path | None = None,
                  encoder=None, progress: bool = True) -> TextFeatures:
    """The catalogue's text vectors: from the cache when it holds exactly these, else encoded and cached.

    `encoder`: None for all-MiniLM-L6-v2 (loaded only on a cache miss), an encoder object, or an
    encoder class with an `encoder_id` attribute (built only on a cache miss).
    """
    from shared.data.fetch import default_cache_dir

    texts = catalogue.texts()
    encoder_id, build = _resolve(encoder)
    wanted = TextFeatures(np.zeros(0, np.float32), catalogue.dataset, catalogue_sha256(texts), encoder_id)
    path = Path(cache_dir or default_cache_dir()) / CACHE_FOLDER / f"{wanted.key}.npz"
    cached = _load_cached(path, wanted, catalogue.num_items + 1)
    if cached is not None:
        return cached
    model = build()
    if model.encoder_id != wanted.encoder_id:
        raise PrivrecError(f"text encoder id {model.encoder_id[:16]} differs from the expected "
                           f"{wanted.encoder_id[:16]}")
    vectors = np.zeros((catalogue.num_items + 1, model.dim), dtype=np.float32)
    if texts:
        vectors[1:] = model.encode(texts, progress=progress)
    features = TextFeatures(vectors, wanted.dataset, wanted.catalogue_sha256, wanted.encoder_id)
    _save(path, features)
    return features


def store_text_features(store_dir: str | Path, cache_dir: str | Path | None = None,
                        encoder=None, progress: bool = True, meta_file: str = "meta.json") -> TextFeatures:
    return text_features(read_catalogue(store_dir, meta_file), cache_dir, encoder, progress)


TEXT_KEY = "item-text-key"  # message config key: which text features the server's model was built on


def features_for(cfg: RunConfig | Mapping, store_dir: str | Path, expected_key: str | None = None,
                 cache_dir: str | Path | None = None, meta_file: str = "meta.json") -> TextFeatures | None:
    """The text features a run config's model needs (None for ID-only models).

    `expected_key` (the server's) must match what this side computed from its catalogue. `meta_file` names the
    dataset (a deployment's DEVICES_DIR/catalogue has catalogue.json, a store meta.json).
    """
    run = RunConfig.of(cfg)
    if run.pipeline.model == "sasrec" and run.model.item_representation == "id":  # the content scorer always needs them
        return None
    features = store_text_features(store_dir, cache_dir, meta_file=meta_file)
    if expected_key is not None and str(expected_key) != features.key:
        raise PrivrecError(f"{Path(store_dir)}: this catalogue's text features are {features.key}, but the "
                           f"global model was built on {expected_key}: the catalogues differ")
    return features


def _save(path: Path, features: TextFeatures) -> None:
    meta = {"dataset": features.dataset, "catalogue_sha256": features.catalogue_sha256,
            "encoder_id": features.encoder_id, "shape": list(features.vectors.shape)}
    buffer = io.BytesIO()
    np.savez(buffer, vectors=features.vectors, meta=np.array(json.dumps(meta)))
    try:
        write_bytes_atomic(path, buffer.getvalue())
    except OSError as exc:
        raise PrivrecError(f"{path}: cannot write the text feature cache ({exc})") from None


def _load_cached(path: Path, wanted: TextFeatures, rows: int) -> TextFeatures | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            vectors = np.array(data["vectors"], dtype=np.float32)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("%s: unreadable text feature cache (%s); re-encoding", path, exc)
        return None
    same = (meta.get("catalogue_sha256") == wanted.catalogue_sha256 and meta.get("encoder_id") == wanted.encoder_id
            and vectors.ndim == 2 and vectors.shape[0] == rows and np.isfinite(vectors).all())
    if not same:
        log.warning("%s: cached text features do not match this catalogue or encoder; re-encoding", path)
        return None
    return TextFeatures(vectors, wanted.dataset, wanted.catalogue_sha256, wanted.encoder_id)
