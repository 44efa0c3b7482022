"""How the product's epsilon-2 budget is spent (issue 13): a small, stated grid, decided on validation only.

    python -m simulations.budget_allocation search            # the three stages below, seeds 0 1 2 (~30-60 min)
    python -m simulations.budget_allocation confirm --tag merged --candidates NAME ...   # re-run named candidates
    python -m simulations.budget_allocation report [--tag T]  # table (json + md) from the runs file

The product's default (`privrec simulate`, `model = channel-scorer`, `shared.config.DEFAULT_PIPELINE`) spends one
user-level budget on three releases: the DP popularity histogram (z_pop), the DP windowed co-occurrence among the
top released items (z_cooc), and `rounds` rounds of user-level DP-FedSGD of the 9-weight channel scorer at Poisson
rate q (z, clip 1, FedAdam `server-lr`). A candidate fixes (rounds, q, server-lr) and a *split*: reference noise
multipliers (z_pop, z_cooc, z) whose RATIO is kept; they are scaled by ONE common factor, the smallest (bisection,
relative width 1e-3) whose epsilon under the product's own accountant (Opacus RDP over [[z_pop, 1, 1],
[z_cooc, 1, 1], [z, q, rounds]], `shared.privacy.pipeline.pipeline_epsilon`) is <= 2.0 at delta 1e-5
(`simulations.privacy_utility.calibrate_product`; dp-accounting's RDP and PLD of the same composition beside it).
q is the rate the product's ServerApp uses at N = 943: round(fraction x 943) / 943 (`planned_sample_rate`;
236/943 for 0.25), both for the accounting and for the in-process Poisson sampling.

Every candidate runs in-process with the product's code (`simulations.population_utility.run_channel_arms`, the
channel arm the README's product table uses; not Flower) on the real ML-100K, seeds 0 1 2 (the seed changes the DP
noise and the cohorts; candidates with the same (rounds, q) share cohorts and standard normal draws). Scored on
every user's validation item (input = training items) and test item (input = training + validation items), full
ranking, own history excluded. **Decisions use the mean validation NDCG@10 over the three seeds only**; test is
reported beside it and never used to choose.

The grid, fixed before any run (coordinate search, three stages; each stage keeps its best candidate by mean
validation NDCG@10 among those the product can afford, see ELIGIBLE):

1. rounds x q: rounds in {5, 10, 20, 40} x fraction in {0.25, 0.5, 1.0} (12), the default split 5 : 3 : 3.5,
   server-lr 0.5;
2. split at stage 1's (rounds, q): reference (z_pop, z_cooc) in {3, 5, 8} x {1.8, 3, 4.8}, z 3.5 (9; the ratio
   sets the split: smaller reference multipliers on the releases give them more of the budget), server-lr 0.5;
3. server-lr in {0.25, 0.5, 1.0} at stage 2's choice (3).

At most 12 + 8 + 2 = 22 distinct candidates (stages share one candidate each). ELIGIBLE (fixed before any run): a
candidate can become the product's default only if rounds x q <= 5, i.e. at most twice the former default's ~2,360
device trainings per run (that default's `privrec simulate` took 2 min 27 s to 2 min 39 s on the quiet machine,
~10 s a Flower round), so the product stays well inside 10 minutes on 2 cores. `search --eligible-only` (the run
in the README) skips the 6 ineligible stage-1 candidates (rounds x q = 10 to 40: 110 of stage 1's 131 units of
in-process work); it looked at 6 + 8 + 2 = 16 candidates. **That choice is NOT accounted in any epsilon here**:
every figure is the epsilon of one fixed configuration, and picking the best of 16 on every user's validation item
is itself a release that no accountant here counts (the defaults it replaces were chosen the same way).

`confirm --seeds 0 1 2 3 4 5 --shipped --candidates ...` re-runs named candidates, the reference and the shipped
multipliers (`shared.config.DEFAULT_PIPELINE`, not calibrated: `fixed`) on the selection seeds and on three fresh
seeds 3 4 5 that no choice looked at (the winner's validation figure on seeds 0 1 2 is biased upwards by the
selection; on 3 4 5 it is not).

Adoption rule (fixed before any run): the final candidate replaces the default only if its mean validation
NDCG@10 exceeds the default's (the same split calibrated to 2.0, same seeds) by more than the default's sample
standard deviation over the seeds, AND it is higher on every seed (paired by seed).

Files: `simulations/results/budget-allocation-runs-<tag>.json` (every (candidate, seed) record; re-runs skip
records that exist) and `budget-allocation-<tag>-<time>.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.atomic import write_bytes_atomic
from simulations.output import RESULTS, log_progress, save_results

EPSILON = 2.0
USERS = 943
SEEDS = (0, 1, 2)
DEFAULT_SPLIT = (5.0, 3.0, 3.5)  # the product's default before this study: popularity, co-occurrence, rounds
STAGE_ROUNDS_Q = tuple((rounds, q) for rounds in (5, 10, 20, 40) for q in (0.25, 0.5, 1.0))
STAGE_SPLITS = tuple((p, c, 3.5) for p in (3.0, 5.0, 8.0) for c in (1.8, 3.0, 4.8))
STAGE_LRS = (0.25, 0.5, 1.0)
ELIGIBLE_ROUND_RATE = 5.0  # rounds x q a candidate may have to become the product's default
METRICS = ("ndcg@10", "hr@10")


@dataclass(frozen=True)
class Candidate:
    rounds: int
    fraction: float  # the product's fraction-train; the rate is planned_sample_rate of it at N = 943
    split: tuple[float, float, float]  # reference (z_pop, z_cooc, z): only the ratio matters
    server_lr: float
    fixed: bool = False  # split = the noise multipliers themselves (as shipped), not calibrated

    @property
    def name(self) -> str:
        p, c, z = self.split
        kind = "fixed" if self.fixed else "split"
        return f"r{self.rounds}-q{self.fraction:g}-{kind}{p:g}:{c:g}:{z:g}-lr{self.server_lr:g}"

    @property
    def group(self) -> tuple:
        """Candidates of one group run in one `run_channel_arms` call (shared cohorts and draws)."""
        return (self.rounds, self.fraction, self.server_lr)

    @property
    def eligible(self) -> bool:
        return self.rounds * self.fraction <= ELIGIBLE_ROUND_RATE


DEFAULT = Candidate(10, 0.25, DEFAULT_SPLIT, 0.5)  # the default this study started from (the reference)


def from_name(name: str) -> Candidate:
    r, q, split, lr = name.split("-", 3)
    fixed = split.startswith("fixed")
    p, c, z = (float(x) for x in split.removeprefix("fixed" if fixed else "split").split(":"))
    return Candidate(int(r[1:]), float(q[1:]), (p, c, z), float(lr.removeprefix("lr")), fixed)


def shipped() -> Candidate:
    """The product's default as `shared.config.DEFAULT_PIPELINE` ships it (its multipliers, not calibrated)."""
    from shared import config

    cfg = config.resolve_run()  # what `privrec simulate` runs with no options
    return Candidate(cfg["num-rounds"], cfg["fraction-train"], (cfg["popularity-noise-multiplier"],
                     cfg["cooc-noise-multiplier"], cfg["user-noise-multiplier"]), cfg["server-lr"], fixed=True)


