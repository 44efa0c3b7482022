"""client.batched.train_one_epoch against the one-device path (`train_local`) and against Opacus' DP-SGD.

- Devices of more than `batch-size` windows (several steps in one epoch): equal to `train_local` device by
  device (its batch order, SGD and Adam with its state carried across steps), without dropout.
- Dropout: equal to `train_local` when both paths draw the same masks (`RowMasks` makes every mask a function
  of the window's own items); equal in distribution with their own generators (a device's update over many
  seeds); and, with one step per round, the node's clipped sum plus the user-level noise against one
  Opacus DP-SGD step over the same users, each user one example.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from client.batched import device_batches, one_epoch, pass_seed, train_one_epoch
from shared.config import RunConfig
from shared.model import SASRec, model_for
from shared.privacy.user_level import noisy_mean_update
from shared.training import LocalTrainConfig, train_local

NUM_ITEMS = 40
WINDOW = 6
SMALL = {"max-len": 5, "window": WINDOW, "hidden-size": 16, "num-heads": 2, "num-blocks": 1, "dropout": 0.0,
         "batch-size": 2, "dp": False}
# 1 to 4 batches of 2: one-batch devices, devices whose last batch is short, and several lengths per step
COUNTS = [1, 2, 3, 4, 5, 7, 2, 6, 8, 3]


def _windows(counts: list[int], seed: int = 0) -> list[np.ndarray]:
    """Left-padded windows of 2..WINDOW random items each (item ids 1..NUM_ITEMS)."""
    rng = np.random.default_rng(seed)
    out = []
    for count in counts:
        rows = np.zeros((count, WINDOW), dtype=np.int64)
        for row in rows:
            real = int(rng.integers(2, WINDOW + 1))
            row[WINDOW - real:] = rng.integers(1, NUM_ITEMS + 1, size=real)
        out.append(rows)
    return out


def _run(optimizer: str, dropout: float = 0.0, **extra) -> tuple[RunConfig, dict]:
    run = RunConfig.from_values({**SMALL, "local-optimizer": optimizer, "dropout": dropout,
                                 "local-lr": 0.5 if optimizer == "sgd" else 0.02, **extra})
    torch.manual_seed(0)
    return run, model_for(run, NUM_ITEMS).state_dict()


def _alone(run: RunConfig, state: dict, windows: np.ndarray, cfg: LocalTrainConfig):
    """`train_local` on one device: its update {key: float64} and its result."""
    model = model_for(run, NUM_ITEMS, state=state)
    result = train_local(model, windows, cfg)
    return {k: model.state_dict()[k].double() - state[k].double() for k in state}, result


def _norm(update: dict) -> float:
    return float(torch.sqrt(sum(u.square().sum() for u in update.values())))


def _cfgs(run: RunConfig, devices: int, first_seed: int = 100) -> list[LocalTrainConfig]:
    return [LocalTrainConfig.for_round(run.device, seed=first_seed + d, proximal_mu=0.0) for d in range(devices)]


def _check_against_alone(run, state, windows, cfgs, tolerance: float) -> None:
    """Norms, losses and steps device by device, and sums with two factors (clipped at the median norm, and an
    arbitrary weight per window count), against `train_local` of each device with its own seed."""
    keys = list(state)
    alone = [_alone(run, state, w, cfg) for w, cfg in zip(windows, cfgs)]
    norms = [_norm(update) for update, _ in alone]
    clip = float(np.median(norms))
    factors = {"clipped": (lambda n, c: (clip / n).clamp(max=1.0), [min(1.0, clip / n) for n in norms]),
               "weighted": (lambda n, c: c.square() + 1.0, [len(w) ** 2 + 1.0 for w in windows])}
    for name, (factor, expected_factors) in factors.items():
        model = model_for(run, NUM_ITEMS, state=state)
        summed = train_one_epoch(model, [device_batches(w, cfg) for w, cfg in zip(windows, cfgs)], cfgs[0], keys,
                                 factor, seed=pass_seed([cfg.seed for cfg in cfgs]))
        for d, (w, (_, result)) in enumerate(zip(windows, alone)):
            assert summed.results[d].steps == result.steps == math.ceil(len(w) / run.device.batch_size)
            assert summed.results[d].num_examples == len(w)
            assert summed.results[d].loss == pytest.approx(result.loss, rel=1e-5)
            assert float(summed.norms[d]) == pytest.approx(norms[d], rel=tolerance), (name, d)
        expected = {k: sum(f * update[k] for f, (update, _) in zip(expected_factors, alone)) for k in keys}
        gap = torch.sqrt(sum((summed.total[k] - expected[k]).square().sum() for k in keys))
        size = torch.sqrt(sum(expected[k].square().sum() for k in keys))
        assert float(gap) <= tolerance * float(size), name


@pytest.mark.parametrize("optimizer,trains", [("sgd", "all"), ("adam", "all"), ("adam", "no-item-tables")])
def test_devices_of_several_batches_equal_each_device_alone(optimizer, trains):
    """Their batches in `train_local`'s shuffled order, their later steps from their own weights, Adam's moments
    and bias corrections carried across steps (frozen item tables stay at the global weights): a fixed batch
    order, a later step from the global weights or a fresh Adam state each step changes the norms and sums."""
    run, state = _run(optimizer, **{"device-trains": trains})
    windows = _windows(COUNTS)
    cfgs = _cfgs(run, len(windows))
    assert one_epoch(model_for(run, NUM_ITEMS, state=state), cfgs[0])
    # SGD is linear in the gradient; Adam's lr g / (|g| + 1e-8) turns rounding of a ~1e-8 gradient into lr
    _check_against_alone(run, state, windows, cfgs, 1e-5 if optimizer == "sgd" else 1e-4)


def test_device_batches_are_train_locals_order():
    """The same windows in the same batches as `train_local`'s loader: recorded from its model's calls."""
    run, state = _run("sgd")
    windows = _windows([7])[0]
    cfg = _cfgs(run, 1)[0]
    seen = []
    model = model_for(run, NUM_ITEMS, state=state)
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    train_local(model, windows, cfg)
    batches = device_batches(windows, cfg)
    assert [b.shape[0] for b in batches] == [2, 2, 2, 1]
    for got, inputs in zip(batches, seen, strict=True):
        np.testing.assert_array_equal(got[:, :-1], inputs.numpy())
    assert any(not np.array_equal(b, windows[2 * i:2 * i + len(b)]) for i, b in enumerate(batches)), "shuffled"


class RowMasks:
    """Dropout masks that are a function of each window's own items and of the dropout's place in the forward
    (call order, element), so `train_local` and the vectorised path draw the very same mask for a window.
    Patches `F.dropout` (nn.Dropout) and SDPA (written out, its dropout on the attention weights)."""

    PRIME = 2_147_483_647

    def __init__(self, monkeypatch) -> None:
        self.keys: torch.Tensor | None = None
        self.calls = 0
        encode = SASRec.encode
        powers = torch.tensor([pow(31, i, self.PRIME) for i in range(WINDOW)], dtype=torch.long)

        def keyed_encode(model, seqs):
            self.keys = (seqs.long() * powers[:seqs.shape[-1]]).sum(-1) % self.PRIME  # [rows]: works under vmap
            self.calls = 0
            return encode(model, seqs)

        def dropout(x, p=0.5, training=True, inplace=False):
            return x * self.mask(x.shape, p) if training and p > 0 else x

        def attention(q, k, v, attn_mask=None, dropout_p=0.0, **_):
            scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~attn_mask, float("-inf"))
            return dropout(scores.softmax(-1), dropout_p) @ v

        monkeypatch.setattr(SASRec, "encode", keyed_encode)
        monkeypatch.setattr(F, "dropout", dropout)
        monkeypatch.setattr(F, "scaled_dot_product_attention", attention)

    def mask(self, shape: torch.Size, p: float) -> torch.Tensor:
        self.calls += 1
        per_row = math.prod(shape[1:])
        h = (self.keys.unsqueeze(-1) * 48271 + self.calls * 69621 + torch.arange(per_row) * 16807) % self.PRIME
        for _ in range(3):  # each product < 2^62: exact in int64
            h = (h * h + 12345) % self.PRIME
        keep = (h.to(torch.float64) / self.PRIME >= p).to(torch.float32)
        return keep.reshape(shape) / (1 - p)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_dropout_with_the_same_masks_equals_each_device_alone(monkeypatch, optimizer):
    """With `RowMasks` both paths apply the same mask to a window: then equal device by device, dropout in the
    shared first step (layer inputs after dropout, gradients through it) and in the vmapped later steps."""
    RowMasks(monkeypatch)
    run, state = _run(optimizer, dropout=0.3)
    windows = _windows(COUNTS, seed=1)
    _check_against_alone(run, state, windows, _cfgs(run, len(windows)), 1e-5 if optimizer == "sgd" else 1e-4)


def test_row_masks_do_change_the_round(monkeypatch):
    """The injected masks are live: the same round without dropout gives other updates."""
    run, state = _run("sgd", dropout=0.3)
    windows = _windows([5])[0]
    cfg = _cfgs(run, 1)[0]
    plain, _ = _alone(RunConfig.from_values({**SMALL, "local-optimizer": "sgd", "local-lr": 0.5}), state, windows, cfg)
    RowMasks(monkeypatch)
    masked, _ = _alone(run, state, windows, cfg)
    assert abs(_norm(masked) - _norm(plain)) > 1e-3 * _norm(plain)


DRAWS = 300


def test_dropout_update_of_a_device_is_distributed_as_alone():
    """One device of 3 windows (2 steps of batch 2: the shared pass and one vmapped step), dropout 0.3: its
    update over DRAWS seeds alone (`train_local`, its own generator) against DRAWS copies of it in one
    vectorised round (one generator for the pass). Per-device norms: same mean (Welch), same variance
    (Levene), same distribution (Kolmogorov-Smirnov); mean update along the update without dropout and
    random directions within 4 standard errors. Copies sharing their masks would make the mean wander (the
    copies' updates correlated); dropout left out, or the masks of another layer, would move the norms."""
    run, state = _run("sgd", dropout=0.3)
    windows = _windows([3], seed=2)[0]
    keys = list(state)
    cfgs = _cfgs(run, DRAWS, first_seed=1000)
    alone = [_alone(run, state, windows, cfg)[0] for cfg in cfgs]
    alone_norms = np.array([_norm(u) for u in alone])
    model = model_for(run, NUM_ITEMS, state=state)
    summed = train_one_epoch(model, [device_batches(windows, cfg) for cfg in cfgs], cfgs[0], keys,
                             lambda n, c: torch.ones_like(n), seed=7)
    batched_norms = summed.norms.numpy()
    assert stats.ttest_ind(alone_norms, batched_norms, equal_var=False).pvalue > 1e-3
    assert stats.levene(alone_norms, batched_norms).pvalue > 1e-3
    assert stats.ks_2samp(alone_norms, batched_norms).pvalue > 1e-3
    assert np.std(alone_norms) > 0.05 * np.mean(alone_norms), "dropout does vary the update"
    random = torch.Generator().manual_seed(3)
    flat_alone = torch.stack([torch.cat([u[k].flatten() for k in keys]) for u in alone])  # [DRAWS, parameters]
    flat_mean = torch.cat([summed.total[k].flatten() for k in keys]) / DRAWS
    plain = RunConfig.from_values({**SMALL, "local-optimizer": "sgd", "local-lr": run.device.lr})
    # the update without dropout (where a wrong scale of the kept units shows), and random directions
    directions = [torch.cat([u.flatten() for u in _alone(plain, state, windows, cfgs[0])[0].values()])]
    directions += [torch.randn(flat_alone.shape[1], generator=random, dtype=torch.float64) for _ in range(4)]
    for direction in directions:
        projected = flat_alone @ direction
        error = math.sqrt(2 * float(projected.var()) / DRAWS)  # both means' variance, equal under the hypothesis
        assert abs(float(flat_mean @ direction - projected.mean())) < 4 * error


COHORT = 16
NOISE = 0.5  # user-noise-multiplier z
ROUNDS = 200


class OpacusStep:
    """One DP-SGD step of Opacus over the cohort, each user one example (one window each): per-example
    gradients of the example's loss, clipped to clip / lr, summed, Gaussian noise of std z clip / lr, one SGD
    step of lr. Its update is the sum of -lr g clipped to `clip`, plus noise of std z clip."""

    def __init__(self, run: RunConfig, state: dict, windows: np.ndarray, clip: float) -> None:
        from opacus import GradSampleModule

        from shared.training import split_windows

        self.state, self.clip, self.lr = state, clip, run.device.lr
        self.model = model_for(run, NUM_ITEMS, state=state).train()
        self.gsm = GradSampleModule(self.model, batch_first=True, loss_reduction="sum")
        self.inputs, self.targets = split_windows(windows)

    def __call__(self, seed: int) -> torch.Tensor:
        from opacus.optimizers import DPOptimizer

        from shared.training import per_example_loss

        self.model.load_state_dict(self.state)
        optimizer = DPOptimizer(torch.optim.SGD(self.model.parameters(), lr=self.lr), noise_multiplier=NOISE,
                                max_grad_norm=self.clip / self.lr, expected_batch_size=COHORT, loss_reduction="sum",
                                generator=torch.Generator().manual_seed(seed))
        optimizer.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dropout
            per_example_loss(self.gsm(self.inputs), self.targets).sum().backward()
        optimizer.step()
        weights = self.model.state_dict()
        return torch.cat([(weights[k].double() - v.double()).flatten() for k, v in self.state.items()])


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_clipped_sum_plus_noise_is_distributed_as_one_opacus_dp_sgd_step(dropout):
    """One local SGD step, user-level DP (clip C at the median update norm, noise z C on the sum): the node's
    clipped sum (`train_one_epoch`) plus `noisy_mean_update`'s noise against Opacus' one DP-SGD step over the
    cohort's users, each user one example, over ROUNDS draws each. Without dropout the clipped sum is fixed:
    Opacus' mean update is within 4 standard errors of it along each user's update direction and random
    ones, and its residual is the
    noise: chi-square over every coordinate of every draw, variance z^2 C^2. With dropout (the product's
    default 0.2) both are random: means (Welch) and variances (F) along the same directions, and the spread of
    every coordinate pooled. A node clipping the sum instead of each user, or to another norm, or a wrong
    noise std fails."""
    run, state = _run("sgd", dropout=dropout)
    windows = _windows([1] * COHORT, seed=3)
    cohort = np.concatenate(windows)
    keys = list(state)
    cfgs = _cfgs(run, COHORT)
    norms = [_norm(_alone(run, state, w, cfg)[0]) for w, cfg in zip(windows, cfgs)]
    clip = float(np.median(norms))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    rng = np.random.default_rng(5)

    model = model_for(run, NUM_ITEMS, state=state)

    def clipped(seed: int):
        return train_one_epoch(model, [[w] for w in windows], cfgs[0], keys, lambda n, c: (clip / n).clamp(max=1.0),
                               seed=seed)

    summed = clipped(0)  # without dropout the same every draw
    opacus_step = OpacusStep(run, state, cohort, clip)
    node, opacus = [], []
    for draw in range(ROUNDS):
        if dropout > 0:
            summed = clipped(draw)
        noised = noisy_mean_update([{k: v.numpy() for k, v in summed.total.items()}], keys, shapes,
                                   noise_std=NOISE * clip, expected_cohort=1.0, rng=rng)
        node.append(torch.cat([torch.as_tensor(noised[k]).flatten() for k in keys]))
        opacus.append(opacus_step(seed=10_000 + draw))
    node, opacus = torch.stack(node), torch.stack(opacus)  # [ROUNDS, parameters]
    sigma = NOISE * clip
    # each user's own update direction (where clipping a user, or not, shows) and random ones
    plain = RunConfig.from_values({**SMALL, "local-optimizer": "sgd", "local-lr": run.device.lr})
    random = torch.Generator().manual_seed(11)
    directions = [torch.cat([u.flatten() for u in _alone(plain, state, w, cfg)[0].values()])
                  for w, cfg in zip(windows, cfgs)]
    directions += [torch.randn(node.shape[1], generator=random, dtype=torch.float64) for _ in range(3)]
    directions = [d / d.norm() for d in directions]
    if dropout == 0:
        clipped_sum = torch.cat([summed.total[k].flatten() for k in keys])
        assert float((summed.norms > clip).sum()) >= COHORT // 3, "some users clipped"
        for direction in directions:
            assert abs(float((opacus @ direction).mean() - clipped_sum @ direction)) < 4 * sigma / math.sqrt(ROUNDS)
        for draws in (opacus, node):
            residual = draws - clipped_sum
            dof = residual.numel()
            statistic = float(residual.square().sum()) / sigma ** 2
            assert stats.chi2.sf(statistic, dof) > 1e-4 and stats.chi2.cdf(statistic, dof) > 1e-4
        return
    for direction in directions:
        a, b = (node @ direction).numpy(), (opacus @ direction).numpy()
        assert stats.ttest_ind(a, b, equal_var=False).pvalue > 1e-4
        ratio = a.var(ddof=1) / b.var(ddof=1)
        assert 2 * min(stats.f.cdf(ratio, ROUNDS - 1, ROUNDS - 1), stats.f.sf(ratio, ROUNDS - 1, ROUNDS - 1)) > 1e-4
    # every coordinate's spread: noise sigma^2 plus dropout's share, the same on both
    spread = float(node.var(0).sum() / opacus.var(0).sum())
    assert abs(spread - 1) < 4 * math.sqrt(2 / (ROUNDS - 1))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_node_with_dropout_trains_its_devices_together_as_each_alone(tmp_path, monkeypatch, optimizer):
    """The node's dispatch (client/node.py): one local epoch with dropout and devices of two batches all go to
    the vectorised path (no `train_local` on the node), and with the same masks (`RowMasks`) the node's clipped
    sum equals `ServerSideClipping` of the same devices trained alone."""
    import client.node
    from client.app import app as client_app
    from server.user_dp import ServerSideClipping
    from shared import config
    from shared.device_nodes import NODE_AGGREGATE
    from simulations.inprocess import instruction, node_context
    from tests.test_device_nodes import NUM_DEVICES, _store, _train_message
    from tests.test_device_nodes import SMALL as NODE_SMALL

    RowMasks(monkeypatch)
    store = _store(tmp_path)
    values = {**NODE_SMALL, "data-store": str(store), "dp": False, "user-dp": True, "local-epochs": 1,
              "batch-size": 2, "dropout": 0.3, "local-optimizer": optimizer,
              "local-lr": 0.5 if optimizer == "sgd" else 0.02}
    cfg = config.validate(values)
    torch.manual_seed(0)
    state = model_for(cfg, NUM_ITEMS).state_dict()
    devices = list(range(NUM_DEVICES))
    lone = [client_app(instruction(_train_message(cfg, state, store, tmp_path / "pop-lone", None), d + 1, "train"),
                       node_context(d + 1, {"partition-id": d, "num-partitions": NUM_DEVICES}, cfg))
            for d in devices]
    assert {int(r.content.metric_records["metrics"]["num-examples"]) for r in lone} >= {2, 3}, "one and two steps"
    current = {k: v.numpy() for k, v in state.items()}
    keys = list(current)
    server = ServerSideClipping()
    server.clipped_sum(lone, current, keys, 1.0)
    clip = float(np.median(server.last_norms))
    expected = server.clipped_sum(lone, current, keys, clip)
    alone_on_node = []
    monkeypatch.setattr(client.node, "train_local", lambda *a, **k: alone_on_node.append(1) or train_local(*a, **k))
    cfg = config.validate({**values, "user-clipping-norm": clip})
    node = client_app(instruction(_train_message(cfg, state, store, tmp_path / "pop-node", devices), 1, "train"),
                      node_context(1, {"partition-id": 0, "num-partitions": 1}, cfg))
    assert alone_on_node == []
    assert int(node.content.config_records[NODE_AGGREGATE]["count"]) == NUM_DEVICES
    got = {k: a.numpy() for k, a in node.content.array_records["arrays"].items()}
    difference = np.sqrt(sum(np.sum((got[k] - expected.total[k]) ** 2) for k in keys))
    size = np.sqrt(sum(np.sum(expected.total[k] ** 2) for k in keys))
    assert difference <= (1e-5 if optimizer == "sgd" else 1e-4) * size
