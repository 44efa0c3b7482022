"""Post-processing rules for a DP release, tried against the product's noise (issue 13; none is in the product).

`simulations/noise_robustness.py` measured each of them on the product's in-process pipeline at the shipped noise
and at the accounted selection's factor 1.397; none met the adoption rule (README, "Robust to noise"), so none is
a product option. Each is a function of the released cells and public quantities only (the noise multiplier, the
number of released cells, the matrix size): post-processing, no privacy spend.
"""

from __future__ import annotations

import math

import numpy as np

# ---------------------------------------------------------------- denoising a release (post-processing)
# `universal`: every cell of a released sum of non-negative per-user contributions is lowered by the universal
# threshold z sqrt(2 ln cells) (Donoho & Johnstone): the largest of `cells` independent N(0, z^2) draws is about
# that size, so a cell above it is unlikely to be noise alone; the positive part is kept (true sums are >= 0).
# `bayes`: every cell becomes its posterior mean E[S | x] under x = S + N(0, z^2), the prior of S the
# non-parametric maximum-likelihood estimate (Kiefer & Wolfowitz; EM on a fixed grid of BAYES_GRID points over
# [0, the largest released cell]) fitted to the release itself (empirical Bayes). Grid and iterations are
# numerical settings fixed before any run, not tuned.
# `spectral` (a symmetric K x K release only): the eigen-components whose |eigenvalue| exceeds 2 z sqrt(K), the
# edge of the semicircle of a symmetric matrix of N(0, z^2) noise (Wigner), are kept, the noise's bulk dropped;
# the diagonal (never released) stays 0.
DENOISE_RULES = ("none", "universal", "bayes", "spectral")
BAYES_GRID, BAYES_ITERATIONS = 200, 300


def universal_threshold(noise_multiplier: float, cells: int) -> float:
    """z sqrt(2 ln cells): the universal threshold of `cells` N(0, z^2) noise draws (0 for one cell or none)."""
    return float(noise_multiplier) * math.sqrt(2.0 * math.log(cells)) if cells > 1 else 0.0


def denoise_release(released: np.ndarray, noise_multiplier: float, cells: int, rule: str) -> np.ndarray:
    """The release as the scorer would use it: unchanged (`none`), soft-thresholded at `universal_threshold` and
    clipped at 0 (`universal`), posterior means (`bayes`) or the eigen-components above the noise's edge
    (`spectral`). `cells`: the number of released noisy coordinates (not padding or mirrors)."""
    released = np.asarray(released, dtype=np.float64)
    if rule == "none":
        return released
    if rule == "universal":
        return np.maximum(released - universal_threshold(noise_multiplier, cells), 0.0)
    if rule == "bayes":
        return bayes_posterior_mean(released, noise_multiplier)
    if rule == "spectral":
        return spectral_denoise(released, noise_multiplier)
    raise ValueError(f"unknown denoise rule {rule!r} (expected one of {', '.join(DENOISE_RULES)})")


def spectral_denoise(released: np.ndarray, noise_multiplier: float) -> np.ndarray:
    """The symmetric release without the eigen-components under the noise's spectral edge 2 z sqrt(K)."""
    released = np.asarray(released, dtype=np.float64)
    if released.ndim != 2 or released.shape[0] != released.shape[1] or not np.allclose(released, released.T):
        raise ValueError("the spectral rule needs a symmetric square release")
    values, vectors = np.linalg.eigh(released)
    kept = np.abs(values) > 2.0 * noise_multiplier * math.sqrt(released.shape[0])
    out = (vectors[:, kept] * values[kept]) @ vectors[:, kept].T
    np.fill_diagonal(out, 0.0)
    return out


def bayes_posterior_mean(released: np.ndarray, noise_multiplier: float) -> np.ndarray:
    """E[S | x] cell by cell, the prior of the true sums S >= 0 estimated from the release (NPMLE by EM on a grid).
    The release's exact zeros (padding, a matrix's diagonal and mirrors of them) stay 0; z = 0 returns it as is."""
    released = np.asarray(released, dtype=np.float64)
    cells = released != 0.0
    x = released[cells]
    if noise_multiplier <= 0 or x.size == 0:
        return released.copy()
    grid = np.linspace(0.0, max(float(x.max()), 0.0), BAYES_GRID)
    likelihood = np.exp(-0.5 * ((x[:, None] - grid[None, :]) / noise_multiplier) ** 2)
    likelihood /= likelihood.max(axis=1, keepdims=True)  # per-row scale: cancels in every posterior
    weights = np.full(len(grid), 1.0 / len(grid))
    for _ in range(BAYES_ITERATIONS):
        posterior = likelihood * weights
        posterior /= posterior.sum(axis=1, keepdims=True)
        weights = posterior.mean(axis=0)
    posterior = likelihood * weights
    out = np.zeros_like(released)
    out[cells] = (posterior @ grid) / posterior.sum(axis=1)
    return out
