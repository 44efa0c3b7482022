"""The server's side of secure aggregation: runs the SecAgg+ stages over the Grid with Flower Messages.

`secure_sum(grid, train_messages, params, timeout)` sends the four stages (setup, share, upload,
unmask; see `shared.secagg`) to the devices the strategy chose and returns the sum of the vectors of
the devices that survived, never one device's vector. Devices may drop at any stage; the round is
refused (`SecAggAborted`, nothing released) when fewer than max(secagg-threshold, secagg-min-cohort)
survive or a survivor's shares fall below the threshold.

`SecureAggregationGrid` plugs this into any Flower strategy without changing it: it stands in for the
Grid, and when the strategy sends its train messages it runs `secure_sum` instead and hands back the
devices' replies with their masked arrays replaced by the aggregate model `global + sum / denominator`
(the same in every reply, so FedAvg's weighted mean, FedAdam and FedProx all take it as it is). The
strategy thus only ever holds the aggregate.

Each stage pulls every device's reply on its own (`_exchange`), not with `grid.send_and_receive`: see
there why a device killed in the middle of its upload would otherwise cost the survivors' replies.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid

from shared.secagg import VECTOR_KEY, SecAggAborted, SecAggParams, ServerSession, array_values

log = logging.getLogger("flwr")
SECAGG = "secagg"  # instruction record naming the stage (same name in client/secagg.py)


@dataclass
class SecureSum:
    total: dict[str, np.ndarray]  # float64 sum of the survivors' vectors, per array key
    devices: int  # survivors whose vectors are in `total`
    replies: list[Message]  # the upload replies (masked arrays), declines and errors
    dropped: list[int] = field(default_factory=list)  # sampled devices whose vector is not in the sum


POLL_SECONDS = 2.0  # longest pause between two passes over the replies still outstanding (Flower: 3 s)
FIRST_POLL_SECONDS = 0.1  # the first pause, doubled every pass: quick stages (simulation) stay quick
STUCK_SECONDS = 5.0  # a pull this long is downloading a reply whose sender may have died: go on without it
LIVENESS_SECONDS = 5.0  # how often a stage checks whether the nodes it still waits for are online


def _stage(grid: Grid, contents: dict[int, RecordDict], timeout: float | None,
           message_type: str = MessageType.TRAIN) -> dict[int, Message]:
    """One stage's replies by the node they answer (errors included: a dead node's reply is an error). Every
    stage travels as a train message except the upload of an analytics query, which is the query itself."""
    # A stage's messages expire when it stops waiting (as ExpiringGrid does for rounds): a device that
    # comes back later never works on a stage already given up on.
    messages = [Message(content=c, message_type=message_type, dst_node_id=n, ttl=timeout)
                for n, c in contents.items()]
    started = time.monotonic()
    try:
        replies = _exchange(grid, messages, timeout)
    except NotImplementedError:  # a stand-in Grid that answers whole batches only (in-process runs)
        replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages, timeout=timeout)}
    stage = next(iter(contents.values()))[SECAGG]["stage"] if contents else "?"
    log.info("privrec: secure aggregation, %s stage: %d of %d replies in %.1f s", stage,
             sum(not r.has_error() for r in replies.values()), len(messages), time.monotonic() - started)
    return replies


def _exchange(grid: Grid, messages: list[Message], timeout: float | None) -> dict[int, Message]:
    """Send `messages`; collect their replies until all are in, `timeout` has passed, or every node that
    still owes one is offline.

    Why not `grid.send_and_receive`: Flower's deployment Grid claims every reply available at the
    SuperLink in one call and then downloads their contents. A reply whose sender died after announcing
    it and before uploading its arrays (a SuperNode killed just after sending its masked vector) holds
    that call until the SuperLink's object-push session expires (180 s in Flower 1.41), together with
    every reply claimed with it, and the timeout is checked only between calls: the survivors' replies
    that arrived meanwhile were never pulled ("only 0 masked vectors arrived"). Here each reply is
    pulled on its own (`_Replies`), and a node the SuperLink lists offline (missed heartbeats) is not
    waited for until the timeout.
    """
    ids = {i for i in grid.push_messages(messages) if i}
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id in ids}
    if not node_of:
        return {}
    replies = _Replies(grid, node_of)
    replies.start_poller()
    deadline = None if timeout is None else time.monotonic() + timeout
    checked = time.monotonic()
    while not replies.settled.wait(0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))):
        if deadline is not None and time.monotonic() >= deadline:
            break
        replies.leave_stuck_pull()
        if time.monotonic() - checked >= LIVENESS_SECONDS:
            checked = time.monotonic()
            owing = replies.owing()
            if owing and not owing & set(grid.get_node_ids()):
                log.info("privrec: secure aggregation: nodes %s went offline; going on without them", sorted(owing))
                break
    return replies.close()


class _Replies:
    """One stage's replies, pulled one message id at a time with one request in flight (like Flower's own
    loop: no burst of concurrent requests on the SuperLink's database), by a poller thread. A pull that
    has lasted STUCK_SECONDS is left to finish on its own (its reply still counts if it comes in time)
    and a fresh poller goes on with the other ids; the stage leaves any such daemon thread behind."""

    def __init__(self, grid: Grid, node_of: dict[str, int]):
        self.grid, self.node_of = grid, node_of
        self.lock = threading.Lock()
        self.got: dict[int, Message] = {}
        self.done: set[str] = set()  # ids answered, or whose pull failed
        self.stuck: set[str] = set()  # ids whose pull is being left to finish on its own
        self.pulling: dict[int, tuple[str, float]] = {}  # poller generation -> (id, since when)
        self.generation = 0
        self.stop, self.settled = threading.Event(), threading.Event()

    def start_poller(self) -> None:
        with self.lock:
            self.generation += 1
            generation = self.generation
        threading.Thread(target=self._poll, args=(generation,), daemon=True, name="privrec-secagg-pull").start()

    def leave_stuck_pull(self) -> None:
        with self.lock:
            pulling = self.pulling.get(self.generation)
            if pulling is None or time.monotonic() - pulling[1] < STUCK_SECONDS:
                return
            self.stuck.add(pulling[0])
        self.start_poller()

    def owing(self) -> set[int]:
        with self.lock:
            return set(self.node_of.values()) - set(self.got)

    def close(self) -> dict[int, Message]:
        self.stop.set()
        with self.lock:
            return dict(self.got)

    def _poll(self, generation: int) -> None:
        pause = FIRST_POLL_SECONDS
        while not self.stop.is_set():
            with self.lock:
                if generation != self.generation:
                    return
                todo = [i for i in self.node_of if i not in self.done and i not in self.stuck]
            for message_id in todo:
                with self.lock:
                    if self.stop.is_set() or generation != self.generation:
                        return
                    self.pulling[generation] = (message_id, time.monotonic())
                try:
                    got, failed = list(self.grid.pull_messages([message_id])), False
                except Exception as exc:  # noqa: BLE001 - a failed pull is a lost reply, like a dead device's
                    got, failed = [], True
                    if not self.stop.is_set():
                        log.warning("privrec: secure aggregation: pulling node %d's reply failed: %s",
                                    self.node_of[message_id], exc)
                with self.lock:
                    self.pulling.pop(generation, None)
                    self.stuck.discard(message_id)  # back to the live poller if nothing came
                    if got or failed:
                        self.done.add(message_id)
                        if got:
                            self.got[self.node_of[message_id]] = got[0]
                        if len(self.done) == len(self.node_of):
                            self.settled.set()
                    if generation != self.generation:
                        return  # left behind while stuck: the live poller has the rest
            self.stop.wait(pause)
            pause = min(2 * pause, POLL_SECONDS)


def _answers(replies: dict[int, Message]) -> dict[int, ConfigRecord]:
    return {n: r.content.config_records[SECAGG] for n, r in replies.items()
            if not r.has_error() and SECAGG in r.content.config_records}


def secure_sum(grid: Grid, train_messages: Sequence[Message], params: SecAggParams,
               timeout: float | None = None) -> SecureSum:
    """Sum of the surviving devices' vectors for these train messages (one per device; or analytics queries of
    one type, whose `arrays` are zeros of the contribution's shape: `server.analytics`)."""
    train = {m.metadata.dst_node_id: m for m in train_messages}
    session = ServerSession.start(params, list(train))
    setup = _answers(_stage(grid, {n: RecordDict({SECAGG: ConfigRecord({"stage": "setup",
                                                                         "threshold": params.threshold})})
                                   for n in train}, timeout))
    session.public = {n: (bytes(a["enc-pk"]), bytes(a["mask-pk"])) for n, a in setup.items()}
    session.keep(list(setup), "setup")

    share_requests = {}
    for n in session.public:
        peers = session.peers_of(n)
        share_requests[n] = RecordDict({SECAGG: ConfigRecord({
            "stage": "share", "peer-ids": list(peers), "peer-enc": [k[0] for k in peers.values()],
            "peer-mask": [k[1] for k in peers.values()]})})
    shared = _answers(_stage(grid, share_requests, timeout))
    session.keep(list(shared), "share")
    inbox: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in shared}
    for src, answer in shared.items():
        for dst, ciphertext in zip(answer["dst"], answer["ct"]):
            if int(dst) in inbox:
                inbox[int(dst)][0].append(src)
                inbox[int(dst)][1].append(bytes(ciphertext))

    uploads = {}
    for n, (sources, ciphertexts) in inbox.items():
        content = RecordDict(dict(train[n].content.items()))  # the strategy's train payload, shared
        content[SECAGG] = ConfigRecord({"stage": "upload", "src": sources, "ct": ciphertexts})
        uploads[n] = content
    upload_replies = _stage(grid, uploads, timeout, train_messages[0].metadata.message_type)
    keys: list[str] | None = None
    for n, reply in upload_replies.items():
        if reply.has_error() or "arrays" not in reply.content.array_records:
            continue
        sent = _masked_vector(reply, train[n])
        if sent is None:
            log.warning("privrec: secure aggregation: device %d sent no well-formed masked vector; left out", n)
            continue
        if keys is None:
            keys = sent[0]
        if sent[0] != keys:
            log.warning("privrec: secure aggregation: device %d sent other arrays than the rest; left out", n)
            continue
        session.masked[n] = [sent[1]]
    survivors = sorted(session.masked)
    if len(survivors) < params.min_survivors:
        raise SecAggAborted(f"only {len(survivors)} masked vectors arrived; at least {params.min_survivors} "
                            "must survive for the sum to be unmasked")

    unmask_requests = {}
    for n in survivors:
        alive, dropped = session.unmask_request(n, survivors)
        unmask_requests[n] = RecordDict({SECAGG: ConfigRecord({"stage": "unmask", "survivors": alive,
                                                               "dropped": dropped})})
    answers = _answers(_stage(grid, unmask_requests, timeout))
    shares = {n: {int(o): bytes(s) for o, s in zip(a["owners"], a["shares"])} for n, a in answers.items()}
    (total,), devices = session.unmask(shares)
    current = train_messages[0].content.array_records["arrays"]
    sizes = np.cumsum([math.prod(current[k].shape) for k in keys or []])[:-1]
    parts = np.split(total, sizes) if keys else []
    return SecureSum(total={k: p.reshape(tuple(current[k].shape)) for k, p in zip(keys or [], parts)},
                     devices=devices, replies=list(upload_replies.values()),
                     dropped=[n for n in train if n not in session.masked])


