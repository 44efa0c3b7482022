"""Issue 12 in the ServerApp: `aggregation = per-row` and `model-average` (shared/aggregation.py, wired in)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

import server.app
from client.app import app as client_app
from server.app import main as server_main
from server.per_row import PerRowAveraging
from server.strategy import build_strategy
from shared import config
from shared.aggregation import mean_update, running_average, touched_rows
from shared.errors import PrivrecError
from simulations.inprocess import InProcessGrid, serve, set_identity
from tests.synthetic import walk_store

NUM_DEVICES = 6
SMALL = {"max-len": 16, "window": 12, "hidden-size": 16, "num-heads": 2, "num-blocks": 1, "dropout": 0.0,
         "local-epochs": 2, "local-lr": 0.02, "batch-size": 2, "dp": False, "deterministic-devices": True,
         "devices-per-round": 3, "eval-every": 0}


def _reply(arrays: dict[str, np.ndarray], examples: float) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_a_row_touched_by_one_device_of_two_moves_by_that_devices_full_update():
    set_identity()
    wrapper = PerRowAveraging(FedAvg(min_train_nodes=0, min_available_nodes=0))
    current = {"item_emb.weight": np.zeros((3, 2), dtype=np.float32), "w": np.zeros(2, dtype=np.float32)}
    wrapper.configure_train(1, ArrayRecord({k: Array(v) for k, v in current.items()}), ConfigRecord(),
                            _NoNodes())
    a = {"item_emb.weight": np.array([[0, 0], [1, 1], [2, 2]], np.float32), "w": np.array([1, 1], np.float32)}
    b = {"item_emb.weight": np.array([[0, 0], [0, 0], [4, 4]], np.float32), "w": np.array([4, 4], np.float32)}
    arrays, _ = wrapper.aggregate_train(1, [_reply(a, 1.0), _reply(b, 3.0)])
    emb = arrays["item_emb.weight"].numpy()
    assert np.allclose(emb[1], 1.0)  # only device a touched row 1: its whole update, not 1/4 of it
    assert np.allclose(emb[2], (2 * 1 + 4 * 3) / 4)  # both touched row 2: example-weighted mean
    assert np.allclose(emb[0], 0.0)
    assert np.allclose(arrays["w"].numpy(), (1 * 1 + 4 * 3) / 4)  # every other array: FedAvg


class _NoNodes:
    def get_node_ids(self):
        return []


def test_per_row_is_wrapped_only_when_asked():
    cfg = config.validate({"dp": False, "aggregation": "per-row"})
    strategy = build_strategy(cfg, 6, lambda r, s: None, lambda r, s: None)
    chain, inner = [], strategy
    while hasattr(inner, "strategy"):
        chain.append(type(inner).__name__)
        inner = inner.strategy
    assert "PerRowAveraging" in chain and type(inner) is FedAvg
    plain = build_strategy(config.validate({}), 6, lambda r, s: None, lambda r, s: None)
    inner, names = plain, []
    while hasattr(inner, "strategy"):
        names.append(type(inner).__name__)
        inner = inner.strategy
    assert "PerRowAveraging" not in names


def _wrapped(cfg) -> bool:
    inner, names = build_strategy(cfg, 6, lambda r, s: None, lambda r, s: None), []
    while hasattr(inner, "strategy"):
        names.append(type(inner).__name__)
        inner = inner.strategy
    return "PerRowAveraging" in names


@pytest.mark.parametrize("overrides, expected", [
    ({}, "fedavg"),  # the default run is private (dp = true)
    ({"dp": False}, "per-row"),
    ({"dp": False, "user-dp": True}, "fedavg"),
    ({"dp": False, "secure-aggregation": True}, "fedavg"),
    ({"dp": False, "item-representation": "text"}, "fedavg"),
    ({"dp": False, "devices-per-node": 2}, "fedavg"),
    ({"dp": False, "aggregation": "fedavg"}, "fedavg"),
    ({"dp": False, "aggregation": "per-row"}, "per-row"),
])
def test_the_default_aggregation_is_per_row_exactly_where_it_is_allowed(overrides, expected):
    cfg = config.validate(overrides)
    assert cfg["aggregation"] == overrides.get("aggregation", "auto")  # the record keeps what was asked
    assert config.aggregation_in_effect(cfg) == expected
    assert _wrapped(cfg) == (expected == "per-row")


def _simulate(no_dp, *pairs, config_file=None):
    """The config `privrec simulate` resolves (tools/cli.py: cmd_simulate)."""
    from tools.options import run_config_from_args

    return run_config_from_args(argparse.Namespace(config=config_file, set=list(pairs), no_dp=no_dp))


def test_privrec_simulate_no_dp_runs_per_row_by_default():
    cfg = _simulate(True, "model=sasrec")
    assert cfg["dp"] is False and config.aggregation_in_effect(cfg) == "per-row" and _wrapped(cfg)
    for private in (_simulate(False, "model=sasrec"), _simulate(True)):  # on-device DP; the user-level DP pipeline
        assert config.aggregation_in_effect(private) == "fedavg" and not _wrapped(private)
    hosted = _simulate(True, "model=sasrec", "devices-per-node=4")  # a node's reply merges its devices' updates
    assert config.aggregation_in_effect(hosted) == "fedavg"


TUNED = ("local-optimizer", "local-lr", "strategy", "server-lr", "server-tau", "model-average")


def _tuned(cfg):
    return {k: cfg[k] for k in TUNED}


def test_a_non_private_sasrec_run_takes_the_tuned_federation_settings_it_does_not_set(tmp_path):
    # issue 12, fifth pass: local SGD 0.5, FedAdam 0.001 with tau 1e-6; the running average 0.9 from 200 rounds on
    recipe = {"local-optimizer": "sgd", "local-lr": 0.5, "strategy": "fedadam", "server-lr": 0.001,
              "server-tau": 1e-6}
    assert _tuned(_simulate(True, "model=sasrec")) == {**recipe, "model-average": 0.0}
    assert _tuned(_simulate(True, "model=sasrec", "num-rounds=200")) == {**recipe, "model-average": 0.9}
    # a key the user sets keeps its value, even the schema's default, from --set or from a file
    mine = _simulate(True, "model=sasrec", "num-rounds=200", "local-lr=0.005", "model-average=0")
    assert _tuned(mine) == {**recipe, "local-lr": 0.005, "model-average": 0.0}
    toml = tmp_path / "run.toml"
    toml.write_text('model = "sasrec"\ndp = false\nstrategy = "fedavg"\n')
    assert _tuned(_simulate(False, config_file=toml)) == {**recipe, "strategy": "fedavg", "model-average": 0.0}


@pytest.mark.parametrize("no_dp, pairs", [
    (False, ("model=sasrec", "num-rounds=200")),  # on-device DP-SGD
    (True, ("model=sasrec", "num-rounds=200", "user-dp=true")),
    (True, ("model=sasrec", "num-rounds=200", "secure-aggregation=true", "secagg-min-cohort=8")),
    (True, ("model=sasrec", "num-rounds=200", "aggregation=fedavg")),  # measured with per-row only
    (True, ("model=sasrec", "num-rounds=200", "devices-per-node=4")),
])
def test_every_other_sasrec_run_keeps_the_schema_defaults(no_dp, pairs):
    assert _tuned(_simulate(no_dp, *pairs)) == {k: config.defaults()[k] for k in TUNED}


def test_the_default_pipeline_keeps_its_own_settings():
    cfg = _simulate(True, "num-rounds=200")
    assert _tuned(cfg) == {**{k: config.defaults()[k] for k in TUNED},
                           **{k: v for k, v in config.DEFAULT_PIPELINE.items() if k in TUNED}}


def test_a_flwr_run_config_takes_its_values_as_given():
    # context.run_config lists every key (pyproject.toml), so nothing there is "unset"
    run = config.from_run_config({**config.defaults(), "dp": False})
    assert (run.device.optimizer, run.device.lr, run.federation.strategy) == ("adam", 0.005, "fedavg")


def test_fedadam_takes_its_step_from_the_per_row_mean_with_the_configured_tau(tmp_path):
    """One round of the tuned recipe in the ServerApp: per-row mean of the replies, then Flower's FedAdam
    (bias-corrected rate eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)), first moments from zero) with `server-tau`."""
    store = walk_store(tmp_path / "store", num_users=NUM_DEVICES, num_items=40)
    tau, eta = 1e-6, 0.001
    run_config = {**SMALL, "data-store": str(store), "num-rounds": 1, "aggregation": "per-row",
                  "local-optimizer": "sgd", "local-lr": 0.5, "local-epochs": 1, "strategy": "fedadam",
                  "server-lr": eta, "server-tau": tau, "run-dir": str(tmp_path / "runs"), "run-name": "a"}
    current, updates, weights = _one_round(run_config)
    delta = mean_update(updates, weights, [{"item_emb.weight": touched_rows(u["item_emb.weight"])} for u in updates])
    b1, b2 = 0.9, 0.99
    rate = eta * np.sqrt(1 - b2 ** 2) / (1 - b1 ** 2)
    model = torch.load(tmp_path / "runs" / "a" / "checkpoint" / "model.pt", weights_only=True)
    for k, v in model.items():
        step = rate * (1 - b1) * delta[k] / (np.sqrt((1 - b2) * delta[k] ** 2) + tau)
        assert np.allclose(v.numpy(), current[k] + step, rtol=1e-4, atol=1e-7), k
    # with Flower's default tau (1e-3) the step of these small SGD updates would be capped far below eta
    moved = np.abs(model["blocks.0.attn.q.weight"].numpy() - current["blocks.0.attn.q.weight"]).max()
    assert moved > 0.5 * rate


def test_a_resume_compares_the_aggregation_in_effect(tmp_path):
    from shared.resume import refuse_incompatible

    # A DP run written under the old default (fedavg) continues under the new default (auto = fedavg there).
    refuse_incompatible({"config": {"dp": True, "aggregation": "fedavg"}, "round": 1}, config.validate({}), tmp_path)
    # A non-private run written with fedavg cannot continue as per-row, which auto now means there.
    with pytest.raises(PrivrecError, match="'aggregation' = 'fedavg'"):
        refuse_incompatible({"config": {"dp": False, "aggregation": "fedavg"}, "round": 1},
                            config.validate({"dp": False}), tmp_path)
    refuse_incompatible({"config": {"dp": False, "aggregation": "per-row"}, "round": 1},
                        config.validate({"dp": False}), tmp_path)


@pytest.mark.parametrize("overrides, named", [
    ({"aggregation": "per-row"}, "'dp' = false"),  # dp = true is the default
    ({"aggregation": "per-row", "dp": False, "user-dp": True}, "'user-dp' = false"),
    ({"aggregation": "per-row", "dp": False, "item-representation": "text"}, "item-representation = text"),
    ({"aggregation": "per-row", "dp": False, "secure-aggregation": True}, "secure-aggregation = true"),
    ({"aggregation": "per-row", "dp": False, "devices-per-node": 2}, "devices-per-node = 2"),
    ({"model-average": 1.0}, "model-average"),
    ({"aggregation": "mean"}, "aggregation"),
])
def test_refusals_name_the_key(overrides, named):
    with pytest.raises(PrivrecError, match="aggregation|model-average") as err:
        config.validate(overrides)
    assert named in str(err.value) and "\n" not in str(err.value)


def _context(run_config):
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def _train_models(grid):
    """The global model each train message carried, in order (one per round)."""
    out = []
    for m in grid.delivered:
        if m.metadata.message_type == "train":
            state = m.content.array_records["arrays"].to_torch_state_dict()
            if not out or any(not torch.equal(state[k], out[-1][k]) for k in state):
                out.append(state)
    return out


def _one_round(run_config):
    """Serve a one-round run in process: the global model the devices got, their updates and FedAvg weights."""
    grid = InProcessGrid(client_app, NUM_DEVICES, keep_messages=True)
    serve(server_main, grid, _context(run_config))
    (sent,) = _train_models(grid)
    current = {k: v.numpy().astype(np.float64) for k, v in sent.items()}
    replies = [r for r in grid.replies if r.content.array_records]
    updates = [{k: v.numpy().astype(np.float64) - current[k]
                for k, v in r.content.array_records["arrays"].to_torch_state_dict().items()} for r in replies]
    weights = [float(r.content.metric_records["metrics"]["num-examples"]) for r in replies]
    return current, updates, weights


def test_per_row_round_is_shared_aggregation_on_the_rounds_replies(tmp_path):
    store = walk_store(tmp_path / "store", num_users=NUM_DEVICES, num_items=40)
    run_config = {**SMALL, "data-store": str(store), "num-rounds": 1, "aggregation": "per-row",
                  "run-dir": str(tmp_path / "runs"), "run-name": "p"}
    current, updates, weights = _one_round(run_config)
    assert len(updates) == 3
    masks = [{"item_emb.weight": touched_rows(u["item_emb.weight"])} for u in updates]
    # Some row is touched by some but not all devices, so per-row and FedAvg differ in this round.
    touched = np.stack([m["item_emb.weight"] for m in masks])
    assert np.any(touched.any(0) & ~touched.all(0))
    expected = mean_update(updates, weights, masks)
    model = torch.load(tmp_path / "runs" / "p" / "checkpoint" / "model.pt", weights_only=True)
    for k, v in model.items():
        assert np.allclose(v.numpy(), current[k] + expected[k], atol=1e-6), k
    fedavg = mean_update(updates, weights)["item_emb.weight"]
    assert not np.allclose(model["item_emb.weight"].numpy(), current["item_emb.weight"] + fedavg, atol=1e-6)


def test_the_running_average_is_evaluated_saved_and_survives_a_resume(tmp_path, monkeypatch):
    decay = 0.5
    evaluated = []
    real_evaluation = server.app.central_evaluation

    def spy(model_cfg, state, *args, **kwargs):
        evaluated.append({k: v.clone() for k, v in state.items()})
        return real_evaluation(model_cfg, state, *args, **kwargs)

    monkeypatch.setattr(server.app, "central_evaluation", spy)

    class DyingGrid(InProcessGrid):
        trains = 0

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == "train":
                DyingGrid.trains += 1
                if DyingGrid.trains == 3:
                    raise ConnectionError("SuperLink went away")
            return super().send_and_receive(messages, timeout=timeout)

    store = walk_store(tmp_path / "store", num_users=NUM_DEVICES, num_items=40)
    run_config = {**SMALL, "data-store": str(store), "num-rounds": 3, "model-average": decay,
                  "run-dir": str(tmp_path / "runs"), "run-name": "a"}
    path = tmp_path / "runs" / "a"
    grid = DyingGrid(client_app, NUM_DEVICES, keep_messages=True)
    with pytest.raises(ConnectionError):
        serve(server_main, grid, _context(run_config))
    g0, g1 = _train_models(grid)  # the global models rounds 1 and 2 trained from
    g2 = torch.load(path / "checkpoint" / "model.pt", weights_only=True)  # the raw global model: training goes on
    assert any(not torch.equal(g2[k], g1[k]) for k in g2)
    average = None
    for g in (g0, g1, g2):
        average = running_average(average, {k: v.numpy() for k, v in g.items()}, decay)
    saved_average = torch.load(path / "checkpoint" / "average.pt", weights_only=True)
    released = torch.load(path / "model.pt", weights_only=True)
    for k in g2:
        assert np.allclose(saved_average[k].numpy(), average[k], atol=1e-6), k
        assert torch.equal(released[k], saved_average[k])
    assert evaluated and all(torch.equal(evaluated[0][k], g0[k]) for k in g0)  # round 0: the average is g0

    # A different decay cannot continue this average.
    with pytest.raises(PrivrecError, match="model-average"):
        serve(server_main, InProcessGrid(client_app, NUM_DEVICES), _context({**run_config, "model-average": 0.9}))

    evaluated.clear()
    grid = InProcessGrid(client_app, NUM_DEVICES, keep_messages=True)
    serve(server_main, grid, _context(run_config))
    (sent,) = _train_models(grid)
    assert all(torch.equal(sent[k], g2[k]) for k in g2)  # round 3 trains from the raw global model
    g3 = torch.load(path / "checkpoint" / "model.pt", weights_only=True)
    average = running_average(average, {k: v.numpy() for k, v in g3.items()}, decay)
    released = torch.load(path / "model.pt", weights_only=True)
    for k in g3:
        assert np.allclose(released[k].numpy(), average[k], atol=1e-6), k  # the average went on from round 2's
        assert torch.equal(evaluated[-1][k], released[k])  # the final central evaluation is of the average
    summary = json.loads((path / "summary.json").read_text())
    assert summary["central-evaluation"] is not None


def test_row_momentum_is_the_fedopt_arms_server_step_on_the_item_rows_only():
    """`row-momentum` = simulations.fedopt's `rows-epochs1-lr01-avgm-rows` server step (ServerOptimizer avgm on
    item_emb only): velocity = m x velocity + per-row mean on the rows, FedAvg everywhere else."""
    from shared.aggregation import ServerOptimizer

    set_identity()
    wrapper = PerRowAveraging(FedAvg(min_train_nodes=0, min_available_nodes=0), momentum=0.5)
    reference = ServerOptimizer(kind="avgm", momentum=0.5, keys=("item_emb.weight",))
    rng = np.random.default_rng(0)
    weights = {"item_emb.weight": np.zeros((4, 2), np.float32), "w": np.zeros(3, np.float32)}
    expected = {k: v.copy() for k, v in weights.items()}
    for server_round in (1, 2, 3):
        wrapper.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in weights.items()}), ConfigRecord(),
                                _NoNodes())
        updates = []
        for touched in ([1, 2], [2, 3]):  # rows each device changed
            emb = np.zeros((4, 2), np.float32)
            emb[touched] = rng.normal(size=(len(touched), 2))
            updates.append({"item_emb.weight": emb, "w": rng.normal(size=3).astype(np.float32)})
        replies = [_reply({k: weights[k] + u[k] for k in weights}, n) for u, n in zip(updates, (1.0, 2.0))]
        arrays, _ = wrapper.aggregate_train(server_round, replies)
        weights = {k: a.numpy() for k, a in arrays.items()}
        masks = [{"item_emb.weight": touched_rows(u["item_emb.weight"])} for u in updates]
        expected = reference.step(expected, mean_update(updates, [1.0, 2.0], masks))
        for k in weights:
            assert np.allclose(weights[k], expected[k], atol=1e-5), (server_round, k)
    plain = mean_update(updates, [1.0, 2.0], masks)["item_emb.weight"]
    assert not np.allclose(wrapper.velocity["item_emb.weight"], plain)  # momentum carried over rounds


def test_the_row_velocity_is_checkpointed_and_restored(tmp_path):
    from server.checkpoint import load_checkpoint, restore_strategy

    store = walk_store(tmp_path / "store", num_users=NUM_DEVICES, num_items=40)
    run_config = {**SMALL, "data-store": str(store), "num-rounds": 2, "run-dir": str(tmp_path / "runs"),
                  "run-name": "m", "row-momentum": 0.5}
    serve(server_main, InProcessGrid(client_app, NUM_DEVICES), _context(run_config))
    cfg = config.validate({k: v for k, v in run_config.items()})
    assert config.aggregation_in_effect(cfg) == "per-row"  # the default for a non-private run
    cfg["population-dir"] = json.loads((tmp_path / "runs" / "m" / "checkpoint" / "state.json").read_text())[
        "population-dir"]
    checkpoint = load_checkpoint(tmp_path / "runs" / "m", cfg)
    velocity = checkpoint.strategy_state["row_velocity"]["item_emb.weight"]
    assert np.any(velocity != 0)
    fresh = build_strategy(cfg, NUM_DEVICES, lambda r, s: None, lambda r, s: None)
    restore_strategy(fresh, checkpoint)
    assert np.array_equal(fresh.per_row.velocity["item_emb.weight"], velocity)
    assert not hasattr(fresh.flower, "row_velocity")
    with pytest.raises(PrivrecError, match="row-momentum"):  # a different momentum cannot continue it
        load_checkpoint(tmp_path / "runs" / "m", {**cfg, "row-momentum": 0.0})
