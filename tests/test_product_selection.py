"""simulations/product_selection.py: the accounted private selection over the product's 5-round grid. Its epsilon
is dp-accounting's repeat-and-select (checked through the public event API here), the grid is the budget study's,
the calibrated factor reaches the target, and bad options are refused with one line."""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from shared.errors import PrivrecError
from simulations import budget_allocation as ba
from simulations import product_selection as ps

SHIPPED = "r5-q0.25-split5:3:3.5-lr0.5"
Z = {"popularity": 4.6, "cooc": 2.76, "rounds": 3.22}


def _events(z: dict, q: float, rounds: int, factor: float, valid_z: float | None):
    """One run, written out here from dp-accounting's public events (not via the module)."""
    parts = [dpa.GaussianDpEvent(factor * z["popularity"]), dpa.GaussianDpEvent(factor * z["cooc"]),
             dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(factor * z["rounds"])), rounds)]
    return dpa.ComposedDpEvent(parts + ([dpa.GaussianDpEvent(valid_z)] if valid_z else []))


def _rdp_epsilon(event) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(1e-5))


def _refs(**named) -> dict:
    return {name: {"z": z} for name, z in named.items()}


@pytest.mark.parametrize("mean,shape", [(2.0, 0.0), (3.0, math.inf), (2.0, 1.0), (2.5, 0.5)])
def test_one_candidate_selection_is_dp_accountings_repeat_and_select_event(mean, shape):
    q = round(0.25 * 943) / 943
    expected = _rdp_epsilon(dpa.dp_event.RepeatAndSelectDpEvent(_events(Z, q, 5, 1.3, 10.0), mean, shape))
    got = ps.selection_epsilon(_refs(**{SHIPPED: Z}), 1.3, mean, shape, 10.0)
    assert got == pytest.approx(expected, rel=1e-9)
    # the selection is paid for: more than one run alone
    assert got > _rdp_epsilon(_events(Z, q, 5, 1.3, 10.0))


def test_a_mixture_of_candidates_costs_its_worst_candidate_at_every_order():
    q5 = round(0.25 * 943) / 943
    q10 = round(0.5 * 943) / 943
    weak = {k: v * 1.5 for k, v in Z.items()}  # more noise everywhere: dominated by Z at every order
    dominated = ps.selection_epsilon(_refs(**{SHIPPED: Z, "r5-q0.25-split5:3:3.5-lr1": weak}), 1.2, 2.0, 0.0, 10.0)
    assert dominated == pytest.approx(ps.selection_epsilon(_refs(**{SHIPPED: Z}), 1.2, 2.0, 0.0, 10.0), rel=1e-12)
    # two candidates with different (rounds, q): at least each one's own repeat-and-select
    other = {"popularity": 6.6, "cooc": 4.0, "rounds": 4.6}
    both = ps.selection_epsilon(_refs(**{SHIPPED: Z, "r10-q0.5-split5:3:3.5-lr0.5": other}), 1.2, 2.0, 0.0, 10.0)
    for z, q, rounds in ((Z, q5, 5), (other, q10, 10)):
        alone = _rdp_epsilon(dpa.dp_event.RepeatAndSelectDpEvent(_events(z, q, rounds, 1.2, 10.0), 2.0, 0.0))
        assert both >= alone - 1e-9


def test_the_grid_is_the_budget_studys_sixteen_looks():
    names = [c.name for c in ps.budget_candidates()]
    looked = json.loads(ba.runs_path("search").read_text())["runs"]
    assert len(names) == 16 and set(names) == set(looked)
    assert SHIPPED in names and all(ba.from_name(n).eligible for n in names)


def test_the_registered_calibration_reaches_the_target_and_its_epsilon_is_recomputed():
    cal = json.loads(ps.CALIBRATION.read_text())
    assert (cal["mean"], cal["shape"], cal["valid_z"], cal["target"]) == (ps.MEAN_RUNS, ps.SHAPE, ps.VALID_Z, 2.0)
    assert cal["grid"] == [c.name for c in ps.budget_candidates()]
    eps = ps.selection_epsilon(cal["references"], cal["factor"])
    assert eps == pytest.approx(cal["epsilon-rdp, selection"], rel=1e-9)
    assert 1.99 < eps <= 2.0
    # the factor is the smallest within the bisection's width: 0.2% less noise is over the target
    assert ps.selection_epsilon(cal["references"], cal["factor"] / 1.002) > 2.0
    # every reference is its candidate's epsilon-2 calibration (the budget study's rule)
    for name, ref in cal["references"].items():
        assert 1.99 < ref["opacus-rdp at factor 1"] <= 2.0
        cand = ba.from_name(name)
        assert (ref["rounds"], ref["q"]) == (cand.rounds, ba.rate(cand.fraction))


