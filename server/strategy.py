"""Server-side strategy: a Flower strategy (FedAvg, FedAdam or FedProx) plus privrec's round logic.

`RoundTracking` sits in front of the chosen Flower strategy in the MRO. It does not change how
models are aggregated; it decides when to evaluate, and turns replies into the figures privrec
reports: epsilon as max and median over devices (never a mean), and HR/NDCG pooled over devices
with a bootstrap confidence interval.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from shared.metrics import bootstrap_ci
from shared.model import FROZEN_BY_SCOPE
from shared.privacy.accounting import history_steps
from shared.privacy.user_level import clip_update, noisy_mean_update, poisson_cohort

log = logging.getLogger("flwr")  # Flower's handler: our lines appear in the run's log stream
K = 10
SEEN_SPEND = "privacy-seen"  # instruction record read by client/app.py (same name there)


class BudgetExhausted(Exception):
    """Too few devices remain under their privacy cap to fill a round: the run stops cleanly."""


TRAINED, DECLINED, REFUSED = "trained", "declined", "refused"


@dataclass
class PrivacyTally:
    """What the server learns of each device's privacy spend, keyed by device id.

    Flower node ids change with every launch (a resumed run, a restarted SuperNode): they only tell
    which device sent a reply in this launch (`node_devices`); everything counted is keyed by the
    `device` of the reply's privacy record, so a device seen in two launches counts once.
    """

    epsilon_by_device: dict[str, float] = field(default_factory=dict)
    capped: dict[str, int] = field(default_factory=dict)  # device id -> first round it declined
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # device id -> privacy.json entry
    node_devices: dict[int, str] = field(default_factory=dict)  # this launch: node id -> device id

    def update(self, device: str, epsilon: float) -> None:
        # A device's epsilon never decreases; keep the largest ever reported.
        self.epsilon_by_device[device] = max(epsilon, self.epsilon_by_device.get(device, 0.0))

    def seen_steps(self, device: str) -> int:
        """DP steps in the latest accountant history this device reported (what a device must not go below)."""
        entry = self.records.get(device)
        return history_steps({"history": entry["history"]}) if entry else 0

    def is_capped(self, node_id: int) -> bool:
        return self.node_devices.get(node_id) in self.capped

    def record_reply(self, server_round: int, node_id: int, content: RecordDict, accountant: str) -> str:
        """Book one train reply: TRAINED, DECLINED (cap reached) or REFUSED (spend below what was seen)."""
        metrics = next(iter(content.metric_records.values()))
        declined = bool(metrics.get("declined", 0))
        privacy = content.config_records.get("privacy")
        device = str(privacy["device"]) if privacy else f"node-{node_id}"
        self.node_devices[node_id] = device
        entry = self.records.setdefault(device, {"accountant": accountant, "history": [], "rounds": [],
                                                 "epsilon": 0.0, "declined-round": None})
        history = json.loads(str(privacy["history"])) if privacy else entry["history"]
        reason = self._below_seen(device, history, metrics)
        if reason:  # a lost or rolled-back ledger: never counted, never lowers the record
            entry.setdefault("refused", []).append({"round": server_round, "reason": reason})
            log.warning("privrec: round %d: refused the update of device %s: %s", server_round, device, reason)
            return REFUSED
        entry["history"] = history
        if "epsilon" in metrics:
            self.update(device, float(metrics["epsilon"]))
            entry["epsilon"] = max(entry["epsilon"], float(metrics["epsilon"]))
            if not declined:
                entry["rounds"].append([server_round, float(metrics["epsilon"])])
        if declined:
            self.capped.setdefault(device, server_round)
            if entry["declined-round"] is None:
                entry["declined-round"] = server_round
        return DECLINED if declined else TRAINED

    def _below_seen(self, device: str, history: list, metrics: Any) -> str | None:
        seen_steps, reported_steps = self.seen_steps(device), history_steps({"history": history})
        if reported_steps < seen_steps:
            return f"reported {reported_steps} DP steps, fewer than the {seen_steps} already seen from this device"
        seen_epsilon = self.epsilon_by_device.get(device)
        if "epsilon" in metrics and seen_epsilon is not None and float(metrics["epsilon"]) < seen_epsilon * (1 - 1e-9):
            return f"reported epsilon {float(metrics['epsilon']):.6g}, below the {seen_epsilon:.6g} already seen"
        return None

    def summary(self) -> dict[str, Any]:
        values = np.array(list(self.epsilon_by_device.values()), dtype=float)
        if values.size == 0:
            return {"all-epsilon-max": None, "all-epsilon-median": None, "devices-with-spend": 0}
        return {"all-epsilon-max": float(values.max()), "all-epsilon-median": float(np.median(values)),
                "devices-with-spend": int(values.size)}


def train_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """This round's cohort: example-weighted train loss, epsilon max/median, counts."""
    rows = [next(iter(r.metric_records.values())) for r in replies]
    weights = np.array([float(m[weight_key]) for m in rows])
    out = MetricRecord({
        "devices": len(rows),
        "examples": float(weights.sum()),
        "steps-mean": float(np.mean([float(m["steps"]) for m in rows])),
    })
    # Devices under DP send no training loss (it depends on their data); plain devices do.
    with_loss = [(float(m["train-loss"]), float(m[weight_key])) for m in rows if "train-loss" in m]
    if with_loss:
        losses, loss_weights = np.array(with_loss).T
        total = loss_weights.sum()
        out["train-loss"] = float((losses * loss_weights).sum() / total) if total > 0 else 0.0
    if rows and "epsilon" in rows[0]:
        eps = np.array([float(m["epsilon"]) for m in rows])
        out["epsilon-max"] = float(eps.max())
        out["epsilon-median"] = float(np.median(eps))
    return out


