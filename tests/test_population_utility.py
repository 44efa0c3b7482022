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
    for target in pu.TARGETS:
        label = f"channel-scorer, epsilon {target:g}"
        for pop in (small, large):
            assert pop["channel-privacy"][label]["epsilon"] <= target
    assert large["runs"]["0"]["channel-scorer, epsilon 2"]["estimate"]
    assert not small["runs"]["0"]["channel-scorer, epsilon 2"]["estimate"]
    assert "Channel scorer epsilon" in markdown and "Target at N = 160" in markdown
    for pop in (small, small_synthetic, large):
        arms = pop["summary"]
        for label in ("content-scorer, epsilon 2", "content-scorer, no noise", "popularity (no DP)",
                      "channel-scorer, epsilon 2", "channel-scorer, epsilon 8", "channel-scorer, no noise",
                      "DP popularity, epsilon 8", "centralized SASRec (reduced budget)",
                      "SASRec federation, no DP (reduced budget)"):
            assert 0.0 <= arms[label]["ndcg@10"][0] <= 1.0, label


def test_each_users_transition_contribution_has_norm_one_and_the_sum_is_theirs():
    train = [np.array([3, 1, 2, 3, 1, 2]), np.array([2, 4]), np.array([5]), np.array([], dtype=np.int64),
             np.array([1, 4, 2, 5, 3])]  # user 0 repeats the pair (1, 2) and (3, 1); 2 and 3 have no pair
    total = pu.transition_sum(train, 5)
    expected = np.zeros((6, 6))
    for seq in train:
        own = np.zeros((6, 6))
        for prev, nxt in zip(seq[:-1], seq[1:]):
            own[prev, nxt] += 1.0
        if own.any():
            assert np.linalg.norm(own / np.linalg.norm(own)) == pytest.approx(1.0)
            expected += own / np.linalg.norm(own)
    assert np.allclose(total, expected)
    assert total[1, 2] == pytest.approx(2 / np.sqrt(2**2 + 2**2 + 1))  # a repeated pair counts twice, not once
    assert total[2, 1] == 0.0  # ordered: the next item is the column
    # removing one user changes the sum by at most 1 in L2 (the sensitivity the noise is calibrated to)
    for u in range(len(train)):
        rest = pu.transition_sum(train[:u] + train[u + 1:], 5)
        assert np.linalg.norm(total - rest) <= 1.0 + 1e-9


def test_transition_epsilon_agrees_with_dp_accounting_and_the_calibration_reaches_each_target():
    import dp_accounting as dpa
    from dp_accounting.rdp import rdp_privacy_accountant

    s = pu.pipeline_settings()
    for target in pu.TARGETS:
        c = pu.calibrate_transitions(target, s)
        assert c["epsilon"] <= target
        assert pu.transition_epsilon(0.99 * c["popularity-z"], 0.99 * c["transitions-z"], s["delta"],
                                     s["accountant"]) > target  # the smallest factor, not just any
        rdp = rdp_privacy_accountant.RdpAccountant()
        rdp.compose(dpa.ComposedDpEvent([dpa.GaussianDpEvent(c["popularity-z"]),
                                         dpa.GaussianDpEvent(c["transitions-z"])]))
        assert c["epsilon"] == pytest.approx(rdp.get_epsilon(s["delta"]), rel=0.02)
        assert c["popularity-z"] / c["transitions-z"] == pytest.approx(
            pu.TRANSITION_REFERENCE[0] / pu.TRANSITION_REFERENCE[1])


