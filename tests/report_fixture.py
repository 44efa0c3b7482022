"""A synthetic run directory in the format of `privrec report`'s input (docs/report-format.md).

Every epsilon in it is computed honestly with `shared.privacy.accounting.epsilon_from_state`
(what devices and the server use), so the report's cross-check has nothing to flag unless a
`tamper` is asked for. To point the report tests at a real tiny run instead, set
PRIVREC_REPORT_RUN=/path/to/runs/<run-id> (see tests/test_report.py).

Devices (sigma = 1.0, local-epochs = 3, batch-size = 8):

    "0"  q = 1   (<= 8 windows)   trains rounds 1, 2, 3
    "1"  q = 0.5 (16 windows)     trains rounds 1, 3
    "2"  q = 1                    trains round 2
    "3"  q = 1, 6 steps from an earlier run; trains rounds 1, 2; declines round 3 (its cap)
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.privacy.accounting import epsilon_from_state

DELTA = 1e-5
SIGMA = 1.0
EPOCHS = 3
ROUNDS = 3
RUN_ID = "fixture-run"
# device -> (sample rate, steps already spent in earlier runs, rounds it trains in)
DEVICES = {"0": (1.0, 0, (1, 2, 3)), "1": (0.5, 0, (1, 3)), "2": (1.0, 0, (2,)), "3": (1.0, 6, (1, 2))}
DECLINER = "3"
USER_Z, POPULATION, COHORT = 1.1, 50, 4
TAMPERS = ("ledger-epsilon", "ledger-history", "server-epsilon")


@lru_cache(maxsize=256)
def eps(history: tuple, accountant: str = "rdp") -> float:
    return epsilon_from_state({"history": [list(r) for r in history], "mechanism": accountant}, DELTA, accountant)


def _steps(q: float) -> int:
    return EPOCHS * round(1 / q)  # ceil(windows / batch-size) steps per epoch, q = 1 / that


def _history(q: float, earlier: int, rounds_done: int) -> tuple:
    # One row: Opacus merges consecutive steps with the same (sigma, q), and they never change.
    steps = earlier + rounds_done * _steps(q)
    return ((SIGMA, q, steps),) if steps else ()


def write_run(root: Path, *, user_dp: bool = True, ledgers: bool = True, tamper: tuple[str, str] | None = None,
              accountant: str = "rdp", state: str = "completed") -> Path:
    """Write runs/<RUN_ID> under `root`; `tamper` = (device, one of TAMPERS) falsifies one record."""
    run = root / RUN_ID
    run.mkdir(parents=True)
    q3, earlier3, rounds3 = DEVICES[DECLINER]
    # The cap lies between device 3's spend after its 2 rounds and what a 3rd would cost.
    lo, hi = eps(_history(q3, earlier3, len(rounds3)), accountant), eps(_history(q3, earlier3, 3), accountant)
    cap = round((lo + hi) / 2, 3)
    config = {"dp": True, "noise-multiplier": SIGMA, "max-grad-norm": 1.0, "window": 50, "batch-size": 8,
              "local-epochs": EPOCHS, "delta": DELTA, "accountant": accountant, "max-epsilon": cap,
              "user-dp": user_dp, "user-noise-multiplier": USER_Z if user_dp else 0.0,
              "user-clipping-norm": 0.5, "num-rounds": ROUNDS, "devices-per-round": COHORT,
              "deterministic-devices": False}

    devices: dict[str, Any] = {}
    ledger_files: dict[str, Any] = {}
    for device, (q, earlier, trained) in DEVICES.items():
        rounds, entries = [], []
        for k, r in enumerate(trained, 1):
            e = eps(_history(q, earlier, k), accountant)
            rounds.append([r, e])
            entries.append({"run": RUN_ID, "round": r, "steps": _steps(q), "sample_rate": q,
                            "noise_multiplier": SIGMA, "epsilon": e, "delta": DELTA, "accountant": accountant,
                            "time": 1.7e9 + r, "status": "released"})
        history = [list(row) for row in _history(q, earlier, len(trained))]
        declined = ROUNDS if device == DECLINER else None
        devices[device] = {"accountant": accountant, "history": history, "rounds": rounds,
                           "epsilon": rounds[-1][1], "declined-round": declined}
        ledger_files[device] = {
            "format": 1, "device": device,
            "accountant_state": {"history": [list(r) for r in history], "mechanism": accountant},
            "rounds": entries,
            "declined": {"run": RUN_ID, "round": ROUNDS, "cap": cap, "would-be-epsilon": hi}
            if declined else None}

    if tamper:
        device, how = tamper
        ledger, record = ledger_files[device], devices[device]
        if how == "ledger-epsilon":  # the ledger records less than its own history gives
            ledger["rounds"][-1]["epsilon"] = record["epsilon"] * 0.5
        elif how == "ledger-history":  # the ledger lost its latest round, consistently with itself
            q, earlier, trained = DEVICES[device]
            ledger["rounds"].pop()
            ledger["accountant_state"]["history"] = [list(r) for r in _history(q, earlier, len(trained) - 1)]
        elif how == "server-epsilon":  # the server recorded a figure its history does not give
            record["epsilon"] = record["epsilon"] * 1.01
        else:
            raise ValueError(f"tamper must be one of {TAMPERS}")

    user_level = None
    user_eps: dict[int, float] = {}
    if user_dp:
        q_user = COHORT / POPULATION
        for r in range(1, ROUNDS + 1):
            # computed on the merged row (fast); the file holds one row per round, as the server writes it
            user_eps[r] = eps(((USER_Z, q_user, r),), accountant)
        user_level = {"accountant": accountant, "history": [[USER_Z, q_user, 1]] * ROUNDS,
                      "rounds": [[r, e] for r, e in user_eps.items()], "population": POPULATION,
                      "expected-cohort": COHORT}

    metrics = []
    for r in range(ROUNDS + 1):
        seen = [max(e for rr, e in d["rounds"] if rr <= r) for d in devices.values()
                if any(rr <= r for rr, _ in d["rounds"])]
        cohort = [e for d in devices.values() for rr, e in d["rounds"] if rr == r]
        evaluated = r in (0, 2, 3)
        ndcg = 0.01 + 0.004 * r
        metrics.append({
            "round": r, "devices-trained": len(cohort), "declined": int(r == ROUNDS),
            "capped-devices": int(r >= ROUNDS),
            "epsilon-max": max(seen) if seen else None, "epsilon-median": _median(seen),
            "round-epsilon-max": max(cohort) if cohort else None, "round-epsilon-median": _median(cohort),
            "user-level-epsilon": user_eps.get(r), "train-loss": None if r == 0 else 7.0 - 0.1 * r,
            "ndcg@10": ndcg if evaluated else None, "hr@10": 2 * ndcg if evaluated else None,
            "ndcg@10-ci": [ndcg - 0.003, ndcg + 0.003] if evaluated else None,
            "hr@10-ci": [2 * ndcg - 0.006, 2 * ndcg + 0.006] if evaluated else None})

    on_device = max(d["epsilon"] for d in devices.values())
    unit = "one non-overlapping window of up to 50 consecutive interactions of one user's history"
    statements = [{"mechanism": "on-device DP-SGD",
                   "sentence": f"Each device's training is ({on_device:.2f}, {DELTA:g})-differentially private "
                               f"for any single window of its user's history ({unit}), against anyone who sees its "
                               "model updates.",
                   "epsilon": on_device, "delta": DELTA, "unit": unit, "adversary": "the server",
                   "accountant": accountant, "sampling": "Poisson sampling of windows, q = min(1, 8 / windows)"}]
    if user_dp:
        statements.append({
            "mechanism": "user-level DP-FedAvg",
            "sentence": f"The released global models are ({user_eps[ROUNDS]:.2f}, {DELTA:g})-differentially "
                        "private for any one user's whole participation, against anyone who sees them.",
            "epsilon": user_eps[ROUNDS], "delta": DELTA, "unit": "one user's whole data",
            "adversary": "anyone who sees a released model", "accountant": accountant,
            "sampling": f"Poisson sampling of users, q = {COHORT}/{POPULATION}"})
    privacy = {"format": 1, "delta": DELTA, "accountant": accountant, "statements": statements,
               "devices": devices, "user-level": user_level}

    _write(run / "config.json", config)
    _write(run / "status.json", {"state": state, "time": 1.7e9})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    _write(run / "privacy.json", privacy)
    if state == "completed":
        last = metrics[-1]
        _write(run / "summary.json", {"privacy": {s["mechanism"]: s["sentence"] for s in statements},
                                      "federated-evaluation": {"test-ndcg@10": last["ndcg@10"],
                                                               "test-hr@10": last["hr@10"],
                                                               "test-ndcg@10-ci": last["ndcg@10-ci"]}})
    if ledgers:
        for device, ledger in ledger_files.items():
            _write(run / "devices" / f"device-{device}" / "privacy-ledger.json", ledger)
    return run


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _write(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
