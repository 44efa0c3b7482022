"""Issue 13 research replay: the accounted hyperparameter selection (simulations.private_selection) and the
consenting-cohort arm (simulations.consent_pipeline) whose private releases must exclude the consenting users."""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant

from shared.metrics import eval_inputs
from simulations import private_pipeline as pp
from simulations import private_selection as ps

Z = {"pop_z": 7.0, "cooc_z": 3.8, "dpsgd_z": 19.8}


def _rdp_epsilon(event) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(event)
    return accountant.get_epsilon(1e-5)


def test_selection_epsilon_is_dp_accountings_repeat_and_select_of_the_four_releases_of_one_run():
    one_run = dpa.ComposedDpEvent([
        dpa.GaussianDpEvent(7.0), dpa.GaussianDpEvent(3.8),
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(pp.DPSGD_RATE, dpa.GaussianDpEvent(19.8)), pp.DPSGD_STEPS),
        dpa.GaussianDpEvent(10.0)])
    expected = _rdp_epsilon(dpa.dp_event.RepeatAndSelectDpEvent(one_run, 3.0, math.inf))
    assert ps.selection_epsilon(Z, mean_runs=3.0, valid_z=10.0) == pytest.approx(expected, rel=1e-9)
    # the selection is paid for: more than one run alone, more with more runs, less with a noisier score
    assert expected > _rdp_epsilon(one_run) * 1.2
    assert ps.selection_epsilon(Z, mean_runs=5.0, valid_z=10.0) > expected
    assert ps.selection_epsilon(Z, mean_runs=3.0, valid_z=30.0) < expected


def test_noisy_validation_score_has_sensitivity_one_per_user():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 50)
    base = ps.noisy_score(scores, 0.0, rng)
    assert base == pytest.approx(scores.sum())
    # adding any user (even one reporting a score outside [0, 1]) moves the sum by at most 1
    for extra in (0.0, 0.3, 1.0, 7.5, -3.0):
        assert abs(ps.noisy_score(np.append(scores, extra), 0.0, rng) - base) <= 1.0
    noisy = [ps.noisy_score(scores, 10.0, np.random.default_rng(s)) for s in range(400)]
    assert np.std(noisy) == pytest.approx(10.0, rel=0.15)


def test_repeat_and_select_draws_a_poisson_number_of_runs_and_keeps_the_best_noisy_score():
    seen = []

    def run_once(candidate, t):
        seen.append((candidate, t))
        return [5.0, 9.0, 1.0][candidate], f"model of candidate {candidate} run {t}"

    counts = []
    for seed in range(300):
        seen.clear()
        best, log = ps.repeat_and_select(run_once, 3, 3.0, np.random.default_rng(seed))
        counts.append(len(log))
        assert [(x["candidate"], t) for t, x in enumerate(log)] == seen
        if log:
            top = max(range(len(log)), key=lambda i: log[i]["noisy_valid_score"])
            assert best == f"model of candidate {log[top]['candidate']} run {top}"
        else:
            assert best is None  # T = 0: the caller's data-independent fallback
    assert np.mean(counts) == pytest.approx(3.0, abs=0.3)
    assert 0 in counts  # Poisson, not at least one run: the accounted distribution


# ------------------------------------------------------------------------- consenting users excluded
NUM_USERS, NUM_ITEMS, DIM = 12, 30, 8


def _tiny_data(train: list[np.ndarray]) -> pp.Data:
    rng = np.random.default_rng(1)
    data = pp.Data.__new__(pp.Data)  # the real class, on tiny synthetic histories instead of ML-100K
    data.num_items, data.num_users = NUM_ITEMS, len(train)
    data.train = train
    data.valid = rng.integers(1, NUM_ITEMS + 1, len(train))
    data.test = rng.integers(1, NUM_ITEMS + 1, len(train))
    text = rng.normal(size=(NUM_ITEMS + 1, DIM))
    data.text = text / np.linalg.norm(text, axis=1, keepdims=True)
    data.split = {name: eval_inputs(data.train, data.valid, data.test, name) for name in ("valid", "test")}
    data.content = {name: data._content(data.split[name][0]) for name in data.split}
    return data