def test_transition_scores_follow_the_last_item_row_above_the_noise_threshold():
    popularity = np.array([0.0, 5.0, 1.0, 1.0, 1.0])
    transitions = np.zeros((5, 5))
    transitions[2, 3] = 40.0  # well above 3 x z
    transitions[2, 4] = 5.0  # under 3 x z = 6: dropped as noise
    scores = pu.transition_scores(popularity, transitions, 2.0, [np.array([1, 2]), np.array([], dtype=np.int64)])
    assert scores[0, 3] == pytest.approx(np.log1p(1.0) + np.log1p(40.0 - 6.0))
    assert scores[0, 4] == pytest.approx(np.log1p(1.0))
    assert np.argmax(scores[0, 1:]) + 1 == 3  # the transition beats the most popular item
    assert np.argmax(scores[1, 1:]) + 1 == 1  # no history: popularity only
    no_noise = pu.transition_scores(popularity, transitions, 0.0, [np.array([2])])
    assert no_noise[0, 4] == pytest.approx(np.log1p(1.0) + np.log1p(5.0))


def test_dp_sasrec_estimate_puts_the_real_cohorts_noise_on_the_mean_and_its_epsilon_agrees_with_dp_accounting(
        tmp_path, monkeypatch):
    from dataclasses import replace

    import dp_accounting as dpa
    from dp_accounting.rdp import rdp_privacy_accountant

    import shared.privacy.user_level as user_level

    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(tmp_path / "cache"))
    source = write_source(tmp_path / "source", num_users=60)
    pop = pu.load_population(200, str(source), tmp_path / "work", 50)
    calls, real_mean = [], user_level.noisy_mean_update

    def spy(clipped, keys, shapes, noise_std, expected_cohort, rng):
        calls.append((len(clipped), noise_std, expected_cohort,
                      max(float(np.sqrt(sum(np.sum(u[k] ** 2) for k in keys))) for u in clipped)))
        return real_mean(clipped, keys, shapes, noise_std, expected_cohort, rng)

    monkeypatch.setattr(user_level, "noisy_mean_update", spy)
    budget = replace(pu.QUICK, fed_rounds=2, fed_cohort=10)
    z, clip, q = 1.3, 0.05, 0.25  # a clip small enough to bind
    result = pu.dp_federated_sasrec(pop, 0, budget, z, clip, q)
    assert result["estimate"] and result["simulated-q"] == pytest.approx(10 / 200)
    assert len(calls) == 2
    for _replies, noise_std, expected_cohort, largest in calls:
        assert expected_cohort == pytest.approx(10.0)  # the simulated cohort's q' N
        assert noise_std / expected_cohort == pytest.approx(z * clip / (q * 200))  # the real cohort's noise
        assert largest <= clip + 1e-9
    exact = pu.dp_federated_sasrec(pop, 0, replace(budget, fed_rounds=1, fed_cohort=80), z, clip, q)
    assert not exact["estimate"] and exact["simulated-q"] == q  # cohort beyond q N: the real rate, no estimate
    assert calls[-1][1] == pytest.approx(z * clip)

    s = pu.pipeline_settings()
    for target in pu.TARGETS:
        z = pu.calibrate_dp_sasrec(target, 0.25, 10, s)
        assert pu.dp_sasrec_epsilon(z, 0.25, 10, s) <= target < pu.dp_sasrec_epsilon(0.99 * z, 0.25, 10, s)
        rdp = rdp_privacy_accountant.RdpAccountant()
        rdp.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.25, dpa.GaussianDpEvent(z)), 10))
        assert pu.dp_sasrec_epsilon(z, 0.25, 10, s) == pytest.approx(rdp.get_epsilon(s["delta"]), rel=0.02)


