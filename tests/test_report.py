"""`privrec report`: files, a self-contained HTML page, a documented JSON, an honest cross-check.

The run directories are synthetic (tests/report_fixture.py, every epsilon computed with the real
accountant). PRIVREC_REPORT_RUN=/path/to/runs/<run-id> points the format tests (files, HTML,
JSON keys) at a real run as well; the cross-check tests always use the fixture, whose
tampering they know.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import report_fixture as fx
from tests.test_cli import assert_user_error, run_cli
from tools.cli import EXIT_FLAGGED, main
from tools.report.load import load_run
from tools.report.recompute import REL_TOL, cross_check, recompute, same

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_PLOTS = {"epsilon-histogram.png", "epsilon-rounds.png", "capped-rounds.png", "user-epsilon-rounds.png",
                 "ndcg-epsilon.png"}
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Simulation run (ledgers present), user-level DP on, device 2's ledger under-reports: report in run dir."""
    run = fx.write_run(tmp_path_factory.mktemp("sim"), tamper=("2", "ledger-epsilon"))
    assert main(["report", str(run)]) == EXIT_FLAGGED  # written, and device 2 flagged
    return run, json.loads((run / "report.json").read_text())


@pytest.fixture(scope="module", params=["fixture", "real"])
def any_run(request, sim, tmp_path_factory):
    """The fixture's report, and a real run's when PRIVREC_REPORT_RUN names one."""
    if request.param == "fixture":
        return sim
    real = os.environ.get("PRIVREC_REPORT_RUN")
    if not real:
        pytest.skip("set PRIVREC_REPORT_RUN=runs/<run-id> to check a real run's report too")
    run = tmp_path_factory.mktemp("real") / Path(real).name
    shutil.copytree(real, run)
    assert main(["report", str(run)]) in (0, EXIT_FLAGGED)
    return run, json.loads((run / "report.json").read_text())


# ----------------------------------------------------------------------------- files and formats


def test_report_writes_every_file(any_run):
    run, report = any_run
    for name in ("report.md", "report.html", "report.json"):
        assert (run / name).stat().st_size > 0
    assert report["plots"], "no plot"
    for plot in report["plots"]:
        assert (run / plot["file"]).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), plot["file"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_fixture_gets_every_plot(sim):
    run, report = sim
    assert {p["file"] for p in report["plots"]} == FIXTURE_PLOTS


def test_html_is_self_contained_with_tables_images_and_opening(any_run):
    run, report = any_run
    page = (run / "report.html").read_text()
    # Every src/href is inline data: nothing is fetched from anywhere.
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.I)
    assert refs and all(r.startswith("data:") for r in refs), refs
    assert not re.search(r"https?://|<script|<link|@import|url\(", page, flags=re.I)
    assert '<table id="rounds">' in page
    assert ('<table id="devices">' in page) == report["privacy"]["available"]
    for plot in report["plots"]:
        data = base64.b64encode((run / plot["file"]).read_bytes()).decode()
        assert f'<img src="data:image/png;base64,{data}"' in page, plot["file"]
    assert page.count('<img src="data:image/png;base64,') == len(report["plots"])
    first_table = page.index("<table")
    for statement in report["privacy"]["statements"]:
        assert 0 < page.index(html.escape(statement["sentence"])) < first_table


def test_report_opens_with_one_sentence_per_mechanism(sim):
    run, report = sim
    privacy = json.loads((run / "privacy.json").read_text())
    sentences = [s["sentence"] for s in privacy["statements"]]
    assert len(sentences) == 2  # on-device and user-level
    md = (run / "report.md").read_text().splitlines()
    assert md[0].startswith("# Privacy report")
    assert [line for line in md[1:] if line.strip()][:2] == sentences
    # Exact terms follow: each epsilon with its delta, accountant, unit, sampling.
    for s in privacy["statements"]:
        terms = next(line for line in md if line.startswith(f"- {s['mechanism']}:"))
        for needle in (f"{s['epsilon']:.4f}", f"delta = {s['delta']:g}", "rdp accountant", s["unit"], s["sampling"]):
            assert needle in terms, (needle, terms)


def _documented_keys() -> set[str]:
    doc = (ROOT / "docs" / "report-format.md").read_text()
    section = doc[doc.index("## `report.json`"):]
    return set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))


def _paths(value, prefix: str = "") -> set[str]:
    """Dotted key paths; lists of objects become `name[]`; `evaluation` is copied as is."""
    out = set()
    if isinstance(value, dict) and prefix != "evaluation":
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else key
            out.add(path)
            out |= _paths(item, path)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                out.add(prefix)
                out |= _paths(item, prefix + "[]")
    return out


