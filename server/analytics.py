"""Server side of federated analytics: ask every device for its contribution, sum, add the noise once.

Works with any Flower `Grid` (the deployment's, or `simulations.inprocess.InProcessGrid`). Without secure
aggregation the server sees each device's unit-norm vector: the DP guarantee covers whoever sees the
released histogram, not the server. With `secure` (SecAgg+ parameters; the scorers' releases under
`secure-aggregation = true`) every device adds its share N(0, z^2 / m_min) of the noise and masks its vector
(`server.secagg.secure_sum`, `client.secagg`): the server unmasks only the sum of at least max(t, m_min) devices,
adds nothing, and the guarantee also holds against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from server.secagg import secure_sum
from shared.analytics import gaussian_release, noisy_sum
from shared.errors import PrivrecError
from shared.secagg import SecAggAborted, SecAggParams, check_no_wrap


@dataclass
class Release:
    histogram: np.ndarray  # the released (noisy) sum, index = item id
    noise_multiplier: float
    devices: int  # devices whose vector is in the sum
    declined: int  # devices that refused (their cap) -- absent from the sum
    failed: int  # devices that did not reply -- absent from the sum


def federated_popularity(grid: Grid, device_config: Mapping[str, Any], *, num_items: int, noise_multiplier: float,
                         delta: float, release_id: str, rng: np.random.Generator,
                         secure: SecAggParams | None = None) -> Release:
    """One user-level Gaussian release of the item-set histogram over every device of `grid`.

    `device_config`: the per-run values a simulated device needs (`data-store`, `state-dir`); the static
    settings (its `max-epsilon`) reach the devices as Flower's run config.
    """
    query = {"noise-multiplier": float(noise_multiplier), "delta": float(delta), "release": release_id}
    total, devices, declined, failed = _federated_sum(grid, device_config, query, "query.popularity", "item-set",
                                                      num_items + 1, noise_multiplier, "popularity", secure)
    if secure is None:
        return Release(noisy_sum(total, noise_multiplier, rng), float(noise_multiplier), devices, declined, failed)
    total[0] = 0.0  # the padding index, as `noisy_sum` releases it (its noise shares are dropped: post-processing)
    return Release(total, float(noise_multiplier), devices, declined, failed)


def federated_cooccurrence(grid: Grid, device_config: Mapping[str, Any], *, items: np.ndarray, window: int,
                           noise_multiplier: float, delta: float, release_id: str,
                           rng: np.random.Generator, secure: SecAggParams | None = None) -> Release:
    """One user-level Gaussian release of the windowed co-occurrence among `items` (the top of the released
    popularity: public) over every device of `grid`; `histogram` is the released pair vector
    (`shared.analytics.pair_index` order)."""
    query = {"noise-multiplier": float(noise_multiplier), "delta": float(delta), "release": release_id,
             "items": [int(i) for i in items], "window": int(window)}
    k = len(items)
    total, devices, declined, failed = _federated_sum(grid, device_config, query, "query.cooccurrence", "pairs",
                                                      k * (k - 1) // 2, noise_multiplier, "co-occurrence", secure)
    released = total if secure is not None else gaussian_release(total, noise_multiplier, rng)
    return Release(released, float(noise_multiplier), devices, declined, failed)


def federated_transitions(grid: Grid, device_config: Mapping[str, Any], *, items: np.ndarray, noise_multiplier: float,
                          delta: float, release_id: str, rng: np.random.Generator) -> Release:
    """One user-level Gaussian release of the directed (previous -> next) transition counts among `items` (the top
    of the released popularity: public) over every device of `grid`; `histogram` is the released [K, K] matrix
    flattened row by row (row = previous item). No secure-aggregation path (the config refuses the combination)."""
    query = {"noise-multiplier": float(noise_multiplier), "delta": float(delta), "release": release_id,
             "items": [int(i) for i in items]}
    k = len(items)
    total, devices, declined, failed = _federated_sum(grid, device_config, query, "query.transitions", "transitions",
                                                      k * k, noise_multiplier, "transition")
    return Release(gaussian_release(total, noise_multiplier, rng), float(noise_multiplier), devices, declined, failed)


def _federated_sum(grid: Grid, device_config: Mapping[str, Any], query: Mapping[str, Any], message_type: str,
                   key: str, length: int, noise_multiplier: float, what: str,
                   secure: SecAggParams | None = None) -> tuple[np.ndarray, int, int, int]:
    """Ask every device of `grid` for its contribution (`key` of its reply) and sum the valid ones; with `secure`,
    the masked sum of the devices' noised contributions (already carrying the release's noise)."""
    if not noise_multiplier > 0:
        raise PrivrecError(f"noise multiplier {noise_multiplier}: a release needs noise > 0")
    nodes = list(grid.get_node_ids())
    records = {"config": ConfigRecord(dict(device_config)), "analytics": ConfigRecord(dict(query))}
    if secure is not None:
        return _secure_federated_sum(grid, nodes, records, message_type, key, length, what, secure)
    messages = [Message(RecordDict(dict(records)), dst_node_id=node, message_type=message_type) for node in nodes]
    total = np.zeros(length, dtype=np.float64)
    devices = declined = failed = 0
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            failed += 1
            continue
        metrics = reply.content.metric_records["metrics"]
        if int(metrics["declined"]):
            declined += 1
            continue
        vector = np.asarray(metrics[key], dtype=np.float64)
        if vector.shape != total.shape or not np.isfinite(vector).all():
            failed += 1  # not a contribution to this release: left out, like a device that did not reply
            continue
        total += vector
        devices += 1
    if devices == 0:
        raise PrivrecError(f"no device contributed to the {what} release (all declined or failed)")
    return total, devices, declined, failed


def _secure_federated_sum(grid: Grid, nodes: list[int], records: Mapping[str, Any], message_type: str, key: str,
                          length: int, what: str, params: SecAggParams) -> tuple[np.ndarray, int, int, int]:
    """The analytics query under SecAgg+: its `arrays` (zeros of the contribution's shape) tell each device what
    to mask; the server learns only the sum of at least max(t, m_min) devices, or nothing (the run stops)."""
    if params.min_cohort > len(nodes):
        raise PrivrecError(f"config key 'secagg-release-min-cohort' = {params.min_cohort} is larger than the "
                           f"{len(nodes)} devices: no {what} release could ever be unmasked")
    check_no_wrap(params, len(nodes))  # every device joins an analytics release: the sum of all of them must fit
    zeros = ArrayRecord({key: Array(np.zeros(length, dtype=np.float64))})
    messages = [Message(RecordDict({**records, "arrays": zeros}), dst_node_id=node, message_type=message_type)
                for node in nodes]
    try:
        result = secure_sum(grid, messages, params)
    except SecAggAborted as exc:
        raise PrivrecError(f"the {what} release under secure aggregation was refused, nothing released: {exc}") \
            from None
    declined = sum(1 for r in result.replies if not r.has_error() and "metrics" in r.content.metric_records
                   and int(r.content.metric_records["metrics"].get("declined", 0)))
    return (np.asarray(result.total[key], dtype=np.float64).reshape(length), result.devices, declined,
            len(nodes) - result.devices - declined)
