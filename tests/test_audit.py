"""`privrec audit`: the one-run lower bound (Steinke, Nasr and Jagielski 2023) and the device audit on the
real training path. A correct configuration's bound stays below its claim; a broken one's does not."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from shared.config import resolve
from shared.errors import PrivrecError
from shared.privacy.audit import epsilon_lower_bound, guess, p_value
from tests.test_cli import run_cli
from tools.audit import audit_device, audit_users
from tools.cli import EXIT_FLAGGED

# A tiny model: every audit below trains and scores 400 canaries in a few seconds.
TINY = {"max-len": 7, "window": 8, "hidden-size": 16, "num-heads": 1, "num-blocks": 1, "dropout": 0.0,
        "local-epochs": 1, "batch-size": 8, "sample-rate": 0.04, "local-lr": 0.01, "deterministic-devices": True}
CANARIES, ITEMS = 400, 200


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- the statistics


def _p_value_by_hand(m, r, v, eps, delta):
    """The theorem's right-hand side, term by term with exact binomial sums (no scipy)."""
    p = math.exp(eps) / (1 + math.exp(eps))

    def pmf(j):
        return math.comb(r, j) * p ** j * (1 - p) ** (r - j)

    tail = sum(pmf(j) for j in range(v, r + 1))
    spread = max(sum(pmf(j) for j in range(v - i, v)) / i for i in range(1, v + 1))
    return min(1.0, tail + 2 * m * delta * spread)


@pytest.mark.parametrize("m, r, v, eps, delta", [
    (100, 20, 15, 0.5, 1e-5), (1000, 60, 50, 1.0, 1e-5), (50, 50, 50, 2.0, 1e-3), (10, 10, 3, 0.1, 0.01)])
