"""Utility against population size (issue 15, part 4): NDCG@10 of the private pipeline at N = 943, 10,000, 100,000.

    python -m simulations.population_utility                                 # 943 (real), 10,000, 100,000
    python -m simulations.population_utility --populations 943 10000 --seeds 0 1 2
    python -m simulations.population_utility --quick --like PATH --populations 60 200 --work /tmp/x   # smoke run

For each population size N: N = the source's own user count is the real data (ML-100K: 943 users); any other
N is a synthetic population (`shared.data.synth.write_synthetic`, i.e. `privrec data synth --like ml-100k
--users N --seed 0`, written under `--work`, never in the repo; docs/synthetic-data.md says what such users can
and cannot stand for). Every population goes through privrec's own loader, leave-one-out split and device
store, and every figure is the project's full-ranking test NDCG@10 / HR@10 (own history excluded,
`shared.metrics`).

Arms at each N:

* **content-scorer pipeline, user-level DP at epsilon 2 and 8** (`model = content-scorer`, the default of
  `privrec simulate`): the DP popularity release, then DP-FedAvg rounds of the 387-weight scorer. Run
  in-process, NOT through Flower (a Flower simulation of 100,000 devices does not fit here), with the same
  code: `shared.scorer` (forward, features, popularity bias), `server.scorer.initial_scorer`,
  `shared.analytics.item_set_vector` / `noisy_sum` for the release, `shared.privacy.user_level`'s
  `poisson_cohort`, `clip_update` and `noisy_mean_update` for each round, Flower's FedAdam step as
  `simulations.scorer_schedule` replays it. Per-user gradients are computed for a whole chunk of users at
  once (`cohort_gradients`); `tests/test_population_utility.py` checks them against
  `shared.scorer.user_gradient` user by user.
* **the same pipeline without noise** (both noise multipliers 0, clipping kept): the non-private federation
  of the same model on the same data.
* **channel-scorer pipeline** (`model = channel-scorer`, the product's default `shared.config.DEFAULT_PIPELINE`)
  at epsilon 2 and 8 and without noise (all three multipliers 0, clipping kept): the DP popularity release, the
  DP windowed co-occurrence release among the top `cooc-items` released items, then DP-FedSGD rounds of the
  9-weight channel scorer, in-process like the content scorer with the product's code (`shared.analytics`
  releases as `server.scorer` makes them, `server.scorer.initial_scorer`, `shared.privacy.user_level`, FedAdam)
  and `shared.scorer.channel_features`' channels computed for a chunk at once (`base_channels`, `cooc_channel`:
  the same numbers, checked in tests; the co-occurrence channel rescaled by `shared.scorer.cooc_scale`, as the
  device does). Test and validation NDCG@10 / HR@10. Channels are computed chunk by chunk of users, never for
  every user at once. The product's multipliers (5, 3, 3.5) times one common factor per epsilon
  (`calibrate_channel`); at q N above `--simulated-cohort` the same noise-cohort-size ESTIMATE as the content
  scorer. `tests/test_population_utility.py` checks the features and per-user gradients against
  `shared.scorer.channel_features` / `channel_user_gradient`. `--references RESULTS.json` quotes the
  non-private SASRec federation of an earlier results file at the same N (issue 15's reference) without
  re-running it; `--merge` joins runs of other seeds.
* **channel-scorer + transitions** (`--product-transitions`): the product pipeline with `transition-release =
  true` (`shared.config`): a third release, each user's L2-normalised directed transition counts among the top
  `transition-items` released items (`shared.analytics.transition_sum`, `gaussian_release`), one more trained
  channel (`shared.scorer.transition_channel`, own counts removed in training: `with_transition_channel`, checked
  against `channel_features` / `channel_user_gradient` in tests), and its no-noise twin. Noise split FIXED BEFORE
  ANY RUN (TRANSITION_ARM): the default's (4.6, 2.76, 3.22) and the transition release at the co-occurrence's
  2.76, the four times one common factor per epsilon.
* **popularity** (non-private, training counts) and **DP popularity** at each epsilon (one Gaussian release
  of the item-set sum, `shared.analytics.noise_for_epsilon`: Opacus RDP, the private baseline's code).
* **SASRec, non-private federation** (per-row averaging, the non-private default; `simulations.fedopt`'s
  in-process loop with `shared.training.train_local` and `shared.aggregation`) and **centralized SASRec**
  (`shared.baselines.train_centralized`), each with a REDUCED budget that is the same at every N (rounds x
  cohort x local epochs; optimizer steps), one seed by default. They are references for the trend, not the
  README's converged figures (quoted beside them at N = 943).
* **transition scorer** at each epsilon and without noise (issue 15's target against SASRec): two user-level
  releases over every user, no sampling, no training: the DP popularity histogram and the sum of each user's
  L2-normalised (previous item, next item) pair counts (`transition_sum`, sensitivity 1); noise multipliers
  TRANSITION_REFERENCE x the smallest common factor reaching the target (Opacus RDP over both). A device scores
  log1p(DP popularity) + log1p(its last item's released row less TRANSITION_THRESHOLD noise std, positive part).
* **SASRec DP-FedAvg** at each epsilon and its two non-private twins (not clipped; clipped without noise), with
  the SASRec federation's rounds, expected cohort and local epochs: each device's update clipped to
  DP_SASREC_CLIP, noise on the sum, unweighted mean, FedAvg step. Noise of the real rate q's cohort (default:
  the product's q) on the mean: where the simulated cohort is smaller, an ESTIMATE (noise-cohort-size).

Sampling rule: the content-scorer defaults at every N (`shared.config.CONTENT_SCORER_PIPELINE`: Poisson q = 0.25, 10
rounds, clip 1, FedAdam server-lr 0.2, reference noise multipliers 4 (popularity) and 2.5 (rounds)), i.e. what
`privrec simulate` would do on that population. The epsilon depends on q, the rounds and the two noise
multipliers only, so the calibrated multipliers are the same at every N, and the noise on the averaged
update, z C / (q N), falls as 1 / N (the popularity histogram's noise stays z_pop while its signal grows
with N). Calibration: the two reference multipliers times one common factor, the smallest (bisection,
`simulations.privacy_utility.calibrate_factor`) whose composed epsilon (`shared.privacy.pipeline.
pipeline_epsilon`: Opacus RDP over the history [[z_pop, 1, 1], [z, q, rounds]], the run's own accountant)
is <= the target at delta 1e-5. Every epsilon: user-level, unit one user's whole history, add/remove one
user, adversary whoever sees the released histogram and models (not the server: no secure aggregation).

Seeds change the DP noise, the Poisson cohorts and the SASRec initialisation; the synthetic populations are
fixed (synthesis seed 0). Within one seed the arms share their random numbers (the same cohorts, the same
standard normal draws scaled by each arm's multiplier). Where N exceeds `--eval-users`, every arm is
evaluated on the same random subset of that many users (said in the results).

Writes simulations/results/population-utility-<time>.{json,md,png} and prints the Markdown.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from simulations.output import log_progress, save_results, timestamped

POPULATIONS = (943, 10_000, 100_000)
TARGETS = (2.0, 8.0)
SYNTH_SEED = 0
QUOTED_943 = {  # README "Measured" tables, ML-100K, full budgets (not re-run here)
    "centralized SASRec, 30 epochs": 0.0818,
    "SASRec FedAvg, 40 rounds x 64 devices x 5 epochs": 0.0620,
    "SASRec per-row federation, 50 rounds x 64 x 5": 0.0678,
}


@dataclass(frozen=True)
class Budget:
    """What every population gets (the pipeline's own settings come from the product's defaults)."""

    fed_rounds: int = 10  # SASRec federation: rounds x cohort x local epochs
    fed_cohort: int = 64
    fed_epochs: int = 5
    central_steps: int = 300  # centralized SASRec: Adam steps of batch 64
    eval_users: int = 20_000  # at larger N every arm is scored on the same random subset of users
    chunk_users: int = 256  # users per vectorised gradient chunk


# transition scorer: DP popularity + DP next-item transitions, scored on the device (no training). Noise
# multipliers before calibration 4 : 3; cells under 3 noise std dropped (about 2 false cells in a row of 1,683)
TRANSITION_REFERENCE = (4.0, 3.0)
TRANSITION_THRESHOLD = 3.0
# SASRec DP-FedAvg: update clip, chosen from two non-private rounds at N = 100,000 (update norms 10% / 50% / 90%:
# 7.1 / 7.5 / 8.1); over the 10 rounds the norms grew (median 8.5), so it binds for about half of the updates
DP_SASREC_CLIP = 8.0

QUICK = Budget(fed_rounds=2, fed_cohort=8, fed_epochs=1, central_steps=4, eval_users=20_000, chunk_users=64)


# ------------------------------------------------------------------------------------ settings and privacy
def pipeline_settings(rounds: int | None = None) -> dict:
    """The content-scorer defaults (`shared.config`), as `privrec simulate` runs them."""
    from shared import config

    cfg = {**config.defaults(), **config.CONTENT_SCORER_PIPELINE}
    return {"q": cfg["fraction-train"], "rounds": rounds or cfg["num-rounds"], "clip": cfg["user-clipping-norm"],
            "server-lr": cfg["server-lr"], "popularity-z": cfg["popularity-noise-multiplier"],
            "z": cfg["user-noise-multiplier"], "targets": cfg["scorer-targets"], "profile-items": cfg["profile-items"],
            "decay": cfg["profile-decay"], "delta": cfg["delta"], "accountant": cfg["accountant"]}


def calibrate_pipeline(target: float, s: dict) -> dict:
    """Noise multipliers (popularity, rounds) = reference x the smallest common factor reaching <= target."""
    from shared.privacy.pipeline import pipeline_epsilon
    from simulations.privacy_utility import calibrate_factor

    def epsilon_of(c: float) -> float:
        return pipeline_epsilon(c * s["popularity-z"], c * s["z"], s["q"], s["rounds"], s["delta"], s["accountant"])

    factor = calibrate_factor(epsilon_of, target)
    return {"target": target, "factor": factor, "popularity-z": factor * s["popularity-z"], "z": factor * s["z"],
            "epsilon": epsilon_of(factor)}


def arm_privacy(z_pop: float, z: float, s: dict, n: int) -> dict:
    """The statement of one private arm at population n."""
    from shared.privacy.pipeline import pipeline_epsilon

    return {"epsilon": pipeline_epsilon(z_pop, z, s["q"], s["rounds"], s["delta"], s["accountant"]),
            "delta": s["delta"], "accountant": f"Opacus {s['accountant']} over [[z_pop, 1, 1], [z, q, rounds]] "
                                                "(shared.privacy.pipeline.pipeline_epsilon)",
            "unit": "one user's whole history", "relation": "add/remove one user",
            "mechanism": f"Gaussian popularity release (sensitivity 1, z_pop {z_pop:.3f}, no sampling) + "
                         f"{s['rounds']} DP-FedAvg rounds (each user's gradient clipped to {s['clip']:g}, "
                         f"N(0, ({z:.3f} x {s['clip']:g})^2) on the sum, / q N)",
            "sampling": f"Poisson, q = {s['q']:g} per round over {n} users (expected cohort {s['q'] * n:.0f})",
            "noise-std-on-mean-update": z * s["clip"] / (s["q"] * n),
            "adversary": "whoever sees the released histogram and models; not the server (no secure aggregation)"}


# ------------------------------------------------------------------------------------ populations
@dataclass
class Population:
    n: int
    label: str
    store_dir: Path
    users: object  # shared.data.store DeviceData of every user
    catalogue: object  # shared.scorer.Catalogue
    item_sum: np.ndarray  # sum of every user's item-set vector (the popularity release before noise)
    eval_index: np.ndarray  # users every arm is scored on
    interactions: int
    real: bool


def load_population(n: int, like: str, work: Path, eval_users: int, synthetic: bool = False) -> Population:
    """The real source when it has exactly n users (unless `synthetic`), else n synthetic users like it."""
    from shared.analytics import item_set_vector
    from shared.data.fetch import fetch_ml100k
    from shared.data.formats import load_interactions
    from shared.data.store import ITEMS_FILE, open_store, prepare_store
    from shared.data.synth import write_synthetic
    from shared.scorer import read_catalogue
    from shared.text.features import store_text_features

    source = fetch_ml100k() if like == "ml-100k" else Path(like).expanduser()
    source_store = prepare_store(like if like == "ml-100k" else str(source), 1)
    if open_store(source_store).num_users == n and not synthetic:
        store_dir, label = source_store, f"{like} (real)"
    else:
        out = work / f"synth-{Path(like).name}-{n}-s{SYNTH_SEED}"
        if not out.exists():
            log_progress(f"writing {n:,} synthetic users like {like} to {out}")
            write_synthetic(load_interactions(source), out, n, SYNTH_SEED, like=like)
        store_dir, label = prepare_store(str(out), 1, cache_dir=work / "cache"), f"synthetic like {like}, seed 0"
    store = open_store(store_dir)
    users = store.all_users()
    text = store_text_features(store_dir, progress=False).vectors
    catalogue = read_catalogue(Path(store_dir) / ITEMS_FILE, text)  # as a device reads it (genres: channel scorer)
    count = len(users.train)
    index = np.arange(count) if count <= eval_users else \
        np.sort(np.random.default_rng(12345).choice(count, eval_users, replace=False))
    return Population(n=count, label=label, store_dir=Path(store_dir), users=users, catalogue=catalogue,
                      item_sum=item_set_vector(users.train, store.num_items), eval_index=index,
                      interactions=int(sum(len(t) for t in users.train) + 2 * count),
                      real=Path(store_dir) == Path(source_store))


# ------------------------------------------------------------------------------------ vectorised scorer
def batch_features(catalogue, histories, profile_items: int, decay: float):
    """`shared.scorer.device_features` for many histories at once (the same numbers, vectorised)."""
    from shared.scorer import RECENT_ITEMS

    text = catalogue.text.numpy().astype(np.float64)
    n, p = len(histories), profile_items
    last = np.zeros((n, p), dtype=np.int64)
    recent = np.zeros((n, RECENT_ITEMS), dtype=np.int64)
    last_mask = np.zeros((n, p), dtype=bool)
    recent_mask = np.zeros((n, RECENT_ITEMS), dtype=bool)
    for u, seq in enumerate(histories):
        seq = np.asarray(seq, dtype=np.int64).reshape(-1)
        tail = seq[-p:][::-1]
        last[u, : len(tail)], last_mask[u, : len(tail)] = tail, True
        r = seq[-RECENT_ITEMS:]
        recent[u, : len(r)], recent_mask[u, : len(r)] = r, True
    weights = np.where(last_mask, decay ** np.arange(p)[None, :], 0.0)
    profile = np.einsum("up,upd->ud", weights, text[last])
    profiles = profile / (np.linalg.norm(profile, axis=1, keepdims=True) + 1e-12)
    gaps = np.abs(catalogue.raw[None, None, :] - catalogue.raw[recent][:, :, None])
    raw_near = -np.log1p(np.where(recent_mask[:, :, None], gaps, np.inf).min(1))
    wsum = weights.sum(1)
    mean_year = (weights * catalogue.years[last]).sum(1) / np.where(wsum > 0, wsum, 1.0)
    year_near = -np.abs(catalogue.years[None, :] - mean_year[:, None]) / 10.0
    empty = ~last_mask[:, 0]
    profiles[empty], raw_near[empty], year_near[empty] = 0.0, 0.0, 0.0
    return (torch.from_numpy(profiles.astype(np.float32)), torch.from_numpy(raw_near.astype(np.float32)),
            torch.from_numpy(year_near.astype(np.float32)))


def chunk_examples(train, users, targets: int):
    """(histories, next items, owner = position of the user in `users`) of `shared.scorer.training_examples`."""
    from shared.scorer import training_examples

    histories, nexts, owner = [], [], []
    for i, u in enumerate(users):
        h, nx = training_examples([train[u]], targets)
        histories += h
        nexts.append(nx)
        owner += [i] * len(h)
    nexts = np.concatenate(nexts) if nexts else np.zeros(0, np.int64)
    return histories, torch.from_numpy(nexts), torch.tensor(owner, dtype=torch.long)


def cohort_gradients(model, catalogue, features, nexts, owner, num_users: int) -> dict[str, torch.Tensor]:
    """Per-user gradients [users, ...] of `shared.scorer.user_gradient`'s loss (mean softmax loss over the user's
    examples), from one forward of the shared model over every example of the chunk.

    The scores are linear in the trained weights, so each example's weight gradient follows from dL/dscores:
    text_weight: profile * (G @ text); scales: (G . popularity, G . raw-id proximity, G . year proximity).
    A user with no example gets a zero gradient, as `user_gradient` gives it.
    """
    profile, raw_near, year_near = features
    grads = {k: torch.zeros(num_users, *p.shape) for k, p in model.named_parameters() if p.requires_grad}
    if len(nexts) == 0:
        return grads
    with torch.no_grad():
        scores = model(catalogue.text, profile, raw_near, year_near)
    scores.requires_grad_(True)
    per_user = torch.bincount(owner, minlength=num_users).clamp(min=1).to(scores.dtype)
    losses = torch.nn.functional.cross_entropy(scores[:, 1:], nexts - 1, reduction="none")
    (losses / per_user[owner]).sum().backward()
    g = scores.grad
    with torch.no_grad():
        grads["text_weight"].index_add_(0, owner, profile * (g @ catalogue.text))
        scales = torch.stack([g @ model.popularity, (g * raw_near).sum(1), (g * year_near).sum(1)], dim=1)
        grads["scales"].index_add_(0, owner, scales)
    return grads


def held_out_ranks(model, pop: Population, s: dict, batch: int = 512) -> np.ndarray:
    """Test-item ranks of the `pop.eval_index` users (`shared.scorer.evaluation_ranks`, vectorised features)."""
    from shared.metrics import eval_inputs, target_ranks

    users = pop.users
    idx = pop.eval_index
    inputs, targets, exclude = eval_inputs([users.train[i] for i in idx], users.valid[idx], users.test[idx], "test")
    ranks = np.zeros(len(targets), dtype=np.int64)
    for start in range(0, len(targets), batch):
        stop = min(start + batch, len(targets))
        feats = batch_features(pop.catalogue, inputs[start:stop], s["profile-items"], s["decay"])
        with torch.no_grad():
            scores = model(pop.catalogue.text, *feats)
        ranks[start:stop] = target_ranks(scores, torch.from_numpy(np.asarray(targets[start:stop])),
                                         exclude[start:stop])
    return ranks


def figures(ranks: np.ndarray) -> dict:
    from shared.metrics import hit_at_k, ndcg_at_k

    return {"ndcg@10": float(ndcg_at_k(ranks).mean()), "hr@10": float(hit_at_k(ranks).mean())}


def simulated_rate(s: dict, n: int, simulated_cohort: int) -> float:
    """The sampling rate the simulation uses: q, or a smaller one when q N exceeds `simulated_cohort` (> 0)."""
    return s["q"] if simulated_cohort <= 0 or s["q"] * n <= simulated_cohort else simulated_cohort / n


def run_scorer_arms(pop: Population, arms: dict[str, tuple[float, float]], s: dict, seed: int,
                    chunk: int, simulated_cohort: int = 0) -> dict[str, dict]:
    """Every arm (label -> (popularity z, round z)) of the pipeline on `pop`, sharing cohorts and noise draws.

    With q N > `simulated_cohort` > 0 this is an ESTIMATE (pfl-research's noise-cohort-size): each round samples
    users at the smaller rate q' = simulated_cohort / N, averages their clipped updates over q' N, and adds the
    noise the real run adds to its mean, N(0, (z C / (q N))^2): the noise of the population's cohort, the
    sampling variance of a smaller one. The privacy figures are those of the real run (q, z) it stands for.
    """
    from server.scorer import initial_scorer
    from shared.analytics import noisy_sum
    from shared.privacy.user_level import clip_update, noisy_mean_update, poisson_cohort
    from simulations.scorer_schedule import fedadam_state, fedadam_step

    started = time.perf_counter()
    cat, train, n = pop.catalogue, pop.users.train, pop.n
    models, adam = {}, {}
    for label, (z_pop, _) in arms.items():
        released = noisy_sum(pop.item_sum, z_pop, np.random.default_rng([seed, 0]))  # the same draw, scaled
        models[label] = initial_scorer(cat, released, seed)
        adam[label] = fedadam_state(models[label])
    keys = [k for k, _ in models[next(iter(arms))].named_parameters()]
    shapes = {k: tuple(p.shape) for k, p in models[next(iter(arms))].named_parameters()}
    sampler = random.Random(seed)
    q_sim = simulated_rate(s, n, simulated_cohort)
    out = {label: {"round-0": figures(held_out_ranks(m, pop, s))} for label, m in models.items()}
    cohorts = []
    for r in range(1, s["rounds"] + 1):
        cohort = poisson_cohort(range(n), q_sim, sampler)
        cohorts.append(len(cohort))
        totals = {label: {k: np.zeros(shapes[k]) for k in keys} for label in arms}
        for start in range(0, len(cohort), chunk):
            members = cohort[start:start + chunk]
            histories, nexts, owner = chunk_examples(train, members, s["targets"])
            feats = batch_features(cat, histories, s["profile-items"], s["decay"])
            for label, model in models.items():
                grads = cohort_gradients(model, cat, feats, nexts, owner, len(members))
                minus = {k: -grads[k].double().numpy() for k in keys}  # a device's update is minus its gradient
                for i in range(len(members)):
                    clipped, _ = clip_update({k: minus[k][i] for k in keys}, s["clip"])
                    for k in keys:
                        totals[label][k] += clipped[k]
        for label, (_, z) in arms.items():
            # noise std on the mean z C / (q N) whatever the simulated rate: the sum's noise is scaled by q' / q
            mean = noisy_mean_update([totals[label]], keys, shapes, z * s["clip"] * q_sim / s["q"], q_sim * n,
                                     np.random.default_rng([seed, r]))
            fedadam_step(models[label], adam[label], {k: torch.from_numpy(mean[k]).float() for k in keys}, r,
                         s["server-lr"])
    for label, model in models.items():
        out[label].update(figures(held_out_ranks(model, pop, s)))
        out[label]["cohorts"] = cohorts
        out[label]["simulated-q"] = q_sim
        out[label]["estimate"] = q_sim < s["q"]
        out[label]["seconds-all-arms"] = round(time.perf_counter() - started, 1)
    return out


# ------------------------------------------------------------------------------------ channel scorer (the default)
CHANNEL_ARM = "channel-scorer"
FEDERATION = "SASRec federation, no DP (reduced budget)"  # issue 15's non-private federation reference


def channel_settings(rounds: int | None = None) -> dict:
    """The product's default pipeline (`shared.config.DEFAULT_PIPELINE`: model = channel-scorer)."""
    from shared import config

    cfg = config.resolve_run()  # what `privrec simulate` runs with no options
    return {"model": cfg["model"], "q": cfg["fraction-train"], "rounds": rounds or cfg["num-rounds"],
            "clip": cfg["user-clipping-norm"], "server-lr": cfg["server-lr"],
            "popularity-z": cfg["popularity-noise-multiplier"], "cooc-z": cfg["cooc-noise-multiplier"],
            "z": cfg["user-noise-multiplier"], "targets": cfg["scorer-targets"],
            "profile-items": cfg["profile-items"], "decay": cfg["profile-decay"], "cooc-items": cfg["cooc-items"],
            "cooc-window": cfg["cooc-window"], "delta": cfg["delta"], "accountant": cfg["accountant"],
            "transition-items": cfg["transition-items"], "transition-z": cfg["transition-noise-multiplier"]}


# The product with `transition-release = true`: the noise split of its four releases, FIXED BEFORE ANY RUN of
# this arm: the default's three multipliers (popularity 4.6, co-occurrence 2.76, rounds 3.22) and the transition
# release at the co-occurrence's multiplier (2.76, the `transition-noise-multiplier` default), all four times the
# one smallest common factor reaching the target (`calibrate_channel(..., transitions=True)`).
TRANSITION_ARM = "channel-scorer + transitions"


def _arm(multipliers: tuple) -> tuple[float, float, float, float | None]:
    """(z_pop, z_cooc, z, z_transitions or None) of a channel arm given as 3 (no transition release) or 4 values."""
    z_pop, z_cooc, z, *rest = multipliers
    return z_pop, z_cooc, z, (rest[0] if rest else None)


def channel_epsilon(z_pop: float, z_cooc: float, z: float, c: dict, z_t: float | None = None) -> float:
    """`shared.privacy.pipeline.pipeline_epsilon` of the channel pipeline: Opacus over [[z_pop, 1, 1],
    [z_cooc, 1, 1], ([z_t, 1, 1] with the transition release), [z, q, rounds]] (the run's own accountant)."""
    from shared.privacy.pipeline import pipeline_epsilon

    return pipeline_epsilon(z_pop, z, c["q"], c["rounds"], c["delta"], c["accountant"], cooc_noise=z_cooc,
                            transition_noise=z_t)


def calibrate_channel(target: float, c: dict, transitions: bool = False) -> dict:
    """Noise multipliers (popularity, co-occurrence, rounds; and with `transitions` the transition release) = the
    product's x the smallest common factor reaching <= target (the content-scorer arm's rule)."""
    from simulations.privacy_utility import calibrate_factor

    def epsilon_of(f: float) -> float:
        return channel_epsilon(f * c["popularity-z"], f * c["cooc-z"], f * c["z"], c,
                               f * c["transition-z"] if transitions else None)

    factor = calibrate_factor(epsilon_of, target)
    return {"target": target, "factor": factor, "popularity-z": factor * c["popularity-z"],
            "cooc-z": factor * c["cooc-z"], "z": factor * c["z"], "epsilon": epsilon_of(factor),
            **({"transition-z": factor * c["transition-z"]} if transitions else {})}


def channel_privacy(z_pop: float, z_cooc: float, z: float, c: dict, n: int, z_t: float | None = None) -> dict:
    transitions = "" if z_t is None else (
        f"Gaussian directed transition release among the top {c['transition-items']} released items (each user's "
        f"consecutive-pair counts L2 1, z_transitions {z_t:.3f}, no sampling) + ")
    return {"epsilon": channel_epsilon(z_pop, z_cooc, z, c, z_t), "delta": c["delta"],
            "accountant": f"Opacus {c['accountant']} over [[z_pop, 1, 1], [z_cooc, 1, 1], "
                          + ("" if z_t is None else "[z_transitions, 1, 1], ") +
                          "[z, q, rounds]] (shared.privacy.pipeline.pipeline_epsilon)",
            "unit": "one user's whole history", "relation": "add/remove one user",
            "mechanism": f"Gaussian popularity release (sensitivity 1, z_pop {z_pop:.3f}, no sampling) + Gaussian "
                         f"windowed co-occurrence release among the top {c['cooc-items']} released items (window "
                         f"{c['cooc-window']}, each user's pairs L2 1, z_cooc {z_cooc:.3f}, no sampling) + "
                         f"{transitions}"
                         f"{c['rounds']} DP-FedSGD rounds (each user's gradient clipped to {c['clip']:g}, "
                         f"N(0, ({z:.3f} x {c['clip']:g})^2) on the sum, / q N, FedAdam lr {c['server-lr']:g})",
            "sampling": f"releases: every user, once; rounds: Poisson, q = {c['q']:g} per round over {n} users "
                        f"(expected cohort {c['q'] * n:.0f})",
            "noise-std-on-mean-update": z * c["clip"] / (c["q"] * n),
            "adversary": "whoever sees the released histogram, co-occurrence and models; not the server (no secure "
                         "aggregation)"}


def channel_releases(pop: Population, arms: dict[str, tuple[float, float, float]], c: dict, seed: int) -> dict:
    """label -> (released popularity, co-occurrence item ids, released [K, K] matrix), as `server.scorer`'s
    `released_popularity` / `released_cooccurrence` make them (`shared.analytics`: `noisy_sum`, `top_items`, the
    sum of `cooc_vector` over every user, `gaussian_release`, `cooc_from_release`), the same standard normal
    draws scaled by each arm's multipliers. The exact sum is computed once per item SET (a user's pair weights
    do not depend on the order of the items: the sum in another order is the same matrix permuted)."""
    from shared.analytics import cooc_from_release, cooc_vector, gaussian_release, noisy_sum, pair_index, top_items

    sums, out = {}, {}
    for label, multipliers in arms.items():
        z_pop, z_cooc, _, _ = _arm(multipliers)
        histogram = noisy_sum(pop.item_sum, z_pop, np.random.default_rng([seed, 0]))
        items = top_items(histogram, c["cooc-items"])
        ordered = np.sort(items)
        if tuple(ordered) not in sums:
            sums[tuple(ordered)] = cooc_from_release(cooc_vector(pop.users.train, ordered, c["cooc-window"]),
                                                     len(items))
        at = np.searchsorted(ordered, items)
        rows, cols = pair_index(len(items))
        total = sums[tuple(ordered)][np.ix_(at, at)][rows, cols]  # cooc_vector(train, items, window)
        pairs = gaussian_release(total, z_cooc, np.random.default_rng([seed, 5]))
        out[label] = (histogram, items, cooc_from_release(pairs, len(items)))
    return out


def transition_releases(pop: Population, arms: dict, c: dict, seed: int, histograms: dict) -> dict:
    """label -> (item ids, released [K, K] directed counts, threshold) for the arms with a transition release, as
    `server.scorer.released_transitions` makes it: `shared.analytics.transition_sum` over every user among the top
    `transition-items` of the arm's released popularity, plus `gaussian_release` (draws [seed, 7]); the threshold
    TRANSITION_THRESHOLD x z_transitions (`shared.scorer`)."""
    from shared.analytics import gaussian_release, top_items
    from shared.analytics import transition_sum as product_transition_sum
    from shared.scorer import TRANSITION_THRESHOLD

    sums, out = {}, {}
    for label, multipliers in arms.items():
        z_t = _arm(multipliers)[3]
        if z_t is None:
            continue
        items = top_items(histograms[label], c["transition-items"])
        if tuple(items) not in sums:
            sums[tuple(items)] = product_transition_sum(pop.users.train, items)
        released = gaussian_release(sums[tuple(items)], z_t, np.random.default_rng([seed, 7]))
        out[label] = (items, released, TRANSITION_THRESHOLD * z_t)
    return out


def cooc_channel(histories, items: np.ndarray, cooc: np.ndarray, width: int, owns=None, owner=None) -> torch.Tensor:
    """The `cooc` channel of `shared.scorer.channel_features` for many histories at once [B, items + 1]:
    `shared.scorer.cooc_scale(cooc)` x the 0.8^k-weighted released rows of the last 10 items, less the user's own
    matrix (`owns[owner[b]]`) when given."""
    from shared.scorer import COOC_QUERY_DECAY, COOC_QUERY_ITEMS, cooc_scale

    position = np.full(width, -1, dtype=np.int64)
    position[items] = np.arange(len(items))
    weights = np.zeros((len(histories), len(items)))
    for b, seq in enumerate(histories):
        query = np.asarray(seq, dtype=np.int64).reshape(-1)[-COOC_QUERY_ITEMS:][::-1]
        at = position[query]
        inside = at >= 0
        np.add.at(weights[b], at[inside], (COOC_QUERY_DECAY ** np.arange(len(query)))[inside])
    rows = weights @ cooc
    if owns is not None:
        for b in range(len(histories)):
            rows[b] -= weights[b] @ owns[owner[b]]
    out = np.zeros((len(histories), width))
    out[:, items] = cooc_scale(cooc) * rows
    return torch.from_numpy(out.astype(np.float32))


def channel_tables(catalogue) -> dict:
    """The public item-side tables the channels read, once per population: text rows (float64), the item-item
    text cosine [items + 1, items + 1] (so max10 / last are look-ups, not a matrix product per history) and the
    unit genre rows."""
    text = catalogue.text.numpy().astype(np.float64)
    genres = catalogue.genres if catalogue.genres is not None else np.zeros((len(text), 1))
    return {"text": text, "cosine": text @ text.T, "genres": np.asarray(genres, dtype=np.float64)}


def _tails(seqs, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, k] ids of each sequence's last k items, newest FIRST, and their mask."""
    ids, mask = np.zeros((len(seqs), k), dtype=np.int64), np.zeros((len(seqs), k), dtype=bool)
    for u, seq in enumerate(seqs):
        tail = seq[-k:][::-1]
        ids[u, : len(tail)], mask[u, : len(tail)] = tail, True
    return ids, mask


def base_channels(catalogue, histories, c: dict, tables: dict | None = None, block: int = 128):
    """`shared.scorer.channel_features` without the co-occurrence (an empty release), vectorised (the same
    numbers): unit profiles [B, d], every channel but `cooc` (left 0) [B, len(CHANNELS), items + 1], history
    mask [B, items + 1]. Computed once per chunk for every arm; `cooc_channel` fills channel 0.
    `tests/test_population_utility.py` checks it against `channel_features`."""
    from shared.scorer import CHANNELS, HISTORY_MASK, RECENT_ITEMS, RECENT_WINDOW

    tables = tables or channel_tables(catalogue)
    text, cosine, genres = tables["text"], tables["cosine"], tables["genres"]
    n, width, p = len(histories), catalogue.num_items + 1, c["profile-items"]
    profiles = np.zeros((n, text.shape[1]), dtype=np.float32)
    channels = np.zeros((n, len(CHANNELS), width), dtype=np.float32)
    mask = np.zeros((n, width), dtype=np.float32)
    at = {name: i for i, name in enumerate(CHANNELS)}
    for start in range(0, n, block):
        seqs = [np.asarray(h, dtype=np.int64).reshape(-1) for h in histories[start:start + block]]
        rows = slice(start, start + len(seqs))
        full = np.array([len(s) > 0 for s in seqs])
        last, last_mask = _tails(seqs, p)
        weights = np.where(last_mask, c["decay"] ** np.arange(p)[None, :], 0.0)
        profile = np.einsum("up,upd->ud", weights, text[last])
        profiles[rows] = profile / (np.linalg.norm(profile, axis=1, keepdims=True) + 1e-12)
        wsum = weights.sum(1)
        mean_year = (weights * catalogue.years[last]).sum(1) / np.where(wsum > 0, wsum, 1.0)
        year = -np.abs(catalogue.years[None, :] - mean_year[:, None]) / 10.0
        recent, recent_mask = _tails(seqs, RECENT_ITEMS)
        gaps = np.abs(catalogue.raw[None, None, :] - catalogue.raw[recent][:, :, None])
        raw = -np.log1p(np.where(recent_mask[:, :, None], gaps, np.inf).min(1))
        window, window_mask = _tails(seqs, RECENT_WINDOW)
        max10 = np.where(window_mask[:, :, None], cosine[window], -np.inf).max(1)
        genre = (genres[window] * window_mask[:, :, None]).sum(1)
        genre = (genre / (np.linalg.norm(genre, axis=1, keepdims=True) + 1e-12)) @ genres.T
        means = np.stack([text[s].mean(0) if len(s) else np.zeros(text.shape[1]) for s in seqs])
        long = (means / (np.linalg.norm(means, axis=1, keepdims=True) + 1e-12)) @ text.T
        newest = cosine[last[:, 0]]
        for name, value in (("max10", max10), ("genre", genre), ("year", year), ("raw", raw), ("last", newest),
                            ("long", long)):
            channels[rows, at[name]] = np.where(full[:, None], value, 0.0)
        for u, seq in enumerate(seqs):
            mask[start + u, seq] = HISTORY_MASK
    return torch.from_numpy(profiles), torch.from_numpy(channels), torch.from_numpy(mask)


def channel_cohort_gradients(model, catalogue, profile, channels, mask, nexts, owner,
                             num_users: int) -> dict[str, torch.Tensor]:
    """Per-user gradients [users, ...] of `shared.scorer.channel_user_gradient`'s loss (mean softmax loss over the
    user's examples, its history masked) from one forward over every example of the chunk. The scores are linear
    in the 9 weights: content: G . cos(profile, item); scales: (G . popularity, G . channel c)."""
    grads = {k: torch.zeros(num_users, *p.shape) for k, p in model.named_parameters() if p.requires_grad}
    if len(nexts) == 0:
        return grads
    with torch.no_grad():
        cosine = profile @ catalogue.text.T
        scores = model(catalogue.text, profile, channels) + mask
    scores.requires_grad_(True)
    per_user = torch.bincount(owner, minlength=num_users).clamp(min=1).to(scores.dtype)
    losses = torch.nn.functional.cross_entropy(scores[:, 1:], nexts - 1, reduction="none")
    (losses / per_user[owner]).sum().backward()
    g = scores.grad
    with torch.no_grad():
        grads["content"].index_add_(0, owner, (g * cosine).sum(1, keepdim=True))
        scales = torch.cat([(g @ model.popularity).unsqueeze(1), torch.einsum("bi,bci->bc", g, channels)], dim=1)
        grads["scales"].index_add_(0, owner, scales)
    return grads


def with_sasrec_channel(model, channels: torch.Tensor, histories, width: int) -> torch.Tensor:
    """`channels` with the `sasrec` channel of `shared.scorer.channel_features` appended when `model` carries a
    consenting cohort's SASRec (else `channels` itself)."""
    from shared.scorer import sasrec_channel

    if getattr(model, "sasrec", None) is None:
        return channels
    return torch.cat([channels, torch.from_numpy(sasrec_channel(model.sasrec, histories, width))[:, None]], 1)


def with_transition_channel(model, channels: torch.Tensor, histories, width: int, train=None, members=None,
                            owner: torch.Tensor | None = None) -> torch.Tensor:
    """`channels` with the `transition` channel of `shared.scorer.channel_features` appended when `model` carries
    a transition release (else `channels` itself). With `train`, `members` and `owner` (training features) each
    history's user removes its own counts (`shared.analytics.own_transition_matrix`), as
    `shared.scorer.channel_user_gradient` does; without them, the evaluation's features."""
    from shared.analytics import own_transition_matrix
    from shared.scorer import transition_channel, transition_release

    release = transition_release(model)
    if release is None:
        return channels
    owns = None
    if train is not None:
        own = [own_transition_matrix(train[u], release[0]) for u in members]
        owns = [own[o] for o in owner.numpy()]
    extra = transition_channel(histories, release, width, owns)
    return torch.cat([channels, torch.from_numpy(extra.astype(np.float32))[:, None]], 1)


def channel_ranks(models: dict, pop: Population, c: dict, tables: dict | None = None,
                  batch: int = 256, split: str = "test") -> dict[str, np.ndarray]:
    """Test-item (or, with split = "valid", validation-item) ranks of the `pop.eval_index` users under each model,
    scored as `shared.scorer.channel_score_histories` scores (released co-occurrence, no own removal, no mask;
    own history excluded)."""
    from shared.metrics import eval_inputs, target_ranks
    from shared.scorer import cooc_matrix

    users, idx, width = pop.users, pop.eval_index, pop.catalogue.num_items + 1
    inputs, targets, exclude = eval_inputs([users.train[i] for i in idx], users.valid[idx], users.test[idx], split)
    ranks = {label: np.zeros(len(targets), dtype=np.int64) for label in models}
    for start in range(0, len(targets), batch):
        stop = min(start + batch, len(targets))
        profile, channels, _ = base_channels(pop.catalogue, inputs[start:stop], c, tables)
        for label, model in models.items():
            items, cooc = cooc_matrix(model)
            channels[:, 0] = cooc_channel(inputs[start:stop], items, cooc, width)
            features = with_sasrec_channel(model, with_transition_channel(model, channels, inputs[start:stop], width),
                                           inputs[start:stop], width)
            with torch.no_grad():
                scores = model(pop.catalogue.text, profile, features)
            ranks[label][start:stop] = target_ranks(scores, torch.from_numpy(np.asarray(targets[start:stop])),
                                                    exclude[start:stop])
    return ranks


def scorer_releases(histogram: np.ndarray, items: np.ndarray, cooc: np.ndarray, multipliers: tuple, c: dict):
    """(histogram, (items, matrix)) as the scorer uses them: `simulations.release_denoise.denoise_release` under
    the research rules `popularity-denoise` / `cooc-denoise` of `c` (default none: the releases as they are, as
    the product uses them; no rule is in the product, README "Robust to noise")."""
    from simulations.release_denoise import denoise_release

    z_pop, z_cooc, _, _ = _arm(multipliers)
    k = len(items)
    return (denoise_release(histogram, z_pop, len(histogram) - 1, c.get("popularity-denoise", "none")),
            (items, denoise_release(cooc, z_cooc, k * (k - 1) // 2, c.get("cooc-denoise", "none"))))


def server_tau(rule: str, z: float, clip: float, expected_cohort: float) -> float:
    """FedAdam's tau: Flower's 1e-3 (`flower`, the product's) or, a research rule not in the product, the std of
    the noise on the mean update, z clip / expected cohort, never below 1e-3 (`noise-std`)."""
    if rule == "flower":
        return 1e-3
    return max(1e-3, z * clip / expected_cohort)


def running_average(average: dict | None, model: torch.nn.Module, r: int) -> dict:
    """The mean of the models after rounds 1 .. r (buffers are the same in every round; a research rule,
    `iterate-average = rounds`, not in the product)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if average is None:
        return state
    return {k: average[k] + (state[k] - average[k]) / r for k in state}


def run_channel_arms(pop: Population, arms: dict[str, tuple[float, float, float]], c: dict, seed: int, chunk: int,
                     simulated_cohort: int = 0, models_out: dict | None = None, sasrec: dict | None = None,
                     not_training: dict | None = None) -> dict[str, dict]:
    """Every arm (label -> (popularity z, co-occurrence z, round z)) of the channel pipeline on `pop`, sharing
    cohorts and noise draws: the two releases, `server.scorer.initial_scorer`, then `c['rounds']` rounds of
    `shared.privacy.user_level` sampling, per-user clipping and noise, Flower's FedAdam step. With q N >
    `simulated_cohort` > 0 an ESTIMATE (noise-cohort-size), as `run_scorer_arms`. `models_out`, when given,
    receives label -> the final (released) model, e.g. to score it on another split. `sasrec` (label -> a
    pretrained SASRec): that arm's scorer has the SASRec channel, as the product builds it with a consenting
    cohort. `not_training` (label -> user indices): sampled users of that arm who send no update (a device that
    declines: the noise and its denominator, the expected cohort, are unchanged)."""
    from server.scorer import initial_scorer
    from shared.analytics import COOC_GAP_DECAY, own_cooc_matrix
    from shared.privacy.user_level import clip_update, noisy_mean_update, poisson_cohort
    from shared.scorer import cooc_matrix
    from simulations.scorer_schedule import fedadam_state, fedadam_step

    started = time.perf_counter()
    cat, train, n, width = pop.catalogue, pop.users.train, pop.n, pop.catalogue.num_items + 1
    releases = channel_releases(pop, arms, c, seed)
    transitions = transition_releases(pop, arms, c, seed, {label: r[0] for label, r in releases.items()})
    used = {label: scorer_releases(hist, items, cooc, arms[label], c)
            for label, (hist, items, cooc) in releases.items()}
    models = {label: initial_scorer(cat, hist, seed, cooc, transitions.get(label), (sasrec or {}).get(label))
              for label, (hist, cooc) in used.items()}
    averages = {label: None for label in models}  # `iterate-average = rounds`: running mean of the rounds' models
    adam = {label: fedadam_state(m) for label, m in models.items()}
    first = next(iter(models.values()))
    keys = [k for k, p in first.named_parameters() if p.requires_grad]  # never a frozen SASRec channel's
    shapes = {label: {k: tuple(p.shape) for k, p in m.named_parameters() if p.requires_grad}
              for label, m in models.items()}
    silent = {label: frozenset(int(u) for u in (not_training or {}).get(label, ())) for label in models}
    sampler = random.Random(seed)
    q_sim = simulated_rate(c, n, simulated_cohort)
    tables = channel_tables(cat)
    out = {label: {"round-0": figures(r)} for label, r in channel_ranks(models, pop, c, tables).items()}
    log_progress(f"N = {n:,} seed {seed}: channel releases and round 0 in {time.perf_counter() - started:.0f} s")
    cohorts, norms = [], {label: [] for label in arms}
    for r in range(1, c["rounds"] + 1):
        cohort = poisson_cohort(range(n), q_sim, sampler)
        cohorts.append(len(cohort))
        totals = {label: {k: np.zeros(shapes[label][k]) for k in keys} for label in arms}
        for start in range(0, len(cohort), chunk):
            members = cohort[start:start + chunk]
            histories, nexts, owner = chunk_examples(train, members, c["targets"])
            profile, channels, mask = base_channels(cat, histories, c, tables)
            for label, model in models.items():
                items, cooc = cooc_matrix(model)
                owns = [own_cooc_matrix(train[u], items, c["cooc-window"], COOC_GAP_DECAY) for u in members]
                channels[:, 0] = cooc_channel(histories, items, cooc, width, owns, owner.numpy())
                features = with_transition_channel(model, channels, histories, width, train, members, owner)
                features = with_sasrec_channel(model, features, histories, width)
                grads = channel_cohort_gradients(model, cat, profile, features, mask, nexts, owner, len(members))
                minus = {k: -grads[k].double().numpy() for k in keys}  # a device's update is minus its gradient
                for i in range(len(members)):
                    if members[i] in silent[label]:
                        continue
                    clipped, norm = clip_update({k: minus[k][i] for k in keys}, c["clip"])
                    norms[label].append(norm)
                    for k in keys:
                        totals[label][k] += clipped[k]
        for label, multipliers in arms.items():
            z = _arm(multipliers)[2]
            mean = noisy_mean_update([totals[label]], keys, shapes[label], z * c["clip"] * q_sim / c["q"], q_sim * n,
                                     np.random.default_rng([seed, 6, r]))
            fedadam_step(models[label], adam[label], {k: torch.from_numpy(mean[k]).float() for k in keys}, r,
                         c["server-lr"], server_tau(c.get("server-tau", "flower"), z, c["clip"], q_sim * n))
            if c.get("iterate-average", "none") == "rounds":
                averages[label] = running_average(averages[label], models[label], r)
        log_progress(f"N = {n:,} seed {seed}: channel round {r} ({len(cohort):,} users), "
                     f"{time.perf_counter() - started:.0f} s")
    for label, average in averages.items():
        if average is not None:
            models[label].load_state_dict(average)
    if models_out is not None:
        models_out.update(models)
    valid = channel_ranks(models, pop, c, tables, split="valid")
    for label, ranks in channel_ranks(models, pop, c, tables).items():
        out[label].update(figures(ranks))
        out[label].update({f"valid-{k}": v for k, v in figures(valid[label]).items()})
        out[label].update({"cohorts": cohorts, "simulated-q": q_sim, "estimate": q_sim < c["q"],
                           "cooc-items-released": len(releases[label][1]),
                           **({"transition-items-released": len(transitions[label][0])}
                              if label in transitions else {}),
                           "update-norm-quantiles": [float(x) for x in np.quantile(norms[label], [0.1, 0.5, 0.9])]
                           if norms[label] else [],
                           "weights": {k: [round(float(x), 4) for x in p.detach().reshape(-1)]
                                       for k, p in models[label].named_parameters() if p.requires_grad},
                           "seconds-all-arms": round(time.perf_counter() - started, 1)})
    return out


# ------------------------------------------------------------------------------------ transition scorer
def transition_sum(train, num_items: int) -> np.ndarray:
    """sum_u t_u, [items + 1, items + 1]: t_u = user u's counts of ordered consecutive pairs (previous item, next
    item) in its training sequence, L2-normalised (norm exactly 1; 0 for a user with fewer than two items), so
    the sum has L2 sensitivity 1 under adding or removing one user. Row = previous item, column = next item."""
    width = num_items + 1
    seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in train]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    total = np.zeros(width * width)
    if not len(seqs) or lengths.max(initial=0) < 2:
        return total.reshape(width, width)
    flat = np.concatenate(seqs)
    owner = np.repeat(np.arange(len(seqs)), lengths)
    inside = owner[:-1] == owner[1:]  # pairs that do not straddle two users
    users, cells = owner[:-1][inside], flat[:-1][inside] * width + flat[1:][inside]
    keys, counts = np.unique(users * width * width + cells, return_counts=True)  # a user's repeated pairs counted
    key_users = keys // (width * width)
    norms = np.sqrt(np.bincount(key_users, weights=counts.astype(np.float64) ** 2, minlength=len(seqs)))
    total = np.bincount(keys % (width * width), weights=counts / norms[key_users], minlength=width * width)
    return total.reshape(width, width)


def transition_epsilon(z_pop: float, z_transitions: float, delta: float, accountant: str) -> float:
    """User-level epsilon of the two releases (each a Gaussian mechanism of sensitivity 1, no sampling), one
    Opacus accountant over the history [[z_pop, 1, 1], [z_transitions, 1, 1]]."""
    from shared.privacy.accounting import epsilon_from_state

    state = {"history": [[z_pop, 1.0, 1], [z_transitions, 1.0, 1]], "mechanism": accountant}
    return float(epsilon_from_state(state, delta, accountant))


def calibrate_transitions(target: float, s: dict) -> dict:
    """Noise multipliers (popularity, transitions) = TRANSITION_REFERENCE x the smallest common factor reaching
    <= target (the content-scorer's calibration rule)."""
    from simulations.privacy_utility import calibrate_factor

    z_pop, z_t = TRANSITION_REFERENCE

    def epsilon_of(c: float) -> float:
        return transition_epsilon(c * z_pop, c * z_t, s["delta"], s["accountant"])

    factor = calibrate_factor(epsilon_of, target)
    return {"target": target, "factor": factor, "popularity-z": factor * z_pop, "transitions-z": factor * z_t,
            "epsilon": epsilon_of(factor)}


def transition_privacy(z_pop: float, z_t: float, s: dict, n: int) -> dict:
    return {"epsilon": transition_epsilon(z_pop, z_t, s["delta"], s["accountant"]), "delta": s["delta"],
            "accountant": f"Opacus {s['accountant']} over [[z_pop, 1, 1], [z_transitions, 1, 1]]; "
                          "dp-accounting RDP agrees (tests/test_population_utility.py)",
            "unit": "one user's whole history", "relation": "add/remove one user",
            "mechanism": f"two Gaussian releases of sensitivity 1: the popularity histogram (z_pop {z_pop:.3f}) and "
                         f"the (previous, next) item transition counts, each user's L2-normalised "
                         f"(z_transitions {z_t:.3f}); scoring is post-processing on the device",
            "sampling": f"none (every one of the {n} users, once)",
            "adversary": "whoever sees the two released sums; not the server (no secure aggregation)"}


def transition_scores(popularity: np.ndarray, transitions: np.ndarray, z_t: float, histories) -> np.ndarray:
    """What a device scores from the two releases and its own history: log1p(DP popularity) + log1p(the released
    transition row of its last item, less TRANSITION_THRESHOLD x its noise std, positive part). Weights 1 : 1
    and the threshold were fixed before any run (a priori, not tuned)."""
    from shared.analytics import popularity_bias

    bias = popularity_bias(popularity)
    bias[0] = 0.0
    last = np.array([h[-1] if len(h) else 0 for h in histories], dtype=np.int64)
    rows = np.log1p(np.maximum(transitions[last] - TRANSITION_THRESHOLD * z_t, 0.0))
    rows[last == 0] = 0.0
    return bias[None, :] + rows


def run_transition_arms(pop: Population, arms: dict[str, tuple[float, float]], seed: int) -> dict[str, dict]:
    """Every arm (label -> (popularity z, transitions z)): the two releases (the same standard normal draws scaled
    by each arm's multipliers), then every scored user's device ranks with `transition_scores`."""
    from shared.analytics import noisy_sum
    from shared.metrics import eval_inputs, target_ranks

    started = time.perf_counter()
    width = len(pop.item_sum)
    total = transition_sum(pop.users.train, width - 1)
    users, idx = pop.users, pop.eval_index
    inputs, targets, exclude = eval_inputs([users.train[i] for i in idx], users.valid[idx], users.test[idx], "test")
    draws = np.random.default_rng([seed, 3]).standard_normal(total.shape)
    out = {}
    for label, (z_pop, z_t) in arms.items():
        popularity = noisy_sum(pop.item_sum, z_pop, np.random.default_rng([seed, 0]))
        released = total + z_t * draws
        ranks = np.zeros(len(targets), dtype=np.int64)
        for start in range(0, len(targets), 2048):
            stop = min(start + 2048, len(targets))
            scores = transition_scores(popularity, released, z_t, inputs[start:stop])
            ranks[start:stop] = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets[start:stop]),
                                             exclude[start:stop])
        out[label] = {**figures(ranks), "noise-multipliers": {"popularity": z_pop, "transitions": z_t},
                      "seconds-all-arms": round(time.perf_counter() - started, 1)}
    return out


# ------------------------------------------------------------------------------------ references
def popularity_arms(pop: Population, seed: int, s: dict) -> dict[str, dict]:
    from shared.analytics import noise_for_epsilon, noisy_sum, release_epsilon
    from shared.baselines import popularity_scores
    from shared.metrics import eval_inputs, target_ranks

    users, idx = pop.users, pop.eval_index
    _, targets, exclude = eval_inputs([users.train[i] for i in idx], users.valid[idx], users.test[idx], "test")

    def ranks_of(score: np.ndarray) -> np.ndarray:
        out = np.zeros(len(targets), dtype=np.int64)
        row = torch.from_numpy(np.asarray(score, dtype=np.float64))
        for start in range(0, len(targets), 2048):
            stop = min(start + 2048, len(targets))
            out[start:stop] = target_ranks(row.unsqueeze(0).expand(stop - start, -1),
                                           torch.from_numpy(targets[start:stop]), exclude[start:stop])
        return out

    result = {"popularity (no DP)": figures(ranks_of(popularity_scores(users.train, len(pop.item_sum) - 1)))}
    for target in TARGETS:
        z = noise_for_epsilon(target, s["delta"])
        hist = noisy_sum(pop.item_sum, z, np.random.default_rng([seed, 2]))
        eps = release_epsilon(z, s["delta"])
        result[f"DP popularity, epsilon {target:g}"] = {
            **figures(ranks_of(hist)), "privacy": {
                "epsilon": eps["rdp"], "epsilon-pld": eps["pld"], "delta": s["delta"], "noise-multiplier": z,
                "accountant": "Opacus rdp (dp-accounting PLD beside it)", "unit": "one user's whole history",
                "relation": "add/remove one user", "sampling": "none (every user, one release)",
                "mechanism": "Gaussian on the sum of item-set vectors of L2 norm 1 (sensitivity 1)"}}
    return result


def sasrec_ranks(model, pop: Population) -> np.ndarray:
    from shared.metrics import eval_inputs, evaluate_histories

    users, idx = pop.users, pop.eval_index
    inputs, targets, exclude = eval_inputs([users.train[i] for i in idx], users.valid[idx], users.test[idx], "test")
    return evaluate_histories(model, inputs, targets, exclude)["rank"]


def centralized_sasrec(pop: Population, seed: int, steps: int) -> dict:
    """`train_centralized` with a budget of about `steps` Adam steps of batch 64: several epochs over every user
    when they hold fewer windows, else one epoch over a random subset of users holding enough windows."""
    from shared import config
    from shared.baselines import train_centralized
    from shared.data.windows import history_windows
    from shared.model import architecture_for

    started = time.perf_counter()
    cfg = config.validate({**config.defaults(), "model": "sasrec"})
    batch, window = 64, cfg["window"]
    wanted = steps * batch
    order = np.random.default_rng(seed).permutation(pop.n)
    chosen, held = [], 0
    for u in order:
        chosen.append(pop.users.train[u])
        held += history_windows([pop.users.train[u]], window).shape[0]
        if held >= wanted:
            break
    epochs = max(1, math.ceil(wanted / max(held, 1)))
    model_cfg, _ = architecture_for(cfg, len(pop.item_sum) - 1, None)
    model = train_centralized(chosen, len(pop.item_sum) - 1, model_cfg, window=window, epochs=epochs, lr=0.001,
                              batch_size=batch, seed=seed)
    return {**figures(sasrec_ranks(model, pop)), "budget": {"users-trained-on": len(chosen), "windows": held,
                                                            "epochs": epochs,
                                                            "steps": epochs * math.ceil(held / batch)},
            "seconds": round(time.perf_counter() - started, 1)}


def federated_sasrec(pop: Population, seed: int, budget: Budget) -> dict:
    """Non-private per-row SASRec federation (`simulations.fedopt`'s `rows` arm) with the fixed budget."""
    from shared import config
    from shared.data.store import open_store
    from shared.model import ModelConfig, SASRec
    from simulations.fedopt import ARMS, federated_rounds

    started = time.perf_counter()
    arm = replace(ARMS["rows"], cohort=min(budget.fed_cohort, pop.n), local_epochs=budget.fed_epochs)
    store = open_store(pop.store_dir)
    *_, (_, weights) = federated_rounds(store, arm, seed, budget.fed_rounds, config.defaults()["window"])
    model = SASRec(ModelConfig(num_items=len(pop.item_sum) - 1))  # the run-config defaults, as fedopt builds it
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return {**figures(sasrec_ranks(model, pop)), "budget": {"rounds": budget.fed_rounds, "cohort": arm.cohort,
                                                            "local-epochs": arm.local_epochs,
                                                            "aggregation": "per-row (fedopt `rows`)"},
            "seconds": round(time.perf_counter() - started, 1)}


# ------------------------------------------------------------------------------------ DP-FedAvg of SASRec
def dp_sasrec_epsilon(z: float, q: float, rounds: int, s: dict) -> float:
    from shared.privacy.user_level import user_level_epsilon

    return user_level_epsilon(z, q, rounds, s["delta"], s["accountant"])


def calibrate_dp_sasrec(target: float, q: float, rounds: int, s: dict) -> float:
    """The smallest noise multiplier z (relative width 1e-3) whose `rounds` rounds at rate q reach <= target."""
    from simulations.privacy_utility import calibrate_factor

    return calibrate_factor(lambda z: dp_sasrec_epsilon(z, q, rounds, s), target)


def dp_sasrec_privacy(z: float, q: float, rounds: int, clip: float, n: int, s: dict) -> dict:
    return {"epsilon": dp_sasrec_epsilon(z, q, rounds, s), "delta": s["delta"],
            "accountant": f"Opacus {s['accountant']} over [[z, q, rounds]] (shared.privacy.user_level)",
            "unit": "one user's whole history", "relation": "add/remove one user",
            "mechanism": f"{rounds} DP-FedAvg rounds: each device's SASRec update (local weights minus global) "
                         f"clipped to L2 {clip:g}, N(0, (z C)^2) on the sum, z {z:.3f}, divided by q N",
            "sampling": f"Poisson, q = {q:g} per round over {n} users (expected cohort {q * n:,.0f})",
            "noise-std-on-mean-update": z * clip / (q * n),
            "adversary": "whoever sees the released models; not the server (no secure aggregation)"}


def dp_federated_sasrec(pop: Population, seed: int, budget: Budget, z: float, clip: float | None, q: float,
                        arm_name: str = "fedavg") -> dict:
    """SASRec DP-FedAvg (or, with z = 0, its non-private twin) with the reduced budget's rounds, local epochs and
    expected cohort `budget.fed_cohort` (Poisson rate q' = cohort / N).

    Each sampled device trains from the global weights with `shared.training.train_local` (non-private local
    training: the guarantee is user-level, on the aggregate); its update is clipped to `clip` (None: not
    clipped); the server adds N(0, (z C q' / q)^2) to the sum and divides by q' N, i.e. the noise on the mean is
    z C / (q N): the noise of the real rate q's cohort. With q' < q this is an ESTIMATE (pfl-research's
    noise-cohort-size) of a run at rate q; the epsilon is that run's (q, z, rounds). Unweighted mean (DP-FedAvg's
    sensitivity needs equal weights), then `simulations.fedopt`'s `arm_name` server step (FedAvg, FedAvgM or
    FedAdam, with that arm's local training) after the noisy mean: post-processing."""
    from shared import config
    from shared.aggregation import ServerOptimizer
    from shared.data.store import open_store
    from shared.data.windows import make_windows
    from shared.model import ModelConfig, SASRec
    from shared.privacy.user_level import clip_update, noisy_mean_update, poisson_cohort
    from shared.training import LocalTrainConfig, train_local
    from simulations.fedopt import ARMS

    started = time.perf_counter()
    arm, window = ARMS[arm_name], config.defaults()["window"]
    store = open_store(pop.store_dir)
    q_sim = min(budget.fed_cohort / store.num_devices, q)  # q itself (an exact run) where the cohort is that large
    model_cfg = ModelConfig(num_items=store.num_items)
    torch.manual_seed(seed)
    local = SASRec(model_cfg)
    weights = {k: v.detach().numpy().copy() for k, v in local.state_dict().items()}
    keys, shapes = list(weights), {k: v.shape for k, v in weights.items()}
    server = ServerOptimizer(kind=arm.server, lr=arm.server_lr, momentum=arm.server_momentum, tau=arm.tau)
    sampler, norms, cohorts = random.Random(seed), [], []
    for rnd in range(1, budget.fed_rounds + 1):
        cohort = poisson_cohort(range(store.num_devices), q_sim, sampler)
        cohorts.append(len(cohort))
        clipped = []
        for device in cohort:
            windows = np.concatenate([make_windows(s, window) for s in store.device(device).train] or
                                     [np.zeros((0, window), np.int64)])
            if windows.shape[0] == 0:
                continue  # no training pair: a zero update (it still counts in q N)
            local.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
            cfg = LocalTrainConfig(epochs=budget.fed_epochs, lr=arm.local_lr, batch_size=arm.batch_size, dp=False,
                                   optimizer=arm.local_optimizer, seed=seed * 1_000_003 + rnd * 1009 + device)
            train_local(local, windows, cfg)
            update = {k: v.detach().numpy().astype(np.float64) - weights[k] for k, v in local.state_dict().items()}
            bounded, norm = clip_update(update, clip) if clip else (update, float(
                np.sqrt(sum(np.sum(a * a) for a in update.values()))))
            norms.append(norm)
            clipped.append(bounded)
        noise = z * (clip or 0.0) * q_sim / q
        mean = noisy_mean_update(clipped, keys, shapes, noise, q_sim * store.num_devices,
                                 np.random.default_rng([seed, 4, rnd]))
        weights = {k: v.astype(np.float32) for k, v in server.step(weights, mean).items()}
    local.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return {**figures(sasrec_ranks(local, pop)), "noise-multiplier": z, "clip": clip, "real-q": q,
            "simulated-q": q_sim, "estimate": q_sim < q, "cohorts": cohorts,
            "update-norm-quantiles": [float(x) for x in np.quantile(norms, [0.1, 0.5, 0.9])] if norms else [],
            "budget": {"rounds": budget.fed_rounds, "expected-cohort": budget.fed_cohort,
                       "local-epochs": budget.fed_epochs, "aggregation": f"unweighted mean, then fedopt's {arm_name}"},
            "seconds": round(time.perf_counter() - started, 1)}


# ------------------------------------------------------------------------------------ the whole sweep
def run(populations, seeds, like: str, work: Path, budget: Budget, sasrec_seeds, rounds: int | None,
        skip: set[str], simulated_cohort: int, also_synthetic=(), dp_sasrec_q: float | None = None,
        dp_sasrec_epsilons=(), dp_sasrec_arm: str = "fedavg", product_transitions: bool = False) -> dict:
    torch.set_num_threads(1)
    s = pipeline_settings(rounds)
    c = channel_settings(rounds)
    channel_calibration = {f"{t:g}": calibrate_channel(t, c) for t in TARGETS}
    transition_product_calibration = {f"{t:g}": calibrate_channel(t, c, transitions=True) for t in TARGETS} \
        if product_transitions else {}
    calibration = {f"{t:g}": calibrate_pipeline(t, s) for t in TARGETS}
    transition_calibration = {f"{t:g}": calibrate_transitions(t, s) for t in TARGETS}
    sasrec_q = dp_sasrec_q or s["q"]  # the product's rate unless told
    sasrec_z = {f"{t:g}": calibrate_dp_sasrec(t, sasrec_q, budget.fed_rounds, s) for t in TARGETS}
    log_progress("calibrated: " + ", ".join(f"eps {k}: z_pop {c['popularity-z']:.3f}, z {c['z']:.3f} "
                                            f"({c['epsilon']:.3f})" for k, c in calibration.items()))
    results = {"made": time.strftime("%Y-%m-%d %H:%M:%S"), "like": like, "seeds": seeds, "settings": s,
               "budget": asdict(budget), "simulated-cohort": simulated_cohort, "calibration": calibration,
               "transition-calibration": transition_calibration, "channel-settings": c,
               "channel-calibration": channel_calibration,
               **({"transition-product-calibration": transition_product_calibration}
                  if product_transitions else {}),
               "dp-sasrec": {"q": sasrec_q, "clip": DP_SASREC_CLIP, "z": sasrec_z, "arm": dp_sasrec_arm},
               "populations": []}
    plan = sorted([(n, False) for n in populations] + [(n, True) for n in also_synthetic])
    for n, synthetic in plan:
        pop = load_population(n, like, work, budget.eval_users, synthetic)
        log_progress(f"N = {pop.n:,} ({pop.label}): {pop.interactions:,} interactions, scored on "
                     f"{len(pop.eval_index):,} users")
        arms = {f"content-scorer, epsilon {k}": (c["popularity-z"], c["z"]) for k, c in calibration.items()}
        arms["content-scorer, no noise"] = (0.0, 0.0)
        transition_arms = {f"transition scorer, epsilon {k}": (c["popularity-z"], c["transitions-z"])
                           for k, c in transition_calibration.items()}
        transition_arms["transition scorer, no noise"] = (0.0, 0.0)
        channel_arms = {f"{CHANNEL_ARM}, epsilon {k}": (x["popularity-z"], x["cooc-z"], x["z"])
                        for k, x in channel_calibration.items()}
        channel_arms[f"{CHANNEL_ARM}, no noise"] = (0.0, 0.0, 0.0)
        if product_transitions:
            channel_arms.update({f"{TRANSITION_ARM}, epsilon {k}": (x["popularity-z"], x["cooc-z"], x["z"],
                                                                     x["transition-z"])
                                 for k, x in transition_product_calibration.items()})
            channel_arms[f"{TRANSITION_ARM}, no noise"] = (0.0, 0.0, 0.0, 0.0)
        entry = {"n": pop.n, "label": pop.label, "real": pop.real, "interactions": pop.interactions,
                 "eval-users": int(len(pop.eval_index)), "expected-cohort": s["q"] * pop.n,
                 "simulated-q": simulated_rate(s, pop.n, simulated_cohort),
                 "estimate": simulated_rate(s, pop.n, simulated_cohort) < s["q"],
                 "privacy": {label: arm_privacy(zp, z, s, pop.n) for label, (zp, z) in arms.items()
                             if z > 0},
                 "channel-simulated-q": simulated_rate(c, pop.n, simulated_cohort),
                 "channel-privacy": {label: channel_privacy(*_arm(m)[:3], c, pop.n, _arm(m)[3])
                                     for label, m in channel_arms.items() if _arm(m)[2] > 0},
                 "transition-privacy": {label: transition_privacy(zp, zt, s, pop.n)
                                        for label, (zp, zt) in transition_arms.items() if zt > 0},
                 "dp-sasrec-privacy": {f"SASRec DP-FedAvg, epsilon {k}": dp_sasrec_privacy(
                     z, sasrec_q, budget.fed_rounds, DP_SASREC_CLIP, pop.n, s) for k, z in sasrec_z.items()},
                 "runs": {}}
        for seed in seeds:
            row = {} if "content" in skip else run_scorer_arms(pop, arms, s, seed, budget.chunk_users,
                                                               simulated_cohort)
            if "channel" not in skip:
                row.update(run_channel_arms(pop, channel_arms, c, seed, budget.chunk_users, simulated_cohort))
            if "transitions" not in skip:
                row.update(run_transition_arms(pop, transition_arms, seed))
            row.update(popularity_arms(pop, seed, s))
            if seed in sasrec_seeds and "central" not in skip:
                row["centralized SASRec (reduced budget)"] = centralized_sasrec(pop, seed, budget.central_steps)
            if seed in sasrec_seeds and "federated" not in skip:
                row["SASRec federation, no DP (reduced budget)"] = federated_sasrec(pop, seed, budget)
            if seed in sasrec_seeds and "dp-sasrec" not in skip and "sasrec-twins" not in skip:
                row["SASRec FedAvg, no DP (unweighted, not clipped)"] = dp_federated_sasrec(
                    pop, seed, budget, 0.0, None, sasrec_q, dp_sasrec_arm)
                row["SASRec FedAvg, clipped, no noise"] = dp_federated_sasrec(pop, seed, budget, 0.0,
                                                                              DP_SASREC_CLIP, sasrec_q, dp_sasrec_arm)
            if seed in sasrec_seeds and "dp-sasrec" not in skip:
                for k, z in sasrec_z.items():
                    if dp_sasrec_epsilons and float(k) not in dp_sasrec_epsilons:
                        continue
                    row[f"SASRec DP-FedAvg, epsilon {k}"] = dp_federated_sasrec(pop, seed, budget, z,
                                                                              DP_SASREC_CLIP, sasrec_q, dp_sasrec_arm)
            entry["runs"][str(seed)] = row
            log_progress(f"N = {pop.n:,} seed {seed}: " + ", ".join(f"{k} {v['ndcg@10']:.4f}" for k, v in row.items()))
        entry["summary"] = summarize_runs(entry["runs"])
        results["populations"].append(entry)
        del pop
    return results


def summarize_runs(runs: dict) -> dict:
    out = {}
    labels = dict.fromkeys(k for r in runs.values() for k in r)
    for label in labels:
        rows = [r[label] for r in runs.values() if label in r]
        for key in ("ndcg@10", "hr@10", "valid-ndcg@10"):
            if key.startswith("valid-") and not all(key in x for x in rows):
                continue  # validation figures: the channel arms only
            a = np.array([x[key] for x in rows])
            out.setdefault(label, {})[key] = [float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0]
        out[label]["seeds"] = len(rows)
    return out


# ------------------------------------------------------------------------------------ report
def markdown(results: dict, plot_name: str) -> str:
    pops = results["populations"]
    s = results["settings"]
    b = results["budget"]
    labels = list(dict.fromkeys(k for p in pops for k in p["summary"]))
    head = "| arm | " + " | ".join(f"N = {p['n']:,} ({'real' if p['real'] else 'synthetic'})" for p in pops) + " |"
    lines = [f"# Utility against population size ({results['made']})", "",
             f"Test NDCG@10 (full ranking, own history excluded), mean +- std over seeds {results['seeds']} "
             f"(SASRec arms: the seeds given in brackets). Source: {results['like']}; synthetic populations: "
             "`privrec data synth --like ml-100k --users N --seed 0` (docs/synthetic-data.md: what synthetic "
             "users can and cannot stand for). **The scorer arms ran in-process, not through Flower**: "
             "the same shared code (`shared.scorer`, `shared.privacy.user_level` sampling, clipping and noise, "
             "`server.scorer.initial_scorer`, Flower's FedAdam arithmetic), one process, one thread.", "",
             f"Content-scorer pipeline (when run) at every N: `CONTENT_SCORER_PIPELINE`, Poisson q = {s['q']:g}, "
             f"{s['rounds']} rounds, clip "
             f"{s['clip']:g}, FedAdam server-lr {s['server-lr']:g}; noise multipliers calibrated to each epsilon "
             "(below) are therefore the same at every N, and the noise on the averaged update z C / (q N) falls "
             "as 1 / N. SASRec references have a reduced budget that is the same at every N: federation "
             f"{b['fed_rounds']} rounds x {b['fed_cohort']} devices x {b['fed_epochs']} local epochs (per-row "
             f"averaging, no DP); centralized about {b['central_steps']} Adam steps of batch 64.", "",
             head, "|---|" + "---|" * len(pops)]
    for label in labels:
        cells = []
        for p in pops:
            v = p["summary"].get(label)
            estimate = any(r[label].get("estimate") for r in p["runs"].values() if label in r)
            mark = " (estimate\\*)" if estimate and label.startswith(("content-scorer", CHANNEL_ARM,
                                                                         "SASRec DP-FedAvg")) else ""
            cells.append("-" if v is None else f"{v['ndcg@10'][0]:.4f} +- {v['ndcg@10'][1]:.4f}{mark}"
                         + (f" [{v['seeds']}]" if "SASRec" in label else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    validated = [label for label in labels if any("valid-ndcg@10" in p["summary"].get(label, {}) for p in pops)]
    if validated:
        lines += ["", "Validation NDCG@10 (each user's second-to-last item; the same users), mean +- std over the "
                  "same seeds:", "", head, "|---|" + "---|" * len(pops)]
        for label in validated:
            cells = [f"{v['valid-ndcg@10'][0]:.4f} +- {v['valid-ndcg@10'][1]:.4f}"
                     if (v := p["summary"].get(label)) and "valid-ndcg@10" in v else "-" for p in pops]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if any(label.startswith("content-scorer") for label in labels):
        lines += ["", "| N | expected cohort q N | arm | epsilon (Opacus RDP, delta "
                  f"{s['delta']:g}) | z_pop | z | noise std on the mean update |", "|---|---|---|---|---|---|---|"]
    cal = results["calibration"]
    for p in pops:
        for label, priv in p["privacy"].items():
            if label not in p["summary"]:
                continue
            c = cal[label.rsplit(" ", 1)[-1]]
            kind = "real" if p["real"] else "synthetic"
            lines.append(f"| {p['n']:,} ({kind}) | {p['expected-cohort']:,.0f} | {label} | {priv['epsilon']:.3f} | "
                         f"{c['popularity-z']:.3f} | {c['z']:.3f} | {priv['noise-std-on-mean-update']:.2e} |")
    lines += ["", "Every content-scorer epsilon: user-level (unit: one user's whole history; add/remove one user), "
              "the popularity "
              "release and every round composed in one Opacus RDP accountant (`shared.privacy.pipeline`), Poisson "
              "sampling of users at q per round; adversary: whoever sees the released histogram and models, not "
              "the server (no secure aggregation). DP popularity: one Gaussian release calibrated to the target "
              "with Opacus RDP (`shared.analytics.noise_for_epsilon`). The defaults the pipeline runs with were "
              "chosen by the developers on ML-100K (README); that choice is not in any epsilon."]
    channel = [(p, label, priv) for p in pops for label, priv in p.get("channel-privacy", {}).items()
               if label in p["summary"]]
    if channel:
        cs = results["channel-settings"]
        lines += ["", "Channel scorer (`model = channel-scorer`, the product's default "
                  f"`shared.config.DEFAULT_PIPELINE`): DP popularity, DP windowed co-occurrence (window "
                  f"{cs['cooc-window']}) among the top "
                  f"{cs['cooc-items']} released items, then {cs['rounds']} rounds of DP-FedSGD of the 9-weight scorer "
                  f"(Poisson q = {cs['q']:g}, clip {cs['clip']:g}, FedAdam server-lr {cs['server-lr']:g}, last "
                  f"{cs['targets']} training items per user); the product's multipliers ({cs['popularity-z']:g}, "
                  f"{cs['cooc-z']:g}, {cs['z']:g}) times one common factor per epsilon. In-process, the product's "
                  "code: `shared.analytics` releases, `server.scorer.initial_scorer`, `shared.scorer.channel_features`"
                  "' channels computed for a chunk of users at once (checked equal in tests), per-user "
                  "gradients checked against `shared.scorer.channel_user_gradient`, `shared.privacy.user_level`, "
                  "Flower's FedAdam arithmetic. The no-noise twin keeps the clipping. The co-occurrence channel "
                  "is the released matrix rescaled to a largest |entry| of `shared.scorer.COOC_PEAK` (post-"
                  "processing of the release, no privacy spend)." + (
                      f" `{TRANSITION_ARM}`: the same pipeline with `transition-release = true`, one more Gaussian "
                      f"release (each user's directed consecutive-pair counts among the top {cs['transition-items']} "
                      "released items, L2-normalised: sensitivity 1, every user, no sampling) and one more trained "
                      "channel (log1p of the released row of the user's last item above "
                      "`shared.scorer.TRANSITION_THRESHOLD` x z_transitions; the user's own counts removed from its "
                      "training features); the four multipliers (4.6, 2.76, 2.76, 3.22) -- the default's three and "
                      "the transition release at the co-occurrence's, a split fixed before any run -- times one "
                      "common factor per epsilon." if "transition-product-calibration" in results else ""), "",
                  f"| N | expected cohort q N | simulated cohort | arm | epsilon (Opacus RDP, delta {cs['delta']:g}) "
                  "| z_pop | z_cooc | z | z_transitions | noise std on the mean update |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p, label, priv in channel:
            table = "transition-product-calibration" if label.startswith(TRANSITION_ARM) else "channel-calibration"
            x = results[table][label.rsplit(" ", 1)[-1]]
            q_sim = p.get("channel-simulated-q", cs["q"])
            z_t = f"{x['transition-z']:.3f}" if "transition-z" in x else "-"
            lines.append(f"| {p['n']:,} ({'real' if p['real'] else 'synthetic'}) | {cs['q'] * p['n']:,.0f} | "
                         f"{q_sim * p['n']:,.0f}{' (estimate)' if q_sim < cs['q'] else ' (exact)'} | {label} | "
                         f"{priv['epsilon']:.3f} | {x['popularity-z']:.3f} | {x['cooc-z']:.3f} | {x['z']:.3f} | "
                         f"{z_t} | {priv['noise-std-on-mean-update']:.2e} |")
        lines += ["", "Channel scorer epsilon: user-level (unit one user's whole history, add/remove one user), the "
                  "popularity release, the co-occurrence release (both Gaussian, sensitivity 1, every user, no "
                  "sampling) and every round (sampled Gaussian, Poisson rate q) composed in one Opacus RDP "
                  "accountant (`shared.privacy.pipeline.pipeline_epsilon`); adversary: whoever sees the released "
                  "histogram, co-occurrence and models, not the server (no secure aggregation). Where the simulated "
                  "cohort is smaller than q N the figure is an ESTIMATE (noise-cohort-size, as for the content "
                  "scorer: the real cohort's noise on the mean, z C / (q N)); the epsilon is the real run's. The "
                  "defaults were chosen by the developers on ML-100K; that choice is not in any epsilon."]
    quoted = results.get("quoted-references")
    if quoted:
        lines += ["", f"Rows marked `(quoted)` were not re-run: copied from `{quoted}` (the same populations, the "
                  "same evaluation users)."]
    transitions = [(p, label, priv) for p in pops for label, priv in p.get("transition-privacy", {}).items()
                   if label in p["summary"]]
    if transitions:
        lines += ["", "Transition scorer (two releases over every user, no sampling, no training; the device scores "
                  "log1p(DP popularity) + log1p(positive part of its last item's released transition row less "
                  f"{results.get('transition-threshold', TRANSITION_THRESHOLD):g} x z_transitions)):", "",
                  f"| N | arm | epsilon (Opacus RDP, delta {s['delta']:g}) | z_pop | z_transitions |",
                  "|---|---|---|---|---|"]
        for p, label, priv in transitions:
            c = results["transition-calibration"][label.rsplit(" ", 1)[-1]]
            lines.append(f"| {p['n']:,} ({'real' if p['real'] else 'synthetic'}) | {label} | {priv['epsilon']:.3f} | "
                         f"{c['popularity-z']:.3f} | {c['transitions-z']:.3f} |")
        lines += ["", "Transition scorer epsilon: user-level (unit one user's whole history, add/remove one user), the "
                  "popularity histogram (each user's item set / sqrt(n), L2 1) and the sum of each user's "
                  "L2-normalised (previous, next) pair counts, two Gaussian mechanisms of sensitivity 1 composed in "
                  "one Opacus RDP accountant, no sampling; adversary: whoever sees the two released sums, not the "
                  "server (no secure aggregation). Its weights (1 : 1) and threshold were fixed before any run."]
    sasrec = [(p, label, priv) for p in pops for label, priv in p.get("dp-sasrec-privacy", {}).items()
              if label in p["summary"]]
    if sasrec:
        lines += ["", "SASRec DP-FedAvg (each sampled device trains SASRec non-privately from the global weights with "
                  "`shared.training.train_local`; its update is clipped; Gaussian noise on the sum; unweighted mean; "
                  "FedAvg server step). Same rounds, expected cohort and local epochs as its two non-private twins "
                  "(not clipped; clipped without noise):", "",
                  f"| N | arm | epsilon (Opacus RDP, delta {s['delta']:g}) | q (expected real cohort) | simulated "
                  "cohort | z | clip C | noise std on the mean update z C / (q N) |",
                  "|---|---|---|---|---|---|---|---|"]
        for p, label, priv in sasrec:
            run = next(r[label] for r in p["runs"].values() if label in r)
            dp = results["dp-sasrec"]
            lines.append(f"| {p['n']:,} | {label} | {priv['epsilon']:.3f} | {dp['q']:g} ({dp['q'] * p['n']:,.0f}) | "
                         f"{run['simulated-q'] * p['n']:,.0f}{' (estimate)' if run['estimate'] else ' (exact)'} | "
                         f"{run['noise-multiplier']:.3f} | {dp['clip']:g} | {priv['noise-std-on-mean-update']:.2e} |")
        lines += ["", "SASRec DP-FedAvg epsilon: user-level (unit one user's whole history, add/remove one user), one "
                  "sampled Gaussian mechanism per round (Poisson rate q), Opacus RDP over [[z, q, rounds]]; adversary: "
                  "whoever sees the released models, not the server (no secure aggregation). Where the simulated "
                  "cohort is smaller than q N the figure is an ESTIMATE (pfl-research's noise-cohort-size): the "
                  "simulated cohort's clipped updates are averaged and get the noise of the real cohort's mean, "
                  "z C / (q N); the epsilon is the real run's. The clip was chosen from the update norms of two "
                  "non-private rounds on the 100,000 synthetic users; that look is not in the epsilon."]
    dp_pop = next(iter(pops[0]["runs"].values())) if pops and pops[0]["runs"] else {}
    released = [f"epsilon {t:g}: z {dp_pop[f'DP popularity, epsilon {t:g}']['privacy']['noise-multiplier']:.3f} "
                f"(RDP {dp_pop[f'DP popularity, epsilon {t:g}']['privacy']['epsilon']:.3f}, PLD "
                f"{dp_pop[f'DP popularity, epsilon {t:g}']['privacy']['epsilon-pld']:.3f})"
                for t in TARGETS if f"DP popularity, epsilon {t:g}" in dp_pop]
    if released:
        lines.append("DP popularity noise multipliers (the same at every N): " + "; ".join(released) + ".")
    for p in pops:
        if p["estimate"] and any(k.startswith(("content-scorer", CHANNEL_ARM)) for k in p["summary"]):
            lines.append(f"\\* N = {p['n']:,}: an ESTIMATE, not a run of that population's pipeline "
                         "(pfl-research's noise-cohort-size): each round samples users at q' = "
                         f"{p['simulated-q']:.4g} (expected cohort {p['simulated-q'] * p['n']:,.0f}) instead of "
                         f"q = {s['q']:g} ({p['expected-cohort']:,.0f}), averages their clipped updates, and adds the "
                         "noise the real cohort's mean gets, N(0, (z C / (q N))^2). The epsilon shown is the real "
                         "run's; the estimate has the real run's noise and more sampling variance.")
    over = [p for p in pops if p["eval-users"] < p["n"]]
    if over:
        lines.append("Scored on a random subset of users (the same for every arm): " + ", ".join(
            f"N = {p['n']:,}: {p['eval-users']:,} users" for p in over) + ".")
    lines += ["", "Quoted at N = 943 (README, full budgets, not re-run): " + "; ".join(
        f"{k} {v:.4f}" for k, v in QUOTED_943.items()) + ".", "", f"Plot: `{plot_name}`."]
    target = target_check(results)
    if target:
        lines += ["", target]
    return "\n".join(lines)


def target_check(results: dict) -> str:
    """Issue 15's target at the largest N: epsilon-2 NDCG@10 within 10% of the non-private federation."""
    p = max(results["populations"], key=lambda p: p["n"])
    summ = p["summary"]
    lines = []
    twins = ("SASRec FedAvg, no DP (unweighted, not clipped)", "SASRec FedAvg, clipped, no noise")
    for model in ("content-scorer", CHANNEL_ARM, TRANSITION_ARM, "transition scorer", "SASRec DP-FedAvg"):
        private = summ.get(f"{model}, epsilon 2")
        if not private:
            continue
        parts = []
        own = twins if model.startswith("SASRec") else (f"{model}, no noise",)
        for ref in (*own, "SASRec federation, no DP (reduced budget)", f"{FEDERATION} (quoted)",
                    "centralized SASRec (reduced budget)"):
            if ref in summ:
                ratio = private["ndcg@10"][0] / summ[ref]["ndcg@10"][0]
                parts.append(f"{ratio:.3f} of `{ref}` ({'within' if ratio >= 0.9 else 'NOT within'} 10%)")
        if not parts:
            continue
        if "popularity (no DP)" in summ:
            parts.append(f"{private['ndcg@10'][0] / summ['popularity (no DP)']['ndcg@10'][0]:.3f} x popularity (no DP)")
        kind = " (an estimate, see above)" if p["estimate"] and model in ("content-scorer", CHANNEL_ARM,
                                                                           TRANSITION_ARM) else ""
        lines.append(f"Target at N = {p['n']:,}, user-level epsilon 2, {model}{kind}: NDCG@10 "
                     f"{private['ndcg@10'][0]:.4f} is " + "; ".join(parts) + ".")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pops = results["populations"]
    labels = list(dict.fromkeys(k for p in pops for k in p["summary"]))
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, label in enumerate(labels):
        style = "-" if ("content-scorer" in label or CHANNEL_ARM in label) else ("--" if "SASRec" in label else ":")
        color, marker = f"C{i % 10}", "os^v<>Dph"[i % 9]
        # synthetic populations as one line; the real data as unconnected open markers (another kind of data)
        for real in (False, True):
            pts = [(p["n"], p["summary"][label]) for p in pops if label in p["summary"] and p["real"] == real]
            if pts:
                ax.errorbar([x for x, _ in pts], [v["ndcg@10"][0] for _, v in pts],
                            yerr=[v["ndcg@10"][1] for _, v in pts], marker=marker, color=color, capsize=3,
                            linestyle="none" if real else style, mfc="none" if real else color,
                            markersize=9 if real else 6, label=None if real else label)
    ax.plot([], [], marker="o", mfc="none", color="k", linestyle="none", label="open markers: real ML-100K")
    ax.set_xscale("log")
    sizes = sorted({p["n"] for p in pops})
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{n:,}" for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("population N (users = devices); lines: synthetic populations like ML-100K")
    ax.set_ylabel("test NDCG@10 (full ranking)")
    ax.set_title("utility against population size (scorer arms in-process, not Flower)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--populations", type=int, nargs="+", default=list(POPULATIONS))
    parser.add_argument("--also-synthetic", type=int, nargs="*", default=[],
                        help="sizes at which a synthetic population is run besides the real one (e.g. 943)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sasrec-seeds", type=int, nargs="*", default=None,
                        help="seeds that also train the SASRec references (default: the first seed)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["central", "federated", "content", "channel", "transitions", "dp-sasrec",
                                 "sasrec-twins"])
    parser.add_argument("--dp-sasrec-epsilons", type=float, nargs="*", default=[],
                        help="run SASRec DP-FedAvg only at these of the targets (default: every target)")
    parser.add_argument("--dp-sasrec-q", type=float, default=None,
                        help="the rate whose noise SASRec DP-FedAvg gets (default: the product's q)")
    parser.add_argument("--fed-cohort", type=int, default=None)
    parser.add_argument("--dp-sasrec-arm", default="fedavg", choices=["fedavg", "avgm", "fedadam"],
                        help="simulations.fedopt arm whose local training and server step SASRec DP-FedAvg uses")
    parser.add_argument("--product-transitions", action="store_true",
                        help="also run the product's channel scorer with transition-release = true (its four "
                             "multipliers 4.6 : 2.76 : 2.76 : 3.22 times one common factor per epsilon) and its "
                             "no-noise twin")
    parser.add_argument("--like", default="ml-100k", help="source: ml-100k or a dataset path")
    parser.add_argument("--work", default="/tmp/privrec-population-utility",
                        help="synthetic populations and their stores (outside the repo)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="pipeline rounds (default: the product's)")
    parser.add_argument("--fed-rounds", type=int, default=None)
    parser.add_argument("--central-steps", type=int, default=None)
    parser.add_argument("--eval-users", type=int, default=None)
    parser.add_argument("--simulated-cohort", type=int, default=2_500,
                        help="where q N is larger, estimate with this expected cohort and the real cohort's noise "
                             "(0 = always the real cohort)")
    parser.add_argument("--report", metavar="RESULTS.json", help="only rebuild the .md and .png of a results file")
    parser.add_argument("--merge", metavar="RESULTS.json", nargs="+",
                        help="only merge results files (runs of different seeds / populations) into --out")
    parser.add_argument("--references", metavar="RESULTS.json",
                        help="quote the non-private SASRec federation of this earlier results file at the same N")
    parser.add_argument("--out", default=None, help="results stem (default simulations/results/population-utility-"
                                                    "<time>)")
    args = parser.parse_args(argv)
    import json

    if args.report:
        stem = Path(args.report).with_suffix("")
        results = json.loads(Path(args.report).read_text())
        plot(results, stem.with_suffix(".png"))
        save_results(stem, results, markdown(results, results["plot"]))
        return stem
    if args.merge:
        results = merge_results([json.loads(Path(f).read_text()) for f in args.merge])
        return write_results(results, args.out, args.references)
    budget = QUICK if args.quick else Budget()
    changes = {k: v for k, v in (("fed_rounds", args.fed_rounds), ("central_steps", args.central_steps),
                                 ("fed_cohort", args.fed_cohort),
                                 ("eval_users", args.eval_users)) if v is not None}
    budget = replace(budget, **changes)
    rounds = args.rounds or (2 if args.quick else None)
    sasrec_seeds = args.seeds[:1] if args.sasrec_seeds is None else args.sasrec_seeds
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = run(sorted(args.populations), args.seeds, args.like, work, budget, sasrec_seeds, rounds, set(args.skip),
                  args.simulated_cohort, args.also_synthetic, args.dp_sasrec_q,
                  args.dp_sasrec_epsilons, args.dp_sasrec_arm, args.product_transitions)
    results["sasrec-seeds"] = sasrec_seeds
    results["quick"] = args.quick
    return write_results(results, args.out, args.references)


def quote_references(results: dict, path: str) -> None:
    """Copy the non-private SASRec federation's summary at each (N, real or synthetic) from an earlier results
    file into this one's summary, as `<label> (quoted)` (not re-run here)."""
    import json

    earlier = {(p["n"], p["real"]): p for p in json.loads(Path(path).read_text())["populations"]}
    for p in results["populations"]:
        old = earlier.get((p["n"], p["real"]))
        if old and FEDERATION in old["summary"] and old["eval-users"] == p["eval-users"]:
            p["summary"][f"{FEDERATION} (quoted)"] = old["summary"][FEDERATION]
    results["quoted-references"] = Path(path).name


def merge_results(parts: list[dict]) -> dict:
    """One results dict from several runs (other seeds or populations) with the same settings."""
    merged = {**parts[0], "populations": [], "seeds": sorted({s for r in parts for s in r["seeds"]}),
              "merged-from": [r["made"] for r in parts]}
    by_pop: dict = {}
    for r in parts:
        for p in r["populations"]:
            key = (p["n"], p["real"])
            if key not in by_pop:
                by_pop[key] = {**p, "runs": {}}
            by_pop[key]["runs"].update(p["runs"])
    for key in sorted(by_pop):
        p = by_pop[key]
        p["summary"] = summarize_runs(p["runs"])
        merged["populations"].append(p)
    return merged


def write_results(results: dict, out: str | None, references: str | None) -> Path:
    if references:
        quote_references(results, references)
    stem = Path(out) if out else timestamped("population-utility")
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot(results, stem.with_suffix(".png"))
    results["plot"] = stem.with_suffix(".png").name
    save_results(stem, results, markdown(results, results["plot"]))
    return stem


if __name__ == "__main__":
    main()
