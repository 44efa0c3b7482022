"""Simulated Flower nodes that host many devices (`devices-per-node` = k > 1; simulation only).

A node is a simulation artefact (docs/architecture.md): it saves the Flower and Ray cost of one
message per device. A real deployment has one device per SuperNode, and summing on a simulated node is
no trust boundary (in a simulation the server process can read the shared store anyway).

The strategy stack keeps working with devices. `DeviceGrid` shows it one id per device
(`shared.device_nodes.device_node_id`), so cohorts are drawn over devices exactly as with one device per
node (Poisson per device under user-level DP); it sends each node one message listing its sampled
devices and hands back one reply per device, each with that device's own metrics and privacy record
(booked by `SpendBooking` as before). The node's one aggregate rides on the reply of the first device
in it; `NodeAggregates` passes the aggregates on to the aggregation below it: under user-level DP the
sum of individually clipped updates, read by `NodeSums` (an `UpdateSum`: the DP mechanism and its
accounting are unchanged), otherwise FedAvg's example-weighted mean with the node's total weight.

Node j of the sorted node ids hosts devices [j k, (j + 1) k).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.booking import SEEN_SPEND
from server.user_dp import ClippedSum, _only_arrays
from server.wrapper import StrategyWrapper
from shared.device_nodes import CLIPPED_SUM, NODE_AGGREGATE, NODE_DEVICES, SEEN_SPEND_LIST, device_node_id
from shared.errors import PrivrecError

log = logging.getLogger("flwr")


class DeviceGrid:
    """A Grid of devices over a Grid of nodes hosting `devices_per_node` consecutive devices each (it stands in
    for the Grid, as `SecureAggregationGrid` does: every other call goes to the real one)."""

    def __init__(self, grid: Grid, num_devices: int, devices_per_node: int):
        self._grid = grid
        self.num_devices = num_devices
        self.devices_per_node = devices_per_node
        self._hosts: list[int] | None = None

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def nodes_needed(self) -> int:
        return math.ceil(self.num_devices / self.devices_per_node)

    def get_node_ids(self) -> list[int]:
        """Every device's id once enough nodes have joined to host them all (none before: callers wait)."""
        if self._hosts is None:
            joined = sorted(self._grid.get_node_ids())
            if len(joined) < self.nodes_needed():
                return []
            self._hosts = joined[: self.nodes_needed()]
        return [device_node_id(d) for d in range(self.num_devices)]

    def host_of(self, device_id: int) -> int:
        if self._hosts is None:
            raise RuntimeError("DeviceGrid: no node hosts a device before get_node_ids() saw enough nodes")
        return self._hosts[(device_id - device_node_id(0)) // self.devices_per_node]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        by_node: dict[int, list[Message]] = {}
        for msg in messages:
            by_node.setdefault(self.host_of(msg.metadata.dst_node_id), []).append(msg)
        node_messages = [_node_message(node, group) for node, group in by_node.items()]
        replies = []
        for reply in self._grid.send_and_receive(node_messages, timeout=timeout):
            group = by_node.get(reply.metadata.src_node_id)
            if group is not None:
                replies.extend(_device_replies(reply, group))
        return replies


def _node_message(node: int, group: list[Message]) -> Message:
    """One message for `node`: the devices' common payload, the device list and the spend seen from each."""
    content = RecordDict({k: v for k, v in group[0].content.items() if k != SEEN_SPEND})
    ids = [m.metadata.dst_node_id for m in group]
    content[NODE_DEVICES] = ConfigRecord({"devices": [i - device_node_id(0) for i in ids], "ids": ids})
    seen = [m.content.config_records[SEEN_SPEND] for m in group if SEEN_SPEND in m.content.config_records]
    if seen:
        content[SEEN_SPEND_LIST] = ConfigRecord({"devices": [str(s["device"]) for s in seen],
                                                 "steps": [int(s["steps"]) for s in seen]})
    return Message(content=content, message_type=group[0].metadata.message_type, dst_node_id=node)


def _device_replies(reply: Message, group: list[Message]) -> list[Message]:
    """The node's reply as one reply per device; the first device of the aggregate carries it."""
    if reply.has_error():
        return [Message(reply.error, reply_to=m) for m in group]
    listed = reply.content.config_records[NODE_DEVICES]
    metrics = json.loads(str(listed["metrics"]))
    privacy = json.loads(str(listed["privacy"])) if "privacy" in listed else None
    aggregate = reply.content.config_records.get(NODE_AGGREGATE)
    carrier = int(aggregate["ids"][0]) if aggregate is not None else None
    asked = {m.metadata.dst_node_id: m for m in group}
    out = []
    for position, device_id in enumerate(int(i) for i in listed["ids"]):
        if device_id not in asked:
            continue  # never asked: nothing to hand over
        content = RecordDict({"metrics": MetricRecord(metrics[position])})
        if privacy is not None:
            content["privacy"] = ConfigRecord(privacy[position])
        if device_id == carrier:
            content["arrays"] = reply.content.array_records["arrays"]
            content[NODE_AGGREGATE] = aggregate
        out.append(Message(content, reply_to=asked[device_id]))
    return out


class NodeAggregates(StrategyWrapper):
    """Hands the wrapped aggregation each node's aggregate (from the replies `SpendBooking` counted).

    An aggregate is passed on only when every device in it was counted as trained: a device whose reply
    was refused (spend below what the server had seen) must not reach the model, so its node's whole
    aggregate is left out.
    """

    def __init__(self, strategy, *, weight_key: str = "num-examples"):
        super().__init__(strategy)
        self.weight_key = weight_key

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        counted = {m.metadata.src_node_id for m in replies if not m.has_error()}
        passed = [m for m in replies if m.has_error()]
        for msg in replies:
            aggregate = None if msg.has_error() else msg.content.config_records.get(NODE_AGGREGATE)
            if aggregate is None:
                continue
            left_out = [int(i) for i in aggregate["ids"] if int(i) not in counted]
            if left_out:
                log.warning("privrec: round %d: left out a node's aggregate of %d devices: devices %s were not "
                            "counted as trained", server_round, int(aggregate["count"]), left_out)
                continue
            content = RecordDict({"arrays": msg.content.array_records["arrays"],
                                  "metrics": MetricRecord({self.weight_key: float(aggregate["weight"])}),
                                  NODE_AGGREGATE: aggregate})
            passed.append(Message(content=content, metadata=msg.metadata))
        return self.strategy.aggregate_train(server_round, passed)


class NodeSums:
    """`UpdateSum` for devices hosted on nodes: each node sent the sum of its devices' clipped updates.

    The node clips each device's update exactly as `ServerSideClipping` would (float64, all trainable
    arrays together); here the nodes' sums are added up, and a sum longer than its device count times
    the clipping norm (a node that did not clip) is refused.
    """

    def configure(self, server_round: int, messages: list[Message], grid: Grid) -> list[Message]:
        return messages

    def clipped_sum(self, replies: Sequence[Message], current: Mapping[str, np.ndarray], keys: Sequence[str],
                    clip: float) -> ClippedSum:
        total = {k: np.zeros(current[k].shape, dtype=np.float64) for k in keys}
        count = 0
        for msg in replies:
            aggregate = msg.content.config_records.get(NODE_AGGREGATE)
            if aggregate is None or str(aggregate["kind"]) != CLIPPED_SUM:
                raise PrivrecError(f"node {msg.metadata.src_node_id} replied without a sum of clipped updates "
                                   "under user-dp")
            arrays = _only_arrays(msg, keys)
            node_sum = {k: arrays[k].numpy().astype(np.float64) for k in keys}
            norm = math.sqrt(sum(float(np.sum(np.square(v))) for v in node_sum.values()))
            devices = int(aggregate["count"])
            if norm > devices * clip * (1 + 1e-6):
                raise PrivrecError(f"node {msg.metadata.src_node_id}: the sum of {devices} clipped updates has "
                                   f"norm {norm:.6g}, more than {devices} x user-clipping-norm {clip}")
            for k in keys:
                total[k] += node_sum[k]
            count += devices
        return ClippedSum(total=total, count=count)
