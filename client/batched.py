"""Many devices' local rounds in one pass (torch.func): each device trains exactly as it would alone.

`train_local` (shared/training.py) on one device without on-device DP is: load the global weights,
then for every epoch one optimizer step per batch of at most `batch-size` windows on the mean of
`per_example_loss`. When every device of a group holds between 1 and `batch-size` windows, each epoch
is one step on all of its windows: the same shape of computation for every device. Then the group's
steps run as one vectorised pass: `functional_call` of the model on each device's own weights,
`vmap` over devices of `grad` of that device's loss (devices of equal window count share a pass, so
no shape differs), and Adam or SGD applied per device with torch's update rule. Nothing is shared
between devices but the starting weights.

Equal to the one-device path up to float rounding when there is no randomness in the step: dropout
0 (a device draws its dropout masks from its own seeded generator, which one vectorised pass cannot
replay) and no FedProx term. `batchable` says when a group qualifies; the node trains every other
device alone (client/node.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from shared.config import RunConfig
from shared.model import SASRec
from shared.training import LocalTrainConfig, LocalTrainResult, split_windows

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as train_local builds it
ADAM_EPS = 1e-8
PASS_DEVICES = 64  # devices in one vectorised pass (their weights, gradients and Adam moments at once)


def batchable(run: RunConfig, proximal_mu: float) -> bool:
    """Whether a round's local training has no randomness and no per-device term (see module doc)."""
    return not run.device.dp and proximal_mu == 0 and run.model.dropout == 0


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
    fixed = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def device_loss(weights: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, {**weights, **fixed}, (x,))
        return window_losses(logits, y).mean()

    step = vmap(grad_and_value(device_loss), randomness="different")
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
