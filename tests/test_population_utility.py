"""simulations/population_utility.py: the vectorised scorer is the shared one, and a quick sweep keeps its promises."""

import json

import numpy as np
import pytest
import torch

from shared.scorer import ContentScorer, device_features, popularity_bias, public_catalogue, user_gradient
from simulations import population_utility as pu
from tests.synthetic import walk_split
from tests.test_synth import write_source


def _catalogue(num_items: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = ["<pad>"] + [str(3 * i + 1) for i in range(1, num_items + 1)]
    titles = [None] + [f"Item {i} ({1970 + i % 30})" if i % 4 else f"Item {i}" for i in range(1, num_items + 1)]
    return public_catalogue(rng.normal(size=(num_items + 1, 16)), ids, titles)


def test_batched_features_and_per_user_gradients_equal_the_shared_device_code():
    split = walk_split(num_users=9, num_items=30, seed=3)
    train = list(split.train)
    train[4] = train[4][:1]  # a one-item history: no example, zero gradient
    train[5] = train[5][:3]  # fewer items than the profile and the targets
    catalogue = _catalogue(30)
    model = ContentScorer(30, 16)
    model.popularity.copy_(popularity_bias(np.random.default_rng(1).uniform(0, 50, 31)))
    with torch.no_grad():
        model.scales.copy_(torch.tensor([0.7, 0.4, -0.3]))
        model.text_weight.copy_(torch.linspace(-3, 5, 16))
    members = [8, 4, 0, 5, 2]
    histories, nexts, owner = pu.chunk_examples(train, members, 10)
    features = pu.batch_features(catalogue, histories, 5, 0.8)
    for mine, shared in zip(features, device_features(catalogue, histories, 5, 0.8)):
        assert torch.allclose(mine, shared, atol=1e-6)
    grads = pu.cohort_gradients(model, catalogue, features, nexts, owner, len(members))
    for i, user in enumerate(members):
        expected = user_gradient(model, catalogue, [train[user]], 10, 5, 0.8)
        for key, value in expected.items():
            assert torch.allclose(grads[key][i], value, atol=1e-5, rtol=1e-4), (user, key)
    assert float(grads["text_weight"][1].abs().sum()) == 0.0


def test_the_estimate_keeps_the_real_cohorts_noise_on_the_mean():
    s = {"q": 0.25}
    assert pu.simulated_rate(s, 100_000, 2_500) == pytest.approx(0.025)
    assert pu.simulated_rate(s, 10_000, 2_500) == 0.25  # q N = 2,500: the real cohort
    assert pu.simulated_rate(s, 100_000, 0) == 0.25


def test_a_quick_sweep_writes_its_results_within_each_epsilon_and_with_less_noise_at_larger_n(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(tmp_path / "cache"))
    source = write_source(tmp_path / "source", num_users=60)
    stem = pu.main(["--quick", "--like", str(source), "--populations", "60", "160", "--also-synthetic", "60",
                    "--work", str(tmp_path / "work"), "--simulated-cohort", "20", "--out", str(tmp_path / "o" / "pu")])
    results = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").stat().st_size > 0
    markdown = stem.with_suffix(".md").read_text()
    small, small_synthetic, large = results["populations"]
    assert (small["n"], small_synthetic["n"], large["n"]) == (60, 60, 160)
    assert small["real"] and not small_synthetic["real"] and not large["real"]
    assert not small["estimate"] and large["estimate"] and "ESTIMATE" in markdown
    for target in pu.TARGETS:
        label = f"content-scorer, epsilon {target:g}"
        for pop in (small, large):
            assert pop["privacy"][label]["epsilon"] <= target
        assert large["privacy"][label]["noise-std-on-mean-update"] < small["privacy"][label]["noise-std-on-mean-update"]
    assert small["privacy"]["content-scorer, epsilon 2"]["noise-std-on-mean-update"] > \
        small["privacy"]["content-scorer, epsilon 8"]["noise-std-on-mean-update"]
    for pop in (small, small_synthetic, large):
        arms = pop["summary"]
        for label in ("content-scorer, epsilon 2", "content-scorer, no noise", "popularity (no DP)",
                      "DP popularity, epsilon 8", "centralized SASRec (reduced budget)",
                      "SASRec federation, no DP (reduced budget)"):
            assert 0.0 <= arms[label]["ndcg@10"][0] <= 1.0, label
