"""train_local: DP accounting across rounds, learning, FedProx, validation, edge cases."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from shared.errors import PrivrecError
from shared.model import ModelConfig, SASRec
from shared.training import (
    LocalTrainConfig,
    accountant_epsilon,
    dp_steps_per_epoch,
    sequence_loss,
    split_windows,
    train_local,
)

N = 20
W = 8


def windows(n=48, seed=0, pad_every=4):
    """Learnable synthetic windows: item t+1 = item t + 1 (mod N); some left-padded."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, N, n)
    w = ((start[:, None] + np.arange(W)[None]) % N + 1).astype(np.int64)
    for i in range(0, n, pad_every):
        w[i, : rng.integers(1, W - 1)] = 0
    return w


def model(seed=0):
    torch.manual_seed(seed)
    return SASRec(
        ModelConfig(
            num_items=N, max_len=W - 1, hidden_size=16, num_heads=2, num_blocks=1, dropout=0.0
        )
    )


def eval_loss(m, w):
    x, y = split_windows(w)
    m.eval()
    with torch.no_grad():
        loss = float(sequence_loss(m(x), y))
    m.train()
    return loss


def continuous(accountant, sigma, q, steps):
    """One accountant that took every step itself (no save/load across rounds)."""
    from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

    cls = {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant}[accountant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = cls()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc


@pytest.mark.parametrize("accountant,rounds", [("rdp", 3), ("prv", 2)])
def test_cumulative_epsilon_equals_one_continuous_accountant(accountant, rounds):
    w = windows(48)
    m = model()
    q = 1 / 6
    cfg = LocalTrainConfig(epochs=1, batch_size=8, sample_rate=q, noise_multiplier=1.1, accountant=accountant)
    state, eps_prev, total = None, 0.0, 0
    for _ in range(rounds):
        res = train_local(m, w, cfg, accountant_state=state)
        json.dumps(res.accountant_state)  # JSON-serialisable
        assert res.steps == 6 and res.sample_rate == pytest.approx(q) and res.num_examples == 48
        total += res.steps
        acc = continuous(accountant, 1.1, res.sample_rate, total)
        assert [list(h) for h in acc.history] == res.accountant_state["history"]
        assert res.epsilon == acc.get_epsilon(delta=cfg.delta)
        assert res.epsilon > eps_prev  # strictly increasing round over round
        assert accountant_epsilon(res.accountant_state, cfg.delta, accountant) == res.epsilon
        eps_prev, state = res.epsilon, res.accountant_state
    # the model stays a plain module that can be wrapped again every round
    assert all(not k.startswith("_module") for k in m.state_dict())
    assert not any(hasattr(p, "grad_sample") for p in m.parameters())


def test_sample_rate_and_steps_come_from_the_config_not_the_data():
    assert dp_steps_per_epoch(1.0) == 1 and dp_steps_per_epoch(0.5) == 2 and dp_steps_per_epoch(0.3) == 4
    assert dp_steps_per_epoch(1 / 93) == 93 and dp_steps_per_epoch(1 / 99) == 99  # float 1/(1/93) < 93
    cfg = LocalTrainConfig(epochs=3, batch_size=8, sample_rate=0.5, dp=True)
    for n in (0, 3, 10, 48):  # whatever the window count: same steps, same q, same history
        res = train_local(model(), windows(n) if n else np.zeros((0, W), dtype=np.int64), cfg)
        assert res.steps == 6 and res.sample_rate == 0.5 and res.num_examples == n
        assert res.accountant_state["history"] == [[1.0, 0.5, 6]]


@pytest.mark.parametrize("n", [93 * 8, 93 * 8 - 7])
def test_no_step_lost_when_one_over_q_rounds_down(n):
    # Opacus' own loader takes int(1 / q) steps: 92 for q = 1/93 (ceil(n / b) = 93 under the old rule).
    cfg = LocalTrainConfig(epochs=1, batch_size=8, sample_rate=1 / 93, noise_multiplier=1.0)
    res = train_local(model(), windows(n), cfg)
    assert res.steps == 93 and res.accountant_state["history"] == [[1.0, 1 / 93, 93]]


def test_update_does_not_depend_on_the_data_size_through_normalisation():
    # The noisy sum is divided by batch_size, a constant: with no signal (all-padding windows give
    # zero gradients) the update is pure noise of the same scale for 1 window or 40.
    base = LocalTrainConfig(epochs=1, lr=0.1, batch_size=4, sample_rate=1.0, noise_multiplier=1.0,
                            optimizer="sgd", seed=5)
    updates = []
    for n in (1, 40):
        m = model()
        before = m.head.weight.detach().clone()
        train_local(m, np.zeros((n, W), dtype=np.int64), base)
        updates.append(m.head.weight.detach() - before)
    assert torch.allclose(updates[0], updates[1])  # same seed, same noise, same divisor


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_are_noised_and_counted(mode):
    # q = 1/20: about a third of the Poisson batches are empty
    w = windows(20)
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = LocalTrainConfig(epochs=2, batch_size=1, sample_rate=0.05, noise_multiplier=1.0, grad_sample_mode=mode)
    res = train_local(m, w, cfg)
    assert res.steps == 40
    assert res.accountant_state["history"] == [[1.0, 0.05, 40]]
    assert math.isfinite(res.loss)
    assert all(torch.isfinite(v).all() for v in m.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_training_with_small_noise_lowers_loss(mode):
    w = windows(48)
    m = model()
    before = eval_loss(m, w)
    cfg = LocalTrainConfig(
        epochs=8,
        lr=0.02,
        batch_size=8,
        sample_rate=1 / 6,
        noise_multiplier=0.1,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
    )
    res = train_local(m, w, cfg)
    after = eval_loss(m, w)
    assert before > 2.5  # ~ln(20) at init
    assert after < 0.6 * before, (before, after)
    assert res.epsilon > 0 and math.isfinite(res.epsilon)


def test_plain_training_learns_and_reports_no_privacy():
    w = windows(48)
    m = model()
    before = eval_loss(m, w)
    res = train_local(m, w, LocalTrainConfig(epochs=5, lr=0.02, batch_size=8, dp=False))
    assert eval_loss(m, w) < 0.5 * before
    assert math.isnan(res.epsilon) and res.accountant_state is None and res.steps == 30


def test_ghost_and_hooks_give_the_same_update():
    # same seeds -> same Poisson batches and noise; both modes clip the same per-sample gradients
    w = windows(24)
    ma, mb = model(), model()
    cfg = {"epochs": 1, "batch_size": 8, "sample_rate": 1 / 3, "noise_multiplier": 0.5, "max_grad_norm": 0.1}
    train_local(ma, w, LocalTrainConfig(grad_sample_mode="hooks", **cfg))
    train_local(mb, w, LocalTrainConfig(grad_sample_mode="ghost", **cfg))
    for (k, a), b in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


def test_reproducible_and_rounds_use_fresh_randomness():
    w = windows(24)
    a, b = model(), model()
    cfg = LocalTrainConfig(epochs=1, batch_size=8, noise_multiplier=1.0, seed=7)
    ra = train_local(a, w, cfg)
    train_local(b, w, cfg)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    # a second round from the same weights must not replay the first round's noise
    c, d = model(), model()
    train_local(c, w, cfg)
    train_local(d, w, cfg, accountant_state=ra.accountant_state)
    assert not torch.equal(c.head.weight, d.head.weight)
    # seed=None: OS entropy, two identical calls differ
    e, f = model(), model()
    unseeded = LocalTrainConfig(epochs=1, batch_size=8, noise_multiplier=1.0, seed=None)
    train_local(e, w, unseeded)
    train_local(f, w, unseeded)
    assert not torch.equal(e.head.weight, f.head.weight)


@pytest.mark.parametrize("dp", [False, True])
def test_fedprox_pulls_weights_to_global(dp):
    w = windows(24)
    glob = {k: torch.zeros_like(v) for k, v in model(seed=3).named_parameters()}

    def dist(m):
        return sum(float(((p.detach() - glob[n]) ** 2).sum()) for n, p in m.named_parameters())

    free, prox, exact = model(), model(), model()
    base = {"epochs": 1, "lr": 0.01, "batch_size": 8, "dp": dp, "noise_multiplier": 0.5}
    train_local(free, w, LocalTrainConfig(**base), global_params=glob)
    train_local(prox, w, LocalTrainConfig(proximal_mu=30.0, **base), global_params=glob)
    assert dist(prox) < 0.8 * dist(free)
    # lr * mu == 1: the proximal update lands exactly on the global weights after every step
    train_local(exact, w, LocalTrainConfig(proximal_mu=100.0, **base), global_params=glob)
    for n, p in exact.named_parameters():
        assert torch.allclose(p, glob[n], atol=1e-7), n


@pytest.mark.parametrize(
    "key,value",
    [
        ("noise_multiplier", -0.5),
        ("max_grad_norm", 0.0),
        ("delta", 0.0),
        ("delta", 1.0),
        ("accountant", "moments"),
        ("grad_sample_mode", "functorch-ish"),
        ("batch_size", 0),
        ("epochs", 0),
        ("lr", -1.0),
        ("proximal_mu", -0.1),
        ("seed", 1.5),
        ("sample_rate", 0.0),
        ("sample_rate", 1.5),
        ("noise_multiplier", 0.0),  # dp=True: never an unnoised release
    ],
)
def test_bad_config_raises_naming_key(key, value):
    with pytest.raises(PrivrecError, match=key) as exc:
        train_local(model(), windows(8), LocalTrainConfig(**{key: value}))
    assert repr(value) in str(exc.value) or str(value) in str(exc.value)


def test_device_without_windows_still_takes_every_noised_step():
    w = windows(16)
    m = model()
    first = train_local(m, w, LocalTrainConfig(batch_size=8))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = train_local(
        m,
        np.zeros((0, W), dtype=np.int64),
        LocalTrainConfig(batch_size=8),
        accountant_state=first.accountant_state,
    )
    # Whether a device holds data must not show: same steps, same accounting, a noised update.
    assert res.steps == first.steps == 1 and res.num_examples == 0
    assert res.accountant_state["history"] == [[1.0, 1.0, 2]] and res.epsilon > first.epsilon
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())
    plain = train_local(model(), np.zeros((0, W), dtype=np.int64), LocalTrainConfig(dp=False))
    assert plain.steps == 0 and plain.accountant_state is None


def test_gdp_refuses_changed_sample_rate_clearly():
    m = model()
    cfg = LocalTrainConfig(batch_size=8, accountant="gdp")
    first = train_local(m, windows(16), cfg)
    train_local(m, windows(32), cfg, accountant_state=first.accountant_state)  # more data: same q
    with pytest.raises(PrivrecError, match="sample_rate"):
        train_local(m, windows(16), LocalTrainConfig(batch_size=8, sample_rate=0.5, accountant="gdp"),
                    accountant_state=first.accountant_state)
    with pytest.raises(PrivrecError, match="accountant"):  # mechanism mismatch
        train_local(
            m,
            windows(16),
            LocalTrainConfig(accountant="rdp"),
            accountant_state=first.accountant_state,
        )


def test_windows_longer_than_max_len_rejected():
    m = SASRec(ModelConfig(num_items=N, max_len=4, hidden_size=8, num_blocks=1))
    with pytest.raises(PrivrecError, match="max_len"):
        train_local(m, windows(8), LocalTrainConfig())