# ------------------------------------------------------------------ channel scorer (the product's default)
def _channel_setup(seed: int = 0):
    from server.scorer import initial_scorer
    from shared.analytics import cooc_from_release, item_set_vector, noisy_sum, top_items

    rng = np.random.default_rng(seed)
    split = walk_split(num_users=9, num_items=30, seed=3)
    train = [np.concatenate([t, rng.integers(1, 31, size=4)]) for t in split.train]  # some jumps and repeats
    train[4] = train[4][:1]  # a one-item history: no example, zero gradient
    train[5] = train[5][:3]  # fewer items than the profile, the targets and the co-occurrence query
    ids = ["<pad>"] + [str(3 * i + 1) for i in range(1, 31)]
    titles = [None] + [f"Item {i} ({1970 + i % 30})" if i % 4 else f"Item {i}" for i in range(1, 31)]
    genres = [[]] + [["a", "b", "c", "d"][i % 4:i % 4 + 1 + i % 2] for i in range(1, 31)]
    catalogue = public_catalogue(rng.normal(size=(31, 16)), ids, titles, genres)
    histogram = noisy_sum(item_set_vector(train, 30), 0.5, rng)
    items = top_items(histogram, 12)
    cooc = cooc_from_release(rng.uniform(0, 3, 12 * 11 // 2), 12)
    model = initial_scorer(catalogue, histogram, 0, (items, cooc))
    with torch.no_grad():
        model.content.copy_(torch.tensor([5.0]))
        model.scales.copy_(torch.tensor([0.7, 0.4, -0.3, 0.9, 0.2, -0.1, 0.6, 0.3]))
    return train, catalogue, model


def _simulated_channels(train, catalogue, model):
    """The simulation's per-chunk device features for six users (co-occurrence channel filled in), with what
    built them: (settings, cooc items, cooc, width, members, histories, nexts, owner, owns, profile, channels,
    mask)."""
    from shared.analytics import COOC_GAP_DECAY, own_cooc_matrix
    from shared.scorer import cooc_matrix

    c = pu.channel_settings()
    items, cooc = cooc_matrix(model)
    width = catalogue.num_items + 1
    members = [8, 4, 0, 5, 2, 7]
    histories, nexts, owner = pu.chunk_examples(train, members, c["targets"])
    owns = [own_cooc_matrix(train[u], items, c["cooc-window"], COOC_GAP_DECAY) for u in members]
    profile, channels, mask = pu.base_channels(catalogue, histories, c)
    channels[:, 0] = pu.cooc_channel(histories, items, cooc, width, owns, owner.numpy())
    return c, items, cooc, width, members, histories, nexts, owner, owns, profile, channels, mask


def _assert_each_users_gradient_is_the_devices(grads, model, catalogue, train, members, c):
    """Row i of the simulation's cohort gradients equals what the product's device computes for members[i]."""
    from shared.analytics import COOC_GAP_DECAY
    from shared.scorer import channel_user_gradient

    for i, user in enumerate(members):
        expected = channel_user_gradient(model, catalogue, [train[user]], c["targets"], c["profile-items"],
                                         c["decay"], c["cooc-window"], COOC_GAP_DECAY)
        for key, value in expected.items():
            assert torch.allclose(grads[key][i], value, atol=1e-5, rtol=1e-4), (user, key)


def test_channel_features_and_per_user_gradients_equal_the_product_device_code():
    from shared.scorer import channel_features

    train, catalogue, model = _channel_setup()
    c, items, cooc, width, members, histories, nexts, owner, owns, profile, channels, mask = \
        _simulated_channels(train, catalogue, model)
    shared = channel_features(catalogue, histories, items, cooc, c["profile-items"], c["decay"],
                              [owns[i] for i in owner.numpy()])
    for mine, theirs in zip((profile, channels, mask), shared):
        assert torch.allclose(mine, theirs, atol=1e-5)
    assert float(channels[:, 0].abs().sum()) > 0  # the co-occurrence channel is really exercised
    extra = [np.zeros(0, dtype=np.int64)] + histories  # an empty history; several blocks
    for mine, theirs in zip(pu.base_channels(catalogue, extra, c, block=4),
                            channel_features(catalogue, extra, np.zeros(0, dtype=np.int64), np.zeros((0, 0)),
                                             c["profile-items"], c["decay"])):
        assert torch.allclose(mine, theirs, atol=1e-5)
    grads = pu.channel_cohort_gradients(model, catalogue, profile, channels, mask, nexts, owner, len(members))
    _assert_each_users_gradient_is_the_devices(grads, model, catalogue, train, members, c)
    assert float(grads["scales"][1].abs().sum()) == 0.0 and float(grads["content"][1].abs().sum()) == 0.0
    # evaluation features: the released co-occurrence as it is (no own removal)
    _, eval_channels, _ = channel_features(catalogue, histories, items, cooc, c["profile-items"], c["decay"])
    assert torch.allclose(pu.cooc_channel(histories, items, cooc, width), eval_channels[:, 0], atol=1e-5)


def test_channel_calibration_is_the_products_multipliers_times_one_factor_and_agrees_with_dp_accounting():
    import dp_accounting as dpa
    from dp_accounting.rdp import rdp_privacy_accountant

    from shared import config
    from shared.privacy.pipeline import planned_epsilon

    c = pu.channel_settings()
    product = config.resolve_run()  # what `privrec simulate` runs with no options
    assert c["model"] == "channel-scorer" and c["z"] == product["user-noise-multiplier"]
    assert pu.channel_epsilon(c["popularity-z"], c["cooc-z"], c["z"], c) == pytest.approx(
        planned_epsilon(product, product["fraction-train"]))  # the product's own figure at its defaults
    for target in pu.TARGETS:
        x = pu.calibrate_channel(target, c)
        assert x["epsilon"] <= target < pu.channel_epsilon(0.99 * x["popularity-z"], 0.99 * x["cooc-z"],
                                                           0.99 * x["z"], c)
        assert x["popularity-z"] / x["z"] == pytest.approx(c["popularity-z"] / c["z"])
        assert x["cooc-z"] / x["z"] == pytest.approx(c["cooc-z"] / c["z"])
        rdp = rdp_privacy_accountant.RdpAccountant()
        rdp.compose(dpa.ComposedDpEvent([
            dpa.GaussianDpEvent(x["popularity-z"]), dpa.GaussianDpEvent(x["cooc-z"]),
            dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(c["q"], dpa.GaussianDpEvent(x["z"])), c["rounds"])]))
        assert x["epsilon"] == pytest.approx(rdp.get_epsilon(c["delta"]), rel=0.02)


def test_channel_arms_release_like_the_server_and_the_estimate_keeps_the_real_cohorts_noise(tmp_path, monkeypatch):
    import shared.privacy.user_level as user_level
    from shared.analytics import cooc_vector, top_items

    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(tmp_path / "cache"))
    source = write_source(tmp_path / "source", num_users=60)
    pop = pu.load_population(200, str(source), tmp_path / "work", 50)
    assert pop.catalogue.genres is not None  # the channel scorer's genre channel has the catalogue's genres
    c = {**pu.channel_settings(2), "cooc-items": 20}
    arms = {"private": (2.0, 1.5, 1.3), "none": (0.0, 0.0, 0.0)}
    releases = pu.channel_releases(pop, arms, c, 0)
    hist, items, matrix = releases["none"]
    assert np.allclose(hist[1:], pop.item_sum[1:])
    assert np.array_equal(items, top_items(pop.item_sum, 20))
    rows, cols = np.triu_indices(len(items), 1)
    assert np.allclose(matrix[rows, cols], cooc_vector(pop.users.train, items, c["cooc-window"]))
    calls, real_mean = [], user_level.noisy_mean_update

    def spy(clipped, keys, shapes, noise_std, expected_cohort, rng):
        calls.append((noise_std, expected_cohort))
        return real_mean(clipped, keys, shapes, noise_std, expected_cohort, rng)

    monkeypatch.setattr(user_level, "noisy_mean_update", spy)
    out = pu.run_channel_arms(pop, arms, c, 0, chunk=16, simulated_cohort=10)
    assert out["private"]["estimate"] and out["private"]["simulated-q"] == pytest.approx(10 / 200)
    assert len(calls) == 2 * c["rounds"]
    for noise_std, expected_cohort in calls[0::2]:  # the private arm's rounds
        assert expected_cohort == pytest.approx(10.0)
        assert noise_std / expected_cohort == pytest.approx(1.3 * c["clip"] / (c["q"] * 200))
    assert all(noise_std == 0.0 for noise_std, _ in calls[1::2])
    for arm in out.values():
        assert 0.0 <= arm["ndcg@10"] <= 1.0 and 0.0 <= arm["round-0"]["ndcg@10"] <= 1.0
        assert max(arm["update-norm-quantiles"]) > 0


