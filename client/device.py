"""What one device does with its own data: fine-tune the global model with DP-SGD, evaluate it.

Plain torch/numpy: the Flower message handling lives in `client/app.py`. Only model weights and
aggregate scalars leave this module; the device's histories never do. Under DP nothing that leaves
depends on how many windows the device holds: the round's steps and sample rate are config values,
its FedAvg weight is 1, and no training loss is sent (see `shared/training.py`).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.coldstart import held_out_items
from shared.config import DeviceTraining, RunConfig
from shared.data.store import DeviceData, open_store
from shared.data.windows import history_windows
from shared.metrics import eval_inputs, evaluate_histories
from shared.model import SASRec, model_for
from shared.privacy.accounting import compose_history, epsilon_from_state, history_steps
from shared.privacy.ledger import LEDGER_FILE, PrivacyLedger, decline, ledger_lock, load_ledger, release, reserve
from shared.training import LocalTrainConfig, LocalTrainResult, dp_steps_per_epoch, train_local


def load_device(store_dir: str | Path, device_id: int) -> tuple[DeviceData, int]:
    """This device's histories and the catalogue size; reads only this device's slice of the store."""
    store = open_store(store_dir)
    return store.device(device_id), store.num_items


def training_windows(data: DeviceData, window: int, held_out: np.ndarray | None = None) -> np.ndarray:
    """All of the device's training examples: non-overlapping windows of each of its users' histories."""
    return history_windows(data.train, window, held_out)


@dataclass
class TrainOutcome:
    state_dict: dict[str, torch.Tensor] | None  # None when the device declined (nothing leaves)
    metrics: dict[str, float | int]

    @property
    def declined(self) -> bool:
        return self.state_dict is None


def _device_seed(run: RunConfig, server_round: int, device: str) -> int | None:
    # DP noise must be unpredictable to the server, which knows the run seed: fresh OS entropy,
    # unless a simulation asks for repeatable runs (then: per run seed, round and device).
    if not run.federation.deterministic_devices:
        return None
    return int(np.random.SeedSequence([run.federation.seed, server_round, zlib.crc32(device.encode())])
               .generate_state(1)[0])


def round_steps(cfg: RunConfig | Mapping[str, Any]) -> int:
    """DP-SGD steps of one round: local-epochs x ceil(1 / sample-rate), the same for every device."""
    device = RunConfig.of(cfg).device
    return device.epochs * dp_steps_per_epoch(device.sample_rate)


def plan_round(ledger: PrivacyLedger, cfg: RunConfig | Mapping[str, Any]) -> tuple[dict, float, int]:
    """(accountant state after this round, epsilon it would reach, steps) -- computed before training.

    Depends on the config and the ledger only, never on the device's data: every DP round is
    `round_steps(cfg)` steps at rate `sample-rate`. After a non-private round the epsilon is inf.
    """
    device = RunConfig.of(cfg).device
    steps = round_steps(cfg)
    row = {"history": [[float(device.noise_multiplier), float(device.sample_rate), steps]],
           "mechanism": device.accountant}
    planned = compose_history(ledger.accountant_state, row)
    epsilon = math.inf if ledger.unbounded else epsilon_from_state(planned, device.delta, device.accountant)
    return planned, epsilon, steps


def _declined(ledger: PrivacyLedger, would_be: float) -> TrainOutcome:
    # inf never travels as a number (it is not JSON): an unbounded spend is a flag.
    metrics: dict[str, float | int] = {"declined": 1, "num-examples": 0}
    if math.isfinite(ledger.epsilon):
        metrics["epsilon"] = ledger.epsilon
    else:
        metrics["epsilon-unbounded"] = 1
    if math.isfinite(would_be):
        metrics["would-be-epsilon"] = would_be
    return TrainOutcome(None, metrics)


def privacy_unit(device: DeviceTraining) -> dict[str, str]:
    """What a ledger entry's epsilon is about (stored with every DP round)."""
    return {"unit": f"one window of up to {device.window} interactions", "relation": "add/remove one window"}


