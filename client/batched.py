"""Many devices' local rounds in one pass: each device trains exactly as it would alone (up to float rounding).

`train_local` (shared/training.py) on one device without on-device DP is: load the global weights,
then for every epoch one optimizer step per batch of at most `batch-size` windows on the mean of
`per_example_loss`. When every device of a group holds between 1 and `batch-size` windows, each epoch
is one step on all of its windows: the same shape of computation for every device. Then the group's
steps run as one vectorised pass: `functional_call` of the model on each device's own weights,
`vmap` over devices of `grad` of that device's loss (devices of equal window count share a pass, so
no shape differs), and Adam or SGD applied per device with torch's update rule. Nothing is shared
between devices but the starting weights.

`train_batched` is equal to the one-device path up to float rounding when there is no randomness in
the step: dropout 0 (a device draws its dropout masks from its own seeded generator, which one
vectorised pass cannot replay) and no FedProx term. `vectorisable` says which devices join a node's
vectorised pass; the node trains every other device alone (client/node.py).

One local epoch (the common case, `one_epoch`): every device starts from the same weights, the global
ones, and its first step is a closed-form function of its own gradient there. So `train_one_epoch`
needs no copy of the weights for a device of one batch: ONE forward and backward over all devices'
first batches with the shared weights, the backward only down to each layer's output; each layer's
per-device gradient then comes from Opacus' per-sample gradient functions (`GradSampleModule.
GRAD_SAMPLERS`) applied to the layer's activations and output gradients viewed as [devices, windows x
positions, ...] (so Opacus' "sample" is a device and its sum runs over the device's windows, each
weighted 1 / its window count: the gradient of the device's mean loss). Then the step (SGD, or Adam's
first step in closed form), each update's norm, its factor (the node's clipping or FedAvg weight), and
the node's sum, a pass of devices at a time. A device of more than `batch-size` windows takes its first
step in that same shared pass; its later steps (its own batches, in `train_local`'s order:
`device_batches`) run vectorised over the devices that still have batches, each on its own weights and
Adam moments (`functional_call` + `vmap`, as `train_batched`), a chunk of `PASS_DEVICES` at a time.

Dropout (`model.dropout` > 0) in `train_one_epoch`: the shared pass and the vmapped steps draw every
window's masks independently (elementwise Bernoulli in one forward over all devices' windows; `vmap`
with `randomness="different"`), from one generator seeded per pass (`pass_seed`). Each device's masks
are then independent of every other device's and distributed as on its own, but not the ones its own
seeded generator would draw alone: equal to `train_local` in distribution, and exactly equal for the
same masks (tests/test_batched_rounds.py injects the same masks on both paths).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap
from torch.utils.data import DataLoader, TensorDataset

from shared.config import RunConfig
from shared.model import SASRec
from shared.training import LocalTrainConfig, LocalTrainResult, split_windows
from shared.training import _seeds as local_seeds  # train_local's own seed derivation (its loader's generator)

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as train_local builds it
ADAM_EPS = 1e-8
PASS_DEVICES = 64  # devices in one vectorised pass (their weights, gradients and Adam moments at once)
PASS_WINDOWS = 96  # windows in one forward/backward of `train_one_epoch` (its logits: windows x length x items)


def vectorisable(run: RunConfig, proximal_mu: float, num_windows: int) -> bool:
    """Whether a device's round joins the node's vectorised pass: no on-device DP (Opacus and the device's
    own accountant) and no FedProx term, at least one window; with several local epochs (`train_batched`)
    also no randomness (dropout 0) and one batch per epoch."""
    if run.device.dp or proximal_mu > 0 or num_windows < 1:
        return False
    return run.device.epochs == 1 or (run.model.dropout == 0 and fits_one_batch(num_windows, run.device.batch_size))


def fits_one_batch(num_windows: int, batch_size: int) -> bool:
    """A device whose every epoch is exactly one step (devices without windows take none: trained alone)."""
    return 1 <= num_windows <= batch_size


@dataclass
class BatchedRound:
    """Each device's trained weights (the trainable ones, stacked: [devices, ...]) and its round result."""

    weights: dict[str, Tensor]
    results: list[LocalTrainResult]


