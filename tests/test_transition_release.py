"""`transition-release = true` (issue 15): the opt-in DP release of each user's directed (previous -> next)
transition counts, its place in the pipeline's one accountant (checked against dp-accounting), the channel a
device computes from it (post-processing of the release and its own history only), the config's refusals, and a
small run through the real ServerApp and ClientApp in process."""

from __future__ import annotations

import json

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant

from shared import config
from shared.analytics import own_transition_matrix, top_items, transition_sum
from shared.errors import PrivrecError
from shared.privacy.pipeline import check_pipeline_budget, pipeline_epsilon, planned_epsilon, statement
from shared.scorer import (
    CHANNELS,
    TRANSITION_CHANNEL,
    TRANSITION_THRESHOLD,
    ChannelScorer,
    channel_features,
    channel_user_gradient,
    transition_channel,
)
from tests.test_channel_scorer import _run
from tests.test_scorer_pipeline import NUM_DEVICES, _catalogue, digit_store  # noqa: F401 - fixture


def _cfg(**overrides):
    return config.validate({**config.DEFAULT_PIPELINE, "transition-release": True, **overrides})


# ------------------------------------------------------------- a user's contribution
def test_each_users_transition_counts_have_norm_one_and_count_only_directed_steps_among_the_items():
    items = np.array([7, 3, 5, 9])  # positions 0..3
    seq = np.array([3, 5, 3, 5, 20, 9, 9, 7])
    own = own_transition_matrix(seq, items)
    expected = np.zeros((4, 4))
    expected[1, 2] = 2.0  # 3 -> 5 twice
    expected[2, 1] = 1.0  # 5 -> 3
    expected[3, 0] = 1.0  # 9 -> 7 (5 -> 20 and 20 -> 9 leave the items; 9 -> 9 is no transition)
    assert np.allclose(own, expected / np.linalg.norm(expected))
    assert np.linalg.norm(own) == pytest.approx(1.0)  # sensitivity 1 under add/remove one user
    users = [seq, np.array([3, 2, 2]), np.array([9, 5] * 30)]
    assert [np.linalg.norm(own_transition_matrix(s, items)) for s in users] == pytest.approx([1.0, 0.0, 1.0])
    total = transition_sum(users, items)  # the vectorised sum (a device's, or the simulation's) = sum of the parts
    assert np.allclose(total, sum(own_transition_matrix(s, items) for s in users))
    for u in range(len(users)):  # removing any one user moves the sum by at most 1 in L2
        assert np.linalg.norm(total - transition_sum(users[:u] + users[u + 1:], items)) <= 1.0 + 1e-9


# ------------------------------------------------------------- the one accountant
@pytest.mark.parametrize("z_pop, z_cooc, z_t, z, q, rounds", [(4.6, 2.76, 2.76, 3.22, 0.25, 5),
                                                                 (1.78, 1.07, 1.07, 1.25, 0.25, 5),
                                                                 (5.8, 3.48, 3.48, 4.06, 2 / 8, 3)])
def test_the_four_release_epsilon_agrees_with_dp_accounting(z_pop, z_cooc, z_t, z, q, rounds):
    ours = pipeline_epsilon(z_pop, z, q, rounds, 1e-5, "rdp", cooc_noise=z_cooc, transition_noise=z_t)
    other = rdp_privacy_accountant.RdpAccountant()
    other.compose(dpa.ComposedDpEvent([
        dpa.GaussianDpEvent(z_pop), dpa.GaussianDpEvent(z_cooc), dpa.GaussianDpEvent(z_t),
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)]))
    assert ours == pytest.approx(other.get_epsilon(1e-5), rel=0.03)
    assert ours > pipeline_epsilon(z_pop, z, q, rounds, 1e-5, "rdp", cooc_noise=z_cooc)  # the release is counted


