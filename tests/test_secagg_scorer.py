"""Secure aggregation in scorer mode (issue 13, item 2): the channel scorer's two analytics releases and its DP-FedSGD
rounds under SecAgg+, through the real ServerApp and ClientApp in process. Each device clips (rounds) and adds its
share of the noise, the server unmasks only sums of at least max(t, m_min) devices and adds nothing; the statement
names the server as covered; bad settings are refused naming the key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared import config
from shared.errors import PrivrecError
from shared.privacy.pipeline import pipeline_epsilon
from shared.secagg import VECTOR_KEY
from tests.test_scorer_pipeline import NUM_DEVICES, digit_store  # noqa: F401 - fixture

# m_min 4 for a round, 6 for an analytics release (every device joins those); clip range >= 1 + 6 x 3.22 / sqrt(4)
M_MIN, M_RELEASE, THRESHOLD, CLIP_RANGE, BITS = 4, 6, 3, 16.0, 20
SECURE = {"secure-aggregation": True, "secagg-min-cohort": M_MIN, "secagg-release-min-cohort": M_RELEASE,
          "secagg-threshold": THRESHOLD, "secagg-clip-range": CLIP_RANGE, "secagg-quantization-bits": BITS}


def _cfg(tmp_path, store, name, **overrides):
    return config.validate({**config.DEFAULT_PIPELINE, **SECURE, "data-store": str(store),
                            "run-dir": str(tmp_path / "runs"), "run-name": name, "cooc-items": 30,
                            "population-dir": str(tmp_path / f"population-{name}"), "num-rounds": 2,
                            "fraction-train": 1.0, "target-epsilon": 0.0, **overrides})


@pytest.fixture
def recorded(monkeypatch):
    """What each device masked (its clipped and noised contribution, before quantization, by node) and what
    the server unmasked, per secure sum."""
    import client.secagg
    import server.analytics
    import server.secagg
    from shared.secagg import DeviceSession

    sums: list[dict] = []
    pending: dict[str, np.ndarray] = {}
    quantize, mask, secure_sum = client.secagg.quantize_flat, DeviceSession.mask, server.secagg.secure_sum

    def quantize_flat(flat, params, rng=None):
        pending["flat"] = np.array(flat, dtype=np.float64)  # quantize_flat overwrites its input
        return quantize(flat, params, rng)

    def device_mask(self, vector, received):
        sums[-1]["contributions"][self.node] = pending.pop("flat")
        return mask(self, vector, received)

    def recorded_sum(grid, messages, params, timeout=None):
        sums.append({"type": messages[0].metadata.message_type, "contributions": {},
                     "nodes": [m.metadata.dst_node_id for m in messages]})
        result = secure_sum(grid, messages, params, timeout)
        sums[-1].update(total=np.concatenate([v.ravel() for v in result.total.values()]), devices=result.devices,
                        dropped=list(result.dropped))
        return result

    monkeypatch.setattr(client.secagg, "quantize_flat", quantize_flat)
    monkeypatch.setattr(DeviceSession, "mask", device_mask)
    monkeypatch.setattr(server.secagg, "secure_sum", recorded_sum)
    monkeypatch.setattr(server.analytics, "secure_sum", recorded_sum)
    return sums


def _run(cfg, grid):
    from server.app import FederatedRun
    from server.run_dir import RunDirectory

    run_dir = RunDirectory.create(cfg["run-dir"], cfg["run-name"])
    FederatedRun(cfg, run_dir, grid).execute()
    return run_dir.path


def test_channel_scorer_releases_and_rounds_under_secure_aggregation(tmp_path, digit_store, recorded):  # noqa: F811
    from client.analytics import SECURE_MECHANISM
    from client.app import app as client_app
    from client.scorer import SECURE_ROUND
    from shared.analytics import cooc_vector
    from shared.data.store import open_store
    from tests.test_secagg import DroppingGrid

    cfg = _cfg(tmp_path, digit_store, "secure")
    # Node 2 dies before its masked vector arrives (out of every sum, its noise share with it); node 5 after
    # sending it (its vector stays in: its self mask is rebuilt from its neighbours' shares).
    grid = DroppingGrid(client_app, NUM_DEVICES, drop={2: "upload", 5: "unmask"}, run_config=cfg)
    path = _run(cfg, grid)
    assert json.loads((path / "status.json").read_text())["state"] == "completed"

    # Two analytics sums, then one per round (q = 1: every device is sampled), each over the 7 survivors.
    assert [s["type"] for s in recorded] == ["query.popularity", "query.cooccurrence", "train", "train"]
    step = 2 * CLIP_RANGE / (2 ** BITS - 1)
    for s in recorded:
        survivors = [n for n in s["nodes"] if n not in s["dropped"]]
        assert s["dropped"] == [2] and s["devices"] == 7 and 5 in survivors
        # The server's sum is the sum of the survivors' clipped + noised contributions, up to the rounding.
        expected = sum(s["contributions"][n] for n in survivors)
        assert np.abs(s["total"] - expected).max() <= 7 * step
    popularity = json.loads((path / "popularity.json").read_text())
    cooc = json.loads((path / "cooccurrence.json").read_text())
    assert popularity["devices"] == 7 and popularity["failed"] == 1 and popularity["secure-aggregation"]
    assert np.allclose(popularity["histogram"][1:], recorded[0]["total"][1:]) and popularity["histogram"][0] == 0
    assert np.allclose(cooc["pairs"], recorded[1]["total"])
    # The released co-occurrence carries the devices' noise: 7 shares of variance 2.76^2 / 6 on each of 435 pairs
    # (the server adds none).
    store = open_store(digit_store)
    exact = sum(cooc_vector(store.device(p).train, np.array(cooc["items"]), cfg["cooc-window"])
                for p, node in enumerate(sorted(grid.contexts)) if node != 2)
    noise = np.asarray(cooc["pairs"]) - exact
    assert noise.std() == pytest.approx(2.76 * np.sqrt(7 / M_RELEASE), rel=0.15) and abs(noise.mean()) < 0.5
    # A round's contribution is clipped on the device: the clipped update has norm <= C = 1, and what it masks
    # is that plus N(0, (3.22 x 1)^2 / 4) on each of the 9 trained weights (the released buffers are not summed).
    assert all(c.shape == (9,) for c in recorded[2]["contributions"].values())

    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["secure-aggregation"] for r in rows[1:]] == [{"devices": 7, "dropped": 1}] * 2

    # The server never holds a device's vector in clear: every array a device sent is one masked uint32 vector,
    # and no reply's metrics carry a contribution.
    sent = [r for r in grid.replies if not r.has_error()]
    arrays = [(name, a) for r in sent for record in r.content.array_records.values() for name, a in record.items()]
    assert arrays and all(name == VECTOR_KEY and a.dtype == "uint32" for name, a in arrays)
    assert not any({"item-set", "pairs"} & set(m) for r in sent for m in r.content.metric_records.values())

    # The accounting: the one composed history, at the central noise multipliers (the shares add up to them),
    # and a statement that names the server as covered for every part.
    privacy = json.loads((path / "privacy.json").read_text())
    assert privacy["user-level"]["pipeline"]["history"] == [[4.6, 1.0, 1], [2.76, 1.0, 1], [3.22, 1.0, 2]]
    assert privacy["epsilon"] == pytest.approx(pipeline_epsilon(4.6, 3.22, 1.0, 2, 1e-5, "rdp", cooc_noise=2.76),
                                               rel=1e-12)
    record = privacy["user-level"]["pipeline"]
    assert record["secure-aggregation"] and set(record["adversary-by-part"]) == {
        "popularity release", "co-occurrence release", "DP-FedAvg rounds"}
    assert all("AND the honest-but-curious server" in a for a in record["adversary-by-part"].values())
    assert "m_min = 6 devices" in record["adversary-by-part"]["popularity release"]
    assert "m_min = 4 devices" in record["adversary-by-part"]["DP-FedAvg rounds"]
    assert "N(0, 4.6^2 / 6) per device" in record["mechanism"]
    assert "clipped on the device" in record["mechanism"] and "N(0, (3.22 x 1)^2 / 4)" in record["mechanism"]
    sentence = privacy["statements"][0]["sentence"]
    assert "against the honest-but-curious server" in sentence and "not against the server" not in sentence
    # Each device's ledger: both releases and both rounds, recorded as device-noised and masked.
    ledger = json.loads((tmp_path / "population-secure" / "device-0" / "privacy-ledger.json").read_text())
    assert [(r["kind"], r["noise_multiplier"], r["mechanism"]) for r in ledger["releases"]] == [
        ("popularity-histogram", 4.6, SECURE_MECHANISM), ("cooccurrence-histogram", 2.76, SECURE_MECHANISM),
        ("channel-scorer-round", 3.22, SECURE_ROUND), ("channel-scorer-round", 3.22, SECURE_ROUND)]
    # `privrec report` recomputes the figure from the recorded history with two accountants: no flag.
    from tools.cli import main

    assert main(["report", str(path)]) == 0


def test_a_release_from_fewer_than_the_minimum_cohort_is_refused_and_nothing_is_released(
        tmp_path, digit_store):  # noqa: F811
    from client.app import app as client_app
    from tests.test_secagg import DroppingGrid

    cfg = _cfg(tmp_path, digit_store, "few", **{"secagg-release-min-cohort": NUM_DEVICES})
    grid = DroppingGrid(client_app, NUM_DEVICES, drop={3: "upload"}, run_config=cfg)
    with pytest.raises(PrivrecError, match="popularity release under secure aggregation was refused"):
        _run(cfg, grid)
    assert not (tmp_path / "runs" / "few" / "popularity.json").exists()


def test_a_release_minimum_cohort_above_the_population_is_refused_naming_the_key(tmp_path, digit_store):  # noqa: F811
    from client.app import app as client_app
    from simulations.inprocess import InProcessGrid

    cfg = _cfg(tmp_path, digit_store, "many", **{"secagg-release-min-cohort": NUM_DEVICES + 1})
    grid = InProcessGrid(client_app, NUM_DEVICES, keep_messages=True, run_config=cfg)
    with pytest.raises(PrivrecError, match="config key 'secagg-release-min-cohort' = 9 is larger than the 8 devices"):
        _run(cfg, grid)
    assert not grid.delivered  # refused before any message


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, words", [
    ({"secagg-clip-range": 9.0}, "config key 'secagg-clip-range' = 9.0: must be at least 10.7581 (1 (a user's "
                                 "contribution) plus 6 std devs of a device's share of the "
                                 "'popularity-noise-multiplier' noise)"),
    ({"secagg-clip-range": 7.0, "popularity-noise-multiplier": 1.0}, "config key 'secagg-clip-range' = 7.0: must be "
                                                                     "at least 7.83"),  # the rounds' share
    ({"secagg-min-cohort": 65}, "config key 'secagg-min-cohort' = 65 is larger than the cohort of 64"),
    ({"secagg-quantization-bits": 27}, "config key 'secagg-quantization-bits' = 27"),
    ({"secagg-release-min-cohort": -1}, "config key 'secagg-release-min-cohort' = -1: must be >= 0"),
])
def test_bad_secure_aggregation_settings_in_scorer_mode_are_refused_naming_the_key(overrides, words):
    with pytest.raises(PrivrecError) as err:
        config.validate({**config.DEFAULT_PIPELINE, "secure-aggregation": True, "devices-per-round": 64,
                         "secagg-clip-range": 12.0, **overrides})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_larger_release_minimum_cohort_needs_a_narrower_clip_range():
    # Rounds: 1 + 6 x 3.22 / sqrt(8) = 7.83; popularity at m = 8: 1 + 6 x 4.6 / sqrt(8) = 10.8, at m = 100: 3.8.
    cfg = {**config.DEFAULT_PIPELINE, "secure-aggregation": True, "devices-per-round": 64, "secagg-clip-range": 8.5}
    assert config.validate({**cfg, "secagg-release-min-cohort": 100})["secagg-clip-range"] == 8.5
    with pytest.raises(PrivrecError, match="'popularity-noise-multiplier' noise"):
        config.validate(cfg)


def test_a_device_refuses_to_send_its_analytics_vector_in_clear_under_secure_aggregation(tmp_path,
                                                                                         digit_store):  # noqa: F811
    from client.app import app as client_app
    from server.analytics import federated_popularity
    from simulations.inprocess import InProcessGrid

    cfg = _cfg(tmp_path, digit_store, "clear")
    grid = InProcessGrid(client_app, NUM_DEVICES, keep_messages=True, run_config=cfg)
    with pytest.raises(PrivrecError, match="no device contributed"):  # a server that skips secure aggregation
        federated_popularity(grid, {"data-store": str(digit_store), "state-dir": str(tmp_path / "population")},
                             num_items=40, noise_multiplier=5.0, delta=1e-5, release_id="r",
                             rng=np.random.default_rng(0))
    assert all(r.has_error() and "does not send its vector in clear" in r.error.reason for r in grid.replies)
    assert not list((tmp_path / "population").glob("*/privacy-ledger.json"))  # nothing recorded, nothing sent


def test_the_private_baselines_refuse_secure_aggregation_naming_the_key(tmp_path):
    from simulations.private_baselines import run_private_baseline

    with pytest.raises(PrivrecError, match="config key 'secure-aggregation' = true: the private baselines"):
        run_private_baseline("popularity", {"secure-aggregation": True}, tmp_path / "no-store", epsilon=1.0,
                             delta=1e-5, seed=0)


def test_a_consenting_cohorts_sasrec_channel_is_never_summed_or_noised_under_secure_aggregation(
        tmp_path, digit_store, recorded):  # noqa: F811
    from client.app import app as client_app
    from server.pretraining import pretrain
    from shared.data.store import open_store
    from shared.model import ModelConfig
    from shared.scorer import CHANNELS
    from tests.test_secagg import DroppingGrid

    cfg = _cfg(tmp_path, digit_store, "consent", **{"public-share": 0.25, "public-epochs": 1, "hidden-size": 16,
                                                    "num-heads": 2, "num-blocks": 1, "max-len": 10, "window": 10})
    path = _run(cfg, DroppingGrid(client_app, NUM_DEVICES, drop={}, run_config=cfg))
    assert json.loads((path / "status.json").read_text())["state"] == "completed"
    rounds = [s for s in recorded if s["type"] == "train"]
    # each device masks only the scorer's content weight and its scales (9 channels + popularity), not the SASRec
    assert len(rounds) == 2 and all(len(s["total"]) == 1 + len(CHANNELS) + 2 for s in rounds)
    pretrained, _ = pretrain(cfg, open_store(digit_store), ModelConfig.from_run_config(cfg, 40))
    state = torch.load(path / "model.pt", weights_only=True)
    assert all(torch.equal(state[f"sasrec.{k}"], v) for k, v in pretrained.state_dict().items())
