"""PRV's memory guard: sized like Opacus sizes its grid, shared by `privrec calibrate` and the report."""

from __future__ import annotations

import time

import pytest
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

from shared.privacy.accounting import PRV_MAX_BYTES, prv_grid_points, prv_too_costly
from tools.cli import main as cli_main
from tools.report.recompute import recompute


@pytest.mark.parametrize("history", [[(1.0, 0.01, 1000)], [(0.8, 0.1, 3000)], [(2.0, 1.0, 200), (1.5, 0.5, 40)]])
def test_grid_size_is_the_one_opacus_builds(history):
    delta = 1e-5
    domain = PRVAccountant()._get_domain(
        prvs=[PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history],
        num_self_compositions=[n for _, _, n in history], eps_error=0.01, delta_error=delta / 1000)
    assert prv_grid_points(history, delta) == domain.size


def test_guard_refuses_what_cannot_fit_and_allows_the_usual():
    assert prv_too_costly([(1.0, 0.01, 1000)], 1e-5) is None
    reason = prv_too_costly([(1.0, 0.01, 100_000 * 1000)], 1e-5)
    assert "100,000,000 steps" in reason and "GB" in reason and f"{PRV_MAX_BYTES / 1e9:.1f} GB" in reason


@pytest.fixture
def no_prv(monkeypatch):
    def forbidden(self, *args, **kwargs):
        raise AssertionError("PRV must not be computed for this history")

    monkeypatch.setattr(PRVAccountant, "get_epsilon", forbidden)


def test_calibrate_prv_too_large_is_refused_before_computing(capsys, no_prv):
    # 100,000 rounds x 1,000 steps at q 0.01 reached 19.7 GB before it was killed.
    start = time.perf_counter()
    code = cli_main(["calibrate", "--accountant", "prv", "--target-epsilon", "8", "--sample-rate", "0.01",
                     "--rounds", "100000", "--steps-per-round", "1000"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--accountant prv refused" in err and "GB" in err and "--accountant rdp" in err
    assert time.perf_counter() - start < 30


def test_calibrate_prv_within_bounds_still_calibrates(capsys):
    assert cli_main(["calibrate", "--accountant", "prv", "--target-epsilon", "8", "--sample-rate", "1",
                     "--rounds", "4"]) == 0
    assert "PRV accountant" in capsys.readouterr().out


def test_report_skips_a_second_prv_with_the_same_guard(no_prv):
    out = recompute([(1.0, 0.01, 100_000_000)], 1e-5, "rdp")
    assert out["rdp"].value is not None
    assert out["prv"].value is None and out["prv"].error.startswith("skipped: PRV would discretise")