def test_the_transition_arms_features_and_per_user_gradients_equal_the_product_device_code():
    """`--product-transitions`: the simulation's transition channel (own counts removed in training) and per-user
    gradients of the 10-weight scorer are `shared.scorer.channel_features` / `channel_user_gradient`'s."""
    from server.scorer import initial_scorer
    from shared.analytics import top_items, transition_sum
    from shared.scorer import channel_features, cooc_matrix, transition_release

    train, catalogue, plain = _channel_setup()
    c = pu.channel_settings()
    items, cooc = cooc_matrix(plain)
    t_items = top_items(plain.popularity.numpy(), 20)
    released = transition_sum(train, t_items) + np.random.default_rng(1).normal(0, 0.2, (20, 20))
    model = initial_scorer(catalogue, np.expm1(plain.popularity.numpy()), 0, (items, cooc), (t_items, released, 0.3))
    with torch.no_grad():
        model.content.copy_(torch.tensor([5.0]))
        model.scales.copy_(torch.tensor([0.7, 0.4, -0.3, 0.9, 0.2, -0.1, 0.6, 0.3, 0.8]))
    _, _, _, width, members, histories, nexts, owner, _, profile, channels, mask = \
        _simulated_channels(train, catalogue, plain)
    features = pu.with_transition_channel(model, channels, histories, width, train, members, owner)
    assert features.shape[1] == channels.shape[1] + 1 and float(features[:, -1].abs().sum()) > 0
    grads = pu.channel_cohort_gradients(model, catalogue, profile, features, mask, nexts, owner, len(members))
    _assert_each_users_gradient_is_the_devices(grads, model, catalogue, train, members, c)
    _, theirs, _ = channel_features(catalogue, histories, items, cooc, c["profile-items"], c["decay"],
                                    transitions=transition_release(model))
    mine = pu.with_transition_channel(model, channels, histories, width)  # evaluation: the release as it is
    assert torch.allclose(mine[:, -1], theirs[:, -1], atol=1e-5)
    assert pu.with_transition_channel(plain, channels, histories, width) is channels  # default: unchanged