def rate(fraction: float, users: int = USERS) -> float:
    """The Poisson rate the product's ServerApp uses (`shared.privacy.pipeline.planned_sample_rate`)."""
    from shared.privacy.pipeline import planned_sample_rate

    return planned_sample_rate({"devices-per-round": 0, "fraction-train": fraction}, users)


def settings(cand: Candidate) -> dict:
    """The product's channel settings with the candidate's rounds, rate, server-lr and reference multipliers."""
    from simulations.population_utility import channel_settings

    c = channel_settings()
    p, co, z = cand.split
    c.update({"rounds": cand.rounds, "q": rate(cand.fraction), "server-lr": cand.server_lr,
              "popularity-z": p, "cooc-z": co, "z": z})
    return c


def calibrate(cand: Candidate) -> dict:
    """The candidate's noise multipliers at epsilon <= 2.0 (a fixed candidate: its own, with their epsilon)."""
    from simulations.privacy_utility import calibrate_product, product_epsilons

    c = settings(cand)
    if cand.fixed:
        p, co, z = cand.split
        row = {"target": None, "factor": 1.0, "z": {"popularity": p, "cooc": co, "rounds": z},
               "epsilon": product_epsilons(p, co, z, c) if min(cand.split) > 0 else  # no noise: no guarantee
               dict.fromkeys(("opacus-rdp", "dp-accounting-rdp", "dp-accounting-pld"), float("inf"))}
    else:
        row = calibrate_product(EPSILON, c)
    row["noise-std-on-mean-update"] = row["z"]["rounds"] * c["clip"] / (c["q"] * USERS)
    row["q"] = c["q"]
    return row


