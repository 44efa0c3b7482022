"""The report's independent cross-check: dp-accounting (another code base) and the history against the config.

Figures are computed here with dp-accounting directly, never with privrec's or Opacus' code, so a bug
that the report and the devices share cannot make these tests agree with it.
"""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import pld, rdp

from tests import report_fixture as fx
from tests.synthetic import walk_store
from tools.cli import EXIT_FLAGGED, main
from tools.report import independent
from tools.report.independent import Expected, check_history, compare, expected_for
from tools.report.load import load_run
from tools.report.recompute import cross_check


def _dpa(history, delta=fx.DELTA):
    event = dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), n)
                                 for z, q, n in history])
    r = rdp.RdpAccountant()
    r.compose(event)
    p = pld.PLDAccountant(value_discretization_interval=1e-3)
    p.compose(event)
    return r.get_epsilon(delta), p.get_epsilon(delta)


def _privacy(run):
    return json.loads((run / "privacy.json").read_text())


def _save(run, privacy):
    (run / "privacy.json").write_text(json.dumps(privacy))


def test_every_device_and_user_level_is_recomputed_with_dp_accounting(tmp_path, capsys):
    run = fx.write_run(tmp_path, ledgers=False)
    assert main(["report", str(run)]) == 0  # honest run: written, nothing flagged
    report = json.loads((run / "report.json").read_text())
    p = report["privacy"]
    assert p["flagged"] is False and p["flagged-devices"] == []
    privacy = _privacy(run)
    for d in p["devices"]:
        history = privacy["devices"][d["device"]]["history"]
        want_rdp, want_pld = _dpa(history)
        assert d["independent"]["rdp"]["epsilon"] == pytest.approx(want_rdp, rel=1e-9)
        # PLD is pessimistic at any grid; the report's grid is coarser, so about as large or larger, within 1%.
        assert want_pld * (1 - 1e-3) <= d["independent"]["pld"]["epsilon"] <= want_pld * 1.01
        assert d["independent"]["pld"]["epsilon"] < d["independent"]["rdp"]["epsilon"]
        assert d["expected-history"]["noise-multiplier"] == fx.SIGMA
    user = p["user-level"]
    want_rdp, _ = _dpa(privacy["user-level"]["history"])
    assert user["independent"]["rdp"]["epsilon"] == pytest.approx(want_rdp, rel=1e-9)
    assert user["expected-history"]["sample-rate"] == pytest.approx(fx.COHORT / fx.POPULATION)
    assert "dp-accounting RDP" in (run / "report.md").read_text()


def test_a_shared_accountant_bug_is_caught_by_the_second_code_base(tmp_path, monkeypatch):
    """If the accountant that made the figures and the one re-checking them in Opacus were both 10% low,
    the Opacus recomputation would agree; dp-accounting must not."""
    run = fx.write_run(tmp_path, ledgers=False, user_dp=False)
    privacy = _privacy(run)
    for entry in privacy["devices"].values():
        entry["epsilon"] *= 0.9
        entry["rounds"] = [[r, e * 0.9] for r, e in entry["rounds"]]
    privacy["statements"][0]["epsilon"] *= 0.9
    _save(run, privacy)
    import tools.report.recompute as recompute

    real = recompute.epsilon_from_state
    monkeypatch.setattr(recompute, "epsilon_from_state", lambda *a, **k: real(*a, **k) * 0.9)
    recompute._epsilon.cache_clear()
    try:
        check = cross_check(load_run(run).privacy, None, load_run(run).config)
    finally:
        recompute._epsilon.cache_clear()
    for d in check.devices:
        assert [f.code for f in d.flags] == ["under-reported"], (d.device.device, d.flags)
    assert not check.statements[0]["ok"] and "dp-accounting gives" in check.statements[0]["detail"]


