"""Top-k recommendations from a trained run directory (model.pt, model.json, items.json).

Every model a run can save: SASRec (`Recommender`) and the private pipelines' content or channel scorer
(`ScorerRecommender`, chosen when model.json says `"model": "content-scorer"` or `"channel-scorer"`). The
scorer ranks with `shared.scorer.score_histories`, the function the pipeline's evaluation uses: the released
DP popularity bias (and, for the channel scorer, the released co-occurrence: buffers of model.pt), the public
text features rebuilt from the run's catalogue, and the profile and channels computed here from the given
history.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.errors import PrivrecError
from shared.model import ModelConfig, SASRec
from shared.scorer import (
    COOC_CHANNEL,
    SASREC_CHANNEL,
    TRANSITION_CHANNEL,
    ChannelScorer,
    ContentScorer,
    public_catalogue,
    score_histories,
    scorer_from_state,
)
from shared.scorer import Catalogue as ScorerCatalogue


def _json_lines(path: Path, expected: str) -> list[tuple[str, dict]]:
    """(where, object) per non-blank line of a JSON-lines file; errors name the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PrivrecError(f"{path}: cannot read ({exc})") from None
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrivrecError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise PrivrecError(f"{where}: expected {expected}")
        out.append((where, record))
    return out


def _run_text_features(run_dir: Path, cfg: ModelConfig, arch: dict) -> torch.Tensor | None:
    """A text model's frozen table, rebuilt from the run's public catalogue (cached by hash)."""
    if not cfg.uses_text:
        return None
    from shared.text.features import read_catalogue, text_features

    features = text_features(read_catalogue(run_dir, meta_file="dataset.json"))
    expected = (arch.get("item-text") or {}).get("key")
    if expected is not None and expected != features.key:
        raise PrivrecError(f"items.json gives text features {features.key}, but the model was trained on "
                           f"{expected}: the catalogue or the encoder changed since training")
    return torch.from_numpy(features.vectors)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PrivrecError(f"{path.name}: not readable JSON ({exc})") from None


def _new_items(path: Path, known: set[str], encoder=None) -> tuple[list[str], list[str], torch.Tensor]:
    """(ids, titles, text vectors [n, d]) of a --new-items file; every line checked before anything is encoded."""
    from shared.text.features import item_text

    ids, titles, texts = [], [], []
    for where, record in _json_lines(path, "an object like {\"item\": \"n1\", \"title\": \"...\"}"):
        raw, title = record.get("item"), record.get("title")
        genres, year = record.get("genres", []), record.get("year")
        if not isinstance(raw, (str, int)) or isinstance(raw, bool) or not str(raw).strip():
            raise PrivrecError(f"{where}: 'item' must be a non-empty id")
        if str(raw) in known or str(raw) in ids:
            raise PrivrecError(f"{where}: item id {str(raw)!r} is already in the catalogue")
        if not isinstance(title, str) or not title.strip():
            raise PrivrecError(f"{where}: 'title' must be a non-empty string (an item is known by its text)")
        if not isinstance(genres, list) or not all(isinstance(g, str) for g in genres):
            raise PrivrecError(f"{where}: 'genres' must be a list of strings")
        if year is not None and (isinstance(year, bool) or not isinstance(year, (str, int))):
            raise PrivrecError(f"{where}: 'year' must be a number like 1999 or a string, "
                               f"not {json.dumps(year)}")
        if year is not None and str(year) not in title:
            title = f"{title.strip()} ({year})"
        ids.append(str(raw))
        titles.append(title)
        texts.append(item_text(str(raw), title, genres))
    if not ids:
        raise PrivrecError(f"{path}: no items")
    if encoder is None:
        from shared.text.encoder import TextEncoder

        encoder = TextEncoder()
    return ids, titles, torch.from_numpy(encoder.encode(texts, progress=False))


