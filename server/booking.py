"""`SpendBooking`: every train reply is booked in the privacy tally before anything is aggregated.

Only replies of devices that trained reach the wrapped strategy; a decline (cap reached) and a
refusal (spend below what the server has seen from that device) are counted, never averaged. The
round's figures (epsilon max/median over the cohort, declines, refusals) come from the devices' own
replies here, not from the wrapped strategy: under user-level DP it sees only the noised mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.tally import DECLINED, REFUSED, TRAINED, PrivacyTally
from server.wrapper import StrategyWrapper

SEEN_SPEND = "privacy-seen"  # instruction record read by client/app.py (same name there)


class SpendBooking(StrategyWrapper):
    """Tells known devices the spend already seen from them, and books every train reply in `tally`.

    `metrics_fn(contents, weight_key)` turns the replies of devices that trained into the round's
    MetricRecord (`server.strategy.train_metrics`).
    """

    def __init__(self, strategy: Strategy, *, tally: PrivacyTally, accountant: str,
                 metrics_fn: Callable[[list[RecordDict], str], MetricRecord], weight_key: str = "num-examples"):
        super().__init__(strategy)
        self.tally = tally
        self.accountant = accountant
        self.metrics_fn = metrics_fn
        self.weight_key = weight_key

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = self.strategy.configure_train(server_round, arrays, config, grid)
        return [self._with_seen_spend(m) for m in messages]

    def _with_seen_spend(self, message: Message) -> Message:
        """Tell a known device the spend the server has already seen from it: it refuses to train below it.

        Only devices that replied in this launch are known by node id; after a restart the reply check
        (`PrivacyTally.record_reply`) refuses a device whose spend went down.
        """
        device = self.tally.node_devices.get(message.metadata.dst_node_id)
        steps = self.tally.seen_steps(device) if device is not None else 0
        if not steps:
            return message
        content = RecordDict(dict(message.content.items()))  # the payload is shared by every message
        content[SEEN_SPEND] = ConfigRecord({"device": device, "steps": steps})
        return Message(content=content, message_type=message.metadata.message_type,
                       dst_node_id=message.metadata.dst_node_id)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        passed, trained, declined, refused = [], [], 0, 0
        for msg in replies:
            if msg.has_error():
                passed.append(msg)  # the wrapped strategy logs and skips it
                continue
            outcome = self.tally.record_reply(server_round, msg.metadata.src_node_id, msg.content, self.accountant)
            declined += outcome == DECLINED
            refused += outcome == REFUSED
            if outcome == TRAINED:
                passed.append(msg)
                trained.append(msg.content)
        arrays, _ = self.strategy.aggregate_train(server_round, passed)
        metrics = self.metrics_fn(trained, self.weight_key) if trained else MetricRecord({"devices": 0})
        metrics["declined"] = declined
        metrics["refused"] = refused  # replies whose spend was below what the server had seen from the device
        metrics["capped-devices"] = len(self.tally.capped)
        # every device that has trained so far (cumulative); absent until some device reported a spend
        metrics.update({k: v for k, v in self.tally.summary().items() if v is not None})
        return arrays, metrics
