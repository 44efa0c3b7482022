"""`UserLevelDP`: DP-FedAvg (`shared.privacy.user_level`) around the chosen Flower strategy.

The wrapper releases `current + (sum of clipped updates + N(0, (z C)^2)) / expected cohort` and
hands that one noised model to the wrapped strategy as the round's only reply, so FedAvg and
FedProx return it as it is and FedAdam takes its server step from it (post-processing of the
release). Only the arrays devices can change get noise; the rest never differ from the global model
and carry no information about anyone.

Where the sum comes from is an `UpdateSum`: `ServerSideClipping` clips every reply on the server;
secure aggregation supplies a summation whose server only ever learns the sum of updates the
devices clipped themselves. The mechanism, and its accounting, are the same for both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.wrapper import StrategyWrapper
from shared.aggregation import is_frozen
from shared.errors import PrivrecError
from shared.privacy.user_level import clip_update, noisy_mean_update

log = logging.getLogger("flwr")  # Flower's handler: our lines appear in the run's log stream


@dataclass
class ClippedSum:
    """The sum over a round's cohort of updates clipped to L2 norm `clip` (float64, one array per key)."""

    total: dict[str, np.ndarray]
    count: int  # updates in the sum: for the log only, the denominator is the expected cohort


class UpdateSum(Protocol):
    """How a round's replies become one `ClippedSum` (the only thing the DP mechanism reads).

    `configure` sees the round's train messages before they are sent (with the Grid, for a protocol
    that needs stages of its own, e.g. key agreement) and may add its per-device instructions;
    `clipped_sum` turns the replies of devices that trained into the sum.
    """

    def configure(self, server_round: int, messages: list[Message], grid: Grid) -> list[Message]: ...

    def clipped_sum(self, replies: Sequence[Message], current: Mapping[str, np.ndarray], keys: Sequence[str],
                    clip: float) -> ClippedSum: ...


class ServerSideClipping:
    """The server sees each device's weights: it clips `weights - current` to `clip` and adds them up."""

    def __init__(self) -> None:
        self.last_norms: list[float] = []  # every update's norm before clipping, last round (for tests and logs)

    def configure(self, server_round: int, messages: list[Message], grid: Grid) -> list[Message]:
        return messages  # devices send their weights as they are

    def clipped_sum(self, replies: Sequence[Message], current: Mapping[str, np.ndarray], keys: Sequence[str],
                    clip: float) -> ClippedSum:
        total = {k: np.zeros(current[k].shape, dtype=np.float64) for k in keys}
        self.last_norms = []
        for msg in replies:
            weights = _only_arrays(msg, keys)
            clipped, norm = clip_update({k: weights[k].numpy().astype(np.float64) - current[k] for k in keys}, clip)
            for k in keys:
                total[k] += clipped[k]
            self.last_norms.append(norm)
        return ClippedSum(total=total, count=len(replies))


def _only_arrays(msg: Message, keys: Sequence[str]) -> ArrayRecord:
    """The reply's one ArrayRecord, holding every key the mechanism needs (Flower's own check, for our path)."""
    records = list(msg.content.array_records.values())
    if len(records) != 1 or not set(keys) <= set(records[0].keys()):
        raise PrivrecError(f"device {msg.metadata.src_node_id} replied without the model's trainable arrays: "
                           f"expected one ArrayRecord holding {len(keys)} arrays")
    return records[0]


class UserLevelDP(StrategyWrapper):
    """DP-FedAvg with a fixed denominator: `noise_multiplier` z, `clipping_norm` C, `expected_cohort` q N.

    `frozen` names the arrays devices never change (`shared.model.FROZEN_BY_SCOPE`; a name ending in "." covers
    every array under it, `shared.aggregation.is_frozen`); `rng` draws the
    noise (OS entropy unless a test passes a seeded one).
    """

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clipping_norm: float,
                 expected_cohort: float, frozen: Iterable[str] = (), summation: UpdateSum | None = None,
                 weight_key: str = "num-examples", rng: np.random.Generator | None = None):
        super().__init__(strategy)
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.expected_cohort = expected_cohort
        self.frozen = frozenset(frozen)
        self.summation = summation or ServerSideClipping()
        self.weight_key = weight_key
        self.rng = rng or np.random.default_rng()
        self.current: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        log.info("\t├──> User-level DP (DP-FedAvg): noise multiplier %s, clipping norm %s, expected cohort %s",
                 self.noise_multiplier, self.clipping_norm, self.expected_cohort)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = {k: a.numpy() for k, a in arrays.items()}
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        return self.summation.configure(server_round, messages, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        log.info("aggregate_train: received %s results and %s failures", len(valid), len(replies) - len(valid))
        for msg in replies:
            if msg.has_error():
                log.info("\t> Received error in reply from node %d: %s", msg.metadata.src_node_id, msg.error.reason)
        released = self.release(valid)
        return self.hand_over(server_round, released, self.weight_key)

    def release(self, replies: Sequence[Message]) -> ArrayRecord:
        """The round's noised model. With no reply at all it is pure noise: the round is still a release."""
        current = self.current
        keys = [k for k in current if not is_frozen(k, self.frozen)]
        clipped = self.summation.clipped_sum(replies, current, keys, self.clipping_norm)
        mean = noisy_mean_update([clipped.total], keys, {k: current[k].shape for k in keys},
                                 noise_std=self.noise_multiplier * self.clipping_norm,
                                 expected_cohort=self.expected_cohort, rng=self.rng)
        new = {k: (current[k] + mean[k]).astype(current[k].dtype) if k in mean else current[k] for k in current}
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new.items()})


class KeepFrozen(StrategyWrapper):
    """Frozen arrays leave each round exactly as they entered it (under secure aggregation).

    The secure-aggregation grid (`server.secagg.SecureAggregationGrid`) hands every surviving device's reply
    the same aggregate; Flower's weighted mean of identical float32 arrays is not bit-exact, and FedAdam
    magnifies the rounding (about 1e-5 after two rounds, measured). `frozen` as in `UserLevelDP`."""

    def __init__(self, strategy: Strategy, frozen: Iterable[str]):
        super().__init__(strategy)
        self.frozen = frozenset(frozen)
        self.current: dict[str, Array] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = {k: a for k, a in arrays.items() if is_frozen(k, self.frozen)}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord({k: self.current.get(k, a) for k, a in arrays.items()})
        return arrays, metrics
