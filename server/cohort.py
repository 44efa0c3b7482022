"""`CohortChoice`: which devices are asked to train in a round, chosen among those below their cap.

The wrapped Flower strategy is built to take every node it is shown (`fraction_train = 1`, no
minimum); this wrapper shows it only the round's cohort (`CohortView`). Devices that declined at
their privacy cap are never asked again; when too few remain, `BudgetExhausted` ends the run cleanly.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from server.tally import PrivacyTally
from server.wrapper import StrategyWrapper
from shared.privacy.user_level import poisson_cohort


class BudgetExhausted(Exception):
    """Too few devices remain under their privacy cap to fill a round: the run stops cleanly."""


class CohortView:
    """A Grid seen through a cohort: the wrapped strategy samples from exactly these nodes."""

    def __init__(self, grid: Grid, nodes: list[int]):
        self._grid = grid
        self._nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class CohortChoice(StrategyWrapper):
    """Chooses each round's cohort: `cohort` devices uniformly, or each with probability `poisson_rate`.

    `poisson_rate` is user-level DP's sampling: its outcome must be unpredictable to the adversary,
    so it draws from OS entropy, never the run seed (a seeded cohort would forfeit the amplification
    the accountant claims). Rounds wait until `min_available` devices have joined.
    """

    def __init__(self, strategy: Strategy, *, tally: PrivacyTally, cohort: int, min_available: int,
                 poisson_rate: float | None = None):
        super().__init__(strategy)
        self.tally = tally
        self.cohort = cohort
        self.min_available = min_available
        self.poisson_rate = poisson_rate
        self._secret_rng = random.SystemRandom()

    def choose(self, grid: Grid) -> list[int]:
        _, connected = sample_nodes(grid, self.min_available, 0)  # waits until enough nodes joined
        eligible = [n for n in connected if not self.tally.is_capped(n)] if self.tally.capped else connected
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
        # An empty Poisson draw still goes through the strategy: the round is a (pure-noise) release.
        return self.strategy.configure_train(server_round, arrays, config, CohortView(grid, self.choose(grid)))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        sample_nodes(grid, self.min_available, 0)  # as for training: wait until enough nodes joined
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)
