"""Server-side bookkeeping: cohort size, evaluation schedule, epsilon tally, pooled metrics."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from server.cohort import BudgetExhausted, CohortView
from server.strategy import PrivacyTally, build_strategy, cohort_size, evaluate_metrics, train_metrics
from server.user_dp import ClippedSum, UserLevelDP
from shared import config
from simulations.inprocess import set_identity


@pytest.mark.parametrize("overrides, devices, expected", [
    ({"devices-per-round": 64}, 943, 64),
    ({"devices-per-round": 64}, 10, 10),  # never more than exist (Flower would wait forever)
    ({"devices-per-round": 0, "fraction-train": 0.1}, 943, 94),
    ({"devices-per-round": 0, "fraction-train": 0.0001}, 943, 1),
])
def test_cohort_size(overrides, devices, expected):
    assert cohort_size(config.validate(overrides), devices) == expected


def test_epsilon_tally_keeps_each_devices_largest_and_reports_max_and_median():
    tally = PrivacyTally()
    for node, eps in [(1, 2.0), (2, 5.0), (3, 1.0), (1, 3.0), (2, 4.0)]:  # a stale lower value for node 2
        tally.update(node, eps)
    assert tally.summary() == {"all-epsilon-max": 5.0, "all-epsilon-median": 3.0, "devices-with-spend": 3}


def _reply(**metrics) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(metrics)})


def test_train_metrics_never_average_epsilon():
    replies = [_reply(**{"num-examples": 1, "train-loss": 2.0, "steps": 1, "epsilon": 1.0}),
               _reply(**{"num-examples": 3, "train-loss": 4.0, "steps": 1, "epsilon": 9.0}),
               _reply(**{"num-examples": 1, "train-loss": 2.0, "steps": 1, "epsilon": 2.0})]
    out = train_metrics(replies, "num-examples")
    assert out["epsilon-max"] == 9.0 and out["epsilon-median"] == 2.0
    assert out["train-loss"] == pytest.approx((2 + 12 + 2) / 5)  # example-weighted


def test_evaluate_metrics_pool_users_across_devices():
    # device A: 1 user, hit; device B: 3 users, 1 hit -> HR = 2/4, not the mean of 1.0 and 0.33
    replies = [_reply(**{"num-examples": 1, "test-hit@10-sum": 1.0, "test-ndcg@10-sum": 1.0,
                         "valid-hit@10-sum": 0.0, "valid-ndcg@10-sum": 0.0}),
               _reply(**{"num-examples": 3, "test-hit@10-sum": 1.0, "test-ndcg@10-sum": 0.5,
                         "valid-hit@10-sum": 3.0, "valid-ndcg@10-sum": 3.0})]
    out = evaluate_metrics(replies, "num-examples")
    assert out["test-hr@10"] == 0.5 and out["test-ndcg@10"] == pytest.approx(1.5 / 4)
    low, high = out["test-hr@10-ci"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    assert np.isclose(out["valid-hr@10"], 0.75)


# ------------------------------------------------------------ the wrappers around Flower's strategy
class _Nodes:
    """A Grid that only lists its nodes (all the wrappers and Flower's sampling ask of it)."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def _strategy(stats, **overrides):
    cfg = config.validate({"local-epochs": 1, "devices-per-round": 3, "num-rounds": 4, "eval-every": 2,
                           **overrides})
    return build_strategy(cfg, num_devices=6, on_train=lambda r, s: stats.append((r, s)),
                          on_evaluate=lambda r, s: stats.append((r, s)))


@pytest.mark.parametrize("name, flower_class", [("fedavg", FedAvg), ("fedadam", FedAdam), ("fedprox", FedProx)])
def test_the_flower_strategy_is_flowers_own_and_a_round_leaves_it_as_built(name, flower_class):
    set_identity()
    strategy = _strategy([], strategy=name, **({"proximal-mu": 0.1} if name == "fedprox" else {}))
    assert type(strategy.flower) is flower_class  # built plainly: no class made at run time
    before = dict(vars(strategy.flower))
    messages = list(strategy.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(),
                                             _Nodes(range(6))))
    assert len(messages) == 3 and len({m.metadata.dst_node_id for m in messages}) == 3
    settings = ("min_available_nodes", "min_train_nodes", "fraction_train", "min_evaluate_nodes")
    assert {k: vars(strategy.flower)[k] for k in settings} == {k: before[k] for k in settings}
    if name == "fedprox":  # FedProx's own configure_train still adds its weight
        assert messages[0].content["config"]["proximal-mu"] == 0.1


