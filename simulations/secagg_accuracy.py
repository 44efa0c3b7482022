"""Issue 14's accuracy target: the same federated run on ML-100K with and without secure aggregation.

    PYTHONPATH=. python -m simulations.secagg_accuracy --rounds 5 --devices 64
    PYTHONPATH=. python -m simulations.secagg_accuracy --rounds 5 --devices 64 --noise user-dp

In process (simulations/inprocess.py): the real ServerApp logic (`server.app.FederatedRun`) and the
real ClientApp (`client.app`) train on the 943 one-user devices of ML-100K. Both runs share seed,
cohorts and device noise: on-device DP-SGD (dp = true) with `deterministic-devices`, so every device
draws the same DP-SGD noise in both runs, and FedAvg weighs every device 1 under on-device DP, as
secure aggregation's mean does. What differs is only the SecAgg+ round (clip to the quantizer's range,
quantize, mask, unmask). User-level DP is left off: with secure aggregation its noise is drawn on
the devices from OS entropy (the server must not be able to replay it), so it cannot be the same
draw as the server's central noise, and a comparison would measure two noise draws, not the protocol.
`--noise user-dp` runs that comparison anyway (dp = false, user-dp = true, same seed and noise level,
hence the same Poisson cohorts, but different noise draws): its difference bounds protocol + draw.
Central NDCG@10 (test items, every user) of both final models: simulations/results/secagg-accuracy-*.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from simulations.output import log_progress, save_results, timestamped


def one_run(secure: bool, args, root: Path) -> dict:
    import torch

    from client.app import app as client_app
    from server.app import FederatedRun
    from server.run_dir import RunDirectory
    from shared import config
    from shared.data.store import open_store, prepare_store
    from simulations.inprocess import InProcessGrid

    torch.set_num_threads(1)
    store_path = prepare_store("ml-100k")
    devices = open_store(store_path).num_devices  # the server waits for every device of the store
    cfg = config.validate({
        "data-store": str(store_path), "num-rounds": args.rounds, "devices-per-round": args.devices,
        "eval-every": 0, "central-eval": True, "fraction-evaluate": args.fraction_evaluate, "seed": args.seed,
        **({"dp": True, "deterministic-devices": True, "user-dp": False,
            "noise-multiplier": args.device_noise_multiplier} if args.noise == "device-dp" else
           {"dp": False, "user-dp": True, "user-noise-multiplier": args.user_noise_multiplier}),
        "local-epochs": args.local_epochs,
        "secure-aggregation": secure, "secagg-threshold": args.threshold, "secagg-min-cohort": args.threshold,
        "secagg-quantization-bits": args.bits, "secagg-clip-range": args.clip_range,
        "run-dir": str(root / f"runs-{secure}"), "run-name": "run", "population-dir": str(root / f"pop-{secure}")})
    run_dir = RunDirectory.create(cfg["run-dir"], cfg["run-name"])
    started = time.perf_counter()
    FederatedRun(cfg, run_dir, InProcessGrid(client_app, devices, run_config=cfg)).execute()
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    central = rows[-1]["central"]
    return {"secure-aggregation": secure, "seconds": round(seconds, 1), "central": central,
            "central-at-start": rows[0].get("central"),
            "rounds": [{k: r.get(k) for k in ("round", "devices-trained", "secure-aggregation")} for r in rows[1:]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--devices", type=int, default=64, help="devices per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=int, default=8)
    parser.add_argument("--bits", type=int, default=24, help="secagg-quantization-bits")
    parser.add_argument("--clip-range", type=float, default=2.0, help="secagg-clip-range")
    parser.add_argument("--noise", choices=["device-dp", "user-dp"], default="device-dp",
                        help="device-dp: same on-device noise in both runs; user-dp: central vs distributed noise")
    parser.add_argument("--user-noise-multiplier", type=float, default=1.0)
    parser.add_argument("--device-noise-multiplier", type=float, default=1.0,
                        help="device-dp's noise-multiplier (small: a model that learns, so equal accuracy means more)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--fraction-evaluate", type=float, default=0.05)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for secure in (False, True):
            log_progress(f"run with secure-aggregation = {secure}")
            runs.append(one_run(secure, args, Path(tmp)))
            log_progress(json.dumps({k: runs[-1][k] for k in ("seconds", "central")}))
    plain, secure = runs
    metric = next(k for k in ("test-ndcg@10", "ndcg@10") if k in plain["central"])
    diff = abs(plain["central"][metric] - secure["central"][metric])
    results = {"settings": vars(args), "metric": metric, "runs": runs, "abs-difference": diff,
               "target": "abs-difference <= 0.002", "met": diff <= 0.002}
    report = "\n".join([
        f"# Secure aggregation vs plain, ML-100K, {args.rounds} rounds x {args.devices} devices, seed {args.seed}",
        "", (f"On-device DP-SGD (dp = true, noise-multiplier {args.device_noise_multiplier}, deterministic-devices: "
             f"same device noise in both runs), user-dp off, local-epochs {args.local_epochs}; "
             if args.noise == "device-dp" else
             f"User-level DP (user-dp = true, z = {args.user_noise_multiplier}; central noise vs distributed "
             "noise: same level, different draws), on-device DP off; ") +
        f"SecAgg+ with threshold {args.threshold}, {args.bits} bits, clip range {args.clip_range}.", "",
        f"| run | central {metric} at round 0 | after round {args.rounds} | seconds |", "|---|---|---|---|",
        *[f"| {'secure aggregation' if r['secure-aggregation'] else 'plain'} | "
          f"{(r['central-at-start'] or {}).get(metric, float('nan')):.5f} | {r['central'][metric]:.5f} | "
          f"{r['seconds']} |" for r in runs],
        "", f"|difference| = {diff:.5f} (target <= 0.002: {'met' if diff <= 0.002 else 'NOT met'})"])
    save_results(timestamped("secagg-accuracy"), results, report)


if __name__ == "__main__":
    main()
