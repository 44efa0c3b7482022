"""One local training round on a device: plain Adam, or DP-SGD (Adam) through Opacus. No Flower here.

Privacy unit: one *window* (a row of ``windows``); neighbouring relation: adding or removing one
window. Under DP everything the round releases is independent of how many windows the device holds,
so the guarantee holds even to an adversary who sees the update, its step count and sample rate:

- each window joins each step independently with the fixed probability ``q = cfg.sample_rate``
  (Poisson sampling, Opacus' ``UniformWithReplacementSampler`` with an explicit ``q``), never a rate
  derived from the window count;
- a round takes ``epochs x ceil(1 / q)`` steps (``dp_steps_per_epoch``), whatever the window count:
  a device without windows takes the same steps on empty batches (pure noise);
- the noisy sum of clipped per-window gradients is divided by the fixed ``cfg.batch_size`` (Opacus'
  ``expected_batch_size``), a constant of the config, never ``q x n`` from the data.

Opacus' ``make_private`` derives ``q`` from a ``DataLoader`` as ``1 / len(loader)`` and the expected
batch from the dataset size, both functions of the window count; the pieces below are Opacus' own
(sampler, grad-sample module, ``DPOptimizer``, the accountant's optimizer hook), assembled with
``q`` and the batch divisor taken from the config instead.

Empty Poisson batches: Opacus' ghost mode crashes on a 0-row batch, so an empty batch is replaced by
one all-padding row whose targets are all padding. Its loss is exactly 0 and its per-sample gradient
is exactly 0 (no data involved), so the DP optimizer still clips (nothing), adds the full noise, and
the accountant counts the step: every sampler draw is one noised, accounted step.

Randomness: with an integer ``cfg.seed`` a round is exactly reproducible (dropout, Poisson masks and
DP noise all derive from ``(seed, steps already in the device's accountant history)``). The DP
guarantee assumes the adversary cannot predict the sampling or the noise: whoever knows the seed and
the device's step count can regenerate the noise and subtract it. Integer seeds are therefore for
research/simulation; ``seed=None`` draws fresh OS entropy every round (torch's generator is still not
a CSPRNG -- Opacus' ``secure_mode`` needs torchcsprng, unavailable for this torch).

Cumulative accounting: the caller passes the accountant state returned by the previous round; it is
loaded into a fresh accountant *before* training, so the new steps compose with
every earlier round and ``epsilon`` is the device's total.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from shared.config import SCHEMA, SECTIONS, DeviceTraining, field_name, strict_problem, unnoised_problem
from shared.errors import PrivrecError
from shared.model import SASRec
from shared.privacy.accounting import (
    check_fixed_parameters,
    epsilon_from_state,
    from_json_state,
    history_steps,
    make_accountant,
    to_json_state,
)

__all__ = [
    "LocalTrainConfig",
    "LocalTrainResult",
    "SequenceLoss",
    "accountant_epsilon",
    "dp_steps_per_epoch",
    "per_example_loss",
    "sequence_loss",
    "split_windows",
    "train_local",
]

def _default(key: str):
    return SCHEMA[key].default


# LocalTrainConfig field -> the run-config key that defines its default, range and choices: every
# on-device key but the two a device applies before training (window, max-epsilon), and FedProx's weight.
_KEY_OF = {**{field_name(key): key for key in SECTIONS["device"] if key not in ("window", "max-epsilon")},
           "proximal_mu": "proximal-mu"}


@dataclass(frozen=True)
class LocalTrainConfig:
    """One round of `train_local`: the run's on-device settings, plus the round's seed and proximal weight.

    Defaults, ranges and choices are the run-config schema's (shared/config.py); a run builds this
    from its `DeviceTraining` section with `for_round`.
    """
    epochs: int = _default("local-epochs")
    lr: float = _default("local-lr")
    batch_size: int = _default("batch-size")  # plain: batch size; DP: the fixed divisor of the noisy gradient sum
    sample_rate: float = _default("sample-rate")  # DP only: Poisson rate per window and step (never from the data)
    dp: bool = _default("dp")
    noise_multiplier: float = _default("noise-multiplier")
    max_grad_norm: float = _default("max-grad-norm")
    delta: float = _default("delta")
    accountant: str = _default("accountant")
    grad_sample_mode: str = _default("grad-sample-mode")
    proximal_mu: float = 0.0  # FedProx's per-round weight, sent by the server only under strategy = fedprox
    optimizer: str = _default("local-optimizer")  # plain SGD averages DP noise away across devices; Adam rescales it
    trainable: str = _default("device-trains")  # SASRec.set_trainable scope
    # Seeds dropout, Poisson sampling and DP noise (mixed with the device's step count so rounds
    # differ). None = fresh OS entropy: not reproducible, but sampling and noise are then not
    # predictable from the (public) run config -- see the module docstring.
    seed: int | None = 0

    @classmethod
    def for_round(cls, device: DeviceTraining, *, seed: int | None, proximal_mu: float) -> LocalTrainConfig:
        return cls(**{f: getattr(device, f) for f in _KEY_OF if f != "proximal_mu"}, proximal_mu=proximal_mu,
                   seed=seed)

    def validate(self) -> None:
        """The schema's checks on each field (a library caller may pass anything), and the DP noise guard."""
        def bad(key: str, value, why: str) -> PrivrecError:
            return PrivrecError(f"local training config: {key}={value!r} is invalid: {why}")

        for field, key in _KEY_OF.items():
            problem = strict_problem(key, getattr(self, field))
            if problem:
                raise bad(field, getattr(self, field), problem)
        if unnoised_problem(self.dp, self.noise_multiplier):
            raise bad("noise_multiplier", self.noise_multiplier, "must be > 0 when dp is true "
                      "(0 would release unnoised updates with an infinite epsilon)")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool)):
            raise bad("seed", self.seed, "must be an integer or None")