def test_the_config_key_adds_the_release_to_the_planned_epsilon_the_history_and_the_statement():
    on, off = _cfg(), _cfg(**{"transition-release": False})
    assert planned_epsilon(on, 0.25) == pytest.approx(
        pipeline_epsilon(4.6, 3.22, 0.25, 5, 1e-5, "rdp", cooc_noise=2.76, transition_noise=2.76), rel=1e-12)
    assert planned_epsilon(off, 0.25) == pytest.approx(pipeline_epsilon(4.6, 3.22, 0.25, 5, 1e-5, "rdp",
                                                                        cooc_noise=2.76), rel=1e-12)
    record = statement(on, 0.25, 943, 5)
    assert record["history"] == [[4.6, 1.0, 1], [2.76, 1.0, 1], [2.76, 1.0, 1], [3.22, 0.25, 5]]
    assert "transitions" in record["mechanism"] and "transition release" in record["adversary-by-part"]
    assert "transition" not in statement(off, 0.25, 943, 5)["mechanism"]
    # The default pipeline with the release on passes epsilon 2: the budget check refuses it, naming the key.
    with pytest.raises(PrivrecError, match="config key 'target-epsilon' = 2.*transition release z = 2.76"):
        check_pipeline_budget(on, 0.25)


@pytest.mark.parametrize("overrides, words", [
    ({"model": "content-scorer"}, "config key 'transition-release' = true needs model = channel-scorer"),
    ({"model": "sasrec", "dp": True}, "config key 'transition-release' = true needs model = channel-scorer"),
    ({"secure-aggregation": True, "devices-per-round": 0},
     "config key 'transition-release' = true cannot be combined with 'secure-aggregation' = true"),
    ({"transition-noise-multiplier": 0.0}, "config key 'transition-noise-multiplier' = 0.0: must be > 0"),
    ({"transition-items": 1}, "config key 'transition-items' = 1: must be >= 2"),
    ({"transition-release": "maybe"}, "config key 'transition-release': 'maybe' is not a valid bool"),
])
def test_a_wrong_transition_config_is_refused_in_one_line_naming_the_key(overrides, words):
    with pytest.raises(PrivrecError) as err:
        _cfg(**overrides)
    assert words in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------- the device's channel
def _model_with(items, released, threshold, num_items=40):
    model = ChannelScorer(num_items, 0, len(items))
    model.transition_items.copy_(torch.tensor(items, dtype=torch.float32))
    model.transitions.copy_(torch.from_numpy(released.astype(np.float32)))
    model.transition_threshold.fill_(threshold)
    return model


def test_the_channel_is_log1p_of_the_last_items_released_row_above_the_threshold():
    items = np.array([4, 9, 2])
    released = np.zeros((3, 3))
    released[1, 0] = 50.0  # 9 -> 4: far above the threshold
    released[1, 2] = 5.0  # 9 -> 2: under 3 x z = 6, dropped as noise
    channel = transition_channel([np.array([1, 9]), np.array([9, 7]), np.array([], dtype=np.int64)],
                                 (items, released, 6.0), 41)
    assert channel[0, 4] == pytest.approx(np.log1p(44.0)) and channel[0, 2] == 0.0
    assert np.count_nonzero(channel[0]) == 1
    assert not channel[1:].any()  # a last item outside the release, or no history: no transition channel


def test_a_device_computes_its_training_channel_from_the_release_of_the_others_only():
    """Post-processing: the channel the device trains on is what the release of every OTHER user (with the same
    noise) would give it; its own data enters only through its own history and its own removed counts."""
    rng = np.random.default_rng(3)
    others = [rng.integers(1, 41, size=12) for _ in range(30)] + [np.array([5, 6, 7, 8])] * 40
    seq = np.array([5, 6, 7, 6, 7, 8, 5, 6])
    items = np.arange(1, 41)
    noise = rng.normal(0.0, 2.0, (40, 40))
    released = transition_sum(others + [seq], items) + noise
    without_me = transition_sum(others, items) + noise
    own = own_transition_matrix(seq, items)
    catalogue = _catalogue()
    histories = [seq[:pos] for pos in range(3, len(seq))]
    got = channel_features(catalogue, histories, np.zeros(0, dtype=np.int64), np.zeros((0, 0)), 5, 0.8,
                           transitions=(items, released, 6.0), own_transitions=[own] * len(histories))[1]
    want = transition_channel(histories, (items, without_me, 6.0), 41)
    assert got.shape[1] == len(CHANNELS) + 1 and np.allclose(got[:, -1].numpy(), want, atol=1e-5)
    # And the gradient uses those features (the last channel's scale is the 10th weight).
    model = _model_with(items, released, 6.0)
    assert model.scales.shape == (len(CHANNELS) + 2,) and float(model.scales[-1].detach()) == 0.0
    assert want.any()  # the channel is really exercised
    grads = channel_user_gradient(model, catalogue, [seq], targets=3, profile_items=5, decay=0.8, window=10,
                                  gap_decay=0.9)
    assert float(grads["scales"][-1].abs()) > 0


