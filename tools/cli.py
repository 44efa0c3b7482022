"""The `privrec` command line.

    privrec data fetch ml-100k [--from PATH]
    privrec data synth --like ml-100k|PATH --users N --seed S --out DIR
    privrec simulate [--config FILE] [--dataset ml-100k|PATH] [--rounds N] [--devices-per-round K]
                     [--noise-multiplier Z] [--seed S] [--no-dp] [--set KEY=VALUE ...] [--run-dir DIR]
                     [--ray-address HOST:PORT]
    privrec baseline centralized|popularity [--config FILE] [--dataset ...] [--epochs N] [--out FILE]
    privrec baseline popularity|content --epsilon E [--delta D] [--seed S] [--dataset ...] [--out FILE]
    privrec recommend --model RUN_DIR (--history "ITEM ITEM ..." | --input FILE.jsonl) [-k 10]
                      [--new-items FILE.jsonl]
    privrec report RUN_DIR [--out DIR]
    privrec calibrate --target-epsilon E --sample-rate Q --rounds R [--steps-per-round S]
    privrec audit [--config FILE] [--set KEY=VALUE ...] [--canaries M] [--rounds R] [--out FILE]

User mistakes (PrivrecError) print one line and exit with status 2; no traceback.
`privrec report` exits with status 3 when it wrote the report but its cross-check flagged something.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.config import ACCOUNTANTS, SCHEMA
from shared.errors import PrivrecError
from tools.options import EPSILON_HELP, apply_epsilon, config_from_args, run_config_from_args
from tools.progress import Progress


def _say_dataset_notes(store) -> None:
    """What preparing the data left out or kept as is (users too short to split, duplicated rows)."""
    from shared.data.split import dataset_notes

    for note in dataset_notes(store.meta):
        print(f"privrec: note: {note}", flush=True)


# ---------------------------------------------------------------------------- data
def cmd_data_fetch(args: argparse.Namespace) -> int:
    from shared.data.fetch import fetch_ml100k

    if args.dataset != "ml-100k":
        raise PrivrecError(f"unknown dataset {args.dataset!r}: `data fetch` knows ml-100k "
                           "(bring other data as a file or folder path to --dataset)")
    path = fetch_ml100k(local_path=args.source)
    source = json.loads((path / "SOURCE.json").read_text())
    print(f"ml-100k ready in {path} (source: {source.get('source')})")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from shared.data.fetch import fetch_ml100k
    from shared.data.formats import load_interactions
    from shared.data.synth import write_synthetic

    source = fetch_ml100k() if args.like == "ml-100k" else Path(args.like).expanduser()
    summary = write_synthetic(load_interactions(source), args.out, args.users, args.seed, like=args.like)
    print(f"{summary['users']:,} synthetic users ({summary['interactions']:,} interactions) like {args.like} "
          f"written to {args.out}")
    return 0


# ---------------------------------------------------------------------------- simulate
def cmd_simulate(args: argparse.Namespace) -> int:
    from shared.config import SCORER_MODELS, clamp_to_population, default_run_name
    from shared.data.store import open_store, prepare_store
    from shared.privacy.statement import one_line
    from tools.launch import run_simulation

    # Without a `model` of its own, a run is the private pipeline (issue 13): DP popularity and co-occurrence
    # releases + user-level DP-FedAvg of the channel scorer; `--set model=sasrec` gives the sequence model.
    cfg = run_config_from_args(args)
    ray_address = _ray_address(args.ray_address)
    store_dir = Path(cfg["data-store"]) if cfg["data-store"] else prepare_store(cfg["dataset"],
                                                                                  cfg["users-per-device"])
    store = open_store(store_dir)
    cfg["data-store"] = str(store_dir.resolve())
    _say_dataset_notes(store)
    clamped = clamp_to_population(cfg, store.num_devices)
    if clamped:
        print(f"privrec: note: {clamped}", flush=True)
    apply_epsilon(cfg, args.epsilon, store.num_devices)
    if cfg["model"] in SCORER_MODELS:  # the whole run's budget, before anything starts
        from shared.privacy.pipeline import check_pipeline_budget, planned_sample_rate

        check_pipeline_budget(cfg, planned_sample_rate(cfg, store.num_devices))
    if cfg["item-representation"] != "id" or cfg["model"] in SCORER_MODELS:  # encode once, with a progress bar
        from shared.text.features import features_for

        features_for(cfg, store_dir)
    run_root = Path(cfg["run-dir"]).expanduser().resolve()
    cfg["run-name"] = cfg["run-name"] or default_run_name()
    cfg["run-dir"] = str(run_root)
    run_path = run_root / cfg["run-name"]
    if (run_path / "summary.json").exists():
        raise PrivrecError(f"{run_path} already holds a completed run; pass another --run-name")
    print(f"privrec: {store.num_devices} devices ({store.num_users} users, {store.num_items} items), "
          f"{cfg['num-rounds']} rounds, run directory {run_path}", flush=True)
    previous = _previous_run(run_path)
    if previous:
        print(previous, flush=True)
    progress = Progress(run_path, cfg["num-rounds"])
    try:
        with progress:
            result = run_simulation(cfg, store.num_devices, run_path, on_poll=progress.poll,
                                    ray_address=ray_address)
    except KeyboardInterrupt:
        # run_simulation stopped every process of the run and marked it `interrupted`.
        raise PrivrecInterrupted(f"interrupted; every process of the run is stopped and {run_path / 'status.json'} "
                                 "says so; run the same command again to resume from the last checkpoint") from None
    return _report_simulation(run_path, result, one_line)


def _reference_baselines(run_path: Path) -> None:
    """The private baselines at the run's own user-level epsilon, printed beside its figures (issue 13: the
    pipeline must beat both). Simulation only: their release is computed centrally from the store, a
    reference, not a release of the run nor part of its guarantee."""
    import importlib

    from shared.atomic import write_json_atomic

    cfg = json.loads((run_path / "config.json").read_text())
    privacy = json.loads((run_path / "privacy.json").read_text())
    epsilon, delta = float(privacy["epsilon"]), float(privacy["delta"])
    driver = importlib.import_module("simulations.private_baselines")  # tools reach simulations by path only
    figures = driver.reference_baselines(cfg["data-store"], epsilon=epsilon, delta=delta, seed=cfg["seed"])
    for kind, result in figures.items():
        test = result["test"]
        print(f"reference: baseline {kind} at the same user-level epsilon {epsilon:.2f} (delta {delta:g}): "
              f"NDCG@10 {test['ndcg@10']:.4f}  HR@10 {test['hr@10']:.4f}  [test items; computed centrally in "
              "simulation, not part of the run's guarantee]")
    write_json_atomic(run_path / "baselines.json", figures)
    pretraining = run_path / "pretraining.json"
    reference = json.loads(pretraining.read_text()).get("pretraining-only") if pretraining.exists() else None
    if reference:  # a consenting cohort: what its pretrained SASRec gives alone, before any private release
        print(f"reference: pretraining only (the consenting cohort's SASRec alone, no private release): NDCG@10 "
              f"{reference['test-ndcg@10']:.4f}  HR@10 {reference['test-hr@10']:.4f}  [test items; computed "
              "centrally in simulation]")


def _ray_address(value: str | None) -> str | None:
    """--ray-address HOST:PORT of a running Ray cluster's head (docs/multi-node.md); checked here so a
    typo is one line, not a Ray traceback from inside the simulation."""
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PrivrecError(f"--ray-address {value!r}: expected HOST:PORT of a Ray head, e.g. 10.0.0.5:6379")
    return value


class PrivrecInterrupted(KeyboardInterrupt):
    """A stopped run, with the line that tells the user what state it left behind."""


def _previous_run(run_path: Path) -> str | None:
    """One line about an earlier run in this directory that did not complete (crashed, or stopped)."""
    from shared.resume import checkpoint_state
    from shared.run_owner import liveness

    try:
        status = json.loads((run_path / "status.json").read_text())
    except (OSError, ValueError):
        return None
    state = status.get("state") if isinstance(status, dict) else None
    if state not in ("running", "interrupted", "failed", "stopped"):
        return None
    if state == "running":
        verdict, why = liveness(run_path)
        if verdict == "live":
            return None  # run_simulation refuses it with the owner's details
        state_line = why
    else:
        why = " ".join(str(status.get("reason") or status.get("error") or "").split())  # one line
        state_line = f"the previous run ended {state}" + (f" ({why})" if why else "")
    checkpoint = checkpoint_state(run_path)
    after = f"resuming after round {checkpoint['round']}" if checkpoint else "no checkpoint: starting at round 1"
    return f"privrec: {run_path}: {state_line}; {after}"


def _report_simulation(run_path: Path, result, one_line) -> int:
    summary_path = run_path / "summary.json"
    status_path = run_path / "status.json"
    status = json.loads(status_path.read_text()).get("state") if status_path.exists() else "unknown"
    if not summary_path.exists() or status != "completed" or (result.flower_status or "").endswith("failed"):
        detail = json.loads(status_path.read_text()).get("error", "") if status_path.exists() else ""
        if status == "failed" and detail:  # the ServerApp said why (e.g. a round whose devices failed)
            raise PrivrecError(f"run failed: {detail} -- see {run_path / 'flower.log'}")
        raise PrivrecError(f"simulation did not complete (ServerApp status: {status}; Flower: "
                           f"{result.flower_status}) {detail} -- see {run_path / 'flower.log'}")
    summary = json.loads(summary_path.read_text())
    fed = summary["federated-evaluation"]
    if fed.get("test-ndcg@10") is None:
        print("no federated evaluation: no device's evaluation reply arrived")
    else:
        print(f"NDCG@10 {fed['test-ndcg@10']:.4f} (95% CI {fed['test-ndcg@10-ci'][0]:.4f}-"
              f"{fed['test-ndcg@10-ci'][1]:.4f})  HR@10 {fed['test-hr@10']:.4f} (95% CI "
              f"{fed['test-hr@10-ci'][0]:.4f}-{fed['test-hr@10-ci'][1]:.4f})"
              f"  [federated evaluation, test items, {int(fed['users'])} users]")
    failures = summary.get("device-failures") or {}
    if failures.get("train") or failures.get("evaluate"):
        print(f"device failures: {failures.get('train', 0)} train and {failures.get('evaluate', 0)} evaluate "
              f"replies were errors (below the threshold that fails a run; see metrics.jsonl)")
    central = summary.get("central-evaluation")
    if central:
        print(f"central check (simulation only): NDCG@10 {central['test-ndcg@10']:.4f}  "
              f"HR@10 {central['test-hr@10']:.4f}")
    if (summary["privacy"].get("user-level") or {}).get("pipeline"):
        _reference_baselines(run_path)
    print("privacy: " + one_line(summary["privacy"]))
    print(f"run directory: {run_path}")
    return 0


# ---------------------------------------------------------------------------- baselines
def cmd_baseline(args: argparse.Namespace) -> int:

    from shared.baselines import evaluate_popularity, train_centralized
    from shared.data.store import open_store, prepare_store
    from shared.metrics import eval_inputs, evaluate_histories, summarize
    from shared.model import architecture_for

    if args.epsilon is not None or args.kind == "content":
        return _private_baseline(args)
    cfg = config_from_args(args)
    store_dir = cfg["data-store"] or prepare_store(cfg["dataset"], 1)
    store = open_store(store_dir)
    _say_dataset_notes(store)
    users = store.all_users()
    result: dict[str, Any] = {"baseline": args.kind, "dataset": store.meta.get("dataset"), "users": store.num_users}
    if args.kind == "popularity":
        for split in ("valid", "test"):
            per_user = evaluate_popularity(users.train, users.valid, users.test, store.num_items, split=split)
            result[split] = summarize(per_user, seed=cfg["seed"])
    else:
        from shared.text.features import features_for

        features = features_for(cfg, store_dir)  # text models: the catalogue's frozen text table
        model_cfg, item_text = architecture_for(cfg, store.num_items, features)
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("centralized training", total=args.epochs)

            def progress(epoch: int, epochs: int, loss: float) -> None:
                bar.update(task, completed=epoch, description=f"centralized training (loss {loss:.3f})")

            model = train_centralized(users.train, store.num_items, model_cfg, window=cfg["window"],
                                      epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                      seed=cfg["seed"], progress=progress, item_text=item_text)
        for split in ("valid", "test"):
            inputs, targets, exclude = eval_inputs(users.train, users.valid, users.test, split)
            result[split] = summarize(evaluate_histories(model, inputs, targets, exclude), seed=cfg["seed"])
        result.update(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, window=cfg["window"])
    test = result["test"]
    print(f"{args.kind} baseline: NDCG@10 {test['ndcg@10']:.4f} (95% CI {test['ndcg@10-ci'][0]:.4f}-"
          f"{test['ndcg@10-ci'][1]:.4f})  HR@10 {test['hr@10']:.4f} (95% CI {test['hr@10-ci'][0]:.4f}-"
          f"{test['hr@10-ci'][1]:.4f})  [test items, {store.num_users} users, no federation, no DP]")
    _write_out(args.out, result)
    return 0


def _write_out(out: str | None, result: dict) -> None:
    """`--out FILE`: the baseline's figures as JSON, written atomically (never half a file)."""
    if not out:
        return
    from shared.atomic import write_json_atomic

    try:
        write_json_atomic(Path(out), result)
    except OSError as exc:
        raise PrivrecError(f"--out {out}: cannot write ({exc.strerror or exc})") from None


