"""Text item representations in SASRec: exact per-sample gradients, what is trained and shipped, new items."""

import numpy as np
import pytest
import torch

from shared.errors import PrivrecError
from shared.model import ModelConfig, SASRec
from shared.training import LocalTrainConfig, per_example_loss, split_windows, train_local

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")

N, D = 12, 16


def text_table(seed=0) -> torch.Tensor:
    t = torch.randn(N + 1, D, generator=torch.Generator().manual_seed(seed))
    t[0] = 0
    return torch.nn.functional.normalize(t, dim=-1)


def model(rep: str, dropout=0.0, seed=0) -> SASRec:
    torch.manual_seed(seed)
    cfg = ModelConfig(num_items=N, max_len=6, hidden_size=8, num_heads=2, num_blocks=1, dropout=dropout,
                      item_representation=rep, text_dim=0 if rep == "id" else D)
    return SASRec(cfg, None if rep == "id" else text_table())


def batch():
    windows = np.array([[0, 0, 3, 4, 5, 6, 7], [1, 2, 3, 9, 11, 12, 2], [0, 0, 0, 0, 8, 1, 5]])
    return split_windows(windows)


@pytest.mark.parametrize("rep", ["id", "text", "text+id"])
def test_opacus_per_sample_gradients_match_a_per_example_computation(rep):
    from opacus import GradSampleModule

    m = model(rep)
    x, y = batch()
    gsm = GradSampleModule(m, batch_first=True, loss_reduction="sum")
    per_example_loss(gsm(x), y).sum().backward()
    opacus = {name: p.grad_sample.detach().clone() for name, p in m.named_parameters()}
    gsm._close()
    for i in range(x.shape[0]):
        m.zero_grad()
        for p in m.parameters():
            p.grad_sample = None
        per_example_loss(m(x[i:i + 1]), y[i:i + 1]).sum().backward()
        for name, p in m.named_parameters():
            assert torch.allclose(opacus[name][i], p.grad, atol=1e-6, rtol=1e-4), (rep, name, i)
    assert set(opacus) == {n for n, p in m.named_parameters() if p.requires_grad}


def test_text_model_trains_far_fewer_weights_and_never_ships_the_text_table():
    ids, text, both = (model(r) for r in ("id", "text", "text+id"))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert "item_text" not in text.state_dict() and "item_text" not in both.state_dict()
    assert not any(p is text.item_text for p in text.parameters())
    assert "item_emb.weight" not in text.state_dict() and "head.weight" not in text.state_dict()
    assert count(both) > count(ids) and count(both) > count(text)
    # The text projections cost 2*D*H + D + H weights whatever the catalogue size; IDs cost 2*(N+1)*H + N+1.
    big = ModelConfig(num_items=5000, max_len=6, hidden_size=8, num_heads=2, num_blocks=1, dropout=0.0,
                      item_representation="text", text_dim=D)
    assert count(SASRec(big, torch.zeros(5001, D))) == count(text)


def test_text_features_are_required_and_checked():
    cfg = ModelConfig(num_items=N, max_len=6, hidden_size=8, num_heads=2, num_blocks=1, item_representation="text",
                      text_dim=D)
    with pytest.raises(PrivrecError, match="needs the catalogue's text features"):
        SASRec(cfg)
    with pytest.raises(PrivrecError, match=r"shape \(5, 16\), expected \(13, 16\)"):
        SASRec(cfg, torch.zeros(5, D))
    with pytest.raises(PrivrecError, match="needs text_dim >= 1"):
        ModelConfig(num_items=N, item_representation="text")
    with pytest.raises(PrivrecError, match="item_representation must be one of"):
        ModelConfig(num_items=N, item_representation="words")


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("rep", ["text", "text+id"])
def test_dp_training_runs_and_leaves_the_text_table_untouched(rep, mode):
    m = model(rep, dropout=0.1)
    before = m.item_text.clone()
    windows = np.array([[1, 2, 3, 4, 5, 6, 7]] * 5 + [[5, 6, 7, 8, 9, 10, 11]] * 5)
    result = train_local(m, windows, LocalTrainConfig(epochs=2, batch_size=4, grad_sample_mode=mode, seed=1))
    assert result.steps > 0 and np.isfinite(result.loss) and result.epsilon > 0
    assert torch.equal(m.item_text, before)


@pytest.mark.parametrize("rep", ["text", "text+id"])
def test_new_items_are_scored_from_their_text_alone(rep):
    m = model(rep).eval()
    table = text_table()
    bigger = m.with_new_items(table[[4, 9]]).eval()  # two new items whose text equals items 4 and 9
    assert bigger.cfg.num_items == N + 2
    seq = torch.tensor([[0, 1, 2, 3]])
    old, new = m.predict_next(seq)[0], bigger.predict_next(seq)[0]
    assert torch.allclose(old, new[: N + 1])  # the known catalogue scores as before
    text_part = m.text_out(m.encode(seq)[0, -1]) @ table.T
    assert torch.allclose(new[N + 1:] - new[N + 1:].mean(), text_part[[4, 9]] - text_part[[4, 9]].mean(), atol=1e-5)
    # A history may hold the new item too.
    assert torch.isfinite(bigger.predict_next(torch.tensor([[0, 1, 2, N + 1]]))[0, 1:]).all()


def test_an_id_model_refuses_new_items():
    with pytest.raises(PrivrecError, match="item IDs only"):
        model("id").with_new_items(torch.zeros(1, D))


@pytest.mark.parametrize("rep", ["id", "text", "text+id"])
def test_no_item_tables_trains_only_the_sequence_body(rep):
    m = model(rep, dropout=0.1)
    # The ID head's bias (one popularity scalar per item) is the documented exception: it stays trainable.
    item_side = {name for name, _ in m.named_parameters()
                 if name.split(".")[0] in ("item_emb", "head", "text_in", "text_out") and name != "head.bias"}
    assert item_side  # every representation has item-side layers
    before = {name: p.detach().clone() for name, p in m.named_parameters()}
    windows = np.array([[1, 2, 3, 4, 5, 6, 7]] * 5 + [[5, 6, 7, 8, 9, 10, 11]] * 5)
    train_local(m, windows, LocalTrainConfig(epochs=2, batch_size=4, trainable="no-item-tables", seed=1))
    after = dict(m.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and not changed & item_side, (rep, sorted(changed & item_side))
    # What is left to train (and to noise) is the same body whatever the item representation.
    body = {name for name in before if name not in item_side}
    assert changed <= body
    assert {n for n, p in m.named_parameters() if p.requires_grad} == body
