"""privrec ClientApp: the Flower edge of a device.

Reads the run's static settings from `context.run_config` (Flower gives every ClientApp the run
config the ServerApp got, in simulation and deployment) and parses them once per message into a
`RunConfig`; the server's message carries the global model and only per-round or per-run derived
values (`server-round`, `run-id`, the text-features key, the catalogue hash, the spend the server has
seen, FedProx's `proximal-mu`). It hands them to `client.device` (plain torch) and replies with exactly
what may leave the device: the updated weights (train) and aggregate scalar metrics. Where the
device's data and ledger live comes from the node config in a deployment (`data-dir`, `state-dir`),
or from the server's message in a simulation (the shared store and the population folder beside it
that holds every simulated device's ledger).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.analytics import answer_cooccurrence_query, answer_popularity_query, answer_transition_query
from client.audit import audit_mod
from client.secagg import ANALYTICS_NOISE, SECAGG, secagg_mod
from shared.config import SCORER_MODELS, RunConfig, from_run_config
from shared.data.devices import CATALOGUE_KEY, check_server_catalogue
from shared.device_nodes import NODE_DEVICES
from shared.errors import PrivrecError
from shared.privacy.ledger import PrivacyLedger, from_json, ledger_lock, load_ledger, reconcile
from shared.privacy.population import check_seen_spend, keep_listed
from shared.text.features import TEXT_KEY, features_for

# Opacus calls logging.basicConfig(); without this every Flower log line prints twice.
logging.getLogger("flwr").propagate = False

app = ClientApp(mods=[audit_mod])  # records every reply when the node config has `audit-log`


def _device_code():
    """`client.device` (torch, Opacus, the model), imported by the first message that needs it: under a
    SuperNode every message starts a ClientApp process of its own, and a secure-aggregation key stage
    (setup, share, unmask: keys and shares only) then starts without loading torch, in a fraction of the time."""
    import torch

    from client import device

    torch.set_num_threads(1)
    return device


def _run_config(msg: Message, context: Context) -> tuple[RunConfig, ConfigRecord]:
    """The run's static settings (from the run config) and this round's values (from the message)."""
    return from_run_config(context.run_config), msg.content.config_records["config"]


def _device(context: Context, record: ConfigRecord, run: RunConfig) -> tuple[str, str, str]:
    """(device id, store folder, ledger folder) for this node."""
    node = context.node_config
    if "data-dir" in node:  # deployment: the node's own store holds exactly one device
        if run.federation.deterministic_devices:
            # Noise derived from the run seed is noise the server can regenerate and subtract.
            raise PrivrecError("run config 'deterministic-devices' = true is refused on a real device "
                               "(node config has 'data-dir'): it is for simulations only")
        return str(node.get("device-id", "0")), str(node["data-dir"]), str(node.get("state-dir", node["data-dir"]))
    if "partition-id" in node:  # simulation: one partition of the shared simulation store
        return str(node["partition-id"]), str(record["data-store"]), str(record["state-dir"])
    raise PrivrecError("node config has neither 'data-dir' (deployment) nor 'partition-id' (simulation)")


def _load(context: Context, record: ConfigRecord, run: RunConfig):
    device, store_dir, state_dir = _device(context, record, run)
    device_index = 0 if "data-dir" in context.node_config else int(device)
    if "data-dir" in context.node_config and record.get(CATALOGUE_KEY):
        check_server_catalogue(store_dir, str(record[CATALOGUE_KEY]))
    data, num_items = _device_code().load_device(store_dir, device_index)
    # Text models: the device builds the frozen text table from its own copy of the public catalogue
    # (cached by hash); the server only names which one, and a mismatch is refused.
    if run.pipeline.model in SCORER_MODELS:  # its public side comes from `_catalogue`, kept per process
        return device, data, num_items, state_dir, None
    features = features_for(run, store_dir, expected_key=record.get(TEXT_KEY))
    return device, data, num_items, state_dir, None if features is None else features.vectors


LEDGER_MIRROR = "privacy-ledger"  # context.state key: in-memory copy of the device's ledger file
SEEN_SPEND = "privacy-seen"  # instruction record: the spend the server has already seen from this device


def _ledger_mirror(context: Context) -> PrivacyLedger | None:
    record = context.state.config_records.get(LEDGER_MIRROR)
    return from_json(json.loads(str(record["json"])), "in node state") if record else None


def _mirror_ledger(context: Context, path: Path, device: str) -> PrivacyLedger:
    ledger = load_ledger(path, device)
    context.state.config_records[LEDGER_MIRROR] = ConfigRecord({"json": json.dumps(ledger.to_json())})
    return ledger


def _refuse_lost_spend(msg: Message, state_dir: str, device: str, path: Path) -> None:
    """A device that trained before never restarts from an empty or older ledger (issue 9, finding 3)."""
    keep_listed(state_dir, device, path)  # its population remembers that it trained
    seen = msg.content.config_records.get(SEEN_SPEND)  # and so does the server
    if seen is not None and str(seen["device"]) == device:
        check_seen_spend(path, device, int(seen["steps"]))


@app.train(mods=[secagg_mod])  # answers secure-aggregation stages; plain train messages pass through
def train(msg: Message, context: Context) -> Message:
    if NODE_DEVICES in msg.content.config_records:  # a simulated node hosting several devices (devices-per-node > 1)
        from client.node import train_devices  # torch: imported by the messages that need it

        return train_devices(msg, context)
    code = _device_code()
    run, record = _run_config(msg, context)
    device, data, num_items, state_dir, item_text = _load(context, record, run)
    path = code.ledger_path(state_dir, device)
    with ledger_lock(path):  # train_round takes the lock again for its own load -> release
        reconcile(path, _ledger_mirror(context))  # a lost or stale ledger file never lowers the spend
    global_state = msg.content.array_records["arrays"].to_torch_state_dict()
    if run.pipeline.model in SCORER_MODELS:
        return _train_scorer(msg, context, run, record, data, item_text, global_state, path, device, state_dir)
    _refuse_lost_spend(msg, state_dir, device, path)
    outcome = code.train_round(
        data, num_items, global_state, run,
        ledger_path=path, device=device,
        run_id=str(record.get("run-id", "")), server_round=int(record["server-round"]),
        # Sent by FedProx's configure_train only: no other strategy's round has a proximal term.
        proximal_mu=float(record.get("proximal-mu", 0.0)), item_text=item_text,
    )
    keep_listed(state_dir, device, path)  # listed before the update leaves
    ledger = _mirror_ledger(context, path, device)
    # The accountant history (noise multiplier, sample rate, steps per round) lets the server's report
    # recompute this device's epsilon with a second accountant; under DP its rows are config values,
    # the same for every device that trained in the same rounds.
    privacy = ConfigRecord({"device": device,
                            "history": json.dumps((ledger.accountant_state or {}).get("history") or [])})
    if outcome.declined:  # nothing trained, nothing but the refusal leaves the device
        return Message(RecordDict({"metrics": MetricRecord(outcome.metrics), "privacy": privacy}), reply_to=msg)
    reply = RecordDict({"arrays": ArrayRecord(outcome.state_dict), "metrics": MetricRecord(outcome.metrics),
                        "privacy": privacy})
    return Message(reply, reply_to=msg)


def _catalogue(context: Context, record: ConfigRecord, run: RunConfig, item_text=None):
    """The public item side of the content or channel scorer, from this device's copy of the catalogue."""
    from client.scorer import public_side  # torch: imported by the messages that need it

    key = record.get(TEXT_KEY)
    return public_side(_device(context, record, run)[1], None if key is None else str(key))