def _private_baseline(args: argparse.Namespace) -> int:
    """User-level DP baselines, run as federated analytics over the real ClientApp (issue 13, item 1)."""
    import importlib

    from shared.analytics import check_release_request
    from shared.data.store import open_store, prepare_store

    if args.kind == "centralized":
        raise PrivrecError("--epsilon: `baseline centralized` has no private version; use popularity or content")
    if args.epsilon is None:
        raise PrivrecError(f"`baseline {args.kind}` needs --epsilon E (its user-level privacy budget)")
    check_release_request(args.epsilon, args.delta)
    cfg = config_from_args(args)
    store_dir = cfg["data-store"] or prepare_store(cfg["dataset"], cfg["users-per-device"])
    _say_dataset_notes(open_store(store_dir))
    # The driver imports both apps (in-process grid); tools reach it by module path only.
    driver = importlib.import_module("simulations.private_baselines")
    result = driver.run_private_baseline(args.kind, cfg, store_dir, epsilon=args.epsilon, delta=args.delta,
                                         seed=cfg["seed"])
    test = result["test"]
    print(f"{args.kind} baseline (user-level DP, federated analytics over {result['devices']} devices): "
          f"NDCG@10 {test['ndcg@10']:.4f} (95% CI {test['ndcg@10-ci'][0]:.4f}-{test['ndcg@10-ci'][1]:.4f})  "
          f"HR@10 {test['hr@10']:.4f} (95% CI {test['hr@10-ci'][0]:.4f}-{test['hr@10-ci'][1]:.4f})  [test items]")
    print(f"privacy: {driver.statement(result)}")
    if result["declined"] or result["failed"]:
        print(f"privrec: note: {result['declined']} device(s) declined (their cap), {result['failed']} failed; "
              "neither is in the sum")
    _write_out(args.out, result)
    return 0