def train_batched(model: SASRec, windows: list[np.ndarray], cfg: LocalTrainConfig) -> BatchedRound:
    """Train one copy of `model`'s weights per entry of `windows` (int [n_d, W], 1 <= n_d <= batch size).

    `model` holds the global weights and is not changed. Returns the trainable weights of every device
    after `cfg.epochs` steps, in the order of `windows`. Devices with the same window count share a pass
    (at most `PASS_DEVICES` at once), so no device is padded.
    """
    if cfg.dp or cfg.proximal_mu > 0 or any(not fits_one_batch(len(w), cfg.batch_size) for w in windows):
        raise ValueError("train_batched: only rounds without on-device DP or FedProx, of one batch per epoch")
    model.train()
    model.set_trainable(cfg.trainable)
    trainable = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    step = _vmapped_step(model)
    out = {k: v.unsqueeze(0).repeat(len(windows), *([1] * v.dim())) for k, v in trainable.items()}
    losses = torch.zeros(len(windows), cfg.epochs)
    by_count: dict[int, list[int]] = {}
    for d, w in enumerate(windows):
        by_count.setdefault(len(w), []).append(d)
    for count, members in sorted(by_count.items()):
        for start in range(0, len(members), PASS_DEVICES):
            chosen = torch.tensor(members[start:start + PASS_DEVICES])
            inputs, targets = split_windows(np.concatenate([windows[d] for d in chosen.tolist()]))
            inputs, targets = inputs.view(len(chosen), count, -1), targets.view(len(chosen), count, -1)
            weights = {k: v[chosen] for k, v in out.items()}
            moments = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in weights.items()}
            with torch.no_grad():
                for epoch in range(cfg.epochs):
                    with torch.enable_grad():
                        grads, loss = step(weights, inputs, targets)
                    losses[chosen, epoch] = loss.detach()
                    for k in weights:
                        weights[k] = _update(cfg, weights[k], grads[k], moments[k], epoch + 1)
                for k, v in weights.items():
                    out[k][chosen] = v
    results = [LocalTrainResult(loss=float(losses[d].mean()), steps=cfg.epochs, num_examples=len(windows[d]),
                                sample_rate=float("nan"), epsilon=float("nan"), accountant_state=None)
               for d in range(len(windows))]
    return BatchedRound(weights=out, results=results)


def _vmapped_step(model: SASRec):
    """(weights {name: [devices, ...]}, inputs, targets [devices, windows, length]) -> each device's gradient of
    its mean window loss at its own weights, and that loss: `vmap` of `grad_and_value` over devices, each device
    drawing its own dropout masks. The model's frozen weights and buffers are shared."""
    fixed = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def device_loss(weights: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, {**weights, **fixed}, (x,))
        return window_losses(logits, y).mean()

    return vmap(grad_and_value(device_loss), randomness="different")


def window_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """`shared.training.per_example_loss` written with logsumexp and gather: the same values, and vmap
    has batching rules for both (its rule for cross-entropy's backward falls back to a slow scatter)."""
    real = targets != 0
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    cross_entropy = (torch.logsumexp(logits, dim=-1) - picked) * real
    return cross_entropy.sum(dim=1) / real.sum(dim=1).clamp(min=1).to(logits.dtype)


def _update(cfg: LocalTrainConfig, weight: Tensor, grad: Tensor, moments: tuple[Tensor, Tensor], t: int) -> Tensor:
    """torch.optim.Adam's (defaults) or SGD's update, elementwise, so the same for each device's slice."""
    if cfg.optimizer != "adam":
        return weight - cfg.lr * grad
    beta1, beta2 = ADAM_BETAS
    exp_avg, exp_avg_sq = moments
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = cfg.lr / (1 - beta1 ** t)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t)).add_(ADAM_EPS)
    return weight.addcdiv(exp_avg, denom, value=-step_size)


def one_epoch(model: SASRec, cfg: LocalTrainConfig) -> bool:
    """Whether `train_one_epoch` applies: one local epoch from the global weights, without on-device DP or
    FedProx, and every weight `cfg` trains belongs to a layer Opacus computes per-sample gradients for."""
    from opacus.grad_sample import GradSampleModule

    if cfg.epochs != 1 or cfg.dp or cfg.proximal_mu > 0:
        return False
    model.set_trainable(cfg.trainable)
    return all(type(module) in GradSampleModule.GRAD_SAMPLERS
               for module in model.modules() for p in module.parameters(recurse=False) if p.requires_grad)


