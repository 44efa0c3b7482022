"""Issue 13, lever "personalization that never leaves the device": each device refits the released scorer's 9
weights to its own history before ranking. No privacy spend: the fit reads only the device's own history and what
was already released (popularity, co-occurrence, the global scorer); nothing it computes leaves the device.

    python -m simulations.personalization run [--seeds 0 1 2]   # ~3 min a seed (both arms, every rule)
    python -m simulations.personalization report

In-process with the product's code (`population_utility.run_channel_arms`, ML-100K, N = 943), the product's
multipliers at factor 1 and x 1.397 (the accounted selection's factor), seeds 0 1 2. Per device u, over the
examples of its last TARGETS training items (history masked, its own co-occurrence contribution removed, as in
training), the personal weights minimise

    mean softmax loss over the examples + lam / 2 x || w_u - w_global ||^2      (L-BFGS, STEPS iterations)

Rules: `global` (no personalization: the product), fixed lam in LAMBDAS, and `local-cv`: the device itself picks
lam from {inf} + LAMBDAS by fitting on all but its last HOLDOUT training items and scoring the held-out ones (mean
softmax loss), then refits on all TARGETS with that lam. Each device's choice uses its own history only, so it is
free; a single lam for every device chosen on validation would be a look at every user's data.

Decision on VALIDATION only (test reported): a rule would become a product option only if it raised mean validation
NDCG@10 over `global` at both factors (paired, same models). This lever was explored on these seeds before the
script existed (the grid and the local-cv design were fixed after a first look at seed 0's lam in {10, 3, 1, 0.3}
with the last 10 training items); the figures here are that exploration, made repeatable, not a fresh test.

Files: `simulations/results/personalization-seed<s>.json` and `personalization-<time>.{json,md}`.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch

from simulations.output import RESULTS, log_progress, run_missing_seeds, save_results, seeded_commands, timestamped

SEEDS = (0, 1, 2)
FACTOR = 1.397
LAMBDAS = (10.0, 3.0, 1.0, 0.3, 0.1)
TARGETS, HOLDOUT, STEPS, CHUNK = 20, 5, 30, 64
RUN_PREFIX = "personalization-seed"


# ------------------------------------------------------------------------------------ the device's fit
def personal_weights(w_global: torch.Tensor, features: torch.Tensor, mask: torch.Tensor, nexts: torch.Tensor,
                     owner: torch.Tensor, lam: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """Per-device weights [devices, 9] minimising each device's mean softmax loss over its examples plus
    lam_u / 2 ||w_u - w_global||^2. `features` [examples, 9, items + 1] (popularity, profile cosine, the channels),
    `owner` the device of each example, `lam` [devices] (inf: keep the global weights). The devices' objectives are
    separable, so the joint minimiser is every device's own; the `steps` joint L-BFGS iterations approximate it
    (a device fitting alone would run its own, `tests/test_personalization.py` checks they agree to 1e-3)."""
    devices = len(lam)
    weights = w_global.repeat(devices, 1).clone()
    free = torch.isfinite(lam)
    if len(nexts) == 0 or not bool(free.any()):
        return weights
    weights.requires_grad_(True)
    penalty = torch.where(free, lam, torch.zeros_like(lam))
    per_device = torch.bincount(owner, minlength=devices).clamp(min=1).float()
    opt = torch.optim.LBFGS([weights], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = example_losses(weights, features, mask, nexts, owner)
        total = (loss / per_device[owner]).sum() + 0.5 * (penalty[:, None] * (weights - w_global) ** 2).sum()
        total.backward()
        return total

    opt.step(closure)
    weights = weights.detach()
    weights[~free] = w_global
    return weights


def example_losses(weights, features, mask, nexts, owner) -> torch.Tensor:
    scores = torch.einsum("bk,bki->bi", weights[owner], features) + mask
    return torch.nn.functional.cross_entropy(scores[:, 1:], nexts - 1, reduction="none")


def local_choice(w_global, fit_part, held_out, devices: int, grid=(math.inf,) + LAMBDAS) -> torch.Tensor:
    """Each device's lam from `grid`: fit on `fit_part`, then the lowest summed loss on its `held_out` examples
    (their number does not depend on lam; ties: the earlier entry, so the global weights when nothing is held out)."""
    losses = []
    for lam in grid:
        w = personal_weights(w_global, *fit_part, torch.full((devices,), lam))
        with torch.no_grad():
            features, mask, nexts, owner = held_out
            per = torch.zeros(devices).index_add_(0, owner, example_losses(w, features, mask, nexts, owner))
        losses.append(per)
    best = torch.stack(losses).argmin(0)
    return torch.tensor([grid[i] for i in best])


# ------------------------------------------------------------------------------------ in-process study
def _examples(train, members, newest: int, oldest: int):
    """(histories, next items, owner) of the training positions len - oldest .. len - newest - 1 of each member."""
    hist, nexts, owner = [], [], []
    for i, u in enumerate(members):
        seq = np.asarray(train[u]).reshape(-1)
        for pos in range(max(1, len(seq) - oldest), max(1, len(seq) - newest)):
            hist.append(seq[:pos])
            nexts.append(seq[pos])
            owner.append(i)
    return hist, torch.tensor(nexts, dtype=torch.long), torch.tensor(owner, dtype=torch.long)


def _features(pop, model, c, tables, histories, owns=None, owner=None):
    """[B, 9, items + 1] in `shared.scorer.ChannelScorer` weight order (popularity, content, channels) + mask."""
    from shared.scorer import cooc_matrix
    from simulations import population_utility as pu

    profile, channels, mask = pu.base_channels(pop.catalogue, histories, c, tables)
    items, cooc = cooc_matrix(model)
    channels[:, 0] = pu.cooc_channel(histories, items, cooc, pop.catalogue.num_items + 1, owns, owner)
    cosine = profile @ pop.catalogue.text.T
    pop_row = model.popularity.expand(len(histories), -1).unsqueeze(1)
    return torch.cat([pop_row, cosine.unsqueeze(1), channels], 1), mask


def _part(pop, model, c, tables, members, owns, newest: int, oldest: int):
    """(features, mask, next items, owner) of the members' training positions len - oldest .. len - newest - 1,
    each device's own co-occurrence contribution removed (as in training)."""
    histories, nexts, owner = _examples(pop.users.train, members, newest, oldest)
    features, mask = _features(pop, model, c, tables, histories, owns, owner.numpy())
    return features, mask, nexts, owner