def test_report_json_has_exactly_the_documented_keys(any_run):
    run, report = any_run
    documented = _documented_keys()
    assert report["format"] == 1
    actual = {p for p in _paths(report) if not p.endswith("[]")}
    assert actual - documented == set(), "undocumented keys in report.json"
    if report["privacy"]["user-level"] and report["privacy"]["ledgers"].startswith("sim"):
        # gdp keys appear only in GDP runs, flags only when flagged; all else is in this report.
        unflagged = ("user-level.flags[]",) + (("devices[].flags[]",) if not report["privacy"]["flagged-devices"]
                                               else ())
        optional = {k for k in documented if ".gdp" in k or any(u in k for u in unflagged)}
        assert documented - actual - optional == set(), "documented keys missing"
    json.loads((run / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-finite {c}"))


# ----------------------------------------------------------------------------- cross-check


def test_cross_check_flags_exactly_the_tampered_device(sim):
    run, report = sim
    devices = {d["device"]: d for d in report["privacy"]["devices"]}
    assert set(devices) == set(fx.DEVICES)
    assert report["privacy"]["flagged-devices"] == ["2"]
    assert {f["code"] for f in devices["2"]["flags"]} == {"ledger-epsilon-mismatch", "ledger-below-server"}
    for name, d in devices.items():
        rdp, prv = d["recomputed"]["rdp"]["epsilon"], d["recomputed"]["prv"]["epsilon"]
        assert math.isfinite(rdp) and math.isfinite(prv), name
        assert abs(rdp - prv) > 0.01 * rdp, f"device {name}: PRV {prv} should differ from RDP {rdp}"
        assert rdp == pytest.approx(d["epsilon-reported"], rel=REL_TOL)  # the run used RDP
    assert devices[fx.DECLINER]["declined-round"] == fx.ROUNDS
    md = (run / "report.md").read_text()
    row = next(r for r in md[md.index("## Per device"):].splitlines() if r.startswith("| 2 |"))
    assert "ledger-below-server" in row
    user = report["privacy"]["user-level"]
    assert user["flags"] == [] and user["recomputed"]["prv"]["epsilon"] < user["recomputed"]["rdp"]["epsilon"]
    assert f"PRV {user['recomputed']['prv']['epsilon']:.4f}" in md  # both accountants shown for user-level too
    assert all(s["check"]["ok"] for s in report["privacy"]["statements"])


@pytest.mark.parametrize("ledgers, tamper, expected", [
    (True, None, {}),
    (True, ("0", "ledger-history"), {"0": {"ledger-below-server"}}),
    (True, ("1", "server-epsilon"), {"1": {"reported-epsilon-mismatch", "ledger-below-server"}}),
    (False, ("3", "server-epsilon"), {"3": {"reported-epsilon-mismatch"}}),
    (False, None, {}),
], ids=["clean", "ledger-lost-a-round", "server-record-off", "deployment-server-record-off", "deployment-clean"])
def test_cross_check_flags_each_kind_of_disagreement(tmp_path, ledgers, tamper, expected):
    run = fx.write_run(tmp_path, ledgers=ledgers, tamper=tamper)
    check = cross_check(load_run(run).privacy)
    flagged = {d.device.device: {f.code for f in d.flags} for d in check.devices if d.flags}
    assert flagged == expected
    assert all((d.device.ledger is not None) == ledgers for d in check.devices)


@pytest.mark.parametrize("tamper", [None, ("0", "ledger-history")], ids=["clean", "ledger-lost-a-round"])
def test_the_ledgers_of_a_local_deployment_are_checked_where_deploy_local_keeps_them(tmp_path, capsys, tamper):
    """`privrec deploy local` keeps each device's ledger in the device folder's own state
    (`devices/device-<id>/state/device-<id>/`): the report flagged every device of such a run as
    'ledger file missing' (exit 3) because it looked for the simulation layout only."""
    run = fx.write_run(tmp_path, tamper=tamper)
    for device in fx.DEVICES:
        flat = run / "devices" / f"device-{device}" / "privacy-ledger.json"
        nested = flat.parent / "state" / f"device-{device}" / "privacy-ledger.json"
        nested.parent.mkdir(parents=True)
        flat.rename(nested)
    assert main(["report", str(run)]) == (0 if tamper is None else EXIT_FLAGGED)
    privacy = json.loads((run / "report.json").read_text())["privacy"]
    assert privacy["ledgers"].startswith("local deployment: devices/device-<id>/state/device-<id>/")
    assert all(d["ledger"] is not None and d["ledger"]["error"] is None for d in privacy["devices"])
    assert privacy["flagged-devices"] == ([] if tamper is None else ["0"])
    assert "| ledger epsilon |" in (run / "report.md").read_text()
    capsys.readouterr()


def test_statement_that_understates_is_caught(tmp_path):
    run = fx.write_run(tmp_path)
    privacy = json.loads((run / "privacy.json").read_text())
    privacy["statements"][0]["epsilon"] *= 0.9
    (run / "privacy.json").write_text(json.dumps(privacy))
    statements = cross_check(load_run(run).privacy).statements
    assert [s["ok"] for s in statements] == [False, True]
    assert "claims epsilon" in statements[0]["detail"]


def test_metrics_that_understate_are_caught(tmp_path):
    run = fx.write_run(tmp_path)
    rows = load_run(run).rounds
    honest = cross_check(load_run(run).privacy, rows).metrics
    assert [c["key"] for c in honest] == ["epsilon-max", "user-level-epsilon"] and all(c["ok"] for c in honest)
    rows[-1]["epsilon-max"] *= 0.99
    checks = cross_check(load_run(run).privacy, rows).metrics
    assert [c["ok"] for c in checks] == [False, True] and "below" in checks[0]["detail"]


def test_tolerance_and_failed_accountants():
    assert same(10.0, 10.0 * (1 + REL_TOL / 2)) and not same(10.0, 10.0 * (1 + 3 * REL_TOL))
    assert same(0.0, 0.0) and same(math.inf, math.inf) and not same(math.inf, 1e9)
    # GDP fails (root finding) on this history; RDP and PRV still answer: n/a with a reason, no crash.
    out = recompute([(0.5, 1.0, 40)], 1e-5, "gdp")
    assert out["gdp"].value is None and "gdp" in out["gdp"].error
    assert math.isfinite(out["rdp"].value) and math.isfinite(out["prv"].value)
    # PRV as second accountant is skipped (not run out of memory) on a vacuous, huge history.
    out = recompute([(0.2, 1.0, 5000)], 1e-5, "rdp")
    assert out["prv"].value is None and "skipped" in out["prv"].error and out["rdp"].value > 1000


# ----------------------------------------------------------------------------- variants


def test_user_level_off_deployment_report(tmp_path, capsys):
    run = fx.write_run(tmp_path / "runs", user_dp=False, ledgers=False)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "report", run, "--out", out)
    assert code == 0, err
    assert len(stdout.strip().splitlines()) == 1 and "flagged devices: none" in stdout
    report = json.loads((out / "report.json").read_text())
    assert not (run / "report.json").exists()
    assert report["privacy"]["user-level"] is None and len(report["privacy"]["statements"]) == 1
    assert report["privacy"]["ledgers"].startswith("absent")
    assert {p["file"] for p in report["plots"]} == FIXTURE_PLOTS - {"user-epsilon-rounds.png"}
    assert all(d["ledger"] is None for d in report["privacy"]["devices"])
    assert "ledger epsilon" not in (out / "report.md").read_text()


def test_old_simulation_run_is_rebuilt_from_its_ledgers(tmp_path):
    run = fx.write_run(tmp_path, user_dp=False, tamper=("1", "ledger-epsilon"))
    (run / "privacy.json").unlink()
    assert main(["report", str(run)]) == EXIT_FLAGGED
    report = json.loads((run / "report.json").read_text())
    p = report["privacy"]
    assert p["source"] == "ledgers" and "privacy.json is missing" in p["reason"]
    assert p["flagged-devices"] == ["1"] and p["devices"][1]["flags"][0]["code"] == "reported-epsilon-mismatch"
    assert [s["mechanism"] for s in p["statements"]] == ["on-device DP-SGD"]
    assert "reconstructed from the device ledgers" in (run / "report.md").read_text().splitlines()[2]


def test_run_without_privacy_json_gets_a_report_saying_why(tmp_path, capsys):
    run = fx.write_run(tmp_path, ledgers=False)
    (run / "privacy.json").unlink()
    code, _, err = run_cli(capsys, "report", run)
    assert code == 0, err
    report = json.loads((run / "report.json").read_text())
    assert report["privacy"]["available"] is False and "privacy.json is missing" in report["privacy"]["reason"]
    md = (run / "report.md").read_text()
    assert "No privacy statement: privacy.json is missing" in md.splitlines()[2]
    assert "epsilon-histogram.png" not in {p["file"] for p in report["plots"]}
    assert '<table id="devices">' not in (run / "report.html").read_text()


def test_running_run_is_reported_as_partial(tmp_path):
    run = fx.write_run(tmp_path, user_dp=False, state="running")
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(metrics[:3]) + "\n")  # rounds 0-2 so far
    assert main(["report", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["run"]["state"] == "running" and report["run"]["completed"] is False
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert "not complete" in report["notes"][0] and report["notes"][0] in (run / "report.md").read_text()


def test_report_on_a_real_inprocess_run(tmp_path):
    """Today's ServerApp and devices on tiny data, user-level DP and a cap on: an honest run must come
    out with nothing flagged, every check passing, and every plot."""
    from tests.test_federation import run_federation

    cfg, run, _, rows, _ = run_federation(tmp_path, **{"num-rounds": 3, "user-dp": True, "max-epsilon": 60.0})
    if not (run / "config.json").exists():  # the ServerApp's main() writes it; the test harness does not
        (run / "config.json").write_text(json.dumps(cfg))
    assert main(["report", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    p = report["privacy"]
    assert [r["round"] for r in report["rounds"]] == [r["round"] for r in rows]
    assert {pl["file"] for pl in report["plots"]} == FIXTURE_PLOTS
    assert p["available"] and p["flagged-devices"] == [], [d["flags"] for d in p["devices"] if d["flags"]]
    assert all(s["check"]["ok"] for s in p["statements"]) and all(c["ok"] for c in p["metrics-checks"])
    assert [c["key"] for c in p["metrics-checks"]] == ["epsilon-max", "user-level-epsilon"]
    assert any(d["declined-round"] for d in p["devices"])  # the cap was reached
    assert all(d["recomputed"]["rdp"]["epsilon"] > 0 and d["ledger"]["epsilon"] for d in p["devices"])
    # The independent checks ran against the device's own data (the run's store) and dp-accounting.
    assert all(d["expected-history"]["basis"].startswith(("device data", "config sample-rate"))
               and d["independent"]["rdp"]["epsilon"] > 0 for d in p["devices"])
    assert p["flagged"] is False
    assert "protects nothing" in (run / "report.md").read_text().splitlines()[2]  # deterministic-devices first


# ----------------------------------------------------------------------------- bad input


def _corrupt_metrics(run: Path) -> str:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # a truncated line 3
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return "line 3"


def _wrong_type_in_metrics(run: Path) -> str:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    row = json.loads(lines[3])
    row["ndcg@10"] = "0.02"
    lines[3] = json.dumps(row)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return "line 4: ndcg@10"


def _corrupt_privacy(run: Path) -> str:
    text = (run / "privacy.json").read_text()
    (run / "privacy.json").write_text(text[: len(text) // 2])
    return "privacy.json"


def _bad_config(run: Path) -> str:
    config = json.loads((run / "config.json").read_text())
    config["delta"] = "1e-5"
    (run / "config.json").write_text(json.dumps(config))
    return "config.json: delta"


def _bad_history(run: Path) -> str:
    privacy = json.loads((run / "privacy.json").read_text())
    privacy["devices"]["1"]["history"] = [[1.0, 0.5]]
    (run / "privacy.json").write_text(json.dumps(privacy))
    return "devices['1'].history[0]"


@pytest.mark.parametrize("damage", [
    lambda run: (shutil.rmtree(run), "does not exist")[1],
    lambda run: ((run / "config.json").unlink(), "not a run directory")[1],
    lambda run: ((run / "metrics.jsonl").unlink(), "no metrics.jsonl")[1],
    _corrupt_metrics,
    _wrong_type_in_metrics,
    _corrupt_privacy,
    _bad_history,
    _bad_config,
], ids=["missing", "not-a-run", "no-metrics", "truncated-metrics-line", "metrics-wrong-type", "truncated-privacy",
         "bad-history",
        "bad-config"])
def test_bad_run_directory_is_one_line_error(tmp_path, capsys, damage):
    run = fx.write_run(tmp_path, user_dp=False)
    needle = damage(run)
    code, out, err = run_cli(capsys, "report", run)
    assert_user_error(code, err, needle)
    if needle == "line 3":
        assert "metrics.jsonl" in err
    assert not (run / "report.html").exists()


def test_failed_report_leaves_the_previous_one_intact(tmp_path, capsys):
    run = fx.write_run(tmp_path, user_dp=False)
    assert run_cli(capsys, "report", run)[0] == 0
    before = {p.name: p.read_bytes() for p in run.glob("report.*")}
    _corrupt_metrics(run)
    assert run_cli(capsys, "report", run)[0] == 2
    assert {p.name: p.read_bytes() for p in run.glob("report.*")} == before


def test_unwritable_out_is_one_line_error(tmp_path, capsys):
    run = fx.write_run(tmp_path, user_dp=False)
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(capsys, "report", run, "--out", tmp_path / "file")
    assert_user_error(code, err, "not a directory")
    code, _, err = run_cli(capsys, "report", run, "--out", tmp_path / "file" / "sub")
    assert_user_error(code, err, "cannot write the report")


# ----------------------------------------------------------------------------- a real browser


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed: headless rendering not checked")
def test_chromium_renders_tables_and_images(sim, tmp_path):
    run, report = sim
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", (run / "report.html").as_uri()],
        capture_output=True, text=True, timeout=60, check=True).stdout
    assert '<table id="rounds">' in dom and '<table id="devices">' in dom
    assert dom.count('<img src="data:image/png;base64,') == len(report["plots"])
    assert "ledger-below-server" in dom
