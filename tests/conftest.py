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



# Under pytest-xdist (the README's `-n 3 --dist loadgroup`) the real deployment files run as two chains, each on one
# worker (their `xdist_group` marks; a file's tests share its deployment); they go first, then the other real-process
# tests, and the CPU-bound rest fills the third worker and whatever a chain leaves idle.
DEPLOYMENT_FILES = ("test_deployment.py", "test_scorer_deployment.py", "test_secagg_deployment.py")
REAL_PROCESS_NEXT = ("test_multinode.py", "test_faults.py", "test_flwr_run.py")


def pytest_collection_modifyitems(config, items):
    """A run without workers keeps the files' order."""
    if not int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
        return

    def rank(item) -> int:
        if item.path.name in DEPLOYMENT_FILES:
            return 0
        return 1 if item.path.name in REAL_PROCESS_NEXT else 2

    items.sort(key=rank)  # stable: each file keeps its order
