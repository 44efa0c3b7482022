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
* **popularity** (non-private, training counts) and **DP popularity** at each epsilon (one Gaussian release
  of the item-set sum, `shared.analytics.noise_for_epsilon`: Opacus RDP, the private baseline's code).
* **SASRec, non-private federation** (per-row averaging, the non-private default; `simulations.fedopt`'s
  in-process loop with `shared.training.train_local` and `shared.aggregation`) and **centralized SASRec**
  (`shared.baselines.train_centralized`), each with a REDUCED budget that is the same at every N (rounds x
  cohort x local epochs; optimizer steps), one seed by default. They are references for the trend, not the
  README's converged figures (quoted beside them at N = 943).

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
    from shared.data.store import open_store, prepare_store
    from shared.data.synth import write_synthetic
    from shared.scorer import public_catalogue
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
    catalogue = public_catalogue(text, store.item_ids, store.item_titles)
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
    grads = {k: torch.zeros(num_users, *p.shape) for k, p in model.named_parameters()}
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


# ------------------------------------------------------------------------------------ the whole sweep
def run(populations, seeds, like: str, work: Path, budget: Budget, sasrec_seeds, rounds: int | None,
        skip: set[str], simulated_cohort: int, also_synthetic=()) -> dict:
    torch.set_num_threads(1)
    s = pipeline_settings(rounds)
    calibration = {f"{t:g}": calibrate_pipeline(t, s) for t in TARGETS}
    log_progress("calibrated: " + ", ".join(f"eps {k}: z_pop {c['popularity-z']:.3f}, z {c['z']:.3f} "
                                            f"({c['epsilon']:.3f})" for k, c in calibration.items()))
    results = {"made": time.strftime("%Y-%m-%d %H:%M:%S"), "like": like, "seeds": seeds, "settings": s,
               "budget": asdict(budget), "simulated-cohort": simulated_cohort, "calibration": calibration,
               "populations": []}
    plan = sorted([(n, False) for n in populations] + [(n, True) for n in also_synthetic])
    for n, synthetic in plan:
        pop = load_population(n, like, work, budget.eval_users, synthetic)
        log_progress(f"N = {pop.n:,} ({pop.label}): {pop.interactions:,} interactions, scored on "
                     f"{len(pop.eval_index):,} users")
        arms = {f"content-scorer, epsilon {k}": (c["popularity-z"], c["z"]) for k, c in calibration.items()}
        arms["content-scorer, no noise"] = (0.0, 0.0)
        entry = {"n": pop.n, "label": pop.label, "real": pop.real, "interactions": pop.interactions,
                 "eval-users": int(len(pop.eval_index)), "expected-cohort": s["q"] * pop.n,
                 "simulated-q": simulated_rate(s, pop.n, simulated_cohort),
                 "estimate": simulated_rate(s, pop.n, simulated_cohort) < s["q"],
                 "privacy": {label: arm_privacy(zp, z, s, pop.n) for label, (zp, z) in arms.items()
                             if z > 0},
                 "runs": {}}
        for seed in seeds:
            row = run_scorer_arms(pop, arms, s, seed, budget.chunk_users, simulated_cohort)
            row.update(popularity_arms(pop, seed, s))
            if seed in sasrec_seeds and "central" not in skip:
                row["centralized SASRec (reduced budget)"] = centralized_sasrec(pop, seed, budget.central_steps)
            if seed in sasrec_seeds and "federated" not in skip:
                row["SASRec federation, no DP (reduced budget)"] = federated_sasrec(pop, seed, budget)
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
        for key in ("ndcg@10", "hr@10"):
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
             "users can and cannot stand for). **The content-scorer arms ran in-process, not through Flower**: "
             "the same shared code (`shared.scorer`, `shared.privacy.user_level` sampling, clipping and noise, "
             "`server.scorer.initial_scorer`, Flower's FedAdam arithmetic), one process, one thread.", "",
             f"Pipeline at every N: the product defaults, Poisson q = {s['q']:g}, {s['rounds']} rounds, clip "
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
            mark = " (estimate\\*)" if p["estimate"] and label.startswith("content-scorer") else ""
            cells.append("-" if v is None else f"{v['ndcg@10'][0]:.4f} +- {v['ndcg@10'][1]:.4f}{mark}"
                         + (f" [{v['seeds']}]" if "SASRec" in label else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| N | expected cohort q N | arm | epsilon (Opacus RDP, delta "
              f"{s['delta']:g}) | z_pop | z | noise std on the mean update |", "|---|---|---|---|---|---|---|"]
    cal = results["calibration"]
    for p in pops:
        for label, priv in p["privacy"].items():
            c = cal[label.rsplit(" ", 1)[-1]]
            kind = "real" if p["real"] else "synthetic"
            lines.append(f"| {p['n']:,} ({kind}) | {p['expected-cohort']:,.0f} | {label} | {priv['epsilon']:.3f} | "
                         f"{c['popularity-z']:.3f} | {c['z']:.3f} | {priv['noise-std-on-mean-update']:.2e} |")
    lines += ["", "Every epsilon: user-level (unit: one user's whole history; add/remove one user), the popularity "
              "release and every round composed in one Opacus RDP accountant (`shared.privacy.pipeline`), Poisson "
              "sampling of users at q per round; adversary: whoever sees the released histogram and models, not "
              "the server (no secure aggregation). DP popularity: one Gaussian release calibrated to the target "
              "with Opacus RDP (`shared.analytics.noise_for_epsilon`). The defaults the pipeline runs with were "
              "chosen by the developers on ML-100K (README); that choice is not in any epsilon."]
    dp_pop = next(iter(pops[0]["runs"].values())) if pops and pops[0]["runs"] else {}
    released = [f"epsilon {t:g}: z {dp_pop[f'DP popularity, epsilon {t:g}']['privacy']['noise-multiplier']:.3f} "
                f"(RDP {dp_pop[f'DP popularity, epsilon {t:g}']['privacy']['epsilon']:.3f}, PLD "
                f"{dp_pop[f'DP popularity, epsilon {t:g}']['privacy']['epsilon-pld']:.3f})"
                for t in TARGETS if f"DP popularity, epsilon {t:g}" in dp_pop]
    if released:
        lines.append("DP popularity noise multipliers (the same at every N): " + "; ".join(released) + ".")
    for p in pops:
        if p["estimate"]:
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
    private = summ.get("content-scorer, epsilon 2")
    if not private:
        return ""
    parts = []
    for ref in ("content-scorer, no noise", "SASRec federation, no DP (reduced budget)"):
        if ref in summ:
            ratio = private["ndcg@10"][0] / summ[ref]["ndcg@10"][0]
            parts.append(f"{ratio:.3f} of `{ref}` ({'within' if ratio >= 0.9 else 'NOT within'} 10%)")
    kind = " (an estimate, see above)" if p["estimate"] else ""
    return f"Target at N = {p['n']:,}, user-level epsilon 2{kind}: NDCG@10 {private['ndcg@10'][0]:.4f} is " + \
        "; ".join(parts) + "."


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pops = results["populations"]
    labels = list(dict.fromkeys(k for p in pops for k in p["summary"]))
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, label in enumerate(labels):
        style = "-" if "content-scorer" in label else ("--" if "SASRec" in label else ":")
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
    ax.set_title("utility against population size (content-scorer arms in-process, not Flower)")
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
    parser.add_argument("--skip", nargs="*", default=[], choices=["central", "federated"])
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
    parser.add_argument("--out", default=None, help="results stem (default simulations/results/population-utility-"
                                                    "<time>)")
    args = parser.parse_args(argv)
    if args.report:
        import json

        stem = Path(args.report).with_suffix("")
        results = json.loads(Path(args.report).read_text())
        plot(results, stem.with_suffix(".png"))
        save_results(stem, results, markdown(results, results["plot"]))
        return stem
    budget = QUICK if args.quick else Budget()
    changes = {k: v for k, v in (("fed_rounds", args.fed_rounds), ("central_steps", args.central_steps),
                                 ("eval_users", args.eval_users)) if v is not None}
    budget = replace(budget, **changes)
    rounds = args.rounds or (2 if args.quick else None)
    sasrec_seeds = args.seeds[:1] if args.sasrec_seeds is None else args.sasrec_seeds
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = run(sorted(args.populations), args.seeds, args.like, work, budget, sasrec_seeds, rounds, set(args.skip),
                  args.simulated_cohort, args.also_synthetic)
    results["sasrec-seeds"] = sasrec_seeds
    results["quick"] = args.quick
    stem = Path(args.out) if args.out else timestamped("population-utility")
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot(results, stem.with_suffix(".png"))
    results["plot"] = stem.with_suffix(".png").name
    save_results(stem, results, markdown(results, results["plot"]))
    return stem


if __name__ == "__main__":
    main()
