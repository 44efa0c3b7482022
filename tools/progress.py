"""The live view of a run's metrics.jsonl, for `privrec simulate` and `privrec deploy local`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class Progress:
    """Live view of metrics.jsonl while Flower runs (a rich table on a terminal, lines otherwise)."""

    def __init__(self, run_path: Path, rounds: int):
        self.path = run_path / "metrics.jsonl"
        self.rounds = rounds
        self.seen = 0
        self.live = None

    def __enter__(self):
        if sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(self._table([]), refresh_per_second=2)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)

    def _rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    @staticmethod
    def _fmt(value, spec=".4f") -> str:
        return "-" if value is None else format(value, spec)

    @staticmethod
    def _privacy_columns(rows: list[dict]) -> tuple[bool, bool]:
        """(user-level, per-device): which privacy figures the run has. A user-level DP run's rows carry the
        whole run's epsilon so far (releases and rounds composed); the per-device figures (on-device DP-SGD)
        are shown when some device reported one, or when there is nothing else to show yet."""
        user_level = any(row.get("user-level-epsilon") is not None for row in rows)
        per_device = any(row.get("epsilon-max") is not None for row in rows) or not user_level
        return user_level, per_device

    def _table(self, rows: list[dict]):
        from rich.table import Table

        table = Table(title=f"privrec simulation ({len(rows) - 1 if rows else 0}/{self.rounds} rounds)")
        user_level, per_device = self._privacy_columns(rows)
        privacy = ("user-level epsilon",) * user_level + ("epsilon max", "epsilon median") * per_device
        for name in ("round", "devices", "failed", "train loss", "NDCG@10", "HR@10", *privacy, "s"):
            table.add_column(name, justify="right")
        for row in rows[-12:]:
            figures = ((self._fmt(row.get("user-level-epsilon"), ".2f"),) * user_level
                       + (self._fmt(row.get("epsilon-max"), ".2f"),
                          self._fmt(row.get("epsilon-median"), ".2f")) * per_device)
            table.add_row(str(row["round"]), str(row["devices-trained"]), str(row.get("failures", 0)),
                          self._fmt(row.get("train-loss")),
                          self._fmt(row.get("ndcg@10")), self._fmt(row.get("hr@10")),
                          *figures, self._fmt(row.get("seconds"), ".1f"))
        return table

    def _line(self, row: dict, user_level: bool, per_device: bool) -> str:
        privacy = ([f"user-level epsilon so far {self._fmt(row.get('user-level-epsilon'), '.2f')}"] * user_level
                   + [f"epsilon max {self._fmt(row.get('epsilon-max'), '.2f')}"] * per_device)
        return (f"round {row['round']}/{self.rounds}: devices {row['devices-trained']}, "
                f"train loss {self._fmt(row.get('train-loss'))}, NDCG@10 {self._fmt(row.get('ndcg@10'))}, "
                f"HR@10 {self._fmt(row.get('hr@10'))}, {', '.join(privacy)}, "
                f"{self._fmt(row.get('seconds'), '.1f')} s")

    @staticmethod
    def _failure_lines(row: dict) -> list[str]:
        ended = "; the run stops" if row.get("round-status") == "failed" else ""
        out = []
        for what, failed, asked, error in (
                ("", row.get("failures"), row.get("devices-asked"), row.get("first-error")),
                (" evaluation", row.get("eval-failures"), row.get("eval-asked"), row.get("eval-first-error"))):
            if failed:
                out.append(f"round {row['round']}{what}: {failed} of {asked or '?'} devices failed{ended}; "
                           f"first device error: {error}")
        return out

    def poll(self) -> None:
        rows = self._rows()
        if self.live is not None:
            self.live.update(self._table(rows))
            for row in rows[self.seen:]:
                for line in self._failure_lines(row):
                    self.live.console.print(line, style="red", markup=False, highlight=False)
            self.seen = len(rows)
            return
        columns = self._privacy_columns(rows)
        for row in rows[self.seen:]:
            print(self._line(row, *columns), flush=True)
            for line in self._failure_lines(row):
                print(line, flush=True)
        self.seen = len(rows)
