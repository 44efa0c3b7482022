"""Suite-wide settings."""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # A 2-core machine shared with other jobs: intra-op threads only add contention for tiny models.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 encoder from the installed package (loaded once: a few seconds)."""
    from shared.text.encoder import TextEncoder

    return TextEncoder()


# The slowest tests, longest first (seconds from `--durations` of a sequential CI run). They start real Flower
# processes and mostly wait (a ClientApp process per message, 3 s polls, heartbeats), so under pytest-xdist
# (`-n 3 --dist loadgroup`, the README's test command) they go first and overlap the CPU-bound rest instead of
# ending the run alone. tests/test_architecture.py checks that each name still exists.
SLOWEST_FIRST = (
    "test_secagg_deployment.py::test_eight_supernodes_two_killed_after_masking_complete_their_rounds",  # 305
    "test_deployment.py::test_faults_a_node_dies_mid_round_then_the_superlink_restarts_and_the_run_resumes",  # 150
    "test_scorer_deployment.py::test_the_default_pipeline_under_secure_aggregation_over_real_supernodes",  # 145
    "test_secagg_deployment.py::test_secure_aggregation_rounds_over_real_supernodes",  # 110
    "test_scorer_deployment.py::test_the_default_pipeline_over_real_supernodes",  # 110
    "test_secagg_deployment.py::test_a_supernode_killed_after_masking_leaves_the_survivors_sum",  # 95
    "test_deployment.py::test_tls_and_node_auth_two_dp_rounds_end_to_end",  # 95
    "test_multinode.py::test_simulation_runs_on_both_nodes_of_a_ray_cluster",  # 46
    "test_faults.py::test_sigterm_stops_every_process_marks_the_run_interrupted_and_loses_no_spend",  # 35
    "test_faults.py::test_kill_9_of_the_launcher_stops_the_run_through_its_watchdog",  # 34
    "test_flwr_run.py::test_flwr_run_simulation_completes",  # 32
    "test_flwr_run.py::test_failed_run_is_reported_as_failed",  # 26
)


def pytest_collection_modifyitems(config, items):
    """Under xdist, the slowest tests first, and behind each worker's first test a quick one.

    xdist's scheduler hands each worker two tests at the start and another whenever it has at most two left, so
    a worker's second test waits for its first: quick tests there keep the next slow ones for idle workers.
    A run without workers keeps the files' order (a module's shared deployment is started once)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not workers:
        return
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    slow = sorted((item for item in items if _short_id(item) in rank), key=lambda item: rank[_short_id(item)])
    rest = [item for item in items if _short_id(item) not in rank]
    items[:] = slow[:workers] + rest[:workers] + slow[workers:] + rest[workers:]


def _short_id(item) -> str:
    return item.nodeid.removeprefix("tests/")