# ------------------------------------------------------------------------------------ runs
def runs_path(tag: str) -> Path:
    return RESULTS / f"budget-allocation-runs-{tag}.json"


def load_runs(tag: str) -> dict:
    path = runs_path(tag)
    return json.loads(path.read_text()) if path.exists() else {"calibration": {}, "runs": {}}


def save_runs(tag: str, runs: dict) -> None:
    write_bytes_atomic(runs_path(tag), (json.dumps(runs, indent=1, default=float) + "\n").encode())


def ensure(cands: list[Candidate], seeds, tag: str, pop) -> dict:
    """Run every (candidate, seed) not yet in the runs file; candidates of one group share one call."""
    from simulations import population_utility as pu

    runs = load_runs(tag)
    for cand in cands:
        if cand.name not in runs["calibration"]:
            runs["calibration"][cand.name] = calibrate(cand)
            save_runs(tag, runs)
    groups: dict[tuple, list[Candidate]] = {}
    for cand in dict.fromkeys(cands):
        groups.setdefault(cand.group, []).append(cand)
    for group, members in groups.items():
        c = settings(members[0])
        for seed in seeds:
            todo = [m for m in members if str(seed) not in runs["runs"].get(m.name, {})]
            if not todo:
                continue
            arms = {m.name: tuple(runs["calibration"][m.name]["z"][k] for k in ("popularity", "cooc", "rounds"))
                    for m in todo}
            started = time.perf_counter()
            models: dict = {}
            rows = pu.run_channel_arms(pop, arms, c, seed, pu.Budget().chunk_users, 0, models_out=models)
            valid = pu.channel_ranks(models, pop, c, split="valid")
            seconds = time.perf_counter() - started
            for m in todo:
                row = rows[m.name]
                runs["runs"].setdefault(m.name, {})[str(seed)] = {
                    "test": {k: float(row[k]) for k in METRICS}, "valid": pu.figures(valid[m.name]),
                    "round-0 test": row["round-0"], "weights": row["weights"], "cohorts": row["cohorts"],
                    "update-norm-quantiles": row["update-norm-quantiles"],
                    "seconds-group": round(seconds, 1), "group-size": len(todo)}
            save_runs(tag, runs)
            log_progress(f"group rounds {group[0]} q {group[1]:g} lr {group[2]:g} seed {seed}: " + ", ".join(
                f"{m.name} valid {runs['runs'][m.name][str(seed)]['valid']['ndcg@10']:.4f}" for m in todo)
                + f" ({seconds:.0f} s)")
    return runs


def stats(values: list[float]) -> dict:
    from simulations.privacy_utility import summary_stats

    return summary_stats(values)


def summary(cand: Candidate, runs: dict, seeds) -> dict | None:
    rows = runs["runs"].get(cand.name, {})
    if not all(str(s) in rows for s in seeds):
        return None
    got = [rows[str(s)] for s in seeds]
    return {split: {k: stats([r[split][k] for r in got]) for k in METRICS} for split in ("valid", "test")} | {
        "round-0 test": {k: stats([r["round-0 test"][k] for r in got]) for k in METRICS}}


def valid_mean(cand: Candidate, runs: dict, seeds) -> float:
    return summary(cand, runs, seeds)["valid"]["ndcg@10"]["mean"]


def best(cands: list[Candidate], runs: dict, seeds) -> Candidate:
    """The eligible candidate with the highest mean validation NDCG@10 (ties: the earlier one)."""
    pool = [c for c in cands if c.eligible]
    return max(pool, key=lambda c: valid_mean(c, runs, seeds))


def verdict(cand: Candidate, runs: dict, seeds, reference: Candidate = DEFAULT) -> dict:
    """The adoption rule: mean validation gain over the reference > the reference's seed std, higher on each seed."""
    mine = [runs["runs"][cand.name][str(s)]["valid"]["ndcg@10"] for s in seeds]
    ref = [runs["runs"][reference.name][str(s)]["valid"]["ndcg@10"] for s in seeds]
    gains = [a - b for a, b in zip(mine, ref)]
    noise = float(np.std(ref, ddof=1))
    return {"candidate": cand.name, "reference": reference.name, "gain-per-seed": gains,
            "mean-gain": float(np.mean(gains)), "reference-seed-std": noise,
            "adopt": bool(cand != reference and min(cand.split) > 0 and np.mean(gains) > noise
                          and all(g > 0 for g in gains))}


