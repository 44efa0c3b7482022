"""What a round's run records cost the ServerApp against the devices seen so far (issue 15).

    python -m simulations.record_cost                       # D = 5,000 30,000 63,000 100,000 devices seen
    python -m simulations.record_cost --devices-seen 63000 --cohort 1000

A round's run records, written with the ServerApp's own functions: the records of the round's cohort
appended to the journal (shared/privacy/device_journal.py), privacy.json, and the checkpoint (a model
of the bench's size, 1.1 MB). Before the journal (commit 4968428 and earlier) every record went into
privacy.json and checkpoint/state.json every round; the same script run on such a tree (it picks the
API it finds) measures that. The tally holds D records as a user-level-only run's are (empty history:
the devices run no DP-SGD); at 100 rounds of 1,000 of 100,000 devices, D = 63,000.

Writes simulations/results/record-cost-<time>.json and .md and prints the Markdown.
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import time
from pathlib import Path

import torch

from server.checkpoint import save_checkpoint
from server.strategy import build_strategy
from shared import config
from shared.atomic import write_json_atomic
from simulations.output import save_results, timestamped

RECORD = {"accountant": "rdp", "history": [], "rounds": [], "epsilon": 0.0, "declined-round": None}


def round_cost(seen: int, cohort: int, rounds: int) -> dict:
    """Fastest of `rounds` rounds' record writes with `seen` records in the tally (it measures the disk, not load)."""
    cfg = config.validate({"user-dp": True, "dp": False, "devices-per-round": cohort})
    cfg["population-dir"] = "/nonexistent"
    strategy = build_strategy(cfg, max(seen, cohort * (rounds + 1)), lambda *a: None, lambda *a: None)
    tally = strategy.privacy
    for device in range(seen):
        tally.records[str(device)] = {**RECORD, "rounds": []}
        tally.node_devices[device + 1] = str(device)
    arrays = {"w": torch.zeros(280_000)}
    run = Path(tempfile.mkdtemp(prefix="privrec-record-cost-"))
    journal_api = "journal_bytes" in inspect.signature(save_checkpoint).parameters
    journal = None
    if journal_api:
        from shared.privacy.device_journal import JOURNAL, JOURNAL_KEY, DeviceJournal

        journal = DeviceJournal(run / JOURNAL)
        journal.start()
    times = []
    for r in range(1, rounds + 1):
        changed = {str(d): d + 1 for d in range(r * cohort, (r + 1) * cohort)}
        start = time.perf_counter()
        if journal is not None:
            journal.append(r, changed, tally.records, tally.epsilon_by_device)
            write_json_atomic(run / "privacy.json", {"format": 1, JOURNAL_KEY: JOURNAL})
            save_checkpoint(run, r, arrays, strategy, cfg, journal_bytes=journal.size)
        else:
            write_json_atomic(run / "privacy.json", {"format": 1, "devices": tally.records})
            save_checkpoint(run, r, arrays, strategy, cfg)
        times.append(time.perf_counter() - start)
    rewritten = sum(p.stat().st_size for p in (run / "privacy.json", run / "checkpoint" / "state.json"))
    return {"devices_seen": seen, "journal": journal_api, "seconds_per_round": min(times),
            "bytes_rewritten_per_round": rewritten,
            "bytes_appended_per_round": journal.size // rounds if journal is not None else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices-seen", nargs="+", type=int, default=[5000, 30000, 63000, 100000])
    parser.add_argument("--cohort", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = [round_cost(seen, args.cohort, args.rounds) for seen in args.devices_seen]
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "cohort": args.cohort, "rows": rows}
    lines = [f"# Run records per round against devices seen ({results['started']}, cohort {args.cohort})", "",
             "| devices seen | journal | seconds per round | bytes rewritten (privacy.json + state.json) | "
             "bytes appended (journal) |", "|---|---|---|---|---|"]
    lines += [f"| {r['devices_seen']:,} | {r['journal']} | {r['seconds_per_round']:.3f} | "
              f"{r['bytes_rewritten_per_round']:,} | {r['bytes_appended_per_round']:,} |" for r in rows]
    save_results(timestamped("record-cost"), results, "\n".join(lines))


if __name__ == "__main__":
    main()
