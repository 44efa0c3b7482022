"""Server-side strategy: the chosen Flower strategy, built plainly, inside privrec's wrappers.

Each wrapper holds the one inside it (`self.strategy`, as Flower's `dp_fixed_clipping.py` does) and
overrides only the hooks its job needs. Outermost first:

    ResumedRun          true round numbers after a resume; what a checkpoint restores (server/rounds.py)
    RoundReport         devices asked, failed, silent -> the ServerApp's callbacks   (server/rounds.py)
    EvaluationSchedule  devices evaluate every `eval-every` rounds and at the end    (server/rounds.py)
    CohortChoice        the round's cohort among devices below their privacy cap     (server/cohort.py)
    SpendBooking        every reply booked in the privacy tally; declines, refusals  (server/booking.py)
    NodeAggregates      nodes' aggregates of their devices (devices-per-node > 1)    (server/device_nodes.py)
    UserLevelDP         DP-FedAvg clip + noise, fixed denominator (user-dp only)     (server/user_dp.py)
    PerRowAveraging     item_emb rows averaged over the devices that changed them   (server/per_row.py)
                        (aggregation = per-row, or auto in a non-private run)
    FedAvg | FedAdam | FedProx   Flower's own, unchanged

The figures privrec reports are made here: epsilon as max and median over devices (never a mean),
and HR/NDCG pooled over devices with a bootstrap confidence interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from server.booking import SpendBooking
from server.cohort import CohortChoice
from server.device_nodes import NodeAggregates, NodeSums
from server.per_row import PerRowAveraging
from server.round_clock import RoundClock, TimedStrategy
from server.rounds import EvaluationSchedule, ResumedRun, RoundReport
from server.tally import PrivacyTally
from server.user_dp import KeepFrozen, UserLevelDP
from shared.config import SCORER_MODELS, aggregation_in_effect
from shared.metrics import bootstrap_ci
from shared.model import FROZEN_BY_SCOPE
from shared.scorer import CHANNEL_FROZEN
from shared.scorer import FROZEN as SCORER_FROZEN

K = 10


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
    consenting = sum(int(m["consenting"]) for m in rows if "consenting" in m)
    if consenting:  # consenting devices (public-share) send a zero update: their history trained the SASRec channel
        out["consenting-zero-updates"] = consenting
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


def _no_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """The Flower strategy averages models only: `SpendBooking` makes the train metrics from the replies."""
    return MetricRecord()


def flower_strategy(name: str, *, fraction_evaluate: float, min_evaluate_nodes: int, seed: int,
                    server_lr: float, server_tau: float, local_lr: float, proximal_mu: float) -> FedAvg:
    """FedAvg, FedAdam or FedProx, taking every node `CohortChoice` shows it (no minimum of its own)."""
    common: dict[str, Any] = dict(
        fraction_train=1.0, min_train_nodes=0, min_available_nodes=0,
        fraction_evaluate=fraction_evaluate, min_evaluate_nodes=min_evaluate_nodes,
        train_metrics_aggr_fn=_no_metrics,
        evaluate_metrics_aggr_fn=lambda replies, key: evaluate_metrics(replies, key, seed),
    )
    if name == "fedadam":
        return FedAdam(**common, eta=server_lr, eta_l=local_lr, tau=server_tau)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=proximal_mu)
    return FedAvg(**common)


def build_strategy(cfg: dict[str, Any], num_devices: int, on_train, on_evaluate,
                   clock: RoundClock | None = None) -> ResumedRun:
    """The configured Flower strategy inside privrec's wrappers; the one place that reads the run config.
    With `clock`, the hooks' seconds are added to it (server/round_clock.py)."""
    cohort = cohort_size(cfg, num_devices)
    flower = flower_strategy(cfg["strategy"], fraction_evaluate=cfg["fraction-evaluate"],
                             min_evaluate_nodes=max(1, int(cfg["fraction-evaluate"] * num_devices)),
                             seed=cfg["seed"], server_lr=cfg["server-lr"], server_tau=cfg["server-tau"],
                             local_lr=cfg["local-lr"],
                             proximal_mu=cfg["proximal-mu"])
    tally = PrivacyTally()
    strategy: Strategy = flower
    per_row = None
    # Under secure aggregation the devices clip and noise their own updates and the Grid wrapper
    # (server/secagg.py) releases current + noised sum / expected cohort: no server-side DP on top.
    hosted = cfg["devices-per-node"] > 1  # simulated nodes reply with aggregates (server/device_nodes.py)
    frozen = (CHANNEL_FROZEN if cfg["model"] == "channel-scorer" else SCORER_FROZEN) \
        if cfg["model"] in SCORER_MODELS else FROZEN_BY_SCOPE[cfg["device-trains"]]
    if cfg["user-dp"] and cfg["secure-aggregation"]:
        strategy = KeepFrozen(strategy, frozen)
    if cfg["user-dp"] and not cfg["secure-aggregation"]:
        strategy = UserLevelDP(strategy, noise_multiplier=cfg["user-noise-multiplier"],
                               clipping_norm=cfg["user-clipping-norm"], expected_cohort=float(cohort),
                               frozen=frozen, summation=NodeSums() if hosted else None)
    elif aggregation_in_effect(cfg) == "per-row":  # never with dp, user-dp, secure aggregation or node hosting
        strategy = per_row = PerRowAveraging(strategy, momentum=cfg["row-momentum"])
    if hosted:
        strategy = NodeAggregates(strategy)
    strategy = SpendBooking(strategy, tally=tally, accountant=cfg["accountant"], metrics_fn=train_metrics)
    strategy = CohortChoice(strategy, tally=tally, cohort=cohort, min_available=cohort,
                            poisson_rate=user_sample_rate(cfg, num_devices) if cfg["user-dp"] else None)
    strategy = EvaluationSchedule(strategy, eval_every=cfg["eval-every"], num_rounds=cfg["num-rounds"])
    strategy = RoundReport(strategy, on_train=on_train, on_evaluate=on_evaluate)
    if clock is not None:
        strategy = TimedStrategy(strategy, clock)
    return ResumedRun(strategy, privacy=tally, flower=flower, per_row=per_row)


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
