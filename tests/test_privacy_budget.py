"""Device ledgers under crashes, per-device caps, user-level DP noise and calibration."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from opacus.accountants import PRVAccountant, RDPAccountant

import client.device as device_module
from client.app import app as client_app
from client.device import plan_round, train_round
from server.app import FederatedRun
from server.cohort import CohortView
from server.run_dir import RunDirectory
from server.strategy import build_strategy
from server.user_dp import ServerSideClipping, UserLevelDP
from shared import config
from shared.data.store import open_store
from shared.errors import PrivrecError
from shared.model import ModelConfig, SASRec
from shared.privacy.calibration import calibrate_noise, check_calibration
from shared.privacy.ledger import PrivacyLedger, load_ledger
from shared.privacy.user_level import clip_update, noisy_mean_update, poisson_cohort, user_level_epsilon
from simulations.inprocess import InProcessGrid, set_identity
from tests.synthetic import walk_store
from tools.cli import main as cli_main

NUM_ITEMS = 30
SMALL = {"max-len": 16, "window": 6, "hidden-size": 16, "num-heads": 2, "num-blocks": 1, "dropout": 0.0,
         "local-epochs": 2, "local-lr": 0.01, "batch-size": 2, "noise-multiplier": 0.8}


@pytest.fixture()
def device(tmp_path):
    store = open_store(walk_store(tmp_path / "store", num_users=4, num_items=NUM_ITEMS))
    cfg = config.validate({**SMALL, "deterministic-devices": True})
    state = SASRec(ModelConfig.from_run_config(cfg, NUM_ITEMS)).state_dict()
    return store.device(0), cfg, state, tmp_path / "ledger.json"


def _train(device, round_, **cfg_overrides):
    data, cfg, state, path = device
    return train_round(data, NUM_ITEMS, state, {**cfg, **cfg_overrides}, ledger_path=path, device="0",
                       run_id="r", server_round=round_)


def _continuous_epsilon(history, delta, accountant=RDPAccountant):
    acc = accountant()
    acc.history = [tuple(h) for h in history]
    return acc.get_epsilon(delta)


# ----------------------------------------------------------------------------- ledger crash safety
def test_crash_between_reserve_and_release_still_counts_the_round(device, monkeypatch):
    data, cfg, state, path = device

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while training: the update never left

    monkeypatch.setattr(device_module, "train_local", crash)
    with pytest.raises(KeyboardInterrupt):
        _train(device, 1)
    after_crash = load_ledger(path, "0")
    assert [r["status"] for r in after_crash.rounds] == ["reserved"]
    assert after_crash.epsilon > 0  # reserved spend is spend: over-reporting, never under-reporting
    monkeypatch.undo()

    outcome = _train(device, 2)
    ledger = load_ledger(path, "0")
    assert [r["status"] for r in ledger.rounds] == ["reserved", "released"]
    steps = sum(r["steps"] for r in ledger.rounds)
    q = ledger.rounds[0]["sample_rate"]
    expected = _continuous_epsilon([(cfg["noise-multiplier"], q, steps)], cfg["delta"])
    # Both rounds' steps compose as one continuous accountant would; the reply states the same figure.
    assert outcome.metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert ledger.epsilon == pytest.approx(expected, rel=1e-9)
    assert ledger.epsilon > after_crash.epsilon


def test_epsilon_never_decreases_and_matches_one_accountant(device):
    _, cfg, _, path = device
    reported = [_train(device, r).metrics["epsilon"] for r in range(1, 5)]
    assert reported == sorted(reported) and len(set(reported)) == 4
    ledger = load_ledger(path, "0")
    for accountant, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        continuous = _continuous_epsilon(ledger.accountant_state["history"], cfg["delta"], cls)
        if accountant == "rdp":
            assert reported[-1] == pytest.approx(continuous, rel=1e-9)
        else:  # a second accountant: tighter than RDP, same order of magnitude
            assert 0 < continuous <= reported[-1]


def test_corrupt_ledger_stops_the_device(device):
    _train(device, 1)
    path = device[3]
    path.write_text(path.read_text()[:-20])  # truncated by a broken disk
    with pytest.raises(PrivrecError, match="unreadable.*refusing to train"):
        _train(device, 2)
    path.write_text(json.dumps({"format": 1, "device": "0", "accountant_state": {"history": 5}, "rounds": []}))
    with pytest.raises(PrivrecError, match="unreadable"):
        _train(device, 2)


def test_missing_ledger_starts_a_new_record(device):
    path = device[3]
    assert not path.exists()
    first = _train(device, 1).metrics["epsilon"]
    assert load_ledger(path, "0").epsilon == first > 0


# ---------------------------------------------------------------------------------- budget caps
def test_device_at_its_cap_declines_and_stays_declined(device):
    data, cfg, state, path = device
    one_round = _train(device, 1).metrics["epsilon"]
    _, two_rounds, _ = plan_round(load_ledger(path, "0"), cfg)
    cap = (one_round + two_rounds) / 2  # a second round would pass it
    declined = _train(device, 2, **{"max-epsilon": cap})
    assert declined.declined and declined.metrics["declined"] == 1
    assert declined.metrics["would-be-epsilon"] > cap >= declined.metrics["epsilon"] == pytest.approx(one_round)
    ledger = load_ledger(path, "0")
    assert ledger.declined["cap"] == cap and len(ledger.rounds) == 1  # nothing more was spent
    # A later run with a higher cap (or none) uses the same ledger: the device still declines.
    again = _train(device, 1, **{"max-epsilon": 0.0})
    assert again.declined and len(load_ledger(path, "0").rounds) == 1


def _federation(tmp_path, num_devices=6, **overrides):
    store = walk_store(tmp_path / "store", num_users=num_devices, num_items=NUM_ITEMS)
    cfg = config.validate({**SMALL, "data-store": str(store), "num-rounds": 6, "devices-per-round": 3,
                           "eval-every": 0, "run-dir": str(tmp_path / "runs"), "run-name": "t",
                           "deterministic-devices": True, "fraction-evaluate": 0.5, **overrides})
    run_dir = RunDirectory.create(cfg["run-dir"], cfg["run-name"])
    grid = InProcessGrid(client_app, num_devices, keep_messages=True, run_config=cfg)
    FederatedRun(cfg, run_dir, grid).execute()
    rows = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir.path / "summary.json").read_text())
    privacy = json.loads((run_dir.path / "privacy.json").read_text())
    return cfg, run_dir.path, grid, rows, summary, privacy


def test_server_counts_declines_and_stops_cleanly_when_too_few_devices_remain(tmp_path):
    # A cap between two and three rounds' spend of a typical device (4 windows): it trains twice.
    cfg = config.validate({**SMALL, "noise-multiplier": 2.0})
    ledger, spend = PrivacyLedger("x"), []
    for _ in range(3):
        ledger.accountant_state, eps, _ = plan_round(ledger, cfg)
        spend.append(eps)
    cap = (spend[1] + spend[2]) / 2
    cfg, path, grid, rows, summary, privacy = _federation(
        tmp_path, **{"num-rounds": 40, "max-epsilon": cap, "noise-multiplier": 2.0})
    assert json.loads((path / "status.json").read_text())["state"] == "completed"
    stopped = summary["stopped-early"]
    assert "privacy cap" in stopped["reason"] and stopped["after-round"] < 40
    assert rows[-1]["capped-devices"] >= 4  # fewer than 3 of 6 devices left
    assert sum(r["declined"] for r in rows) == rows[-1]["capped-devices"]  # each device declines once
    # No ledger ever passes the cap, and a device that declined was never asked to train again.
    ledger_files = list((tmp_path / "store.population").glob("*/privacy-ledger.json"))  # the devices' own
    assert len(ledger_files) == 6
    for ledger_file in ledger_files:
        ledger = json.loads(ledger_file.read_text())
        assert ledger["rounds"][-1]["epsilon"] <= cfg["max-epsilon"]
    declined_nodes = {}
    for msg in grid.replies:
        metrics = next(iter(msg.content.metric_records.values()))
        node = msg.metadata.src_node_id
        if metrics.get("declined"):
            assert node not in declined_nodes
            declined_nodes[node] = True
        elif "steps" in metrics:
            assert node not in declined_nodes, "a capped device was asked to train again"
    assert summary["privacy"]["capped-devices"] == len(declined_nodes)
    # Every DP round costs every device the same, so which devices decline depends only on how
    # often they were drawn; each one that declined is on record.
    assert sum(d["declined-round"] is not None for d in privacy["devices"].values()) == len(declined_nodes)


# ------------------------------------------------------------------------------- user-level DP
def test_user_level_noise_has_the_configured_std_whatever_the_number_of_replies():
    rng = np.random.default_rng(7)
    shapes = {"w": (200, 100), "b": (100,)}
    z, clip, expected_cohort = 1.3, 0.5, 8.0
    for replies in (0, 3):
        zeros = [{k: np.zeros(s) for k, s in shapes.items()} for _ in range(replies)]
        mean = noisy_mean_update(zeros, list(shapes), shapes, z * clip, expected_cohort, rng)
        noise = np.concatenate([mean[k].ravel() for k in shapes])
        # 20,100 draws: the sample std is within 2% of z * C / m with overwhelming probability.
        assert np.std(noise) == pytest.approx(z * clip / expected_cohort, rel=0.02)
        assert abs(np.mean(noise)) < 3 * z * clip / expected_cohort / np.sqrt(noise.size)


def test_clipping_bounds_each_update_and_keeps_small_ones():
    big = {"a": np.full(4, 3.0), "b": np.full(5, 4.0)}
    clipped, norm = clip_update(big, 0.5)
    assert norm == pytest.approx(np.sqrt(4 * 9 + 5 * 16))
    assert np.sqrt(sum(np.sum(v ** 2) for v in clipped.values())) == pytest.approx(0.5)
    small = {"a": np.full(4, 0.01)}
    assert np.array_equal(clip_update(small, 0.5)[0]["a"], small["a"])


def test_poisson_cohort_rate():
    rng = random.Random(3)
    sizes = [len(poisson_cohort(list(range(1000)), 0.1, rng)) for _ in range(50)]
    assert 95 < np.mean(sizes) < 105 and len(set(sizes)) > 5  # random size, right expectation


def test_a_secret_poisson_cohort_reads_os_entropy_in_one_call(monkeypatch):
    """With `random.SystemRandom` the draws come from one read of OS entropy: node i joins when its 8 bytes,
    as a 53-bit uniform (what `SystemRandom.random` makes of its own read), fall below the rate."""
    import os

    import shared.privacy.user_level as user_level

    nodes = list(range(100, 108))
    picked_below = [0, 3, 7]
    uniforms = [0.05 if i in picked_below else 0.1 + i / 10 for i in range(len(nodes))]
    # the 53 bits on top of each 8 bytes (the low 11 are dropped)
    entropy = (np.array([int(u * 2 ** 53) for u in uniforms], dtype="<u8") << np.uint64(11)).tobytes()
    reads = []

    def urandom(size):
        reads.append(size)
        return entropy

    monkeypatch.setattr(os, "urandom", urandom)
    assert user_level.poisson_cohort(nodes, 0.1, random.SystemRandom()) == [nodes[i] for i in picked_below]
    assert reads == [8 * len(nodes)]


def test_a_secret_poisson_cohort_has_the_rate_and_independence():
    rng = random.SystemRandom()
    nodes = list(range(2000))
    draws = [set(poisson_cohort(nodes, 0.1, rng)) for _ in range(200)]
    sizes = [len(d) for d in draws]
    assert abs(np.mean(sizes) - 200) < 5 * np.sqrt(200 * 0.9 / 200)  # mean of 200 Binomial(2000, 0.1)
    joined = np.array([sum(n in d for d in draws) for n in nodes])  # Binomial(200, 0.1) per node
    assert abs(joined.mean() - 20) < 0.5 and 3.0 < joined.std() < 5.5  # sd sqrt(18) = 4.2
    pair = sum(0 in d and 1 in d for d in draws)  # two nodes together: 200 x 0.01 expected
    assert pair < 10


def test_strategy_aggregates_clipped_noised_mean_with_a_fixed_denominator(tmp_path):
    cfg = config.validate({**SMALL, "user-dp": True, "user-noise-multiplier": 1.0, "user-clipping-norm": 0.1,
                           "devices-per-round": 4})
    set_identity()  # the server builds Messages (as in a ServerApp process)
    summation = ServerSideClipping()
    strategy = UserLevelDP(FedAvg(min_train_nodes=0, min_available_nodes=0),
                           noise_multiplier=cfg["user-noise-multiplier"], clipping_norm=cfg["user-clipping-norm"],
                           expected_cohort=4.0, summation=summation, rng=np.random.default_rng(0))
    model = SASRec(ModelConfig.from_run_config(cfg, NUM_ITEMS))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    strategy.configure_train(1, ArrayRecord(global_state), ConfigRecord(), CohortView(None, []))
    replies = []
    for _ in range(2):  # two of an expected four replied; both moved every weight by +1 (huge)
        moved = {k: v + 1.0 for k, v in global_state.items()}
        content = RecordDict({"arrays": ArrayRecord(moved), "metrics": MetricRecord(
            {"num-examples": 3, "train-loss": 1.0, "steps": 2, "sample-rate": 1.0})})
        msg = Message(content, dst_node_id=0, message_type="train")
        replies.append(msg)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert summation.last_norms and all(n > 10 for n in summation.last_norms)
    new = arrays.to_torch_state_dict()
    delta = torch.cat([(new[k] - global_state[k]).ravel() for k in new]).double().numpy()
    dim = delta.size
    # Expected: 2 clipped updates (norm 0.1 each, every coordinate equal) / 4, plus N(0, (1.0*0.1/4)^2).
    signal = 2 * 0.1 / np.sqrt(dim) / 4
    assert np.mean(delta) == pytest.approx(signal, abs=4 * 0.025 / np.sqrt(dim))
    assert np.std(delta) == pytest.approx(1.0 * 0.1 / 4, rel=0.03)


def test_user_level_run_accounts_every_round(tmp_path):
    cfg, path, _, rows, summary, privacy = _federation(
        tmp_path, **{"user-dp": True, "dp": False, "num-rounds": 4, "user-noise-multiplier": 1.0})
    q = 3 / 6
    eps = [r["user-level-epsilon"] for r in rows[1:]]
    assert eps == sorted(eps) and len(set(eps)) == 4
    expected = _continuous_epsilon([(1.0, q, 4)], cfg["delta"])
    assert eps[-1] == pytest.approx(expected, rel=1e-9)
    assert privacy["user-level"]["history"] == [[1.0, q, 4]]
    assert summary["privacy"]["user-level"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    sentence = privacy["statements"][0]["sentence"]
    assert "User-level" in sentence and f"{expected:.3g}" in sentence and "not against the server" in sentence


def test_user_level_matches_the_accountant():
    assert user_level_epsilon(1.1, 0.05, 100, 1e-5, "rdp") == pytest.approx(
        _continuous_epsilon([(1.1, 0.05, 100)], 1e-5), rel=1e-12)


# -------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("q, steps, accountant", [(1.0, 3, "rdp"), (0.07, 40, "rdp"), (0.07, 40, "prv")])
def test_calibration_reaches_the_target(q, steps, accountant):
    sigma = calibrate_noise(8.0, 1e-5, q, steps, accountant)
    reached = check_calibration(sigma, 8.0, 1e-5, q, steps, accountant)
    assert 7.8 < reached <= 8.0
    assert check_calibration(sigma * 0.95, 8.0, 1e-5, q, steps, accountant) > 8.0  # not over-noised


def test_calibrate_cli(capsys):
    assert cli_main(["calibrate", "--target-epsilon", "4", "--sample-rate", "1", "--rounds", "2"]) == 0
    assert "noise multiplier" in capsys.readouterr().out
    assert cli_main(["calibrate", "--target-epsilon", "-1", "--sample-rate", "1", "--rounds", "2"]) == 2
    assert "target_epsilon=-1.0" in capsys.readouterr().err


def test_sweep_arms_are_calibrated_to_their_budget():
    from shared.privacy.user_level import user_level_epsilon as user_eps
    from simulations.privacy_sweep import arm_settings

    cfg = config.validate({"local-epochs": 1, "devices-per-round": 64})
    both = arm_settings("both", 4.0, cfg, num_devices=943, rounds=30, joins=4)
    assert both["dp"] and both["user-dp"] and both["max-epsilon"] == 4.0  # the cap makes the target a bound
    device_eps = check_calibration(both["noise-multiplier"], 4.0, cfg["delta"], 1.0, 4)
    assert 3.8 < device_eps <= 4.0 + 1e-3  # a typical device can join 4 rounds
    assert 3.8 < user_eps(both["user-noise-multiplier"], 64 / 943, 30, cfg["delta"], "rdp") <= 4.0 + 1e-3
    assert not arm_settings("user-level", 4.0, cfg, 943, 30, 4)["dp"]
    assert not arm_settings("on-device", 4.0, cfg, 943, 30, 4)["user-dp"]


def test_checkpoint_keeps_the_privacy_tally(tmp_path):
    """A resumed server still knows which devices reached their cap and what each one reported."""
    from server.checkpoint import load_checkpoint, restore_strategy, save_checkpoint
    from shared.privacy.device_journal import JOURNAL, DeviceJournal

    cfg = config.validate({**SMALL, "max-epsilon": 5.0})
    fresh = lambda: build_strategy(cfg, num_devices=6, on_train=lambda *a: None,  # noqa: E731
                                   on_evaluate=lambda *a: None)
    before = fresh()  # keyed by device id: Flower node ids change with every launch
    before.privacy.epsilon_by_device.update({"3": 4.2, "2": 4.9})
    before.privacy.capped["2"] = 4
    before.privacy.records["2"] = {"accountant": "rdp", "history": [[0.8, 0.5, 4]],
                                   "rounds": [[2, 4.9]], "epsilon": 4.9, "declined-round": 4}
    before.privacy.records["3"] = {"accountant": "rdp", "history": [[0.8, 0.5, 2]],
                                   "rounds": [[1, 4.2]], "epsilon": 4.2, "declined-round": None}
    before.privacy.node_devices[7] = "2"
    state = SASRec(ModelConfig.from_run_config(cfg, NUM_ITEMS)).state_dict()
    journal = DeviceJournal(tmp_path / JOURNAL)  # the tally lives in the run's journal of device records
    journal.start()
    journal.append(4, {"2": 7, "3": None}, before.privacy.records, before.privacy.epsilon_by_device)
    save_checkpoint(tmp_path, 4, state, before, cfg, journal_bytes=journal.size)
    after = fresh()
    restore_strategy(after, load_checkpoint(tmp_path, cfg))
    assert after.privacy.capped == {"2": 4} and after.round_offset == 4
    assert after.privacy.records == before.privacy.records
    assert after.privacy.epsilon_by_device == {"3": 4.2, "2": 4.9}
    assert after.privacy.node_devices == {7: "2"} and after.privacy.is_capped(7)
    with pytest.raises(PrivrecError, match="user-noise-multiplier"):
        load_checkpoint(tmp_path, {**cfg, "user-noise-multiplier": 2.0})
