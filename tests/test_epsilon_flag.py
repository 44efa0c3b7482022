"""`--epsilon E`: the private pipeline's noise multipliers scaled by one factor to reach a whole-run user-level
epsilon, checked against dp-accounting (another code base)."""

from __future__ import annotations

import dp_accounting as dpa
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from shared.config import CONTENT_SCORER_PIPELINE, resolve_run
from shared.errors import PrivrecError
from shared.privacy.pipeline import noise_keys, planned_epsilon, scale_to_epsilon
from tools.options import apply_epsilon

Q = 236 / 943  # the default cohort over ML-100K's devices


def _dp_accounting_rdp(cfg: dict, q: float) -> float:
    """The same composition in dp-accounting: one Gaussian per release, then the Poisson-sampled rounds."""
    events = [dpa.GaussianDpEvent(cfg[k]) for k in noise_keys(cfg) if k != "user-noise-multiplier"]
    events.append(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(
        cfg["user-noise-multiplier"])), cfg["num-rounds"]))
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dpa.ComposedDpEvent(events))
    return accountant.get_epsilon(cfg["delta"])


@pytest.mark.parametrize("target", [1.0, 8.0])
@pytest.mark.parametrize("overrides", [{}, {"transition-release": True}, CONTENT_SCORER_PIPELINE],
                         ids=["channel-scorer", "with-transitions", "content-scorer"])
def test_the_smallest_common_factor_reaches_the_target_and_keeps_the_split(target, overrides):
    cfg = resolve_run(overrides=overrides)
    multipliers, reached = scale_to_epsilon(cfg, Q, target)
    assert set(multipliers) == set(noise_keys(cfg))
    assert ("cooc-noise-multiplier" in multipliers) == (cfg["model"] == "channel-scorer")
    assert ("transition-noise-multiplier" in multipliers) == bool(cfg["transition-release"])
    scaled = {**cfg, **multipliers}
    assert reached == pytest.approx(planned_epsilon(scaled, Q), rel=1e-12) and reached <= target
    # the smallest: 0.2% less noise everywhere (more than the 4-digit rounding) is over the target
    assert planned_epsilon({**cfg, **{k: z / 1.002 for k, z in multipliers.items()}}, Q) > target
    factors = [multipliers[k] / cfg[k] for k in multipliers]
    assert max(factors) / min(factors) < 1.001  # one factor: the budget's split between releases and rounds kept
    assert reached == pytest.approx(_dp_accounting_rdp(scaled, Q), rel=0.03)  # a second code base agrees


def test_the_flag_rewrites_the_run_config_and_says_what_it_did(capsys):
    cfg = resolve_run()
    apply_epsilon(cfg, 1.0, 943)
    assert cfg["target-epsilon"] == 1.0
    assert (cfg["popularity-noise-multiplier"], cfg["cooc-noise-multiplier"], cfg["user-noise-multiplier"]) == \
        (8.569, 5.142, 5.999)  # README's epsilon-1 row (8.569, 5.141, 5.998): bisection width 1e-3 there, 1e-6 here
    out = capsys.readouterr().out
    assert "popularity release 4.6 -> 8.569, co-occurrence release 2.76 -> 5.142, rounds 3.22 -> 5.999" in out
    assert "user-level epsilon 1.000 <= 1 (rdp, delta 1e-05, 943 devices)" in out


@pytest.mark.parametrize("model_keys,epsilon,words", [
    ({"model": "sasrec"}, 2.0, "not of model = sasrec"),
    ({}, 0.0, "--epsilon 0: the user-level epsilon to reach must be > 0"),
])
def test_what_the_flag_cannot_do_is_refused_in_one_line(model_keys, epsilon, words):
    cfg = resolve_run(overrides=model_keys)
    with pytest.raises(PrivrecError) as err:
        apply_epsilon(cfg, epsilon, 943)
    assert words in str(err.value) and "\n" not in str(err.value)