# ---------------------------------------------------------------------------- recommend
def cmd_recommend(args: argparse.Namespace) -> int:
    from tools.recommend import Recommender

    recommender = Recommender.load(Path(args.model))
    if args.new_items:
        added = recommender.add_items(Path(args.new_items))
        print(f"added {added} new item(s) from {args.new_items}, {recommender.new_items_note}", file=sys.stderr)
    if (args.history is None) == (args.input is None):
        raise PrivrecError("give exactly one of --history \"ITEM ITEM ...\" or --input FILE.jsonl")
    covered = (f"nothing to recommend: the history already holds every one of the "
               f"{len(recommender.item_ids) - 1} items in the catalogue")
    if args.history is not None:
        recs = recommender.top_k(args.history.split(), args.k, where="--history")
        if not recs:
            print(covered)
        for rank, rec in enumerate(recs, 1):
            title = f"  {rec['title']}" if rec["title"] else ""
            new = "  [new, not in training]" if rec.get("new") else ""
            print(f"{rank:>3}. {rec['item']}{title}  (score {rec['score']:.3f}){new}")
        return 0
    for number, out in enumerate(recommender.top_k_file(Path(args.input), args.k), 1):
        if not out["recommendations"]:
            print(f"privrec: note: {args.input} record {number}: {covered}", file=sys.stderr)
        print(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------- calibrate
def cmd_calibrate(args: argparse.Namespace) -> int:
    from shared.privacy.calibration import calibrate_noise, check_calibration

    steps = args.rounds * args.steps_per_round
    sigma = calibrate_noise(args.target_epsilon, args.delta, args.sample_rate, steps, args.accountant)
    reached = check_calibration(sigma, args.target_epsilon, args.delta, args.sample_rate, steps, args.accountant)
    print(f"noise multiplier {sigma:.4f}: epsilon {reached:.3f} at delta {args.delta:g} after {args.rounds} "
          f"rounds x {args.steps_per_round} steps at sample rate {args.sample_rate:g} "
          f"({args.accountant.upper()} accountant)")
    return 0


# ---------------------------------------------------------------------------- report
EXIT_FLAGGED = 3  # `privrec report`: written, but something is flagged; `privrec audit`: the bound exceeds the claim


def cmd_report(args: argparse.Namespace) -> int:
    from tools.report import build_report

    report = build_report(args.run_dir, args.out)
    run = report["run"]
    if run["state"] != "completed":  # e.g. crashed: "running" in status.json, but its owner is gone
        print(f"run state: {run['state'] or 'unknown'}" + (f" ({run['state-detail']})" if run["state-detail"] else ""))
    flagged = report["privacy"]["flagged-devices"]
    print(f"report written to {Path(args.out or args.run_dir) / 'report.html'} (+ report.md, report.json, "
          f"{len(report['plots'])} plots); flagged devices: {', '.join(flagged) or 'none'}")
    if report["privacy"]["flagged"]:
        print("privrec: the cross-check flagged this run (see the report's Cross-check section)", file=sys.stderr)
        return EXIT_FLAGGED
    return 0


# ---------------------------------------------------------------------------- ledger
def cmd_ledger(args: argparse.Namespace) -> int:
    from tools.ledger import find_ledger, render, summarize, to_json

    summary = summarize(find_ledger(args.path), args.delta)
    print(to_json(summary) if args.json else render(summary))
    if summary["flags"]:
        print("privrec: this ledger's recorded figures disagree with their recomputation (FLAGGED above)",
              file=sys.stderr)
        return EXIT_FLAGGED
    return 0


# ---------------------------------------------------------------------------- audit
def cmd_audit(args: argparse.Namespace) -> int:
    from tools.audit import audit_device, audit_release, audit_users

    if args.release and args.user_level:
        raise PrivrecError("--release and --user-level audit different mechanisms: choose one")
    if args.release:  # the private pipelines' releases: their keys come from the pipeline's defaults
        cfg = run_config_from_args(args)
        result = audit_release(cfg, args.release, canaries=args.canaries, guesses_each=args.guesses,
                               background=args.background, num_items=args.items, beta=args.beta, seed=cfg["seed"])
        return _audit_verdict(result, args.out)
    cfg = config_from_args(args)
    common = {"canaries": args.canaries, "guesses_each": args.guesses, "background": args.background,
              "num_items": args.items, "rounds": args.rounds, "beta": args.beta, "seed": cfg["seed"],
              "progress": lambda r, total: print(f"audit: round {r}/{total} trained and scored", file=sys.stderr,
                                                 flush=True)}
    if args.user_level:
        result = audit_users(cfg, sample_rate=args.user_sample_rate, **common)
    else:
        result = audit_device(cfg, **common)
    return _audit_verdict(result, args.out)


def _audit_verdict(result, out: str | None) -> int:
    print(result.sentence())
    if out:
        from shared.atomic import write_json_atomic

        write_json_atomic(Path(out), result.to_json())
    if result.violated:
        print("privrec: the measured leakage exceeds the claimed epsilon: the claim is false", file=sys.stderr)
        return EXIT_FLAGGED
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privrec", description="Private federated sequential recommendation.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="obtain datasets").add_subparsers(dest="data_command", required=True)
    fetch = data.add_parser("fetch", help="download and verify a dataset into the cache")
    fetch.add_argument("dataset", help="ml-100k")
    fetch.add_argument("--from", dest="source", help="use this local copy (folder with u.data or .inter)")
    fetch.set_defaults(func=cmd_data_fetch)
    synth = data.add_parser("synth", help="synthetic users fitted to a dataset, over its real item catalogue",
                            description="Fits a first-order Markov chain with popularity back-off, the history-"
                                        "length distribution and the time gaps to the source, then samples new "
                                        "users (docs/synthetic-data.md). Writes RecBole atomic files that "
                                        "--dataset DIR reads.")
    synth.add_argument("--like", required=True, help="ml-100k, or a path to a MovieLens/RecBole/CSV file or folder")
    synth.add_argument("--users", type=int, required=True, help="number of synthetic users")
    synth.add_argument("--seed", type=int, default=0, help="the same seed and source give the same files")
    synth.add_argument("--out", required=True, help="new folder to write (must not exist or be empty)")
    synth.set_defaults(func=cmd_data_synth)

    def add_config_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML file of config keys (see `shared/config.py`)")
        p.add_argument("--dataset", help="ml-100k, or a path to a MovieLens/RecBole/CSV file or folder")
        p.add_argument("--seed", type=int)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key (repeatable)")

    sim = sub.add_parser("simulate", help="federated simulation (Flower + Ray); without a model of its own: the "
                                          "user-level private pipeline (DP popularity and co-occurrence + DP-FedAvg "
                                          "channel scorer)")
    add_config_flags(sim)
    sim.add_argument("--rounds", type=int)
    sim.add_argument("--devices-per-round", type=int)
    sim.add_argument("--users-per-device", type=int)
    sim.add_argument("--noise-multiplier", type=float)
    sim.add_argument("--epsilon", type=float, help=EPSILON_HELP)
    sim.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    sim.add_argument("--run-dir", help="parent folder of run directories (default runs/)")
    sim.add_argument("--run-name", help="run id (default: a time stamp)")
    sim.add_argument("--ray-address", metavar="HOST:PORT",
                     help="run the devices on this running Ray cluster (`ray start --head`; this machine must "
                          "be one of its nodes; see docs/multi-node.md); default: a private Ray on loopback")
    sim.set_defaults(func=cmd_simulate)

    base = sub.add_parser("baseline", help="references on the same split: non-private (centralized, popularity) "
                                           "or user-level DP (popularity, content with --epsilon)")
    base.add_argument("kind", choices=["centralized", "popularity", "content"])
    base.add_argument("--epsilon", type=float, help="user-level DP: popularity histogram released as federated "
                                                    "analytics at this epsilon (content: also its bias)")
    base.add_argument("--delta", type=float, default=1e-5, help="delta of --epsilon (default 1e-5)")
    add_config_flags(base)
    base.add_argument("--epochs", type=int, default=30)
    base.add_argument("--lr", type=float, default=0.001)
    base.add_argument("--batch-size", type=int, default=64)
    base.add_argument("--out", help="also write the figures to this JSON file")
    base.set_defaults(func=cmd_baseline)

    rec = sub.add_parser("recommend", help="top-k items for a history, from a trained run")
    rec.add_argument("--model", required=True, help="run directory (runs/<run-id>)")
    rec.add_argument("--history", help='space-separated item ids, oldest first, e.g. "50 181 258"')
    rec.add_argument("--input", help="JSON lines file, one {\"history\": [...]} per line")
    rec.add_argument("-k", type=int, default=10)
    rec.add_argument("--new-items", metavar="FILE.jsonl",
                     help='items added after training, one {"item": ID, "title": ..., "year": ..., "genres": [...]} '
                          "per line (text SASRec or content scorer): ranked from their text, without retraining")
    rec.set_defaults(func=cmd_recommend)

    cal = sub.add_parser("calibrate", help="noise multiplier for a target epsilon",
                         description="On-device DP-SGD: --rounds = rounds one device may join, --sample-rate = the "
                                     "run's sample-rate q, --steps-per-round = local-epochs x ceil(1 / q) (the "
                                     "same for every device, whatever its window count). User-level DP-FedAvg: "
                                     "--rounds = num-rounds, --steps-per-round 1, --sample-rate = "
                                     "devices-per-round / devices.")
    cal.add_argument("--target-epsilon", type=float, required=True)
    cal.add_argument("--delta", type=float, default=1e-5)
    cal.add_argument("--sample-rate", type=float, required=True)
    cal.add_argument("--rounds", type=int, required=True)
    cal.add_argument("--steps-per-round", type=int, default=1)
    cal.add_argument("--accountant", choices=ACCOUNTANTS, default=SCHEMA["accountant"].default)
    cal.set_defaults(func=cmd_calibrate)

    rep = sub.add_parser("report", help="privacy report of a run: md, self-contained html, json, plots",
                         description="Exit status: 0 report written, nothing flagged; 2 bad input (nothing "
                                     f"written); {EXIT_FLAGGED} report written, but its cross-check flagged a "
                                     "device, the user-level record, a statement or metrics.jsonl.")
    rep.add_argument("run_dir", help="run directory (runs/<run-id>)")
    rep.add_argument("--out", help="write the report here (default: into the run directory)")
    rep.set_defaults(func=cmd_report)

    led = sub.add_parser("ledger", help="what one device has spent, from its own privacy ledger (every run)",
                         description="Reads one device's privacy-ledger.json (the file, or the device's folder): the "
                                     "user-level releases its data entered, by run and all runs composed, its "
                                     "on-device DP-SGD spend and its cap, each recomputed with Opacus and "
                                     f"dp-accounting. Exit status: 0 consistent; 2 bad input; {EXIT_FLAGGED} a "
                                     "recorded figure disagrees with its recomputation.")
    led.add_argument("path", help="a privacy-ledger.json, or a device folder holding one (deployment: the folder "
                                  "`privrec data split` made; simulation: <data-store>.population/device-<d>)")
    led.add_argument("--delta", type=float, help="compose at this delta (default: the one the releases were made at)")
    led.add_argument("--json", action="store_true", help="the same as JSON")
    led.set_defaults(func=cmd_ledger)

    aud = sub.add_parser("audit", help="empirical lower bound on one device's epsilon (canaries, one run)",
                         description="Steinke, Nasr and Jagielski (2023), one training run: each canary window joins "
                                     "one device's data with probability 1/2, the device trains with the config's "
                                     "DP settings, a white-box attacker scores each canary by its alignment with "
                                     "the device's update, and the correct guesses become an epsilon the run "
                                     "provably exceeds (confidence 1 - beta), shown next to the claimed epsilon. "
                                     f"Exit status {EXIT_FLAGGED} when the bound exceeds the claim.")
    add_config_flags(aud)
    aud.add_argument("--user-level", action="store_true",
                     help="audit user-level DP-FedAvg instead: canary users, the adversary sees the global models")
    aud.add_argument("--release", choices=["popularity", "cooccurrence"],
                     help="audit one analytics release of the private pipeline instead (canary users, one release "
                          "at the pipeline's noise multiplier; --rounds does not apply)")
    aud.add_argument("--user-sample-rate", type=float, default=0.5, help="--user-level: users' Poisson rate per "
                                                                         "round (default 0.5)")
    aud.add_argument("--canaries", type=int, default=1000, help="canary windows (or users) m (default 1000)")
    aud.add_argument("--guesses", type=int, help="guesses 'in' and as many 'out' (default m/10 each)")
    aud.add_argument("--background", type=int, default=0, help="windows (or users) always in (default 0)")
    aud.add_argument("--items", type=int, default=1682, help="catalogue size the canaries draw from (default 1682)")
    aud.add_argument("--rounds", type=int, default=1, help="rounds the device trains (default 1)")
    aud.add_argument("--beta", type=float, default=0.05, help="1 - confidence (default 0.05)")
    aud.add_argument("--out", help="also write the figures to this JSON file")
    aud.set_defaults(func=cmd_audit)

    from tools.deploy.cli import add_data_split, add_deploy  # deployment: data split, deploy ...

    add_data_split(data)
    add_deploy(sub, add_config_flags)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PrivrecError as exc:
        message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"privrec: error: {message}", file=sys.stderr)  # always one line
        return 2
    except PermissionError as exc:  # a file or folder we may not read or write, wherever it was met
        print(f"privrec: error: {exc.filename or ''}: {exc.strerror or 'permission denied'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"privrec: {exc}" if isinstance(exc, PrivrecInterrupted) else "privrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