def _public() -> dict:
    rng = np.random.default_rng(2)
    genres = rng.integers(0, 2, (NUM_ITEMS + 1, 4)).astype(float)
    return {"raw": np.arange(NUM_ITEMS + 1, dtype=float), "years": 1950 + np.arange(NUM_ITEMS + 1.0),
            "genres": genres / (np.linalg.norm(genres, axis=1, keepdims=True) + 1e-12)}


def _histories(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, NUM_ITEMS + 1, 12) for _ in range(NUM_USERS)]


def test_the_consenting_users_enter_none_of_the_private_releases(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(pp, "DPSGD_STEPS", 8)  # a short DP-SGD run: same code path
    monkeypatch.setattr(pp, "epsilons", lambda *_: {"pld": 0.0, "rdp": 0.0})  # accounting is not tested here
    consenting = np.array([1, 4, 9])
    others = np.setdiff1d(np.arange(NUM_USERS), consenting)
    train = _histories(3)
    changed = list(train)
    for u in consenting:  # rewrite every consenting history completely
        changed[u] = np.random.default_rng(100 + u).integers(1, NUM_ITEMS + 1, 15)
    touched = list(train)
    touched[others[0]] = np.random.default_rng(7).integers(1, NUM_ITEMS + 1, 12)
    arm = {"pop_z": 0.5, "cooc_z": 0.5, "dpsgd_z": 2.0, "top": 10, "window": 3}
    sasrec_like = lambda histories, split: np.zeros((1, len(histories), NUM_ITEMS + 1), np.float32)  # noqa: E731

    def releases(histories):
        data = _tiny_data(histories)
        bias, cooc, _ = pp.channel_release(arm, data, {}, np.random.default_rng(5), users=others)
        result = pp.run_channel_arm(arm, data, {"public": _public()}, 5, users=others, extra=sasrec_like)
        return bias, cooc, result["learned"]

    bias, cooc, learned = releases(train)
    bias2, cooc2, learned2 = releases(changed)
    np.testing.assert_array_equal(bias, bias2)
    np.testing.assert_array_equal(cooc, cooc2)
    assert learned == learned2  # the DP-SGD scorer: same noise, same sampled users, same weights
    assert "extra0" in learned["scales"]  # the pretrained model's channel is one of the scorer's
    bias3, cooc3, learned3 = releases(touched)  # but a private user's history does count
    assert not np.array_equal(bias, bias3) and not np.array_equal(cooc, cooc3) and learned3 != learned


def test_the_item_sums_over_a_subset_are_the_sums_over_exactly_those_users():
    train = _histories(4)
    data = _tiny_data(train)
    users = np.array([0, 2, 5])
    subset = _tiny_data([train[u] for u in users])
    np.testing.assert_array_equal(pp.item_set_sum(data, users), pp.item_set_sum(subset))
    keep = np.arange(1, NUM_ITEMS + 1)
    total, own = pp.windowed_cooc_sum(data, keep, 4, users)
    total_subset, own_subset = pp.windowed_cooc_sum(subset, keep, 4)
    np.testing.assert_array_equal(total, total_subset)
    assert len(own) == len(users)


def test_the_consenting_cohort_is_the_products_and_the_private_users_are_everybody_else():
    from server.pretraining import consenting_devices
    from shared import config
    from simulations.consent_pipeline import consenting_users, private_users

    for seed in (0, 1):
        cohort = consenting_users(seed, 943)
        cfg = config.validate({"public-share": 0.1, "seed": seed})
        np.testing.assert_array_equal(cohort, consenting_devices(cfg, 943))
        assert len(cohort) == 94
        others = private_users(cohort, 943)
        assert len(others) == 849 and not set(others) & set(cohort.tolist())
        assert sorted(set(others) | set(cohort.tolist())) == list(range(943))
