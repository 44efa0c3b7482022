"""Names both sides use when one simulated Flower node hosts several devices (`devices-per-node` > 1).

The server (server/device_nodes.py) sends a node one message listing its sampled devices; the node
(client/node.py) trains each of them as on its own and replies with every device's own records and one
aggregate of those that trained.
"""

from __future__ import annotations

NODE_DEVICES = "node-devices"  # instruction: {"devices": [store index], "ids": [server's id]}; reply: per device
SEEN_SPEND_LIST = "privacy-seen-list"  # instruction: {"devices": [device], "steps": [steps the server has seen]}
NODE_AGGREGATE = "node-aggregate"  # reply: {"ids": [ids in the aggregate], "count": n, "weight": w, "kind": ...}
CLIPPED_SUM = "clipped-sum"  # user-level DP: the sum of the devices' updates, each clipped to user-clipping-norm
WEIGHTED_MEAN = "weighted-mean"  # otherwise: the devices' weights, averaged with FedAvg's example weights


def device_node_id(device_index: int) -> int:
    """The id the server's strategy knows a simulated device by: its store index + 1, the node id the
    in-process grid gives it with one device per node (so cohorts drawn from ids are the same)."""
    return device_index + 1