def test_capped_devices_are_never_asked_and_too_few_end_the_run():
    set_identity()
    strategy = _strategy([])
    strategy.privacy.capped.update({"a": 1, "b": 1})
    strategy.privacy.node_devices.update({0: "a", 1: "b"})
    arrays = ArrayRecord({"w": torch.zeros(2)})
    asked = {m.metadata.dst_node_id for m in strategy.configure_train(1, arrays, ConfigRecord(), _Nodes(range(5)))}
    assert len(asked) == 3 and not asked & {0, 1}
    with pytest.raises(BudgetExhausted, match="only 2 of 4"):
        strategy.configure_train(2, arrays, ConfigRecord(), _Nodes(range(4)))


def test_a_user_level_round_that_sampled_nobody_is_still_a_noise_release_under_fedadam(monkeypatch):
    """Poisson sampling may draw nobody: the round still releases noise, and FedAdam takes its step from it
    (the old strategy skipped FedAdam's configure_train then, and its aggregation failed in round 1)."""
    set_identity()
    monkeypatch.setattr("server.cohort.poisson_cohort", lambda nodes, rate, rng: [])
    stats = []
    strategy = _strategy(stats, strategy="fedadam", **{"user-dp": True, "user-noise-multiplier": 1.0,
                                                      "user-clipping-norm": 0.1})
    initial = {"w": torch.zeros(50)}
    assert list(strategy.configure_train(1, ArrayRecord(initial), ConfigRecord(), _Nodes(range(6)))) == []
    arrays, _ = strategy.aggregate_train(1, [])
    assert not np.allclose(arrays["w"].numpy(), 0.0)  # noise was released
    assert strategy.flower.m_t is not None  # FedAdam took its step from the release
    assert stats == [(1, {"devices": 0, "declined": 0, "refused": 0, "capped-devices": 0, "devices-with-spend": 0,
                          "failures": 0, "asked": 0, "no-reply": 0})]


def test_rounds_after_a_resume_carry_their_true_number_and_evaluate_on_schedule():
    set_identity()
    stats = []
    strategy = _strategy(stats)
    strategy.round_offset = 1  # resumed after round 1: Flower's round 1 is the run's round 2
    arrays = ArrayRecord({"w": torch.zeros(2)})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), _Nodes(range(6))))
    assert messages[0].content["config"]["server-round"] == 2
    assert len(list(strategy.configure_evaluate(1, arrays, ConfigRecord(), _Nodes(range(6))))) > 0  # round 2
    assert list(strategy.configure_evaluate(2, arrays, ConfigRecord(), _Nodes(range(6)))) == []  # round 3


def test_user_level_dp_releases_from_the_sum_its_update_sum_gives():
    """The DP wrapper reads only a `ClippedSum` (what a secure-aggregation round would supply) and divides by
    the expected cohort; arrays devices cannot change stay exactly as they were."""
    set_identity()

    class KnownSum:
        def configure(self, server_round, messages, grid):
            return messages

        def clipped_sum(self, replies, current, keys, clip):
            return ClippedSum(total={k: np.full(current[k].shape, 2.0) for k in keys}, count=2)

    dp = UserLevelDP(FedAvg(min_train_nodes=0, min_available_nodes=0), noise_multiplier=0.0, clipping_norm=1.0,
                     expected_cohort=4.0, frozen=["item_emb.weight"], summation=KnownSum())
    current = {"w": torch.ones(3), "item_emb.weight": torch.ones(2)}
    dp.configure_train(1, ArrayRecord(current), ConfigRecord(), CohortView(None, []))
    arrays, _ = dp.aggregate_train(1, [])
    assert np.allclose(arrays["w"].numpy(), 1.5)  # 1 + 2 / 4, whatever number of replies arrived
    assert np.array_equal(arrays["item_emb.weight"].numpy(), np.ones(2))
