"""Issue 13 with the hyperparameter choice ACCOUNTED, over the product's 5-round recipe: private selection.

    python -m simulations.product_selection calibrate            # reference multipliers + common factor (~2 min)
    python -m simulations.product_selection run --seeds 0 1 2    # one file per seed (a Poisson number of runs)
    python -m simulations.product_selection report [--seeds ...] # table (json + md)

The product's default (`shared.config.DEFAULT_PIPELINE`, `model = channel-scorer`: 5 rounds of user-level
DP-FedSGD at q = 236/943, noise multipliers (4.6, 2.76, 3.22), Opacus RDP epsilon 1.998) was CHOSEN by
`simulations.budget_allocation` looking at every user's validation item over 16 candidates. No epsilon counted
that choice. Here the same choice is made by a differentially private selection whose cost is accounted.

Pre-registered plan (written and committed before any pipeline run; decided from privacy arithmetic and a-priori
reasoning only, see `cmd_plan` and the README for the arithmetic; no validation or test figure was used):

* GRID: the budget study's 16 candidates exactly as it looked at them (`budget_candidates`: stage 1's 6 eligible
  (rounds, q) with split 5 : 3 : 3.5 and server-lr 0.5; stage 2's 9 splits at (5 rounds, q 0.25); stage 3's
  server-lr 0.25 and 1.0; duplicates once). Each candidate's noise multipliers are its own epsilon-2 calibration
  (`budget_allocation.calibrate`, Opacus RDP, the product's accountant) times ONE common factor c. The grid covers
  every choice of that study (its stages were adaptive; any path through them ends inside these 16). NOT covered:
  the choices made before it (the research replay's channel list, top 100 items, window 10, initial weights,
  scorer targets, profile settings, the clip 1, FedAdam's betas, the 5 : 3 : 3.5 starting split, the grid itself
  and the eligibility rule rounds x q <= 5), which were fixed from earlier looks at seed 0 of the same split.
* One run: a candidate drawn uniformly at random (data-independent) -> the product's in-process pipeline exactly as
  `budget_allocation.ensure` runs a candidate (`population_utility.run_channel_arms` on the ML-100K population of
  `budget_allocation.population()`, then `channel_ranks(split="valid")`) with the multipliers x c and a fresh seed
  -> its private validation score: the sum over the 943 users of their validation NDCG@10 (each in [0, 1]: L2
  sensitivity 1 under add/remove one user, given the released model) plus N(0, VALID_Z^2).
* Repeat-and-select (Papernot & Steinke, ICLR 2022): the number of runs T ~ the truncated negative binomial of
  shape SHAPE and mean MEAN_RUNS (T >= 1: no fallback needed); the released model is the run with the highest
  noisy score (ties: the earlier run). The per-run RDP curve is the pointwise max over the 16 candidates' curves
  (a mixture with the drawn index revealed has Renyi divergence <= the max of its components at every order), each
  the dp-accounting RDP of [popularity Gaussian, co-occurrence Gaussian, rounds x Poisson-subsampled Gaussian,
  score Gaussian]; dp-accounting's repeat-and-select transform (the formula its `RepeatAndSelectDpEvent` uses)
  turns it into the selection's RDP, converted at DELTA. c is the smallest (bisection, relative width 1e-3, upper
  end kept) with that epsilon <= TARGET.
* Why logarithmic T, mean 2, score noise 10 (privacy arithmetic, `plan`: the factor c each option needs for epsilon
  <= 2; results file `product-selection-plan.md`). c grows with the mean and with the shape: at score noise 10,
  mean 2: logarithmic 1.40, shape 0.5 1.50, geometric 1.56, shape 2 1.68; Poisson 1.30 but P(T = 0) = 13.5%.
  (1) T >= 1 (truncated negative binomial): with T = 0 the release must be data-independent (no popularity, no
  co-occurrence, no training: the on-device content score alone), a priori far below any run, and with 3 seeds one
  such seed dominates the mean; Poisson needs mean 3 for P(T = 0) = 5%, at c 1.44 > 1.40. (2) Among T >= 1
  shapes the logarithmic is cheapest at every mean. (3) Mean 2: on average one comparison (P(T >= 2) = 43%);
  mean 3 costs c 1.52, mean 1.5 gives 1.30 but a single run 72% of the time. (4) Score noise 10: the sum of 943
  per-user NDCG@10 (each in [0, 1], a priori std about 0.2) has a sampling error of about 0.2 x sqrt(943) = 6 to 7
  of its own, so less noise buys little real resolution while z 5 needs c 1.64 and z 3 cannot reach 2 at all; z 20
  saves only 0.04 of c. Nothing here looked at a validation or test figure.
* Secondary (registered with the plan, never the headline whatever it gives): the data-independent choice, T = 1,
  one candidate drawn uniformly at random, no score, at factor 1 (each candidate is at epsilon <= 2 on its own; a
  data-independently drawn mixture, index revealed, keeps the largest (epsilon, delta) of its components). And, to
  price the accounting, the selected candidate re-run with the same pipeline seed at factor 1 (its own epsilon 2;
  that re-run is NOT an accounted figure: the choice came from the selection at factor c).
* Seeds: 0 1 2 (the figure), then 3 4 5 (reported separately). A seed fixes the selection's own randomness (T,
  candidates, score noise: `np.random.default_rng([seed, SELECTION_TAG])`) and each run's pipeline seed (a fresh
  31-bit integer drawn from that generator, never one of the seeds 0-5 the budget study's noise used).

Privacy statement for every figure: user-level, unit one user's whole history, add/remove one user, delta 1e-5,
dp-accounting RDP accountant (Papernot-Steinke repeat-and-select over the composed run); mechanisms: Gaussian
popularity release, Gaussian windowed co-occurrence release, DP-FedSGD rounds (clip 1, Poisson sampling q per
round), Gaussian validation score. Adversary: whoever sees the released (selected) model -- its popularity,
co-occurrence and scorer -- and the selection's outcome. NOT the server: without secure aggregation it sees every
device's contributions; and the unselected runs' releases (their histograms, matrices, scorers and scores) and T
must stay inside a trusted aggregator -- if they leave it, the guarantee is T compositions of one run, not this
figure. The results files log every run's candidate, noisy score and test figures: that is the experimenter's
view for this study, not a release the guarantee covers.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from simulations.output import RESULTS, log_progress, run_missing_seeds, save_results, timestamped, write_json

TARGET = 2.0
DELTA = 1e-5
MEAN_RUNS = 2.0  # E[T]: on average one comparison; T >= 1 always (see SHAPE)
SHAPE = 0.0  # logarithmic (0): the cheapest T >= 1 distribution at a given mean; inf would be Poisson (T = 0 possible)
VALID_Z = 10.0  # score noise std, in units of one user's NDCG@10: the order of the sum's own sampling error (~7)
SEEDS = (0, 1, 2)
FRESH_SEEDS = (3, 4, 5)
SELECTION_TAG = 0x5E1EC7
CALIBRATION = RESULTS / "product-selection-calibration.json"
RUN_PREFIX = "product-selection-run"
PLAN_OPTIONS = {"mean": (1.5, 2.0, 3.0, 4.0), "shape": (0.0, 0.5, 1.0, 2.0, math.inf), "valid_z": (3.0, 5.0, 10.0)}


# ------------------------------------------------------------------------------------ the grid
def budget_candidates() -> list:
    """The budget study's 16 candidates (`budget_allocation.search --eligible-only`, stages 1 to 3 as run)."""
    from simulations import budget_allocation as ba

    stage1 = [ba.Candidate(r, q, ba.DEFAULT_SPLIT, 0.5) for r, q in ba.STAGE_ROUNDS_Q]
    stage1 = [c for c in stage1 if c.eligible]
    stage2 = [ba.Candidate(5, 0.25, split, 0.5) for split in ba.STAGE_SPLITS]
    stage3 = [ba.Candidate(5, 0.25, ba.DEFAULT_SPLIT, lr) for lr in ba.STAGE_LRS]
    return list(dict.fromkeys(stage1 + stage2 + stage3))


