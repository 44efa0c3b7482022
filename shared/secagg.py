"""Secure aggregation (SecAgg+, semi-honest) for privrec: the protocol's arithmetic, without transport.

The server learns only the sum of the vectors of the devices that survive a round, never one device's
vector. Built on Flower's primitives (`flwr.common.secure_aggregation`: key agreement, authenticated encryption,
quantization, share packing) and the `shamirs` library's Shamir scheme over a prime field (pycryptodome's,
which Flower's wrapper calls, does its GF(2^128) arithmetic in pure Python: ~4x slower to split and ~3x to
rebuild, the largest cost of a round); this file holds only the protocol's bookkeeping.

Stages (names as in Bonawitz et al. 2017 and Bell et al. 2020, "SecAgg+"):
1. setup      each device makes two EC key pairs (one to encrypt shares, one to agree masks) and
              advertises the public halves.
2. share      each device draws a self-mask seed b and Shamir-shares b and the seed of its mask key
              among itself and its neighbours (threshold t), each share encrypted for its holder.
3. upload     each device sends y = q(x) + PRG(b) + sum over neighbours j of +-PRG(agree(i, j)) mod 2^32.
4. unmask     each surviving device returns, for each neighbour, the share of b (neighbour survived)
              or of its mask key seed (neighbour dropped), never both. With t shares per device the server
              removes every mask: the pairwise masks of survivors cancel, the rest it recomputes.

Neighbours: a ring over a random order, 2(t - 1) neighbours each (all others in small cohorts), so a
device's secrets are split into 2t - 1 shares of which t, a strict majority, rebuild them.

Wrap-around: each quantized coordinate lies in [0, 2^bits - 1]; the 32-bit field (as many bytes as a
float32 update) holds the sum of n devices exactly when n (2^bits - 1) < 2^32. A larger cohort or bit
width is refused (`check_no_wrap`), so the unmasked sum is never reduced modulo the field.

Distributed noise (user-level DP): each device adds N(0, (z C)^2 / m_min) to its L2-clipped update
before masking; a sum of at least m_min devices then carries variance >= (z C)^2, the central noise.
The server refuses to unmask fewer than max(t, m_min) devices. Noise beyond the clip range would be
clipped by the quantizer; `check_clip_range` demands a clip range of C + 6 share std devs.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import shamirs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from shared.errors import PrivrecError

FIELD_BITS = 32  # masked vectors travel as uint32
MAX_QUANTIZATION_BITS = 30  # Flower's stochastic rounding works in int32
CLIP_MARGIN_STDS = 6.0  # P(|N(0, 1)| > 6) < 2e-9 per coordinate
MASK_CHUNK = 65536  # coordinates per pass of the quantizer and the masks: a chunk stays in cache through them


class SecAggAborted(PrivrecError):
    """A round's sum cannot be unmasked (too few survivors or shares): nothing is released."""


@dataclass(frozen=True)
class SecAggParams:
    threshold: int  # t: shares needed to rebuild one device's secret
    clip_range: float  # coordinates are clipped to [-clip_range, clip_range] before quantization
    quantization_bits: int  # levels per coordinate: 2^bits - 1 steps over the clip range
    min_cohort: int  # m_min: the fewest devices whose sum the server may unmask

    @property
    def levels(self) -> int:
        return 2 ** self.quantization_bits - 1

    @property
    def min_survivors(self) -> int:
        return max(self.threshold, self.min_cohort)


def params_from_config(cfg: Mapping) -> SecAggParams:
    return SecAggParams(threshold=int(cfg["secagg-threshold"]), clip_range=float(cfg["secagg-clip-range"]),
                        quantization_bits=int(cfg["secagg-quantization-bits"]),
                        min_cohort=int(cfg["secagg-min-cohort"]))


def release_params(cfg: Mapping) -> SecAggParams:
    """The SecAgg+ parameters of the scorers' analytics releases: every device joins them, so their m_min
    (`secagg-release-min-cohort`, 0 = `secagg-min-cohort`) may be near the population."""
    params = params_from_config(cfg)
    release = int(cfg.get("secagg-release-min-cohort") or 0)
    return SecAggParams(threshold=params.threshold, clip_range=params.clip_range,
                        quantization_bits=params.quantization_bits, min_cohort=release or params.min_cohort)


