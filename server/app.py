"""privrec ServerApp: runs the federation and records it in `runs/<run-id>/`."""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from server.checkpoint import CHECKPOINT_DIR, load_checkpoint, restore_strategy, save_checkpoint
from server.cohort import BudgetExhausted
from server.device_nodes import DeviceGrid
from server.evaluation import central_evaluation
from server.expiring_grid import ExpiringGrid
from server.pretraining import pretrain, pretraining_reference
from server.round_clock import RoundClock, TimedGrid
from server.run_dir import RunDirectory
from server.scorer import (
    central_scorer_evaluation,
    initial_scorer,
    released_cooccurrence,
    released_popularity,
    released_transitions,
    scorer_architecture,
)
from server.secagg import SecureAggregationGrid
from server.strategy import build_strategy, cohort_size, user_sample_rate
from shared.aggregation import running_average
from shared.config import (
    SCORER_MODELS,
    RunConfig,
    check_secure_aggregation,
    clamp_to_population,
    default_run_name,
    from_run_config,
)
from shared.data.devices import CATALOGUE_FILE, CATALOGUE_KEY, read_catalogue
from shared.data.store import open_store, prepare_store
from shared.errors import PrivrecError
from shared.model import SASRec, architecture_for
from shared.privacy import pipeline
from shared.privacy.device_journal import JOURNAL, JOURNAL_KEY, DeviceJournal
from shared.privacy.population import default_population_dir
from shared.privacy.statement import privacy_statement, sentences, user_level_statement
from shared.privacy.user_level import user_level_epsilon, user_level_state
from shared.scorer import read_catalogue as scorer_catalogue
from shared.scorer import sasrec_channel_config
from shared.secagg import params_from_config, release_params
from shared.text.features import TEXT_KEY, features_for

logging.getLogger("flwr").propagate = False  # Opacus' basicConfig would double every log line
log = logging.getLogger("flwr")  # Flower's handler: our lines appear in the run's log stream

app = ServerApp()


class RoundFailed(PrivrecError):
    """More than half of the devices asked to train in a round failed: the run stops as failed."""


def round_failed(failures: int, asked: int) -> bool:
    """The run's failure threshold (docs/architecture.md): more than half of the devices asked failed.

    A round with fewer failures still counts (aggregated from the devices that replied) and is
    recorded with its failures; declines at a privacy cap and replies lost to round-timeout are not
    failures.
    """
    return failures > 0 and 2 * failures > asked


