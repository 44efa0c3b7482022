"""Accounting math on JSON accountant states: matches Opacus accountants, composes, validates."""

import json
import warnings

import pytest

from shared.errors import PrivrecError
from shared.privacy.accounting import (
    compose_history,
    epsilon_from_state,
    from_json_state,
    history_steps,
    to_json_state,
)


def opacus_accountant(name):
    from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant}[name]()


def test_no_history_is_zero():
    assert epsilon_from_state(None, 1e-5) == 0.0
    assert epsilon_from_state({"history": [], "mechanism": "rdp"}, 1e-5) == 0.0


@pytest.mark.parametrize("name", ["rdp", "gdp"])
def test_matches_opacus_accountant(name):
    acc = opacus_accountant(name)
    for _ in range(30):
        acc.step(noise_multiplier=1.2, sample_rate=0.1)
    state = json.loads(json.dumps(to_json_state(acc.state_dict())))  # survives JSON
    assert state == {"history": [[1.2, 0.1, 30]], "mechanism": name}
    assert epsilon_from_state(state, 1e-5, name) == acc.get_epsilon(delta=1e-5)
    assert history_steps(state) == 30


def test_heterogeneous_rdp_history_composes():
    acc = opacus_accountant("rdp")
    for sigma, q, n in [(1.0, 0.1, 5), (2.0, 0.2, 7)]:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    a = {"history": [[1.0, 0.1, 5]], "mechanism": "rdp"}
    b = {"history": [[2.0, 0.2, 7]], "mechanism": "rdp"}
    both = compose_history(a, b)
    assert both["history"] == [[1.0, 0.1, 5], [2.0, 0.2, 7]]
    eps = epsilon_from_state(both, 1e-5, "rdp")
    assert eps == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-12)
    assert eps > epsilon_from_state(a, 1e-5) and eps > epsilon_from_state(b, 1e-5)
    # identical parameters merge into one entry
    merged = compose_history(a, {"history": [[1.0, 0.1, 3]], "mechanism": "rdp"})
    assert merged["history"] == [[1.0, 0.1, 8]]


def test_errors_are_privrec_errors():
    state = {"history": [[1.0, 0.1, 5]], "mechanism": "rdp"}
    with pytest.raises(PrivrecError, match="delta"):
        epsilon_from_state(state, 0.0)
    with pytest.raises(PrivrecError, match="accountant"):
        epsilon_from_state(state, 1e-5, "moments")
    with pytest.raises(PrivrecError, match="prv"):
        from_json_state(state, "prv")
    with pytest.raises(PrivrecError, match="gdp"):
        epsilon_from_state(
            {"history": [[1.0, 0.1, 5], [2.0, 0.1, 5]], "mechanism": "gdp"}, 1e-5, "gdp"
        )
    with pytest.raises(PrivrecError, match="mechanisms"):
        compose_history(state, {"history": [], "mechanism": "prv"})
    with pytest.raises(PrivrecError, match="history"):
        epsilon_from_state({"history": [[1.0, 0.1]], "mechanism": "rdp"}, 1e-5)


def test_user_level_epsilon_scaled_rdp_curve_equals_opacus_accountant():
    """The server's per-round epsilon scales one cached per-round RDP curve by the rounds; it must be
    exactly Opacus' RDPAccountant over the same history (a wrong order set or a missing factor differs)."""
    from shared.privacy.accounting import epsilon_from_state
    from shared.privacy.user_level import user_level_epsilon, user_level_state

    for z, q in ((1.0, 256 / 943), (2.5, 0.25), (0.7, 0.01)):
        for rounds in (1, 2, 7, 60):
            expected = epsilon_from_state(user_level_state(z, q, rounds, "rdp"), 1e-5, "rdp")
            assert user_level_epsilon(z, q, rounds, 1e-5, "rdp") == pytest.approx(expected, rel=1e-12)
    assert user_level_epsilon(1.0, 0.25, 0, 1e-5, "rdp") == 0.0