@pytest.mark.parametrize("accountant", ["prv", "gdp"])
def test_prv_and_gdp_records_are_compared_with_pld(tmp_path, accountant):
    run = fx.write_run(tmp_path, ledgers=False, user_dp=False, accountant=accountant)
    check = cross_check(load_run(run).privacy, None, load_run(run).config)
    for d in check.devices:
        assert d.independent["pld"].value is not None
        codes = {f.code for f in d.flags}
        if accountant == "prv":  # PRV and PLD both bound the exact curve: they must agree within 1%
            assert codes == set(), d.flags
            assert independent.agrees(d.device.epsilon, d.independent["pld"].value)
        else:  # GDP is an approximation: flagged only where it claims less than PLD's bound
            assert codes <= {"under-reported"}
            assert ("under-reported" in codes) == (d.device.epsilon < d.independent["pld"].value
                                                   and not independent.agrees(d.device.epsilon,
                                                                              d.independent["pld"].value))


def test_compare_directions():
    figures = {"rdp": independent.Figure(10.0), "pld": independent.Figure(9.0)}
    assert compare(10.05, "rdp", figures) is None  # within 1%
    assert compare(9.8, "rdp", figures)[0] == "under-reported"
    assert compare(10.5, "rdp", figures)[0] == "independent-mismatch"
    assert compare(9.0, "prv", figures) is None
    assert compare(8.5, "gdp", figures)[0] == "under-reported"
    assert compare(9.5, "gdp", figures) is None  # GDP above PLD errs on the safe side


# ----------------------------------------------------------------------------- history against the config


def _retamper(run, device, history):
    """Give `device` another history with an epsilon that is honest for it (Opacus and dp-accounting
    both reproduce it): only the history-against-config check can see the lie."""
    privacy = _privacy(run)
    entry = privacy["devices"][device]
    entry["history"] = [list(r) for r in history]
    eps = fx.eps(tuple(tuple(r) for r in history))
    entry["epsilon"] = eps
    entry["rounds"] = [[r, min(e, eps)] for r, e in entry["rounds"]]
    _save(run, privacy)


def test_tampered_sample_rate_is_flagged_and_report_exits_3(tmp_path, capsys):
    run = fx.write_run(tmp_path, ledgers=False, user_dp=False)
    q, _, trained = fx.DEVICES["1"]  # q = 0.5, 2 rounds of 3 epochs x 2 steps = 12 steps
    _retamper(run, "1", [(fx.SIGMA, q / 2, 12)])  # a smaller q, same steps: a lower epsilon
    assert main(["report", str(run)]) == EXIT_FLAGGED
    assert "flagged" in capsys.readouterr().err
    report = json.loads((run / "report.json").read_text())
    assert report["privacy"]["flagged-devices"] == ["1"] and report["privacy"]["flagged"]
    device = next(d for d in report["privacy"]["devices"] if d["device"] == "1")
    codes = {f["code"] for f in device["flags"]}
    # Config only (no sample-rate key, no device store): q = 1/4 is still a plausible 1/ceil(n/b), but two
    # rounds at q = 1/4 take 2 x 3 x 4 = 24 steps and the history holds 12.
    assert codes == {"history-steps-missing"}, device["flags"]


@pytest.mark.parametrize("tamper, code", [
    ((2.0, 0.5, 12), "history-noise-mismatch"),  # more noise than configured
    ((1.0, 0.25, 24), "history-sample-rate-mismatch"),  # smaller q, steps consistent with it
    ((1.0, 0.5, 6), "history-steps-missing"),  # a round's steps dropped
    ((1.0, 0.5, 13), "history-steps-mismatch"),  # not a whole number of rounds
])
def test_history_rows_against_config_sample_rate(tamper, code):
    """Helper A's design: `sample-rate` in the config, every round local-epochs x ceil(1/q) steps."""
    config = {"noise-multiplier": 1.0, "sample-rate": 0.5, "local-epochs": 3, "batch-size": 8}
    expected = expected_for(config, None)
    assert (expected.sample_rate, expected.steps_per_round, expected.basis) == (0.5, 6, "config sample-rate")

    def per_round(q):
        return independent.steps_for(q, 3)

    assert check_history([(1.0, 0.5, 12)], 2, expected, per_round) == []
    assert check_history([(1.0, 0.5, 18)], 2, expected, per_round) == []  # plus a round of an earlier run
    flags = check_history([tamper], 2, expected, per_round)
    assert code in {c for c, _ in flags}, flags