class Recommender:
    new_items_note = "known by their text only"

    def __init__(self, model: SASRec, item_ids: list[str], titles: list[str | None]):
        self.model = model.eval()
        self.item_ids = item_ids
        self.titles = titles
        self.index = {raw: i for i, raw in enumerate(item_ids) if i > 0}
        self.trained_items = len(item_ids) - 1  # items after these were added by text, without training

    def add_items(self, path: Path, encoder=None) -> int:
        """Add the items of a JSON-lines file (one {"item", "title", "year"?, "genres"?} per line) to the
        catalogue, known by their text alone (text models only). Returns how many were added."""
        if not self.model.cfg.uses_text:
            self.model.with_new_items(torch.zeros(0, 1))  # raises the clear "IDs only" error
        ids, titles, vectors = _new_items(path, set(self.index), encoder)
        self.model = self.model.with_new_items(vectors).eval()
        self._append(ids, titles)
        return len(ids)

    def _append(self, ids: list[str], titles: list[str]) -> None:
        for raw, title in zip(ids, titles):
            self.index[raw] = len(self.item_ids)
            self.item_ids.append(raw)
            self.titles.append(title)

    @classmethod
    def load(cls, run_dir: Path) -> Recommender:
        if not run_dir.is_dir():
            raise PrivrecError(f"{run_dir}: no such run directory")
        for name in ("model.pt", "model.json", "items.json"):
            if not (run_dir / name).exists():
                raise PrivrecError(f"{run_dir} is not a trained run: {name} is missing")
        try:
            arch = _read_json(run_dir / "model.json")
        except PrivrecError as exc:
            raise PrivrecError(f"{run_dir}: cannot load the model ({exc})") from None
        if isinstance(arch, dict) and arch.get("model") in ("content-scorer", "channel-scorer"):
            return ScorerRecommender.load(run_dir, arch)
        try:
            items = _read_json(run_dir / "items.json")
            fields = ModelConfig.__dataclass_fields__
            # The item representation keys may be absent: runs that predate them are ID models.
            missing = [k for k in fields if (not isinstance(arch, dict) or k not in arch)
                       and k not in ("item_representation", "text_dim")]
            if missing:
                raise PrivrecError(f"model.json lacks key(s) {', '.join(missing)}")
            cfg = ModelConfig(**{k: arch[k] for k in fields if k in arch})
            model = SASRec(cfg, _run_text_features(run_dir, cfg, arch))
            try:
                state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
            except Exception as exc:  # a damaged file can fail anywhere inside the unpickler
                # (torch's own message suggests weights_only=False, which would be unsafe advice here)
                raise PrivrecError(f"model.pt is not a readable torch state dict ({type(exc).__name__}); "
                                   "damaged, or not written by privrec") from None
            model.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError, OSError, PrivrecError) as exc:
            detail = " ".join(str(exc).split())  # one line: state_dict errors span several
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            kind = "" if isinstance(exc, PrivrecError) else f"{type(exc).__name__}: "
            raise PrivrecError(f"{run_dir}: cannot load the model ({kind}{detail})") from None
        ids = items.get("item_ids") if isinstance(items, dict) else None
        titles = items.get("item_titles") if isinstance(items, dict) else None
        if titles is None and isinstance(ids, list):
            titles = [None] * len(ids)
        want = cfg.num_items + 1
        if not isinstance(ids, list) or not isinstance(titles, list) or len(ids) != want or len(titles) != want:
            raise PrivrecError(f"{run_dir / 'items.json'}: expected 'item_ids' (and 'item_titles') lists of "
                               f"{want} entries, matching num_items={cfg.num_items} in model.json plus padding")
        return cls(model, [str(i) for i in ids], list(titles))

    def encode(self, history: list[Any], where: str) -> list[int]:
        out = []
        for raw in history:
            key = str(raw)
            if key not in self.index:
                raise PrivrecError(f"{where}: unknown item id {key!r} (not in the model's catalogue of "
                                   f"{len(self.index)} items)")
            out.append(self.index[key])
        if not out:
            raise PrivrecError(f"{where}: the history is empty")
        return out

    @torch.no_grad()
    def top_k(self, history: list[Any], k: int, where: str) -> list[dict[str, Any]]:
        if k < 1:
            raise PrivrecError(f"-k {k}: must be >= 1")
        ids = self.encode(history, where)
        scores = self.scores(ids)
        scores[0] = float("-inf")  # padding
        scores[ids] = float("-inf")  # never recommend what the user already has (the whole history)
        top = torch.topk(scores, min(k, len(self.item_ids) - 1 - len(set(ids))))
        return [{"item": self.item_ids[i], "title": self.titles[i], "score": float(s),
                 **({"new": True} if i > self.trained_items else {})}
                for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def scores(self, ids: list[int]) -> torch.Tensor:
        """The model's score of every catalogue index (0 = padding) after the history `ids`."""
        return self.model.predict_next(torch.tensor([ids[-self.model.cfg.max_len:]], dtype=torch.long))[0]

    def top_k_file(self, path: Path, k: int) -> Iterator[dict[str, Any]]:
        parsed = []
        for where, record in _json_lines(path, 'an object like {"history": ["50", "181"]}'):
            if not isinstance(record.get("history"), list):
                raise PrivrecError(f'{where}: expected an object like {{"history": ["50", "181"]}}')
            self.encode(record["history"], where)  # validate everything before printing anything
            parsed.append((record, where))
        for record, where in parsed:
            yield {**{k2: v for k2, v in record.items() if k2 != "history"}, "history": record["history"],
                   "recommendations": self.top_k(record["history"], k, where)}


class ScorerRecommender(Recommender):
    """`privrec recommend` for a `model = content-scorer` run: ranks exactly as the pipeline's evaluation does.

    The popularity bias is the run's one user-level DP release, as model.pt carries it (the `popularity`
    buffer); the text table is rebuilt from the run's public catalogue and must be the one the run used.
    """

    new_items_note = ("known by their text, raw id and title year; popularity bias 0, as they were not in the "
                      "run's popularity release")

    def __init__(self, model: ContentScorer, catalogue: ScorerCatalogue, item_ids: list[str],
                 titles: list[str | None], profile_items: int, decay: float):
        self.model = model.eval()
        self.catalogue = catalogue
        self.item_ids = item_ids
        self.titles = titles
        self.index = {raw: i for i, raw in enumerate(item_ids) if i > 0}
        self.trained_items = len(item_ids) - 1
        self.profile_items = profile_items
        self.decay = decay

    @classmethod
    def load(cls, run_dir: Path, arch: dict) -> ScorerRecommender:
        from shared.scorer import read_catalogue as scorer_catalogue
        from shared.text.features import read_catalogue, text_features

        if not (run_dir / "dataset.json").exists():  # names the dataset the text features are keyed by
            raise PrivrecError(f"{run_dir} is not a trained run: dataset.json is missing")
        try:
            missing = [k for k in ("num_items", "dim", "profile-items", "profile-decay") if k not in arch]
            if missing:
                raise PrivrecError(f"model.json lacks key(s) {', '.join(missing)}")
            features = text_features(read_catalogue(run_dir, meta_file="dataset.json"))
            expected = (arch.get("item-text") or {}).get("key")
            if expected is not None and expected != features.key:
                raise PrivrecError(f"items.json gives text features {features.key}, but the scorer was trained "
                                   f"on {expected}: the catalogue or the encoder changed since training")
            catalogue = scorer_catalogue(run_dir / "items.json", features.vectors)
            if catalogue.num_items != arch["num_items"] or catalogue.text.shape[1] != arch["dim"]:
                raise PrivrecError(f"items.json and its text give {catalogue.num_items} items of dimension "
                                   f"{catalogue.text.shape[1]}, model.json {arch['num_items']} of {arch['dim']}")
            try:
                state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
            except Exception as exc:  # a damaged file can fail anywhere inside the unpickler
                raise PrivrecError(f"model.pt is not a readable torch state dict ({type(exc).__name__}); "
                                   "damaged, or not written by privrec") from None
            kind = ChannelScorer if arch["model"] == "channel-scorer" else ContentScorer
            if kind is ChannelScorer and arch.get("cooc-channel") != COOC_CHANNEL:
                raise PrivrecError(f"model.json: co-occurrence channel {arch.get('cooc-channel', 'fixed 0.1')!r}, "
                                   f"but this privrec computes {COOC_CHANNEL!r}: the weights do not fit; train again")
            trained_with = arch.get("transition-channel")  # absent: trained without the transition release
            if kind is ChannelScorer and trained_with is not None and trained_with != TRANSITION_CHANNEL:
                raise PrivrecError(f"model.json: transition channel {trained_with!r}, but this privrec computes "
                                   f"{TRANSITION_CHANNEL!r}: the weights do not fit; train again")
            if kind is ChannelScorer and (trained_with is not None) != ("transition_items" in state):
                raise PrivrecError("model.json and model.pt disagree on the transition release (model.json "
                                   f"transition-channel {trained_with!r}; model.pt "
                                   f"{'has' if 'transition_items' in state else 'lacks'} its buffers)")
            sasrec = arch.get("sasrec-channel")  # absent: trained without a consenting cohort
            if kind is ChannelScorer and sasrec is not None and sasrec.get("what") != SASREC_CHANNEL:
                raise PrivrecError(f"model.json: SASRec channel {sasrec.get('what')!r}, but this privrec computes "
                                   f"{SASREC_CHANNEL!r}: the weights do not fit; train again")
            sasrec_config = None if sasrec is None else \
                ModelConfig(**{k: sasrec[k] for k in ModelConfig.__dataclass_fields__ if k in sasrec})
            model = scorer_from_state(state, catalogue, arch["model"], sasrec_config)
            items = _read_json(run_dir / "items.json")
            ids, titles = [str(i) for i in items["item_ids"]], list(items["item_titles"])
            profile_items, decay = int(arch["profile-items"]), float(arch["profile-decay"])
        except (ValueError, KeyError, TypeError, RuntimeError, OSError, PrivrecError) as exc:
            detail = " ".join(str(exc).split())
            detail = detail if len(detail) <= 300 else detail[:297] + "..."
            kind = "" if isinstance(exc, PrivrecError) else f"{type(exc).__name__}: "
            raise PrivrecError(f"{run_dir}: cannot load the content scorer ({kind}{detail})") from None
        return cls(model, catalogue, ids, titles, profile_items, decay)

    def scores(self, ids: list[int]) -> torch.Tensor:
        return score_histories(self.model, self.catalogue, [np.asarray(ids, dtype=np.int64)], self.profile_items,
                               self.decay)[0].clone()

    def add_items(self, path: Path, encoder=None) -> int:
        """New items join the public side from their text, raw id and title year. None was in the popularity
        release, so each gets bias log1p(0) = 0: what an item the release counted at zero (or below) gets."""
        if getattr(self.model, "sasrec", None) is not None:
            raise PrivrecError("--new-items: this scorer has a consenting cohort's SASRec channel, which knows items "
                               "only by their trained IDs; it cannot score items added after training")
        ids, titles, vectors = _new_items(path, set(self.index), encoder)
        old = self.catalogue
        if vectors.shape[1] != old.text.shape[1]:
            raise PrivrecError(f"{path}: the encoder gives {vectors.shape[1]}-dimensional text, the scorer was "
                               f"trained on {old.text.shape[1]}")
        extra = public_catalogue(np.vstack([np.zeros((1, vectors.shape[1]), np.float32), vectors.numpy()]),
                                 ["<pad>", *ids], [None, *titles])
        # A new title without a year gets the trained catalogue's median year (not the new items' median).
        known = np.array([not np.isnan(y) for y in _title_years(titles)])
        years = np.where(known, extra.years[1:], float(np.median(old.years[1:])))
        genres = None if old.genres is None else np.vstack([old.genres, np.zeros((len(ids), old.genres.shape[1]))])
        self.catalogue = ScorerCatalogue(torch.cat([old.text, extra.text[1:]]),
                                         np.concatenate([old.raw, extra.raw[1:]]), np.concatenate([old.years, years]),
                                         genres)  # a new item's genres are not read: its genre channel is 0
        state = {**self.model.state_dict(), "popularity": torch.cat([self.model.popularity, torch.zeros(len(ids))])}
        grown = type(self.model).from_state(state, self.catalogue.num_items, old.text.shape[1])
        self.model = grown.eval()
        self._append(ids, titles)
        return len(ids)


def _title_years(titles: list[str]) -> list[float]:
    return [float(m.group(1)) if (m := re.search(r"\((\d{4})\)", t)) else float("nan") for t in titles]
