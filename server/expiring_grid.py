"""Messages that expire when the server stops waiting for their replies.

Flower gives every message a time-to-live of 12 hours by default, and the SuperLink hands a message to its
SuperNode whenever that node next asks within it. A device that was offline for a round, or a SuperNode
restarted after a crash, would then train on a round the server gave up on long ago: it spends privacy
budget (its ledger counts every training) for a reply nobody reads. The SuperLink drops messages past
their time-to-live, and refuses replies to them, so a round's messages are given exactly the time the
server waits for them (`round-timeout`); sends without a timeout keep Flower's default.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class ExpiringGrid:
    """A Grid whose `send_and_receive(..., timeout=T)` messages live until the server stops waiting."""

    def __init__(self, grid: Grid):
        self._grid = grid

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if timeout is not None:
            now = time.time()
            for message in messages:
                # created_at is when the strategy built the message, a little before it is sent
                message.metadata.ttl = now - message.metadata.created_at + timeout
        return self._grid.send_and_receive(messages, timeout=timeout)
