"""Many simulated devices per Flower node (`devices-per-node`): each device trains as on its own.

- the vectorised local round (client/batched.py) equals `train_local` device by device, both the
  one-step round (one shared forward/backward, per-device gradients, closed-form step, summed) and the
  several-epoch one (a copy of the weights per device);
- a node's sum of clipped updates equals the server's clipping of the same devices' lone replies;
- an in-process run with devices-per-node > 1 gives the global model of devices-per-node = 1 (same
  seed), with plain FedAvg, with on-device DP-SGD (per-device ledgers) and with user-level DP;
- bad settings are refused with one line naming the key.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from client.app import app as client_app
from client.batched import fits_one_batch, one_epoch, train_batched, train_one_epoch
from client.device import training_windows
from server.app import FederatedRun
from server.run_dir import RunDirectory
from server.user_dp import ServerSideClipping
from shared import config
from shared.config import RunConfig
from shared.data.store import open_store
from shared.device_nodes import NODE_AGGREGATE, NODE_DEVICES
from shared.errors import PrivrecError
from shared.model import model_for
from shared.training import LocalTrainConfig, train_local
from simulations.inprocess import InProcessGrid, instruction, node_context
from tests.synthetic import walk_store

NUM_DEVICES = 7
NUM_ITEMS = 40
SMALL = {"max-len": 5, "window": 6, "hidden-size": 16, "num-heads": 2, "num-blocks": 1, "dropout": 0.0,
         "local-lr": 0.02, "batch-size": 3, "deterministic-devices": True}


def _store(tmp_path):
    return walk_store(tmp_path / "store", num_users=NUM_DEVICES, num_items=NUM_ITEMS)


@pytest.mark.parametrize("optimizer,epochs", [("adam", 1), ("adam", 3), ("sgd", 2)])
def test_batched_round_equals_each_device_alone(tmp_path, optimizer, epochs):
    store = open_store(_store(tmp_path))
    run = RunConfig.from_values({**SMALL, "dp": False, "local-optimizer": optimizer, "local-epochs": epochs})
    windows = [training_windows(store.device(d), run.device.window) for d in range(NUM_DEVICES)]
    windows = [w for w in windows if fits_one_batch(len(w), run.device.batch_size)]
    assert len({len(w) for w in windows}) > 1, "devices of different window counts (padding is exercised)"
    torch.manual_seed(0)
    state = model_for(run, store.num_items).state_dict()
    cfg = LocalTrainConfig.for_round(run.device, seed=3, proximal_mu=0.0)
    batched = train_batched(model_for(run, store.num_items, state=state), windows, cfg)
    for d, w in enumerate(windows):
        alone = model_for(run, store.num_items, state=state)
        result = train_local(alone, w, cfg)
        if optimizer == "sgd":  # the step is linear in the gradient: equal coordinate by coordinate
            for key, stacked in batched.weights.items():
                torch.testing.assert_close(stacked[d], alone.state_dict()[key], rtol=1e-4, atol=1e-6)
        else:  # Adam's step lr g / (|g| + 1e-8) turns float rounding of a ~1e-8 gradient into a share of lr
            assert _distance(batched.weights, d, alone, state) <= 1e-3
        assert batched.results[d].loss == pytest.approx(result.loss, rel=1e-5)
        assert batched.results[d].steps == result.steps == epochs


@pytest.mark.parametrize("optimizer,trains", [("sgd", "all"), ("adam", "all"), ("adam", "no-item-tables")])
def test_one_step_round_equals_each_device_alone(tmp_path, optimizer, trains):
    """Each device's update norm and loss, and the sums of updates clipped (as a node clips) and FedAvg-
    weighted, against `train_local` device by device: a wrong per-device mean (windows summed, or averaged
    over all devices), a wrong Adam step (say without bias correction: 3.16 lr per coordinate) or a step
    from the wrong weights changes the norms and the sums."""
    store = open_store(_store(tmp_path))
    run = RunConfig.from_values({**SMALL, "dp": False, "local-optimizer": optimizer, "device-trains": trains,
                                 "local-lr": 0.5 if optimizer == "sgd" else 0.02})
    windows = [training_windows(store.device(d), run.device.window) for d in range(NUM_DEVICES)]
    windows = [w for w in windows if fits_one_batch(len(w), run.device.batch_size)]
    assert len({len(w) for w in windows}) > 1, "devices of different window counts"
    torch.manual_seed(0)
    state = model_for(run, store.num_items).state_dict()
    cfg = LocalTrainConfig.for_round(run.device, seed=3, proximal_mu=0.0)
    keys = list(state)
    updates, norms = [], []
    for w in windows:
        alone = model_for(run, store.num_items, state=state)
        result = train_local(alone, w, cfg)
        updates.append({k: alone.state_dict()[k].double() - state[k].double() for k in keys})
        norms.append(float(torch.sqrt(sum(u.square().sum() for u in updates[-1].values()))))
        assert result.steps == 1
    clip = float(np.median(norms))  # some devices clipped, some not
    factors = {"clipped": (lambda norms, examples: (clip / norms).clamp(max=1.0),
                           [min(1.0, clip / n) for n in norms]),
               "weighted": (lambda norms, examples: examples, [float(len(w)) for w in windows])}
    for name, (factor, expected_factors) in factors.items():
        model = model_for(run, store.num_items, state=state)
        assert one_epoch(model, cfg)
        summed = train_one_epoch(model, [[w] for w in windows], cfg, keys, factor)
        for d, w in enumerate(windows):
            assert float(summed.norms[d]) == pytest.approx(norms[d], rel=1e-5)
            assert summed.results[d].steps == 1 and summed.results[d].num_examples == len(w)
            assert summed.results[d].loss == pytest.approx(train_local(model_for(run, store.num_items, state=state),
                                                                       w, cfg).loss, rel=1e-5)
        expected = {k: sum(f * u[k] for f, u in zip(expected_factors, updates)) for k in keys}
        assert all(summed.total[k].dtype == torch.float64 for k in keys)
        if trains == "no-item-tables":  # frozen: nothing moves
            assert float(summed.total["item_emb.weight"].abs().max()) == 0.0
        gap = torch.sqrt(sum((summed.total[k] - expected[k]).square().sum() for k in keys))
        size = torch.sqrt(sum(expected[k].square().sum() for k in keys))
        # SGD is linear in the gradient; Adam moves coordinates whose gradient is ~1e-8 by float rounding
        assert float(gap) <= (1e-5 if optimizer == "sgd" else 1e-4) * float(size), name


def _distance(stacked: dict, d: int, alone, state) -> float:
    """||batched - alone|| / ||alone - global||: the two updates as whole vectors."""
    mine = {k: v[d] for k, v in stacked.items()}
    theirs = alone.state_dict()
    gap = sum(float(((mine[k] - theirs[k]) ** 2).sum()) for k in mine)
    step = sum(float(((theirs[k] - state[k]) ** 2).sum()) for k in mine)
    return (gap / step) ** 0.5


def _train_message(cfg, state, store, population, devices, round_=1):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    content = RecordDict({"arrays": ArrayRecord(state),
                          "config": ConfigRecord({"data-store": str(store), "state-dir": str(population),
                                                  "run-id": "t", "server-round": round_})})
    if devices is not None:
        content[NODE_DEVICES] = ConfigRecord({"devices": devices, "ids": [d + 1 for d in devices]})
    return content


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
# one epoch: client.batched.train_one_epoch; two: train_batched. The store's devices hold 2 or 3 windows:
# with batch-size 3 all train in one batch, with 2 those of 3 windows take a second step (one epoch: vectorised)
@pytest.mark.parametrize("epochs,batch_size", [(1, 3), (2, 3), (1, 2)])
def test_node_clipped_sum_equals_server_clipping_of_lone_devices(tmp_path, optimizer, epochs, batch_size):
    store = _store(tmp_path)
    values = {**SMALL, "data-store": str(store), "dp": False, "user-dp": True, "local-epochs": epochs,
              "batch-size": batch_size, "local-optimizer": optimizer, "local-lr": 0.5 if optimizer == "sgd" else 0.02}
    cfg = config.validate(values)
    torch.manual_seed(0)
    state = model_for(cfg, NUM_ITEMS).state_dict()
    devices = list(range(NUM_DEVICES))
    lone = [client_app(instruction(_train_message(cfg, state, store, tmp_path / "pop-lone", None), d + 1, "train"),
                       node_context(d + 1, {"partition-id": d, "num-partitions": NUM_DEVICES}, cfg))
            for d in devices]
    current = {k: v.numpy() for k, v in state.items()}
    keys = list(current)
    server = ServerSideClipping()
    server.clipped_sum(lone, current, keys, 1.0)
    clip = float(np.median(server.last_norms))  # some updates clipped, some not: a wrong scale shows
    expected = server.clipped_sum(lone, current, keys, clip)
    cfg = config.validate({**values, "user-clipping-norm": clip})
    node = client_app(instruction(_train_message(cfg, state, store, tmp_path / "pop-node", devices), 1, "train"),
                      node_context(1, {"partition-id": 0, "num-partitions": 1}, cfg))
    aggregate = node.content.config_records[NODE_AGGREGATE]
    assert int(aggregate["count"]) == NUM_DEVICES
    got = {k: a.numpy() for k, a in node.content.array_records["arrays"].items()}
    if optimizer == "sgd":  # linear in the gradients: equal coordinate by coordinate
        for k in keys:
            np.testing.assert_allclose(got[k], expected.total[k], rtol=1e-4, atol=1e-7)
    # Adam moves coordinates whose gradient is ~1e-8 by float rounding: equal as a vector
    difference = np.sqrt(sum(np.sum((got[k] - expected.total[k]) ** 2) for k in keys))
    size = np.sqrt(sum(np.sum(expected.total[k] ** 2) for k in keys))
    assert difference <= 1e-4 * size
    # every device's own records, as it would have sent them alone
    listed = node.content.config_records[NODE_DEVICES]
    privacy = json.loads(str(listed["privacy"]))
    assert [p["device"] for p in privacy] == [str(d) for d in devices]
    assert [m["num-examples"] for m in json.loads(str(listed["metrics"]))] == \
        [int(r.content.metric_records["metrics"]["num-examples"]) for r in lone]
    # and its own ledger
    for d in devices:
        ledger = json.loads((tmp_path / "pop-node" / f"device-{d}" / "privacy-ledger.json").read_text())
        assert [r["round"] for r in ledger["rounds"]] == [1]


def _run(tmp_path, name, devices_per_node, **overrides):
    store = tmp_path / "store"
    if not store.exists():
        _store(tmp_path)
    cfg = config.validate({**SMALL, "data-store": str(store), "num-rounds": 2, "devices-per-round": 5,
                           "eval-every": 1, "central-eval": False, "local-epochs": 2,
                           "run-dir": str(tmp_path / "runs"), "run-name": name,
                           "population-dir": str(tmp_path / f"population-{name}"),
                           "devices-per-node": devices_per_node, **overrides})
    random.seed(0)
    run_dir = RunDirectory.create(cfg["run-dir"], cfg["run-name"])
    nodes = -(-NUM_DEVICES // devices_per_node)
    FederatedRun(cfg, run_dir, InProcessGrid(client_app, nodes, run_config=cfg)).execute()
    model = torch.load(run_dir.path / "model.pt", weights_only=True)
    return model, json.loads((run_dir.path / "summary.json").read_text()), \
        [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overrides", [
    # plain SGD: the batched path's rounding stays at float level (Adam would magnify it where g ~ 1e-8)
    # aggregation = fedavg: a non-private run's default (auto) is per-row with one device per node only
    pytest.param({"dp": False, "aggregation": "fedavg", "local-optimizer": "sgd", "local-lr": 0.5}, id="fedavg"),
    pytest.param({"dp": False, "aggregation": "fedavg", "local-optimizer": "sgd", "local-lr": 0.5, "local-epochs": 1},
                 id="fedavg-one-epoch"),
    pytest.param({"dp": True, "noise-multiplier": 0.5, "sample-rate": 0.5}, id="on-device-dp"),
])
def test_devices_per_node_gives_the_same_global_model(tmp_path, overrides):
    one, one_summary, one_rows = _run(tmp_path, "one", 1, **overrides)
    three, three_summary, three_rows = _run(tmp_path, "three", 3, **overrides)
    for key in one:
        torch.testing.assert_close(three[key], one[key], rtol=1e-4, atol=1e-6)
    assert [r["devices-trained"] for r in three_rows] == [r["devices-trained"] for r in one_rows]
    fed_one, fed_three = one_summary["federated-evaluation"], three_summary["federated-evaluation"]
    assert fed_three["users"] == fed_one["users"]
    assert fed_three["test-ndcg@10"] == pytest.approx(fed_one["test-ndcg@10"], abs=1e-6)
    assert three_summary["privacy"]["devices-with-spend"] == one_summary["privacy"]["devices-with-spend"]
    if overrides["dp"]:
        assert three_summary["privacy"]["all-epsilon-max"] == pytest.approx(one_summary["privacy"]["all-epsilon-max"])


@pytest.mark.parametrize("epochs", [1, 2])
def test_devices_per_node_gives_the_same_model_under_user_level_dp(tmp_path, monkeypatch, epochs):
    """Same cohorts and noise (both drawn from seeded generators here): the same released model."""
    import server.user_dp

    def seeded_runs(name, k):
        monkeypatch.setattr("server.cohort.random.SystemRandom", lambda: random.Random(11))
        real = np.random.default_rng
        monkeypatch.setattr(server.user_dp.np.random, "default_rng", lambda *a: real(*(a or (5,))))
        try:
            return _run(tmp_path, name, k, **{"dp": False, "user-dp": True, "user-noise-multiplier": 0.5,
                                              "local-epochs": epochs,
                                              "local-optimizer": "sgd", "local-lr": 0.5,
                                              "user-clipping-norm": 0.05, "devices-per-round": 4})
        finally:
            monkeypatch.undo()

    one, _, one_rows = seeded_runs("one", 1)
    four, _, four_rows = seeded_runs("four", 4)
    assert [r["devices-trained"] for r in four_rows] == [r["devices-trained"] for r in one_rows]
    assert any(r["devices-trained"] for r in one_rows[1:])
    for key in one:
        torch.testing.assert_close(four[key], one[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("values,named", [
    ({"devices-per-node": 0}, "'devices-per-node' = 0"),
    ({"devices-per-node": 2, "secure-aggregation": True, "fraction-train": 0.5, "devices-per-round": 0},
     "'secure-aggregation'"),
    ({"devices-per-node": 2, "aggregation": "per-row", "dp": False}, "'aggregation'"),
    ({"devices-per-node": 2, "model": "content-scorer", "dp": False, "user-dp": True}, "'model'"),
])
def test_bad_devices_per_node_is_refused_in_one_line(values, named):
    with pytest.raises(PrivrecError) as err:
        config.validate(values)
    assert named in str(err.value) and "devices-per-node" in str(err.value) and "\n" not in str(err.value)


def test_a_device_list_is_refused_on_a_deployed_node(tmp_path):
    store = _store(tmp_path)
    cfg = config.validate({**SMALL, "data-store": str(store), "dp": False})
    state = model_for(cfg, NUM_ITEMS).state_dict()
    reply = InProcessGrid(client_app, 1, run_config=cfg)._run_client(
        instruction(_train_message(cfg, state, store, tmp_path / "pop", [0, 1]), 1, "train"),
        node_context(1, {"data-dir": str(store)}, cfg))
    assert reply.has_error() and "devices-per-node is for simulations only" in reply.error.reason


def test_a_hosted_device_whose_ledger_was_lost_is_refused(tmp_path):
    """Each hosted device keeps the population rule of a lone one: listed once it trained, and a missing
    ledger afterwards stops it (training from zero would under-report its spend)."""
    store = _store(tmp_path)
    cfg = config.validate({**SMALL, "data-store": str(store), "dp": False, "user-dp": True})
    state = model_for(cfg, NUM_ITEMS).state_dict()
    population = tmp_path / "pop"
    grid = InProcessGrid(client_app, 1, run_config=cfg)
    context = node_context(1, {"partition-id": 0, "num-partitions": 1}, cfg)
    first = grid._run_client(instruction(_train_message(cfg, state, store, population, [0, 1, 2]), 1, "train"),
                             context)
    assert not first.has_error()
    assert (population / "trained-devices").read_text().split() == ["0", "1", "2"]
    (population / "device-1" / "privacy-ledger.json").unlink()
    context.state = type(context.state)()  # and the node restarted: no in-memory mirror either
    again = grid._run_client(instruction(_train_message(cfg, state, store, population, [0, 1, 2], round_=2), 1,
                                         "train"), context)
    assert again.has_error() and "device 1 has trained before" in again.error.reason


def test_a_simulation_starts_one_flower_node_per_block_of_devices():
    from tools.launch import simulated_nodes

    assert simulated_nodes(config.validate({}), 943) == 943
    assert simulated_nodes(config.validate({"devices-per-node": 256}), 943) == 4
    assert simulated_nodes(config.validate({"devices-per-node": 5000}), 100_000) == 20
