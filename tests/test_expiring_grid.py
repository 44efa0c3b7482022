"""A round's messages expire when the server stops waiting for them (server/expiring_grid.py)."""

from __future__ import annotations

import time

import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.expiring_grid import ExpiringGrid


@pytest.fixture(autouse=True)
def _a_serverapp_task(monkeypatch):
    """Flower stamps a new message with the run, node and task of the process that builds it."""
    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class _RecordingGrid:
    def __init__(self):
        self.sent: list[Message] = []
        self.run_id = 7  # any other attribute is the wrapped grid's

    def send_and_receive(self, messages, *, timeout=None):
        self.sent = list(messages)
        return []


def _message(built_seconds_ago: float) -> Message:
    message = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    message.metadata.created_at -= built_seconds_ago
    return message


def test_a_rounds_messages_expire_when_its_wait_ends_however_long_ago_they_were_built():
    inner = _RecordingGrid()
    before = time.time()
    ExpiringGrid(inner).send_and_receive([_message(0.0), _message(5.0)], timeout=60.0)
    after = time.time()
    assert len(inner.sent) == 2
    for message in inner.sent:
        expires = message.metadata.created_at + message.metadata.ttl
        assert before + 60.0 <= expires <= after + 60.0  # not 12 hours (Flower's default), not 60 s after building


def test_a_send_without_a_timeout_keeps_flowers_default_and_other_calls_pass_through():
    inner = _RecordingGrid()
    message = _message(0.0)
    default_ttl = message.metadata.ttl
    ExpiringGrid(inner).send_and_receive([message])
    assert inner.sent[0].metadata.ttl == default_ttl > 3600
    assert ExpiringGrid(inner).run_id == 7


def test_a_secure_aggregation_stages_messages_expire_when_the_stage_stops_waiting():
    from flwr.app import ConfigRecord

    from server.secagg import SECAGG, _stage

    class _BatchOnlyGrid(_RecordingGrid):
        def push_messages(self, messages):
            raise NotImplementedError  # as the in-process grid: the stage falls back to send_and_receive

    inner = _BatchOnlyGrid()
    before = time.time()
    _stage(inner, {1: RecordDict({SECAGG: ConfigRecord({"stage": "setup"})})}, timeout=45.0)
    [message] = inner.sent
    assert before + 45.0 <= message.metadata.created_at + message.metadata.ttl <= time.time() + 45.0
