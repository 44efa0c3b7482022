"""Consenting cohort + private rounds (issue 13): do private releases over the OTHER users improve the cohort's model?

    python -m simulations.consent_pipeline run --seeds 0 1 2   # one file per seed (~5-15 min each, one thread)
    python -m simulations.consent_pipeline ablation --seeds 0 1 2  # the same private part without the SASRec channel
    python -m simulations.consent_pipeline report              # table (json + md) from those files

ML-100K, one user per device, the project's chronological leave-one-out split and full-ranking metric.
Per seed:

* **pretraining only**: SASRec trained by `server.pretraining.pretrain` on the consenting cohort
  (`public-share = 0.1`: 94 of the 943 users, drawn from the seed by `consenting_devices`; every other
  run-config key at its default, so 20 epochs), centrally and without noise. Those users get no privacy
  guarantee for the histories they shared. This is the README's "pretraining on the consenting 10% only" row.
* **pretraining + private rounds**: the pretrained SASRec is frozen and becomes one channel (its next-item
  scores, standardised per query over the catalogue) of `simulations.private_pipeline`'s channel scorer,
  which is built over the **849 non-consenting users only**: DP popularity over their item sets, DP windowed
  co-occurrence among the 100 items that release ranks highest, user-level DP-SGD (Poisson q = 0.25 over the
  849, 100 steps, clip 1) of the scorer's 10 weights (popularity, content, 7 on-device channels, the SASRec
  channel). A consenting user's history enters none of these three releases; it enters only the pretrained
  SASRec (already public to the server). The noise multipliers are `simulations.privacy_utility`'s
  calibration for the target epsilon (same recipe, same accounting).

Privacy of the 849 private users: user-level, unit one user's whole history, add/remove one user, delta 1e-5,
three Gaussian releases of L2 sensitivity 1 (the third Poisson-subsampled, 100 steps) composed with
dp-accounting's PLD accountant (RDP beside it); adversary: whoever sees the released sums and scorer (not the
server: no secure aggregation in this replay). The consenting 94: none. The structural settings of the channel
recipe (top 100, window 10, noise split, lr, channel list) come from the research replay and were chosen while
looking at seed 0 (see `simulations/private_pipeline.py`); the SASRec channel was added a priori, not tuned.

Evaluation: every user's test item (train + valid as input), full ranking, history excluded; also the 849
private users and the 94 consenting users separately.
"""

from __future__ import annotations

import argparse
import glob
import json
import time

import numpy as np
import torch

from simulations.output import RESULTS, log_progress, save_results, timestamped, write_json

RUN_PREFIX = "consent-pipeline-run"
ABLATION_PREFIX = "consent-pipeline-ablation"
PUBLIC_SHARE = 0.1
TARGETS = ("8", "2")  # user-level epsilon targets of the private part, from privacy-utility-calibration.json


def consenting_users(seed: int, num_users: int) -> np.ndarray:
    """The consenting cohort exactly as the product draws it (`shared.consent.consenting_devices`)."""
    from shared import config
    from shared.consent import consenting_devices

    return consenting_devices(config.validate({"public-share": PUBLIC_SHARE, "seed": seed}), num_users)


def private_users(consenting: np.ndarray, num_users: int) -> np.ndarray:
    """Everybody but the consenting cohort: the only users whose data enter the private releases."""
    return np.setdiff1d(np.arange(num_users), consenting)


def pretrained_sasrec(seed: int):
    from server.pretraining import pretrain
    from shared import config
    from shared.data.store import open_store, prepare_store
    from shared.model import ModelConfig

    store = open_store(prepare_store("ml-100k", 1))
    run_cfg = config.validate({"public-share": PUBLIC_SHARE, "seed": seed})
    model, info = pretrain(run_cfg, store, ModelConfig.from_run_config(run_cfg, store.num_items))
    model.eval()
    return model, info


