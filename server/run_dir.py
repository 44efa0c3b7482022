"""The run directory `runs/<run-id>/`: everything a finished run leaves behind.

    run.lock        held for the run's life by its owner (shared/run_owner.py): one run at a time
    owner.json      pid, host, start time and heartbeat of the owner: tells a live run from a crashed one
    config.json     the resolved config (written at the start)
    status.json     "running" | "failed" (with the error) | "completed" | "interrupted" (stopped by a
                    signal or by its launcher's death; with the reason) | "stopped" (older runs)
    metrics.jsonl   one line per round
    model.pt        latest global model (state_dict), model.json its architecture; written after the
                    round's checkpoint, so the released model is always one the privacy tally counts
    items.json      the public catalogue (raw id and title per model index), for `privrec recommend`
    summary.json    final figures; written last, so its presence means the run completed

Every file is replaced atomically, so an interrupted run never leaves a half-written file, and a
run without summary.json is visibly incomplete.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from shared.atomic import write_bytes_atomic, write_json_atomic
from shared.errors import PrivrecError
from shared.resume import check_resumable
from shared.run_owner import LOCK_ENV, RunLock

SUMMARY = "summary.json"


class RunDirectory:
    def __init__(self, path: Path, lock: RunLock | None = None):
        self.path = path
        self.lock = lock  # None: a launcher holds the lock on this run's behalf
        self._metrics: list[dict[str, Any]] = []

    @classmethod
    def create(cls, root: str | Path, run_id: str) -> RunDirectory:
        path = Path(root).expanduser().resolve() / run_id
        if (path / SUMMARY).exists():
            raise PrivrecError(f"run directory {path} already holds a completed run; choose another run-name")
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def claim(cls, root: str | Path, run_id: str, cfg: dict[str, Any]) -> RunDirectory:
        """`create` for the ServerApp: also lock the directory (unless a local launcher holds the lock
        for this run) and check a resume, all before writing anything; a refused run changes nothing."""
        path = Path(root).expanduser().resolve() / run_id
        if (path / SUMMARY).exists():
            raise PrivrecError(f"run directory {path} already holds a completed run; choose another run-name")
        lock = None if os.environ.get(LOCK_ENV) == str(path) else RunLock.acquire(path, role="serverapp")
        try:
            check_resumable(path, cfg)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return cls(path, lock)

    def heartbeat(self) -> None:
        if self.lock is not None:
            self.lock.heartbeat()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def write_json(self, name: str, payload: Any) -> None:
        write_json_atomic(self.path / name, payload)

    def set_status(self, state: str, **details: Any) -> None:
        self.write_json("status.json", {"state": state, "time": time.time(), **details})

    def append_metrics(self, row: dict[str, Any]) -> None:
        # The whole file is rewritten atomically: a crash leaves the previous complete version.
        self._metrics.append(row)
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in self._metrics)
        write_bytes_atomic(self.path / "metrics.jsonl", text.encode())

    def reload_metrics(self, up_to_round: int) -> list[dict[str, Any]]:
        """A resumed run keeps the rows of the rounds its checkpoint covers (rows of later rounds were lost)."""
        path = self.path / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        self._metrics = [r for r in rows if r["round"] <= up_to_round]
        return list(self._metrics)

    def save_model(self, state_dict: dict[str, torch.Tensor], architecture: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        write_bytes_atomic(self.path / "model.pt", buffer.getvalue())
        self.write_json("model.json", architecture)

    def copy_catalogue(self, items_json: Path) -> None:
        write_bytes_atomic(self.path / "items.json", items_json.read_bytes())

    def finish(self, summary: dict[str, Any]) -> None:
        self.write_json(SUMMARY, summary)
        self.set_status("completed")