def global_vector(model) -> torch.Tensor:
    return torch.cat([model.scales[:1], model.content, model.scales[1:]]).detach()


def evaluate_rules(pop, model, c) -> dict:
    """Validation and test NDCG@10 / HR@10 of every rule for one released scorer, and the local choices."""
    from shared.analytics import COOC_GAP_DECAY, own_cooc_matrix
    from shared.metrics import eval_inputs, hit_at_k, ndcg_at_k, target_ranks
    from shared.scorer import cooc_matrix
    from simulations import population_utility as pu

    tables = pu.channel_tables(pop.catalogue)
    train, items = pop.users.train, cooc_matrix(model)[0]
    w_global = global_vector(model)
    rules = ["global"] + [f"lam {lam:g}" for lam in LAMBDAS] + ["local-cv"]
    ranks = {r: {"valid": [], "test": []} for r in rules}
    chosen = []
    for start in range(0, pop.n, CHUNK):
        members = list(range(start, min(pop.n, start + CHUNK)))
        m = len(members)
        owns = [own_cooc_matrix(train[u], items, c["cooc-window"], COOC_GAP_DECAY) for u in members]
        device = (pop, model, c, tables, members, owns)
        lam_star = local_choice(w_global, _part(*device, HOLDOUT, HOLDOUT + TARGETS), _part(*device, 0, HOLDOUT), m)
        chosen += lam_star.tolist()
        everything = _part(*device, 0, TARGETS)
        fits = {"global": w_global.repeat(m, 1), "local-cv": personal_weights(w_global, *everything, lam_star)}
        for lam in LAMBDAS:
            fits[f"lam {lam:g}"] = personal_weights(w_global, *everything, torch.full((m,), lam))
        for split in ("valid", "test"):
            inputs, targets, exclude = eval_inputs([train[u] for u in members], pop.users.valid[members],
                                                   pop.users.test[members], split)
            features, _ = _features(pop, model, c, tables, inputs)
            for rule, w in fits.items():
                with torch.no_grad():
                    scores = torch.einsum("bk,bki->bi", w, features)
                ranks[rule][split].append(target_ranks(scores, torch.from_numpy(np.asarray(targets)), exclude))
    out = {}
    baseline = {split: ndcg_at_k(np.concatenate(parts), 10) for split, parts in ranks["global"].items()}
    for rule, by_split in ranks.items():
        out[rule] = {}
        for split, parts in by_split.items():
            r = np.concatenate(parts)
            ndcg = ndcg_at_k(r, 10)
            paired = ndcg - baseline[split]
            out[rule][split] = {"ndcg@10": float(ndcg.mean()), "hr@10": float(hit_at_k(r, 10).mean()),
                                # the per-user paired difference's standard error: how far items alone move it
                                "paired se vs global": float(paired.std(ddof=1) / np.sqrt(len(paired)))}
    out["local-cv choices"] = {f"{g:g}": int(sum(x == g for x in chosen)) for g in (math.inf,) + LAMBDAS}
    return out


