"""Message audit: a ClientApp mod that records every reply a device sends, as it leaves the ClientApp.

Enabled by the node config key `audit-log` (a file path; `privrec deploy` sets it to
`<device>/state/audit.jsonl`). One JSON line per reply: message type, round, array names with shape
and dtype, metric names with their values, config records with their values, and whether it is an
error reply. It records what is sent, never the device's histories, so the device's owner (or a
test) can check that only model weights and whitelisted scalars ever leave.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from shared.atomic import write_bytes_atomic

AUDIT_KEY = "audit-log"
# Every scalar privrec's ClientApp may send (train and evaluate replies).
ALLOWED_METRICS = frozenset({
    "num-examples", "train-loss", "steps", "sample-rate", "seconds", "epsilon",
    "declined", "would-be-epsilon",  # a device at its privacy cap refuses the round
    "epsilon-unbounded",  # its ledger records a non-private round: no finite epsilon
    *(f"{split}-{metric}@10-sum" for split in ("valid", "test") for metric in ("hit", "ndcg")),
})


def describe(reply: Message, instruction: Message) -> dict:
    entry: dict = {"time": time.time(), "type": instruction.metadata.message_type,
                   "round": _round(instruction), "error": reply.has_error()}
    secagg = instruction.content.config_records.get("secagg")  # a secure-aggregation stage (client/secagg.py)
    if secagg is not None:
        entry["secagg-stage"] = str(secagg["stage"])
    if reply.has_error():
        return entry
    content = reply.content
    entry["arrays"] = {name: {key: {"shape": list(array.shape), "dtype": str(array.dtype)}
                              for key, array in record.items()}
                       for name, record in content.array_records.items()}
    entry["metrics"] = {name: dict(record.items()) for name, record in content.metric_records.items()}
    # Config records are logged in full: the only one privrec sends is the device's accountant history.
    entry["configs"] = {name: {k: v if isinstance(v, (int, float, str, bool)) else repr(v)[:2000]
                               for k, v in record.items()}
                        for name, record in content.config_records.items()}
    return entry


def _round(instruction: Message) -> int | None:
    config = instruction.content.config_records.get("config")
    return int(config["server-round"]) if config is not None and "server-round" in config else None


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    path = context.node_config.get(AUDIT_KEY)
    if path:
        path = Path(str(path))
        old = path.read_bytes() if path.exists() else b""
        # Whole-file atomic rewrite: a crash never leaves a half-written line (the log is small).
        write_bytes_atomic(path, old + (json.dumps(describe(reply, msg)) + "\n").encode())
    return reply


def read_audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
