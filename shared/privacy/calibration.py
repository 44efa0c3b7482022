"""Choose a noise multiplier for a target epsilon (Opacus' accountant utilities, nothing hand-rolled).

On-device DP-SGD: a device that joins `rounds` rounds composes `rounds * steps_per_round` sampled
Gaussian steps at Poisson rate q = `sample-rate`, with `steps_per_round = local-epochs x ceil(1 / q)`
(config values, the same for every device). User-level DP-FedAvg:
one sampled Gaussian release per round at the device sampling rate. Both are the same question
for the accountant: the smallest sigma such that `steps` steps at rate q stay within epsilon.
"""

from __future__ import annotations

import warnings

from shared.errors import PrivrecError
from shared.privacy.accounting import ACCOUNTANTS, epsilon_from_state


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


def check_calibration(sigma: float, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str = "rdp") -> float:
    """The epsilon `sigma` actually gives (the same accountant, recomputed independently of the search)."""
    state = {"history": [[sigma, sample_rate, int(steps)]], "mechanism": accountant}
    return epsilon_from_state(state, delta, accountant)