def test_a_scorer_without_the_release_loads_as_the_nine_weight_scorer():
    plain = ChannelScorer(40, 5)
    loaded = ChannelScorer.from_state(plain.state_dict(), 40)
    assert loaded.channels == CHANNELS and loaded.scales.shape == (len(CHANNELS) + 1,)
    assert "transitions" not in dict(loaded.named_buffers())
    with_release = ChannelScorer.from_state(_model_with(np.array([1, 2]), np.ones((2, 2)), 1.0).state_dict(), 40)
    assert with_release.channels[-1] == "transition" and with_release.transitions.shape == (2, 2)


# ------------------------------------------------------------- the pipeline, in process
def test_the_pipeline_with_the_transition_release_releases_accounts_and_trains(tmp_path, digit_store,  # noqa: F811
                                                                               capsys):
    cfg, path, grid, summary, privacy = _run(tmp_path, digit_store, "transitions",
                                             **{"num-rounds": 2, "fraction-train": 1.0, "target-epsilon": 0.0,
                                                "transition-release": True, "transition-items": 30})
    kinds = [m.metadata.message_type for m in grid.delivered]
    assert kinds[:3 * NUM_DEVICES] == (["query.popularity"] * NUM_DEVICES + ["query.cooccurrence"] * NUM_DEVICES
                                       + ["query.transitions"] * NUM_DEVICES)
    histogram = json.loads((path / "popularity.json").read_text())["histogram"]
    released = json.loads((path / "transitions.json").read_text())
    assert released["items"] == top_items(np.array(histogram), 30).tolist()  # post-processing of the first release
    from shared.data.store import open_store

    store = open_store(digit_store)
    exact = sum(transition_sum(store.device(d).train, np.array(released["items"])) for d in range(NUM_DEVICES))
    noise = np.asarray(released["counts"]).reshape(30, 30) - exact
    assert noise.std() == pytest.approx(2.76, rel=0.1) and abs(noise.mean()) < 0.3
    expected = pipeline_epsilon(4.6, 3.22, 1.0, 2, 1e-5, "rdp", cooc_noise=2.76, transition_noise=2.76)
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert privacy["user-level"]["pipeline"]["history"] == [[4.6, 1.0, 1], [2.76, 1.0, 1], [2.76, 1.0, 1],
                                                            [3.22, 1.0, 2]]
    assert "transition release" in privacy["statements"][0]["sentence"]
    ledger = json.loads(next((tmp_path / "population-transitions").glob("*/privacy-ledger.json")).read_text())
    assert [r["kind"] for r in ledger["releases"]] == ["popularity-histogram", "cooccurrence-histogram",
                                                       "transition-counts"] + ["channel-scorer-round"] * 2
    state = torch.load(path / "model.pt", weights_only=True)
    assert state["scales"].shape == (len(CHANNELS) + 2,)
    assert np.allclose(state["transitions"].numpy(), np.asarray(released["counts"]).reshape(30, 30), atol=1e-4)
    assert float(state["transition_threshold"]) == pytest.approx(TRANSITION_THRESHOLD * 2.76)
    arch = json.loads((path / "model.json").read_text())
    assert arch["transition-channel"] == TRANSITION_CHANNEL
    from tests.test_cli import run_cli

    # `privrec report` recomputes the user-level figure from the config's releases (the transitions included).
    code, out, err = run_cli(capsys, "report", path)
    assert code == 0, err + out

    code, out, err = run_cli(capsys, "recommend", "--model", path, "--history", "12 13 14", "-k", "5")
    assert code == 0, err
    # A model.json that does not name the transition channel its model.pt carries is refused in one line.
    del arch["transition-channel"]
    (path / "model.json").write_text(json.dumps(arch))
    code, out, err = run_cli(capsys, "recommend", "--model", path, "--history", "12 13 14", "-k", "5")
    assert code == 2 and "disagree on the transition release" in err and "Traceback" not in err


