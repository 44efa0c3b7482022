"""What every experiment script in simulations/ prints and leaves behind."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from shared.atomic import write_bytes_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def median_seconds(step: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of `step` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def log_progress(text: str) -> None:
    """One time-stamped progress line for the long experiment scripts."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def save_results(stem: Path, results: dict, report: str) -> Path:
    """`stem`.json and `stem`.md, each written atomically (never a half-written result file)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = stem.with_suffix(".json")
    write_bytes_atomic(out, json.dumps(results, indent=1).encode())
    write_bytes_atomic(stem.with_suffix(".md"), (report.rstrip("\n") + "\n").encode())
    print(report)
    print(f"written: {out} (+ .md)")
    return out


def timestamped(name: str) -> Path:
    """results/<name>-<time stamp> (the stem of a new result)."""
    return RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def seeded_commands(doc: str, commands: dict[str, Callable], seeds, argv: list[str] | None = None) -> None:
    """The `run` / `report`-style command line of a per-seed study: one sub-command per entry of `commands`, each
    taking `--seeds` (default `seeds`); torch on one thread, as every in-process study here runs."""
    import argparse

    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in commands:
        sub.add_parser(name).add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    args = parser.parse_args(argv)
    commands[args.command](args)


def write_json(path: Path, obj, **dumps_options) -> None:
    """`obj` as indented JSON at `path`, written atomically (a study stopped mid-write leaves the old file or none)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=1, **dumps_options) + "\n").encode())


def run_missing_seeds(prefix: str, seeds, compute: Callable[[int], dict]) -> None:
    """results/<prefix><seed>.json for every seed that has none yet (a re-run skips finished seeds), each written
    atomically: an interrupted study leaves whole files only."""
    for seed in seeds:
        path = RESULTS / f"{prefix}{seed}.json"
        if not path.exists():
            write_json(path, compute(seed))


def load_seed_files(prefix: str, seeds, module: str) -> list[dict]:
    """results/<prefix><seed>.json of every seed, in order; a missing one names the command that makes it."""
    rows = []
    for seed in seeds:
        path = RESULTS / f"{prefix}{seed}.json"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `python -m {module} run --seeds {seed}`")
        rows.append(json.loads(path.read_text()))
    return rows