def test_a_channel_arm_with_a_sasrec_channel_keeps_it_frozen_and_silent_users_send_nothing(tmp_path, monkeypatch):
    import torch

    from shared.model import ModelConfig, SASRec

    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(tmp_path / "cache"))
    source = write_source(tmp_path / "source", num_users=40)
    pop = pu.load_population(40, str(source), tmp_path / "work", 40)
    c = {**pu.channel_settings(2), "cooc-items": 20, "q": 1.0}
    torch.manual_seed(0)
    sasrec = SASRec(ModelConfig(num_items=pop.catalogue.num_items, max_len=8, hidden_size=8, num_heads=2,
                                num_blocks=1))
    before = {k: v.clone() for k, v in sasrec.state_dict().items()}
    noiseless = (0.0, 0.0, 0.0)
    models: dict = {}
    out = pu.run_channel_arms(pop, {"plain": noiseless, "sasrec": noiseless, "silent": noiseless}, c, 0, chunk=16,
                              models_out=models, sasrec={"sasrec": sasrec, "silent": sasrec},
                              not_training={"silent": range(pop.n)})
    assert len(out["sasrec"]["weights"]["scales"]) == len(out["plain"]["weights"]["scales"]) + 1
    assert all(torch.equal(models["sasrec"].sasrec.state_dict()[k], v) for k, v in before.items())
    assert out["sasrec"]["weights"]["scales"][-1] != 0.0  # the channel's scale trains
    # nobody sends an update and there is no noise: the scorer stays where it started
    assert out["silent"]["weights"]["scales"] == [1.0] + [0.0] * (len(out["silent"]["weights"]["scales"]) - 1)
