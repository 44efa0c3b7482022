"""`RoundClock`: where a round's wall time goes on the server, logged once per round.

Phases are timed where they happen: the strategy's four hooks (`TimedStrategy`: cohort sampling and
message building are inside configure_train, clipping, noise and the privacy tally inside
aggregate_train), the Flower Grid's send_and_receive (`TimedGrid`: Ray, the SuperLink and the nodes'
work, in simulation the devices' training), and the ServerApp's run records. What is left of the wall
time is `other` (Flower's own loop, the evaluation callback's central evaluation). Each lap also
gives the CPU seconds this process spent in it (`cpu`: in a simulation this process also runs Flower's
simulation engine, whose threads hand the messages to Ray) and the time it ended (`at`, Unix seconds),
which lets a benchmark cut other processes' CPU time at round boundaries.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from server.wrapper import StrategyWrapper


class RoundClock:
    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # e.g. bytes the round's run records took to write
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()

    def count(self, name: str, value: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + value

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def lap(self) -> dict[str, float]:
        """The phases since the last lap (seconds, with `wall` and `other`) and the counts; starts the next lap."""
        now = time.perf_counter()
        wall = now - self.started
        out = {name: round(seconds, 4) for name, seconds in self.phases.items()}
        out["other"] = round(wall - sum(self.phases.values()), 4)
        out["wall"] = round(wall, 4)
        cpu = time.process_time()
        out["cpu"] = round(cpu - self.cpu_started, 4)
        out["at"] = round(time.time(), 3)
        out.update(self.counts)
        self.phases, self.counts, self.started, self.cpu_started = {}, {}, now, cpu
        return out


class TimedGrid:
    """A Grid whose send_and_receive is timed (every other call goes to the real one)."""

    def __init__(self, grid: Grid, clock: RoundClock):
        self._grid = grid
        self._clock = clock

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        with self._clock.phase("send-and-receive"):
            return list(self._grid.send_and_receive(messages, timeout=timeout))


class TimedStrategy(StrategyWrapper):
    """Times the wrapped strategy's hooks (the message lists are built inside the timed block)."""

    def __init__(self, strategy, clock: RoundClock):
        super().__init__(strategy)
        self.clock = clock

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        with self.clock.phase("configure-train"):
            return list(self.strategy.configure_train(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        with self.clock.phase("aggregate-train"):
            return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        with self.clock.phase("configure-evaluate"):
            return list(self.strategy.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        with self.clock.phase("aggregate-evaluate"):
            return self.strategy.aggregate_evaluate(server_round, replies)
