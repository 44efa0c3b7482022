"""SASRec: causality, padding invariance, truncation, and Opacus per-sample gradients."""

import copy
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from shared.errors import PrivrecError
from shared.model import ModelConfig, SASRec
from shared.training import SequenceLoss, per_example_loss, sequence_loss, split_windows

N_ITEMS = 12


def tiny(dropout=0.0, max_len=8, seed=0, blocks=2):
    torch.manual_seed(seed)
    return SASRec(
        ModelConfig(
            num_items=N_ITEMS,
            max_len=max_len,
            hidden_size=8,
            num_heads=2,
            num_blocks=blocks,
            dropout=dropout,
        )
    )


def test_output_shapes_and_padding_column():
    m = tiny().eval()
    x = torch.randint(1, N_ITEMS + 1, (3, 6))
    assert m(x).shape == (3, 6, N_ITEMS + 1)
    nxt = m.predict_next(x)
    assert nxt.shape == (3, N_ITEMS + 1)
    assert torch.isinf(nxt[:, 0]).all() and (nxt[:, 0] < 0).all()
    assert torch.isfinite(nxt[:, 1:]).all()
    assert torch.allclose(nxt[:, 1:], m(x)[:, -1, 1:])


def test_causality_later_item_never_changes_earlier_positions():
    m = tiny().eval()
    x = torch.randint(1, N_ITEMS + 1, (2, 8))
    base = m(x)
    for t in range(1, 8):
        y = x.clone()
        y[:, t] = (y[:, t] % N_ITEMS) + 1  # a different real item
        out = m(y)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6), t
        assert not torch.allclose(out[:, t], base[:, t], atol=1e-6), t


def test_left_padding_does_not_change_real_positions():
    m = tiny().eval()
    seq = torch.tensor([[3, 5, 7, 2]])
    padded = torch.tensor([[0, 0, 0, 3, 5, 7, 2]])
    a, b = m(seq), m(padded)
    assert torch.allclose(a, b[:, 3:], atol=1e-5)
    assert torch.allclose(m.predict_next(seq), m.predict_next(padded), atol=1e-5)


@pytest.mark.parametrize("train_mode", [False, True])
def test_fully_padded_rows_are_finite(train_mode):
    m = tiny(dropout=0.2)
    m.train(train_mode)
    x = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 4]])
    out = m(x)
    assert torch.isfinite(out).all()


def test_zero_row_batch():
    m = tiny()
    out = m(torch.zeros(0, 5, dtype=torch.long))
    assert out.shape == (0, 5, N_ITEMS + 1)
    loss = sequence_loss(out, torch.zeros(0, 5, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0


def test_longer_input_keeps_last_max_len():
    m = tiny(max_len=5).eval()
    x = torch.randint(1, N_ITEMS + 1, (2, 9))
    assert torch.allclose(m(x), m(x[:, -5:]))
    assert torch.allclose(m.predict_next(x), m.predict_next(x[:, -5:]))


def test_bad_config_raises():
    with pytest.raises(PrivrecError, match="num_heads"):
        ModelConfig(num_items=10, hidden_size=10, num_heads=3)
    with pytest.raises(PrivrecError, match="num_items"):
        ModelConfig(num_items=0)
    with pytest.raises(PrivrecError, match="dropout"):
        ModelConfig(num_items=5, dropout=1.5)


def test_head_is_untied_linear():
    m = tiny()
    assert isinstance(m.head, torch.nn.Linear)
    assert m.head.weight.data_ptr() != m.item_emb.weight.data_ptr()


def _batch():
    g = torch.Generator().manual_seed(1)
    w = torch.randint(1, N_ITEMS + 1, (5, 7), generator=g)
    w[1, :3] = 0  # left-padded window
    w[3, :5] = 0  # short window: 2 real items
    return split_windows(w.numpy())


def _per_example_grads(model, x, y):
    """Gradient of each example's loss computed alone: list over examples of {name: grad}."""
    out = []
    for i in range(x.shape[0]):
        ref = copy.deepcopy(model)
        ref.zero_grad()
        per_example_loss(ref(x[i : i + 1]), y[i : i + 1]).sum().backward()
        out.append(
            {
                n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for n, p in ref.named_parameters()
            }
        )
    return out


def test_opacus_hooks_per_sample_grads_match_individual_grads():
    from opacus import GradSampleModule

    model = tiny(dropout=0.0)
    x, y = _batch()
    expected = _per_example_grads(model, x, y)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    gsm.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Full backward hook is firing ..." (inputs are ids)
        sequence_loss(gsm(x), y).backward()
    names = [n for n, _ in model.named_parameters()]
    assert len(names) > 10
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, f"{name} escaped the per-sample hooks"
        assert p.grad_sample.shape == (x.shape[0], *p.shape), name
        for i in range(x.shape[0]):
            assert torch.allclose(p.grad_sample[i], expected[i][name], atol=1e-6, rtol=1e-4), (
                name,
                i,
            )
    # sanity: the examples really have different gradients
    assert not torch.allclose(expected[0]["head.weight"], expected[2]["head.weight"])
    gsm.cleanup()


def test_opacus_ghost_clipped_update_matches_manual_clipping():
    from opacus import PrivacyEngine

    model = tiny(dropout=0.0)
    x, y = _batch()
    expected = _per_example_grads(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    norms = torch.stack([torch.sqrt(sum((g[n] ** 2).sum() for n in names)) for g in expected])
    clip = 0.05
    assert (norms > clip).any() and norms.min() > 0  # clipping is actually exercised
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    want = {
        n: sum(factors[i] * expected[i][n] for i in range(len(expected))) / x.shape[0]
        for n in names
    }

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm, dp_opt, crit, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=opt,
            criterion=SequenceLoss(),
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=clip,
            grad_sample_mode="ghost",
        )
        assert dp_opt.expected_batch_size == x.shape[0]
        dp_opt.zero_grad()
        crit(gsm(x), y).backward()
        dp_opt.pre_step()  # clip + (zero) noise + scale, no parameter update
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want[name], atol=1e-6, rtol=1e-3), name
    gsm.cleanup()
