"""The device's side of secure aggregation: a train mod that answers the stages of `shared.secagg`.

A train message without a `secagg` record passes straight to the train function. With one, the
stage decides: `setup`, `share` and `unmask` are answered here (keys and shares, no data); `upload`
runs the real train function, then replaces its weights by one masked vector of the device's update
(the summed arrays flattened in the order of the reply's `secagg` record `keys`; clipped to
user-clipping-norm and noised with its share of the central noise under user-level DP), so no
unmasked array ever leaves the device. The round's secrets live in `context.state` between
messages and are deleted after `unmask`.

The scorers' analytics queries (`query.popularity`, `query.cooccurrence`) carry this mod too: their upload
stage arrives as the query itself (the setup, share and unmask stages as train messages, one session in
`context.state`), the query function answers with the contribution as an array, and the mod masks it after
adding the device's share of that release's noise (its multiplier from the run config).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from shared.config import SCORER_MODELS, from_run_config
from shared.errors import PrivrecError
from shared.privacy.user_level import clip_update
from shared.secagg import (
    VECTOR_KEY,
    DeviceSession,
    array_values,
    params_from_config,
    quantize_flat,
    release_params,
    share_noise_std,
)

SECAGG = "secagg"  # instruction record naming the stage (same name in server/secagg.py)
STATE = "secagg-session"  # context.state record holding this round's secrets


# Analytics queries that run under secure aggregation (`model` = content-/channel-scorer) -> the run-config key of
# their noise multiplier. Read from the device's own run config, never from the server's message.
ANALYTICS_NOISE = {"query.popularity": "popularity-noise-multiplier", "query.cooccurrence": "cooc-noise-multiplier"}


def summed_keys(keys, cfg) -> list[str]:
    """The arrays a device's update may change (its trainable scope): only these are summed. The scorers' released
    buffers (popularity, co-occurrence) and a consenting cohort's SASRec channel are frozen: never summed, so never
    noised."""
    if cfg["model"] in SCORER_MODELS:
        from shared.scorer import CHANNEL_FROZEN, FROZEN  # torch: only the upload stage, which trains anyway

        frozen = CHANNEL_FROZEN if cfg["model"] == "channel-scorer" else FROZEN
    else:
        from shared.model import FROZEN_BY_SCOPE  # torch: only the upload stage, which trains anyway, needs it

        frozen = FROZEN_BY_SCOPE[str(cfg["device-trains"])]
    from shared.aggregation import is_frozen

    return [k for k in keys if not is_frozen(k, frozen)]


def device_vector(update: dict[str, np.ndarray], cfg, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What the device masks: its update, under user-level DP clipped to C plus N(0, (z C)^2 / m_min)."""
    if not cfg["user-dp"]:
        return update
    clip = float(cfg["user-clipping-norm"])
    clipped, _ = clip_update(update, clip)
    std = share_noise_std(float(cfg["user-noise-multiplier"]), clip, int(cfg["secagg-min-cohort"]))
    return {k: v + rng.normal(0.0, std, size=v.shape) for k, v in clipped.items()}


def analytics_vector(contribution: dict[str, np.ndarray], noise_multiplier: float, min_cohort: int,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What the device masks for an analytics release: its contribution (each user's part of L2 norm <= 1 by
    construction: sensitivity 1, as without secure aggregation) plus N(0, z^2 / m_min)."""
    std = share_noise_std(noise_multiplier, 1.0, min_cohort)
    return {k: v + rng.normal(0.0, std, size=v.shape) for k, v in contribution.items()}


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    record = msg.content.config_records.get(SECAGG)
    if record is None:
        return call_next(msg, context)
    stage = str(record["stage"])
    if stage == "setup":
        session = DeviceSession(node=context.node_id, threshold=int(record["threshold"]))
        enc_pk, mask_pk = session.setup()
        _save(context, session)
        return _reply(msg, {"enc-pk": enc_pk, "mask-pk": mask_pk})
    session = _load(context)
    if stage == "share":
        peers = {int(p): (bytes(e), bytes(m)) for p, e, m in zip(record["peer-ids"], record["peer-enc"],
                                                                  record["peer-mask"])}
        out = session.share_keys(peers)
        _save(context, session)
        return _reply(msg, {"dst": list(out), "ct": list(out.values())})
    if stage == "upload":
        return _upload(msg, context, call_next, session, record)
    if stage == "unmask":
        shares = session.unmask([int(n) for n in record["survivors"]], [int(n) for n in record["dropped"]])
        del context.state.config_records[STATE]  # the round's secrets end here
        return _reply(msg, {"owners": list(shares), "shares": list(shares.values())})
    raise PrivrecError(f"secure aggregation: unknown stage {stage!r} in the server's message")


def _upload(msg: Message, context: Context, call_next: ClientAppCallable, session: DeviceSession,
            record: ConfigRecord) -> Message:
    reply = call_next(msg, context)
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return reply  # declined or failed: nothing to mask, the device counts as dropped
    cfg = from_run_config(context.run_config).values  # the run's static settings, as every ClientApp reads them
    params = params_from_config(cfg)
    current, trained = msg.content.array_records["arrays"], reply.content.array_records["arrays"]
    analytics = msg.metadata.message_type in ANALYTICS_NOISE  # its arrays: zeros, and the device's contribution
    keys = list(trained.keys()) if analytics else summed_keys(trained, cfg)
    update = {k: np.subtract(array_values(trained[k]), array_values(current[k]), dtype=np.float64) for k in keys}
    rng = np.random.default_rng()  # OS entropy: the server can replay neither the noise nor the rounding
    vector = analytics_vector(update, float(cfg[ANALYTICS_NOISE[msg.metadata.message_type]]),
                              release_params(cfg).min_cohort, rng) if analytics else device_vector(update, cfg, rng)
    flat = np.concatenate([vector[k].ravel() for k in keys]) if keys else np.zeros(0)
    received = {int(s): bytes(c) for s, c in zip(record["src"], record["ct"])}
    masked = session.mask([quantize_flat(flat, params, rng)], received)[0]
    _save(context, session)
    # One flat array (the summed arrays in `keys` order): one Array to encode here and to decode on the server.
    content = RecordDict({name: rec for name, rec in reply.content.items() if name != "arrays"})
    content["arrays"] = ArrayRecord({VECTOR_KEY: Array(masked)})
    content[SECAGG] = ConfigRecord({"keys": keys})
    return Message(content, reply_to=msg)


def _reply(msg: Message, values: dict) -> Message:
    return Message(RecordDict({SECAGG: ConfigRecord(values)}), reply_to=msg)


def _save(context: Context, session: DeviceSession) -> None:
    context.state.config_records[STATE] = ConfigRecord(session.to_state())


def _load(context: Context) -> DeviceSession:
    state = context.state.config_records.get(STATE)
    if state is None:
        raise PrivrecError("secure aggregation: a stage arrived before this device's setup (restarted node?)")
    return DeviceSession.from_state(state)