def _train_scorer(msg, context, run, record, data, item_text, global_state, path, device, state_dir) -> Message:
    """model = content-/channel-scorer: the device's gradient (one FedSGD step), its round recorded as a user-level
    release."""
    from client.scorer import is_consenting, train_scorer  # torch: imported by the messages that need it

    simulated = "partition-id" in context.node_config  # a consenting cohort exists only in simulation
    state, metrics = train_scorer(data, _catalogue(context, record, run, item_text), global_state, run,
                                  ledger_path=path, device=device,
                                  release_id=f"{record.get('run-id', '')}-round{int(record['server-round'])}",
                                  consenting=simulated and is_consenting(run, record["data-store"], int(device)))
    keep_listed(state_dir, device, path)
    _mirror_ledger(context, path, device)
    privacy = ConfigRecord({"device": device, "history": "[]"})  # no window-level DP-SGD in this mode
    reply = RecordDict({"metrics": MetricRecord(metrics), "privacy": privacy})
    if state is not None:
        reply["arrays"] = ArrayRecord(state)
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if NODE_DEVICES in msg.content.config_records:
        from client.node import evaluate_devices

        return evaluate_devices(msg, context)
    code = _device_code()
    run, record = _run_config(msg, context)
    _, data, num_items, _, item_text = _load(context, record, run)
    global_state = msg.content.array_records["arrays"].to_torch_state_dict()
    if run.pipeline.model in SCORER_MODELS:
        from client.scorer import evaluate_scorer  # torch: imported by the messages that need it

        metrics = evaluate_scorer(data, _catalogue(context, record, run, item_text), global_state, run)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    metrics = code.evaluate_round(data, num_items, global_state, run, item_text=item_text)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("popularity", mods=[secagg_mod])  # under secure aggregation the vector leaves masked