def test_calibration_finds_the_smallest_factor_for_a_one_candidate_grid():
    refs = _refs(**{SHIPPED: Z})
    factor = ps.calibrate_selection(refs, 2.0, 0.0, 10.0, target=2.0)
    assert ps.selection_epsilon(refs, factor, 2.0, 0.0, 10.0) <= 2.0 < ps.selection_epsilon(refs, factor / 1.002,
                                                                                          2.0, 0.0, 10.0)


def test_one_run_opacus_and_dp_accounting_agree_on_the_pipeline_without_the_score():
    settings = ba.settings(ba.from_name(SHIPPED))
    out = ps.one_run_epsilons({"z": Z}, settings, 1.0, None)
    assert out["opacus-rdp, pipeline without the score"] == pytest.approx(out["dp-accounting-rdp"], rel=1e-3)
    assert out["dp-accounting-pld"] < out["dp-accounting-rdp"] <= 2.0


@pytest.mark.parametrize("mean,shape,valid_z,target,key", [
    (0.5, 0.0, 10.0, 2.0, "mean-runs"), (math.nan, 0.0, 10.0, 2.0, "mean-runs"), (math.inf, 0.0, 10.0, 2.0, "mean"),
    (2.0, -1.0, 10.0, 2.0, "shape"), (2.0, math.nan, 10.0, 2.0, "shape"),
    (2.0, 0.0, 0.0, 2.0, "valid-z"), (2.0, 0.0, math.inf, 2.0, "valid-z"), (2.0, 0.0, 10.0, 0.0, "target")])
def test_bad_options_are_refused_with_one_line_naming_them(mean, shape, valid_z, target, key):
    with pytest.raises(PrivrecError) as err:
        ps.calibrate_selection(_refs(**{SHIPPED: Z}), mean, shape, valid_z, target)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_a_calibration_made_for_another_plan_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"mean": 3.0, "shape": ps.SHAPE, "valid_z": ps.VALID_Z, "target": 2.0,
                                "grid": [c.name for c in ps.budget_candidates()]}))
    monkeypatch.setattr(ps, "CALIBRATION", path)
    with pytest.raises(PrivrecError, match="another plan"):
        ps.load_calibration()


@pytest.mark.parametrize("mean,shape", [(2.0, 0.0), (2.0, 1.0), (3.0, 0.5), (2.0, math.inf)])
def test_the_number_of_runs_follows_the_accounted_distribution(mean, shape):
    rng = np.random.default_rng(0)
    runs = np.array([ps.draw_runs(mean, shape, rng) for _ in range(20_000)])
    assert runs.mean() == pytest.approx(mean, rel=0.05)
    if math.isinf(shape):
        assert (runs == 0).mean() == pytest.approx(math.exp(-mean), abs=0.01)
    else:
        assert runs.min() >= 1  # truncated: never the data-independent fallback
    if shape == 0.0:  # logarithmic at mean 2: P(T = 1) = -p / log(1 - p), p = 1 - gamma
        p = 1 - rdp_privacy_accountant._gamma_truncated_negative_binomial(0.0, mean)
        assert (runs == 1).mean() == pytest.approx(-p / math.log(1 - p), abs=0.01)


def test_repeat_and_select_keeps_the_best_noisy_score_and_draws_fresh_pipeline_seeds():
    seen = []

    def run_once(candidate, run_seed):
        seen.append((candidate, run_seed))
        return [5.0, 9.0, 1.0][candidate], (candidate, run_seed)

    for seed in range(200):
        seen.clear()
        best, log = ps.repeat_and_select(run_once, 3, 2.0, 0.0, np.random.default_rng(seed))
        assert log and [(x["candidate"], x["run-seed"]) for x in log] == seen
        top = max(range(len(log)), key=lambda i: log[i]["noisy-valid-score"])
        assert best == seen[top]
        assert all(s >= 1_000 for _, s in seen)  # never the budget study's noise seeds 0-5


def test_noisy_validation_score_has_sensitivity_one_per_user():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 50)
    base = ps.noisy_score(scores, 0.0, rng)
    for extra in (0.0, 0.4, 1.0, 9.0, -2.0):
        assert abs(ps.noisy_score(np.append(scores, extra), 0.0, rng) - base) <= 1.0


def test_the_secondary_random_choice_stays_within_the_target_for_every_candidate():
    cal = json.loads(ps.CALIBRATION.read_text())
    eps = ps.random_choice_epsilon(cal["references"])
    assert 1.99 < eps <= 2.0
    # each candidate separately, through the public event API
    each = [_rdp_epsilon(_events(ref["z"], ref["q"], ref["rounds"], 1.0, None)) for ref in cal["references"].values()]
    assert max(each) == pytest.approx(eps, rel=1e-9)
