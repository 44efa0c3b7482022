"""The scale benchmark's CPU-time accounting: each process's CPU seconds cut at the ServerApp's round ends."""

from __future__ import annotations

import pytest

from server.round_clock import RoundClock
from simulations.scale_bench import steady_cpu


def test_steady_cpu_is_cut_at_round_ends_and_grouped_by_process_not_by_title():
    """Samples are per pid: Ray retitles a worker (`ray::ClientAppActor.run` while it works, `ray::IDLE`
    between messages), which must not split its CPU time (keyed by title, a new title started from 0)."""
    samples = [(100.0, {"7": 10.0, "5": 2.0}),
               (102.0, {"7": 12.0, "5": 2.5, "9": 1.0}),
               (104.0, {"7": 16.0, "5": 3.5, "9": 1.5})]
    titles = {"7": {"ray::ClientAppActor", "ray::ClientAppActor.run", "ray::IDLE"},
              "5": {"python3 flwr-simulation"}, "9": {"raylet"}}
    rows = [{"round": 1, "at": 101.0, "cpu": 0.4}, {"round": 2, "at": 103.0, "cpu": 0.7},
            {"round": 3, "at": 104.0, "cpu": 0.9}]
    cpu = steady_cpu(samples, rows, 4, titles)  # steady rounds 2 and 3: from 101 to 104
    assert cpu["seconds"] == pytest.approx(3.0)
    groups = cpu["cpu_s_by_group"]
    assert groups["nodes (Ray workers running the ClientApp)"] == pytest.approx(16.0 - 11.0)
    assert groups["ServerApp and simulation engine (flwr-simulation)"] == pytest.approx(3.5 - 2.25)
    assert groups["Ray and the rest (raylet, GCS, launcher, ...)"] == pytest.approx(1.5 - 0.5)  # raylet from 0
    assert cpu["serverapp_process_cpu_s"] == pytest.approx(1.6)
    assert steady_cpu(samples, rows[:1], 4, titles) is None


def test_a_round_clock_lap_gives_its_cpu_seconds_and_end_time():
    clock = RoundClock()
    sum(i * i for i in range(200_000))
    lap = clock.lap()
    assert lap["cpu"] > 0 and lap["at"] > 1e9 and lap["wall"] >= 0


def test_the_serverapp_polls_flowers_simulation_grid_for_replies_often():
    from flwr.superlink.grid import InMemoryGrid

    from server.app import REPLY_POLL_SECONDS, _poll_replies_often

    class NoState:
        def state(self):
            return None

    grid = InMemoryGrid(state_factory=NoState())
    assert grid.pull_interval == 0.1  # Flower's default: a round waits 0.05 s on average after its last reply
    _poll_replies_often(grid)
    assert grid.pull_interval == REPLY_POLL_SECONDS < 0.1


def test_the_node_state_bench_runs_both_layouts_through_the_engines_pickling(tmp_path):
    """`simulations.node_state_bench` on a tiny store: each arm's messages succeed (the 'before' arm with the
    one-record-per-device layout patched back in) and give a CPU figure per device."""
    from simulations.node_state_bench import run
    from tests.synthetic import walk_store

    store = walk_store(tmp_path / "store", num_users=8, num_items=30)
    figures = run(store, hosted=6, rate=1.0, mirrors=[0, 5], messages=2)
    assert set(figures) == {"0", "5"}
    for arms in figures.values():
        for arm in ("before", "now"):
            assert len(arms[arm]["cpu_per_device_ms"]) == 2 and min(arms[arm]["cpu_per_device_ms"]) > 0
