"""Suite-wide settings."""

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
