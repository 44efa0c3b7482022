"""simulations/budget_allocation.py: every candidate is calibrated to the same epsilon (checked against dp-accounting),
the grid is the one stated, and the adoption rule is the stated one."""

from __future__ import annotations

import math

import dp_accounting as dpa
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from shared import config
from simulations import budget_allocation as ba


def _dp_accounting_rdp(z: dict, q: float, rounds: int) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dpa.ComposedDpEvent([
        dpa.GaussianDpEvent(z["popularity"]), dpa.GaussianDpEvent(z["cooc"]),
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z["rounds"])), rounds)]))
    return float(accountant.get_epsilon(1e-5))


def test_the_reference_is_the_former_default_and_the_shipped_default_is_the_studys_choice():
    product = config.resolve_run()  # what `privrec simulate` runs with no options
    d = ba.DEFAULT  # the default the study started from: 10 rounds, 5 : 3 : 3.5, calibrated to epsilon 2
    assert (d.rounds, d.fraction, d.split, d.server_lr, d.fixed) == (10, 0.25, (5.0, 3.0, 3.5), 0.5, False)
    shipped = ba.shipped()
    assert shipped.fixed and shipped.split == (product["popularity-noise-multiplier"],
                                               product["cooc-noise-multiplier"], product["user-noise-multiplier"])
    assert (shipped.rounds, shipped.fraction, shipped.server_lr) == (product["num-rounds"], product["fraction-train"],
                                                                     product["server-lr"])
    # the study's choice (stage 3: 5 rounds, the 5 : 3 : 3.5 split, lr 0.5) rounded up to two decimals
    chosen = ba.calibrate(ba.Candidate(5, 0.25, ba.DEFAULT_SPLIT, 0.5))["z"]
    assert shipped.split == tuple(math.ceil(chosen[k] * 100) / 100 for k in ("popularity", "cooc", "rounds"))
    row = ba.calibrate(shipped)
    assert row["factor"] == 1.0 and 1.99 < row["epsilon"]["opacus-rdp"] <= ba.EPSILON
    assert _dp_accounting_rdp(row["z"], row["q"], shipped.rounds) == pytest.approx(row["epsilon"]["opacus-rdp"],
                                                                                   rel=1e-3)


def test_the_grid_is_the_stated_one_and_names_round_trip():
    assert len(ba.STAGE_ROUNDS_Q) == 12 and len(ba.STAGE_SPLITS) == 9 and len(ba.STAGE_LRS) == 3
    assert (ba.DEFAULT.rounds, ba.DEFAULT.fraction) in ba.STAGE_ROUNDS_Q and ba.DEFAULT.split in ba.STAGE_SPLITS
    for cand in (ba.DEFAULT, ba.Candidate(40, 1.0, (3.0, 1.8, 3.5), 0.25), ba.shipped()):
        assert ba.from_name(cand.name) == cand
    assert ba.Candidate(20, 0.25, ba.DEFAULT_SPLIT, 0.5).eligible
    assert not ba.Candidate(20, 0.5, ba.DEFAULT_SPLIT, 0.5).eligible


@pytest.mark.parametrize("cand", [ba.Candidate(5, 1.0, (3.0, 4.8, 3.5), 0.5),
                                  ba.Candidate(10, 0.25, (8.0, 1.8, 3.5), 1.0)])
def test_every_candidate_is_calibrated_to_epsilon_2_at_the_products_rate_and_dp_accounting_agrees(cand):
    row = ba.calibrate(cand)
    q = round(cand.fraction * ba.USERS) / ba.USERS  # the ServerApp's rate at N = 943
    assert row["q"] == pytest.approx(q)
    z = row["z"]
    # the candidate's ratio, one common factor
    assert (z["popularity"] / z["rounds"], z["cooc"] / z["rounds"]) == pytest.approx(
        (cand.split[0] / cand.split[2], cand.split[1] / cand.split[2]))
    assert row["epsilon"]["opacus-rdp"] <= ba.EPSILON
    assert _dp_accounting_rdp(z, q, cand.rounds) == pytest.approx(row["epsilon"]["opacus-rdp"], rel=1e-3)
    # the smallest factor: 0.2% less noise goes over the budget
    smaller = {k: v * 0.998 for k, v in z.items()}
    assert _dp_accounting_rdp(smaller, q, cand.rounds) > ba.EPSILON


def _runs(default: list[float], other: list[float], cand: ba.Candidate) -> dict:
    return {"runs": {n: {str(s): {"valid": {"ndcg@10": v}} for s, v in enumerate(vals)}
                     for n, vals in ((ba.DEFAULT.name, default), (cand.name, other))}}


def test_adoption_needs_a_mean_gain_above_the_defaults_seed_noise_and_a_gain_on_every_seed():
    cand = ba.Candidate(5, 0.5, ba.DEFAULT_SPLIT, 0.5)
    default = [0.070, 0.075, 0.070]  # sample std 0.00289
    assert ba.verdict(cand, _runs(default, [0.075, 0.080, 0.075], cand), (0, 1, 2))["adopt"]
    assert not ba.verdict(cand, _runs(default, [0.072, 0.077, 0.072], cand), (0, 1, 2))["adopt"]  # within noise
    assert not ba.verdict(cand, _runs(default, [0.085, 0.074, 0.085], cand), (0, 1, 2))["adopt"]  # lower on seed 1
    assert not ba.verdict(ba.DEFAULT, _runs(default, default, ba.DEFAULT), (0, 1, 2))["adopt"]