# ------------------------------------------------------------------------------------ privacy arithmetic
def check_options(mean: float, shape: float, valid_z: float, target: float = TARGET) -> None:
    """Refuse an option the accounting cannot honour, with one line naming it."""
    from shared.errors import PrivrecError

    if not (math.isfinite(mean) and mean >= 1):
        raise PrivrecError(f"mean-runs = {mean}: the repeat-and-select mean must be a finite number >= 1")
    if math.isnan(shape) or shape < 0:
        raise PrivrecError(f"shape = {shape}: dp-accounting supports shape >= 0 (0 logarithmic, inf Poisson)")
    if not (math.isfinite(valid_z) and valid_z > 0):
        raise PrivrecError(f"valid-z = {valid_z}: the validation score needs Gaussian noise > 0")
    if not (math.isfinite(target) and target > 0):
        raise PrivrecError(f"target = {target}: the epsilon target must be a finite number > 0")


def run_event(z: dict, settings: dict, factor: float, valid_z: float | None):
    """One run of one candidate: the product's composition (`privacy_utility.product_event`) x factor + the score
    (none when valid_z is None: a run whose score is not released)."""
    import dp_accounting as dpa

    from simulations.privacy_utility import product_event

    pipeline = product_event(factor * z["popularity"], factor * z["cooc"], factor * z["rounds"], settings)
    return pipeline if valid_z is None else dpa.ComposedDpEvent([pipeline, dpa.GaussianDpEvent(valid_z)])


