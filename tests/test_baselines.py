"""Popularity and centralized baselines on tiny synthetic data."""

import numpy as np
import pytest

from shared.baselines import evaluate_popularity, popularity_scores, train_centralized
from shared.errors import PrivrecError
from shared.metrics import eval_inputs, evaluate_histories, hit_at_k
from shared.model import ModelConfig


def test_popularity_counts_training_only():
    train = [np.array([1, 2, 2]), np.array([2, 3])]
    pop = popularity_scores(train, 4)
    assert pop.tolist() == [0, 1, 3, 1, 0]
    with pytest.raises(PrivrecError):
        popularity_scores([np.array([5])], 4)


def test_popularity_ranks_most_frequent_first():
    # item 2 most popular in training, then 3, then 1; items 4, 5 never seen
    train = [np.array([2, 2, 3]), np.array([2, 3, 1]), np.array([3, 2])]
    valid = np.array([4, 4, 4])
    test = np.array([1, 5, 2])
    out = evaluate_popularity(train, valid, test, num_items=5, split="test", k=1)
    # user 0: history {2,3,4} masked -> 1 is the best remaining item
    # user 1: history {1,2,3,4} masked -> 5 ties with nothing else left -> rank 0
    # user 2: history {2,3,4}: target 2 is in the history -> miss (worst rank)
    assert out["rank"].tolist() == [0, 0, 4]
    assert out["hit"].tolist() == [1.0, 1.0, 0.0]
    # valid split (exclude = train only): target 4 (count 0) ties with 5 (count 0), is behind any
    # unmasked seen item: user 0 {1, 4, 5 unmasked} -> 2; user 1 {4, 5} -> 1; user 2 {1, 4, 5} -> 2
    val = evaluate_popularity(train, valid, test, num_items=5, split="valid")
    assert val["rank"].tolist() == [2, 1, 2]


def synthetic_users(n_users=120, n_items=40, length=14, seed=0):
    """Each user walks the catalogue: item t+1 = item t + 1 (mod N)."""
    rng = np.random.default_rng(seed)
    seqs = [
        ((rng.integers(0, n_items) + np.arange(length)) % n_items + 1).astype(np.int64)
        for _ in range(n_users)
    ]
    return [s[:-2] for s in seqs], np.array([s[-2] for s in seqs]), np.array([s[-1] for s in seqs])


def test_centralized_beats_popularity():
    n_items = 40
    train, valid, test = synthetic_users(n_items=n_items)
    cfg = ModelConfig(
        num_items=n_items, max_len=10, hidden_size=32, num_heads=2, num_blocks=1, dropout=0.1
    )
    seen = []
    model = train_centralized(
        train,
        n_items,
        cfg,
        window=8,
        epochs=10,
        lr=0.01,
        batch_size=32,
        seed=0,
        progress=lambda e, n, loss: seen.append((e, n, loss)),
    )
    assert [e for e, _, _ in seen] == list(range(1, 11)) and seen[-1][2] < seen[0][2]
    inputs, targets, exclude = eval_inputs(train, valid, test, "test")
    sas = evaluate_histories(model, inputs, targets, exclude, k=10)
    pop = evaluate_popularity(train, valid, test, n_items, split="test", k=10)
    rng = np.random.default_rng(0)
    rand_hr = hit_at_k(np.array([rng.permutation(n_items - len(e))[0] for e in exclude]), 10).mean()
    assert sas["hit"].mean() > 0.9
    assert sas["hit"].mean() > pop["hit"].mean() + 0.3
    assert sas["hit"].mean() > rand_hr + 0.3


def test_centralized_checks_config():
    train, _, _ = synthetic_users(n_users=4)
    with pytest.raises(PrivrecError, match="num_items"):
        train_centralized(
            train, 40, ModelConfig(num_items=30), window=8, epochs=1, lr=0.01, batch_size=4, seed=0
        )
