"""Private baselines (issue 13, item 1): the DP popularity release as federated analytics, and content."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from client.app import app as client_app
from server.analytics import federated_popularity
from shared.analytics import (
    check_release_request,
    content_scores,
    item_set_vector,
    noise_for_epsilon,
    noisy_sum,
    release_epsilon,
)
from shared.config import resolve
from shared.data.store import open_store
from shared.errors import PrivrecError
from simulations.inprocess import InProcessGrid
from simulations.private_baselines import run_private_baseline
from tests.synthetic import walk_store
from tools.cli import main

DELTA = 1e-5


def _dp_accounting_epsilon(z: float, delta: float, accountant: str) -> float:
    import dp_accounting as dpa
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant() if accountant == "rdp" else pld_privacy_accountant.PLDAccountant()
    acc.compose(dpa.GaussianDpEvent(z))
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
def test_calibrated_noise_reaches_the_epsilon_by_dp_accounting(epsilon):
    z = noise_for_epsilon(epsilon, DELTA)
    by_dp_accounting = _dp_accounting_epsilon(z, DELTA, "rdp")
    assert by_dp_accounting <= epsilon * 1.01  # the calibrated release stays within budget
    assert by_dp_accounting >= epsilon * 0.9  # and is not grossly over-noised
    reported = release_epsilon(z, DELTA)
    assert reported["rdp"] == pytest.approx(by_dp_accounting, rel=0.02)
    assert reported["pld"] == pytest.approx(_dp_accounting_epsilon(z, DELTA, "pld"), rel=1e-6)
    assert reported["pld"] <= reported["rdp"]


def test_noise_std_matches_the_calibration():
    z = noise_for_epsilon(1.0, DELTA)
    released = noisy_sum(np.zeros(200_001), z, np.random.default_rng(0))
    assert released[0] == 0.0
    assert np.std(released[1:]) == pytest.approx(z, rel=0.01)


def _cfg(tmp_path, store):
    return resolve(None, {"data-store": str(store), "population-dir": str(tmp_path / "population")})


def _device_config(tmp_path, store):
    return {"data-store": str(store), "state-dir": str(tmp_path / "population")}


def test_each_device_sends_a_unit_norm_vector_and_the_release_carries_the_calibrated_noise(tmp_path):
    store = walk_store(tmp_path / "store", num_users=30, num_items=3000)
    grid = InProcessGrid(client_app, open_store(store).num_devices, keep_messages=True,
                         run_config=_cfg(tmp_path, store))
    z = noise_for_epsilon(1.0, DELTA)
    release = federated_popularity(grid, _device_config(tmp_path, store), num_items=3000, noise_multiplier=z,
                                   delta=DELTA, release_id="t", rng=np.random.default_rng(1))
    norms = [np.linalg.norm(r.content.metric_records["metrics"]["item-set"]) for r in grid.replies]
    assert len(norms) == 30 and np.allclose(norms, 1.0)
    assert release.devices == 30 and release.declined == release.failed == 0
    users = open_store(store).all_users()
    exact = item_set_vector(users.train, 3000)
    assert np.std((release.histogram - exact)[1:]) == pytest.approx(z, rel=0.05)


def test_the_device_ledger_records_each_release_and_declines_past_its_cap(tmp_path):
    store = walk_store(tmp_path / "store", num_users=4, num_items=20)
    z = noise_for_epsilon(1.0, DELTA)
    cfg = {**_cfg(tmp_path, store), "max-epsilon": 1.2}
    devices = _device_config(tmp_path, store)
    first = federated_popularity(InProcessGrid(client_app, 4, run_config=cfg), devices, num_items=20,
                                 noise_multiplier=z, delta=DELTA, release_id="a", rng=np.random.default_rng(0))
    ledger = json.loads((tmp_path / "population" / "device-0" / "privacy-ledger.json").read_text())
    assert first.devices == 4
    assert [r["release"] for r in ledger["releases"]] == ["a"]
    assert ledger["releases"][0]["unit"] == "user" and ledger["releases"][0]["noise_multiplier"] == z
    # A second release at the same noise would compose past max-epsilon 1.2: every device declines.
    with pytest.raises(PrivrecError, match="no device contributed"):
        federated_popularity(InProcessGrid(client_app, 4, run_config=cfg), devices, num_items=20,
                             noise_multiplier=z, delta=DELTA, release_id="b", rng=np.random.default_rng(0))
    ledger = json.loads((tmp_path / "population" / "device-0" / "privacy-ledger.json").read_text())
    assert [r["release"] for r in ledger["releases"]] == ["a"]


def _circular_text(num_items: int) -> np.ndarray:
    """A fake public text table where item i is close to items i +- 1 (the walk's next item)."""
    angle = 2 * np.pi * np.arange(num_items + 1) / num_items
    text = np.stack([np.cos(angle), np.sin(angle), np.cos(2 * angle), np.sin(2 * angle)], axis=1)
    text[0] = 0.0
    return text


def test_content_beats_popularity_at_the_same_epsilon(tmp_path):
    store = walk_store(tmp_path / "store", num_users=60, num_items=40)
    cfg = _cfg(tmp_path, store)
    popularity = run_private_baseline("popularity", cfg, store, epsilon=1.0, delta=DELTA, seed=0)
    content = run_private_baseline("content", cfg, store, epsilon=1.0, delta=DELTA, seed=0,
                                   text=_circular_text(40))
    assert content["privacy"]["epsilon"] == popularity["privacy"]["epsilon"] <= 1.0
    assert content["test"]["ndcg@10"] > popularity["test"]["ndcg@10"] + 0.1


def test_content_scores_use_only_the_release_text_and_own_history():
    text = _circular_text(10)
    released = np.zeros(11)
    scores = content_scores(np.array([3, 4, 5]), released, text)
    assert np.argmax(scores[1:]) + 1 in (4, 5, 6)  # nearest to the newest items


def test_cli_prints_figures_and_the_full_statement(tmp_path, capsys):
    store = walk_store(tmp_path / "store", num_users=8, num_items=20)
    code = main(["baseline", "popularity", "--epsilon", "2", "--set", f"data-store={store}",
                 "--set", f"population-dir={tmp_path / 'population'}", "--out", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "NDCG@10" in out and "HR@10" in out
    for needle in ("user-level epsilon", "delta 1e-05", "one user's whole history", "add/remove one user",
                   "Gaussian on the sum", "rdp", "NOT the server"):
        assert needle in out
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["privacy"]["epsilon"] <= 2.0 and written["devices"] == 8


@pytest.mark.parametrize("argv,needle", [
    (["--epsilon", "0"], "--epsilon 0"), (["--epsilon", "-1"], "--epsilon -1"),
    (["--epsilon", "nan"], "--epsilon nan"), (["--epsilon", "inf"], "--epsilon inf"),
    (["--epsilon", "1", "--delta", "0"], "--delta 0"), (["--epsilon", "1", "--delta", "1.5"], "--delta 1.5"),
    ([], "needs --epsilon"),
])
def test_bad_budget_is_refused_in_one_line_before_any_work(tmp_path, capsys, argv, needle):
    code = main(["baseline", "content", *argv, "--set", f"data-store={tmp_path / 'absent'}"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_check_release_request_accepts_a_valid_budget():
    check_release_request(1.0, 1e-5)
    assert math.isfinite(noise_for_epsilon(8.0, 1e-5))