def popularity_query(msg: Message, context: Context) -> Message:
    """Federated analytics (`privrec baseline popularity|content --epsilon`): this device's unit-norm item-set
    vector, recorded as a user-level release in its ledger first; nothing but the refusal leaves when the
    release would pass the device's cap."""
    return _analytics_reply(msg, context, "item-set", lambda data, num_items, query, **ledger: answer_popularity_query(
        data, num_items, **ledger))


@app.query("cooccurrence", mods=[secagg_mod])
def cooccurrence_query(msg: Message, context: Context) -> Message:
    """Federated analytics (`model = channel-scorer`): this device's windowed co-occurrence vector among the items
    the server names (the top of the released popularity), each user's part of L2 norm <= 1, recorded as a
    user-level release in its ledger first; nothing but the refusal leaves when it would pass the device's cap."""
    return _analytics_reply(msg, context, "pairs", lambda data, num_items, query, **ledger: answer_cooccurrence_query(
        data, [int(i) for i in query["items"]], int(query["window"]), **ledger))


@app.query("transitions")  # no secure-aggregation path: the config refuses transition-release with it
def transitions_query(msg: Message, context: Context) -> Message:
    """Federated analytics (`transition-release = true`): this device's directed transition counts among the items
    the server names (the top of the released popularity), each user's part of L2 norm <= 1, recorded as a
    user-level release in its ledger first; nothing but the refusal leaves when it would pass the device's cap.
    A device whose own run config does not declare the release refuses it before its ledger or data is touched."""
    if not from_run_config(context.run_config).pipeline.transition_release:
        raise PrivrecError("the server asked for the transition release, but this device's run config has "
                           "'transition-release' = false: nothing recorded, nothing sent")
    return _analytics_reply(msg, context, "transitions", lambda data, num_items, query, **ledger:
                            answer_transition_query(data, [int(i) for i in query["items"]], **ledger))


def _analytics_reply(msg: Message, context: Context, key: str, answer) -> Message:
    """What every analytics query shares: load the device, bring its ledger up to the node's mirror, let `answer`
    record and compute the release (`(vector or None, epsilon)`), mirror the ledger, reply under `key`."""
    code = _device_code()
    run, record = _run_config(msg, context)
    device, store_dir, state_dir = _device(context, record, run)
    data, num_items = code.load_device(store_dir, 0 if "data-dir" in context.node_config else int(device))
    query = msg.content.config_records["analytics"]
    secure = run.secure_aggregation.enabled
    if secure and SECAGG not in msg.content.config_records:  # before the ledger: nothing recorded, nothing sent
        raise PrivrecError(f"run config 'secure-aggregation' = true, but the server's {msg.metadata.message_type} "
                           "carries no secure-aggregation stage: this device does not send its vector in clear")
    path = code.ledger_path(state_dir, device)
    with ledger_lock(path):
        reconcile(path, _ledger_mirror(context))
    # Under secure aggregation the device draws the noise itself, at its own run config's multiplier: it records that.
    noise = float(run.values[ANALYTICS_NOISE[msg.metadata.message_type]] if secure else query["noise-multiplier"])
    vector, epsilon = answer(
        data, num_items, query, ledger_path=path, device=device, noise_multiplier=noise,
        delta=float(query["delta"]), max_epsilon=float(run.device.max_epsilon), release_id=str(query["release"]),
        secure=secure)
    _mirror_ledger(context, path, device)
    metrics = {"declined": int(vector is None), "user-level-epsilon": epsilon}
    reply = RecordDict()
    if vector is not None and secure:  # an array, which `secagg_mod` noises (its share) and masks
        reply["arrays"] = ArrayRecord({key: Array(np.asarray(vector, dtype=np.float64))})
    elif vector is not None:
        metrics[key] = vector.tolist()
    reply["metrics"] = MetricRecord(metrics)
    return Message(reply, reply_to=msg)
