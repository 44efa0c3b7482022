"""The product's default pipeline (`model = channel-scorer`, `shared.config.DEFAULT_PIPELINE`) on ML-100K with and
without secure aggregation: same config, same seed, the real ServerApp and ClientApp in process (no Ray).

    PYTHONPATH=. python -m simulations.secagg_scorer --seeds 0 1 2

Secure runs use SecAgg+ for both analytics releases and every round (docs/privacy.md, "Scorer mode") with
m_min = 200 for a round (the expected Poisson cohort is 236 of 943, std ~13: a round falls below 200 about 0.3%
of the time and is then refused) and m_min = 900 for a release (every device joins; none drops in process), so a
sum carries n / m_min times the central noise variance (~1.18x in a round, ~1.05x in a release); clip range 3,
16 bits, t = 8. Each run gets a fresh population folder (fresh device ledgers). The Poisson cohorts, the device
noise and the releases' noise all come from OS entropy: the two arms of a seed share the seed (initial scorer,
evaluation), not the draws, so a difference between them within one seed is mostly noise. Writes
`simulations/results/secagg-scorer-<time>.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from simulations.output import write_json

SECURE = {"secure-aggregation": True, "secagg-min-cohort": 200, "secagg-release-min-cohort": 900,
          "secagg-clip-range": 3.0, "secagg-quantization-bits": 16, "secagg-threshold": 8}


def run_arm(secure: bool, seed: int, work: Path) -> dict[str, Any]:
    import torch

    from client.app import app as client_app
    from server.app import FederatedRun
    from server.run_dir import RunDirectory
    from shared import config
    from shared.data.store import open_store, prepare_store
    from simulations.inprocess import InProcessGrid

    torch.set_num_threads(1)
    store = prepare_store("ml-100k")
    name = f"{'secure' if secure else 'plain'}-seed{seed}"
    cfg = config.validate({**config.DEFAULT_PIPELINE, "seed": seed, "data-store": str(store),
                           "run-dir": str(work / "runs"), "run-name": name,
                           "population-dir": str(work / f"population-{name}"), **(SECURE if secure else {})})
    run_dir = RunDirectory.create(cfg["run-dir"], cfg["run-name"])
    started = time.perf_counter()
    FederatedRun(cfg, run_dir, InProcessGrid(client_app, open_store(store).num_devices, run_config=cfg)).execute()
    seconds = time.perf_counter() - started
    summary = json.loads((run_dir.path / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    evaluation = summary["federated-evaluation"]
    return {"arm": "secure" if secure else "plain", "seed": seed, "seconds": round(seconds, 1),
            **{k: evaluation[k] for k in ("test-ndcg@10", "test-hr@10", "valid-ndcg@10", "valid-hr@10")},
            "epsilon": summary["privacy"]["user-level"]["epsilon"],
            "adversary": summary["privacy"]["user-level"]["adversary"],
            "rounds": [r.get("secure-aggregation") for r in rows if r["round"] > 0],
            "release-devices": [json.loads((run_dir.path / f).read_text())["devices"]
                                for f in ("popularity.json", "cooccurrence.json")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="privrec-secagg-scorer-") as work:
        for seed in args.seeds:
            for secure in (False, True):
                results.append(run_arm(secure, seed, Path(work)))
                print(json.dumps(results[-1]), flush=True)
    out = Path(__file__).parent / "results" / f"secagg-scorer-{time.strftime('%Y%m%d-%H%M%S')}"
    write_json(out.with_suffix(".json"), {"settings": SECURE, "runs": results})
    lines = ["| arm | seeds | test NDCG@10 (mean) | test HR@10 (mean) | seconds (mean) | epsilon |",
             "|---|---|---|---|---|---|"]
    for arm in ("plain", "secure"):
        rows = [r for r in results if r["arm"] == arm]
        lines.append(f"| {arm} | {' '.join(str(r['seed']) for r in rows)} | "
                     f"{np.mean([r['test-ndcg@10'] for r in rows]):.4f} | "
                     f"{np.mean([r['test-hr@10'] for r in rows]):.4f} | "
                     f"{np.mean([r['seconds'] for r in rows]):.0f} | {rows[0]['epsilon']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