def test_sample_rate_that_is_no_whole_number_of_batches_is_flagged():
    expected = Expected(1.0, None, None, "unknown")
    flags = check_history([(1.0, 0.3, 12)], 1, expected, lambda q: independent.steps_for(q, 3))
    assert "history-sample-rate-mismatch" in {c for c, _ in flags}


def test_steps_for_tolerates_float_reciprocals():
    assert independent.steps_for(1 / 93, 1) == 93 and independent.steps_for(0.05, 2) == 40
    assert independent.steps_for(0.03, 1) == 34


def test_sample_rate_is_checked_against_the_device_data(tmp_path):
    """With the run's device store readable, q must be 1/ceil(windows/batch-size) of that device's data."""
    from shared.data.store import open_store
    from shared.data.windows import make_windows

    store_dir = walk_store(tmp_path / "store", num_users=4, num_items=24)
    store = open_store(store_dir)
    window, batch = 4, 2
    run = fx.write_run(tmp_path / "runs", ledgers=False, user_dp=False)
    config = json.loads((run / "config.json").read_text())
    config.update({"data-store": str(store_dir), "window": window, "batch-size": batch, "seed": 0,
                   "cold-item-share": 0.0})
    (run / "config.json").write_text(json.dumps(config))
    counts = {str(d): sum(len(make_windows(np.asarray(s), window)) for s in store.device(d).train)
              for d in range(store.num_devices)}
    privacy = _privacy(run)
    for device, entry in privacy["devices"].items():
        q = 1 / math.ceil(counts[device] / batch)
        steps = fx.EPOCHS * round(1 / q) * len(entry["rounds"])
        entry["history"] = [[fx.SIGMA, q, steps]]
        entry["epsilon"] = fx.eps(((fx.SIGMA, q, steps),))
        entry["rounds"] = [[r, entry["epsilon"]] for r, _ in entry["rounds"]]
    _save(run, privacy)
    honest = cross_check(load_run(run).privacy, None, load_run(run).config)
    assert all(d.expected.basis.startswith("device data") for d in honest.devices)
    assert [d.flags for d in honest.devices if d.flags] == []
    # Device 0 now claims twice as many windows as it holds (half the q), steps to match.
    entry = privacy["devices"]["0"]
    z, q, steps = entry["history"][0]
    entry["history"] = [[z, q / 2, steps * 2]]
    entry["epsilon"] = fx.eps(((z, q / 2, steps * 2),))
    entry["rounds"] = [[r, entry["epsilon"]] for r, _ in entry["rounds"]]
    _save(run, privacy)
    flagged = cross_check(load_run(run).privacy, None, load_run(run).config)
    codes = {d.device.device: {f.code for f in d.flags} for d in flagged.devices if d.flags}
    assert codes == {"0": {"history-sample-rate-mismatch"}}, codes


def test_tampered_user_level_history_is_flagged(tmp_path):
    """DP-FedAvg's rows must carry user-noise-multiplier and q = cohort / population, one per round."""
    run = fx.write_run(tmp_path, ledgers=False)
    privacy = _privacy(run)
    q = fx.COHORT / fx.POPULATION / 2  # half the real cohort rate: a lower, honestly computed epsilon
    privacy["user-level"]["history"] = [[fx.USER_Z, q, 1]] * fx.ROUNDS
    privacy["user-level"]["rounds"] = [[r, fx.eps(((fx.USER_Z, q, r),))] for r in range(1, fx.ROUNDS + 1)]
    privacy["statements"][1]["epsilon"] = privacy["user-level"]["rounds"][-1][1]
    _save(run, privacy)
    user = cross_check(load_run(run).privacy, None, load_run(run).config).user_level
    assert [f.code for f in user.flags] == ["history-sample-rate-mismatch"] * fx.ROUNDS, user.flags
    assert "understates" in user.flags[0].detail
