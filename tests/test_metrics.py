"""Ranking metrics against a hand-computed 5-item example; bootstrap CIs; evaluation plumbing."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shared.errors import PrivrecError
from shared.metrics import (
    bootstrap_ci,
    eval_inputs,
    evaluate_histories,
    hit_at_k,
    left_pad,
    ndcg_at_k,
    summarize,
    target_ranks,
)

# column:           pad  i1   i2   i3   i4   i5
SCORES = torch.tensor([9.0, 0.1, 0.5, 0.3, 0.9, 0.5])


def ranks_for(targets, exclude):
    scores = SCORES.repeat(len(targets), 1)
    return target_ranks(
        scores, torch.tensor(targets), [np.array(e, dtype=np.int64) for e in exclude]
    )


def test_ranks_by_hand():
    # i3 (0.3): beaten by i4 0.9, i2 0.5, i5 0.5 -> rank 3 (the padding column's 9.0 never counts)
    # i4 (0.9): best -> 0;  i1 (0.1): last -> 4
    assert ranks_for([3, 4, 1], [[], [], []]).tolist() == [3, 0, 4]


def test_exclusion_masks_history():
    # excluding i4 and i2 leaves only i5 above i3
    assert ranks_for([3], [[4, 2]]).tolist() == [1]
    # excluding everything above i1 moves it to the top
    assert ranks_for([1], [[2, 3, 4, 5]]).tolist() == [0]


def test_target_in_history_is_a_miss():
    r = ranks_for([4], [[4]])
    assert r.tolist() == [4]  # worst rank, N - 1
    assert hit_at_k(r, 4)[0] == 0.0 and ndcg_at_k(r, 4)[0] == 0.0


def test_ties_are_pessimistic():
    # i2 and i5 tie at 0.5: each is ranked behind the other (and behind i4) -> rank 2 for both
    assert ranks_for([2, 5], [[], []]).tolist() == [2, 2]
    # a constant scorer ranks every target last
    flat = torch.ones(2, 6)
    assert target_ranks(flat, torch.tensor([1, 5]), [np.array([]), np.array([])]).tolist() == [4, 4]


def test_hit_and_ndcg_by_hand():
    ranks = np.array([0, 1, 2, 3, 9, 10])
    assert hit_at_k(ranks, 3).tolist() == [1, 1, 1, 0, 0, 0]
    assert hit_at_k(ranks, 10).tolist() == [1, 1, 1, 1, 1, 0]
    want = [1.0, 1 / math.log2(3), 0.5, 0.0, 0.0, 0.0]
    assert ndcg_at_k(ranks, 3) == pytest.approx(want)
    assert ndcg_at_k(ranks, 10)[4] == pytest.approx(1 / math.log2(11))


def test_bad_target_rejected():
    with pytest.raises(ValueError):
        ranks_for([0], [[]])


def test_bootstrap_contains_mean_and_shrinks():
    rng = np.random.default_rng(1)
    small = rng.binomial(1, 0.3, 50).astype(float)
    big = rng.binomial(1, 0.3, 5000).astype(float)
    lo_s, hi_s = bootstrap_ci(small, seed=0)
    lo_b, hi_b = bootstrap_ci(big, seed=0)
    assert lo_s <= small.mean() <= hi_s and lo_b <= big.mean() <= hi_b
    assert lo_s < hi_s
    assert (hi_b - lo_b) < 0.3 * (hi_s - lo_s)  # ~ 1/sqrt(100) narrower
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    wide = bootstrap_ci(small, level=0.99, seed=0)
    assert wide[0] <= lo_s and wide[1] >= hi_s


def test_weighted_bootstrap_is_a_ratio_estimator():
    w = np.array([1.0, 4.0, 2.0, 3.0])
    # every unit has the same ratio 0.25 -> every resample's ratio is exactly 0.25
    assert bootstrap_ci(0.25 * w, weights=w) == pytest.approx((0.25, 0.25))
    # unit weights: identical to the unweighted mean bootstrap (same resamples)
    v = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    assert bootstrap_ci(v, seed=5, weights=np.ones(5)) == pytest.approx(bootstrap_ci(v, seed=5))
    # ratio of sums, not mean of ratios: heavy unit dominates
    sums, counts = np.array([10.0, 0.0]), np.array([10.0, 1.0])  # ratios 1.0 and 0.0
    lo, hi = bootstrap_ci(sums, weights=counts, n_boot=2000)
    assert lo == 0.0 and hi == 1.0
    assert math.isnan(bootstrap_ci(np.array([]))[0])


def test_eval_inputs_conventions():
    train = [np.array([1, 2, 3]), np.array([4])]
    valid, test = np.array([5, 6]), np.array([7, 8])
    inp, tgt, exc = eval_inputs(train, valid, test, "valid")
    assert [x.tolist() for x in inp] == [[1, 2, 3], [4]] and tgt.tolist() == [5, 6]
    assert [sorted(e.tolist()) for e in exc] == [[1, 2, 3], [4]]
    inp, tgt, exc = eval_inputs(train, valid, test, "test")
    assert [x.tolist() for x in inp] == [[1, 2, 3, 5], [4, 6]] and tgt.tolist() == [7, 8]
    assert [sorted(e.tolist()) for e in exc] == [[1, 2, 3, 5], [4, 6]]
    with pytest.raises(PrivrecError, match="split"):
        eval_inputs(train, valid, test, "train")


def test_left_pad():
    out = left_pad([np.array([1, 2, 3, 4, 5]), np.array([7])], 3)
    assert out.tolist() == [[3, 4, 5], [0, 0, 7]]


class NextItemOracle(torch.nn.Module):
    """Scores item (last input + 1) highest; checks the evaluator's padding/truncation."""

    def __init__(self, n, max_len):
        super().__init__()
        self.n = n
        self.cfg = SimpleNamespace(max_len=max_len)
        self.seen = []

    def predict_next(self, seqs):
        self.seen.append(seqs.clone())
        assert not self.training
        s = torch.zeros(seqs.shape[0], self.n + 1)
        s[torch.arange(seqs.shape[0]), seqs[:, -1] % self.n + 1] = 1.0
        s[:, 0] = float("-inf")
        return s


def test_evaluate_histories_and_summarize():
    m = NextItemOracle(10, max_len=4)
    m.train()
    inputs = [np.array([1, 2, 3, 4, 5, 6]), np.array([2]), np.array([8, 9])]
    targets = np.array([7, 3, 5])  # hit, hit, miss
    exclude = [np.unique(x) for x in inputs]
    out = evaluate_histories(m, inputs, targets, exclude, k=1, batch_size=2)
    assert out["rank"][:2].tolist() == [0, 0] and out["rank"][2] > 0
    assert out["hit"].tolist() == [1.0, 1.0, 0.0]
    assert m.training  # mode restored
    assert m.seen[0].tolist() == [[3, 4, 5, 6], [0, 0, 0, 2]]  # last max_len, left-padded
    s = summarize(out, k=1)
    assert (
        s["users"] == 3
        and s["hr@1"] == pytest.approx(2 / 3)
        and s["ndcg@1"] == pytest.approx(2 / 3)
    )
    assert s["hr@1-ci"][0] <= s["hr@1"] <= s["hr@1-ci"][1]
    s10 = summarize(out, k=10)
    assert set(s10) == {"hr@10", "hr@10-ci", "ndcg@10", "ndcg@10-ci", "users"}
