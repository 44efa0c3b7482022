"""A simulated Flower node hosting a block of simulated devices (`devices-per-node` > 1, simulation only).

A node stands for nothing real: it is a simulation artefact that saves the Flower and Ray cost of one
message per device. In a deployment every device is its own SuperNode and nothing here runs (a node
whose config has `data-dir` refuses a device list). The server (server/device_nodes.py) sends one train
or evaluate message per node naming the sampled devices on it (`node-devices`: their store indices and
the ids the server knows them by). Each listed device keeps everything it has on its own: its data
slice of the shared store, its own ledger file (locked, reconciled with the node's in-memory mirror of
it, checked against the spend the server has seen from it), its own seed derivation
(`client.device._device_seed`) and its own local round (`client.device.train_round`'s steps, or the same
round vectorised with other devices by `client.batched`: `vectorisable` says which). Devices under
on-device DP (dp = true: their own Opacus accountant) or with a FedProx term always train one by one.

The reply lists every device's own metrics and privacy record (what it would have sent alone) and
ONE aggregate of the devices that trained: under user-level DP the sum of their updates, each
clipped to `user-clipping-norm` exactly as `server.user_dp.ServerSideClipping` clips (float64), and
their count; otherwise their example-weighted mean weights and total weight (FedAvg's weighting).
Summing on the node is not a trust boundary in a simulation: the server process could read every
device's data from the shared store anyway.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.batched import (
    Factor,
    device_batches,
    one_epoch,
    pass_seed,
    train_batched,
    train_one_epoch,
    vectorisable,
)
from client.device import (
    TrainOutcome,
    begin_round,
    build_model,
    evaluate_round,
    finish_round,
    ledger_path,
    training_windows,
)
from shared.atomic import one_sync
from shared.coldstart import held_out_items
from shared.config import RunConfig, from_run_config
from shared.data.store import open_store
from shared.device_nodes import CLIPPED_SUM, NODE_AGGREGATE, NODE_DEVICES, SEEN_SPEND_LIST, WEIGHTED_MEAN
from shared.errors import PrivrecError
from shared.memory import trims_memory_after
from shared.model import FROZEN_BY_SCOPE
from shared.privacy.ledger import PrivacyLedger, from_json, ledger_lock, load_ledger, reconcile
from shared.privacy.population import check_seen_spend, keep_all_listed
from shared.text.features import TEXT_KEY, features_for
from shared.training import train_local

AGGREGATE_CHUNK = 32  # devices whose float64 updates are held at once when summing
# context.state key of the node's in-memory copies of its devices' ledger files: ONE record for all of them
# (parallel lists of device ids and ledger JSON). The simulation engine pickles a node's whole context to its
# Ray worker and back with every message; one record per device cost a Python object each way per device the
# node ever trained (at 100,000 devices, 25,000 per node, up to 16,000 records by round 100).
MIRRORS = "privacy-ledgers"


def hosts_devices(msg: Message) -> bool:
    return NODE_DEVICES in msg.content.config_records


@dataclass
class _Listed:
    index: int
    node_id: int
    outcome: TrainOutcome | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    summed: bool = False  # its update went straight into the round's partial sum (`client.batched.train_one_epoch`)
    ledger: PrivacyLedger | None = None  # as released (and synced) this round; None: read it from its file

    @property
    def device(self) -> str:
        return str(self.index)


@trims_memory_after  # a node process serves many messages: a heap holding too much free memory returns it
def train_devices(msg: Message, context: Context) -> Message:
    """Train every device the message lists, each as on its own; reply with their records and one aggregate."""
    torch.set_num_threads(1)
    run = from_run_config(context.run_config)
    record = msg.content.config_records["config"]
    store_dir, state_dir = _simulation_dirs(context, record)
    store = open_store(store_dir)
    features = features_for(run, store_dir, expected_key=record.get(TEXT_KEY))
    item_text = None if features is None else features.vectors
    global_state = msg.content.array_records["arrays"].to_torch_state_dict()
    run_id, server_round = str(record.get("run-id", "")), int(record["server-round"])
    proximal_mu = float(record.get("proximal-mu", 0.0))
    listed = _listed(msg)
    seen = _seen_spend(msg)
    ledgers = {dev.device: ledger_path(state_dir, dev.device) for dev in listed}
    mirrors = _mirrors(context)
    with one_sync():  # each device's ledger, as client/app.py prepares a lone device's
        for dev in listed:
            with ledger_lock(ledgers[dev.device]):
                reconcile(ledgers[dev.device], _mirror(mirrors, dev.device))
    keep_all_listed(state_dir, ledgers)
    for device, steps in seen.items():
        if device in ledgers:
            check_seen_spend(ledgers[device], device, steps)
    held_out = held_out_items(run, store.num_items)
    windows = {dev.index: training_windows(store.device(dev.index), run.device.window, held_out) for dev in listed}
    together = [d for d in listed if vectorisable(run, proximal_mu, len(windows[d.index]))]
    if len(together) < 2:
        together = []
    alone = [d for d in listed if d not in together]
    round_ = _Round(run, global_state, store.num_items, item_text, state_dir, run_id, server_round, proximal_mu)
    for group, vectorised in ((together, True), (alone, False)):
        if group:
            _train_group(round_, group, windows, vectorised)
    return _reply(msg, context, mirrors, run, listed, global_state, state_dir, round_.partial)


@dataclass
class _Round:
    run: RunConfig
    global_state: dict
    num_items: int
    item_text: np.ndarray | None
    state_dir: str
    run_id: str
    server_round: int
    proximal_mu: float
    partial: dict[str, torch.Tensor] | None = None  # the one-step devices' factored sum (float64, `_summed_keys`)


def _train_group(round_: _Round, devices: list[_Listed], windows: dict[int, np.ndarray], vectorised: bool) -> None:
    """`client.device.train_round` for each device, its steps in order: under its ledger's lock, reserve
    (`begin_round`), train, release (`finish_round`). The group's reservations are made durable together
    before any device trains, and its releases before the reply leaves (one barrier each, `one_sync`). The
    devices train in one vectorised pass (`client.batched`) or one by one (`train_local`, with Opacus
    and the device's own accountant under on-device DP)."""
    run = round_.run
    with ExitStack() as locks:
        tickets = {}
        with one_sync():
            for dev in devices:
                path = ledger_path(round_.state_dir, dev.device)
                locks.enter_context(ledger_lock(path))
                ticket = begin_round(run, path, dev.device, round_.run_id, round_.server_round, round_.proximal_mu)
                if isinstance(ticket, TrainOutcome):
                    dev.outcome = ticket  # declined: nothing trained, nothing but the refusal leaves
                else:
                    tickets[dev.index] = ticket
        training = [d for d in devices if d.index in tickets]
        if not training:
            return
        results = {}
        # every device's config but its seed is the run's; its seed drives its batch order and dropout
        train_cfg = tickets[training[0].index].train_cfg
        model = build_model(run, round_.num_items, round_.global_state, round_.item_text) if vectorised else None
        if vectorised and one_epoch(model, train_cfg):
            seeds = [tickets[d.index].train_cfg.seed for d in training]
            summed = train_one_epoch(model, [device_batches(windows[d.index], tickets[d.index].train_cfg)
                                             for d in training], train_cfg,
                                     _summed_keys(run, round_.global_state), _factor(run), seed=pass_seed(seeds))
            round_.partial = summed.total
            for position, dev in enumerate(training):
                dev.summed = True
                results[dev.index] = summed.results[position]
        elif vectorised:
            batched = train_batched(model, [windows[d.index] for d in training], train_cfg)
            fixed = {k: v.detach() for k, v in model.state_dict().items() if k not in batched.weights}
            for position, dev in enumerate(training):
                dev.weights = {**fixed, **{k: stacked[position] for k, stacked in batched.weights.items()}}
                results[dev.index] = batched.results[position]
        else:
            shared_model = None if run.device.dp else build_model(run, round_.num_items, round_.global_state,
                                                                  round_.item_text)
            for dev in training:
                ticket = tickets[dev.index]
                if shared_model is None:  # Opacus wraps and unwraps a DP device's model: a fresh one each
                    model = build_model(run, round_.num_items, round_.global_state, round_.item_text)
                else:  # the global weights again (building a model draws a random initialisation first)
                    model = shared_model
                    model.load_state_dict(round_.global_state)
                global_params = {k: v.detach().clone() for k, v in model.named_parameters()} \
                    if round_.proximal_mu > 0 else None
                results[dev.index] = train_local(model, windows[dev.index], ticket.train_cfg,
                                                 accountant_state=ticket.prior_state if run.device.dp else None,
                                                 global_params=global_params)
                # a copy: the shared model's tensors are overwritten by the next device's load_state_dict
                dev.weights = {k: v.detach().clone() for k, v in model.state_dict().items()} \
                    if model is shared_model else model.state_dict()
        with one_sync():  # a summed device's outcome holds no weights: its update is in `round_.partial`
            for dev in training:
                dev.outcome = finish_round(run, tickets[dev.index], ledger_path(round_.state_dir, dev.device),
                                           dev.device, dev.weights, results[dev.index])
                dev.ledger = tickets[dev.index].ledger  # what `release` wrote: the reply needs no second read


def _reply(msg: Message, context: Context, mirrors: dict[str, str], run: RunConfig, listed: list[_Listed],
           global_state, state_dir: str, partial: dict[str, torch.Tensor] | None) -> Message:
    metrics, privacy = [], []
    keep_all_listed(state_dir, {dev.device: ledger_path(state_dir, dev.device) for dev in listed})  # before it leaves
    for dev in listed:
        ledger = _mirror_ledger(mirrors, ledger_path(state_dir, dev.device), dev.device, dev.ledger)
        metrics.append(dev.outcome.metrics)
        privacy.append({"device": dev.device,
                        "history": json.dumps((ledger.accountant_state or {}).get("history") or [])})
    _keep_mirrors(context, mirrors)
    content = RecordDict({NODE_DEVICES: ConfigRecord({"ids": [d.node_id for d in listed],
                                                      "metrics": json.dumps(metrics),
                                                      "privacy": json.dumps(privacy)})})
    trained = [d for d in listed if not d.outcome.declined]
    if trained:
        arrays, aggregate = _aggregate(run, trained, global_state, partial)
        content["arrays"] = arrays
        content[NODE_AGGREGATE] = ConfigRecord(aggregate)
    return Message(content, reply_to=msg)


def _aggregate(run: RunConfig, trained: list[_Listed], global_state, partial: dict[str, torch.Tensor] | None
               ) -> tuple[ArrayRecord, dict]:
    """The devices' updates (weights - global, float64) summed with one factor per device (`_factor`): under
    user-level DP min(1, C / ||update||), `shared.privacy.user_level.clip_update`'s clipping, over all
    trainable arrays together; otherwise its FedAvg weight, divided by the total weight (an example-weighted
    mean). `partial` already holds that sum over the devices `client.batched.train_one_epoch` trained."""
    ids = [d.node_id for d in trained]
    user_dp = run.user_dp.enabled
    keys = _summed_keys(run, global_state)
    current = {k: global_state[k].to(torch.float64) for k in keys}
    total = {k: partial[k].clone() if partial is not None else torch.zeros_like(current[k]) for k in keys}
    weights = torch.tensor([float(d.outcome.metrics["num-examples"]) for d in trained], dtype=torch.float64)
    factor = _factor(run)
    own = [position for position, d in enumerate(trained) if not d.summed]
    for start in range(0, len(own), AGGREGATE_CHUNK):  # a chunk's float64 updates at a time
        chunk = own[start:start + AGGREGATE_CHUNK]
        updates = {k: torch.stack([trained[p].weights[k] for p in chunk]).to(torch.float64) - current[k]
                   for k in keys}
        norms = torch.sqrt(sum(u.square().flatten(1).sum(1) for u in updates.values()))
        scale = factor(norms, weights[chunk])
        for k, u in updates.items():
            total[k] += torch.tensordot(scale, u, dims=1)
    if user_dp:
        return (ArrayRecord({k: _array(v.numpy()) for k, v in total.items()}),
                {"ids": ids, "count": len(trained), "weight": float(len(trained)), "kind": CLIPPED_SUM})
    total_weight = float(weights.sum())
    # No device held a window: the global weights, of weight 0 (as each device would have sent them).
    mean = {k: (current[k] + total[k] / total_weight if total_weight > 0 else current[k]).to(global_state[k].dtype)
            for k in keys}
    return (ArrayRecord({k: _array(v.numpy()) for k, v in mean.items()}),
            {"ids": ids, "count": len(trained), "weight": total_weight, "kind": WEIGHTED_MEAN})


def _summed_keys(run: RunConfig, global_state) -> list[str]:
    """The arrays a node sums: under user-level DP the ones a device trains (the clipped norm is theirs)."""
    frozen = set(FROZEN_BY_SCOPE[run.device.trainable]) if run.user_dp.enabled else set()
    return [k for k in global_state if k not in frozen]


def _factor(run: RunConfig) -> Factor:
    """Each device's factor in the node's sum, from its update's norm and its window count."""
    if run.user_dp.enabled:
        clip = run.user_dp.clipping_norm
        return lambda norms, examples: torch.where(norms > 0, (clip / norms).clamp(max=1.0), 1.0)
    return lambda norms, examples: examples


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))