def build_model(cfg: RunConfig | Mapping[str, Any], num_items: int, global_state: Mapping[str, torch.Tensor],
                item_text: np.ndarray | None) -> SASRec:
    """The global model as this device runs it: received weights plus, for text models, the frozen text
    table the device computed itself from the public catalogue (never received, never sent)."""
    return model_for(cfg, num_items, item_text, state=global_state)


def train_round(data: DeviceData, num_items: int, global_state: Mapping[str, torch.Tensor],
                cfg: RunConfig | Mapping[str, Any], ledger_path: Path, device: str, run_id: str,
                server_round: int, proximal_mu: float = 0.0, item_text: np.ndarray | None = None) -> TrainOutcome:
    """One round of on-device training; the round is in the ledger before the update is returned.

    Every round, private or not, goes through the ledger, under its lock from load to release. A
    device whose ledger has declined refuses any round. A round that would take the device past its
    cap (`max-epsilon`; a non-private round's epsilon is infinite) is refused; a DP round that would
    pass it is recorded as `declined` and the device never trains again with that ledger. A DP round
    after a non-private one is refused: no finite epsilon can be stated for it.
    """
    with ledger_lock(ledger_path):
        return _train_round_locked(data, num_items, global_state, RunConfig.of(cfg), ledger_path, device, run_id,
                                   server_round, proximal_mu, item_text)


@dataclass
class RoundTicket:
    """A round the ledger has reserved: what the device trains with, and what its release needs."""

    ledger: PrivacyLedger
    train_cfg: LocalTrainConfig
    prior_state: dict | None  # the accountant state before this round (DP rounds compose with it)
    planned_state: dict | None  # DP: the state after this round, as reserved
    planned_steps: int
    started: float


def begin_round(run: RunConfig, ledger_path: Path, device: str, run_id: str, server_round: int,
                proximal_mu: float = 0.0) -> RoundTicket | TrainOutcome:
    """The ledger's side of a round before training: a declined `TrainOutcome`, or the reserved round.

    Call under `ledger_lock(ledger_path)`. A device whose ledger has declined refuses any round. A round
    that would take the device past its cap (`max-epsilon`; a non-private round's epsilon is infinite) is
    refused; a DP round that would pass it is recorded as `declined` and the device never trains again
    with that ledger. A DP round after a non-private one is refused: no finite epsilon can be stated for it.
    """
    started = time.perf_counter()
    dev = run.device
    train_cfg = LocalTrainConfig.for_round(dev, seed=_device_seed(run, server_round, device), proximal_mu=proximal_mu)
    train_cfg.validate()  # before the ledger: a bad proximal weight is refused before any spend is reserved
    ledger = load_ledger(ledger_path, device)
    if ledger.declined:
        return _declined(ledger, float(ledger.declined.get("would-be-epsilon", ledger.epsilon)))
    cap = dev.max_epsilon
    where = {"run": run_id, "round": server_round}
    prior_state = ledger.accountant_state  # `reserve` replaces it with the planned state
    if dev.dp:
        planned, planned_epsilon, planned_steps = plan_round(ledger, run)
        if cap > 0 and planned_epsilon > cap:
            record = {**where, "cap": cap, "time": time.time()}
            if math.isfinite(planned_epsilon):
                record.update({"epsilon": ledger.epsilon, "would-be-epsilon": planned_epsilon})
            else:
                record["reason"] = "a non-private round was released: epsilon is unbounded"
            decline(ledger_path, ledger, record)
            return _declined(ledger, planned_epsilon)
        if ledger.unbounded:  # no cap, but no finite epsilon to report for this round either
            return _declined(ledger, planned_epsilon)
        reserve(ledger_path, ledger, planned,
                {**where, "private": True, "steps": planned_steps, "sample_rate": float(dev.sample_rate),
                 "noise_multiplier": dev.noise_multiplier, "epsilon": planned_epsilon, "delta": dev.delta,
                 "accountant": dev.accountant, **privacy_unit(dev), "time": time.time()})
        return RoundTicket(ledger, train_cfg, prior_state, planned, planned_steps, started)
    if cap > 0:  # an unnoised release passes every cap; refused, but the budget stays for DP rounds
        return _declined(ledger, math.inf)
    reserve(ledger_path, ledger, ledger.accountant_state,
            {**where, "private": False, "epsilon": None, "time": time.time()})
    return RoundTicket(ledger, train_cfg, prior_state, None, 0, started)


