"""Server-side strategy: a Flower strategy (FedAvg, FedAdam or FedProx) plus privrec's round logic.

`RoundTracking` sits in front of the chosen Flower strategy in the MRO. It does not change how
models are aggregated; it decides when to evaluate, and turns replies into the figures privrec
reports: epsilon as max and median over devices (never a mean), and HR/NDCG pooled over devices
with a bootstrap confidence interval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from shared.metrics import bootstrap_ci

K = 10


@dataclass
class PrivacyTally:
    """Latest cumulative epsilon reported by each device (keyed by Flower node id)."""

    epsilon_by_device: dict[int, float] = field(default_factory=dict)

    def update(self, node_id: int, epsilon: float) -> None:
        # A device's epsilon never decreases; keep the largest ever reported.
        self.epsilon_by_device[node_id] = max(epsilon, self.epsilon_by_device.get(node_id, 0.0))

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
    losses = np.array([float(m["train-loss"]) for m in rows])
    out = MetricRecord({
        "devices": len(rows),
        "examples": float(weights.sum()),
        "train-loss": float((losses * weights).sum() / weights.sum()) if weights.sum() > 0 else 0.0,
        "steps-mean": float(np.mean([float(m["steps"]) for m in rows])),
    })
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


class RoundTracking:
    """Mixin for a Flower strategy: evaluation schedule and privrec's per-round bookkeeping."""

    def __init__(self, *args, eval_every: int, num_rounds: int, on_train: Callable[[int, dict], None],
                 on_evaluate: Callable[[int, dict], None], **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_every = eval_every
        self.num_rounds = num_rounds
        self.on_train = on_train
        self.on_evaluate = on_evaluate
        self.privacy = PrivacyTally()

    def is_eval_round(self, server_round: int) -> bool:
        if server_round == self.num_rounds:
            return True
        return self.eval_every > 0 and server_round % self.eval_every == 0

    # Flower counts rounds from 1 in every `start()`; a resumed run continues after its checkpoint,
    # so every hook below works with the run's true round number.
    round_offset = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if not self.is_eval_round(server_round):
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        for msg in replies:
            if msg.has_error():
                continue
            record = next(iter(msg.content.metric_records.values()))
            if "epsilon" in record:
                self.privacy.update(msg.metadata.src_node_id, float(record["epsilon"]))
        stats = dict(metrics) if metrics is not None else {"devices": 0}
        stats["failures"] = sum(1 for m in replies if m.has_error())
        stats.update(self.privacy.summary())
        self.on_train(server_round, stats)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.on_evaluate(server_round, dict(metrics))
        return metrics


STRATEGY_BASES = {"fedavg": FedAvg, "fedadam": FedAdam, "fedprox": FedProx}


def build_strategy(cfg: dict[str, Any], num_devices: int, on_train, on_evaluate):
    """The configured Flower strategy with privrec's round tracking in front of it."""
    base = STRATEGY_BASES[cfg["strategy"]]
    strategy_cls = type(f"Privrec{base.__name__}", (RoundTracking, base), {})
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
    return strategy_cls(eval_every=cfg["eval-every"], num_rounds=cfg["num-rounds"],
                        on_train=on_train, on_evaluate=on_evaluate, **kwargs)


def cohort_size(cfg: dict[str, Any], num_devices: int) -> int:
    """Devices per round: the configured count, or the fraction of all devices, within [1, num_devices]."""
    if cfg["devices-per-round"] > 0:
        wanted = cfg["devices-per-round"]
    else:
        wanted = int(round(cfg["fraction-train"] * num_devices))
    return max(1, min(wanted, num_devices))