def device_error_text(reason: str | None) -> str:
    """One line of what went wrong on a device, from a Flower error reply's reason.

    Flower words it "<class 'T'>:<'message'>". Under Ray, T is RayTaskError(ClientAppException) and the
    message is the device's whole traceback: the device's own exception is the line before "The above
    exception was the direct cause", and its message also follows "ClientAppException occurred. Message: ".
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason or "no reason given")  # Ray colours its actor names
    original = re.search(r"^([A-Za-z_][\w.]*): ([^\n]*)\n\s*\nThe above exception was the direct cause", text, re.M)
    wrapped = re.search(r"ClientAppException occurred\. Message: (.*?)(?:'>)?\s*$", text, re.S)
    plain = re.fullmatch(r"<class '([^']+)'>:<'(.*)'>", text, re.S)
    if original:
        text = f"{original.group(1).rsplit('.', 1)[-1]}: {original.group(2)}"
    elif wrapped:
        text = wrapped.group(1)
    elif plain:
        text = f"{plain.group(1).rsplit('.', 1)[-1]}: {plain.group(2)}"
    return " ".join(text.split())[:400]


def _round_status(*stats: dict) -> str:
    """`failed` past the threshold (training or evaluation), `partial` with any failure, else `ok`."""
    if any(round_failed(s.get("failures", 0), s.get("asked", 0)) for s in stats):
        return "failed"
    return "partial" if any(s.get("failures", 0) for s in stats) else "ok"


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = from_run_config(context.run_config)
    cfg = run.as_dict()
    # Lock, then check a resume, before the first write: a refused run leaves the directory as it was.
    run_dir = RunDirectory.claim(run.outputs.run_dir, run.outputs.run_name or default_run_name(), cfg)
    try:
        run_dir.write_json("config.json", cfg)
        run_dir.set_status("running")
        _poll_replies_often(grid)
        try:
            FederatedRun(run, run_dir, ExpiringGrid(grid)).execute()
        except BaseException as exc:
            run_dir.set_status("failed", error=f"{type(exc).__name__}: {exc}")
            raise
    finally:
        run_dir.release()


REPLY_POLL_SECONDS = 0.02  # not lower: each look costs the ServerApp process CPU that the nodes compete for


def _poll_replies_often(grid: Grid) -> None:
    """Flower's simulation grid (`InMemoryGrid`) looks for the nodes' replies every `pull_interval`, 0.1 s by
    default: a round waits on average half of that after its last reply, some 4% of a one-second round of
    a simulation whose nodes host hundreds of devices. A look is one query of the in-memory state."""
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = REPLY_POLL_SECONDS


class FederatedRun:
    """One federated training run: strategy, per-round records, final summary.

    `self.run` holds the typed settings; `self.cfg` the flat values this run records in config.json
    (with what the run resolved: the population folder, a devices-per-round clamped to the population).
    """

    def __init__(self, cfg: RunConfig | Mapping[str, Any], run_dir: RunDirectory, grid: Grid):
        self.run = RunConfig.of(cfg)
        self.cfg = self.run.as_dict()
        self.run_dir = run_dir
        self.grid = grid
        self.round_started = time.perf_counter()
        self.train_stats: dict[int, dict] = {}
        self.eval_stats: dict[int, dict] = {}
        self.eval_failures: dict[int, dict] = {}
        self.rows: list[dict[str, Any]] = []
        self.secure_grid: SecureAggregationGrid | None = None
        # model-average > 0: the running average of the global model, the model evaluated and released
        self.average: dict[str, np.ndarray] | None = None
        self.clock = RoundClock()  # where each round's server time goes (one log line per round)

    def execute(self) -> None:
        cfg = self.cfg
        # Flower samples devices with Python's global `random`; seed it for reproducible cohorts.
        random.seed(self.run.federation.seed)
        np.random.seed(self.run.federation.seed)
        torch.manual_seed(self.run.federation.seed)
        if self.run.deployment.catalogue:
            # Deployment: devices hold their own data (node config); the server reads the public
            # catalogue only, never a device's histories.
            if self.run.federation.public_share > 0:
                raise PrivrecError("config key 'public-share' needs the consenting users' histories on the server; "
                                   "a deployment's server reads only the catalogue: set public-share = 0")
            catalogue = read_catalogue(self.run.deployment.catalogue)
            self.store = None
            num_items, items_path = catalogue.pop("num_items"), catalogue.pop("items_path")
            self.num_devices = self.run.deployment.deploy_devices or catalogue["num_devices"]
            self.run_dir.write_json("dataset.json", catalogue)
            # Devices check that they hold this very catalogue (their item indices must be the server's).
            device_config: dict[str, Any] = {CATALOGUE_KEY: catalogue["items_sha256"]} \
                if catalogue.get("items_sha256") else {}
        else:
            data = self.run.data
            store_dir = Path(data.data_store or prepare_store(data.dataset, data.users_per_device))
            self.store = open_store(store_dir)
            num_items, items_path = self.store.num_items, store_dir / "items.json"
            self.num_devices = self.store.num_devices
            self.run_dir.write_json("dataset.json", self.store.meta)
            # Simulated devices' ledgers belong to the devices, not to this run: every run on the store
            # shares them (a device in two runs composes both), unless the config names a fresh folder.
            population = Path(self.run.data.population_dir).expanduser().resolve() if self.run.data.population_dir \
                else default_population_dir(store_dir)
            cfg["population-dir"] = str(population)
            self.run_dir.write_json("config.json", cfg)  # records where this run's devices keep their ledgers
            device_config = {"data-store": str(store_dir), "state-dir": str(population)}
        clamped = clamp_to_population(cfg, self.num_devices)
        if clamped:  # the run records what it does, not what was asked
            log.warning("privrec: %s", clamped)
            self.run_dir.write_json("config.json", cfg)
        self.run = RunConfig.from_values(cfg)  # with what the run resolved
        self.scorer = self.run.pipeline.model in SCORER_MODELS
        if self.scorer:  # the whole run's user-level budget, before anything is released
            pipeline.check_pipeline_budget(cfg, user_sample_rate(cfg, self.num_devices), "run config: ")
        # Text models: the frozen text table is built here from the public catalogue (encoded once,
        # cached by hash) and is not part of the shipped weights; devices build the same one themselves.
        # (A deployment's catalogue folder names its dataset in catalogue.json, as the devices' meta.json do.)
        features = features_for(self.run, Path(items_path).parent,
                                meta_file=CATALOGUE_FILE if self.run.deployment.catalogue else "meta.json")
        if self.scorer:
            self.catalogue = scorer_catalogue(items_path, features.vectors)
            model = None  # made from the popularity release, below
            sasrec_config = sasrec_channel_config(self.run, self.catalogue)
            if sasrec_config is not None:  # a consenting cohort: its pretrained SASRec becomes a channel
                self.model_cfg = sasrec_config
                self.item_text = self.catalogue.text if sasrec_config.uses_text else None
        else:
            self.model_cfg, self.item_text = architecture_for(self.run, num_items, features)
            model = SASRec(self.model_cfg, self.item_text)
        self.text_info = {} if features is None else {"dataset": features.dataset, "key": features.key,
                                                      "catalogue_sha256": features.catalogue_sha256,
                                                      "encoder_id": features.encoder_id}
        self.run_dir.copy_catalogue(items_path)

        strategy = build_strategy(cfg, self.num_devices, self._on_train, self._on_evaluate, clock=self.clock)
        self.strategy = strategy
        grid = flower_grid = TimedGrid(self.grid, self.clock)
        if self.run.federation.devices_per_node > 1:  # simulated nodes hosting blocks of devices
            grid = DeviceGrid(flower_grid, self.num_devices, self.run.federation.devices_per_node)
        if cfg["secure-aggregation"]:
            cohort = cohort_size(cfg, self.num_devices)
            check_secure_aggregation(cfg, cohort, "run config: ")  # also when the cohort is a fraction
            # The strategy sees only the aggregate; DP-FedAvg divides by the expected cohort.
            grid = SecureAggregationGrid(self.grid, params_from_config(cfg),
                                         denominator=float(cohort) if cfg["user-dp"] else None)
            self.secure_grid = grid
        checkpoint = load_checkpoint(self.run_dir.path, cfg) if self.run.outputs.resume else None
        self.journal = DeviceJournal(self.run_dir.path / JOURNAL)
        if checkpoint is not None:
            restore_strategy(strategy, checkpoint)
            if checkpoint.journal_bytes is not None:
                self.journal.resume(checkpoint.journal_bytes)  # cuts off a torn last line
            else:  # an older checkpoint held the tally inline: it opens the journal
                self.journal.start()
                tally, nodes = strategy.privacy, {d: n for n, d in strategy.privacy.node_devices.items()}
                self.journal.append(checkpoint.round, {d: nodes.get(d) for d in tally.records}, tally.records,
                                    tally.epsilon_by_device)
            initial = checkpoint.arrays
            if checkpoint.average is not None:
                self.average = {k: v.numpy() for k, v in checkpoint.average.items()}
            # the counted model, even if a crash came before model.pt
            self._save_model(checkpoint.arrays if checkpoint.average is None else checkpoint.average)
            self.rows = self.run_dir.reload_metrics(checkpoint.round)
            random.seed(self.run.federation.seed + checkpoint.round)  # a fresh cohort draw for the rounds still to come
            log.info("privrec: resuming run %s after round %d of %d (checkpoint %s)", self.run_dir.path.name,
                     checkpoint.round, self.run.federation.num_rounds, self.run_dir.path / CHECKPOINT_DIR)
        else:
            self.journal.start()  # a run that starts over starts its records over, as privacy.json does
            if self.scorer:  # federated analytics first: its release is the bias every round ships
                # under secure-aggregation the releases too: the devices add the noise, the server sees sums
                secure = release_params(cfg) if cfg["secure-aggregation"] else None
                histogram = released_popularity(self.grid, self.run, self.run_dir, device_config,
                                                num_items=num_items, num_devices=self.num_devices, secure=secure)
                cooc = released_cooccurrence(self.grid, self.run, self.run_dir, device_config, histogram, secure) \
                    if self.run.pipeline.model == "channel-scorer" else None
                transitions = released_transitions(self.grid, self.run, self.run_dir, device_config, histogram) \
                    if cooc is not None and self.run.pipeline.transition_release else None
                sasrec = self._pretrain() if cooc is not None and self.run.federation.public_share > 0 else None
                model = initial_scorer(self.catalogue, histogram, self.run.federation.seed, cooc, transitions,
                                       sasrec)
            elif self.run.federation.public_share > 0:
                model = self._pretrain()
            initial = model.state_dict()
        # Only what a device cannot read from its own run config: values this run derived. Flower adds
        # `server-round`, and FedProx alone adds `proximal-mu` (configure_train).
        message_config = ConfigRecord({**device_config, "run-id": self.run_dir.path.name,
                                       **({TEXT_KEY: features.key} if features is not None else {})})
        started = time.perf_counter()
        self.round_started = started
        stopped = None
        try:
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(initial),
                num_rounds=self.run.federation.num_rounds - strategy.round_offset,
                timeout=self.run.federation.round_timeout,
                train_config=message_config,
                evaluate_config=ConfigRecord(dict(message_config)),
                evaluate_fn=self._end_of_round,
            )  # everything we report was recorded round by round
        except BudgetExhausted as exc:
            stopped = {"after-round": self.rows[-1]["round"] if self.rows else 0, "reason": str(exc)}
            log.warning("privrec: run stopped early: %s", exc)
        summary = self._summary(time.perf_counter() - started, strategy)
        if stopped:
            summary["stopped-early"] = stopped
        self.run_dir.write_json("privacy.json", self._privacy_record(every_device=True))  # the documented form
        self.run_dir.finish(summary)

    def _pretrain(self) -> SASRec:
        """SASRec trained without noise on the consenting cohort's histories (simulation only), recorded in
        pretraining.json with its own figures on every user's held-out items as the reference the private rounds
        must improve on (simulation only: the server reads every user's held-out items for it)."""
        model, info = pretrain(self.run, self.store, self.model_cfg, self.item_text)
        if self.scorer:  # the scorer's reference: what the consenting cohort alone gives
            info["pretraining-only"] = pretraining_reference(model, self.store)
            log.info("privrec: pretrained SASRec on %d consenting devices: test NDCG@10 %.4f on every user "
                     "(simulation-only reference)", info["consenting-devices"],
                     info["pretraining-only"]["test-ndcg@10"])
        self.run_dir.write_json("pretraining.json", info)
        return model

    # -- callbacks from the strategy -------------------------------------------------------
    def _on_train(self, server_round: int, stats: dict) -> None:
        if self.secure_grid is not None and self.secure_grid.rounds:  # devices summed and dropped, or refused
            stats["secure-aggregation"] = self.secure_grid.rounds.pop()
        self.train_stats[server_round] = stats
        self._check_failures(server_round, stats, "")

    def _on_evaluate(self, server_round: int, stats: dict) -> None:
        if "test-ndcg@10" in stats:  # some devices evaluated
            self.eval_stats[server_round] = stats
        self.eval_failures[server_round] = stats
        self._check_failures(server_round, stats, " evaluation")

    def _check_failures(self, server_round: int, stats: dict, what: str) -> None:
        """Say which devices failed (Flower's log, and metrics.jsonl for the console); past the threshold,
        record the round and stop the run as failed. `server_round` is already the run's true round."""
        if "first-error" in stats:
            stats["first-error"] = device_error_text(stats["first-error"])
            log.warning("privrec: round %d%s: %d of %d devices failed; first device error: %s", server_round,
                        what, stats["failures"], stats.get("asked", 0), stats["first-error"])
        if round_failed(stats.get("failures", 0), stats.get("asked", 0)):
            # Record what the round did (its failures and every device's reported spend), then stop:
            # no model or checkpoint of a failed round is released.
            row = self._metrics_row(server_round, None)
            self.rows.append(row)
            self.run_dir.append_metrics(row)
            self._journal_changed(server_round)
            self.run_dir.write_json("privacy.json", self._privacy_record(every_device=True))  # the run ends here
            raise RoundFailed(f"round {server_round}{what}: {stats['failures']} of {stats['asked']} devices "
                              f"failed (more than half); first device error: {stats['first-error']}")

    def _end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by Flower before round 1 (as round 0) and after every round."""
        if self.strategy.round_offset and server_round == 0:
            return None  # resumed: the checkpointed round was recorded before the restart
        server_round += self.strategy.round_offset
        state = arrays.to_torch_state_dict()
        released = self._released(state)
        central = None
        wanted = server_round in (0, self.run.federation.num_rounds) or server_round in self.eval_stats
        if self.store is not None and self.run.federation.central_eval and wanted and self.scorer:
            central = central_scorer_evaluation(released, self.catalogue, self.store, self.run)
        elif self.store is not None and self.run.federation.central_eval and wanted:
            central = central_evaluation(self.model_cfg, released, self.store, seed=self.run.federation.seed,
                                         item_text=self.item_text, cold_share=self.run.data.cold_item_share)
        row = self._metrics_row(server_round, central)
        self.rows.append(row)
        clock = self.clock
        with clock.phase("metrics"):
            self.run_dir.append_metrics(row)
            self.run_dir.heartbeat()
        with clock.phase("privacy-record"):
            # The records that changed this round first (durable), then the statements that count them.
            clock.count("record-bytes", self._journal_changed(server_round))
            self.run_dir.write_json("privacy.json", self._privacy_record())
        if server_round > 0:
            # The checkpoint (with the privacy tally) covers only rounds whose records are complete, and
            # comes before model.pt: a crash in between never leaves a released model that is not counted.
            with clock.phase("checkpoint"):
                save_checkpoint(self.run_dir.path, server_round, state, self.strategy, self.cfg,
                                journal_bytes=self.journal.size, average=None if self.average is None else released)
            with clock.phase("model"):
                self._save_model(released)
        clock.count("record-bytes", self._record_bytes(server_round > 0))
        log.info("privrec: round %d server seconds %s", server_round, json.dumps(clock.lap()))
        self.round_started = time.perf_counter()
        return MetricRecord({k: v for k, v in (central or {}).items() if isinstance(v, (int, float))}) \
            if central else None

    def _journal_changed(self, server_round: int) -> int:
        """Append the device records this round changed to the journal (fsynced); the bytes appended."""
        tally = self.strategy.privacy
        written = self.journal.append(server_round, tally.changed, tally.records, tally.epsilon_by_device)
        tally.take_changed()  # only once they are on disk
        return written

    def _record_bytes(self, checkpointed: bool) -> int:
        """Bytes of the files this round rewrote whole (metrics, privacy record, checkpoint state; not the model)."""
        written = [self.run_dir.path / "metrics.jsonl", self.run_dir.path / "privacy.json"]
        if checkpointed:
            written.append(self.run_dir.path / CHECKPOINT_DIR / "state.json")
        return sum(p.stat().st_size for p in written if p.exists())

    def _released(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model this round evaluates and releases: the global model, or with model-average > 0 the
        running average of it (started at round 0's model; training goes on from the global model)."""
        decay = self.run.federation.model_average
        if decay == 0:
            return state
        self.average = running_average(self.average, {k: v.numpy() for k, v in state.items()}, decay)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.average.items()}

    def _save_model(self, state: dict[str, torch.Tensor]) -> None:
        if self.scorer:
            self.run_dir.save_model(state, scorer_architecture(self.catalogue, self.run, self.text_info))
            return
        architecture = {"model": "SASRec", **asdict(self.model_cfg)}
        if self.text_info:
            architecture["item-text"] = self.text_info
        self.run_dir.save_model(state, architecture)

    def _metrics_row(self, server_round: int, central: dict | None) -> dict[str, Any]:
        train = self.train_stats.get(server_round, {})
        evaluation = self.eval_stats.get(server_round, {})
        row: dict[str, Any] = {
            "round": server_round,
            "seconds": round(time.perf_counter() - self.round_started, 3),
            "devices-trained": train.get("devices", 0),
            "devices-asked": train.get("asked", 0),
            "failures": train.get("failures", 0),
            "no-reply": train.get("no-reply", 0),
            "first-error": train.get("first-error"),
            "eval-asked": self.eval_failures.get(server_round, {}).get("asked", 0),
            "eval-failures": self.eval_failures.get(server_round, {}).get("failures", 0),
            "eval-first-error": self.eval_failures.get(server_round, {}).get("first-error"),
            "round-status": _round_status(train, self.eval_failures.get(server_round, {})),
            "train-loss": train.get("train-loss"),
            # epsilon: this round's cohort, and every device that has trained so far (cumulative)
            "round-epsilon-max": train.get("epsilon-max"),
            "round-epsilon-median": train.get("epsilon-median"),
            "epsilon-max": train.get("all-epsilon-max"),
            "epsilon-median": train.get("all-epsilon-median"),
            "devices-with-spend": train.get("devices-with-spend", 0),
            "declined": train.get("declined", 0),
            "refused": train.get("refused", 0),  # replies whose spend was below what the server had seen
            "capped-devices": train.get("capped-devices", 0),
            "user-level-epsilon": self._user_level_epsilon(server_round),
        }
        if "consenting-zero-updates" in train:  # public-share: consenting devices sent zero updates
            row["consenting-zero-updates"] = train["consenting-zero-updates"]
        if "secure-aggregation" in train:
            row["secure-aggregation"] = train["secure-aggregation"]
        for name in ("hr@10", "ndcg@10"):
            row[name] = evaluation.get(f"test-{name}")
            row[name + "-ci"] = evaluation.get(f"test-{name}-ci")
            row["valid-" + name] = evaluation.get(f"valid-{name}")
        if central:
            row["central"] = central
        return row

    # -- privacy records -------------------------------------------------------------------
    def _user_level_epsilon(self, rounds: int) -> float | None:
        if self.scorer:  # the analytics releases are spent from round 0 on
            return pipeline.pipeline_epsilon(self.run.pipeline.popularity_noise_multiplier,
                                             self.run.user_dp.noise_multiplier,
                                             user_sample_rate(self.cfg, self.num_devices), rounds,
                                             self.run.device.delta, self.run.device.accountant,
                                             pipeline.cooc_noise(self.cfg), pipeline.transition_noise(self.cfg))
        if not self.run.user_dp.enabled or rounds == 0:
            return None
        return user_level_epsilon(self.run.user_dp.noise_multiplier, user_sample_rate(self.cfg, self.num_devices),
                                  rounds, self.run.device.delta, self.run.device.accountant)

    def _privacy_record(self, every_device: bool = False) -> dict[str, Any]:
        """`privacy.json`: what every device reported of its spend, and the user-level history (see docs).

        While the run goes on the devices' records are in the journal (`devices-journal` names it): writing
        all of them after every round would cost the whole population; `every_device` writes them under
        `devices`, once, when the run ends."""
        cfg, tally = self.cfg, self.strategy.privacy
        devices = {"devices": tally.records} if every_device else {JOURNAL_KEY: JOURNAL}
        rounds = self.rows[-1]["round"] if self.rows else 0
        user_level = None
        if self.run.user_dp.enabled:
            q = user_sample_rate(cfg, self.num_devices)
            state = user_level_state(self.run.user_dp.noise_multiplier, q, rounds, self.run.device.accountant)
            user_level = {"accountant": self.run.device.accountant, "history": state["history"],
                          "rounds": [[r["round"], r["user-level-epsilon"]] for r in self.rows if r["round"] > 0],
                          "population": self.num_devices,
                          "expected-cohort": cohort_size(cfg, self.num_devices),
                          "noise-multiplier": self.run.user_dp.noise_multiplier,
                          "clipping-norm": self.run.user_dp.clipping_norm}
        summary = tally.summary()
        if self.scorer:
            record = self._pipeline_record(rounds)
            return {"format": 1, "delta": self.run.device.delta, "accountant": self.run.device.accountant,
                    "epsilon": record["epsilon"], "statements": [pipeline.sentence(record, rounds)],
                    # the one composed history (popularity release first), so a report recomputes the figure
                    **devices, "user-level": {**user_level, "history": record["history"], "pipeline": record}}
        return {
            "format": 1,
            "delta": self.run.device.delta,
            "accountant": self.run.device.accountant,
            "statements": sentences(cfg, summary["all-epsilon-max"], self._user_level_epsilon(rounds),
                                    summary["devices-with-spend"], self.num_devices),
            **devices,
            "user-level": user_level,
        }

    def _pipeline_record(self, rounds: int) -> dict[str, Any]:
        return pipeline.statement(self.cfg, user_sample_rate(self.cfg, self.num_devices), self.num_devices, rounds)

    def _summary(self, seconds: float, strategy) -> dict[str, Any]:
        last_eval_round = max(self.eval_stats) if self.eval_stats else None
        final_eval = self.eval_stats.get(last_eval_round, {}) if last_eval_round else {}
        central_rows = [r for r in self.rows if "central" in r]
        privacy = strategy.privacy.summary()
        cohort = cohort_size(self.cfg, self.num_devices)
        return {
            "run-id": self.run_dir.path.name,
            "rounds": self.run.federation.num_rounds,
            "seconds": round(seconds, 2),
            "devices": self.num_devices,
            "devices-per-round": cohort,
            "federated-evaluation": {
                "round": last_eval_round,
                "devices": final_eval.get("devices"),
                "users": final_eval.get("users"),
                **{f"{split}-{m}": final_eval.get(f"{split}-{m}")
                   for split in ("test", "valid") for m in ("hr@10", "hr@10-ci", "ndcg@10", "ndcg@10-ci")},
            },
            # Devices whose train or evaluate message raised, over the run (per round in metrics.jsonl).
            "device-failures": {"train": sum(r.get("failures", 0) for r in self.rows),
                                "evaluate": sum(r.get("eval-failures", 0) for r in self.rows)},
            "central-evaluation": central_rows[-1]["central"] if central_rows else None,
            "central-evaluation-initial": central_rows[0]["central"] if central_rows else None,
            "privacy": {"mechanism": "user-level pipeline (" + ("popularity and co-occurrence releases"
                                                                 if self.run.pipeline.model == "channel-scorer"
                                                                 else "popularity release") + " + DP-FedAvg)",
                        "user-level": {**self._pipeline_record(len([r for r in self.rows if r["round"] > 0])),
                                       "pipeline": True}} if self.scorer else
                       {**privacy, **privacy_statement(self.cfg), "capped-devices": len(strategy.privacy.capped),
                        **({"user-level": {**user_level_statement(
                            self.cfg, user_sample_rate(self.cfg, self.num_devices), self.num_devices),
                            "epsilon": self._user_level_epsilon(len([r for r in self.rows if r["round"] > 0]))}}
                           if self.run.user_dp.enabled else {})},
        }
