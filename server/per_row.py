"""`PerRowAveraging`: the round's model with each item-embedding row averaged over the devices that changed it.

An item's row of `item_emb.weight` gets a gradient only on a device whose windows hold the item, so
FedAvg's mean over the whole cohort moves a row touched by 2 of 64 devices by ~2/64 of what they asked
for. This wrapper averages that row over the devices whose update changed it instead (example-weighted,
as FedAvg), and every other array as FedAvg does (`shared.aggregation.mean_update`). Like `UserLevelDP`
it hands the result to the wrapped Flower strategy as the round's one reply, so FedAdam still takes its
server step from it and FedAvg/FedProx return it as it is.

`momentum` (run config `row-momentum`) adds heavy-ball server momentum on those rows only, FedAvgM's
step with server rate 1 (the rest of the model keeps FedAvg's step): velocity = momentum x velocity + the
round's per-row mean, and the rows move by the velocity. Measured in `simulations.fedopt`
(`rows-epochs1-lr01-avgm-rows`, README "Closing gap (c)"). The velocity is part of the checkpoint.

Non-private runs only (the config refuses it with dp or user-dp): which rows a device changed names
the items it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.wrapper import StrategyWrapper
from shared.aggregation import mean_update, touched_rows
from shared.errors import PrivrecError

log = logging.getLogger("flwr")

ROW_KEY = "item_emb.weight"  # row r = item r; the output head is untied and averaged as FedAvg (measured best)


class PerRowAveraging(StrategyWrapper):
    """FedAvg, except that each row of `item_emb.weight` is averaged over the devices that touched it."""

    def __init__(self, strategy: Strategy, *, weight_key: str = "num-examples", momentum: float = 0.0):
        super().__init__(strategy)
        if not 0.0 <= momentum < 1.0:
            raise PrivrecError(f"per-row averaging: row-momentum = {momentum!r} must be in [0, 1)")
        self.weight_key = weight_key
        self.momentum = momentum
        self.velocity: dict[str, np.ndarray] = {}  # ROW_KEY -> the rows' running step (momentum > 0 only)
        self.current: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        log.info("\t├──> Per-row averaging of %s over the devices that changed each row (momentum %g)", ROW_KEY,
                 self.momentum)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = {k: a.numpy() for k, a in arrays.items()}  # updates are taken against this round's model
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        if not valid:
            return self.strategy.aggregate_train(server_round, replies)  # Flower's own handling of an empty round
        model = self.aggregate(valid)
        return self.hand_over(server_round, model, self.weight_key)

    def aggregate(self, replies: list[Message]) -> ArrayRecord:
        """The round's model from the devices' replies (no error replies)."""
        current = self.current
        updates, weights = [], []
        for msg in replies:
            arrays = _one_record(msg.content.array_records.values(), msg, current)
            updates.append({k: arrays[k].numpy().astype(np.float64) - current[k] for k in current})
            metrics = list(msg.content.metric_records.values())
            weights.append(float(metrics[0][self.weight_key]))
        masks = [{ROW_KEY: touched_rows(u[ROW_KEY])} for u in updates] if ROW_KEY in current else None
        mean = mean_update(updates, weights, masks)
        if self.momentum > 0 and ROW_KEY in mean:
            self.velocity[ROW_KEY] = self.momentum * self.velocity.get(ROW_KEY, 0.0) + mean[ROW_KEY]
            mean[ROW_KEY] = self.velocity[ROW_KEY]
        return ArrayRecord({k: Array(np.ascontiguousarray((current[k] + mean[k]).astype(current[k].dtype)))
                            for k in current})


def _one_record(records: Iterable[ArrayRecord], msg: Message, current: dict[str, np.ndarray]) -> ArrayRecord:
    records = list(records)
    if len(records) != 1 or set(records[0].keys()) != set(current):
        raise PrivrecError(f"device {msg.metadata.src_node_id} replied without the model's arrays: expected one "
                           f"ArrayRecord holding the {len(current)} arrays of the global model")
    return records[0]
