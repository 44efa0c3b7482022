"""`PrivacyTally`: what the server knows of each device's privacy spend, and the rule for a reply.

A reply is TRAINED (counted), DECLINED (the device reached its cap: never asked again) or REFUSED
(it reports less spend than the server has already seen from that device: a lost or rolled-back
ledger, never counted and never allowed to lower the record).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import RecordDict

from shared.privacy.accounting import history_steps

log = logging.getLogger("flwr")  # Flower's handler: our lines appear in the run's log stream

TRAINED, DECLINED, REFUSED = "trained", "declined", "refused"


@dataclass
class PrivacyTally:
    """What the server learns of each device's privacy spend, keyed by device id.

    Flower node ids change with every launch (a resumed run, a restarted SuperNode): they only tell
    which device sent a reply in this launch (`node_devices`); everything counted is keyed by the
    `device` of the reply's privacy record, so a device seen in two launches counts once.
    """

    epsilon_by_device: dict[str, float] = field(default_factory=dict)
    capped: dict[str, int] = field(default_factory=dict)  # device id -> first round it declined
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # device id -> privacy.json entry
    node_devices: dict[int, str] = field(default_factory=dict)  # this launch: node id -> device id
    # devices whose record changed since the last `take_changed` (device id -> node id): what the run
    # appends to its journal of device records after a round (shared/privacy/device_journal.py)
    changed: dict[str, int] = field(default_factory=dict)

    def update(self, device: str, epsilon: float) -> None:
        # A device's epsilon never decreases; keep the largest ever reported.
        self.epsilon_by_device[device] = max(epsilon, self.epsilon_by_device.get(device, 0.0))

    def seen_steps(self, device: str) -> int:
        """DP steps in the latest accountant history this device reported (what a device must not go below)."""
        entry = self.records.get(device)
        return history_steps({"history": entry["history"]}) if entry else 0

    def is_capped(self, node_id: int) -> bool:
        return self.node_devices.get(node_id) in self.capped

    def record_reply(self, server_round: int, node_id: int, content: RecordDict, accountant: str) -> str:
        """Book one train reply: TRAINED, DECLINED (cap reached) or REFUSED (spend below what was seen)."""
        metrics = next(iter(content.metric_records.values()))
        declined = bool(metrics.get("declined", 0))
        privacy = content.config_records.get("privacy")
        device = str(privacy["device"]) if privacy else f"node-{node_id}"
        self.node_devices[node_id] = device
        self.changed[device] = node_id
        entry = self.records.setdefault(device, {"accountant": accountant, "history": [], "rounds": [],
                                                 "epsilon": 0.0, "declined-round": None})
        history = json.loads(str(privacy["history"])) if privacy else entry["history"]
        reason = self._below_seen(device, history, metrics)
        if reason:  # a lost or rolled-back ledger: never counted, never lowers the record
            entry.setdefault("refused", []).append({"round": server_round, "reason": reason})
            log.warning("privrec: round %d: refused the update of device %s: %s", server_round, device, reason)
            return REFUSED
        entry["history"] = history
        if "epsilon" in metrics:
            self.update(device, float(metrics["epsilon"]))
            entry["epsilon"] = max(entry["epsilon"], float(metrics["epsilon"]))
            if not declined:
                entry["rounds"].append([server_round, float(metrics["epsilon"])])
        if declined:
            self.capped.setdefault(device, server_round)
            if entry["declined-round"] is None:
                entry["declined-round"] = server_round
            return DECLINED
        if not metrics.get("consenting", 0):  # a consenting device's zero update carries nothing of its data
            # the rounds whose aggregate holds this device's update: under user-level DP, the releases its
            # ledger must list (`privrec report` checks), whether or not it also ran DP-SGD
            entry.setdefault("update-rounds", []).append(server_round)
        return TRAINED

    def _below_seen(self, device: str, history: list, metrics: Any) -> str | None:
        seen_steps, reported_steps = self.seen_steps(device), history_steps({"history": history})
        if reported_steps < seen_steps:
            return f"reported {reported_steps} DP steps, fewer than the {seen_steps} already seen from this device"
        seen_epsilon = self.epsilon_by_device.get(device)
        if "epsilon" in metrics and seen_epsilon is not None and float(metrics["epsilon"]) < seen_epsilon * (1 - 1e-9):
            return f"reported epsilon {float(metrics['epsilon']):.6g}, below the {seen_epsilon:.6g} already seen"
        return None

    def take_changed(self) -> dict[str, int]:
        changed, self.changed = self.changed, {}
        return changed

    def summary(self) -> dict[str, Any]:
        values = np.array(list(self.epsilon_by_device.values()), dtype=float)
        if values.size == 0:
            return {"all-epsilon-max": None, "all-epsilon-median": None, "devices-with-spend": 0}
        return {"all-epsilon-max": float(values.max()), "all-epsilon-median": float(np.median(values)),
                "devices-with-spend": int(values.size)}