def test_a_device_whose_run_config_does_not_declare_the_release_refuses_it(tmp_path, digit_store):  # noqa: F811
    from client.app import app as client_app
    from server.analytics import federated_transitions
    from simulations.inprocess import InProcessGrid

    cfg = config.validate({**config.DEFAULT_PIPELINE, "data-store": str(digit_store)})  # transition-release false
    grid = InProcessGrid(client_app, NUM_DEVICES, run_config=cfg)
    with pytest.raises(PrivrecError, match="no device contributed to the transition release"):
        federated_transitions(grid, {"data-store": str(digit_store), "state-dir": str(tmp_path / "population")},
                              items=np.arange(1, 11), noise_multiplier=2.76, delta=1e-5, release_id="r",
                              rng=np.random.default_rng(0))
    assert not list((tmp_path / "population").glob("*/privacy-ledger.json"))  # nothing recorded


def test_a_resumed_run_reads_every_release_back_and_asks_no_device_again(tmp_path, digit_store):  # noqa: F811
    """server.scorer.recorded_release: a release whose record exists is never made again (the devices' ledgers
    are charged once), and what a resumed run reads back is exactly what the first run used."""
    from client.app import app as client_app
    from server.run_dir import RunDirectory
    from server.scorer import released_cooccurrence, released_popularity, released_transitions
    from shared.config import from_run_config
    from simulations.inprocess import InProcessGrid

    population = tmp_path / "population"
    cfg = _cfg(**{"data-store": str(digit_store), "population-dir": str(population), "cooc-items": 20,
                  "transition-items": 20, "run-dir": str(tmp_path / "runs"), "run-name": "r"})
    run, run_dir = from_run_config(cfg), RunDirectory.create(cfg["run-dir"], cfg["run-name"])
    device_config = {"data-store": str(digit_store), "state-dir": str(population)}

    def releases(grid):
        histogram = released_popularity(grid, run, run_dir, device_config, num_items=40, num_devices=NUM_DEVICES)
        return (histogram, released_cooccurrence(grid, run, run_dir, device_config, histogram),
                released_transitions(grid, run, run_dir, device_config, histogram))

    def ledgers():
        return {p: p.read_bytes() for p in sorted(population.glob("*/privacy-ledger.json"))}

    first_grid = InProcessGrid(client_app, NUM_DEVICES, keep_messages=True, run_config=cfg)
    first = releases(first_grid)
    assert len(first_grid.delivered) == 3 * NUM_DEVICES
    charged = ledgers()
    assert len(charged) == NUM_DEVICES
    records = {f: (run_dir.path / f).read_bytes() for f in ("popularity.json", "cooccurrence.json",
                                                            "transitions.json")}

    resumed_grid = InProcessGrid(client_app, NUM_DEVICES, keep_messages=True, run_config=cfg)
    resumed = releases(resumed_grid)
    assert resumed_grid.delivered == []  # no device was asked
    assert ledgers() == charged  # nor charged again
    assert {f: (run_dir.path / f).read_bytes() for f in records} == records  # the records are not rewritten
    (pop_a, (items_a, cooc_a), trans_a), (pop_b, (items_b, cooc_b), trans_b) = first, resumed
    assert np.array_equal(pop_a, pop_b) and pop_a.dtype == pop_b.dtype == np.float64
    assert np.array_equal(items_a, items_b) and np.array_equal(cooc_a, cooc_b)
    assert all(np.array_equal(a, b) for a, b in zip(trans_a, trans_b))
    assert trans_a[2] == TRANSITION_THRESHOLD * 2.76
