"""Choose a noise multiplier for a target epsilon (Opacus' accountant utilities, nothing hand-rolled).

On-device DP-SGD: a device that joins `rounds` rounds composes `rounds * steps_per_round` sampled
Gaussian steps at Poisson rate q = `sample-rate`, with `steps_per_round = local-epochs x ceil(1 / q)`
(config values, the same for every device). User-level DP-FedAvg:
one sampled Gaussian release per round at the device sampling rate. Both are the same question
for the accountant: the smallest sigma such that `steps` steps at rate q stay within epsilon.

PRV's memory grows with the step count and epsilon (`shared.privacy.accounting.prv_too_costly`);
its search is refused, before it starts, when the grid at the smallest noise multiplier it would
try does not fit.
"""

from __future__ import annotations

import warnings

from shared.errors import PrivrecError
from shared.privacy.accounting import ACCOUNTANTS, epsilon_from_state, prv_too_costly


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """Noise multiplier reaching at most `target_epsilon` at `delta` after `steps` steps at rate `sample_rate`."""
    from opacus.accountants.utils import get_noise_multiplier

    checks = [("target_epsilon", target_epsilon, target_epsilon > 0), ("delta", delta, 0 < delta < 1),
              ("sample_rate", sample_rate, 0 < sample_rate <= 1), ("steps", steps, steps >= 1),
              ("accountant", accountant, accountant in ACCOUNTANTS)]
    for name, value, ok in checks:
        if not ok:
            raise PrivrecError(f"calibration: {name}={value!r} is out of range")
    if accountant == "prv":
        _refuse_costly_prv(target_epsilon, delta, sample_rate, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sigma = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                               sample_rate=sample_rate, steps=int(steps), accountant=accountant,
                                               epsilon_tolerance=0.005))
        except ValueError as exc:
            raise PrivrecError(f"calibration: no noise multiplier reaches epsilon {target_epsilon} at delta "
                               f"{delta} ({exc})") from None
    return sigma


def _refuse_costly_prv(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> None:
    """PrivrecError before PRV's search starts if its grid would not fit in memory.

    Opacus' `get_noise_multiplier` tries sigma = 20 first, doubles it until epsilon is below the
    target, then bisects down from there: the smallest sigma it tries is min(20, just over half the
    answer). PRV's answer is at most RDP's and, in the regimes we measured, at least 0.8 of it, so
    the grid at min(20, 0.4 x RDP's sigma) is the largest the search builds. RDP's calibration
    costs milliseconds.
    """
    sigma_rdp = calibrate_noise(target_epsilon, delta, sample_rate, steps, "rdp")
    smallest_tried = min(20.0, 0.4 * sigma_rdp)
    reason = prv_too_costly([(smallest_tried, sample_rate, int(steps))], delta)
    if reason:
        raise PrivrecError(f"calibration with --accountant prv refused: {reason}. RDP's bound needs noise "
                           f"multiplier {sigma_rdp:.4f} for epsilon {target_epsilon:g} (--accountant rdp)")


def check_calibration(sigma: float, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str = "rdp") -> float:
    """The epsilon `sigma` actually gives (the same accountant, recomputed independently of the search)."""
    state = {"history": [[sigma, sample_rate, int(steps)]], "mechanism": accountant}
    return epsilon_from_state(state, delta, accountant)
