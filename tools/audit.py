"""`privrec audit`: measure what one device's update leaks about its training windows (a lower bound).

On-device DP-SGD claims that whoever sees a device's model updates (the server) learns little about
any one window. The audit tests that claim on the real training path: m canary windows (random item
sequences) are each put into one device's data with probability 1/2, the device trains with
`shared.training.train_local` and the run's DP settings, and the adversary -- white-box, the
strongest natural one -- scores every canary by how far each round's update moved the model along
that canary's own gradient direction at the start of the round (`-grad / |grad|`, the direction its
clipped gradient pushes). The highest k scores are guessed "in", the lowest k "out", and
`shared.privacy.audit.epsilon_lower_bound` turns the number of correct guesses into the largest
epsilon the run rejects at confidence 1 - beta (Steinke, Nasr and Jagielski, 2023), reported next to
the epsilon the accountant claims for the same device, delta and neighbouring relation (add/remove
one window). A correct claim is never below the bound (except with probability beta); a broken
mechanism (noise or clipping off) shows a large bound.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from shared.config import RunConfig
from shared.errors import PrivrecError
from shared.model import SASRec, model_for
from shared.privacy.audit import epsilon_lower_bound, guess
from shared.training import LocalTrainConfig, per_example_loss, split_windows, train_local

__all__ = ["AuditResult", "ReleaseAuditResult", "audit_device", "audit_release", "canary_windows"]


@dataclass
class AuditResult:
    canaries: int  # m
    included: int  # canaries that were in the device's data
    background: int  # windows always in the device's data (the rest of its user's history)
    guesses: int  # r = k_in + k_out
    correct: int  # v
    beta: float
    delta: float
    epsilon_lower_bound: float  # empirical: rejected at confidence 1 - beta
    claimed_epsilon: float | None  # the accountant's, same device, delta and relation; None without DP
    accountant: str | None
    rounds: int
    steps: int  # DP-SGD steps the device took (all rounds)
    sample_rate: float | None  # Poisson rate (None without DP)
    dp: bool
    noise_multiplier: float
    max_grad_norm: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def sentence(self) -> str:
        claim = (f"claimed epsilon {self.claimed_epsilon:.3f} ({self.accountant} accountant)"
                 if self.claimed_epsilon is not None else "no claim (dp = false)")
        training = (f"{self.steps} DP-SGD steps, q = {self.sample_rate:.4g}, noise {self.noise_multiplier:g}, "
                    f"clip {self.max_grad_norm:g}" if self.dp else f"{self.steps} plain steps, no noise, no clipping")
        return (f"empirical epsilon lower bound {self.epsilon_lower_bound:.3f} at delta {self.delta:g} "
                f"({100 * (1 - self.beta):g}% confidence; {self.correct}/{self.guesses} guesses correct over "
                f"{self.canaries} canary windows, {self.included} included) vs {claim}; one device, "
                f"{self.rounds} round(s), {training}; add/remove one window, adversary: whoever sees the "
                "device's updates (white-box gradient-alignment attack)")

    @property
    def violated(self) -> bool:
        """The measurement rejects the claim: the claimed epsilon is below what the run leaked."""
        return self.claimed_epsilon is not None and self.epsilon_lower_bound > self.claimed_epsilon


def canary_windows(rng: np.random.Generator, m: int, window: int, num_items: int) -> np.ndarray:
    """m windows of `window` items drawn uniformly from 1..num_items: unlike each other and any real history."""
    return rng.integers(1, num_items + 1, size=(m, window), dtype=np.int64)


def _flat_update(model: SASRec, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: (p.detach() - before[name]) for name, p in model.named_parameters() if name in before}


def _alignment(model: SASRec, canaries: np.ndarray, update: dict[str, torch.Tensor]) -> np.ndarray:
    """For each canary: <update, -g / |g|>, g its loss gradient at `model`'s current (pre-round) weights."""
    inputs, targets = split_windows(canaries)
    params = [(name, p) for name, p in model.named_parameters() if name in update]
    scores = np.zeros(len(canaries))
    model.eval()  # no dropout: the adversary computes the exact direction
    for i in range(len(canaries)):
        model.zero_grad(set_to_none=True)
        per_example_loss(model(inputs[i:i + 1]), targets[i:i + 1]).sum().backward()
        dot, norm = 0.0, 0.0
        for name, p in params:
            if p.grad is None:
                continue
            g = p.grad.detach()
            dot -= float(torch.sum(g * update[name]))
            norm += float(torch.sum(g * g))
        scores[i] = dot / math.sqrt(norm) if norm > 0 else 0.0
    model.zero_grad(set_to_none=True)
    return scores


