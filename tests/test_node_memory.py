"""A simulated node process gives the memory a message freed back to the operating system.

Measured in a Ray node process before: resident memory ratcheted up message after message (about 140 MiB
over 20 rounds) while the Python and torch objects in use stayed flat; glibc's heap kept the freed blocks.
"""

from __future__ import annotations

import sys

import pytest

import shared.memory
from shared.memory import return_freed_memory


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc")
def test_freed_heap_blocks_go_back_to_the_os():
    blocks = [bytes(bytearray(2000)) for _ in range(40_000)]  # ~80 MB of malloc'd (not pymalloc) blocks
    pinned = blocks[::200]  # a few live blocks spread over the heap keep it from shrinking by itself
    del blocks
    held = _rss_mib()
    assert return_freed_memory(limit_mib=1000) is False  # under the limit: kept for reuse
    assert held - _rss_mib() < 10
    assert return_freed_memory(limit_mib=20) is True
    assert held - _rss_mib() > 40  # most of the 80 MB was freed and is returned
    assert pinned


def test_each_node_message_ends_by_returning_freed_memory(monkeypatch):
    import client.node

    calls = []
    monkeypatch.setattr(shared.memory, "return_freed_memory", lambda: calls.append(1))  # the limit: its own test

    @shared.memory.trims_memory_after
    def message():
        raise RuntimeError("a failed message too")

    with pytest.raises(RuntimeError):
        message()
    assert calls == [1]
    assert client.node.train_devices.__wrapped__ and client.node.evaluate_devices.__wrapped__
