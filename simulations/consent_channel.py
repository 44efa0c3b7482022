"""Issue 13, consenting cohort: does the product's SASRec channel help, and should the consenting devices train?

    python -m simulations.consent_channel run --seeds 0 1 2      # about 2 min a seed; finished seeds are skipped
    python -m simulations.consent_channel report --seeds 0 1 2

`privrec simulate --set public-share=0.1` (`simulations/consent_product.py`) meets issue 13's consenting-cohort
target, but its Flower runs draw their noise from OS entropy, so they cannot say whether the SASRec channel itself
helps against the same pipeline without it. Here, in-process with the product's code
(`population_utility.run_channel_arms`: the product's releases, `server.scorer.initial_scorer`,
`shared.scorer.sasrec_channel`, per-user clipping, noise, FedAdam; ML-100K, N = 943, the product's default
multipliers (4.6, 2.76, 3.22), user-level epsilon 2 at delta 1e-5 for every non-consenting user), three arms per
seed share the releases, cohorts and standard normal draws (paired):

* `none`: the product's default, no SASRec channel (what runs with public-share = 0);
* `sasrec`: the SASRec the product pretrains on the consenting 10% (`server.pretraining.pretrain`, the run seed's
  cohort) as a channel, every sampled device training: the product as built;
* `sasrec, consenting silent`: the same, but sampled consenting devices send no update (the research replay's
  design, `simulations/consent_pipeline.py`: its private part used only the other users). Their SASRec scores are
  fitted to their own training items, which may overstate the channel to the rounds.

Decision rule, written here before any run of this module (validation only, seeds 0 1 2, mean of the paired
differences of validation NDCG@10):
1. if `sasrec, consenting silent` beats `sasrec`, the product's consenting devices stop training in the rounds
   (they still take part in the releases); otherwise the product stays as built;
2. whatever 1 gives, the README states the SASRec channel's effect against `none` on validation and test, and if
   the adopted SASRec arm is below `none` on validation it says plainly that the consenting cohort does not help
   this pipeline.
Test figures are reported beside, never used to decide.

Files: per-seed `results/consent-channel-seed<S>.json`, the table `consent-channel-<time>.{json,md}`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from simulations.output import (
    load_seed_files,
    log_progress,
    run_missing_seeds,
    save_results,
    seeded_commands,
    timestamped,
)
from simulations.privacy_utility import stats_cell, summary_stats

PREFIX = "consent-channel-seed"
ARMS = ("none", "sasrec", "sasrec, consenting silent")
USERS = 943


def run_seed(seed: int) -> dict:
    from simulations import population_utility as pu
    from simulations.consent_pipeline import consenting_users, pretrained_sasrec
    from simulations.noise_robustness import SHIPPED, shipped_z

    started = time.perf_counter()
    pop = pu.load_population(USERS, "ml-100k", Path(tempfile.gettempdir()) / "privrec-population-utility",
                             eval_users=USERS)
    sasrec, info = pretrained_sasrec(seed)
    consenting = consenting_users(seed, USERS)
    z = shipped_z()
    multipliers = tuple(z[k] for k in SHIPPED)
    rows = pu.run_channel_arms(pop, {arm: multipliers for arm in ARMS}, pu.channel_settings(), seed,
                               pu.Budget().chunk_users, 0, sasrec={"sasrec": sasrec, ARMS[2]: sasrec},
                               not_training={ARMS[2]: consenting.tolist()})
    out = {"seed": seed, "multipliers": multipliers, "consenting": consenting.tolist(), "pretraining": info,
           "seconds": round(time.perf_counter() - started, 1), "arms": {}}
    for arm in ARMS:
        row = rows[arm]
        out["arms"][arm] = {"test-ndcg@10": float(row["ndcg@10"]), "test-hr@10": float(row["hr@10"]),
                            "valid-ndcg@10": float(row["valid-ndcg@10"]), "weights": row["weights"],
                            "cohorts": row["cohorts"]}
    log_progress(f"seed {seed}: " + ", ".join(f"{a} valid {out['arms'][a]['valid-ndcg@10']:.4f} test "
                                              f"{out['arms'][a]['test-ndcg@10']:.4f}" for a in ARMS))
    return out


def cmd_run(args) -> None:
    run_missing_seeds(PREFIX, args.seeds, run_seed)


def summarize(rows: list[dict]) -> dict:
    table = {}
    for arm in ARMS:
        table[arm] = {k: summary_stats([r["arms"][arm][k] for r in rows])
                      for k in ("valid-ndcg@10", "test-ndcg@10", "test-hr@10")}
        if arm != "none":
            for k in ("valid-ndcg@10", "test-ndcg@10"):
                table[arm][f"{k} - none"] = summary_stats([r["arms"][arm][k] - r["arms"]["none"][k] for r in rows])
    silent_gain = summary_stats([r["arms"][ARMS[2]]["valid-ndcg@10"] - r["arms"]["sasrec"]["valid-ndcg@10"]
                                 for r in rows])
    adopted = ARMS[2] if silent_gain["mean"] > 0 else "sasrec"
    return {"seeds": [r["seed"] for r in rows], "arms": table, "silent - sasrec (validation)": silent_gain,
            "adopted": adopted,
            "sasrec helps on validation": table[adopted]["valid-ndcg@10 - none"]["mean"] > 0,
            "sasrec scale": {arm: [r["arms"][arm]["weights"]["scales"][-1] for r in rows] for arm in ARMS[1:]}}


def cmd_report(args) -> None:
    rows = load_seed_files(PREFIX, args.seeds, "simulations.consent_channel")
    results = summarize(rows)
    save_results(timestamped("consent-channel"), results, markdown(results))


def markdown(results: dict) -> str:
    lines = [f"# The consenting cohort's SASRec channel, in-process, paired (seeds "
             f"{' '.join(map(str, results['seeds']))})", "",
             "| arm | validation NDCG@10 | paired minus `none` | test NDCG@10 | paired minus `none` | test HR@10 |",
             "|---|---|---|---|---|---|"]
    for arm, t in results["arms"].items():
        dv = stats_cell(t["valid-ndcg@10 - none"]) if arm != "none" else "-"
        dt = stats_cell(t["test-ndcg@10 - none"]) if arm != "none" else "-"
        lines.append(f"| `{arm}` | {stats_cell(t['valid-ndcg@10'])} | {dv} | {stats_cell(t['test-ndcg@10'])} | "
                     f"{dt} | {t['test-hr@10']['mean']:.4f} |")
    gain = results["silent - sasrec (validation)"]
    lines += ["", f"`sasrec, consenting silent` minus `sasrec` on validation: {stats_cell(gain)}; adopted by the "
              f"registered rule: `{results['adopted']}`. The adopted SASRec arm "
              f"{'raises' if results['sasrec helps on validation'] else 'does not raise'} validation over `none`.",
              "", "Learned scale of the SASRec channel per seed: " +
              "; ".join(f"`{a}` {', '.join(f'{x:.2f}' for x in v)}" for a, v in results["sasrec scale"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    seeded_commands(__doc__, {"run": cmd_run, "report": cmd_report}, seeds=(0, 1, 2), argv=argv)


if __name__ == "__main__":
    main()