def device_batches(windows: np.ndarray, cfg: LocalTrainConfig) -> list[np.ndarray]:
    """The batches `train_local` (no on-device DP) takes on `windows`, in its order: its DataLoader (batches of
    `cfg.batch_size`, shuffled by a generator seeded from the device's `cfg.seed`) is replayed on the window
    indices, so it draws from the same generator state exactly as `train_local`'s does. A device of one batch
    takes all its windows each epoch, in whatever order (a batch's mean loss does not depend on it)."""
    if len(windows) <= cfg.batch_size:
        return [windows] * cfg.epochs
    loader = DataLoader(TensorDataset(torch.arange(len(windows))), batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(local_seeds(cfg.seed, 0)[1]))
    return [windows[index.numpy()] for _ in range(cfg.epochs) for (index,) in loader]


def pass_seed(seeds: Sequence[int | None]) -> int | None:
    """The seed of a vectorised pass's dropout masks from its devices' seeds (None, fresh entropy, if any is)."""
    if any(seed is None for seed in seeds):
        return None
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF for seed in seeds]).generate_state(1)[0])


@dataclass
class SummedRound:
    """`train_one_epoch`'s output: each device's round result and update norm, and the factored sum."""

    results: list[LocalTrainResult]
    norms: Tensor  # float64 [devices]: ||weights after the round - global weights|| over the summed keys
    total: dict[str, Tensor]  # float64: sum over devices of factor x (weights after the round - global weights)


# factor(norms, window counts) -> each device's factor in the node's sum (float64 [devices] each)
Factor = Callable[[Tensor, Tensor], Tensor]


def train_one_epoch(model: SASRec, batches: Sequence[Sequence[np.ndarray]], cfg: LocalTrainConfig,
                    keys: Sequence[str], factor: Factor, *, seed: int | None = None) -> SummedRound:
    """Each device's one-epoch round (`one_epoch`) from `model`'s weights, summed with `factor` over `keys`.

    `batches[d]` holds device d's batches in its order (`device_batches`: int [1..batch-size, W] each, at least
    one). A device alone (`train_local`) takes one optimizer step per batch on the mean of `per_example_loss`
    over the batch's windows, from a fresh optimizer. Its first step is taken in the shared pass: SGD moves
    each weight by -lr g; Adam's first step (betas b1, b2, eps, no weight decay: train_local's
    `torch.optim.Adam(params, lr)`) keeps m = (1 - b1) g and v = (1 - b2) g^2, divides them by the bias
    corrections 1 - b1 and 1 - b2, and so moves each weight by -lr g / (|g| + eps). A device of one batch
    is then done: its weights after the step are float32, as alone; its update is those minus the global
    weights, subtracted in float32 (the server subtracts a reply's weights in float64: at most half a
    float32 ulp apart per coordinate). A device of several batches goes on from there with its own weights
    and moments (torch's Adam or SGD update, `_later_steps`). `keys` are the state-dict entries summed and
    measured: each update's norm is summed in float64 from its exact squares; a group's factored updates
    are added in float32, the groups in float64. A frozen weight's update is 0. `seed` seeds the dropout
    masks (`pass_seed`). `model` is not changed.
    """
    if not one_epoch(model, cfg) or any(not batch or any(not fits_one_batch(len(b), cfg.batch_size) for b in batch)
                                        for batch in batches):
        raise ValueError("train_one_epoch: only one-epoch rounds without on-device DP or FedProx, of weights in "
                         "Opacus' per-sample layers, each device with batches of 1..batch-size windows")
    model.train()
    state = model.state_dict()
    current = {k: state[k].detach() for k in keys}
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in current.items()}
    norms = torch.zeros(len(batches), dtype=torch.float64)
    losses = torch.zeros(len(batches), dtype=torch.float64)
    counts = torch.tensor([float(sum(len(b) for b in batch)) for batch in batches], dtype=torch.float64)

    def add(index: Tensor, updates: dict[str, Tensor]) -> None:
        """Devices `index`' updates {key: [devices, ...]} (float32, only trained keys) into norms and total."""
        squares = torch.zeros(len(index), dtype=torch.float64)
        for update in updates.values():
            squares += _squared_norms(update)
        norms[index] = squares.sqrt()
        scale = factor(norms[index], counts[index]).to(torch.float32)
        for key, update in updates.items():
            total[key] += torch.tensordot(scale, update, dims=1)

    firsts = [batch[0] for batch in batches]
    single = sorted((d for d in range(len(batches)) if len(batches[d]) == 1), key=lambda d: len(firsts[d]))
    several = [d for d in range(len(batches)) if len(batches[d]) > 1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed if seed is not None else int(np.random.SeedSequence().generate_state(1)[0]))
        for chosen in _passes(single, firsts):
            for members, grads, loss in _device_gradients(model, [firsts[d] for d in chosen]):
                index = torch.tensor(chosen[members])
                updates = {key: grad for key, grad in grads.items() if key in current}
                for key, update in updates.items():
                    _step_to_update(cfg, current[key], update)
                losses[index] = loss.to(torch.float64)
                add(index, updates)
        for start in range(0, len(several), PASS_DEVICES):  # their weights and moments, a chunk at a time
            chunk = several[start:start + PASS_DEVICES]
            weights, chunk_losses = _later_steps(model, cfg, [batches[d] for d in chunk])
            losses[chunk] = chunk_losses
            add(torch.tensor(chunk), {key: weights[key].sub_(current[key]) for key in weights if key in current})
    results = [LocalTrainResult(loss=float(losses[d]), steps=len(batches[d]), num_examples=int(counts[d]),
                                sample_rate=float("nan"), epsilon=float("nan"), accountant_state=None)
               for d in range(len(batches))]
    return SummedRound(results=results, norms=norms, total=total)


