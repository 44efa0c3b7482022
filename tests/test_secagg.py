"""Secure aggregation (issue 14): protocol core, the round over a Grid with dropouts, masking, noise, config."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.superlink.grid.http_grid import HttpGrid
from scipy import stats

from client.audit import ALLOWED_METRICS, read_audit
from client.secagg import SECAGG, device_vector, secagg_mod
from server.secagg import SecureAggregationGrid, secure_sum
from shared import config
from shared.errors import PrivrecError
from shared.secagg import (
    SHAMIR_PRIME,
    VECTOR_KEY,
    DeviceSession,
    SecAggAborted,
    SecAggParams,
    ServerSession,
    apply_masks,
    array_values,
    combine_shares,
    create_shares,
    mask_stream,
    neighbours,
    quantize_vector,
    share_noise_std,
)
from simulations.inprocess import InProcessGrid, assign_message_id, instruction

PARAMS = SecAggParams(threshold=3, clip_range=1.0, quantization_bits=16, min_cohort=3)
SHAPES = [(40, 3), (5,)]


def _vectors(nodes, seed=0):
    rng = np.random.default_rng(seed)
    return {n: [rng.uniform(-0.5, 0.5, s) for s in SHAPES] for n in nodes}


def _run_protocol(params, nodes, xs, drop_after_mask=(), drop_before_mask=()):
    """The four stages without transport; devices in `drop_*` stop answering from that point."""
    server = ServerSession.start(params, nodes)
    devices = {n: DeviceSession(node=n, threshold=params.threshold) for n in nodes}
    server.public = {n: devices[n].setup() for n in nodes}
    ciphertexts = {n: devices[n].share_keys(server.peers_of(n)) for n in nodes}
    server.keep(list(ciphertexts), "share")
    for n in nodes:
        if n in drop_before_mask:
            continue
        received = {src: c[n] for src, c in ciphertexts.items() if n in c}
        server.masked[n] = devices[n].mask(quantize_vector(xs[n], params), received)
    survivors = sorted(server.masked)
    shares = {}
    for n in survivors:
        if n in drop_after_mask:
            continue
        alive, dropped = server.unmask_request(n, survivors)
        shares[n] = devices[n].unmask(alive, dropped)
    return server.unmask(shares), survivors


def _plain_sum(xs, nodes):
    return [sum(xs[n][i] for n in nodes) for i in range(len(SHAPES))]


def _close(total, plain, devices, params):
    step = 2 * params.clip_range / params.levels  # stochastic rounding: at most one step per device
    return all(np.abs(a - b).max() <= devices * step for a, b in zip(total, plain))


# ----------------------------------------------------------------------------- protocol core
def test_unmasked_sum_equals_plain_sum_up_to_quantization():
    nodes = list(range(1, 9))
    xs = _vectors(nodes)
    (total, devices), survivors = _run_protocol(PARAMS, nodes, xs)
    assert devices == 8 and survivors == nodes
    assert _close(total, _plain_sum(xs, nodes), 8, PARAMS)


def test_quantizer_rounds_without_bias_inside_its_levels():
    params = SecAggParams(threshold=2, clip_range=1.0, quantization_bits=4, min_cohort=2)  # 15 steps
    values, edges = quantize_vector([np.full(200_000, 0.3), np.array([-5.0, 5.0, -1.0, 1.0])], params,
                                    np.random.default_rng(0))
    assert edges.tolist() == [0, 15, 0, 15] and edges.dtype == np.uint32  # clipped, never past the top level
    exact = (0.3 + 1.0) * 15 / 2  # 9.75: rounds to 9 or 10, 10 three times in four
    assert set(np.unique(values)) == {9, 10} and values.mean() == pytest.approx(exact, abs=0.005)


def test_quantizer_in_chunks_rounds_as_one_pass_would(monkeypatch):
    import shared.secagg

    x = [np.random.default_rng(3).uniform(-1.5, 1.5, (40, 7)), np.array([0.25])]
    whole = quantize_vector(x, PARAMS, np.random.default_rng(9))
    np.random.seed(4)
    whole_global = quantize_vector(x, PARAMS)
    monkeypatch.setattr(shared.secagg, "MASK_CHUNK", 13)
    assert all(np.array_equal(a, b) for a, b in zip(quantize_vector(x, PARAMS, np.random.default_rng(9)), whole))
    np.random.seed(4)
    assert all(np.array_equal(a, b) for a, b in zip(quantize_vector(x, PARAMS), whole_global))
    assert [a.shape for a in whole] == [(40, 7), (1,)]
    scale = PARAMS.levels / 2  # and each value is the floor or the ceiling of its exact level
    assert np.all(np.abs(whole[0] - (np.clip(x[0], -1, 1) + 1) * scale) < 1)


@pytest.mark.parametrize("chunk", [65536, 5, 4, 17])  # one chunk; chunks that split arrays and streams unevenly
def test_masks_applied_in_place_equal_the_sum_of_their_streams(chunk, monkeypatch):
    import shared.secagg

    monkeypatch.setattr(shared.secagg, "MASK_CHUNK", chunk)
    vector = [np.arange(12, dtype=np.uint32).reshape(3, 4), np.full(5, 2**32 - 1, dtype=np.uint32)]
    seeds = [(b"a" * 16, 1), (b"b" * 16, -1), (b"c" * 16, 1)]
    expected = [v.copy() for v in vector]
    for seed, sign in seeds:
        for e, m in zip(expected, mask_stream(seed, [v.shape for v in vector])):
            (np.add if sign > 0 else np.subtract)(e, m, out=e)
    assert all(np.array_equal(a, b) for a, b in zip(apply_masks(vector, seeds), expected))
    assert all(np.array_equal(a, b) for a, b in zip(apply_masks(apply_masks(vector, seeds),
                                                                [(s, -g) for s, g in seeds]), vector))


def test_shamir_any_threshold_shares_rebuild_the_seed_and_fewer_do_not():
    import itertools

    import sympy

    assert sympy.isprime(SHAMIR_PRIME) and SHAMIR_PRIME > 2 ** 128  # every 16-byte seed is a field element
    for threshold, num in [(2, 3), (3, 5), (5, 5), (8, 15)]:
        seed = np.random.default_rng(threshold).bytes(16)
        shares = create_shares(seed, threshold, num)
        assert len(shares) == num and len({s[:4] for s in shares}) == num and all(len(s) == 21 for s in shares)
        for subset in itertools.islice(itertools.combinations(shares[::-1], threshold), 20):
            assert combine_shares(list(subset), threshold) == seed
        below = list(shares[:threshold - 1]) + [shares[0]]  # t - 1 distinct shares (one repeated)
        with pytest.raises(SecAggAborted, match="fewer than the threshold"):
            combine_shares(below, threshold)
    assert create_shares(b"\xff" * 16, 3, 5) != create_shares(b"\xff" * 16, 3, 5)  # fresh coefficients
    with pytest.raises(ValueError, match="16 bytes"):
        create_shares(b"short", 2, 3)


def test_shamir_shares_of_a_seed_carry_no_trace_of_it_below_the_threshold():
    """Two different seeds: the distributions of any t - 1 = 2 share values are the same (uniform in the field)."""
    values = {seed: np.array([[int.from_bytes(s[4:], "little") / SHAMIR_PRIME for s in create_shares(seed, 3, 5)[:2]]
                              for _ in range(2000)]) for seed in (b"\x00" * 16, b"\xff" * 16)}
    for column in range(2):
        assert stats.ks_2samp(values[b"\x00" * 16][:, column], values[b"\xff" * 16][:, column]).pvalue > 1e-4
        assert stats.kstest(values[b"\xff" * 16][:, column], "uniform").pvalue > 1e-4


def test_pairwise_secrets_agree_and_an_unusable_public_key_is_refused():
    from shared.secagg import _pair_seed, mask_key_from_seed

    a, b = DeviceSession(node=1, threshold=2), DeviceSession(node=2, threshold=2)
    (a_enc, a_mask), (b_enc, b_mask) = a.setup(), b.setup()
    assert len(a_enc) == len(a_mask) == 32 and a_enc != b_enc and a_mask != b_mask
    assert _pair_seed(a.enc_private, b_enc) == _pair_seed(b.enc_private, a_enc)  # the channel key
    assert _pair_seed(mask_key_from_seed(a.mask_seed), b_mask) == _pair_seed(mask_key_from_seed(b.mask_seed), a_mask)
    assert _pair_seed(a.enc_private, b_enc) != _pair_seed(mask_key_from_seed(a.mask_seed), b_mask)
    for bad in (b"\0" * 32, b"\1" + b"\0" * 31, b"short"):  # low-order points (all-zero agreement), wrong size
        with pytest.raises(SecAggAborted, match="unusable"):
            _pair_seed(a.enc_private, bad)


@pytest.mark.parametrize("array", [np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(5, dtype=np.uint32),
                                   np.float64(2.5), np.zeros((0, 3), np.float32),
                                   np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
                                   np.arange(4, dtype=">f8")])
def test_array_values_equal_flowers_decoding(array):
    wrapped = Array(np.asarray(array))
    got = array_values(wrapped)
    assert got.dtype == wrapped.numpy().dtype and got.shape == wrapped.numpy().shape
    assert np.array_equal(got, wrapped.numpy())


def test_array_values_do_not_trust_bytes_that_do_not_match_the_header():
    good = Array(np.arange(6, dtype=np.float32))
    trailing = Array(dtype=good.dtype, shape=tuple(good.shape), stype=good.stype, data=good.data + b"\0" * 8)
    assert np.array_equal(array_values(trailing), np.arange(6, dtype=np.float32))  # np.load's reading of it
    liar = Array(dtype="float32", shape=(3,), stype=good.stype, data=good.data)  # header says (6,)
    assert array_values(liar).shape == (6,)  # decoded as the header says (Flower's own reading), not as (3,)


def test_sparse_graph_has_majority_threshold():
    graph = neighbours(list(range(20)), threshold=3)
    assert all(len(peers) == 4 for peers in graph.values())  # 2(t-1) neighbours, 2t-1 shares, t rebuild
    assert all(a in graph[b] for a in graph for b in graph[a])  # symmetric


def test_survivors_sum_recovered_when_devices_drop_before_and_after_masking():
    nodes = list(range(1, 11))
    xs = _vectors(nodes, seed=1)
    # One drops before sending its vector (its pairwise masks must be rebuilt from its key shares), one
    # sends its vector and then goes silent in the unmask stage: t - 1 = 2 losses in any neighbourhood
    # of 2t - 1 = 5 shares leave t, wherever the random ring puts them.
    (total, devices), survivors = _run_protocol(PARAMS, nodes, xs, drop_before_mask={3}, drop_after_mask={5})
    assert survivors == [n for n in nodes if n != 3] and devices == 9
    assert _close(total, _plain_sum(xs, survivors), 9, PARAMS)


def test_fewer_survivors_than_threshold_is_refused():
    params = SecAggParams(threshold=4, clip_range=1.0, quantization_bits=16, min_cohort=2)
    nodes = list(range(1, 7))
    with pytest.raises(SecAggAborted, match="at least 4"):
        _run_protocol(params, nodes, _vectors(nodes), drop_before_mask={1, 2, 3})


def test_too_few_shares_is_refused():
    nodes = list(range(1, 7))  # complete graph (t=3 with 6 devices): 6 shares each, 3 rebuild
    with pytest.raises(SecAggAborted, match="fewer than the threshold"):
        _run_protocol(PARAMS, nodes, _vectors(nodes), drop_after_mask={1, 2, 3, 4})


def test_device_never_reveals_both_secrets_of_one_neighbour():
    session = DeviceSession(node=1, threshold=2)
    with pytest.raises(SecAggAborted, match="both"):
        session.unmask([2, 3], [3])


# ----------------------------------------------------------------------------- the round over a Grid
DELTA_SCALE = 0.3


def _stub_client_app():
    """A device that trains by adding a node-specific update: fast, and its update is known to the test."""
    app = ClientApp()

    @app.train(mods=[secagg_mod])
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"]
        update = _stub_update(context.node_id)
        trained = {k: Array(a.numpy() + update[k].astype(a.numpy().dtype)) for k, a in arrays.items()}
        return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)

    return app


def _stub_update(node):
    rng = np.random.default_rng(node)
    return {"w": rng.uniform(-DELTA_SCALE, DELTA_SCALE, (64, 8)), "b": rng.uniform(-DELTA_SCALE, DELTA_SCALE, (8,))}


def _stub_run(**cfg):
    """The run config every stub ClientApp reads (Flower hands it to each app of the run)."""
    return {"device-trains": "all", "user-dp": False, "secagg-threshold": 3, "secagg-clip-range": 1.0,
            "secagg-quantization-bits": 16, "secagg-min-cohort": 3, "user-clipping-norm": 1.0,
            "user-noise-multiplier": 1.0, **cfg}


def _train_messages(nodes, rows=64):
    arrays = ArrayRecord({"w": Array(np.zeros((rows, 8), np.float32)), "b": Array(np.zeros(8, np.float32))})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
    return [instruction(content, n, "train") for n in nodes]


class DroppingGrid(InProcessGrid):
    """Devices in `drop` stop answering from the given stage on (a device killed mid-round)."""

    def __init__(self, client_app, num_nodes, drop: dict[int, str], run_config=None):
        super().__init__(client_app, num_nodes, keep_messages=True, run_config=run_config or _stub_run())
        self.drop = drop
        self.order = ["setup", "share", "upload", "unmask"]

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        out = []
        for r in replies:
            record = next((m.content.config_records.get(SECAGG) for m in messages
                           if m.metadata.dst_node_id == r.metadata.src_node_id), None)
            stage = str(record["stage"]) if record else ""
            node = r.metadata.src_node_id
            if node in self.drop and stage in self.order and \
                    self.order.index(stage) >= self.order.index(self.drop[node]):
                continue
            out.append(r)
        return out


def test_round_over_grid_recovers_survivors_sum_after_drops():
    grid = DroppingGrid(_stub_client_app(), 8, drop={2: "upload", 6: "unmask"})
    nodes = list(grid.get_node_ids())
    result = secure_sum(grid, _train_messages(nodes), PARAMS)
    survivors = [n for n in nodes if n != 2]  # 6 sent its vector, then died: its vector still counts
    assert result.devices == 7 and result.dropped == [2]
    for key in ("w", "b"):
        plain = sum(_stub_update(n)[key] for n in survivors)
        assert np.abs(result.total[key] - plain).max() <= 7 * 2 * PARAMS.clip_range / PARAMS.levels


class MisshapenUploadGrid(DroppingGrid):
    """Device `node`'s masked vector arrives with a coordinate missing, or as float32, or without the record
    naming its arrays, or with the record but not the names."""

    def __init__(self, node, how):
        super().__init__(_stub_client_app(), 8, drop={})
        self.node, self.how = node, how

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.metadata.src_node_id == self.node and "arrays" in r.content.array_records:
                vector = r.content.array_records["arrays"][VECTOR_KEY].numpy()
                if self.how == "short":
                    r.content.array_records["arrays"][VECTOR_KEY] = Array(vector[:-1])
                elif self.how == "float":
                    r.content.array_records["arrays"][VECTOR_KEY] = Array(vector.astype(np.float32))
                elif self.how == "no-keys":
                    del r.content.config_records[SECAGG]["keys"]
                else:
                    del r.content.config_records[SECAGG]
        return replies


@pytest.mark.parametrize("how", ["short", "float", "no-keys", "no-record"])
def test_a_misshapen_masked_vector_is_left_out_as_a_dropped_device(how):
    grid = MisshapenUploadGrid(node=4, how=how)
    nodes = list(grid.get_node_ids())
    result = secure_sum(grid, _train_messages(nodes), PARAMS)
    survivors = [n for n in nodes if n != 4]  # its pairwise masks are rebuilt from its mask-key shares
    assert result.devices == 7 and result.dropped == [4]
    for key in ("w", "b"):
        assert result.total[key].shape == _stub_update(1)[key].shape
        plain = sum(_stub_update(n)[key] for n in survivors)
        assert np.abs(result.total[key] - plain).max() <= 7 * 2 * PARAMS.clip_range / PARAMS.levels


class SuperLinkGrid(InProcessGrid):
    """Replies delivered the way Flower's deployment Grid (`HttpGrid`) gets them from a SuperLink.

    A reply is announced before its contents arrive, and a pull claims every announced reply and then
    downloads each one's contents in turn. A device in `killed_mid_upload` dies right after announcing its
    masked vector, before uploading it (a SuperNode SIGKILLed at that moment): pulling that reply blocks
    `hold` seconds (Flower: until the SuperLink's object-push session expires, 180 s) and yields an error,
    as Flower's does; the device never answers again, and the SuperLink lists it offline (as after its
    missed heartbeats). In the upload stage the others' replies arrive `late` seconds after the victims'.
    `send_and_receive` is Flower's own loop.
    """

    send_and_receive = HttpGrid.send_and_receive

    def __init__(self, client_app, num_nodes, killed_mid_upload, hold=1.5, late=0.3, run_config=None):
        super().__init__(client_app, num_nodes, run_config=run_config or _stub_run())
        self.killed, self.hold, self.late = set(killed_mid_upload), hold, late
        self.dead: set[int] = set()
        self.announced: dict[str, tuple[float, Message | None]] = {}  # id -> (arrives at, reply or None)
        self.lock = threading.Lock()
        self.pushed = 0

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            node, stage = msg.metadata.dst_node_id, str(msg.content.config_records[SECAGG]["stage"])
            self.pushed += 1
            message_id = f"pushed-{self.pushed}"
            assign_message_id(msg, message_id)
            ids.append(message_id)
            if node in self.dead:
                continue
            if node in self.killed and stage == "upload":
                self.dead.add(node)
                self.announced[message_id] = (time.monotonic(), None)
                continue
            self.contexts[node].run_config = dict(self.run_config)
            reply = self._run_client(instruction(msg.content, node, "train", message_id=message_id),
                                     self.contexts[node])
            self.announced[message_id] = (time.monotonic() + (self.late if stage == "upload" else 0.0), reply)
        return ids

    def get_node_ids(self):
        return [n for n in self.contexts if n not in self.dead]

    def pull_messages(self, message_ids):
        now = time.monotonic()
        with self.lock:
            claimed = {i: self.announced.pop(i)[1] for i in list(message_ids)
                       if i in self.announced and self.announced[i][0] <= now}
        out = []
        for message_id, reply in claimed.items():
            if reply is None:  # its contents never arrive: Flower retries until the push session expires
                time.sleep(self.hold)
                reply = Message(Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="contents never arrived"),
                                reply_to=instruction(RecordDict(), 0, "train", message_id=message_id))
            out.append(reply)
        return out


@pytest.fixture
def quick_polls(monkeypatch):
    """The stage's pull cadence scaled down to the stand-in SuperLink's (sub-second) timings."""
    import server.secagg

    monkeypatch.setattr(server.secagg, "POLL_SECONDS", 0.1, raising=False)
    monkeypatch.setattr(server.secagg, "FIRST_POLL_SECONDS", 0.05, raising=False)
    monkeypatch.setattr(server.secagg, "STUCK_SECONDS", 0.3, raising=False)
    monkeypatch.setattr(server.secagg, "LIVENESS_SECONDS", 0.2, raising=False)


@pytest.mark.usefixtures("quick_polls")
def test_devices_killed_mid_upload_leave_the_survivors_sum():
    """Two devices die after announcing their masked vectors, before uploading them: the round unmasks the
    other six's sum, rebuilding the victims' pairwise masks from the survivors' shares of their mask keys.
    (Flower's `send_and_receive` spent the stage's whole timeout on the victims' replies and pulled none of
    the survivors': "only 0 masked vectors arrived".)"""
    grid = SuperLinkGrid(_stub_client_app(), 8, killed_mid_upload={2, 5})
    nodes = list(range(1, 9))
    started = time.monotonic()
    result = secure_sum(grid, _train_messages(nodes), PARAMS, timeout=2.0)
    assert time.monotonic() - started < 2 * 2.0 + 2  # no stage waited beyond its timeout
    survivors = [n for n in nodes if n not in (2, 5)]
    assert result.devices == 6 and sorted(result.dropped) == [2, 5]
    for key in ("w", "b"):
        plain = sum(_stub_update(n)[key] for n in survivors)
        assert np.abs(result.total[key] - plain).max() <= 6 * 2 * PARAMS.clip_range / PARAMS.levels


@pytest.mark.usefixtures("quick_polls")
def test_a_stage_stops_waiting_once_the_devices_it_waits_for_are_offline():
    """A dead device's half-sent reply would hold its pull for the SuperLink's push-session lifetime (here 30 s,
    Flower's 180 s): the stage goes on as soon as every device it still waits for is offline, not at its
    timeout (20 s)."""
    grid = SuperLinkGrid(_stub_client_app(), 8, killed_mid_upload={3, 7}, hold=30.0)
    nodes = list(range(1, 9))
    started = time.monotonic()
    result = secure_sum(grid, _train_messages(nodes), PARAMS, timeout=20.0)
    assert time.monotonic() - started < 6
    assert result.devices == 6 and sorted(result.dropped) == [3, 7]


@pytest.mark.usefixtures("quick_polls")
def test_min_cohort_guards_the_central_noise_when_devices_drop_after_masking():
    """User-level DP: the sum released after drop-outs carries the noise shares of at least m_min devices, so
    at least the central variance (z C)^2; one survivor fewer than secagg-min-cohort and nothing is released,
    although the threshold (3) would still allow unmasking."""
    z, clip, m_min = 1.0, 0.5, 4
    params = SecAggParams(threshold=3, clip_range=clip + 6 * share_noise_std(z, clip, m_min), quantization_bits=20,
                          min_cohort=m_min)
    run = _stub_run(**{"user-dp": True, "user-clipping-norm": clip, "user-noise-multiplier": z,
                       "secagg-threshold": 3, "secagg-min-cohort": m_min, "secagg-clip-range": params.clip_range,
                       "secagg-quantization-bits": 20})
    grid = SuperLinkGrid(_zero_client_app(), 6, killed_mid_upload={1, 4}, run_config=run)
    result = secure_sum(grid, _train_messages(list(range(1, 7)), rows=4000), params, timeout=2.0)
    assert result.devices == m_min
    noise = np.concatenate([result.total["w"].ravel(), result.total["b"].ravel()])  # 32,008 coordinates
    assert np.var(noise) == pytest.approx((z * clip) ** 2, rel=0.05)  # m_min shares of (z C)^2 / m_min

    wrapped = SecureAggregationGrid(SuperLinkGrid(_zero_client_app(), 6, killed_mid_upload={1, 4, 6},
                                                  run_config=run), params, denominator=6.0)
    assert wrapped.send_and_receive(_train_messages(list(range(1, 7))), timeout=2.0) == []
    assert "only 3 masked vectors arrived" in wrapped.rounds[-1]["refused"]


def test_round_over_grid_refused_below_threshold_and_grid_releases_nothing():
    drop = {n: "upload" for n in (1, 2, 3, 4, 5)}  # 3 of 8 survive masking; min survivors is 4
    grid = DroppingGrid(_stub_client_app(), 8, drop=drop)
    params = SecAggParams(threshold=4, clip_range=1.0, quantization_bits=16, min_cohort=4)
    nodes = list(grid.get_node_ids())
    with pytest.raises(SecAggAborted, match="at least 4"):
        secure_sum(grid, _train_messages(nodes), params)
    wrapped = SecureAggregationGrid(DroppingGrid(_stub_client_app(), 8, drop=drop), params)
    assert wrapped.send_and_receive(_train_messages(nodes)) == []
    assert "refused" in wrapped.rounds[-1]


def test_every_array_a_device_sends_is_masked_and_uniform():
    grid = DroppingGrid(_stub_client_app(), 8, drop={})
    nodes = list(grid.get_node_ids())
    secure_sum(grid, _train_messages(nodes), PARAMS)
    arrays_sent = [a for r in grid.replies for rec in r.content.array_records.values() for a in rec.values()]
    assert len(arrays_sent) == 8  # one flat vector per device (w and b), nothing else
    assert all(a.shape == (64 * 8 + 8,) for a in arrays_sent)
    values = np.concatenate([a.numpy().ravel() for a in arrays_sent])
    assert all(a.numpy().dtype == np.uint32 for a in arrays_sent)
    # Uniform on [0, 2^32): chi-square over 64 equal bins and KS against U(0, 1).
    counts = np.bincount((values >> np.uint32(26)).astype(np.int64), minlength=64)
    assert stats.chisquare(counts).pvalue > 1e-4
    assert stats.kstest(values / 2.0 ** 32, "uniform").pvalue > 1e-4
    # Unmasked, the quantized updates sit in a narrow band of the field (|delta| <= 0.3 of a range of 1).
    plain = quantize_vector([_stub_update(1)["w"]], PARAMS)[0]
    assert plain.max() < 2 ** 16 and stats.kstest(plain.ravel() / 2.0 ** 32, "uniform").pvalue < 1e-6
    # No config record a device sent holds floats of its update either: only keys, ciphertexts, shares.
    for reply in grid.replies:
        for record in reply.content.config_records.values():
            assert all(isinstance(v, (bytes, int, str)) or isinstance(v, list) for v in record.values())


def test_strategy_sees_only_the_aggregate():
    grid = SecureAggregationGrid(DroppingGrid(_stub_client_app(), 6, drop={}), PARAMS)
    nodes = list(grid.get_node_ids())
    replies = list(grid.send_and_receive(_train_messages(nodes)))
    arrays = [r.content.array_records["arrays"]["w"].numpy() for r in replies]
    mean = sum(_stub_update(n)["w"] for n in nodes) / 6
    assert all(np.array_equal(a, arrays[0]) for a in arrays)  # one aggregate, no individual update
    assert np.abs(arrays[0] - mean).max() < 1e-3


# ----------------------------------------------------------------------------- distributed noise
def test_noise_shares_add_up_to_at_least_the_central_noise():
    z, clip, m_min = 1.2, 0.5, 4
    cfg = {"user-dp": True, "user-clipping-norm": clip, "user-noise-multiplier": z, "secagg-min-cohort": m_min}
    zero = {"w": np.zeros(20000)}
    rng = np.random.default_rng(0)
    shares = [device_vector(zero, cfg, rng)["w"] for _ in range(m_min)]
    assert np.var(shares[0]) == pytest.approx(share_noise_std(z, clip, m_min) ** 2, rel=0.05)
    assert np.var(sum(shares)) >= 0.95 * (z * clip) ** 2  # m_min devices carry the central variance
    assert np.var(sum(shares)) == pytest.approx((z * clip) ** 2, rel=0.05)


def test_device_clips_its_update_before_adding_noise():
    cfg = {"user-dp": True, "user-clipping-norm": 0.5, "user-noise-multiplier": 1e-9, "secagg-min-cohort": 4}
    out = device_vector({"w": np.full(100, 1.0)}, cfg, np.random.default_rng(0))
    assert np.linalg.norm(out["w"]) == pytest.approx(0.5, rel=1e-6)


def test_secure_round_with_user_dp_carries_central_noise():
    """Zero updates, user-dp on: the unmasked sum of m_min devices has variance >= (z C)^2."""
    z, clip = 1.0, 0.5
    params = SecAggParams(threshold=2, clip_range=clip + 6 * share_noise_std(z, clip, 4), quantization_bits=20,
                          min_cohort=4)
    grid = DroppingGrid(_zero_client_app(), 4, drop={}, run_config=_stub_run(**{
        "user-dp": True, "user-clipping-norm": clip, "user-noise-multiplier": z, "secagg-threshold": 2,
        "secagg-min-cohort": 4, "secagg-clip-range": params.clip_range, "secagg-quantization-bits": 20}))
    result = secure_sum(grid, _train_messages(list(grid.get_node_ids()), rows=4000), params)
    noise = np.concatenate([result.total["w"].ravel(), result.total["b"].ravel()])
    # 32,008 coordinates: the variance estimate's relative std is sqrt(2 / n) = 0.8%, so 5% is > 6 sigma
    # (with 520 coordinates a 10% band failed about one run in ten: the noise comes from OS entropy)
    assert np.var(noise) == pytest.approx((z * clip) ** 2, rel=0.05)


def _zero_client_app():
    app = ClientApp()

    @app.train(mods=[secagg_mod])
    def train(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"arrays": msg.content.array_records["arrays"],
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    return app


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, key", [
    ({"secagg-threshold": 1}, "secagg-threshold"),
    ({"secagg-threshold": 65}, "secagg-threshold"),
    ({"secagg-min-cohort": 65}, "secagg-min-cohort"),
    ({"secagg-quantization-bits": 27}, "secagg-quantization-bits"),  # 64 x (2^27 - 1) >= 2^32
    ({"user-dp": True, "secagg-clip-range": 0.6}, "secagg-clip-range"),
])
def test_bad_secure_aggregation_settings_refused_naming_the_key(overrides, key):
    with pytest.raises(PrivrecError) as err:
        config.validate({"secure-aggregation": True, "devices-per-round": 64, **overrides})
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


