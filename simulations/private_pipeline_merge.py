"""Merge per-seed runs of simulations.private_pipeline (one process per seed, run side by side) into one table.

    python -m simulations.private_pipeline_merge simulations/results/private-pipeline-A.json ...-B.json ...

Arms present in several files get their seed rows concatenated (a seed seen twice is an error) and are
summarised again; writes simulations/results/private-pipeline-merged-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from shared.errors import PrivrecError
from simulations.output import save_results, timestamped
from simulations.private_pipeline import markdown, summarise


def merge(paths: list[Path]) -> dict:
    merged: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "merged_from": [p.name for p in paths],
                    "seeds": [], "arms": {}}
    seeds_of: dict[str, list[int]] = {}
    for path in paths:
        run = json.loads(path.read_text())
        for name, arm in run["arms"].items():
            seen = seeds_of.setdefault(name, [])
            if set(seen) & set(run["seeds"]):
                raise PrivrecError(f"{path}: arm {name!r} repeats seed(s) {sorted(set(seen) & set(run['seeds']))}")
            seen.extend(run["seeds"])
            target = merged["arms"].setdefault(name, {"config": arm["config"], "seeds": [], "seed_ids": []})
            target["seeds"].extend(arm["seeds"])
            target["seed_ids"].extend(run["seeds"])
        merged["seeds"] = sorted(set(merged["seeds"]) | set(run["seeds"]))
    for arm in merged["arms"].values():
        arm["summary"] = summarise(arm["seeds"])
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", type=Path, nargs="+")
    results = merge(parser.parse_args().paths)
    save_results(timestamped("private-pipeline-merged"), results, markdown(results))


if __name__ == "__main__":
    main()