def standardised_scores(model, histories, batch: int = 256) -> np.ndarray:
    """[1, len(histories), items + 1]: the model's next-item scores per query, standardised over items 1..n
    (mean 0, std 1; the padding column 0), so that the channel's scale is comparable to the others."""
    from shared.metrics import left_pad

    out = []
    with torch.no_grad():
        for start in range(0, len(histories), batch):
            seqs = torch.from_numpy(left_pad(histories[start:start + batch], model.cfg.max_len))
            s = model.predict_next(seqs).double().numpy()
            s[:, 0] = np.nan
            s = (s - np.nanmean(s, axis=1, keepdims=True)) / (np.nanstd(s, axis=1, keepdims=True) + 1e-12)
            s[:, 0] = 0.0
            out.append(s.astype(np.float32))
    return np.concatenate(out)[None]


def split_metrics(data, scores: np.ndarray, consenting: np.ndarray) -> dict:
    from simulations.private_pipeline import metrics

    ranks = data.ranks(scores, "test")
    cohort = np.zeros(len(ranks), dtype=bool)
    cohort[consenting] = True
    return {**metrics(ranks), "private users": metrics(ranks[~cohort]), "consenting users": metrics(ranks[cohort])}


def run_seed(seed: int, data, sums: dict, targets) -> dict:
    from simulations import private_pipeline as pp

    calibration = json.loads((RESULTS / "privacy-utility-calibration.json").read_text())
    z_of = {f"{row['target']:g}": row["z"] for row in calibration["targets"]}
    started = time.perf_counter()
    model, info = pretrained_sasrec(seed)
    consenting = consenting_users(seed, data.num_users)
    others = private_users(consenting, data.num_users)
    log_progress(f"seed {seed}: pretrained on {info['consenting-devices']} consenting users "
                 f"({time.perf_counter() - started:.0f} s)")
    test_scores = standardised_scores(model, data.split["test"][0])[0]
    out = {"seed": seed, "pretraining": info, "consenting": consenting.tolist(),
           "pretraining only": split_metrics(data, test_scores, consenting), "arms": {}}
    log_progress(f"seed {seed}: pretraining only NDCG@10 {out['pretraining only']['ndcg@10']:.4f}")
    cache = {"valid": standardised_scores(model, data.split["valid"][0]), "test": test_scores[None]}

    def sasrec_channel(histories, split):
        return cache[split] if split is not None else standardised_scores(model, histories)

    for target in targets:
        z = dict(z_of[target])
        row = pp.run_channel_arm(z, data, sums, seed, users=others, extra=sasrec_channel, keep_scorer=True)
        scorer = row.pop("_scorer")
        row["split metrics"] = split_metrics(data, scorer("test"), consenting)
        row["z"] = z
        out["arms"][target] = row
        log_progress(f"seed {seed} eps {target}: NDCG@10 {row['ndcg@10']:.4f} (eps {row['epsilon']}) "
                     f"scales {row['learned']}")
    out["seconds"] = time.perf_counter() - started
    return out


def cmd_ablation(args) -> None:
    """The private part alone (no SASRec channel), over the same 849 users at target epsilon 8: how much of the
    gain is the pretrained model's."""
    from simulations import private_pipeline as pp

    torch.set_num_threads(1)
    calibration = json.loads((RESULTS / "privacy-utility-calibration.json").read_text())
    z = {f"{row['target']:g}": row["z"] for row in calibration["targets"]}["8"]
    data = pp.Data()
    sums = {"public": pp.public_item_features(data)}
    sums["public"]["genres"] = pp.genre_matrix()
    for seed in args.seeds:
        path = RESULTS / f"{ABLATION_PREFIX}-seed{seed}.json"
        if path.exists():
            continue
        consenting = consenting_users(seed, data.num_users)
        row = pp.run_channel_arm(dict(z), data, sums, seed, users=private_users(consenting, data.num_users),
                                 keep_scorer=True)
        row["split metrics"] = split_metrics(data, row.pop("_scorer")("test"), consenting)
        row.update(seed=seed, z=z)
        write_json(path, row)
        log_progress(f"ablation seed {seed}: NDCG@10 {row['ndcg@10']:.4f}")


def cmd_run(args) -> None:
    from simulations import private_pipeline as pp

    torch.set_num_threads(1)
    data = pp.Data()
    sums = {"public": pp.public_item_features(data)}
    sums["public"]["genres"] = pp.genre_matrix()
    for seed in args.seeds:
        path = RESULTS / f"{RUN_PREFIX}-seed{seed}.json"
        if path.exists():
            continue
        row = run_seed(seed, data, sums, args.epsilons)
        write_json(path, row)
        log_progress(f"written {path}")


