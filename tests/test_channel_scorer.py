"""model = channel-scorer (the default of `privrec simulate`, issue 13): the devices' clipped co-occurrence
contributions, the release noise, the one composed accountant (checked against dp-accounting), the refusals,
and the whole pipeline (popularity release, co-occurrence release, user-level DP-FedAvg rounds) through the real
ServerApp and ClientApp in process, and `privrec recommend` on its run."""

from __future__ import annotations

import json

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from shared import config
from shared.analytics import cooc_from_release, cooc_vector, own_cooc_matrix, pair_index, top_items
from shared.errors import PrivrecError
from shared.privacy.pipeline import check_pipeline_budget, pipeline_epsilon
from shared.scorer import (
    CHANNELS,
    COOC_CHANNEL,
    COOC_PEAK,
    COOC_QUERY_DECAY,
    COOC_QUERY_ITEMS,
    ChannelScorer,
    channel_features,
    channel_user_gradient,
    cooc_scale,
)
from tests.test_scorer_pipeline import NUM_DEVICES, NUM_ITEMS, _catalogue, digit_store  # noqa: F401 - fixture


def _channel_cfg(**overrides):
    return config.validate({**config.DEFAULT_PIPELINE, **overrides})


# ------------------------------------------------------------- a device's contribution
def test_each_users_cooccurrence_part_has_norm_one_and_counts_only_pairs_inside_the_window_and_items():
    items = np.array([7, 3, 5, 9])  # positions 0..3
    seq = np.array([3, 5, 2, 3, 9, 9, 20, 7])
    own = own_cooc_matrix(seq, items, window=2, gap_decay=0.5)
    rows, cols = pair_index(4)
    # By hand, gap 1: (3,5) (9,7 across 20? no: 20 breaks it) ... pairs of positions among kept items only.
    expected = np.zeros((4, 4))
    for gap, weight in ((1, 1.0), (2, 0.5)):
        for a, b in zip(seq[:-gap], seq[gap:]):
            if a in items and b in items and a != b:
                i, j = sorted((int(np.flatnonzero(items == a)[0]), int(np.flatnonzero(items == b)[0])))
                expected[i, j] += weight
    expected /= np.linalg.norm(expected)
    assert np.allclose(own[rows, cols], expected[rows, cols]) and np.allclose(own, own.T)
    assert np.linalg.norm(own[rows, cols]) == pytest.approx(1.0)  # sensitivity 1 under add/remove one user
    assert np.all(np.diag(own) == 0)
    # A device's vector is the sum of its users' parts; a user without a pair adds nothing.
    vector = cooc_vector([seq, np.array([3, 2, 2]), np.array([9, 5] * 30)], items, window=2, gap_decay=0.5)
    parts = [np.linalg.norm(own_cooc_matrix(s, items, 2, 0.5)[rows, cols]) for s in
             (seq, np.array([3, 2, 2]), np.array([9, 5] * 30))]
    assert parts == pytest.approx([1.0, 0.0, 1.0])  # a long, repetitive history weighs no more than a short one
    assert vector == pytest.approx(own[rows, cols] + own_cooc_matrix(np.array([9, 5] * 30), items, 2, 0.5)[rows, cols])
    assert np.allclose(cooc_from_release(vector, 4)[rows, cols], vector)


def test_the_cooccurrence_items_are_the_top_of_the_released_popularity():
    released = np.array([100.0, 3.0, -1.0, 7.0, 7.0, 0.5])  # padding (index 0) never counts
    assert top_items(released, 3).tolist() == [3, 4, 1]


def test_the_cooccurrence_channel_has_the_same_range_whatever_the_population_size():
    """The release is a sum over users: 100 times the users gives (about) 100 times the matrix. The channel a
    device computes from it, and so its gradient and the weight the federation learns, must not change."""
    catalogue = _catalogue()
    items = np.arange(1, 21)
    released = cooc_from_release(np.random.default_rng(4).uniform(-1.0, 3.0, 190), 20)
    histories = [np.array([1, 2, 3, 4, 2, 5, 6, 30, 7]), np.array([9, 12, 40, 15])]
    _, small, _ = channel_features(catalogue, histories, items, released, 5, 0.8)
    for population_factor in (100_000 / 943, 1e-3):
        _, scaled, _ = channel_features(catalogue, histories, items, population_factor * released, 5, 0.8)
        assert torch.allclose(scaled, small, atol=1e-5)
    assert float(small[:, 0].abs().max()) > 0
    # bounded by the peak times the query weights, whatever N: the largest |entry| maps to COOC_PEAK
    assert float(small[:, 0].abs().max()) <= COOC_PEAK * sum(COOC_QUERY_DECAY ** np.arange(COOC_QUERY_ITEMS)) + 1e-5
    assert cooc_scale(released) * np.abs(released).max() == pytest.approx(COOC_PEAK)
    model = ChannelScorer(NUM_ITEMS, 20)
    model.cooc_items.copy_(torch.from_numpy(items.astype(np.float32)))
    lone = [np.array([25, 26, 3, 27, 28, 29, 31])]  # one released item: no pair, so no own part to remove
    assert not own_cooc_matrix(lone[0], items, 10).any()
    grads = []
    for matrix in (released, 1_000 * released):
        model.cooc.copy_(torch.from_numpy(matrix.astype(np.float32)))
        grads.append(channel_user_gradient(model, catalogue, lone, targets=3, profile_items=5, decay=0.8,
                                           window=10, gap_decay=0.9)["scales"])
    assert float(grads[0][1].abs()) > 0 and torch.allclose(grads[0], grads[1], atol=1e-5)  # the same update