def test_defaults_with_secure_aggregation_are_valid():
    cfg = config.validate({"secure-aggregation": True, "user-dp": True})
    assert json.dumps(cfg)


# ----------------------------------------------------------------------------- the real apps, in process
@pytest.mark.parametrize("user_dp", [False, True])
def test_federated_run_with_secure_aggregation(tmp_path, user_dp):
    from client.app import app as client_app
    from server.app import FederatedRun
    from server.run_dir import RunDirectory
    from tests.synthetic import walk_store

    store = walk_store(tmp_path / "store", num_users=6, num_items=30)
    cfg = config.validate({"max-len": 16, "window": 6, "hidden-size": 16, "num-heads": 2, "num-blocks": 1,
                           "dropout": 0.0, "batch-size": 2, "dp": False, "data-store": str(store),
                           "num-rounds": 2, "devices-per-round": 6 if not user_dp else 5, "eval-every": 0,
                           "run-dir": str(tmp_path / "runs"), "run-name": "t", "fraction-evaluate": 0.5,
                           "secure-aggregation": True, "secagg-threshold": 2, "secagg-min-cohort": 2,
                           "user-dp": user_dp, "user-noise-multiplier": 0.1, "user-clipping-norm": 0.5})
    run_dir = RunDirectory.create(cfg["run-dir"], cfg["run-name"])
    grid = InProcessGrid(client_app, 6, keep_messages=True, run_config=cfg)
    for node, context in grid.contexts.items():  # the audit mod logs every reply as it leaves the device
        context.node_config["audit-log"] = str(tmp_path / f"audit-{node}.jsonl")
    FederatedRun(cfg, run_dir, grid).execute()
    assert json.loads((run_dir.path / "status.json").read_text())["state"] == "completed"
    rows = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    if not user_dp:  # a fixed cohort of 6, none dropped (user-dp draws a Poisson cohort)
        assert [r["devices-trained"] for r in rows[1:]] == [6, 6]
        assert [r["secure-aggregation"] for r in rows[1:]] == [{"devices": 6, "dropped": 0}] * 2
    summary = json.loads((run_dir.path / "summary.json").read_text())
    if user_dp:
        assert "the server" in summary["privacy"]["user-level"]["adversary"]
        assert "m_min = 2" in summary["privacy"]["user-level"]["adversary"]
    train_arrays = [a for r in grid.replies if "arrays" in r.content.array_records and
                    "num-examples" in next(iter(r.content.metric_records.values()))
                    and "steps" in next(iter(r.content.metric_records.values()))
                    for a in r.content.array_records["arrays"].values()]
    assert train_arrays and all(a.numpy().dtype == np.uint32 for a in train_arrays)  # masked, every one
    # The devices' own audit logs agree: every train reply's arrays are uint32 masks, other stages send none.
    entries = [e for node in grid.contexts for e in read_audit(tmp_path / f"audit-{node}.jsonl")]
    train_entries = [e for e in entries if e["type"] == "train"]
    assert {e.get("secagg-stage") for e in train_entries} == {"setup", "share", "upload", "unmask"}
    for entry in train_entries:
        dtypes = {a["dtype"] for record in entry["arrays"].values() for a in record.values()}
        assert dtypes == ({"uint32"} if entry["secagg-stage"] == "upload" else set())
        assert set(entry["metrics"].get("metrics", {})) <= ALLOWED_METRICS


