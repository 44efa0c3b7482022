"""The run directory `runs/<run-id>/`: everything a finished run leaves behind.

    config.json     the resolved config (written at the start)
    status.json     "running" | "failed" (with the error) | "completed"
    metrics.jsonl   one line per round
    model.pt        latest global model (state_dict), model.json its architecture
    items.json      the public catalogue (raw id and title per model index), for `privrec recommend`
    summary.json    final figures; written last, so its presence means the run completed

Every file is replaced atomically, so an interrupted run never leaves a half-written file, and a
run without summary.json is visibly incomplete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from shared.errors import PrivrecError
from shared.privacy.ledger import write_json_atomic

SUMMARY = "summary.json"


class RunDirectory:
    def __init__(self, path: Path):
        self.path = path
        self._metrics: list[dict[str, Any]] = []

    @classmethod
    def create(cls, root: str | Path, run_id: str) -> RunDirectory:
        path = Path(root).expanduser().resolve() / run_id
        if (path / SUMMARY).exists():
            raise PrivrecError(f"run directory {path} already holds a completed run; choose another run-name")
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    def write_json(self, name: str, payload: Any) -> None:
        write_json_atomic(self.path / name, payload)

    def set_status(self, state: str, **details: Any) -> None:
        self.write_json("status.json", {"state": state, "time": time.time(), **details})

    def append_metrics(self, row: dict[str, Any]) -> None:
        # The whole file is rewritten atomically: a crash leaves the previous complete version.
        self._metrics.append(row)
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in self._metrics)
        _write_atomic(self.path / "metrics.jsonl", text.encode())

    def save_model(self, state_dict: dict[str, torch.Tensor], architecture: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".model.pt.", dir=self.path)
        os.close(fd)
        try:
            torch.save(state_dict, tmp)
            os.replace(tmp, self.path / "model.pt")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.write_json("model.json", architecture)

    def copy_catalogue(self, items_json: Path) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".items.json.", dir=self.path)
        os.close(fd)
        shutil.copyfile(items_json, tmp)
        os.replace(tmp, self.path / "items.json")

    def finish(self, summary: dict[str, Any]) -> None:
        self.write_json(SUMMARY, summary)
        self.set_status("completed")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