@trims_memory_after
def evaluate_devices(msg: Message, context: Context) -> Message:
    """Evaluate every listed device on its own users; reply with each device's metrics."""
    torch.set_num_threads(1)
    run = from_run_config(context.run_config)
    record = msg.content.config_records["config"]
    store_dir, _ = _simulation_dirs(context, record)
    store = open_store(store_dir)
    features = features_for(run, store_dir, expected_key=record.get(TEXT_KEY))
    item_text = None if features is None else features.vectors
    global_state = msg.content.array_records["arrays"].to_torch_state_dict()
    listed = _listed(msg)
    metrics = [evaluate_round(store.device(d.index), store.num_items, global_state, run, item_text=item_text)
               for d in listed]
    return Message(RecordDict({NODE_DEVICES: ConfigRecord({"ids": [d.node_id for d in listed],
                                                           "metrics": json.dumps(metrics)})}), reply_to=msg)


def _simulation_dirs(context: Context, record: ConfigRecord) -> tuple[str, str]:
    if "partition-id" not in context.node_config:
        raise PrivrecError("a message listing several devices (devices-per-node > 1) reached a node without "
                           "'partition-id' in its node config: devices-per-node is for simulations only")
    return str(record["data-store"]), str(record["state-dir"])


def _listed(msg: Message) -> list[_Listed]:
    record = msg.content.config_records[NODE_DEVICES]
    return [_Listed(int(i), int(n)) for i, n in zip(record["devices"], record["ids"])]