def test_an_empty_cooccurrence_release_gives_a_zero_channel():
    catalogue = _catalogue()
    items = np.arange(1, 21)
    assert cooc_scale(np.zeros((20, 20))) == 0.0
    _, channels, _ = channel_features(catalogue, [np.array([1, 2, 3])], items, np.zeros((20, 20)), 5, 0.8)
    assert torch.isfinite(channels).all() and float(channels[:, 0].abs().max()) == 0.0


def test_a_device_removes_its_own_contribution_from_its_training_channels():
    catalogue = _catalogue()
    items = np.arange(1, 21)
    rng = np.random.default_rng(3)
    released = cooc_from_release(rng.normal(size=190), 20)
    seq = np.array([1, 2, 3, 4, 2, 5, 6, 30, 7])
    own = own_cooc_matrix(seq, items, 10)
    _, with_own, _ = channel_features(catalogue, [seq], items, released, 5, 0.8)
    _, without, _ = channel_features(catalogue, [seq], items, released - own, 5, 0.8)
    _, removed, mask = channel_features(catalogue, [seq], items, released, 5, 0.8, [own])
    # the rows lose the user's part; the scale stays the released matrix's (what every device computes)
    without[:, 0] *= cooc_scale(released) / cooc_scale(released - own)
    assert torch.allclose(removed, without, atol=1e-6) and not torch.allclose(removed, with_own)
    assert (mask[0, seq] < -1e3).all() and mask[0, 10] == 0  # the history is masked in training
    model = ChannelScorer(NUM_ITEMS, 20)
    model.cooc_items.copy_(torch.from_numpy(items.astype(np.float32)))
    model.cooc.copy_(torch.from_numpy(released.astype(np.float32)))
    grads = channel_user_gradient(model, catalogue, [seq], targets=3, profile_items=5, decay=0.8, window=10,
                                  gap_decay=0.9)
    assert set(grads) == {"content", "scales"} and grads["scales"].shape == (len(CHANNELS) + 1,)
    assert float(grads["scales"].abs().sum()) > 0


# ------------------------------------------------------------------- the accountant
@pytest.mark.parametrize("pop_z,cooc_z,z,q,rounds", [(5.0, 3.0, 3.5, 0.25, 10), (4.0, 2.0, 8.0, 1.0, 5),
                                                     (6.0, 3.5, 2.0, 0.1, 0)])
def test_the_three_releases_compose_as_dp_accounting_says(pop_z, cooc_z, z, q, rounds):
    events = [dpa.GaussianDpEvent(pop_z), dpa.GaussianDpEvent(cooc_z)]
    if rounds:
        events.append(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds))
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(dpa.ComposedDpEvent(events))
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dpa.ComposedDpEvent(events))
    ours = pipeline_epsilon(pop_z, z, q, rounds, 1e-5, "rdp", cooc_noise=cooc_z)
    assert ours == pytest.approx(rdp.get_epsilon(1e-5), rel=0.03)
    assert ours >= pld.get_epsilon(1e-5)  # RDP never claims less than the tight PLD figure
    # The co-occurrence release is counted: without it the figure is smaller.
    assert ours > pipeline_epsilon(pop_z, z, q, rounds, 1e-5, "rdp")


