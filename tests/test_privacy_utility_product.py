"""`simulations.privacy_utility --pipeline product`: the calibration of the product's default pipeline
(`model = channel-scorer`) to each target epsilon, checked against a second code base (dp-accounting), and the
statistics of its table."""

from __future__ import annotations

import math

import dp_accounting as dpa
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from shared import config
from simulations import privacy_utility as pu
from simulations.population_utility import channel_epsilon


def _dp_accounting_rdp(z_pop: float, z_cooc: float, z: float, c: dict) -> float:
    """The pipeline written out here as dp-accounting events (two Gaussian releases, then `rounds` sampled
    rounds), dp-accounting's RDP accountant."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dpa.ComposedDpEvent([
        dpa.GaussianDpEvent(z_pop), dpa.GaussianDpEvent(z_cooc),
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(c["q"], dpa.GaussianDpEvent(z)), c["rounds"])]))
    return float(accountant.get_epsilon(c["delta"]))


def test_the_settings_are_the_products_default():
    c = pu.product_settings()
    product = config.resolve_run()  # what `privrec simulate` runs with no options
    assert c["model"] == "channel-scorer" == product["model"]
    assert (c["popularity-z"], c["cooc-z"], c["z"]) == (product["popularity-noise-multiplier"],
                                                        product["cooc-noise-multiplier"],
                                                        product["user-noise-multiplier"])
    assert (c["q"], c["rounds"], c["accountant"]) == (product["fraction-train"], product["num-rounds"], "rdp")


@pytest.mark.parametrize("target", [1.0, 2.0, 8.0])
def test_the_factor_is_the_smallest_reaching_the_target_and_dp_accounting_agrees(target):
    c = pu.product_settings()
    row = pu.calibrate_product(target, c)
    factor, z = row["factor"], row["z"]
    # one common factor on the product's three multipliers
    assert (z["popularity"], z["cooc"], z["rounds"]) == pytest.approx(
        (factor * c["popularity-z"], factor * c["cooc-z"], factor * c["z"]))
    # the product's accountant: within the target at the factor, above it 0.1% below the factor
    slightly_smaller = factor * 0.999
    below = [slightly_smaller * c["popularity-z"], slightly_smaller * c["cooc-z"], slightly_smaller * c["z"]]
    assert row["epsilon"]["opacus-rdp"] == channel_epsilon(z["popularity"], z["cooc"], z["rounds"], c) <= target
    assert channel_epsilon(*below, c) > target
    # a second code base, the same composition: its RDP puts the factor on the same side of the target
    found, smaller = _dp_accounting_rdp(z["popularity"], z["cooc"], z["rounds"], c), _dp_accounting_rdp(*below, c)
    assert found == pytest.approx(row["epsilon"]["opacus-rdp"], rel=1e-3) and found <= target * (1 + 1e-3)
    assert smaller == pytest.approx(channel_epsilon(*below, c), rel=1e-3) and smaller > target
    assert row["epsilon"]["dp-accounting-rdp"] == pytest.approx(found)
    # the PLD figure stated beside it is dp-accounting's tighter bound: within the target too
    assert 0 < row["epsilon"]["dp-accounting-pld"] <= row["epsilon"]["dp-accounting-rdp"]


def test_inf_is_every_multiplier_zero_and_the_targets_keep_their_calibrated_noise():
    cal = {"targets": [{"target": 2.0, "z": {"popularity": 4.9, "cooc": 2.9, "rounds": 3.4}}]}
    assert pu.product_arms(cal) == {"2": (4.9, 2.9, 3.4), "inf": (0.0, 0.0, 0.0)}
    assert pu.product_arms(cal, ["inf"]) == {"inf": (0.0, 0.0, 0.0)}


def test_the_interval_is_the_student_t_interval_of_the_mean():
    s = pu.summary_stats([0.06, 0.07, 0.08])
    assert s["mean"] == pytest.approx(0.07) and s["std"] == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert s["ci95"] == pytest.approx([0.07 - half, 0.07 + half])