def _seen_spend(msg: Message) -> dict[str, int]:
    record = msg.content.config_records.get(SEEN_SPEND_LIST)
    return {} if record is None else {str(d): int(s) for d, s in zip(record["devices"], record["steps"])}


def _mirrors(context: Context) -> dict[str, str]:
    """device -> its ledger's JSON as the node last saw it (read from context.state directly: its
    `config_records` view is rebuilt from every record per access)."""
    record = context.state.get(MIRRORS)
    return {} if record is None else dict(zip(record["devices"], record["json"]))


def _keep_mirrors(context: Context, mirrors: dict[str, str]) -> None:
    if mirrors:
        context.state[MIRRORS] = ConfigRecord({"devices": list(mirrors), "json": list(mirrors.values())})


def _mirror(mirrors: dict[str, str], device: str) -> PrivacyLedger | None:
    text = mirrors.get(device)
    return None if text is None else from_json(json.loads(text), "in node state")


def _mirror_ledger(mirrors: dict[str, str], path: Path, device: str, written: PrivacyLedger | None) -> PrivacyLedger:
    ledger = written if written is not None else load_ledger(path, device)
    mirrors[device] = json.dumps(ledger.to_json())
    return ledger


__all__ = ["evaluate_devices", "hosts_devices", "train_devices"]