def test_the_default_pipeline_fits_its_budget_and_a_config_over_it_is_refused_naming_the_key():
    cfg = _channel_cfg()
    assert cfg["model"] == "channel-scorer"
    epsilon = check_pipeline_budget(cfg, 0.25)
    assert epsilon <= 2.0
    # the default (simulations/budget_allocation.py): 5 rounds, the 5 : 3 : 3.5 split x 0.92
    assert epsilon == pytest.approx(pipeline_epsilon(4.6, 3.22, 0.25, 5, 1e-5, "rdp", cooc_noise=2.76))
    assert epsilon > 1.99  # it spends the budget, it does not leave it unused
    with pytest.raises(PrivrecError) as err:
        check_pipeline_budget(_channel_cfg(**{"cooc-noise-multiplier": 1.0}), 0.25)
    message = str(err.value)
    assert message.startswith("config key 'target-epsilon' = 2: this run would reach user-level epsilon")
    assert "co-occurrence release z = 1" in message and "\n" not in message


@pytest.mark.parametrize("key,value,words", [
    ("cooc-noise-multiplier", 0.0, "config key 'cooc-noise-multiplier' = 0.0: must be > 0"),
    ("user-noise-multiplier", 0.0, "config key 'user-noise-multiplier' = 0.0: must be > 0"),
    ("user-clipping-norm", 0.0, "config key 'user-clipping-norm' = 0.0: must be > 0"),
    ("popularity-noise-multiplier", 0.0, "config key 'popularity-noise-multiplier' = 0.0: must be > 0"),
    ("user-dp", False, "config key 'user-dp' = False with model = channel-scorer"),
    ("cooc-items", 1, "config key 'cooc-items' = 1: must be >= 2"),
])
def test_an_unnoised_or_unclipped_channel_config_is_refused_naming_the_key(key, value, words):
    with pytest.raises(PrivrecError) as err:
        _channel_cfg(**{key: value})
    assert words in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ the pipeline, in process
def _run(tmp_path, store, name, **overrides):
    from client.app import app as client_app
    from server.app import FederatedRun
    from server.run_dir import RunDirectory
    from simulations.inprocess import InProcessGrid

    cfg = _channel_cfg(**{"data-store": str(store), "run-dir": str(tmp_path / "runs"), "run-name": name,
                          "population-dir": str(tmp_path / f"population-{name}"), "cooc-items": 30, **overrides})
    run_dir = RunDirectory.create(cfg["run-dir"], cfg["run-name"])
    grid = InProcessGrid(client_app, NUM_DEVICES, keep_messages=True, run_config=cfg)
    FederatedRun(cfg, run_dir, grid).execute()
    read = lambda f: json.loads((run_dir.path / f).read_text())  # noqa: E731
    return cfg, run_dir.path, grid, read("summary.json"), read("privacy.json")


