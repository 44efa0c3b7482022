"""`StrategyWrapper`: a Flower strategy around another one, as Flower's own DP wrappers are built.

Flower adds behaviour to a strategy by holding it (`dp_fixed_clipping.py`: `self.strategy`) and
delegating every hook it does not change. privrec's round logic is a stack of such wrappers, each
with one job and each overriding only the hooks that job needs (see `server/strategy.py`).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class StrategyWrapper(Strategy):
    """Delegates every hook to `self.strategy`; subclasses override the ones they change."""

    def __init__(self, strategy: Strategy):
        self.strategy = strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def hand_over(self, server_round: int, model: ArrayRecord,
                  weight_key: str) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Give the wrapped Flower strategy `model` as the round's one reply, of weight 1.

        For wrappers that compute the round's model themselves (user-level DP, per-row averaging):
        FedAvg and FedProx return it unchanged, FedAdam takes its server step from it.
        """
        reply = Message(RecordDict({"arrays": model, "metrics": MetricRecord({weight_key: 1.0})}),
                        dst_node_id=0, message_type=MessageType.TRAIN)
        return self.strategy.aggregate_train(server_round, [reply])