def check_no_wrap(params: SecAggParams, devices: int, key: str = "secagg-quantization-bits") -> None:
    """Refuse a bit width whose sum over `devices` could wrap around the 32-bit field."""
    if (devices * params.levels).bit_length() > FIELD_BITS:
        raise PrivrecError(f"config key '{key}' = {params.quantization_bits}: the sum of {devices} devices' "
                           f"{params.quantization_bits}-bit values could wrap around the {FIELD_BITS}-bit field "
                           f"(needs {devices} x (2^{params.quantization_bits} - 1) < 2^{FIELD_BITS}); use fewer bits")


def share_noise_std(noise_multiplier: float, clip: float, min_cohort: int) -> float:
    """One device's Gaussian share: std z C / sqrt(m_min), so m_min shares add up to the central z C."""
    return noise_multiplier * clip / math.sqrt(min_cohort)


def check_clip_range(params: SecAggParams, clip: float, noise_multiplier: float | None, what: str = "") -> None:
    """The quantizer must not clip a clipped update, nor (in practice) its noise share. `what` names the
    bound in the refusal (default: the user-level update's)."""
    need = clip + (CLIP_MARGIN_STDS * share_noise_std(noise_multiplier, clip, params.min_cohort)
                   if noise_multiplier else 0.0)
    if params.clip_range < need:
        what = what or f"user-clipping-norm plus {CLIP_MARGIN_STDS:g} std devs of a device's noise share"
        raise PrivrecError(f"config key 'secagg-clip-range' = {params.clip_range}: must be at least "
                           f"{need:.6g} ({what}), or the quantizer clips the contribution and its noise")


def neighbours(order: Sequence[int], threshold: int) -> dict[int, list[int]]:
    """SecAgg+ graph: a ring over `order`, t - 1 neighbours on each side (everyone when the ring is small)."""
    n, half = len(order), threshold - 1
    if 2 * half >= n - 1:
        return {node: [m for m in order if m != node] for node in order}
    out = {}
    for i, node in enumerate(order):
        out[node] = [order[(i + d) % n] for d in range(-half, half + 1) if d != 0]
    return out


def random_order(nodes: Sequence[int]) -> list[int]:
    """The ring's order, from OS entropy (a predictable order would let the server pick neighbourhoods)."""
    order = list(nodes)
    random.SystemRandom().shuffle(order)
    return order


# -- arithmetic ---------------------------------------------------------------------------------
def _keystream(seed: bytes):
    """An AES-256-CTR encryptor keyed by `seed`: its output on zeros is the seed's keystream (a cryptographic PRG)."""
    return Cipher(algorithms.AES(hashlib.sha256(seed).digest()), modes.CTR(b"\0" * 16)).encryptor()