def test_the_pipeline_releases_popularity_then_cooccurrence_then_rounds(tmp_path, digit_store, capsys):  # noqa: F811
    cfg, path, grid, summary, privacy = _run(tmp_path, digit_store, "channel",
                                             **{"num-rounds": 2, "fraction-train": 1.0, "target-epsilon": 0.0})
    kinds = [m.metadata.message_type for m in grid.delivered]
    assert kinds[:2 * NUM_DEVICES] == ["query.popularity"] * NUM_DEVICES + ["query.cooccurrence"] * NUM_DEVICES
    assert kinds.count("train") == 2 * NUM_DEVICES
    # The co-occurrence covers the top of the *released* popularity (post-processing), nothing else.
    histogram = json.loads((path / "popularity.json").read_text())["histogram"]
    cooc = json.loads((path / "cooccurrence.json").read_text())
    assert cooc["items"] == top_items(np.array(histogram), 30).tolist()
    # The release is the exact sum of the devices' clipped vectors plus N(0, z^2) on each of its 435 pairs.
    from shared.data.store import open_store

    store = open_store(digit_store)
    exact = sum(cooc_vector(store.device(d).train, np.array(cooc["items"]), cfg["cooc-window"])
                for d in range(NUM_DEVICES))
    noise = np.asarray(cooc["pairs"]) - exact
    assert len(noise) == 30 * 29 // 2 and abs(noise.mean()) < 0.5
    assert noise.std() == pytest.approx(2.76, rel=0.15)
    expected = pipeline_epsilon(4.6, 3.22, 1.0, 2, 1e-5, "rdp", cooc_noise=2.76)
    assert privacy["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert privacy["user-level"]["pipeline"]["history"] == [[4.6, 1.0, 1], [2.76, 1.0, 1], [3.22, 1.0, 2]]
    statement = privacy["statements"][0]
    assert "co-occurrence" in statement["sentence"] and "not against the server" in statement["sentence"]
    assert statement["relation"] == "add/remove one user" and statement["delta"] == 1e-5
    # What leaves a device in a round: the 9 weights only (not the released buffers it was sent), never its history.
    reply = next(m for m in grid.replies if m.content.array_records)
    assert set(reply.content.array_records["arrays"].keys()) == {"content", "scales"}
    ledger = json.loads(next((tmp_path / "population-channel").glob("*/privacy-ledger.json")).read_text())
    assert [r["kind"] for r in ledger["releases"]] == ["popularity-histogram", "cooccurrence-histogram"] + \
        ["channel-scorer-round"] * 2
    assert summary["federated-evaluation"]["test-ndcg@10"] is not None
    # The released buffers travel unchanged through the noised rounds (they are not trained or re-noised).
    state = torch.load(path / "model.pt", weights_only=True)
    assert np.allclose(state["cooc"].numpy(), cooc_from_release(np.asarray(cooc["pairs"]), 30), atol=1e-5)
    # `privrec recommend` ranks with the run's scorer.
    from tests.test_cli import run_cli

    code, out, err = run_cli(capsys, "recommend", "--model", path, "--history", "12 13 14", "-k", "5")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 5 and not {line.split()[1] for line in out.splitlines()} & {"12", "13"}
    # A channel scorer trained with the former fixed channel scale (no "cooc-channel" in model.json) is refused.
    arch = json.loads((path / "model.json").read_text())
    assert arch["cooc-channel"] == COOC_CHANNEL
    del arch["cooc-channel"]
    (path / "model.json").write_text(json.dumps(arch))
    code, out, err = run_cli(capsys, "recommend", "--model", path, "--history", "12 13 14", "-k", "5")
    assert code == 2 and "co-occurrence channel 'fixed 0.1'" in err and "Traceback" not in err


def test_a_trained_channel_scorer_beats_the_untrained_one(tmp_path, digit_store):  # noqa: F811
    # Little noise, no budget: this checks that the federated gradient steps learn, not the privacy.
    cfg, path, grid, summary, privacy = _run(
        tmp_path, digit_store, "learn", **{"num-rounds": 10, "user-noise-multiplier": 0.01, "target-epsilon": 0.0,
                                           "central-eval": True,
                                           "fraction-train": 1.0})
    assert summary["central-evaluation"]["test-ndcg@10"] > summary["central-evaluation-initial"]["test-ndcg@10"]


# ------------------------------------------------- a consenting cohort's SASRec as one more channel
def test_the_sasrec_channel_is_each_querys_standardised_next_item_scores():
    from shared.model import ModelConfig, SASRec
    from shared.scorer import sasrec_channel

    torch.manual_seed(0)
    sasrec = SASRec(ModelConfig(num_items=NUM_ITEMS, max_len=8, hidden_size=8, num_heads=2, num_blocks=1)).eval()
    histories = [np.array([1, 2, 3]), np.array([], dtype=np.int64), np.arange(1, 20)]
    channel = sasrec_channel(sasrec, histories, NUM_ITEMS + 1, batch=2)
    assert channel.shape == (3, NUM_ITEMS + 1) and (channel[:, 0] == 0).all()
    assert np.allclose(channel[:, 1:].mean(1), 0, atol=1e-5) and np.allclose(channel[:, 1:].std(1), 1, atol=1e-4)
    with torch.no_grad():  # the order of the items is the SASRec's own (on its last max-len items)
        raw = sasrec.predict_next(torch.tensor([[0, 0, 0, 0, 0, 1, 2, 3]]))[0, 1:].numpy()
    assert np.array_equal(np.argsort(channel[0, 1:]), np.argsort(raw))


def test_a_channel_scorer_with_a_sasrec_channel_trains_only_its_scales_and_needs_the_architecture_to_load():
    from shared.model import ModelConfig, SASRec
    from shared.scorer import SASREC, fedsgd_update

    catalogue = _catalogue()
    arch = ModelConfig(num_items=NUM_ITEMS, max_len=8, hidden_size=8, num_heads=2, num_blocks=1)
    model = ChannelScorer(NUM_ITEMS, 20, sasrec=SASRec(arch))
    model.cooc_items.copy_(torch.arange(1, 21, dtype=torch.float32))
    assert model.channels[-1] == SASREC and not model.sasrec.training
    assert not model.train().sasrec.training  # the frozen channel never runs its dropout
    grads = channel_user_gradient(model, catalogue, [np.array([1, 2, 3, 4, 5, 6])], targets=3, profile_items=5,
                                  decay=0.8, window=10, gap_decay=0.9)
    assert set(grads) == {"content", "scales"} and grads["scales"].shape == (len(CHANNELS) + 2,)
    assert float(grads["scales"][-1].abs()) > 0  # the SASRec channel's scale learns
    sent = fedsgd_update(model, grads)
    assert not any(k.startswith("sasrec.") for k in sent)  # the frozen SASRec is not sent back
    state = model.state_dict()
    assert any(k.startswith("sasrec.") for k in state)
    with pytest.raises(PrivrecError, match="no SASRec architecture"):
        ChannelScorer.from_state(state, NUM_ITEMS)
    with pytest.raises(PrivrecError, match="do not fit"):
        ChannelScorer.from_state(state, NUM_ITEMS, sasrec_config=ModelConfig(
            num_items=NUM_ITEMS, max_len=8, hidden_size=16, num_heads=2, num_blocks=1))
    again = ChannelScorer.from_state(state, NUM_ITEMS, sasrec_config=arch)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())