def _later_steps(model: SASRec, cfg: LocalTrainConfig, batches: list[Sequence[np.ndarray]]
                 ) -> tuple[dict[str, Tensor], Tensor]:
    """Devices of several batches each (at most `PASS_DEVICES`): the first step from the shared pass's
    gradients (`_device_gradients`), then step t for every device that has a t-th batch, vectorised over
    those of equal batch length, each on its own weights and moments (torch's update, `_update`). Returns
    each device's trained weights {name: [devices, ...]} and its mean batch loss (float64 [devices])."""
    trainable = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    firsts = [batch[0] for batch in batches]
    order = sorted(range(len(batches)), key=lambda d: len(firsts[d]))
    weights = {k: torch.empty((len(batches), *v.shape), dtype=v.dtype) for k, v in trainable.items()}
    moments = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in weights.items()}
    loss_sums = torch.zeros(len(batches), dtype=torch.float64)
    for chosen in _passes(order, firsts):
        for members, grads, loss in _device_gradients(model, [firsts[d] for d in chosen]):
            index = torch.tensor(chosen[members])
            loss_sums[index] += loss.to(torch.float64)
            for key, grad in grads.items():
                first = (moments[key][0][index], moments[key][1][index])
                weights[key][index] = _update(cfg, trainable[key], grad, first, 1)
                moments[key][0][index], moments[key][1][index] = first
    step = _vmapped_step(model)
    for t in range(2, max(len(batch) for batch in batches) + 1):
        by_length: dict[int, list[int]] = {}
        for d, batch in enumerate(batches):
            if len(batch) >= t:
                by_length.setdefault(len(batch[t - 1]), []).append(d)
        for length, members in sorted(by_length.items()):
            index = torch.tensor(members)
            inputs, targets = split_windows(np.concatenate([batches[d][t - 1] for d in members]))
            inputs, targets = inputs.view(len(members), length, -1), targets.view(len(members), length, -1)
            with torch.enable_grad():
                grads, loss = step({k: v[index] for k, v in weights.items()}, inputs, targets)
            loss_sums[index] += loss.detach().to(torch.float64)
            with torch.no_grad():
                for key, grad in grads.items():
                    mine = (moments[key][0][index], moments[key][1][index])
                    weights[key][index] = _update(cfg, weights[key][index], grad, mine, t)
                    moments[key][0][index], moments[key][1][index] = mine
    steps = torch.tensor([float(len(batch)) for batch in batches], dtype=torch.float64)
    return weights, loss_sums / steps


def _passes(order: list[int], windows: Sequence[np.ndarray]) -> list[list[int]]:
    """Consecutive devices of `order`, at most PASS_DEVICES devices and PASS_WINDOWS windows a pass."""
    passes, current, count = [], [], 0
    for d in order:
        if current and (len(current) == PASS_DEVICES or count + len(windows[d]) > PASS_WINDOWS):
            passes.append(current)
            current, count = [], 0
        current.append(d)
        count += len(windows[d])
    return passes + ([current] if current else [])