@dataclass
class LocalTrainResult:
    loss: float  # mean training loss over the round's non-empty batches (nan if none)
    steps: int  # optimizer steps taken this round (under DP: every accounted step, empty ones too)
    num_examples: int  # number of windows (stays on the device under DP: it is the user's data size)
    sample_rate: float  # DP: the Poisson rate q the sampler used and the accountant recorded; plain: nan
    epsilon: float  # cumulative over every round this device ever trained (nan when dp=False)
    accountant_state: dict | None  # JSON-serialisable; None when dp=False


# ----------------------------------------------------------------------------------------- losses
def per_example_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """``[B]``: each example's mean cross-entropy over its non-padding (non-zero) targets.

    An example without any target contributes 0 (and a zero gradient).
    """
    b, length, vocab = logits.shape
    ce = F.cross_entropy(
        logits.reshape(-1, vocab), targets.reshape(-1), reduction="none", ignore_index=0
    ).view(b, length)
    counts = (targets != 0).sum(dim=1).clamp(min=1).to(ce.dtype)
    return ce.sum(dim=1) / counts


def sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of :func:`per_example_loss` (0 for an empty batch).

    Because every example's loss is already normalised by its own target count, Opacus'
    ``loss_reduction="mean"`` recovers each example's gradient exactly.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return per_example_loss(logits, targets).mean()


