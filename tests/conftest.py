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



# Under pytest-xdist (the README's `-n 3 --dist loadgroup`): each real deployment file runs on one worker (its tests
# share the file's deployment), two such chains side by side (about 500 s each in a sequential run); the other
# real-process tests come next and the CPU-bound rest fills the third worker and whatever a chain leaves idle.
DEPLOYMENT_CHAINS = {"test_secagg_deployment.py": "deploy-secagg", "test_deployment.py": "deploy-plain",
                     "test_scorer_deployment.py": "deploy-plain"}
REAL_PROCESS_NEXT = ("test_multinode.py", "test_faults.py", "test_flwr_run.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the group marks
def pytest_collection_modifyitems(config, items):
    """A run without workers keeps the files' order."""
    if not int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
        return
    for item in items:
        if item.path.name in DEPLOYMENT_CHAINS:
            item.add_marker(pytest.mark.xdist_group(DEPLOYMENT_CHAINS[item.path.name]))

    def rank(item) -> int:
        if item.path.name in DEPLOYMENT_CHAINS:
            return 0
        return 1 if item.path.name in REAL_PROCESS_NEXT else 2

    items.sort(key=rank)  # stable: each file keeps its order
