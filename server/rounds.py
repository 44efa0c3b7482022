"""The round as the run sees it: its true number, when devices evaluate, what each round reports.

Three wrappers, outermost first: `ResumedRun` (round numbers and what a checkpoint restores),
`RoundReport` (who was asked, who failed, handed to the ServerApp's callbacks; the failure threshold
itself is `server.app.round_failed`) and `EvaluationSchedule` (federated evaluation every
`eval-every` rounds and after the last one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.per_row import PerRowAveraging
from server.tally import PrivacyTally
from server.wrapper import StrategyWrapper


class EvaluationSchedule(StrategyWrapper):
    """Devices evaluate every `eval_every` rounds (never if 0) and after round `num_rounds`."""

    def __init__(self, strategy: Strategy, *, eval_every: int, num_rounds: int):
        super().__init__(strategy)
        self.eval_every = eval_every
        self.num_rounds = num_rounds

    def is_eval_round(self, server_round: int) -> bool:
        if server_round == self.num_rounds:
            return True
        return self.eval_every > 0 and server_round % self.eval_every == 0

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.is_eval_round(server_round):
            return []
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)


class RoundReport(StrategyWrapper):
    """Counts the devices asked, the failed (error replies) and the silent ones, and reports every round.

    `on_train(round, stats)` and `on_evaluate(round, stats)` receive the wrapped strategy's metrics
    plus `asked`, `failures`, `first-error` (Flower's wording of the first device's exception) and,
    for training, `no-reply` (lost, or late past round-timeout). Evaluation is reported only in rounds
    that evaluated.
    """

    def __init__(self, strategy: Strategy, *, on_train: Callable[[int, dict], None],
                 on_evaluate: Callable[[int, dict], None]):
        super().__init__(strategy)
        self.on_train = on_train
        self.on_evaluate = on_evaluate
        self.asked = self.eval_asked = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.asked = len(messages)  # failures are judged against the devices sent a train message
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        stats = dict(metrics) if metrics is not None else {"devices": 0}
        stats.update(_failures(replies, self.asked))
        stats["no-reply"] = max(0, self.asked - len(replies))
        self.on_train(server_round, stats)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        self.eval_asked = len(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        failures = _failures(replies, self.eval_asked)
        if metrics is not None or failures["failures"]:
            self.on_evaluate(server_round, {**(dict(metrics) if metrics is not None else {}), **failures})
        return metrics


def _failures(replies: list[Message], asked: int) -> dict:
    errors = [m for m in replies if m.has_error()]
    out: dict = {"failures": len(errors), "asked": asked}
    if errors:
        out["first-error"] = errors[0].error.reason
    return out


class ResumedRun(StrategyWrapper):
    """Outermost: the run's true round numbers, and what a checkpoint saves and restores.

    Flower counts rounds from 1 in every `start()`; a resumed run continues after its checkpoint, so
    every wrapper inside sees round `round_offset + n`. `privacy` is the run's tally and `flower` the
    Flower strategy whose own state (FedAdam's moments) `server/checkpoint.py` keeps, as it keeps `per_row`'s
    row velocity.
    """

    def __init__(self, strategy: Strategy, *, privacy: PrivacyTally, flower: Strategy,
                 per_row: PerRowAveraging | None = None):
        super().__init__(strategy)
        self.privacy = privacy
        self.flower = flower
        self.per_row = per_row  # server/per_row.py's wrapper when per-row aggregation is on: its row velocity
        self.round_offset = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.round_offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.round_offset, replies)