def finish_round(run: RunConfig, ticket: RoundTicket, ledger_path: Path, device: str,
                 state_dict: dict[str, torch.Tensor], result: LocalTrainResult) -> TrainOutcome:
    """The ledger's side of a round after training (under the same lock): release it, and the reply metrics."""
    if run.device.dp:
        if result.steps != ticket.planned_steps or \
                history_steps(result.accountant_state) != history_steps(ticket.planned_state):
            raise RuntimeError(f"device {device}: took {result.steps} DP steps, reserved {ticket.planned_steps}")
        release(ledger_path, ticket.ledger, epsilon=float(result.epsilon))
        # Nothing here depends on the device's data: FedAvg weight 1, config steps and rate, and an
        # epsilon that follows from the (identical) history. No loss, no timing, no window count.
        return TrainOutcome(state_dict, {"num-examples": 1, "steps": int(result.steps),
                                         "sample-rate": float(result.sample_rate),
                                         "epsilon": float(result.epsilon)})
    release(ledger_path, ticket.ledger)
    return TrainOutcome(state_dict, {"num-examples": int(result.num_examples),
                                     "train-loss": float(result.loss), "steps": int(result.steps),
                                     "seconds": time.perf_counter() - ticket.started})


def _train_round_locked(data, num_items, global_state, run: RunConfig, ledger_path, device, run_id, server_round,
                        proximal_mu, item_text) -> TrainOutcome:
    ticket = begin_round(run, ledger_path, device, run_id, server_round, proximal_mu)
    if isinstance(ticket, TrainOutcome):
        return ticket
    windows = training_windows(data, run.device.window, held_out_items(run, num_items))
    model = build_model(run, num_items, global_state, item_text)
    global_params = {k: v.detach().clone() for k, v in model.named_parameters()} if proximal_mu > 0 else None
    result = train_local(model, windows, ticket.train_cfg,
                         accountant_state=ticket.prior_state if run.device.dp else None,
                         global_params=global_params)
    return finish_round(run, ticket, ledger_path, device, model.state_dict(), result)


def evaluate_round(data: DeviceData, num_items: int, global_state: Mapping[str, torch.Tensor],
                   cfg: RunConfig | Mapping[str, Any], k: int = 10,
                   item_text: np.ndarray | None = None) -> dict[str, float | int]:
    """HR@k / NDCG@k sums over this device's users, on validation and test items."""
    model = build_model(cfg, num_items, global_state, item_text)
    metrics: dict[str, float | int] = {"num-examples": len(data.test)}
    for split in ("valid", "test"):
        inputs, targets, exclude = eval_inputs(data.train, data.valid, data.test, split)
        per_user = evaluate_histories(model, inputs, targets, exclude, k=k)
        metrics[f"{split}-hit@{k}-sum"] = float(per_user["hit"].sum())
        metrics[f"{split}-ndcg@{k}-sum"] = float(per_user["ndcg"].sum())
    return metrics


def ledger_path(state_dir: str | Path, device: str) -> Path:
    return Path(state_dir) / f"device-{device}" / LEDGER_FILE


__all__ = ["PrivacyLedger", "TrainOutcome", "build_model", "evaluate_round", "ledger_path", "load_device",
           "train_round",
           "training_windows"]