def run_rdp(z: dict, settings: dict, factor: float, valid_z: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(orders, RDP) of one run under dp-accounting's RDP accountant (its default orders)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(run_event(z, settings, factor, valid_z))
    return np.asarray(accountant.orders), np.asarray(accountant.rdp)


def mixture_rdp(refs: dict, factor: float, valid_z: float | None) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly drawn candidate (index revealed): RDP <= the pointwise max of the candidates' RDP curves."""
    from simulations import budget_allocation as ba

    curves = [run_rdp(ref["z"], ba.settings(ba.from_name(name)), factor, valid_z) for name, ref in refs.items()]
    orders = curves[0][0]
    return orders, np.max(np.stack([rdp for _, rdp in curves]), axis=0)


def selection_rdp(orders: np.ndarray, rdp: np.ndarray, mean: float, shape: float) -> np.ndarray:
    """dp-accounting's repeat-and-select transform (what its RdpAccountant applies to a RepeatAndSelectDpEvent)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    return np.asarray(rdp_privacy_accountant._compute_rdp_repeat_and_select(orders, rdp, mean, shape))


def selection_epsilon(refs: dict, factor: float, mean: float = MEAN_RUNS, shape: float = SHAPE,
                      valid_z: float = VALID_Z) -> float:
    """User-level epsilon at DELTA of the whole selection over the grid (dp-accounting RDP)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    check_options(mean, shape, valid_z)
    orders, rdp = mixture_rdp(refs, factor, valid_z)
    eps, _ = rdp_privacy_accountant.compute_epsilon(orders, selection_rdp(orders, rdp, mean, shape), DELTA)
    return float(eps)


def one_run_epsilons(ref: dict, settings: dict, factor: float, valid_z: float | None) -> dict:
    """One run alone, no selection: dp-accounting PLD and RDP, and Opacus RDP of the pipeline without the score."""
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    from simulations.population_utility import channel_epsilon

    out = {}
    for name, accountant in (("dp-accounting-rdp", rdp_privacy_accountant.RdpAccountant()),
                             ("dp-accounting-pld", pld_privacy_accountant.PLDAccountant())):
        accountant.compose(run_event(ref["z"], settings, factor, valid_z))
        out[name] = float(accountant.get_epsilon(DELTA))
    z = ref["z"]
    out["opacus-rdp, pipeline without the score"] = channel_epsilon(factor * z["popularity"], factor * z["cooc"],
                                                                    factor * z["rounds"], settings)
    return out


def random_choice_epsilon(refs: dict) -> float:
    """The secondary protocol (one uniformly drawn candidate at factor 1, no score, no selection): the largest of the
    candidates' own dp-accounting RDP epsilons. A data-independent mixture with the index revealed satisfies
    (max epsilon_i, max delta_i)-DP: P[(i, M_i(D)) in S] = sum_i p_i P[M_i(D) in S_i] <= e^eps P[(i, M_i(D')) in S]
    + delta. (Its pointwise-max RDP curve would give more: the components peak at different orders.)"""
    from dp_accounting.rdp import rdp_privacy_accountant

    from simulations import budget_allocation as ba

    return max(float(rdp_privacy_accountant.compute_epsilon(
        *run_rdp(ref["z"], ba.settings(ba.from_name(name)), 1.0, None), DELTA)[0]) for name, ref in refs.items())


def reference_multipliers() -> dict:
    """name -> the candidate's epsilon-2 multipliers (`budget_allocation.calibrate`'s rule, Opacus RDP only)."""
    from simulations import budget_allocation as ba
    from simulations.population_utility import calibrate_channel

    refs = {}
    for cand in budget_candidates():
        c = ba.settings(cand)
        x = calibrate_channel(ba.EPSILON, c)
        refs[cand.name] = {"z": {"popularity": x["popularity-z"], "cooc": x["cooc-z"], "rounds": x["z"]},
                           "q": c["q"], "rounds": cand.rounds, "server-lr": cand.server_lr,
                           "opacus-rdp at factor 1": x["epsilon"]}
    return refs


def calibrate_selection(refs: dict, mean: float = MEAN_RUNS, shape: float = SHAPE, valid_z: float = VALID_Z,
                        target: float = TARGET) -> float:
    """The smallest common factor c with selection_epsilon <= target."""
    from simulations.privacy_utility import calibrate_factor

    check_options(mean, shape, valid_z, target)
    return calibrate_factor(lambda f: selection_epsilon(refs, f, mean, shape, valid_z), target)


# ------------------------------------------------------------------------------------ the number of runs
def draw_runs(mean: float, shape: float, rng: np.random.Generator) -> int:
    """T from the distribution the accounting assumes: Poisson (shape inf) or the truncated negative binomial of
    Papernot-Steinke (T >= 1; gamma from dp-accounting's own mean -> gamma map)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    if math.isinf(shape):
        return int(rng.poisson(mean))
    gamma = rdp_privacy_accountant._gamma_truncated_negative_binomial(shape, mean)
    if shape == 0:  # logarithmic: P(k) proportional to (1 - gamma)^k / k
        return int(rng.logseries(1 - gamma))
    while True:  # P(k) proportional to (1 - gamma)^k binom(k + shape - 1, k), conditioned on k >= 1
        k = int(rng.negative_binomial(shape, gamma))
        if k >= 1:
            return k


# ------------------------------------------------------------------------------------ runs
def noisy_score(per_user: np.ndarray, z: float, rng: np.random.Generator) -> float:
    """Gaussian mechanism on the sum of per-user scores clipped to [0, 1] (L2 sensitivity 1, add/remove)."""
    return float(np.clip(per_user, 0.0, 1.0).sum() + rng.normal(0.0, z))


def repeat_and_select(run_once, num_candidates: int, mean: float, shape: float, rng: np.random.Generator):
    """Papernot-Steinke repeat-and-select: T = draw_runs(mean, shape); run t draws a candidate uniformly and a fresh
    pipeline seed, and `run_once(candidate, run_seed)` returns (per-user validation scores, result); the score is
    released with N(0, VALID_Z^2) by `score(per_user)`. Returns (the best run's result, None when T = 0, and the log
    of every run's (candidate, pipeline seed, noisy score))."""
    runs = draw_runs(mean, shape, rng)
    best, best_score, log = None, -math.inf, []
    for _ in range(runs):
        candidate = int(rng.integers(num_candidates))
        run_seed = int(rng.integers(1_000, 2**31 - 1))  # fresh: never 0-5, the budget study's noise seeds
        score, result = run_once(candidate, run_seed)
        log.append({"candidate": candidate, "run-seed": run_seed, "noisy-valid-score": score})
        if score > best_score:
            best, best_score = result, score
    return best, log


def load_calibration() -> dict:
    from shared.errors import PrivrecError

    if not CALIBRATION.exists():
        raise PrivrecError(f"{CALIBRATION}: missing; run `python -m simulations.product_selection calibrate` first")
    cal = json.loads(CALIBRATION.read_text())
    plan = {"mean": MEAN_RUNS, "shape": SHAPE, "valid_z": VALID_Z, "target": TARGET,
            "grid": [c.name for c in budget_candidates()]}
    if {k: cal[k] for k in plan} != plan:
        raise PrivrecError(f"{CALIBRATION}: made for another plan than the registered one; re-run calibrate")
    return cal


def cmd_calibrate(_args) -> None:
    refs = reference_multipliers()
    factor = calibrate_selection(refs)
    from simulations import budget_allocation as ba

    shipped_name = "r5-q0.25-split5:3:3.5-lr0.5"
    cal = {"mean": MEAN_RUNS, "shape": SHAPE, "valid_z": VALID_Z, "target": TARGET, "delta": DELTA,
           "grid": list(refs), "references": refs, "factor": factor,
           "epsilon-rdp, selection": selection_epsilon(refs, factor),
           "one run of the shipped candidate at this factor": one_run_epsilons(
               refs[shipped_name], ba.settings(ba.from_name(shipped_name)), factor, VALID_Z),
           "accountant": "dp-accounting RDP (default orders): pointwise max over the grid of each candidate's run "
                         "curve, then the Papernot-Steinke repeat-and-select transform "
                         "(_compute_rdp_repeat_and_select), epsilon at delta 1e-5"}
    write_json(CALIBRATION, cal)
    print(json.dumps({k: v for k, v in cal.items() if k != "references"}, indent=1))


def run_candidate(pop, name: str, ref: dict, factor: float, run_seed: int) -> tuple[np.ndarray, dict]:
    """One candidate exactly as `budget_allocation.ensure` runs it, its multipliers x factor, seed run_seed."""
    from shared.metrics import ndcg_at_k
    from simulations import budget_allocation as ba
    from simulations import population_utility as pu

    c = ba.settings(ba.from_name(name))
    arms = {name: tuple(factor * ref["z"][k] for k in ("popularity", "cooc", "rounds"))}
    started = time.perf_counter()
    models: dict = {}
    rows = pu.run_channel_arms(pop, arms, c, run_seed, pu.Budget().chunk_users, 0, models_out=models)
    valid = pu.channel_ranks(models, pop, c, split="valid")[name]
    row = rows[name]
    return ndcg_at_k(valid), {"candidate": name, "run-seed": run_seed, "factor": factor, "z": arms[name],
                              "test": {k: float(row[k]) for k in ("ndcg@10", "hr@10")},
                              "valid": pu.figures(valid), "round-0 test": row["round-0"],
                              "weights": row["weights"], "seconds": round(time.perf_counter() - started, 1)}


def select_for_seed(pop, cal: dict, seed: int) -> dict:
    """The registered plan on one seed: the selection, the priced re-run and the secondary."""
    names = cal["grid"]
    started = time.perf_counter()
    rng = np.random.default_rng([seed, SELECTION_TAG])  # the selection's own randomness
    results = []

    def run_once(candidate: int, run_seed: int):
        per_user, row = run_candidate(pop, names[candidate], cal["references"][names[candidate]], cal["factor"],
                                      run_seed)
        score = noisy_score(per_user, cal["valid_z"], rng)
        row["noisy-valid-score"] = score
        results.append(row)
        log_progress(f"seed {seed} run {len(results)}: {names[candidate]} noisy valid score {score:.2f} "
                     f"({row['seconds']:.0f} s)")
        return score, row

    best, log = repeat_and_select(run_once, len(names), cal["mean"], cal["shape"], rng)
    # the same selected candidate and pipeline seed at factor 1 (its own epsilon 2, the choice NOT accounted)
    _, unaccounted = run_candidate(pop, best["candidate"], cal["references"][best["candidate"]], 1.0,
                                   best["run-seed"])
    # secondary: a data-independent choice (one uniformly drawn candidate, factor 1, no score)
    other = np.random.default_rng([seed, SELECTION_TAG, 1])
    drawn = names[int(other.integers(len(names)))]
    _, random_choice = run_candidate(pop, drawn, cal["references"][drawn], 1.0, int(other.integers(1_000, 2**31 - 1)))
    return {"seed": seed, "plan": {k: cal[k] for k in ("mean", "shape", "valid_z", "target", "factor")},
            "runs": results, "log": log, "selected": best,
            "selected at factor 1 (choice not accounted)": unaccounted,
            "random candidate at factor 1 (secondary)": random_choice,
            "seconds": round(time.perf_counter() - started, 1)}


def cmd_run(args) -> None:
    from simulations import budget_allocation as ba

    cal = load_calibration()
    pop = ba.population()

    def one_seed(seed: int) -> dict:
        out = select_for_seed(pop, cal, seed)
        best = out["selected"]
        log_progress(f"seed {seed}: {len(out['log'])} runs, selected {best['candidate']}, test NDCG@10 "
                     f"{best['test']['ndcg@10']:.4f}")
        return out

    run_missing_seeds(f"{RUN_PREFIX}-seed", args.seeds, one_seed)


# ------------------------------------------------------------------------------------ plan and report
def cmd_plan(_args) -> None:
    """The factor c every (mean, shape, score noise) option needs for epsilon <= TARGET, on a 0.02 grid of c (the
    arithmetic behind the registered choice; the product part of each curve is computed once per factor)."""
    from dp_accounting import GaussianDpEvent
    from dp_accounting.rdp import rdp_privacy_accountant

    refs = reference_multipliers()
    factors = np.round(np.arange(1.0, 2.001, 0.02), 3)
    curves = {}
    for f in factors:
        orders, curves[f] = mixture_rdp(refs, float(f), None)  # no score: added per option below
    table = []
    for valid_z in PLAN_OPTIONS["valid_z"]:
        accountant = rdp_privacy_accountant.RdpAccountant()
        accountant.compose(GaussianDpEvent(valid_z))
        score = np.asarray(accountant.rdp)
        for shape in PLAN_OPTIONS["shape"]:
            for mean in PLAN_OPTIONS["mean"]:
                factor = next((float(f) for f in factors if rdp_privacy_accountant.compute_epsilon(
                    orders, selection_rdp(orders, curves[f] + score, mean, shape), DELTA)[0] <= TARGET), None)
                table.append({"valid_z": valid_z, "shape": shape, "mean": mean, "factor (0.02 grid)": factor,
                              "P(T = 0)": math.exp(-mean) if math.isinf(shape) else 0.0})
    no_selection = next(float(f) for f in factors
                        if rdp_privacy_accountant.compute_epsilon(orders, curves[f], DELTA)[0] <= TARGET)
    results = {"target": TARGET, "delta": DELTA, "grid": list(refs), "table": table,
               "one run, no score, no selection (max over the grid)": no_selection,
               "registered": {"mean": MEAN_RUNS, "shape": SHAPE, "valid_z": VALID_Z}}
    lines = [f"# Private selection over the product's grid: the factor c each option needs for epsilon <= {TARGET:g}",
             "", "dp-accounting RDP, delta 1e-5, max over the 16 candidates' run curves, c on a 0.02 grid (none: "
             "above 2.0). Shape 0 logarithmic, 1 geometric, inf Poisson (P(T = 0) = e^-mean). One run without score "
             f"or selection: c = {no_selection:g}. Registered: mean {MEAN_RUNS:g}, shape {SHAPE:g}, score noise "
             f"{VALID_Z:g}.", "", "| score noise | shape | " + " | ".join(f"mean {m:g}" for m in PLAN_OPTIONS["mean"])
             + " |", "|---|---|" + "---|" * len(PLAN_OPTIONS["mean"])]
    for valid_z in PLAN_OPTIONS["valid_z"]:
        for shape in PLAN_OPTIONS["shape"]:
            row = [r for r in table if r["valid_z"] == valid_z and r["shape"] == shape]
            lines.append(f"| {valid_z:g} | {shape:g} | " + " | ".join(
                "none" if r["factor (0.02 grid)"] is None else f"{r['factor (0.02 grid)']:.2f}" for r in row) + " |")
    save_results(RESULTS / "product-selection-plan", results, "\n".join(lines))


def _runs(seeds) -> list[dict]:
    paths = [RESULTS / f"{RUN_PREFIX}-seed{s}.json" for s in seeds]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def cmd_report(args) -> None:
    from simulations.privacy_utility import summary_stats

    cal = load_calibration()
    runs = _runs(args.seeds)

    def stats_of(key):
        return {m: summary_stats([r[key]["test"][m] for r in runs]) for m in ("ndcg@10", "hr@10")}
    secondary_eps = random_choice_epsilon(cal["references"])
    results = {"made": time.strftime("%Y-%m-%d %H:%M:%S"), "seeds": [r["seed"] for r in runs],
               "calibration": {k: v for k, v in cal.items() if k != "references"},
               "selected (accounted)": stats_of("selected"),
               "selected candidate at factor 1 (choice not accounted)":
                   stats_of("selected at factor 1 (choice not accounted)"),
               "random candidate at factor 1 (secondary, accounted)": stats_of(
                   "random candidate at factor 1 (secondary)"),
               "secondary epsilon (largest of the 16 candidates' dp-accounting RDP)": secondary_eps,
               "issue target": {"epsilon": TARGET, "ndcg@10": 0.075},
               "privacy": {"unit": "one user's whole history", "relation": "add/remove one user", "delta": DELTA,
                           "accountant": cal["accountant"],
                           "mechanisms": "per run: Gaussian popularity release, Gaussian windowed co-occurrence "
                                         "release, DP-FedSGD rounds (clip 1, Poisson q per round, Gaussian on the "
                                         "sum), Gaussian validation score (sensitivity 1)",
                           "adversary": "whoever sees the selected run's releases (popularity, co-occurrence, "
                                        "scorer) and the selection; not the server (no secure aggregation); the "
                                        "unselected runs' releases, scores and T stay inside a trusted aggregator",
                           "not accounted": "the choices before the budget study's grid (channel list, top 100, "
                                            "window 10, initial weights, targets, clip, the grid and its "
                                            "eligibility rule)"},
               "per-seed": runs}
    stem = timestamped("product-selection" + ("-fresh" if min(results["seeds"]) >= 3 else ""))
    save_results(stem, results, markdown(results))


def markdown(results: dict) -> str:
    from simulations.privacy_utility import stats_cell

    cal = results["calibration"]
    one = cal["one run of the shipped candidate at this factor"]
    lines = [f"# Issue 13 with the choice accounted: private selection over the product's 5-round grid "
             f"(seeds {results['seeds']}, {results['made']})", "",
             f"Repeat-and-select over the budget study's {len(cal['grid'])} candidates, T ~ truncated negative "
             f"binomial shape {cal['shape']:g} (0: logarithmic), mean {cal['mean']:g}; each run: a uniformly drawn "
             f"candidate, its epsilon-2 multipliers x {cal['factor']:.4f}, the product's in-process pipeline, noisy "
             f"validation score (sum of per-user NDCG@10 + N(0, {cal['valid_z']:g}^2)). User-level epsilon "
             f"{cal['epsilon-rdp, selection']:.3f} (dp-accounting RDP of the whole selection, delta 1e-5, "
             f"add/remove one user); one run of the shipped candidate alone: {one['dp-accounting-pld']:.3f} PLD / "
             f"{one['dp-accounting-rdp']:.3f} RDP. Adversary: whoever sees the selected model and the selection; "
             "not the server; unselected runs stay inside a trusted aggregator. Mean +- sample std [95% t CI].", "",
             "| seed | runs (candidate: noisy valid score) | selected | test NDCG@10 | test HR@10 | same candidate "
             "and seed at factor 1 (not accounted) | random candidate at factor 1 (secondary) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["per-seed"]:
        runs = "; ".join(f"{x['candidate']}: {x['noisy-valid-score']:.1f}" for x in r["runs"])
        sel, un, rnd = r["selected"], r["selected at factor 1 (choice not accounted)"], \
            r["random candidate at factor 1 (secondary)"]
        lines.append(f"| {r['seed']} | {runs} | {sel['candidate']} | {sel['test']['ndcg@10']:.4f} | "
                     f"{sel['test']['hr@10']:.4f} | {un['test']['ndcg@10']:.4f} | {rnd['candidate']}: "
                     f"{rnd['test']['ndcg@10']:.4f} |")
    a, u, s = (results["selected (accounted)"], results["selected candidate at factor 1 (choice not accounted)"],
               results["random candidate at factor 1 (secondary, accounted)"])
    lines.append(f"| mean +- std [95% CI] | | | **{stats_cell(a['ndcg@10'])}** | {stats_cell(a['hr@10'])} | "
                 f"{stats_cell(u['ndcg@10'])} | {stats_cell(s['ndcg@10'])} |")
    met = a["ndcg@10"]["mean"] >= results["issue target"]["ndcg@10"]
    secondary = results["secondary epsilon (largest of the 16 candidates' dp-accounting RDP)"]
    lines += ["", f"Issue 13's target (NDCG@10 >= 0.075 at epsilon <= 2, choice included): "
              f"{'met by the mean' if met else 'NOT met'} ({a['ndcg@10']['mean']:.4f}); the secondary's epsilon "
              f"(the largest of the 16 candidates' own dp-accounting RDP epsilons at factor 1, no score) "
              f"{secondary:.3f}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan")
    sub.add_parser("calibrate")
    for name, seeds in (("run", SEEDS), ("report", SEEDS)):
        p = sub.add_parser(name)
        p.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    args = parser.parse_args(argv)
    {"plan": cmd_plan, "calibrate": cmd_calibrate, "run": cmd_run, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