def _masked_vector(reply: Message, train: Message) -> tuple[list[str], np.ndarray] | None:
    """(keys, masked uint32 vector) of an upload reply, if its vector has exactly the size of those arrays."""
    arrays, record = reply.content.array_records["arrays"], reply.content.config_records.get(SECAGG)
    current = train.content.array_records["arrays"]
    if (record is None or not isinstance(record.get("keys"), list) or list(arrays.keys()) != [VECTOR_KEY]
            or arrays[VECTOR_KEY].dtype != "uint32"):
        return None
    keys = [str(k) for k in record["keys"]]
    vector = array_values(arrays[VECTOR_KEY])
    if (len(set(keys)) != len(keys) or not all(k in current for k in keys) or vector.ndim != 1
            or vector.size != sum(math.prod(current[k].shape) for k in keys)):
        return None
    return keys, vector


class SecureAggregationGrid:
    """A Grid whose train round trips run secure aggregation; everything else passes through.

    `denominator`: None divides the sum by the survivors (plain mean); a number divides by it (DP-FedAvg
    divides by the expected cohort, whatever the number of replies).
    """

    def __init__(self, grid: Grid, params: SecAggParams, denominator: float | None = None):
        self._grid = grid
        self.params = params
        self.denominator = denominator
        self.rounds: list[dict] = []  # per train round: devices summed, dropped, or why it was refused

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return self._grid.send_and_receive(messages, timeout=timeout)
        try:
            result = secure_sum(self._grid, messages, self.params, timeout)
        except SecAggAborted as exc:
            log.warning("privrec: secure aggregation refused this round, nothing released: %s", exc)
            self.rounds.append({"refused": str(exc)})
            return []
        self.rounds.append({"devices": result.devices, "dropped": len(result.dropped)})
        current = messages[0].content.array_records["arrays"]
        divide = self.denominator or result.devices
        aggregate = ArrayRecord({k: Array(np.ascontiguousarray(
            (a.numpy() + result.total[k] / divide).astype(a.numpy().dtype) if k in result.total else a.numpy()))
            for k, a in current.items()})
        return [_with_aggregate(r, aggregate) for r in result.replies]


def _with_aggregate(reply: Message, aggregate: ArrayRecord) -> Message:
    """The reply with its masked vector (and the record naming its arrays) replaced by the round's aggregate
    (declines and errors as they are)."""
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return reply
    out = copy.copy(reply)  # the device's own reply stays as it arrived (masked), e.g. for audit logs
    out.content = RecordDict({**{name: record for name, record in reply.content.items() if name != SECAGG},
                              "arrays": aggregate})
    return out
