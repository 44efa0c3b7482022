"""Round checkpoints: a restarted ServerApp (or SuperLink) resumes a run instead of starting over.

After every round the ServerApp replaces `runs/<run-id>/checkpoint/` as one unit (a staging folder
renamed into place, see shared/atomic.py):

    checkpoint/state.json   round counter, the config that matters for resuming, and how many bytes of
                            the run's journal of device records (privacy-devices.jsonl) it covers
    checkpoint/model.pt     the global model after that round
    checkpoint/strategy.pt  the strategy's own state (FedAdam's moment estimates, per-row aggregation's row
                            velocity; empty for FedAvg)
    checkpoint/average.pt   the running average of the global model (model-average > 0 only)

The privacy tally (per device id: epsilon, cap, the accountant history it reported) is not copied
into every checkpoint: that would cost every device ever seen after every round. It is rebuilt from
the journal the ServerApp appends each round's changed records to, before the checkpoint
(shared/privacy/device_journal.py); a journal shorter than the checkpoint counted is refused.

Submitting the run again with the same `run-name` (and `resume = true`, the default) continues
with the next round. A checkpoint from an incompatible config is refused, never silently mixed.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.atomic import staged_dir, write_synced
from shared.errors import PrivrecError
from shared.privacy.device_journal import JOURNAL, read_journal
from shared.resume import CHECKPOINT_DIR, MUST_MATCH, refuse_incompatible

# 3: the tally is in the journal of device records; 2: inline, keyed by device id; 1: inline, epsilon and
# caps keyed by Flower node id
FORMAT = 3
READABLE = (1, 2, 3)
STRATEGY_STATE = ("m_t", "v_t")  # FedOpt's (FedAdam's) server moments; FedAvg/FedProx keep none
ROW_VELOCITY = "row_velocity"  # per-row aggregation's server momentum on the item rows (row-momentum > 0)


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, torch.Tensor]
    strategy_state: dict[str, dict[str, np.ndarray]]
    epsilon_by_device: dict[str, float]  # device id -> largest epsilon it reported
    config: dict[str, Any]
    capped: dict[str, int]  # device id -> round it declined (devices at their cap are not asked again)
    records: dict[str, dict[str, Any]]  # privacy.json's per-device records
    node_devices: dict[int, str]  # node id -> device id when the checkpoint was written (may be stale)
    average: dict[str, torch.Tensor] | None = None  # running average of the global model (model-average)
    journal_bytes: int | None = None  # bytes of the device-record journal it covers; None: an inline tally (format < 3)


def _tensor_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(run_path: Path, server_round: int, arrays: dict[str, torch.Tensor], strategy: Any,
                    cfg: dict[str, Any], *, journal_bytes: int,
                    average: dict[str, torch.Tensor] | None = None) -> None:
    """`journal_bytes`: the size of the device-record journal once this round's records were appended."""
    strategy_state = {name: {k: torch.from_numpy(np.asarray(v)) for k, v in getattr(strategy.flower, name).items()}
                      for name in STRATEGY_STATE if getattr(strategy.flower, name, None) is not None}
    if getattr(strategy, "per_row", None) is not None and strategy.per_row.velocity:
        velocity = strategy.per_row.velocity
        strategy_state[ROW_VELOCITY] = {k: torch.from_numpy(np.asarray(v)) for k, v in velocity.items()}
    # population-dir as the ServerApp resolved it (the config may leave it empty: derived from the store)
    state = {"format": FORMAT, "round": server_round, "config": {k: cfg[k] for k in MUST_MATCH},
             "population-dir": cfg["population-dir"],
             "device-journal": {"file": JOURNAL, "bytes": int(journal_bytes)}}
    with staged_dir(run_path / CHECKPOINT_DIR, replace=True) as staged:
        write_synced(staged / "model.pt", _tensor_bytes(arrays))
        write_synced(staged / "strategy.pt", _tensor_bytes(strategy_state))
        if average is not None:
            write_synced(staged / "average.pt", _tensor_bytes(average))
        write_synced(staged / "state.json", (json.dumps(state, indent=1) + "\n").encode())


def load_checkpoint(run_path: Path, cfg: dict[str, Any]) -> Checkpoint | None:
    """The run's last checkpoint, or None; refuses one written with an incompatible config."""
    directory = run_path / CHECKPOINT_DIR
    if not (directory / "state.json").is_file():
        return None
    try:
        state = json.loads((directory / "state.json").read_text())
        if state.get("format") not in READABLE:
            raise ValueError(f"format {state.get('format')!r}, expected one of {READABLE}")
        arrays = torch.load(directory / "model.pt", weights_only=True)
        strategy_state = {name: {k: v.numpy() for k, v in values.items()}
                          for name, values in torch.load(directory / "strategy.pt", weights_only=True).items()}
        average = torch.load(directory / "average.pt", weights_only=True) \
            if (directory / "average.pt").is_file() else None
        journal_bytes = None
        if state["format"] >= 3:
            journal_bytes = int(state["device-journal"]["bytes"])
            journal = read_journal(run_path / str(state["device-journal"]["file"]), min_bytes=journal_bytes)
            records, epsilons, node_devices = journal.records, journal.epsilons, journal.node_devices
            capped = {d: int(r["declined-round"]) for d, r in records.items() if r.get("declined-round") is not None}
        elif state["format"] == 1:  # node-keyed: rebuild the device-keyed tally from the per-device records
            records = dict(state.get("records", {}))
            epsilons = {d: float(r["epsilon"]) for d, r in records.items() if r.get("rounds") or r.get("epsilon")}
            capped = {d: int(r["declined-round"]) for d, r in records.items() if r.get("declined-round") is not None}
            node_devices = {int(k): str(v) for k, v in state.get("node-devices", {}).items()}
        else:
            records = dict(state.get("records", {}))
            epsilons = {str(k): float(v) for k, v in state["epsilon-by-device"].items()}
            capped = {str(k): int(v) for k, v in state["capped"].items()}
            node_devices = {int(k): str(v) for k, v in state.get("node-devices", {}).items()}
        server_round = int(state["round"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise PrivrecError(f"{directory}: unreadable checkpoint ({exc}); set resume = false or choose "
                           "another run-name to start over") from None
    refuse_incompatible(state, cfg, directory)
    if state.get("population-dir", cfg["population-dir"]) != cfg["population-dir"]:
        # The devices' ledgers must be the ones the tally was counted against.
        raise PrivrecError(f"{directory}: written with simulated device ledgers in population-dir = "
                           f"{state['population-dir']!r}, this run has {cfg['population-dir']!r}; resume on the same "
                           "store and population-dir or choose another run-name")
    return Checkpoint(round=server_round, arrays=arrays, strategy_state=strategy_state,
                      epsilon_by_device=epsilons, config=state["config"], capped=capped, records=records,
                      node_devices=node_devices, average=average, journal_bytes=journal_bytes)


def restore_strategy(strategy: Any, checkpoint: Checkpoint) -> None:
    for name, values in checkpoint.strategy_state.items():
        if name == ROW_VELOCITY:
            if getattr(strategy, "per_row", None) is not None:
                strategy.per_row.velocity = dict(values)
            continue
        setattr(strategy.flower, name, values)
    strategy.round_offset = checkpoint.round
    strategy.privacy.epsilon_by_device.update(checkpoint.epsilon_by_device)
    strategy.privacy.capped.update(checkpoint.capped)
    strategy.privacy.records.update(checkpoint.records)
    strategy.privacy.node_devices.update(checkpoint.node_devices)