def run_seed(pop, seed: int) -> dict:
    from simulations import population_utility as pu

    c = pu.channel_settings()
    z = (c["popularity-z"], c["cooc-z"], c["z"])
    arms = {"x1": z, f"x{FACTOR}": tuple(FACTOR * v for v in z)}
    models: dict = {}
    started = time.perf_counter()
    pu.run_channel_arms(pop, arms, c, seed, pu.Budget().chunk_users, 0, models_out=models)
    out = {"seed": seed, "multipliers": arms, "settings": {"targets": TARGETS, "holdout": HOLDOUT, "steps": STEPS,
                                                           "lambdas": LAMBDAS}}
    for label, model in models.items():
        out[label] = evaluate_rules(pop, model, c)
        log_progress(f"seed {seed} {label}: " + ", ".join(
            f"{r} {v['valid']['ndcg@10']:.4f}/{v['test']['ndcg@10']:.4f}" for r, v in out[label].items()
            if r != "local-cv choices") + f" ({time.perf_counter() - started:.0f} s)")
    return out


def cmd_run(args) -> None:
    from simulations import budget_allocation as ba

    pop = ba.population()
    run_missing_seeds(RUN_PREFIX, args.seeds, lambda seed: run_seed(pop, seed))


def cmd_report(args) -> None:
    from simulations.privacy_utility import summary_stats

    per_seed = [json.loads(p.read_text()) for p in (RESULTS / f"{RUN_PREFIX}{s}.json" for s in args.seeds)
                if p.exists()]
    if not per_seed:
        raise SystemExit("no per-seed file yet: run `python -m simulations.personalization run` first")
    arms = [k for k in per_seed[0] if k.startswith("x")]
    rules = [k for k in per_seed[0][arms[0]] if k != "local-cv choices"]
    table = {}
    lines = [f"# Personalization of the released scorer on the device (seeds {[r['seed'] for r in per_seed]}, "
             f"{time.strftime('%Y-%m-%d %H:%M')})", "",
             "No privacy spend (own history and released things only). NDCG@10, ML-100K, full ranking; mean +- std "
             "over seeds; delta = paired mean difference against `global` (paired se: the standard error of one "
             "seed's per-user paired difference, mean over seeds; the seeds share the users' items, so it does not "
             "shrink with more seeds). Decision on validation only.", "",
             "| arm | rule | validation | delta validation (paired se) | test | delta test (paired se) | test HR@10 |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        for rule in rules:
            stats = {}
            for split in ("valid", "test"):
                values = [r[arm][rule][split]["ndcg@10"] for r in per_seed]
                base = [r[arm]["global"][split]["ndcg@10"] for r in per_seed]
                stats[split] = summary_stats(values)
                stats[f"delta {split}"] = summary_stats([v - b for v, b in zip(values, base)])
            stats["test hr@10"] = summary_stats([r[arm][rule]["test"]["hr@10"] for r in per_seed])
            for split in ("valid", "test"):
                stats[f"paired se {split}"] = float(np.mean([r[arm][rule][split]["paired se vs global"]
                                                             for r in per_seed]))
            table[f"{arm} {rule}"] = stats
            cells = [f"{stats[s]['mean']:.4f} +- {stats[s]['std']:.4f} | {stats['delta ' + s]['mean']:+.4f} "
                     f"({stats['paired se ' + s]:.4f})" for s in ("valid", "test")]
            lines.append(f"| {arm} | {rule} | {cells[0]} | {cells[1]} | {stats['test hr@10']['mean']:.4f} |")
    adopted = [rule for rule in rules[1:] if all(table[f"{a} {rule}"]["delta valid"]["mean"] > 0 for a in arms)]
    lines += ["", "Rules raising validation at both factors: " + (", ".join(adopted) if adopted else "none") + "."]
    save_results(timestamped("personalization"), {"seeds": [r["seed"] for r in per_seed], "table": table,
                                                   "raise validation at both factors": adopted,
                                                   "per-seed": per_seed}, "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    seeded_commands(__doc__, {"run": cmd_run, "report": cmd_report}, SEEDS, argv)


if __name__ == "__main__":
    main()
