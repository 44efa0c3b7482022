"""Issue 13's consenting-cohort target, measured in the product as a user runs it.

    python -m simulations.consent_product run --seeds 0 1 2      # about 2.5 min a seed; finished seeds are skipped
    python -m simulations.consent_product report --seeds 0 1 2

Each seed is one `privrec simulate --set public-share=0.1 --set seed=S` in a fresh temporary directory: the
product's default private pipeline (`model = channel-scorer`, user-level epsilon 2 at delta 1e-5) with a
consenting 10% cohort. The server pretrains SASRec on the consenting users' histories (no noise, no guarantee for
them); the frozen model is one more channel of the scorer, which every device computes on its own history
(docs/privacy.md, "Consenting cohort"). Everything is read from the run's own records:

* `summary.json`: the federated evaluation (every user's test and validation item, scored on the devices);
* `pretraining.json`: the pretrained SASRec alone on the same users ("pretraining only", computed by the server in
  simulation), the bar of issue 13's target: private rounds at user-level epsilon <= 8 improve NDCG@10 by >= 10%
  over pretraining only;
* `baselines.json`: the private baselines at the run's own epsilon; `privacy.json`: the statement and epsilon.

The seed fixes the split, the consenting cohort, the pretraining and the cohorts' sampler; the noise comes from OS
entropy, so a re-run differs. The recipe is the product's default plus the research replay's SASRec channel
(`simulations/consent_pipeline.py`), fixed before these runs; nothing here is chosen on their figures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulations.output import (
    load_seed_files,
    log_progress,
    run_missing_seeds,
    save_results,
    seeded_commands,
    timestamped,
)
from simulations.privacy_utility import stats_cell, summary_stats

PREFIX = "consent-product-seed"
PUBLIC_SHARE = 0.1
TARGET_GAIN = 0.10  # issue 13: private rounds improve on pretraining only by >= 10%


def privrec_command() -> str:
    """The `privrec` entry point of the Python running this script (the project's own install)."""
    beside = Path(sys.executable).with_name("privrec")
    found = str(beside) if beside.exists() else shutil.which("privrec")
    if not found:
        raise SystemExit("privrec is not installed beside this Python: pip install -e . first")
    return found


def run_seed(seed: int) -> dict:
    command = [privrec_command(), "simulate", "--set", f"public-share={PUBLIC_SHARE:g}", "--set", f"seed={seed}"]
    with tempfile.TemporaryDirectory(prefix="privrec-consent-") as where:
        log_progress(f"seed {seed}: {' '.join(command[1:])}")
        started = time.perf_counter()
        done = subprocess.run(command, cwd=where, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"seed {seed}: privrec exited {done.returncode}:\n{done.stderr[-3000:]}")
        run_dir = next((Path(where) / "runs").iterdir())
        read = lambda name: json.loads((run_dir / name).read_text())  # noqa: E731
        summary, pretraining, baselines, privacy = (read("summary.json"), read("pretraining.json"),
                                                    read("baselines.json"), read("privacy.json"))
    fed, alone = summary["federated-evaluation"], pretraining["pretraining-only"]
    row = {"seed": seed, "command": "privrec " + " ".join(command[1:]), "wall-seconds": round(seconds, 1),
           "consenting-devices": pretraining["consenting-devices"],
           "test-ndcg@10": fed["test-ndcg@10"], "test-ndcg@10-ci": fed["test-ndcg@10-ci"],
           "test-hr@10": fed["test-hr@10"], "valid-ndcg@10": fed["valid-ndcg@10"],
           "pretraining-only-test-ndcg@10": alone["test-ndcg@10"], "pretraining-only-test-hr@10": alone["test-hr@10"],
           "pretraining-only-valid-ndcg@10": alone["valid-ndcg@10"],
           "baseline-content-test-ndcg@10": baselines["content"]["test"]["ndcg@10"],
           "baseline-popularity-test-ndcg@10": baselines["popularity"]["test"]["ndcg@10"],
           "user-level-epsilon": privacy["epsilon"], "delta": privacy["delta"],
           "statement": privacy["statements"][0]["sentence"]}
    row["gain-over-pretraining-only"] = row["test-ndcg@10"] / row["pretraining-only-test-ndcg@10"] - 1
    log_progress(f"seed {seed}: NDCG@10 {row['test-ndcg@10']:.4f} against pretraining only "
                 f"{row['pretraining-only-test-ndcg@10']:.4f} ({row['gain-over-pretraining-only']:+.0%}), "
                 f"epsilon {row['user-level-epsilon']:.3f}, {seconds:.0f} s")
    return row


def cmd_run(args) -> None:
    run_missing_seeds(PREFIX, args.seeds, run_seed)


def cmd_report(args) -> None:
    rows = load_seed_files(PREFIX, args.seeds, "simulations.consent_product")
    results = summarize(rows, args.seeds)
    save_results(timestamped("consent-product"), results, markdown(results))


def summarize(rows: list[dict], seeds) -> dict:
    """Mean, std and t interval of every figure over the seeds; the target is judged on the gain of the means."""
    keys = ("test-ndcg@10", "test-hr@10", "valid-ndcg@10", "pretraining-only-test-ndcg@10",
            "pretraining-only-test-hr@10", "baseline-content-test-ndcg@10", "baseline-popularity-test-ndcg@10",
            "gain-over-pretraining-only", "user-level-epsilon")
    stats = {k: summary_stats([r[k] for r in rows]) for k in keys}
    gain = stats["test-ndcg@10"]["mean"] / stats["pretraining-only-test-ndcg@10"]["mean"] - 1
    return {"seeds": list(seeds), "public-share": PUBLIC_SHARE, "runs": rows, "summary": stats,
            "gain-of-the-means": gain, "target": f"gain >= {TARGET_GAIN:.0%} at user-level epsilon <= 8",
            "target-met": bool(gain >= TARGET_GAIN and max(r["user-level-epsilon"] for r in rows) <= 8),
            "statement": rows[0]["statement"]}


def markdown(results: dict) -> str:
    rows, stats = results["runs"], results["summary"]
    lines = [f"# Consenting {results['public-share']:.0%} cohort in the product (`privrec simulate --set "
             f"public-share={results['public-share']:g}`), seeds {' '.join(map(str, results['seeds']))}", "",
             "| seed | test NDCG@10 [95% CI] | test HR@10 | pretraining only NDCG@10 | gain | `baseline content` | "
             "`baseline popularity` | user-level epsilon | wall clock |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["test-ndcg@10-ci"]
        lines.append(f"| {r['seed']} | {r['test-ndcg@10']:.4f} [{lo:.4f}, {hi:.4f}] | {r['test-hr@10']:.4f} | "
                     f"{r['pretraining-only-test-ndcg@10']:.4f} | {r['gain-over-pretraining-only']:+.0%} | "
                     f"{r['baseline-content-test-ndcg@10']:.4f} | {r['baseline-popularity-test-ndcg@10']:.4f} | "
                     f"{r['user-level-epsilon']:.3f} | {r['wall-seconds']:.0f} s |")
    lines.append(f"| **mean +- std [95% t CI]** | {stats_cell(stats['test-ndcg@10'])} | "
                 f"{stats['test-hr@10']['mean']:.4f} | {stats_cell(stats['pretraining-only-test-ndcg@10'])} | "
                 f"{results['gain-of-the-means']:+.0%} (of the means) | "
                 f"{stats['baseline-content-test-ndcg@10']['mean']:.4f} | "
                 f"{stats['baseline-popularity-test-ndcg@10']['mean']:.4f} | "
                 f"{stats['user-level-epsilon']['mean']:.3f} | |")
    lines += ["", f"Target ({results['target']}): **{'met' if results['target-met'] else 'not met'}**.", "",
              f"Privacy (the run's own statement): {results['statement']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    seeded_commands(__doc__, {"run": cmd_run, "report": cmd_report}, seeds=(0, 1, 2), argv=argv)


if __name__ == "__main__":
    main()