def test_same_model_with_and_without_secure_aggregation_up_to_quantization(tmp_path):
    """On-device DP (every device weighs 1 in FedAvg), repeatable device noise: the same run with and without
    secure aggregation ends in the same model, up to the quantization step."""
    import torch

    from client.app import app as client_app
    from server.app import FederatedRun
    from server.run_dir import RunDirectory
    from tests.synthetic import walk_store

    store = walk_store(tmp_path / "store", num_users=4, num_items=30)
    models = []
    for secure in (False, True):
        cfg = config.validate({"max-len": 16, "window": 6, "hidden-size": 16, "num-heads": 2, "num-blocks": 1,
                               "dropout": 0.0, "batch-size": 2, "data-store": str(store), "num-rounds": 2,
                               "devices-per-round": 4, "eval-every": 0, "central-eval": False,
                               "fraction-evaluate": 0.5, "deterministic-devices": True,
                               "run-dir": str(tmp_path / f"runs-{secure}"), "run-name": "t",
                               "population-dir": str(tmp_path / f"population-{secure}"),
                               "secure-aggregation": secure, "secagg-threshold": 2, "secagg-min-cohort": 2,
                               "secagg-quantization-bits": 24})
        run_dir = RunDirectory.create(cfg["run-dir"], cfg["run-name"])
        FederatedRun(cfg, run_dir, InProcessGrid(client_app, 4, run_config=cfg)).execute()
        models.append(torch.load(run_dir.path / "model.pt"))
    step = 2 * 2.0 / (2 ** 24 - 1)  # default clip range 2.0, 24 bits
    diffs = {k: float((models[0][k] - models[1][k]).abs().max()) for k in models[0]}
    assert max(diffs.values()) < 10 * step, diffs  # two rounds of rounding, then training on top
    assert max(diffs.values()) > 0  # it really went through the quantizer


