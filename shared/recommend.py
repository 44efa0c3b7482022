"""Top-k recommendations from a trained run directory (model.pt, model.json, items.json)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from shared.errors import PrivrecError
from shared.model import ModelConfig, SASRec


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PrivrecError(f"{path.name}: not readable JSON ({exc})") from None


class Recommender:
    def __init__(self, model: SASRec, item_ids: list[str], titles: list[str | None]):
        self.model = model.eval()
        self.item_ids = item_ids
        self.titles = titles
        self.index = {raw: i for i, raw in enumerate(item_ids) if i > 0}

    @classmethod
    def load(cls, run_dir: Path) -> Recommender:
        if not run_dir.is_dir():
            raise PrivrecError(f"{run_dir}: no such run directory")
        for name in ("model.pt", "model.json", "items.json"):
            if not (run_dir / name).exists():
                raise PrivrecError(f"{run_dir} is not a trained run: {name} is missing")
        try:
            arch = _read_json(run_dir / "model.json")
            items = _read_json(run_dir / "items.json")
            missing = [k for k in ModelConfig.__dataclass_fields__ if not isinstance(arch, dict) or k not in arch]
            if missing:
                raise PrivrecError(f"model.json lacks key(s) {', '.join(missing)}")
            cfg = ModelConfig(**{k: arch[k] for k in ModelConfig.__dataclass_fields__})
            model = SASRec(cfg)
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
        scores = self.model.predict_next(torch.tensor([ids[-self.model.cfg.max_len:]], dtype=torch.long))[0]
        scores[ids] = float("-inf")  # never recommend what the user already has (the whole history)
        top = torch.topk(scores, min(k, len(self.item_ids) - 1 - len(set(ids))))
        return [{"item": self.item_ids[i], "title": self.titles[i], "score": float(s)}
                for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def top_k_file(self, path: Path, k: int) -> Iterator[dict[str, Any]]:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise PrivrecError(f"{path}: cannot read ({exc})") from None
        parsed = []
        for number, line in enumerate(lines, 1):  # validate everything before printing anything
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PrivrecError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("history"), list):
                raise PrivrecError(f'{where}: expected an object like {{"history": ["50", "181"]}}')
            self.encode(record["history"], where)
            parsed.append((record, where))
        for record, where in parsed:
            yield {**{k2: v for k2, v in record.items() if k2 != "history"}, "history": record["history"],
                   "recommendations": self.top_k(record["history"], k, where)}