def mask_stream(seed: bytes, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform integers mod 2^32 from a seed, in `shapes` (the mask `apply_masks` adds for that seed)."""
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    nbytes = sum(sizes) * 4
    out = bytearray(nbytes + 15)  # update_into wants room for one more block
    _keystream(seed).update_into(bytes(nbytes), out)
    return _split(np.frombuffer(out, dtype=np.uint32, count=sum(sizes)).copy(), shapes)


def apply_masks(vector: Sequence[np.ndarray], masks: Iterable[tuple[bytes, int]]) -> list[np.ndarray]:
    """`vector` (uint32 arrays) plus sign x PRG(seed) for every (seed, sign) in `masks`, mod 2^32.

    One flat accumulator, added in place (uint32 arithmetic wraps: the field's addition), chunk by chunk:
    each seed's keystream continues from chunk to chunk, so the result is the same as adding whole streams,
    while the chunk being masked stays in cache for all 2t - 1 seeds (a third faster on a 272k vector).
    """
    shapes = [np.shape(v) for v in vector]
    total = np.concatenate([np.asarray(v, dtype=np.uint32).ravel() for v in vector])
    streams = [(_keystream(seed), np.add if sign > 0 else np.subtract) for seed, sign in masks]
    buffer = bytearray(4 * MASK_CHUNK + 15)
    zeros = memoryview(bytes(4 * MASK_CHUNK))
    for start in range(0, total.size, MASK_CHUNK):
        part = total[start:start + MASK_CHUNK]
        stream = np.frombuffer(buffer, dtype=np.uint32, count=part.size)
        for encryptor, op in streams:
            encryptor.update_into(zeros[:4 * part.size], buffer)
            op(part, stream, out=part)
    return _split(total, shapes)


def _split(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(flat[start:start + size].reshape(shape))
        start += size
    return out


VECTOR_KEY = "secagg-vector"  # the one masked array a device uploads: its summed arrays, flat, in key order


def array_values(array) -> np.ndarray:
    """A Flower `Array`'s values, read-only, without `Array.numpy()`'s header parse.

    Flower stores `np.save` output; `np.load` parses its header with `ast.literal_eval` (~50 us an array, most
    of decoding a model's 38 small arrays, twice per device per round under secure aggregation). When the
    header is the one `np.save` writes for these dtype and shape in C order, the values are the last bytes;
    anything else (another format version, Fortran order, trailing bytes) goes through `Array.numpy()`.
    """
    dtype = np.dtype(array.dtype)
    shape = tuple(int(d) for d in array.shape)
    nbytes = math.prod(shape) * dtype.itemsize
    head = bytes(memoryview(array.data)[:max(len(array.data) - nbytes, 0)])
    expected = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    if (array.stype == "numpy.ndarray" and head[:8] == b"\x93NUMPY\x01\x00"  # format 1.0: 2-byte header size
            and 10 + int.from_bytes(head[8:10], "little") == len(head) and expected in head):
        return np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=len(head)).reshape(shape)
    return array.numpy()


def quantize_vector(arrays: Sequence[np.ndarray], params: SecAggParams,
                    rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Clip to the range and round stochastically to integers in [0, levels]: Flower's quantizer (same
    scale, same unbiased rounding, by default from NumPy's global generator as Flower's, so a seeded
    simulation rounds alike), computed in place as floor(x + U[0, 1)): 2-3x faster than Flower's."""
    return [quantize_flat(np.array(a, dtype=np.float64), params, rng).reshape(np.shape(a)) for a in arrays]


def quantize_flat(x: np.ndarray, params: SecAggParams, rng: np.random.Generator | None = None) -> np.ndarray:
    """`quantize_vector` of one float64 array, overwriting it; the uint32 result is the one allocation. Chunk
    by chunk (each stays in cache through all the passes: twice as fast on a 272k vector as whole-array
    passes), drawing the rounding as one call would. A Generator (PCG64) draws twice as fast as NumPy's
    global MT19937."""
    x = x.reshape(-1)  # a view of a contiguous array
    scale = params.levels / (2 * params.clip_range)
    out = np.empty(x.size, dtype=np.uint32)
    uniform = np.empty(min(x.size, MASK_CHUNK))
    for start in range(0, x.size, MASK_CHUNK):
        chunk, u = x[start:start + MASK_CHUNK], uniform[:min(MASK_CHUNK, x.size - start)]
        chunk *= scale
        chunk += params.clip_range * scale
        np.clip(chunk, 0.0, params.levels, out=chunk)  # = clipping to [-clip_range, clip_range] first
        if rng is not None:
            rng.random(out=u)
        else:
            u[:] = np.random.random_sample(u.shape)
        chunk += u
        np.minimum(chunk, params.levels, out=chunk)  # L + U may round up to L + 1 in float64: never past L
        out[start:start + chunk.size] = chunk  # truncation: the floor of a non-negative value
    return out


def dequantize_sum(total: Sequence[np.ndarray], params: SecAggParams, devices: int) -> list[np.ndarray]:
    """Float sum of `devices` quantized vectors: each carried an offset of clip_range."""
    floats = dequantize([t.astype(np.float64) for t in total], params.clip_range, params.levels)
    return [f - (devices - 1) * params.clip_range for f in floats]  # dequantize removed one offset


# Key agreement on X25519 (the `cryptography` library; a 128-bit security level like AES-128 and the 128-bit
# seeds): 2.5x cheaper per agreement than P-256 with PEM keys, and a device makes 4(t - 1) of them a round.


# Shamir over GF(p), p the smallest prime above 2^128: every 16-byte seed is a field element, and `shamirs`
# draws the polynomial's coefficients uniformly from the field with `secrets`, so t - 1 shares say nothing.
SHAMIR_PRIME = 2 ** 128 + 51
SECRET_BYTES = 16
_SHARE_VALUE_BYTES = 17  # a field element below p < 2^136


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """`num` Shamir shares of a 16-byte secret, any `threshold` of which rebuild it; each share is its
    4-byte index (1, 2, ...) and its 17-byte value, little-endian."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret to share must be {SECRET_BYTES} bytes, not {len(secret)}")
    points = shamirs.shares(int.from_bytes(secret, "little"), quantity=num, modulus=SHAMIR_PRIME,
                            threshold=threshold, compact=True)
    return [p.index.to_bytes(4, "little") + p.value.to_bytes(_SHARE_VALUE_BYTES, "little") for p in points]


def combine_shares(shares: Sequence[bytes], threshold: int) -> bytes:
    """The secret from `threshold` (or more) distinct shares made by `create_shares`."""
    points = {int.from_bytes(s[:4], "little"): int.from_bytes(s[4:], "little") for s in shares}
    if len(points) < threshold:
        raise SecAggAborted(f"{len(points)} distinct shares, fewer than the threshold {threshold}")
    value = shamirs.interpolate([shamirs.share(i, v) for i, v in points.items()], modulus=SHAMIR_PRIME,
                                threshold=threshold)
    if value >= 2 ** (8 * SECRET_BYTES):  # only from shares not made together: no seed is that large
        raise SecAggAborted("shares that do not rebuild a 16-byte secret")
    return value.to_bytes(SECRET_BYTES, "little")


def mask_key_from_seed(seed: bytes) -> x25519.X25519PrivateKey:
    """The mask key pair from a 16-byte seed: the seed (not the key) is what gets Shamir-shared. Any 32 bytes
    are an X25519 private key (the curve clamps them): SHA-256 of the seed."""
    return x25519.X25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest())


def _public_bytes(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _pair_seed(private: bytes | x25519.X25519PrivateKey, public: bytes) -> bytes:
    """The secret two devices share: X25519 agreement, then HKDF-SHA256 to a Fernet key, as Flower's
    `generate_shared_key` derives it from its EC keys (a channel key, or the seed of a pairwise mask)."""
    key = x25519.X25519PrivateKey.from_private_bytes(private) if isinstance(private, bytes) else private
    try:
        shared = key.exchange(x25519.X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # not a 32-byte key, or a low-order point (an all-zero agreement)
        raise SecAggAborted(f"a device's public key is unusable for key agreement: {exc}") from None
    return base64.urlsafe_b64encode(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=None).derive(shared))


# -- the device's side --------------------------------------------------------------------------
@dataclass
class DeviceSession:
    """One device's secrets for one round. `to_state`/`from_state` keep it between messages."""

    node: int
    threshold: int
    enc_private: bytes = b""
    mask_seed: bytes = b""  # the mask key pair derives from it (`mask_key_from_seed`)
    self_seed: bytes = b""
    peers: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node -> (enc pk, mask pk)
    channel: dict[int, bytes] = field(default_factory=dict)  # node -> symmetric key of our encrypted channel
    held: dict[int, bytes] = field(default_factory=dict)  # node -> encrypted share pair it gave us
    own_shares: tuple[bytes, bytes] = (b"", b"")  # our own (b share, mask seed share)

    def setup(self) -> tuple[bytes, bytes]:
        """Stage 1: fresh key pairs; returns the public (encryption, masking) keys."""
        enc_sk = x25519.X25519PrivateKey.generate()
        self.mask_seed = os.urandom(SECRET_BYTES)  # 128-bit, the level of X25519
        self.enc_private = enc_sk.private_bytes_raw()
        return _public_bytes(enc_sk), _public_bytes(mask_key_from_seed(self.mask_seed))

    def share_keys(self, peers: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Stage 2: Shamir-share b and the mask seed among self + neighbours; one ciphertext per neighbour."""
        self.peers = {int(k): v for k, v in peers.items() if int(k) != self.node}
        self.self_seed = os.urandom(SECRET_BYTES)
        holders = [self.node, *sorted(self.peers)]
        b_shares = create_shares(self.self_seed, self.threshold, len(holders))
        sk_shares = create_shares(self.mask_seed, self.threshold, len(holders))
        enc_private = x25519.X25519PrivateKey.from_private_bytes(self.enc_private)
        out = {}
        for holder, b_share, sk_share in zip(holders, b_shares, sk_shares):
            if holder == self.node:
                self.own_shares = (b_share, sk_share)
                continue
            self.channel[holder] = _pair_seed(enc_private, self.peers[holder][0])
            out[holder] = encrypt(self.channel[holder],
                                  share_keys_plaintext_concat(self.node, holder, b_share, sk_share))
        return out

    def mask(self, vector: Sequence[np.ndarray], received: Mapping[int, bytes]) -> list[np.ndarray]:
        """Stage 3: quantized `vector` plus self mask plus signed pairwise masks, mod 2^32.

        Pairwise masks only with the neighbours whose shares arrived: a neighbour that dropped before
        sharing has no shares from which the server could rebuild its side of the mask.
        """
        self.held = {int(k): v for k, v in received.items() if int(k) in self.peers}
        self.peers = {p: k for p, k in self.peers.items() if p in self.held}
        mask_private = mask_key_from_seed(self.mask_seed)
        pairs = [(_pair_seed(mask_private, mask_pk), 1 if self.node < peer else -1)
                 for peer, (_, mask_pk) in self.peers.items()]
        return apply_masks(vector, [(self.self_seed, 1), *pairs])

    def unmask(self, survivors: Sequence[int], dropped: Sequence[int]) -> dict[int, bytes]:
        """Stage 4: for each survivor the share of its b, for each dropped neighbour that of its mask key."""
        survivors, dropped = set(map(int, survivors)), set(map(int, dropped))
        if survivors & dropped:
            raise SecAggAborted("the server named a device both surviving and dropped: both of its secrets "
                                "would be revealed")
        out = {}
        if self.node in survivors:
            out[self.node] = self.own_shares[0]
        for peer, ciphertext in self.held.items():
            if peer not in survivors and peer not in dropped:
                continue
            src, dst, b_share, sk_share = share_keys_plaintext_separate(decrypt(self.channel[peer], ciphertext))
            if src != peer or dst != self.node:
                raise SecAggAborted(f"a share claimed to come from device {peer} was made for another pair")
            out[peer] = b_share if peer in survivors else sk_share
        return out

    def to_state(self) -> dict:
        return {"node": self.node, "threshold": self.threshold, "enc": self.enc_private,
                "mask": self.mask_seed, "seed": self.self_seed,
                "peer-ids": sorted(self.peers), "peer-enc": [self.peers[p][0] for p in sorted(self.peers)],
                "peer-mask": [self.peers[p][1] for p in sorted(self.peers)],
                "peer-channel": [self.channel.get(p, b"") for p in sorted(self.peers)],
                "held-ids": sorted(self.held), "held": [self.held[p] for p in sorted(self.held)],
                "own-b": self.own_shares[0], "own-sk": self.own_shares[1]}

    @classmethod
    def from_state(cls, state: Mapping) -> DeviceSession:
        s = cls(node=int(state["node"]), threshold=int(state["threshold"]), enc_private=bytes(state["enc"]),
                mask_seed=bytes(state["mask"]), self_seed=bytes(state["seed"]))
        s.peers = {int(p): (bytes(e), bytes(m)) for p, e, m in zip(state["peer-ids"], state["peer-enc"],
                                                                    state["peer-mask"])}
        s.channel = {int(p): bytes(c) for p, c in zip(state["peer-ids"], state["peer-channel"]) if c}
        s.held = {int(p): bytes(c) for p, c in zip(state["held-ids"], state["held"])}
        s.own_shares = (bytes(state["own-b"]), bytes(state["own-sk"]))
        return s


# -- the server's side --------------------------------------------------------------------------
@dataclass
class ServerSession:
    """The server's view of one round: the graph, the public keys, the masked vectors it received."""

    params: SecAggParams
    graph: dict[int, list[int]]
    public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node -> (enc pk, mask pk)
    masked: dict[int, list[np.ndarray]] = field(default_factory=dict)

    @classmethod
    def start(cls, params: SecAggParams, nodes: Sequence[int]) -> ServerSession:
        if len(nodes) < params.min_survivors:
            raise SecAggAborted(f"{len(nodes)} devices sampled, fewer than the {params.min_survivors} "
                                "secure aggregation needs (max of secagg-threshold and secagg-min-cohort)")
        try:
            check_no_wrap(params, len(nodes))  # a Poisson cohort can outgrow the configured one
        except PrivrecError as exc:
            raise SecAggAborted(str(exc)) from None
        return cls(params=params, graph=neighbours(random_order(nodes), params.threshold))

    def keep(self, alive: Sequence[int], stage: str) -> None:
        """Drop every device that did not answer `stage`; abort below the minimum."""
        alive = set(alive)
        if len(alive) < self.params.min_survivors:
            raise SecAggAborted(f"only {len(alive)} devices answered the {stage} stage; at least "
                                f"{self.params.min_survivors} must survive for the sum to be unmasked")
        self.public = {n: k for n, k in self.public.items() if n in alive}

    def peers_of(self, node: int) -> dict[int, tuple[bytes, bytes]]:
        return {p: self.public[p] for p in self.graph[node] if p in self.public}

    def unmask_request(self, node: int, survivors: Sequence[int]) -> tuple[list[int], list[int]]:
        """(surviving, dropped) neighbours of `node` (and itself if it survived) whose shares it must send."""
        surviving = set(survivors)
        mine = [node, *self.graph[node]]
        # dropped: advertised keys in stage 2 (so they may hold pairwise masks) but sent no vector
        return ([p for p in mine if p in surviving], [p for p in self.graph[node]
                                                     if p in self.public and p not in surviving])

    def unmask(self, shares: Mapping[int, Mapping[int, bytes]]) -> tuple[list[np.ndarray], int]:
        """Sum of the survivors' float vectors from every responder's shares; (sum, number of survivors)."""
        survivors = sorted(self.masked)
        if len(survivors) < self.params.min_survivors:
            raise SecAggAborted(f"only {len(survivors)} masked vectors arrived; at least "
                                f"{self.params.min_survivors} are needed to unmask")
        by_owner: dict[int, list[bytes]] = {}
        for answers in shares.values():
            for owner, share in answers.items():
                by_owner.setdefault(int(owner), []).append(share)
        total = [a.copy() for a in self.masked[survivors[0]]]
        for node in survivors[1:]:
            for t, a in zip(total, self.masked[node]):
                np.add(t, a, out=t)  # uint32: wraps modulo 2^32
        masks = [(self._rebuild(node, by_owner, "self-mask seed"), -1) for node in survivors]
        for node in (n for n in self.public if n not in self.masked):  # dropped after sharing its keys
            mask_private = mask_key_from_seed(self._rebuild(node, by_owner, "mask seed"))
            # each surviving neighbour added +-PRG(s_peer,node): remove it
            masks += [(_pair_seed(mask_private, self.public[peer][1]), -1 if peer < node else 1)
                      for peer in self.graph[node] if peer in self.masked]
        return dequantize_sum(apply_masks(total, masks), self.params, len(survivors)), len(survivors)

    def _rebuild(self, node: int, by_owner: Mapping[int, list[bytes]], what: str) -> bytes:
        got = by_owner.get(node, [])
        if len(got) < self.params.threshold:
            raise SecAggAborted(f"device {node}'s {what} has {len(got)} shares, fewer than the threshold "
                                f"{self.params.threshold}: the sum cannot be unmasked")
        return combine_shares(got, self.params.threshold)
