import numpy as np
import pytest

from shared.aggregation import ServerOptimizer, mean_update, running_average, touched_rows
from shared.errors import PrivrecError


def test_plain_mean_is_fedavg_weighted_by_examples():
    updates = [{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 4.0])}]
    out = mean_update(updates, [3, 1])
    np.testing.assert_allclose(out["w"], [0.75, 1.0])


def test_per_row_mean_averages_a_row_over_the_devices_that_touched_it():
    # Item 1 is in device 0's windows only: FedAvg would shrink its step to 1/4, per-row keeps it.
    emb = [np.array([[0.0, 0.0], [2.0, 2.0], [1.0, 1.0]]), np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 3.0]])]
    updates = [{"item_emb.weight": e, "body": np.array([4.0 * i]) } for i, e in enumerate(emb)]
    masks = [{"item_emb.weight": touched_rows(e)} for e in emb]
    out = mean_update(updates, [1, 3], masks)
    np.testing.assert_allclose(out["item_emb.weight"][1], [2.0, 2.0])  # plain mean: 0.5
    np.testing.assert_allclose(out["item_emb.weight"][2], [2.5, 2.5])  # both touched: weighted mean
    np.testing.assert_allclose(out["item_emb.weight"][0], [0.0, 0.0])  # nobody: plain mean (0)
    np.testing.assert_allclose(out["body"], [3.0])  # unmasked keys stay FedAvg
    plain = mean_update(updates, [1, 3])
    assert plain["item_emb.weight"][1, 0] == pytest.approx(0.5)


def test_per_row_mean_of_a_vector_key():
    updates = [{"head.bias": np.array([1.0, -1.0])}, {"head.bias": np.array([3.0, -1.0])}]
    masks = [{"head.bias": np.array([True, True])}, {"head.bias": np.array([False, True])}]
    out = mean_update(updates, [1, 1], masks)
    np.testing.assert_allclose(out["head.bias"], [1.0, -1.0])


def test_bad_weights_and_masks_are_refused():
    with pytest.raises(PrivrecError, match="weight"):
        mean_update([{"w": np.zeros(2)}], [0])
    with pytest.raises(PrivrecError, match="row masks"):
        mean_update([{"w": np.zeros(2)}], [1], [])
    with pytest.raises(PrivrecError, match="rows"):
        mean_update([{"w": np.zeros((3, 2))}], [1], [{"w": np.array([True, False])}])


def test_server_avg_with_lr_one_is_fedavg_and_momentum_accumulates():
    weights = {"w": np.array([1.0], dtype=np.float32)}
    assert ServerOptimizer(kind="avg").step(weights, {"w": np.array([0.5])})["w"].dtype == np.float32
    np.testing.assert_allclose(ServerOptimizer(kind="avg").step(weights, {"w": np.array([0.5])})["w"], [1.5])
    opt = ServerOptimizer(kind="avgm", lr=1.0, momentum=0.5)
    w = opt.step(weights, {"w": np.array([1.0])})
    w = opt.step(w, {"w": np.array([1.0])})
    np.testing.assert_allclose(w["w"], [1.0 + 1.0 + 1.5])


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_adaptive_first_step_moves_each_weight_by_about_lr_toward_the_update(kind):
    opt = ServerOptimizer(kind=kind, lr=0.1, tau=1e-9)
    out = opt.step({"w": np.array([0.0, 0.0])}, {"w": np.array([0.02, -5.0])})
    np.testing.assert_allclose(out["w"], [0.1, -0.1], rtol=1e-5)
    state = opt.state_dict()
    again = ServerOptimizer(kind=kind, lr=0.1, tau=1e-9)
    again.load_state_dict(state)
    assert again.steps == 1


def test_unknown_server_optimizer_is_refused():
    with pytest.raises(PrivrecError, match="kind"):
        ServerOptimizer(kind="sgd-nesterov")


def test_running_average_starts_at_the_weights_and_moves_by_one_minus_decay():
    avg = running_average(None, {"w": np.array([1.0], dtype=np.float32)}, 0.9)
    avg = running_average(avg, {"w": np.array([11.0], dtype=np.float32)}, 0.9)
    np.testing.assert_allclose(avg["w"], [2.0])
    assert avg["w"].dtype == np.float32
    with pytest.raises(PrivrecError, match="decay"):
        running_average(avg, avg, 1.0)


def test_server_rate_on_item_rows_only_scales_those_rows_and_reduces_to_fedavg_at_one():
    weights = {"item_emb.weight": np.zeros((3, 2), dtype=np.float32), "body": np.array([1.0], dtype=np.float32)}
    mean = {"item_emb.weight": np.array([[0.0, 0.0], [0.5, -0.5], [1.0, 1.0]]), "body": np.array([0.25])}
    fedavg = ServerOptimizer(kind="avg").step(weights, mean)
    same = ServerOptimizer(kind="avg", lr=1.0, keys=["item_emb.weight"]).step(weights, mean)
    for key in weights:
        np.testing.assert_array_equal(same[key], fedavg[key])
    doubled = ServerOptimizer(kind="avg", lr=2.0, keys=["item_emb.weight"]).step(weights, mean)
    np.testing.assert_allclose(doubled["item_emb.weight"], 2.0 * mean["item_emb.weight"])
    np.testing.assert_allclose(doubled["body"], fedavg["body"])  # the rest keeps FedAvg's step
    assert doubled["body"].dtype == np.float32


def test_server_momentum_on_item_rows_only_leaves_the_rest_without_state():
    opt = ServerOptimizer(kind="avgm", lr=1.0, momentum=0.5, keys=["rows"])
    w = {"rows": np.array([0.0]), "body": np.array([0.0])}
    for _ in range(2):
        w = opt.step(w, {"rows": np.array([1.0]), "body": np.array([1.0])})
    np.testing.assert_allclose(w["rows"], [1.0 + 1.5])
    np.testing.assert_allclose(w["body"], [2.0])
    assert set(opt.m) == {"rows"}