def evaluate_metrics(replies: list[RecordDict], weight_key: str, seed: int = 0) -> MetricRecord:
    """HR@10 / NDCG@10 pooled over users, with a 95% bootstrap CI that resamples devices."""
    rows = [next(iter(r.metric_records.values())) for r in replies]
    users = np.array([float(m[weight_key]) for m in rows])
    out = MetricRecord({"devices": len(rows), "users": float(users.sum())})
    for split in ("valid", "test"):
        for metric in ("hit", "ndcg"):
            sums = np.array([float(m[f"{split}-{metric}@{K}-sum"]) for m in rows])
            name = f"{split}-{'hr' if metric == 'hit' else 'ndcg'}@{K}"
            out[name] = float(sums.sum() / users.sum()) if users.sum() > 0 else 0.0
            low, high = bootstrap_ci(sums, weights=users, seed=seed)
            out[name + "-ci"] = [float(low), float(high)]
    return out


class CohortView:
    """A Grid seen through a cohort: the wrapped strategy samples exactly these nodes."""

    def __init__(self, grid: Grid, nodes: list[int]):
        self._grid = grid
        self._nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class RoundTracking:
    """Mixin for a Flower strategy: who trains, evaluation schedule, privrec's per-round bookkeeping.

    Devices that declined (privacy cap reached) are never asked again; when fewer eligible devices
    remain than a round needs, `BudgetExhausted` ends the run cleanly.
    """

    def __init__(self, *args, eval_every: int, num_rounds: int, on_train: Callable[[int, dict], None],
                 on_evaluate: Callable[[int, dict], None], cohort: int, accountant: str = "rdp",
                 poisson_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_every = eval_every
        self.num_rounds = num_rounds
        self.on_train = on_train
        self.on_evaluate = on_evaluate
        self.cohort = cohort
        self.accountant = accountant
        # User-level DP needs Poisson sampling whose outcome the adversary cannot predict: OS entropy,
        # never the run seed (a seeded cohort would forfeit the amplification the accountant claims).
        self.poisson_rate = poisson_rate
        self._secret_rng = random.SystemRandom()
        self.privacy = PrivacyTally()
        self.round_declines = 0
        self.asked = self.eval_asked = 0

    def choose_cohort(self, grid: Grid) -> list[int]:
        _, connected = sample_nodes(grid, self.min_available_nodes, 0)  # waits until enough nodes joined
        eligible = [n for n in connected if not self.privacy.is_capped(n)]
        if self.poisson_rate is not None:
            if not eligible:
                raise BudgetExhausted(f"every one of the {len(connected)} connected devices has reached its "
                                      "privacy cap")
            return poisson_cohort(eligible, self.poisson_rate, self._secret_rng)
        if len(eligible) < self.cohort:
            raise BudgetExhausted(f"only {len(eligible)} of {len(connected)} devices are below their privacy cap; "
                                  f"a round needs {self.cohort}")
        return random.sample(eligible, self.cohort)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        cohort = self.choose_cohort(grid)
        self.asked = len(cohort)  # devices sent a train message this round (failures are judged against it)
        self.current_global = {k: a.numpy() for k, a in arrays.items()}
        if not cohort:  # Poisson sampling drew nobody: the round is still a (pure-noise) release
            return []
        # The wrapped strategy samples min_train_nodes of the view's nodes, i.e. exactly the cohort.
        wait_for, self.min_available_nodes = self.min_available_nodes, 0
        self.min_train_nodes = len(cohort)
        try:
            messages = super().configure_train(server_round, arrays, config, CohortView(grid, cohort))
        finally:
            self.min_available_nodes = wait_for
        return [self._with_seen_spend(m) for m in messages]

    def _with_seen_spend(self, message: Message) -> Message:
        """Tell a known device the spend the server has already seen from it: it refuses to train below it.

        Only devices that replied in this launch are known by node id; after a restart the reply check
        (`PrivacyTally.record_reply`) refuses a device whose spend went down.
        """
        device = self.privacy.node_devices.get(message.metadata.dst_node_id)
        steps = self.privacy.seen_steps(device) if device is not None else 0
        if not steps:
            return message
        content = RecordDict(dict(message.content.items()))  # the payload is shared by every message
        content[SEEN_SPEND] = ConfigRecord({"device": device, "steps": steps})
        return Message(content=content, message_type=message.metadata.message_type,
                       dst_node_id=message.metadata.dst_node_id)

    def is_eval_round(self, server_round: int) -> bool:
        if server_round == self.num_rounds:
            return True
        return self.eval_every > 0 and server_round % self.eval_every == 0

    # Flower counts rounds from 1 in every `start()`; a resumed run continues after its checkpoint,
    # so every hook below works with the run's true round number.
    round_offset = 0

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self.eval_asked = 0
        if not self.is_eval_round(server_round):
            return []
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.eval_asked = len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = list(replies)
        trained, declined, refused = [], 0, 0
        for msg in replies:
            if msg.has_error():
                trained.append(msg)  # Flower's aggregation logs and skips it
                continue
            outcome = self.privacy.record_reply(server_round, msg.metadata.src_node_id, msg.content,
                                                self.accountant)
            declined += outcome == DECLINED
            refused += outcome == REFUSED
            if outcome == TRAINED:
                trained.append(msg)
        arrays, metrics = super().aggregate_train(server_round, trained)
        stats = dict(metrics) if metrics is not None else {"devices": 0}
        errors = [m for m in replies if m.has_error()]
        stats["failures"] = len(errors)
        stats["asked"] = self.asked
        stats["no-reply"] = max(0, self.asked - len(replies))  # lost or late past round-timeout
        if errors:  # Flower's wording of the first device's exception, for the operator
            stats["first-error"] = errors[0].error.reason
        stats["declined"] = declined
        stats["capped-devices"] = len(self.privacy.capped)
        stats.update(self.privacy.summary())
        stats["refused"] = refused  # replies whose spend was below what the server had seen from the device
        self.on_train(server_round, stats)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        errors = [m for m in replies if m.has_error()]
        if metrics is not None or errors:
            stats = dict(metrics) if metrics is not None else {}
            stats.update({"failures": len(errors), "asked": self.eval_asked})
            if errors:
                stats["first-error"] = errors[0].error.reason
            self.on_evaluate(server_round, stats)
        return metrics


class UserLevelDP(FedAvg):
    """DP-FedAvg aggregation (`shared.privacy.user_level`) in place of FedAvg's weighted mean.

    Sits under FedAdam/FedProx in the MRO, so server optimizers receive the noised mean. Only the
    arrays devices can change (their trainable scope) get noise; the rest never differ from the
    global model, so they carry no information about anyone.
    """

    user_dp: dict[str, Any] | None = None  # set by `enable_user_dp` (FedAdam's __init__ takes no extra keys)

    def enable_user_dp(self, settings: dict[str, Any]) -> None:
        self.user_dp = settings
        self.noise_rng = np.random.default_rng()  # OS entropy; tests may replace it with a seeded one
        self.last_clip_norms: list[float] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        if not self.user_dp:
            return super().aggregate_train(server_round, replies)
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        current = self.current_global
        noised_keys = [k for k in current if k not in FROZEN_BY_SCOPE[self.user_dp["device-trains"]]]
        clipped, self.last_clip_norms = [], []
        for msg in valid:
            arrays = next(iter(msg.content.array_records.values()))
            update = {k: arrays[k].numpy().astype(np.float64) - current[k] for k in noised_keys}
            c, norm = clip_update(update, self.user_dp["clip"])
            clipped.append(c)
            self.last_clip_norms.append(norm)
        mean = noisy_mean_update(clipped, noised_keys, {k: current[k].shape for k in noised_keys},
                                 noise_std=self.user_dp["noise-multiplier"] * self.user_dp["clip"],
                                 expected_cohort=self.user_dp["expected-cohort"], rng=self.noise_rng)
        new = {k: (current[k] + mean[k]).astype(current[k].dtype) if k in mean else current[k] for k in current}
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key) if valid else None
        return ArrayRecord({k: _array(v) for k, v in new.items()}), metrics


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))


