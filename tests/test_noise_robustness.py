"""The research rules of `simulations/noise_robustness.py` (none reached the product): each does what it says, and
with no rule the replay is the product's pipeline unchanged."""

import math

import numpy as np
import pytest
import torch

from simulations import noise_robustness as nr
from simulations.population_utility import running_average, scorer_releases, server_tau
from simulations.release_denoise import denoise_release, universal_threshold
from simulations.scorer_schedule import fedadam_state, fedadam_step


def test_universal_threshold_removes_pure_noise_and_keeps_a_strong_cell():
    rng = np.random.default_rng(0)
    cells, z = 4950, 2.76
    assert universal_threshold(z, cells) == pytest.approx(z * math.sqrt(2 * math.log(cells)))
    noise = rng.normal(0.0, z, cells)
    assert np.count_nonzero(denoise_release(noise, z, cells, "universal")) <= 0.005 * cells
    signal = noise.copy()
    signal[0] += 100.0
    assert denoise_release(signal, z, cells, "universal")[0] == pytest.approx(
        signal[0] - universal_threshold(z, cells))


def test_spectral_rule_drops_the_noise_bulk_and_keeps_a_rank_one_signal():
    rng = np.random.default_rng(1)
    k, z = 100, 3.0
    upper = np.triu(rng.normal(0.0, z, (k, k)), 1)
    noise = upper + upper.T
    assert np.abs(denoise_release(noise, z, k * (k - 1) // 2, "spectral")).max() < 1e-9
    u = rng.random(k) + 0.5
    signal = 2.0 * np.outer(u, u)  # top eigenvalue ~ 2 |u|^2, far above the edge 2 z sqrt(k) = 60
    np.fill_diagonal(signal, 0.0)
    out = denoise_release(signal + noise, z, k * (k - 1) // 2, "spectral")
    assert np.diag(out) == pytest.approx(np.zeros(k))
    assert np.linalg.norm(out - signal) < 0.5 * np.linalg.norm(noise)


def test_bayes_rule_is_closer_to_the_truth_and_keeps_exact_zeros():
    rng = np.random.default_rng(2)
    truth = np.concatenate([np.zeros(800), rng.exponential(10.0, 800)])
    released = truth + rng.normal(0.0, 5.0, truth.shape)
    released[0] = 0.0  # padding: not released
    out = denoise_release(released, 5.0, len(released) - 1, "bayes")
    assert out[0] == 0.0 and (out >= 0).all()
    assert np.mean((out - truth) ** 2) < 0.7 * np.mean((released - truth) ** 2)
    assert np.array_equal(denoise_release(released, 0.0, len(released) - 1, "bayes"), released)


def test_no_rule_leaves_the_releases_as_the_product_uses_them():
    rng = np.random.default_rng(3)
    hist, cooc = rng.normal(5.0, 3.0, 50), rng.normal(0.0, 1.0, (6, 6))
    out_hist, (items, out_cooc) = scorer_releases(hist, np.arange(6), cooc, (4.6, 2.76, 3.22), {})
    assert np.array_equal(out_hist, hist) and np.array_equal(out_cooc, cooc)
    with pytest.raises(ValueError, match="unknown denoise rule"):
        denoise_release(hist, 1.0, 49, "median")


def test_fedadam_tau_default_is_flowers_and_the_noise_rule_shrinks_the_step():
    assert server_tau("flower", 3.22, 1.0, 236.0) == 1e-3
    assert server_tau("noise-std", 3.22, 1.0, 236.0) == pytest.approx(3.22 / 236.0)
    assert server_tau("noise-std", 0.0, 1.0, 236.0) == 1e-3

    def moved(tau):
        model = torch.nn.Linear(3, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        kwargs = {} if tau is None else {"tau": tau}
        fedadam_step(model, fedadam_state(model), {"weight": torch.full((1, 3), 0.01)}, 1, 0.5, **kwargs)
        return float(model.weight.detach().abs().max())
    assert moved(None) == pytest.approx(moved(1e-3))  # the default is the former hard-coded tau
    assert moved(0.0136) < 0.6 * moved(1e-3)


def test_running_average_is_the_mean_of_the_rounds_models():
    model = torch.nn.Linear(2, 1, bias=False)
    average = None
    values = [1.0, 2.0, 6.0]
    for r, v in enumerate(values, start=1):
        torch.nn.init.constant_(model.weight, v)
        average = running_average(average, model, r)
    assert average["weight"] == pytest.approx(torch.full((1, 2), 3.0))


def test_diagnosis_scales_one_multiplier_at_a_time():
    arms = nr.diagnose_arms()
    base = arms["x1"]
    for i, name in enumerate(nr.SHIPPED):
        scaled = arms[f"{name} x{nr.FACTOR}"]
        assert [s / b for s, b in zip(scaled, base)] == pytest.approx(
            [nr.FACTOR if j == i else 1.0 for j in range(3)])
    assert arms[f"all x{nr.FACTOR}"] == pytest.approx(tuple(nr.FACTOR * b for b in base))