def test_only_the_channel_scorer_takes_a_consenting_cohort():
    assert _channel_cfg(**{"public-share": 0.1})["public-share"] == 0.1
    with pytest.raises(PrivrecError, match="'public-share' = 0.1 with model = content-scorer"):
        _channel_cfg(**{"public-share": 0.1, "model": "content-scorer"})


def test_a_consenting_cohorts_pretrained_sasrec_is_a_frozen_channel_the_private_rounds_weigh(
        tmp_path, digit_store, capsys):  # noqa: F811
    from server.pretraining import pretrain
    from shared.data.store import open_store
    from shared.model import ModelConfig

    cfg, path, grid, summary, privacy = _run(
        tmp_path, digit_store, "consent", **{"public-share": 0.25, "public-epochs": 2, "num-rounds": 2,
                                             "fraction-train": 1.0, "target-epsilon": 0.0, "hidden-size": 16,
                                             "num-heads": 2, "num-blocks": 1, "max-len": 10, "window": 10})
    pretraining = json.loads((path / "pretraining.json").read_text())
    assert pretraining["consenting-devices"] == 2
    assert 0 <= pretraining["pretraining-only"]["test-ndcg@10"] <= 1
    # The shipped SASRec is exactly the pretrained one: the noised rounds never changed it.
    store = open_store(digit_store)
    again, _ = pretrain(cfg, store, ModelConfig.from_run_config(cfg, NUM_ITEMS))
    state = torch.load(path / "model.pt", weights_only=True)
    for k, v in again.state_dict().items():
        assert torch.equal(state[f"sasrec.{k}"], v), k
    initial_scales = torch.tensor([1.0] + [0.0] * (len(CHANNELS) + 1))
    assert state["scales"].shape == initial_scales.shape and float(state["scales"][-1]) != 0.0  # trained
    # A device sends back the scorer's weights, never the SASRec.
    reply = next(m for m in grid.replies if m.content.array_records)
    assert not any(k.startswith("sasrec.") for k in reply.content.array_records["arrays"].keys())
    # The consenting devices send a zero update (their history trained the SASRec), and their ledgers hold no
    # round; every other device's ledger holds both rounds.
    from shared.consent import consenting_devices

    consenting = set(consenting_devices(cfg, NUM_DEVICES).tolist())
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("consenting-zero-updates") for r in rows if r["round"] > 0] == [2, 2]
    for d in range(NUM_DEVICES):
        ledger = json.loads(next((tmp_path / "population-consent").glob(f"*{d}*/privacy-ledger.json")).read_text())
        rounds = [r for r in ledger["releases"] if r["kind"] == "channel-scorer-round"]
        assert len(rounds) == (0 if d in consenting else 2), d
    # The statement names who the figure does not protect.
    sentence = privacy["statements"][0]["sentence"]
    assert "2 consenting users (public-share = 0.25) have no guarantee" in sentence
    assert privacy["user-level"]["pipeline"]["consenting-cohort"].startswith("2 consenting users")
    assert summary["federated-evaluation"]["test-ndcg@10"] is not None
    from tests.test_cli import run_cli

    code, out, err = run_cli(capsys, "recommend", "--model", path, "--history", "12 13 14", "-k", "5")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 5
    new = tmp_path / "new.jsonl"  # the SASRec channel knows items by their trained IDs only
    new.write_text('{"item": "n1", "title": "Brand New (2030)"}\n')
    code, out, err = run_cli(capsys, "recommend", "--model", path, "--history", "12 13 14", "--new-items", new)
    assert code == 2 and "SASRec channel" in err and "Traceback" not in err
    # `privrec report` says whom the user-level figure covers: not the consenting users.
    code, out, err = run_cli(capsys, "report", path)
    assert code == 0, err
    assert "for each of the 6 devices outside the consenting cohort (its 2 users'" in (path / "report.md").read_text()
