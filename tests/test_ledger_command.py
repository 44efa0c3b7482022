"""`privrec ledger`: one device's own spend, read from its ledger and recomputed with two code bases."""

from __future__ import annotations

import json

import dp_accounting as dpa
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from shared.privacy.accounting import epsilon_from_state
from tests import report_fixture as fx
from tests.test_cli import assert_user_error
from tools.cli import EXIT_FLAGGED, main


def _release(run: str, what: str, z: float, epsilon: float) -> dict:
    return {"kind": "channel-scorer-round" if what.startswith("round") else "popularity-histogram",
            "release": f"{run}-{what}", "unit": "user", "relation": "add/remove one user", "mechanism": "gaussian-sum",
            "noise_multiplier": z, "sample_rate": 1.0, "steps": 1, "user-level-epsilon": epsilon, "delta": 1e-5,
            "accountant": "rdp"}


def _two_runs(folder, tamper: bool = False):
    """A deployed device's ledger (`<device folder>/state/device-3/`) after two runs of a scorer pipeline."""
    rows = [("20261129-100000-1", "popularity", 4.6), ("20261129-100000-1", "round2", 3.22),
            ("20261129-110000-2", "popularity", 4.6), ("20261129-110000-2", "round1", 3.22),
            ("20261129-110000-2", "round4", 3.22)]
    releases = []
    for k, (run, what, z) in enumerate(rows, 1):
        history = [[z_, 1.0, 1] for _, _, z_ in rows[:k]]
        releases.append(_release(run, what, z, epsilon_from_state({"history": history, "mechanism": "rdp"}, 1e-5,
                                                                   "rdp")))
    if tamper:  # the device recorded less than its releases give: the dangerous direction
        releases[-1]["user-level-epsilon"] *= 0.9
    path = folder / "state" / "device-3" / "privacy-ledger.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1, "device": "3", "accountant_state": None, "rounds": [], "declined": None,
                                "releases": releases}))
    return rows


def test_a_device_sees_every_run_it_took_part_in_and_their_composition(tmp_path, capsys):
    rows = _two_runs(tmp_path / "device-3")
    assert main(["ledger", str(tmp_path / "device-3")]) == 0
    out = capsys.readouterr().out
    assert "user-level releases: 5 in 2 run(s)" in out
    assert "run 20261129-110000-2: popularity histogram z 4.6, round 1 z 3.22, round 4 z 3.22" in out
    assert main(["ledger", str(tmp_path / "device-3"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    user = summary["user-level"]
    # the composition across runs, checked against dp-accounting (another code base): five Gaussian releases
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dpa.ComposedDpEvent([dpa.GaussianDpEvent(z) for _, _, z in rows]))
    assert user["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=0.01)
    assert user["independent"]["pld"] <= user["epsilon"]  # RDP never claims less than the tight PLD
    alone = {r["run"]: r["epsilon-alone"] for r in user["runs"]}
    assert alone["20261129-100000-1"] < alone["20261129-110000-2"] < user["epsilon"]  # composition only grows
    assert summary["on-device"] is None and summary["flags"] == []


def test_a_recorded_figure_below_its_releases_is_flagged(tmp_path, capsys):
    _two_runs(tmp_path / "device-3", tamper=True)
    assert main(["ledger", str(tmp_path / "device-3" / "state" / "device-3" / "privacy-ledger.json")]) == EXIT_FLAGGED
    captured = capsys.readouterr()
    assert "FLAGGED: the device recorded user-level epsilon" in captured.out
    assert "disagree with their recomputation" in captured.err


def test_on_device_spend_and_the_cap_from_a_dp_sgd_ledger(tmp_path, capsys):
    run = fx.write_run(tmp_path)
    assert main(["ledger", str(run / "devices" / f"device-{fx.DECLINER}"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    q, earlier, trained = fx.DEVICES[fx.DECLINER]
    on_device = summary["on-device"]
    assert on_device["epsilon"] == pytest.approx(fx.eps(fx._history(q, earlier, len(trained))), rel=1e-9)
    assert on_device["rounds"] == len(trained) and on_device["relation"] == "add/remove one window"
    assert summary["declined"]["round"] == fx.ROUNDS and summary["user-level"]["releases"] == 0
    assert main(["ledger", str(run / "devices" / f"device-{fx.DECLINER}")]) == 0
    assert "reached in run fixture-run round 3" in capsys.readouterr().out


def test_a_tampered_on_device_record_is_flagged(tmp_path, capsys):
    run = fx.write_run(tmp_path, tamper=("0", "ledger-epsilon"))
    assert main(["ledger", str(run / "devices" / "device-0")]) == EXIT_FLAGGED
    assert "FLAGGED: the device recorded on-device epsilon" in capsys.readouterr().out


def test_bad_paths_get_one_line_naming_them(tmp_path, capsys):
    run = fx.write_run(tmp_path)
    code = main(["ledger", str(run / "devices")])
    assert_user_error(code, capsys.readouterr().err, "holds 4 device ledgers; name one device's folder")
    code = main(["ledger", str(tmp_path / "nowhere")])
    assert_user_error(code, capsys.readouterr().err, "nowhere: no such ledger file or device folder")
    broken = run / "devices" / "device-1" / "privacy-ledger.json"
    broken.write_text("{not json")
    code = main(["ledger", str(broken)])
    assert_user_error(code, capsys.readouterr().err, f"privacy ledger {broken} is unreadable")


def test_a_malformed_release_is_named_not_a_traceback(tmp_path, capsys):
    _two_runs(tmp_path / "device-3")
    path = tmp_path / "device-3" / "state" / "device-3" / "privacy-ledger.json"
    ledger = json.loads(path.read_text())
    del ledger["releases"][1]["noise_multiplier"]
    path.write_text(json.dumps(ledger))
    code = main(["ledger", str(path)])
    assert_user_error(code, capsys.readouterr().err, f"privacy ledger {path}: releases[1] is not [noise multiplier")