# ------------------------------------------------------------------------------------ commands
def population():
    import tempfile

    import torch

    from shared.errors import PrivrecError
    from simulations import population_utility as pu

    torch.set_num_threads(1)
    pop = pu.load_population(USERS, "ml-100k", Path(tempfile.gettempdir()) / "privrec-population-utility",
                             eval_users=USERS)
    if not pop.real or pop.n != USERS:
        raise PrivrecError(f"the ML-100K store holds {pop.n} users, not {USERS}: not the real data set")
    return pop


def search(args) -> None:
    seeds = tuple(args.seeds)
    pop = population()
    stage1 = [Candidate(r, q, DEFAULT_SPLIT, 0.5) for r, q in STAGE_ROUNDS_Q]
    order = sorted(stage1, key=lambda c: c.rounds * c.fraction)  # cheap ones first: a cut run still decides
    if args.eligible_only:
        order = [c for c in order if c.eligible]
    runs = ensure(order, seeds, args.tag, pop)
    first = best(stage1, runs, seeds)
    log_progress(f"stage 1 (rounds x q): {first.name}")
    stage2 = [Candidate(first.rounds, first.fraction, split, 0.5) for split in STAGE_SPLITS]
    runs = ensure(stage2, seeds, args.tag, pop)
    second = best(stage2, runs, seeds)
    log_progress(f"stage 2 (split): {second.name}")
    stage3 = [Candidate(second.rounds, second.fraction, second.split, lr) for lr in STAGE_LRS]
    runs = ensure(stage3, seeds, args.tag, pop)
    third = best(stage3, runs, seeds)
    log_progress(f"stage 3 (server-lr): {third.name}")
    runs["stages"] = {"1": [c.name for c in stage1], "2": [c.name for c in stage2], "3": [c.name for c in stage3],
                      "chosen": [first.name, second.name, third.name], "seeds": list(seeds)}
    save_runs(args.tag, runs)
    report(args)


def confirm(args) -> None:
    cands = [from_name(n) for n in args.candidates] + ([shipped()] if args.shipped else [])
    if args.no_noise:  # twins without noise (clipping kept): is a gain less noise, or fewer optimizer steps?
        cands += [Candidate(c.rounds, c.fraction, (0.0, 0.0, 0.0), c.server_lr, fixed=True) for c in [DEFAULT, *cands]]
    cands = list(dict.fromkeys([DEFAULT, *cands]))
    ensure(cands, tuple(args.seeds), args.tag, population())
    runs = load_runs(args.tag)
    runs["confirmed"] = [c.name for c in cands]
    save_runs(args.tag, runs)
    report(args)


def report(args) -> Path:
    runs = load_runs(args.tag)
    seeds = tuple(args.seeds)
    names = [n for n in runs["runs"] if summary(from_name(n), runs, seeds)]
    table = []
    for name in names:
        cand = from_name(name)
        cal = runs["calibration"][name]
        table.append({"name": name, "rounds": cand.rounds, "fraction": cand.fraction, "q": cal["q"],
                      "split": cand.split, "server-lr": cand.server_lr, "eligible": cand.eligible,
                      "z": cal["z"], "factor": cal["factor"], "epsilon": cal["epsilon"],
                      "noise-std-on-mean-update": cal["noise-std-on-mean-update"],
                      **summary(cand, runs, seeds),
                      "verdict": verdict(cand, runs, seeds) if DEFAULT.name in names else None})
    results = {"made": time.strftime("%Y-%m-%d %H:%M:%S"), "tag": args.tag, "seeds": list(seeds),
               "epsilon-target": EPSILON, "delta": 1e-5, "candidates-looked-at": len(table),
               "stages": runs.get("stages"), "confirmed": runs.get("confirmed"), "table": table,
               "eligible-rule": f"rounds x q <= {ELIGIBLE_ROUND_RATE:g}",
               "machine": f"{os.cpu_count()} CPUs shared with other jobs, one torch thread, nice 5",
               "privacy": {"unit": "one user's whole history", "relation": "add/remove one user",
                           "accountant": "Opacus RDP over [[z_pop, 1, 1], [z_cooc, 1, 1], [z, q, rounds]] "
                                         "(shared.privacy.pipeline.pipeline_epsilon); dp-accounting RDP and PLD "
                                         "beside it",
                           "adversary": "whoever sees the released histogram, co-occurrence and scorer; not the "
                                        "server (no secure aggregation)",
                           "not accounted": f"the choice among the {len(table)} candidates on every user's "
                                            "validation item, and the product's other fixed settings"}}
    stem = RESULTS / f"budget-allocation-{args.tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    save_results(stem, results, markdown(results))
    return stem