def test_federated_run_refuses_a_round_with_too_few_survivors_and_keeps_the_model(tmp_path):
    from client.app import app as client_app
    from server.app import FederatedRun
    from server.run_dir import RunDirectory
    from tests.synthetic import walk_store

    store = walk_store(tmp_path / "store", num_users=5, num_items=30)
    cfg = config.validate({"max-len": 16, "window": 6, "hidden-size": 16, "num-heads": 2, "num-blocks": 1,
                           "batch-size": 2, "dp": False, "data-store": str(store), "num-rounds": 1,
                           "devices-per-round": 5, "eval-every": 0, "run-dir": str(tmp_path / "runs"),
                           "run-name": "t", "central-eval": True, "secure-aggregation": True,
                           "secagg-threshold": 3, "secagg-min-cohort": 3})
    run_dir = RunDirectory.create(cfg["run-dir"], cfg["run-name"])
    grid = DroppingGrid(client_app, 5, drop={1: "upload", 2: "upload", 3: "upload"}, run_config=cfg)  # 2 of 5
    FederatedRun(cfg, run_dir, grid).execute()
    rows = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    assert "at least 3" in rows[1]["secure-aggregation"]["refused"] and rows[1]["devices-trained"] == 0
    assert rows[1]["central"]["test-ndcg@10"] == rows[0]["central"]["test-ndcg@10"]  # the model is unchanged


def test_deploy_local_refuses_a_threshold_above_the_cohort_before_starting(tmp_path, capsys):
    from shared.data.devices import split_devices
    from shared.data.store import open_store
    from tests.synthetic import walk_store
    from tests.test_cli import assert_user_error
    from tools.cli import main

    store = open_store(walk_store(tmp_path / "store", num_users=3, num_items=30))
    devices_dir = split_devices(store, tmp_path / "devices")
    code = main(["deploy", "local", "--devices", "3", "--devices-dir", str(devices_dir), "--secure-aggregation",
                 "--run-dir", str(tmp_path / "runs"), "--run-name", "r"])
    assert_user_error(code, capsys.readouterr().err, "'secagg-threshold' = 8")
    assert not (tmp_path / "runs" / "r" / "deploy").exists()  # nothing started
