"""Server-side bookkeeping: cohort size, evaluation schedule, epsilon tally, pooled metrics."""

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from server.strategy import PrivacyTally, cohort_size, evaluate_metrics, train_metrics
from shared import config


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
