"""Server side of federated analytics: ask every device for its contribution, sum, add the noise once.

Works with any Flower `Grid` (the deployment's, or `simulations.inprocess.InProcessGrid`). Without secure
aggregation the server sees each device's unit-norm vector: the DP guarantee covers whoever sees the
released histogram, not the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from shared.analytics import noisy_sum
from shared.errors import PrivrecError


@dataclass
class Release:
    histogram: np.ndarray  # the released (noisy) sum, index = item id
    noise_multiplier: float
    devices: int  # devices whose vector is in the sum
    declined: int  # devices that refused (their cap) -- absent from the sum
    failed: int  # devices that did not reply -- absent from the sum


def federated_popularity(grid: Grid, device_config: Mapping[str, Any], *, num_items: int, noise_multiplier: float,
                         delta: float, release_id: str, rng: np.random.Generator) -> Release:
    """One user-level Gaussian release of the item-set histogram over every device of `grid`.

    `device_config`: the per-run values a simulated device needs (`data-store`, `state-dir`); the static
    settings (its `max-epsilon`) reach the devices as Flower's run config.
    """
    if not noise_multiplier > 0:
        raise PrivrecError(f"noise multiplier {noise_multiplier}: a release needs noise > 0")
    query = ConfigRecord({"noise-multiplier": float(noise_multiplier), "delta": float(delta), "release": release_id})
    messages = [Message(RecordDict({"config": ConfigRecord(dict(device_config)), "analytics": query}),
                        dst_node_id=node, message_type="query.popularity")
                for node in grid.get_node_ids()]
    total = np.zeros(num_items + 1, dtype=np.float64)
    devices = declined = failed = 0
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            failed += 1
            continue
        metrics = reply.content.metric_records["metrics"]
        if int(metrics["declined"]):
            declined += 1
            continue
        vector = np.asarray(metrics["item-set"], dtype=np.float64)
        if vector.shape != total.shape or not np.isfinite(vector).all():
            failed += 1  # not a contribution to this catalogue: left out, like a device that did not reply
            continue
        total += vector
        devices += 1
    if devices == 0:
        raise PrivrecError("no device contributed to the popularity release (all declined or failed)")
    return Release(noisy_sum(total, noise_multiplier, rng), float(noise_multiplier), devices, declined, failed)