def train_config(cfg: dict[str, Any], seed: int | None) -> LocalTrainConfig:
    """The device's on-device training settings from a run config (keys of shared/config.py)."""
    return LocalTrainConfig.for_round(RunConfig.of(cfg).device, seed=seed, proximal_mu=0.0)


def audit_device(cfg: dict[str, Any], *, canaries: int = 1000, guesses_each: int | None = None,
                 background: int = 0, num_items: int = 1682, rounds: int = 1, beta: float = 0.05,
                 seed: int = 0, progress=None) -> AuditResult:
    """One device trained `rounds` rounds on `background` windows plus each canary with probability 1/2.

    `cfg` is a validated run config (its model, on-device training and DP keys); `guesses_each` = k
    guesses "in" and k "out" (default m/10, fixed before training as the method requires).
    """
    if canaries < 2 or background < 0 or rounds < 1 or num_items < 2:
        raise PrivrecError(f"audit: need canaries >= 2, background >= 0, rounds >= 1, items >= 2; got "
                           f"canaries={canaries}, background={background}, rounds={rounds}, items={num_items}")
    k = guesses_each if guesses_each is not None else max(1, canaries // 10)
    if not 1 <= k <= canaries // 2:
        raise PrivrecError(f"audit: --guesses {k} must be between 1 and half the canaries ({canaries // 2})")
    started = time.perf_counter()
    rng = np.random.default_rng([int(seed), 0xA0D17])  # inclusion: independent of training randomness
    window = cfg["window"]
    pool = canary_windows(rng, canaries, window, num_items)
    included = rng.random(canaries) < 0.5
    others = canary_windows(rng, background, window, num_items)
    data = np.concatenate([others, pool[included]])
    data = data[rng.permutation(len(data))]

    torch_state = torch.random.get_rng_state()
    torch.manual_seed(int(seed))
    model = model_for(cfg, num_items)
    torch.random.set_rng_state(torch_state)
    train_seed = int(seed) if cfg.get("deterministic-devices") else None  # None: fresh entropy, as on devices
    local = train_config(cfg, train_seed)

    scores = np.zeros(canaries)
    state, result = None, None
    for r in range(rounds):
        model.set_trainable(local.trainable)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        result = train_local(model, data, local, accountant_state=state)
        state = result.accountant_state
        update = _flat_update(model, before)
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():  # score at the weights the round started from, then restore
            for n, p in model.named_parameters():
                if n in before:
                    p.copy_(before[n])
        scores += _alignment(model, pool, update)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(after[n])
        if progress:
            progress(r + 1, rounds)
    r_guesses, correct = guess(scores, included, k, k)
    bound = epsilon_lower_bound(canaries, r_guesses, correct, cfg["delta"], beta)
    claimed = float(result.epsilon) if local.dp and math.isfinite(result.epsilon) else (math.inf if local.dp else None)
    steps = sum(int(n) for _, _, n in (state or {}).get("history", [])) if local.dp else result.steps * rounds
    return AuditResult(canaries=canaries, included=int(included.sum()), background=background, guesses=r_guesses,
                       correct=correct, beta=beta, delta=cfg["delta"], epsilon_lower_bound=bound,
                       claimed_epsilon=claimed, accountant=local.accountant if local.dp else None, rounds=rounds,
                       steps=steps, sample_rate=float(result.sample_rate) if local.dp else None, dp=local.dp,
                       noise_multiplier=float(local.noise_multiplier), max_grad_norm=float(local.max_grad_norm),
                       seconds=round(time.perf_counter() - started, 2))


# --------------------------------------------------------------------------- user-level DP-FedAvg
@dataclass
class UserAuditResult:
    canaries: int  # canary users m
    included: int
    background: int  # users always in the population
    guesses: int
    correct: int
    beta: float
    delta: float
    epsilon_lower_bound: float
    claimed_epsilon: float  # user-level DP-FedAvg's accountant, same delta, add/remove one user
    accountant: str
    rounds: int
    sample_rate: float  # Poisson rate of users per round
    noise_multiplier: float
    clipping_norm: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def sentence(self) -> str:
        return (f"user-level: empirical epsilon lower bound {self.epsilon_lower_bound:.3f} at delta {self.delta:g} "
                f"({100 * (1 - self.beta):g}% confidence; {self.correct}/{self.guesses} guesses correct over "
                f"{self.canaries} canary users, {self.included} included) vs claimed epsilon "
                f"{self.claimed_epsilon:.3f} ({self.accountant} accountant); DP-FedAvg, {self.rounds} round(s), "
                f"q = {self.sample_rate:.4g}, noise {self.noise_multiplier:g}, clip {self.clipping_norm:g}; "
                "add/remove one user, adversary: whoever sees the released global models (white-box)")

    @property
    def violated(self) -> bool:
        return self.epsilon_lower_bound > self.claimed_epsilon


def _user_alignment(model: SASRec, users: list[np.ndarray], step: dict[str, torch.Tensor]) -> np.ndarray:
    """For each user: <global step, -g / |g|>, g the gradient of the user's summed window loss."""
    params = [(name, p) for name, p in model.named_parameters() if name in step]
    scores = np.zeros(len(users))
    model.eval()
    for i, windows in enumerate(users):
        inputs, targets = split_windows(windows)
        model.zero_grad(set_to_none=True)
        per_example_loss(model(inputs), targets).sum().backward()
        dot, norm = 0.0, 0.0
        for name, p in params:
            if p.grad is not None:
                dot -= float(torch.sum(p.grad * step[name]))
                norm += float(torch.sum(p.grad * p.grad))
        scores[i] = dot / math.sqrt(norm) if norm > 0 else 0.0
    model.zero_grad(set_to_none=True)
    return scores


def audit_users(cfg: dict[str, Any], *, canaries: int = 200, background: int = 0, user_windows: int = 2,
                sample_rate: float = 0.5, guesses_each: int | None = None, num_items: int = 1682,
                rounds: int = 1, beta: float = 0.05, seed: int = 0, progress=None) -> UserAuditResult:
    """User-level DP-FedAvg audited the same way: canary *users* (each `user_windows` random windows) join
    the population with probability 1/2; every round each user joins the cohort with probability
    `sample_rate`, trains on-device as configured, and the server clips each update to
    `user-clipping-norm`, adds `user-noise-multiplier` x clip noise to the sum and divides by the expected
    cohort (`shared.privacy.user_level`, the functions the server uses). The adversary sees each released
    global model and scores every canary user by the alignment of the global step with its own gradient."""
    from shared.privacy.user_level import clip_update, noisy_mean_update, user_level_epsilon

    if canaries < 2 or background < 0 or rounds < 1 or not 0 < sample_rate <= 1 or user_windows < 1:
        raise PrivrecError(f"audit: need canaries >= 2, background >= 0, rounds >= 1, 0 < sample rate <= 1, "
                           f"windows per user >= 1; got {canaries}, {background}, {rounds}, {sample_rate}, "
                           f"{user_windows}")
    k = guesses_each if guesses_each is not None else max(1, canaries // 10)
    if not 1 <= k <= canaries // 2:
        raise PrivrecError(f"audit: --guesses {k} must be between 1 and half the canaries ({canaries // 2})")
    started = time.perf_counter()
    rng = np.random.default_rng([int(seed), 0xA0D18])
    window = cfg["window"]
    pool = [canary_windows(rng, user_windows, window, num_items) for _ in range(canaries)]
    included = rng.random(canaries) < 0.5
    population = [canary_windows(rng, user_windows, window, num_items) for _ in range(background)]
    population += [w for w, yes in zip(pool, included) if yes]
    # The fixed-denominator estimator divides by the expected cohort of the population without canaries
    # plus half of them: a constant, as the sensitivity argument needs.
    expected_cohort = sample_rate * (background + canaries / 2)
    clip, z = float(cfg["user-clipping-norm"]), float(cfg["user-noise-multiplier"])

    torch_state = torch.random.get_rng_state()
    torch.manual_seed(int(seed))
    model = model_for(cfg, num_items)
    torch.random.set_rng_state(torch_state)
    deterministic = bool(cfg.get("deterministic-devices"))
    local = train_config(cfg, int(seed) if deterministic else None)
    noise_rng = np.random.default_rng([int(seed), 0xA0D19] if deterministic else None)
    cohort_rng = np.random.default_rng([int(seed), 0xA0D1A] if deterministic else None)
    names = [n for n, _ in model.named_parameters()]
    scores = np.zeros(canaries)
    for r in range(rounds):
        current = {n: p.detach().numpy().astype(np.float64) for n, p in model.named_parameters()}
        clipped = []
        for windows in [u for u in population if cohort_rng.random() < sample_rate]:
            device = SASRec.from_state(model.cfg, model.state_dict())
            train_local(device, windows, local)
            update = {n: p.detach().numpy().astype(np.float64) - current[n] for n, p in device.named_parameters()}
            clipped.append(clip_update(update, clip)[0])
        mean = noisy_mean_update(clipped, names, {n: current[n].shape for n in names}, noise_std=z * clip,
                                 expected_cohort=expected_cohort, rng=noise_rng)
        step = {n: torch.from_numpy(mean[n]).to(torch.float32) for n in names}
        scores += _user_alignment(model, pool, step)  # at the global model the round started from
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(step[n])
        if progress:
            progress(r + 1, rounds)
    r_guesses, correct = guess(scores, included, k, k)
    bound = epsilon_lower_bound(canaries, r_guesses, correct, cfg["delta"], beta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus: "optimal order is the smallest alpha" at vacuous epsilons
        claimed = user_level_epsilon(z, sample_rate, rounds, cfg["delta"], cfg["accountant"])
    return UserAuditResult(canaries=canaries, included=int(included.sum()), background=background,
                           guesses=r_guesses, correct=correct, beta=beta, delta=cfg["delta"],
                           epsilon_lower_bound=bound, claimed_epsilon=float(claimed), accountant=cfg["accountant"],
                           rounds=rounds, sample_rate=sample_rate, noise_multiplier=z, clipping_norm=clip,
                           seconds=round(time.perf_counter() - started, 2))


# ------------------------------------------------------------------ the private pipelines' analytics releases
RELEASE_KINDS = ("popularity", "cooccurrence")
RELEASE_NOISE_KEYS = {"popularity": "popularity-noise-multiplier", "cooccurrence": "cooc-noise-multiplier"}
BACKGROUND_ITEMS = 20  # items in each background user's history


@dataclass
class ReleaseAuditResult:
    release: str  # "popularity" or "cooccurrence"
    canaries: int  # m canary users
    included: int
    background: int  # users always in
    guesses: int
    correct: int
    beta: float
    delta: float
    epsilon_lower_bound: float
    claimed_epsilon: float  # one Gaussian release of sensitivity 1, the run's accountant, add/remove one user
    accountant: str
    noise_multiplier: float
    coordinates: int  # items (popularity) or item pairs (co-occurrence) the release covers
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def sentence(self) -> str:
        what = "popularity histogram" if self.release == "popularity" else "windowed co-occurrence"
        return (f"{what} release: empirical epsilon lower bound {self.epsilon_lower_bound:.3f} at delta "
                f"{self.delta:g} ({100 * (1 - self.beta):g}% confidence; {self.correct}/{self.guesses} guesses correct "
                f"over {self.canaries} canary users, {self.included} included, {self.background} background users) "
                f"vs claimed epsilon {self.claimed_epsilon:.3f} ({self.accountant} accountant); one Gaussian release "
                f"of sensitivity 1 over {self.coordinates} coordinates, noise {self.noise_multiplier:g}; "
                "add/remove one user, adversary: whoever sees the release (each canary scored by the release along "
                "its own contribution)")

    @property
    def violated(self) -> bool:
        return self.epsilon_lower_bound > self.claimed_epsilon


def audit_release(cfg: dict[str, Any], kind: str, *, canaries: int = 1000, guesses_each: int | None = None,
                  background: int = 0, num_items: int = 1682, beta: float = 0.05, seed: int = 0) -> ReleaseAuditResult:
    """One analytics release of the private pipelines audited in one run: m canary users, each with its own item
    (popularity) or its own pair of items inside the co-occurrence window (co-occurrence), join the population
    with probability 1/2 beside `background` users with random histories; each user's contribution is built by
    the product's own functions (`shared.analytics.item_set_vector`, `cooc_vector`: L2 norm 1) and the release
    adds the configured noise once (`noisy_sum`, `gaussian_release`). The adversary scores every canary by the
    release's inner product with that canary's contribution (the likelihood-ratio statistic of a Gaussian
    release), guesses the top k in and the bottom k out, and `epsilon_lower_bound` turns the correct guesses into
    the epsilon the release provably exceeds."""
    from shared.analytics import cooc_vector, gaussian_release, item_set_vector, noisy_sum, pair_index
    from shared.privacy.accounting import epsilon_from_state

    if kind not in RELEASE_KINDS:
        raise PrivrecError(f"audit: --release {kind!r}: one of {', '.join(RELEASE_KINDS)}")
    k_items = int(cfg["cooc-items"])
    room = num_items if kind == "popularity" else k_items * (k_items - 1) // 2
    if canaries < 2 or background < 0 or canaries > room:
        raise PrivrecError(f"audit: --canaries {canaries}: need 2 to {room} (each canary has its own "
                           f"{'item' if kind == 'popularity' else 'pair among the top cooc-items items'})"
                           + ("" if background >= 0 else f"; --background {background} must be >= 0"))
    k = guesses_each if guesses_each is not None else max(1, canaries // 10)
    if not 1 <= k <= canaries // 2:
        raise PrivrecError(f"audit: --guesses {k} must be between 1 and half the canaries ({canaries // 2})")
    started = time.perf_counter()
    rng = np.random.default_rng([int(seed), 0xA0D20])
    included = rng.random(canaries) < 0.5
    z = float(cfg[RELEASE_NOISE_KEYS[kind]])
    deterministic = bool(cfg.get("deterministic-devices"))
    noise_rng = np.random.default_rng([int(seed), 0xA0D21] if deterministic else None)
    if kind == "popularity":
        own = rng.permutation(np.arange(1, num_items + 1))[:canaries]  # each canary user's one item
        canary_users = [np.array([item]) for item in own]
        contribution = lambda seq: item_set_vector([seq], num_items)  # noqa: E731
        release = lambda total: noisy_sum(total, z, noise_rng)  # noqa: E731
        background_users = [rng.choice(np.arange(1, num_items + 1), BACKGROUND_ITEMS, replace=False)
                            for _ in range(background)]
    else:
        items = np.arange(1, k_items + 1)  # the released top items: public, fixed here
        rows, cols = pair_index(k_items)
        chosen = rng.permutation(len(rows))[:canaries]  # each canary user's one pair, adjacent in its history
        canary_users = [np.array([items[rows[p]], items[cols[p]]]) for p in chosen]
        window = int(cfg["cooc-window"])
        contribution = lambda seq: cooc_vector([seq], items, window)  # noqa: E731
        release = lambda total: gaussian_release(total, z, noise_rng)  # noqa: E731
        background_users = [rng.choice(items, min(BACKGROUND_ITEMS, k_items), replace=False)
                            for _ in range(background)]
    vectors = [contribution(seq) for seq in canary_users]
    total = sum((v for v, yes in zip(vectors, included) if yes), start=np.zeros_like(vectors[0]))
    for seq in background_users:
        total = total + contribution(seq)
    released = release(total)
    scores = np.array([float(released @ v) for v in vectors])
    r_guesses, correct = guess(scores, included, k, k)
    bound = epsilon_lower_bound(canaries, r_guesses, correct, cfg["delta"], beta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus at vacuous epsilons: "optimal order is the smallest alpha"
        claimed = epsilon_from_state({"history": [[z, 1.0, 1]], "mechanism": cfg["accountant"]}, cfg["delta"],
                                     cfg["accountant"])
    return ReleaseAuditResult(release=kind, canaries=canaries, included=int(included.sum()), background=background,
                              guesses=r_guesses, correct=correct, beta=beta, delta=cfg["delta"],
                              epsilon_lower_bound=bound, claimed_epsilon=float(claimed), accountant=cfg["accountant"],
                              noise_multiplier=z, coordinates=int(len(released) - (kind == "popularity")),
                              seconds=round(time.perf_counter() - started, 2))