def test_p_value_is_the_theorem(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(_p_value_by_hand(m, r, v, eps, delta), rel=1e-9)


def test_lower_bound_is_the_largest_rejected_epsilon():
    eps = epsilon_lower_bound(1000, 100, 90, 1e-5, 0.05)
    assert p_value(1000, 100, 90, eps, 1e-5) < 0.05 <= p_value(1000, 100, 90, eps + 1e-6, 1e-5)
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance: nothing rejected
    # All correct: the bound grows with the number of guesses, and is finite.
    bounds = [epsilon_lower_bound(1000, r, r, 1e-5) for r in (20, 100, 500)]
    assert bounds == sorted(bounds) and math.isfinite(bounds[-1]) and bounds[0] > 1
    with pytest.raises(PrivrecError):
        epsilon_lower_bound(10, 5, 6, 1e-5)


def test_bound_on_randomised_response_is_below_its_epsilon_at_the_confidence():
    """epsilon-DP randomised response: each guess is right with probability e^eps / (1 + e^eps), the
    worst case the theorem allows. The bound may exceed eps in at most beta of the trials."""
    rng = np.random.default_rng(7)
    eps, beta, m, trials = 1.0, 0.05, 300, 200
    p = math.exp(eps) / (1 + math.exp(eps))
    over = sum(epsilon_lower_bound(m, m, int(rng.binomial(m, p)), 1e-6, beta) > eps for _ in range(trials))
    assert over / trials <= beta + 0.04
    # ... and it is not vacuous: at the same accuracy it usually finds most of eps.
    assert epsilon_lower_bound(m, m, int(round(m * p)), 1e-6, beta) > 0.5 * eps


def test_guesses_take_the_extremes():
    scores = np.array([5.0, -3.0, 0.1, 4.0, -2.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    assert guess(scores, included, 2, 2) == (4, 3)  # in: 5 (yes), 4 (no); out: -3 (yes), -2 (yes)
    with pytest.raises(PrivrecError):
        guess(scores, included, 4, 3)


# ----------------------------------------------------------------------------- the device audit


def test_correct_config_bound_never_exceeds_its_claim():
    cfg = resolve(None, TINY)  # on-device DP-SGD as configured by default: noise 1.0, clip 1.0
    result = audit_device(cfg, canaries=CANARIES, num_items=ITEMS, seed=1)
    assert result.dp and result.claimed_epsilon is not None and math.isfinite(result.claimed_epsilon)
    assert result.epsilon_lower_bound <= result.claimed_epsilon
    assert not result.violated
    assert 0.3 * CANARIES < result.included < 0.7 * CANARIES and result.guesses == 2 * (CANARIES // 10)


def test_broken_configs_show_a_large_bound_that_exceeds_the_claim():
    """Noise and clipping off (dp = false), and noise all but off (0.01): both leak far more than a
    properly noised run claims, and the audit sees it."""
    claimed = audit_device(resolve(None, {**TINY, "noise-multiplier": 4.0}), canaries=CANARIES, num_items=ITEMS,
                           seed=2)
    assert claimed.epsilon_lower_bound <= claimed.claimed_epsilon < 1.0
    off = audit_device(resolve(None, {**TINY, "dp": False}), canaries=CANARIES, num_items=ITEMS, seed=2)
    assert off.claimed_epsilon is None and off.epsilon_lower_bound > 1.5
    assert off.epsilon_lower_bound > claimed.claimed_epsilon  # what the noised run claims is false without noise
    faint = audit_device(resolve(None, {**TINY, "noise-multiplier": 0.01}), canaries=CANARIES, num_items=ITEMS,
                         seed=2)
    assert faint.epsilon_lower_bound > 1.0 and faint.epsilon_lower_bound > 5 * claimed.epsilon_lower_bound + 0.5
    assert faint.epsilon_lower_bound <= faint.claimed_epsilon  # its own (huge) claim is still honest


def test_audit_command(tmp_path, capsys):
    out = tmp_path / "audit.json"
    sets = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    code, stdout, err = run_cli(capsys, "audit", *sets, "--canaries", "200", "--items", str(ITEMS), "--out", out)
    assert code == 0, err
    assert stdout.startswith("empirical epsilon lower bound") and "claimed epsilon" in stdout
    data = json.loads(out.read_text())
    assert data["canaries"] == 200 and data["epsilon-lower-bound"] <= data["claimed-epsilon"]
    code, _, err = run_cli(capsys, "audit", *sets, "--canaries", "200", "--guesses", "150")
    assert code == 2 and "--guesses 150" in err
    assert EXIT_FLAGGED == 3


# ----------------------------------------------------------------------------- user-level DP-FedAvg

USERS = {**TINY, "dp": False, "user-dp": True, "user-clipping-norm": 0.5}


def test_user_level_correct_config_bound_never_exceeds_its_claim():
    result = audit_users(resolve(None, {**USERS, "user-noise-multiplier": 1.0}), canaries=200, num_items=ITEMS,
                         seed=1)
    assert result.epsilon_lower_bound <= result.claimed_epsilon and not result.violated


def test_user_level_without_noise_shows_a_large_bound():
    strong = audit_users(resolve(None, {**USERS, "user-noise-multiplier": 8.0}), canaries=200, num_items=ITEMS,
                         rounds=2, seed=1)
    faint = audit_users(resolve(None, {**USERS, "user-noise-multiplier": 0.001}), canaries=200, num_items=ITEMS,
                        rounds=2, seed=1)
    assert faint.epsilon_lower_bound > 1.0 and faint.epsilon_lower_bound > strong.claimed_epsilon
    assert strong.epsilon_lower_bound <= strong.claimed_epsilon < 1.0


def test_audit_exits_3_when_the_bound_exceeds_the_claim(monkeypatch, capsys):
    """A claim the measurement refutes (here a faked one: the real mechanism never produces it) fails the command."""
    import tools.audit

    real = tools.audit.audit_device

    def refuted(cfg, **kwargs):
        result = real(cfg, **kwargs)
        result.claimed_epsilon = result.epsilon_lower_bound - 0.1
        return result

    monkeypatch.setattr(tools.audit, "audit_device", refuted)
    sets = [arg for key, value in {**TINY, "noise-multiplier": 0.01}.items() for arg in ("--set", f"{key}={value}")]
    code, stdout, err = run_cli(capsys, "audit", *sets, "--canaries", "200", "--items", str(ITEMS))
    assert code == EXIT_FLAGGED and "claim is false" in err


# ----------------------------------------------------------------------------- the pipeline's analytics releases

@pytest.mark.parametrize("kind", ["popularity", "cooccurrence"])
def test_a_release_at_the_pipelines_noise_leaks_less_than_it_claims(kind):
    from shared.config import resolve_run
    from tools.audit import audit_release

    cfg = resolve_run(overrides={"deterministic-devices": True})  # the default pipeline's noise multipliers
    for seed in (1, 2):
        result = audit_release(cfg, kind, canaries=600, seed=seed)
        assert result.noise_multiplier == cfg["popularity-noise-multiplier" if kind == "popularity"
                                              else "cooc-noise-multiplier"]
        assert result.epsilon_lower_bound <= result.claimed_epsilon and not result.violated
        assert 0.3 * 600 < result.included < 0.7 * 600 and result.guesses == 120


@pytest.mark.parametrize("kind,released_by", [("popularity", "noisy_sum"), ("cooccurrence", "gaussian_release")])
def test_a_release_that_lost_its_noise_is_caught(kind, released_by, monkeypatch, capsys):
    """The claim is computed from the configured noise; a release that adds almost none (a broken mechanism)
    leaks more than that claim allows, and the command fails."""
    import shared.analytics

    real = getattr(shared.analytics, released_by)
    monkeypatch.setattr(shared.analytics, released_by, lambda total, z, rng: real(total, 0.01, rng))
    code, stdout, err = run_cli(capsys, "audit", "--release", kind, "--canaries", "600")
    assert code == EXIT_FLAGGED and "claim is false" in err
    bound = float(stdout.split("lower bound ")[1].split()[0])
    claimed = float(stdout.split("claimed epsilon ")[1].split()[0])
    assert bound > 3.0 > claimed  # every guess right, against a claim under 2


def test_a_release_audit_with_more_canaries_than_coordinates_is_refused_in_one_line(capsys):
    from tests.test_cli import assert_user_error

    code, _, err = run_cli(capsys, "audit", "--release", "cooccurrence", "--set", "cooc-items=10", "--canaries", "50")
    assert_user_error(code, err, "--canaries 50: need 2 to 45")
    code, _, err = run_cli(capsys, "audit", "--release", "popularity", "--user-level")
    assert_user_error(code, err, "--release and --user-level audit different mechanisms")
