"""Run the real ServerApp logic against the real ClientApp in one process, without Ray.

Used by tests and by experiment scripts that need many rounds quickly (same ServerApp and
ClientApp code as `privrec simulate`, minus the Ray transport).

Flower builds messages from process-level identity fields that only its runtimes set. Setting
them is internal API and may change between Flower versions: this file is the only place that
does it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1


def set_identity() -> None:
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 0


def instruction(content: RecordDict, node_id: int, message_type: str, round_: int = 1,
                message_id: str | None = None) -> Message:
    """A server-to-device message as a Flower runtime would deliver it."""
    metadata = Metadata(run_id=RUN_ID, message_id=message_id or f"msg-{node_id}-{time.monotonic_ns()}", src_node_id=0,
                        dst_node_id=node_id, reply_to_message_id="", group_id=str(round_),
                        created_at=time.time(), ttl=3600, message_type=message_type)
    return Message(content=content, metadata=metadata)


def assign_message_id(message: Message, message_id: str) -> None:
    """What a Grid's `push_messages` does to each message it sends (an internal field in Flower)."""
    message.metadata.__dict__["_message_id"] = message_id


def node_context(node_id: int, node_config: dict, run_config: Mapping[str, Any] | None = None) -> Context:
    """A node's Context as Flower builds it: its node config, and the run config every app of the run gets."""
    return Context(run_id=RUN_ID, node_id=node_id, node_config=node_config, state=RecordDict(),
                   run_config=dict(run_config or {}))


class InProcessGrid(Grid):
    """A Grid whose nodes are partitions served by calling the ClientApp directly."""

    def __init__(self, client_app, num_nodes: int, keep_messages: bool = False, first_node_id: int = 1, *,
                 run_config: Mapping[str, Any] | None = None):
        """Nodes `first_node_id, ...` serve partitions 0, 1, ...: a second launch of the same devices can
        get other node ids, as under Flower. `run_config` is the run's config, which Flower hands to the
        ServerApp and to every ClientApp alike (the flat keys of shared/config.py); `serve` sets it from the
        ServerApp's Context."""
        set_identity()
        self.keep_messages = keep_messages
        self.client_app = client_app
        self.contexts = {first_node_id + p: node_context(first_node_id + p, {"partition-id": p,
                                                                            "num-partitions": num_nodes})
                         for p in range(num_nodes)}
        self.run_config = None if run_config is None else dict(run_config)
        # With keep_messages: every instruction and reply, for tests that inspect what left a device.
        self.delivered: list[Message] = []
        self.replies: list[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - not used in-process
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return instruction(content, dst_node_id, message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        if self.run_config is None:
            raise RuntimeError("InProcessGrid: no run config for the ClientApps; pass run_config= or use serve()")
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.contexts[node].run_config = dict(self.run_config)  # as Flower: the run's config, on every node
            delivered = instruction(msg.content, node, msg.metadata.message_type)
            replies.append(self._run_client(delivered, self.contexts[node]))
            if self.keep_messages:
                self.delivered.append(delivered)
        if self.keep_messages:
            self.replies.extend(replies)
        return replies

    def _run_client(self, message: Message, context: Context) -> Message:
        """The ClientApp's reply; an exception becomes an error reply, worded as Flower's runtimes word it."""
        try:
            return self.client_app(message, context)
        except Exception as exc:  # noqa: BLE001 - a device's failure is a reply, not the server's crash
            reason = str(type(exc)) + ":<'" + str(exc) + "'>"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def serve(server_main, grid: InProcessGrid, context: Context) -> None:
    """Run a ServerApp's main on `grid`; its ClientApps get the ServerApp's run config, as under Flower."""
    grid.run_config = dict(context.run_config)
    server_main(grid, context)