STRATEGY_BASES = {"fedavg": FedAvg, "fedadam": FedAdam, "fedprox": FedProx}


def build_strategy(cfg: dict[str, Any], num_devices: int, on_train, on_evaluate):
    """The configured Flower strategy with privrec's round tracking in front of it."""
    base = STRATEGY_BASES[cfg["strategy"]]
    bases = (RoundTracking, UserLevelDP) if base is FedAvg else (RoundTracking, base, UserLevelDP)
    strategy_cls = type(f"Privrec{base.__name__}", bases, {})
    cohort = cohort_size(cfg, num_devices)
    kwargs: dict[str, Any] = dict(
        # Flower samples max(int(fraction * available), min_train_nodes): a tiny fraction with
        # min_train_nodes = cohort gives exactly `cohort` devices per round.
        fraction_train=1e-9,
        min_train_nodes=cohort,
        min_available_nodes=cohort,
        fraction_evaluate=cfg["fraction-evaluate"],
        min_evaluate_nodes=max(1, int(cfg["fraction-evaluate"] * num_devices)),
        train_metrics_aggr_fn=train_metrics,
        evaluate_metrics_aggr_fn=lambda replies, key: evaluate_metrics(replies, key, cfg["seed"]),
    )
    if cfg["strategy"] == "fedadam":
        kwargs.update(eta=cfg["server-lr"], eta_l=cfg["local-lr"])
    if cfg["strategy"] == "fedprox":
        kwargs.update(proximal_mu=cfg["proximal-mu"])
    strategy = strategy_cls(eval_every=cfg["eval-every"], num_rounds=cfg["num-rounds"],
                            on_train=on_train, on_evaluate=on_evaluate, cohort=cohort, accountant=cfg["accountant"],
                            poisson_rate=user_sample_rate(cfg, num_devices) if cfg["user-dp"] else None, **kwargs)
    if cfg["user-dp"]:
        strategy.enable_user_dp({"noise-multiplier": cfg["user-noise-multiplier"], "clip": cfg["user-clipping-norm"],
                                 "expected-cohort": float(cohort), "device-trains": cfg["device-trains"]})
    return strategy


def user_sample_rate(cfg: dict[str, Any], num_devices: int) -> float:
    """DP-FedAvg's Poisson rate q: the expected cohort over the whole population."""
    return cohort_size(cfg, num_devices) / num_devices


def cohort_size(cfg: dict[str, Any], num_devices: int) -> int:
    """Devices per round: the configured count, or the fraction of all devices, within [1, num_devices]."""
    if cfg["devices-per-round"] > 0:
        wanted = cfg["devices-per-round"]
    else:
        wanted = int(round(cfg["fraction-train"] * num_devices))
    return max(1, min(wanted, num_devices))