def _step_to_update(cfg: LocalTrainConfig, weight: Tensor, grad: Tensor) -> None:
    """`grad` ([devices, ...], each device's gradient) becomes, in place, each device's (weights after one
    step from the shared `weight`) - `weight`: the step rounded to float32 weights, as on the device."""
    if cfg.optimizer == "adam":  # torch's param.addcdiv_(m, denom, value=-step_size) at step 1, see above
        torch.addcdiv(weight, grad, grad.abs().add_(ADAM_EPS), value=-cfg.lr, out=grad)
    else:  # torch.optim.SGD's param.add_(grad, alpha=-lr)
        torch.add(weight, grad, alpha=-cfg.lr, out=grad)
    grad.sub_(weight)


def _loss_and_gradient(logits: Tensor, targets: Tensor, per_window: Tensor) -> tuple[Tensor, Tensor]:
    """`per_example_loss` of each window ([windows]) and the gradient of sum(loss / per_window) with respect to
    `logits` ([windows, length, items]): softmax - one-hot at each real target, over the window's target count
    (0 at padding), written into the softmax's own memory instead of autograd's several copies."""
    log_probs = torch.log_softmax(logits, dim=-1)
    real = targets != 0
    counts = real.sum(dim=1).clamp(min=1).to(logits.dtype)
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    window_loss = -(picked * real).sum(dim=1) / counts
    weight = real.to(logits.dtype) / (counts * per_window).unsqueeze(1)  # [windows, length]
    grad = log_probs.exp_()
    grad.scatter_add_(-1, targets.unsqueeze(-1), torch.full_like(picked, -1.0).unsqueeze(-1))
    return window_loss, grad.mul_(weight.unsqueeze(-1))


NORM_SLICE = 8  # devices whose float64 copy of one array is held at once (cache-sized)


def _squared_norms(update: Tensor) -> Tensor:
    """Each device's sum of squares of `update` [devices, ...], in float64 (every float32 square is exact)."""
    flat = update.flatten(1)
    return torch.cat([torch.linalg.vector_norm(flat[i:i + NORM_SLICE], dim=1, dtype=torch.float64).square()
                      for i in range(0, len(flat), NORM_SLICE)])


def _device_gradients(model: SASRec, windows: list[np.ndarray]):
    """One forward and backward over `windows` (sorted by window count), then for each group of devices with
    equal window count: (their positions in `windows`, each one's gradient of its mean window loss at the
    shared weights {name: [devices, ...]} for the trainable weights, each one's mean window loss)."""
    from opacus.grad_sample import GradSampleModule

    counts = [len(w) for w in windows]
    inputs, targets = split_windows(np.concatenate(windows))
    per_window = torch.tensor(counts, dtype=torch.float32).repeat_interleave(torch.tensor(counts))
    calls: list[tuple[torch.nn.Module, tuple, Tensor]] = []
    layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append((m, args, out))) for m in layers]
    try:
        logits = model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    window_loss, logits_grad = _loss_and_gradient(logits.detach(), targets, per_window)
    # Down to each layer's output only: the weights' summed gradients are never formed.
    wanted = [out for _, _, out in calls if out is not logits]
    found = iter(torch.autograd.grad(logits, wanted, logits_grad, materialize_grads=True))
    backprops = [logits_grad if out is logits else next(found) for _, _, out in calls]
    names = {p: k for k, p in model.named_parameters()}
    window_loss = window_loss.detach()
    first_device, first_window = 0, 0
    for count in sorted(set(counts)):
        members, rows = counts.count(count), counts.count(count) * count

        grads: dict[str, Tensor] = {}
        group = (first_window, rows, members)
        for (layer, args, _), backprop in zip(calls, backprops):
            sampler = GradSampleModule.GRAD_SAMPLERS[type(layer)]
            for param, grad in sampler(layer, [_by_device(a, *group) for a in args],
                                       _by_device(backprop, *group)).items():
                name = names[param]
                grads[name] = grads[name] + grad if name in grads else grad  # a layer called twice
        yield (slice(first_device, first_device + members), grads,
               window_loss[first_window:first_window + rows].view(members, count).mean(1))
        first_device, first_window = first_device + members, first_window + rows


def _by_device(t: Tensor, first_window: int, rows: int, devices: int) -> Tensor:
    """Rows [first_window, first_window + rows) of `t` ([windows, ...]) as [devices, windows x positions, ...],
    detached (Opacus' functions then build no graph)."""
    return t.detach()[first_window:first_window + rows].reshape(devices, -1, *t.shape[2:])