class SequenceLoss(nn.Module):
    """Criterion for Opacus ghost clipping: ``reduction`` "none" -> ``[B]``, "mean", or "sum"."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        per = per_example_loss(logits, targets)
        if self.reduction == "none":
            return per
        if self.reduction == "sum":
            return per.sum()
        return per.mean() if per.numel() else logits.sum() * 0.0


# ---------------------------------------------------------------------------------------- helpers
def accountant_epsilon(accountant_state: dict | None, delta: float, accountant: str) -> float:
    """Cumulative epsilon of a saved accountant state (0.0 with no history)."""
    return epsilon_from_state(accountant_state, delta, accountant)


def dp_steps_per_epoch(sample_rate: float) -> int:
    """DP-SGD steps per local epoch: ``ceil(1 / sample_rate)``, a constant of the config.

    Each window is drawn at least once per epoch in expectation. The tolerance keeps a rate such as
    ``1 / 93`` (whose float inverse is 92.99999999999999) at 93 steps, not 92 or 94.
    """
    if not 0.0 < sample_rate <= 1.0:
        raise PrivrecError(f"sample-rate={sample_rate!r} must be in (0, 1]")
    return max(1, math.ceil(1.0 / sample_rate - 1e-9))


def split_windows(windows: np.ndarray) -> tuple[Tensor, Tensor]:
    """``windows [n, W]`` -> (inputs ``[n, W-1]``, targets ``[n, W-1]``).

    A target whose input is padding (the first real item of a left-padded window) is set to 0
    (ignored): the model is never asked to predict from an empty context.
    """
    w = torch.as_tensor(np.asarray(windows), dtype=torch.long)
    inputs = w[:, :-1].contiguous()
    targets = w[:, 1:].clone()
    targets[inputs == 0] = 0
    return inputs, targets


def _check_windows(model: SASRec, windows: np.ndarray) -> np.ndarray:
    windows = np.asarray(windows)
    if windows.ndim != 2:
        raise PrivrecError(f"windows must be a 2-D array [n, window], got shape {windows.shape}")
    if windows.shape[0] and not np.issubdtype(windows.dtype, np.integer):
        raise PrivrecError(f"windows must hold integer item ids, got dtype {windows.dtype}")
    if windows.shape[1] < 2:
        raise PrivrecError(f"window length must be >= 2, got {windows.shape[1]}")
    if windows.shape[1] - 1 > model.cfg.max_len:
        raise PrivrecError(
            f"window={windows.shape[1]} needs max_len >= {windows.shape[1] - 1}, "
            f"but the model has max_len={model.cfg.max_len}"
        )
    if windows.shape[0] == 0:
        return windows.astype(np.int64)
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or hi > model.cfg.num_items:
        raise PrivrecError(
            f"windows hold item id {lo if lo < 0 else hi}, outside 0..num_items={model.cfg.num_items}"
        )
    return windows


def _proximal_reference(
    model: nn.Module, global_params: dict[str, Tensor] | None
) -> dict[str, Tensor]:
    ref = {}
    for name, p in model.named_parameters():
        if global_params is None:
            ref[name] = p.detach().clone()
            continue
        if name not in global_params:
            raise PrivrecError(f"global_params has no entry for parameter {name!r}")
        g = torch.as_tensor(global_params[name], dtype=p.dtype, device=p.device)
        if g.shape != p.shape:
            raise PrivrecError(
                f"global_params[{name!r}] has shape {tuple(g.shape)}, expected {tuple(p.shape)}"
            )
        ref[name] = g.detach().clone()
    return ref


def _proximal_step(params: list[tuple[Tensor, Tensor]], lr: float, mu: float) -> None:
    """FedProx as a separate, data-independent update: ``w -= lr * mu * (w - w_global)``."""
    with torch.no_grad():
        for p, g in params:
            p.sub_(lr * mu * (p - g))


def _seeds(seed: int | None, prior_steps: int) -> tuple[int, int, int]:
    # Mix in the device's step count so two rounds never reuse the same sampling masks / noise
    # (identical noise in two releases would cancel in their difference).
    if seed is None:
        ss = np.random.SeedSequence()  # OS entropy
    else:
        ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(prior_steps)])
    a, b, c = (int(x) for x in ss.generate_state(3, dtype=np.uint64) % (2**63 - 1))
    return a, b, c


# -------------------------------------------------------------------------------------- training
def train_local(
    model: SASRec,
    windows: np.ndarray,
    cfg: LocalTrainConfig,
    accountant_state: dict | None = None,
    global_params: dict[str, Tensor] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> LocalTrainResult:
    """Train ``model`` IN PLACE on ``windows`` (int [n, W], left-padded) for ``cfg.epochs`` epochs.

    The model is left unwrapped (plain ``state_dict()`` keys) and in train mode.
    ``on_epoch(epoch_index, mean_loss)`` is called after every epoch if given.
    """
    if not isinstance(cfg, LocalTrainConfig):
        raise PrivrecError(f"cfg must be a LocalTrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    windows = _check_windows(model, windows)
    n = int(windows.shape[0])
    prior = history_steps(accountant_state) if cfg.dp else 0
    if cfg.dp and accountant_state:
        from_json_state(accountant_state, cfg.accountant)  # mechanism check, clear error
    if n == 0 and not cfg.dp:
        return LocalTrainResult(float("nan"), 0, 0, float("nan"), float("nan"), None)
    # Under DP a device without windows still takes every step (on empty batches): whether it
    # holds any data must not show in what it sends.

    torch_seed, loader_seed, noise_seed = _seeds(cfg.seed, prior)
    inputs, targets = split_windows(windows)
    loader_gen = torch.Generator().manual_seed(loader_seed)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)  # dropout
        model.train()
        model.set_trainable(cfg.trainable)
        params = [p for p in model.parameters() if p.requires_grad]
        prox = None
        if cfg.proximal_mu > 0:
            ref = _proximal_reference(model, global_params)
            prox = [(p, ref[name]) for name, p in model.named_parameters() if p.requires_grad]
        optimizer = (torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam"
                     else torch.optim.SGD(params, lr=cfg.lr))
        if cfg.dp:
            return _train_dp(model, inputs, targets, cfg, accountant_state, optimizer, loader_gen,
                             noise_seed, prox, on_epoch)
        return _train_plain(model, TensorDataset(inputs, targets), cfg, optimizer, loader_gen, prox, on_epoch)


def _train_plain(model, dataset, cfg, optimizer, loader_gen, prox, on_epoch) -> LocalTrainResult:
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=loader_gen)
    losses, steps = [], 0
    for epoch in range(cfg.epochs):
        epoch_losses = []
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = sequence_loss(model(x), y)
            loss.backward()
            optimizer.step()
            if prox:
                _proximal_step(prox, cfg.lr, cfg.proximal_mu)
            steps += 1
            epoch_losses.append(float(loss.detach()))
        losses += epoch_losses
        if on_epoch:
            on_epoch(epoch, float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
    model.zero_grad(set_to_none=True)
    return LocalTrainResult(
        loss=float(np.mean(losses)) if losses else float("nan"),
        steps=steps,
        num_examples=len(dataset),
        sample_rate=float("nan"),
        epsilon=float("nan"),
        accountant_state=None,
    )


def _train_dp(model, inputs, targets, cfg, accountant_state, optimizer, loader_gen, noise_seed, prox,
              on_epoch) -> LocalTrainResult:
    from opacus.grad_sample import prepare_module
    from opacus.optimizers import get_optimizer_class
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from opacus.validators import ModuleValidator

    q = float(cfg.sample_rate)
    check_fixed_parameters(accountant_state, cfg.noise_multiplier, q, cfg.accountant)
    accountant = make_accountant(cfg.accountant)
    if accountant_state:
        # Before the first step: the new steps compose with every previous round.
        accountant.load_state_dict(from_json_state(accountant_state, cfg.accountant))

    n, length = int(inputs.shape[0]), int(inputs.shape[1])
    steps_per_epoch_ = dp_steps_per_epoch(q)
    # q and the step count come from the config, never from n (Opacus' sampler, explicit rate and steps).
    sampler = (UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=loader_gen,
                                             steps=steps_per_epoch_) if n else None)
    ModuleValidator.validate(model, strict=True)
    ghost = cfg.grad_sample_mode == "ghost"
    gsm = prepare_module(model, grad_sample_mode=cfg.grad_sample_mode, batch_first=True, loss_reduction="mean",
                         **({"max_grad_norm": float(cfg.max_grad_norm)} if ghost else {}))
    gsm.forbid_grad_accumulation()  # Poisson sampling: one batch per step
    dp_opt = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=cfg.grad_sample_mode)(
        optimizer=optimizer, noise_multiplier=float(cfg.noise_multiplier), max_grad_norm=float(cfg.max_grad_norm),
        expected_batch_size=int(cfg.batch_size),  # fixed divisor of the noisy sum, not q * n
        loss_reduction="mean", generator=torch.Generator().manual_seed(noise_seed))
    dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))  # every step is accounted
    dp_criterion = DPLossFastGradientClipping(gsm, dp_opt, SequenceLoss(), "mean") if ghost else sequence_loss

    losses, steps = [], 0
    try:
        with warnings.catch_warnings():
            # ghost mode: "Full backward hook is firing ... no inputs require gradients" (harmless)
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for epoch in range(cfg.epochs):
                epoch_losses = []
                for indices in (sampler if sampler is not None else [[]] * steps_per_epoch_):
                    dp_opt.zero_grad(set_to_none=True)
                    empty = len(indices) == 0
                    if empty:  # data-independent stand-in: loss 0, per-sample gradient 0
                        x = torch.zeros(1, length, dtype=torch.long)
                        y = torch.zeros(1, length, dtype=torch.long)
                    else:
                        index = torch.as_tensor(indices, dtype=torch.long)
                        x, y = inputs[index], targets[index]
                    loss = dp_criterion(gsm(x), y)
                    loss.backward()
                    dp_opt.step()  # clip, add noise, divide by batch_size, count the step
                    if prox:
                        _proximal_step(prox, cfg.lr, cfg.proximal_mu)
                    steps += 1
                    if not empty:
                        epoch_losses.append(float(loss.item()))
                losses += epoch_losses
                if on_epoch:
                    on_epoch(epoch, float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
    finally:
        dp_opt.zero_grad(set_to_none=True)
        gsm.cleanup()  # remove hooks and grad_sample attributes: model is plain again
        model.zero_grad(set_to_none=True)

    state = to_json_state(accountant.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps = float(accountant.get_epsilon(delta=float(cfg.delta)))
    return LocalTrainResult(
        loss=float(np.mean(losses)) if losses else float("nan"),
        steps=steps,
        num_examples=n,
        sample_rate=q,
        epsilon=eps,
        accountant_state=state,
    )