def _ms(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def cmd_report(_args) -> None:
    runs = [json.loads(open(p).read()) for p in sorted(glob.glob(str(RESULTS / f"{RUN_PREFIX}-seed*.json")))]
    seeds = [r["seed"] for r in runs]
    table = [{"arm": "pretraining only (consenting 94, no private round)", "epsilon": "-",
              **{k: _ms([r["pretraining only"][k] for r in runs]) for k in ("ndcg@10", "hr@10")},
              "private users ndcg@10": _ms([r["pretraining only"]["private users"]["ndcg@10"] for r in runs])}]
    for target in TARGETS:
        rows = [r["arms"][target] for r in runs if target in r["arms"]]
        if not rows:
            continue
        table.append({"arm": f"pretraining + private releases over the 849 (target epsilon {target})",
                      "epsilon": rows[0]["epsilon"], "z": rows[0]["z"],
                      **{k: _ms([x["split metrics"][k] for x in rows]) for k in ("ndcg@10", "hr@10")},
                      "private users ndcg@10": _ms([x["split metrics"]["private users"]["ndcg@10"] for x in rows]),
                      "learned": [x["learned"] for x in rows]})
    ablation = [json.loads(open(p).read()) for p in sorted(glob.glob(str(RESULTS / f"{ABLATION_PREFIX}-seed*.json")))]
    if ablation:
        table.append({"arm": "ablation: the private part alone over the 849, no SASRec channel (target epsilon 8)",
                      "epsilon": ablation[0]["epsilon"], "z": ablation[0]["z"], "seeds": [x["seed"] for x in ablation],
                      **{k: _ms([x["split metrics"][k] for x in ablation]) for k in ("ndcg@10", "hr@10")},
                      "private users ndcg@10": _ms([x["split metrics"]["private users"]["ndcg@10"] for x in ablation]),
                      "learned": [x["learned"] for x in ablation]})
    base = table[0]["ndcg@10"]["mean"]
    for row in table[1:]:
        row["improvement over pretraining only"] = row["ndcg@10"]["mean"] / base - 1
    results = {"seeds": seeds, "delta": 1e-5, "table": table, "runs": runs}
    save_results(timestamped("consent-pipeline"), results, markdown(results))


def markdown(results: dict) -> str:
    lines = [f"# consenting cohort + private releases over the other users, ML-100K (seeds {results['seeds']})", "",
             "Test NDCG@10 / HR@10 of all 943 users (and of the 849 non-consenting ones), full ranking, history "
             "excluded, mean +- std over seeds. epsilon: the 849 non-consenting users', user-level (one user's whole "
             "history, add/remove), delta 1e-5, dp-accounting PLD (RDP); the 94 consenting users have no guarantee.",
             "", "| arm | epsilon PLD (RDP) of the 849 | NDCG@10 | HR@10 | NDCG@10 of the 849 | vs pretraining only |",
             "|---|---|---|---|---|---|"]
    for row in results["table"]:
        eps = row["epsilon"]
        eps_text = "-" if eps == "-" else f"{eps['pld']:.2f} ({eps['rdp']:.2f})"
        gain = f"{row['improvement over pretraining only']:+.1%}" if "improvement over pretraining only" in row else "-"
        lines.append(f"| {row['arm']} | {eps_text} | {row['ndcg@10']['mean']:.4f} +- {row['ndcg@10']['std']:.4f} | "
                     f"{row['hr@10']['mean']:.4f} +- {row['hr@10']['std']:.4f} | "
                     f"{row['private users ndcg@10']['mean']:.4f} +- {row['private users ndcg@10']['std']:.4f} | "
                     f"{gain} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--epsilons", nargs="+", default=list(TARGETS), choices=TARGETS)
    ablation = sub.add_parser("ablation")
    ablation.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sub.add_parser("report")
    args = parser.parse_args()
    {"run": cmd_run, "ablation": cmd_ablation, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