def _cell(s: dict) -> str:
    return f"{s['mean']:.4f} +- {s['std']:.4f}"


def markdown(results: dict) -> str:
    lines = [f"# Budget allocation of the product's default at user-level epsilon {results['epsilon-target']:g} "
             f"(ML-100K, N = {USERS}, tag {results['tag']}, {results['made']})", "",
             "Every candidate: the product's channel-scorer pipeline in-process (`simulations.population_utility."
             "run_channel_arms`), its (z_pop, z_cooc, z) reference ratio times the smallest common factor whose "
             "Opacus RDP epsilon (the product's accountant) is <= 2.0 at delta 1e-5; user-level (one user's whole "
             "history, add/remove one user); adversary whoever sees the releases and the scorer, not the server. "
             f"Mean +- sample std over seeds {results['seeds']}. Chosen on validation NDCG@10 only. " +
             (f"**{results['candidates-looked-at']} candidates were looked at; that choice is not in any epsilon.** "
              if results.get("stages") else "Re-runs of configurations the search chose or compared (`confirm`: no "
              "new choice; the search's choice among its candidates is not in any epsilon). ") +
             f"Eligible as the product's default: {results['eligible-rule']} (others for information).", "",
             "| candidate | rounds | q | split ref (pop : cooc : rounds) | lr | z (pop, cooc, rounds) | eps Opacus "
             "RDP / dp-acc. PLD | noise std on mean update | valid NDCG@10 | test NDCG@10 | test HR@10 | round-0 test "
             "NDCG@10 | valid gain vs default (per seed) | adopt |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted(results["table"], key=lambda e: -e["valid"]["ndcg@10"]["mean"]):
        z, eps, v = e["z"], e["epsilon"], e["verdict"]
        gain = (f"{v['mean-gain']:+.4f} ({', '.join(f'{g:+.4f}' for g in v['gain-per-seed'])})" if v else "-")
        lines.append(f"| {e['name']}{'' if e['eligible'] else ' (not eligible)'} | {e['rounds']} | {e['q']:.4f} | "
                     f"{e['split'][0]:g} : {e['split'][1]:g} : {e['split'][2]:g} | {e['server-lr']:g} | "
                     f"{z['popularity']:.2f}, {z['cooc']:.2f}, {z['rounds']:.2f} | {eps['opacus-rdp']:.3f} / "
                     f"{eps['dp-accounting-pld']:.3f} | {e['noise-std-on-mean-update']:.4f} | "
                     f"{_cell(e['valid']['ndcg@10'])} | {_cell(e['test']['ndcg@10'])} | {_cell(e['test']['hr@10'])} | "
                     f"{_cell(e['round-0 test']['ndcg@10'])} | {gain} | {'yes' if v and v['adopt'] else 'no'} |")
    seeds = results["seeds"]
    lines += ["", "Per seed, validation / test NDCG@10" + (" (seeds 0-2 chose; later seeds are fresh)" if
                                                          len(seeds) > 3 else "") + ":", "",
              "| candidate | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for e in sorted(results["table"], key=lambda e: -e["valid"]["ndcg@10"]["mean"]):
        v, t = e["valid"]["ndcg@10"]["values"], e["test"]["ndcg@10"]["values"]
        lines.append(f"| {e['name']} | " + " | ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(v, t)) + " |")
    if results.get("stages"):
        lines += ["", "Stages (each keeps its eligible best by mean validation NDCG@10): " + " -> ".join(
            results["stages"]["chosen"]) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("search", "confirm", "report"):
        p = sub.add_parser(name)
        p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
        p.add_argument("--tag", default="search", help="runs file budget-allocation-runs-<tag>.json")
        if name == "search":
            p.add_argument("--eligible-only", action="store_true",
                           help="run only the stage-1 candidates the product can afford")
        if name == "confirm":
            p.add_argument("--candidates", nargs="*", default=[])
            p.add_argument("--shipped", action="store_true",
                           help="also the multipliers shared.config.DEFAULT_PIPELINE ships (not calibrated)")
            p.add_argument("--no-noise", action="store_true",
                           help="also every candidate's (rounds, q, lr) with all noise multipliers 0 (clipping kept; "
                                "no guarantee: for information, never adopted)")
    args = parser.parse_args(argv)
    {"search": search, "confirm": confirm, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
