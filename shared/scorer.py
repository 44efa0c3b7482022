"""The content scorer (`model = content-scorer`): a few hundred weights over public features and on-device signals.

Plain torch, no Flower. A device scores every item as

    s0 * popularity + (profile * w) . text[item] + s1 * raw-id proximity + s2 * year proximity

* `popularity`: log1p of the released user-level DP item-popularity histogram (a buffer of the model: it is
  public once released, and the same for every device; the DP-FedAvg rounds never change or noise it).
* `text`: the public MiniLM vectors of the catalogue (`shared.text.features`), unit rows; never shipped, each
  side builds them from the public catalogue.
* `profile`: a recency-weighted (decay^k) unit mean of the text vectors of the user's last items, and the two
  proximities (to the raw catalogue ids of the last items, and to their mean title year): computed on the device
  from its own history only; nothing of them leaves the device.
* Trained weights: `text_weight` (one per text dimension, started at the a-priori content weight 8) and
  `scales` (popularity, raw-id, year; started at 1, 0, 0): 387 weights with MiniLM.

A device's training contribution is the gradient of its mean softmax loss over its last `targets` training
items (`user_gradient`); under DP-FedAvg the server clips it, adds noise to the sum and takes a server
optimizer step (one local step: FedSGD).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.aggregation import is_frozen
from shared.errors import PrivrecError
from shared.metrics import eval_inputs, hit_at_k, left_pad, ndcg_at_k, target_ranks
from shared.model import ModelConfig, SASRec

CONTENT_WEIGHT = 8.0  # a-priori start of every text weight (issue 13's probes: 8-12 on validation)
RECENT_ITEMS = 3  # last items whose raw catalogue ids the raw-id proximity looks at
TRAINED = ("text_weight", "scales")  # what devices change; `popularity` is a released, frozen buffer
FROZEN = ("popularity",)


@dataclass(frozen=True)
class Catalogue:
    """Public item side: unit text rows [items + 1, d] (row 0 = padding), raw catalogue ids and title years,
    and (when the catalogue names them) unit genre rows [items + 1, genres] (the channel scorer's genre channel)."""

    text: torch.Tensor
    raw: np.ndarray
    years: np.ndarray
    genres: np.ndarray | None = None

    @property
    def num_items(self) -> int:
        return self.text.shape[0] - 1


def public_catalogue(text: np.ndarray, item_ids: Sequence[str], item_titles: Sequence[str | None],
                     item_genres: Sequence[Sequence[str]] | None = None) -> Catalogue:
    """The public item side from the catalogue (ids, titles and genres, index = item id) and its text vectors."""
    text = np.asarray(text, dtype=np.float32)
    unit = text / (np.linalg.norm(text, axis=1, keepdims=True) + 1e-12)
    raw = np.array([float(i) if str(i).isdigit() else 0.0 for i in item_ids], dtype=np.float64)
    years = np.array([float(m.group(1)) if (m := re.search(r"\((\d{4})\)", t or "")) else np.nan
                      for t in item_titles], dtype=np.float64)
    known = years[1:][~np.isnan(years[1:])]
    years = np.where(np.isnan(years), float(np.median(known)) if known.size else 0.0, years)
    genres = None
    if item_genres is not None:
        names = sorted({g for item in item_genres for g in item})
        genres = np.zeros((len(text), max(1, len(names))))
        for i, item in enumerate(item_genres):
            for g in item:
                genres[i, names.index(g)] = 1.0
        genres /= np.linalg.norm(genres, axis=1, keepdims=True) + 1e-12
    return Catalogue(torch.from_numpy(unit), raw, years, genres)


def read_catalogue(items_path: str | Path, text: np.ndarray) -> Catalogue:
    """`public_catalogue` from a store's or a deployment catalogue's items.json (public: ids and titles)."""
    from shared.errors import PrivrecError

    try:
        data = json.loads(Path(items_path).read_text(encoding="utf-8"))
        ids, titles, genres = data["item_ids"], data["item_titles"], data.get("item_genres")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrivrecError(f"{items_path}: cannot read the catalogue's item ids and titles ({exc})") from None
    if len(ids) != len(text) or len(titles) != len(text):
        raise PrivrecError(f"{items_path}: {len(ids)} items, but the text table has {len(text)} rows")
    if genres is not None and len(genres) != len(text):
        raise PrivrecError(f"{items_path}: {len(genres)} genre lists, but the text table has {len(text)} rows")
    return public_catalogue(text, ids, titles, genres)


def device_features(catalogue: Catalogue, histories: Sequence[np.ndarray], profile_items: int,
                    decay: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a device computes from its own histories: unit profiles [B, d], raw-id and year proximity [B, items+1]."""
    text = catalogue.text.numpy()
    n, width = len(histories), catalogue.num_items + 1
    profiles = np.zeros((n, text.shape[1]), dtype=np.float32)
    raw_near = np.zeros((n, width), dtype=np.float32)
    year_near = np.zeros((n, width), dtype=np.float32)
    for u, seq in enumerate(histories):
        seq = np.asarray(seq, dtype=np.int64).reshape(-1)
        if seq.size == 0:
            continue
        last = seq[-profile_items:][::-1]
        weights = decay ** np.arange(len(last))
        profile = weights @ text[last]
        profiles[u] = profile / (np.linalg.norm(profile) + 1e-12)
        recent = seq[-RECENT_ITEMS:]
        raw_near[u] = -np.log1p(np.abs(catalogue.raw[None, :] - catalogue.raw[recent][:, None]).min(0))
        year_near[u] = -np.abs(catalogue.years - (weights @ catalogue.years[last]) / weights.sum()) / 10.0
    return torch.from_numpy(profiles), torch.from_numpy(raw_near), torch.from_numpy(year_near)


class ContentScorer(torch.nn.Module):
    def __init__(self, num_items: int, dim: int) -> None:
        super().__init__()
        self.text_weight = torch.nn.Parameter(torch.full((dim,), CONTENT_WEIGHT))
        self.scales = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))
        self.register_buffer("popularity", torch.zeros(num_items + 1))

    def forward(self, text: torch.Tensor, profile: torch.Tensor, raw_near: torch.Tensor,
                year_near: torch.Tensor) -> torch.Tensor:
        content = (profile * self.text_weight) @ text.T
        s = self.scales
        return s[0] * self.popularity + content + s[1] * raw_near + s[2] * year_near

    @classmethod
    def from_state(cls, state, num_items: int, dim: int) -> ContentScorer:
        model = cls(num_items, dim)
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
        return model


def popularity_bias(released: np.ndarray) -> torch.Tensor:
    """The score bias from the released histogram: log1p of its positive part (padding 0)."""
    bias = np.log1p(np.maximum(np.asarray(released, dtype=np.float64), 0.0))
    bias[0] = 0.0
    return torch.from_numpy(bias.astype(np.float32))


def training_examples(train: Sequence[np.ndarray], targets: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(histories, next items) of the last `targets` training items of each of the device's users."""
    histories, nexts = [], []
    for seq in train:
        seq = np.asarray(seq, dtype=np.int64).reshape(-1)
        for pos in range(max(1, len(seq) - targets), len(seq)):
            histories.append(seq[:pos])
            nexts.append(seq[pos])
    return histories, np.asarray(nexts, dtype=np.int64)


def user_gradient(model: ContentScorer, catalogue: Catalogue, train: Sequence[np.ndarray], targets: int,
                  profile_items: int, decay: float) -> dict[str, torch.Tensor]:
    """Gradient of the mean softmax loss over the device's last `targets` training items, per trained weight.

    Zero for a device with no usable example (a history of one item): it still answers, and its zero update
    is as private as any other.
    """
    grads = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    histories, nexts = training_examples(train, targets)
    if not histories:
        return grads
    model.zero_grad()
    scores = model(catalogue.text, *device_features(catalogue, histories, profile_items, decay))
    loss = torch.nn.functional.cross_entropy(scores[:, 1:], torch.from_numpy(nexts) - 1)
    loss.backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def sent_back(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The arrays a device returns of a scorer's state: the trained ones only. The frozen ones (the released
    popularity, co-occurrence and transitions, a SASRec channel) are the server's own, which it keeps unchanged
    whatever a reply holds; sending them back made every channel-scorer reply 47 KiB (1,073 KiB with the transition
    release at K = 512) instead of 0.3 KiB (`simulations/transition_cost.py`)."""
    return {k: v.detach().clone() for k, v in state.items() if not is_frozen(k, FROZEN + CHANNEL_FROZEN)}


def fedsgd_update(model: ContentScorer, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights a device returns (`sent_back`): global - gradient (one unit step), so its update is minus its
    gradient."""
    state = sent_back(model.state_dict())
    for k, g in grads.items():
        state[k] = state[k] - g
    return state


def scorer_from_state(state, catalogue: Catalogue, model: str,
                      sasrec_config: ModelConfig | None = None) -> ContentScorer | ChannelScorer:
    """The `model` (content-/channel-scorer) a shipped or saved state holds, over the public catalogue;
    `sasrec_config`: the architecture of a consenting cohort's SASRec channel, if the state carries one."""
    if model == "channel-scorer":
        return ChannelScorer.from_state(state, catalogue.num_items, sasrec_config=sasrec_config,
                                        item_text=catalogue.text)
    return ContentScorer.from_state(state, catalogue.num_items, catalogue.text.shape[1])


def sasrec_channel_config(run, catalogue: Catalogue) -> ModelConfig | None:
    """The architecture of the SASRec channel a run config implies (its model section over the catalogue):
    None unless `model = channel-scorer` with a consenting cohort (`public-share > 0`)."""
    from shared.config import RunConfig

    run = RunConfig.of(run)
    if run.pipeline.model != "channel-scorer" or run.federation.public_share <= 0:
        return None
    return ModelConfig.from_run_config(run, catalogue.num_items, int(catalogue.text.shape[1]))


def score_histories(model: ContentScorer | ChannelScorer, catalogue: Catalogue, histories: Sequence[np.ndarray],
                    profile_items: int, decay: float) -> torch.Tensor:
    """Scores of every item for each history (either scorer), as a device computes them."""
    if isinstance(model, ChannelScorer):
        return channel_score_histories(model, catalogue, histories, profile_items, decay)
    with torch.no_grad():
        return model(catalogue.text, *device_features(catalogue, histories, profile_items, decay))


def evaluation_ranks(model: ContentScorer | ChannelScorer, catalogue: Catalogue, train, valid, test, split: str,
                     profile_items: int, decay: float, batch: int = 256) -> np.ndarray:
    """Rank of each user's held-out item for `split`, own history excluded (the project's full-ranking metric)."""
    inputs, targets, exclude = eval_inputs(train, valid, test, split)
    ranks = np.zeros(len(targets), dtype=np.int64)
    for start in range(0, len(targets), batch):
        stop = min(start + batch, len(targets))
        scores = score_histories(model, catalogue, inputs[start:stop], profile_items, decay)
        ranks[start:stop] = target_ranks(scores, torch.from_numpy(np.asarray(targets[start:stop])),
                                         exclude[start:stop])
    return ranks


def evaluation_sums(model: ContentScorer | ChannelScorer, catalogue: Catalogue, train, valid, test, profile_items: int,
                    decay: float, k: int = 10) -> dict[str, float]:
    """HR@k / NDCG@k sums over the given users on validation and test items (a device's evaluate reply)."""
    out = {}
    for split in ("valid", "test"):
        ranks = evaluation_ranks(model, catalogue, train, valid, test, split, profile_items, decay)
        out[f"{split}-hit@{k}-sum"] = float(hit_at_k(ranks, k).sum())
        out[f"{split}-ndcg@{k}-sum"] = float(ndcg_at_k(ranks, k).sum())
    return out


# ------------------------------------------------------------------ model = channel-scorer
# The research replay's round-2 recipe (simulations/private_pipeline.py, issue 13): a few scales over score
# channels a device computes from its own history and the released public things (DP popularity, DP windowed
# co-occurrence among the items that popularity ranks highest, the public catalogue). Fixed a priori.
CHANNELS = ("cooc", "max10", "genre", "year", "raw", "last", "long")
RECENT_WINDOW = 10  # last items of the max-cosine and genre channels
COOC_QUERY_ITEMS, COOC_QUERY_DECAY = 10, 0.8  # the device's query of the co-occurrence rows
# The released matrix is a SUM over users, so its entries grow with the population (ML-100K's 943 users: largest
# pair weight about 28; 100,000 synthetic users: about 1,270). The device rescales it so that its largest |entry|
# is COOC_PEAK: the channel then has the same range at every N and one learned weight fits every N. 3 keeps the
# channel where the former fixed factor 0.1 put it on ML-100K (0.1 x 28 = 2.8).
COOC_PEAK = 3.0
COOC_CHANNEL = f"peak {COOC_PEAK:g}"  # in model.json: a scorer trained with another channel scale is refused
# Opt-in (`transition-release = true`): the released directed (previous -> next) transition counts among the
# `transition-items` items the released popularity ranks highest. The device reads the released row of its LAST
# item and scores log1p(row - TRANSITION_THRESHOLD x z_transitions, positive part): fixed a priori (the research
# arm of simulations/population_utility.py, before any run of this channel). Why: an entry of the released sum is
# a count of users plus N(0, z^2); cells under 3 noise std are dropped (about 0.1% of the empty cells survive),
# and log1p keeps the channel's range growing only as log N, like the popularity bias it sits beside (log1p of a
# released sum too), so one learned weight fits every N. The threshold is a function of the public noise
# multiplier, shipped with the release (`transition_threshold`): post-processing, no privacy spend.
TRANSITION_THRESHOLD = 3.0
TRANSITION = "transition"
TRANSITION_CHANNEL = f"log1p above {TRANSITION_THRESHOLD:g} noise std, last item"  # in model.json
TRANSITION_FROZEN = ("transition_items", "transitions", "transition_threshold")
# released once by analytics, shipped, never trained (the transition buffers only with transition-release)
# With a consenting cohort (`public-share > 0`, simulation only): the SASRec the server pretrained, without noise,
# on the consenting users' histories (`server.pretraining`), frozen and shipped inside the scorer as `sasrec.*`
# arrays. Its next-item scores, standardised over the catalogue per query, are one more channel, scale started at
# 0 (the research replay's design, simulations/consent_pipeline.py, fixed before its runs). Nothing in it comes
# from a non-consenting user, so it costs them no privacy; the consenting users have no guarantee.
SASREC = "sasrec"
SASREC_PREFIX = "sasrec."
SASREC_CHANNEL = "standardised next-item scores of the consenting cohort's SASRec"  # in model.json
CHANNEL_FROZEN = ("popularity", "cooc_items", "cooc") + TRANSITION_FROZEN + (SASREC_PREFIX,)
HISTORY_MASK = -1e4  # training scores of the user's own history: excluded, as in the ranking


class ChannelScorer(torch.nn.Module):
    """scales[0] * popularity + content * cos(profile, item) + sum_c scales[1 + c] * channel c.

    9 trained weights (content, and one scale per popularity and channel), started at the a-priori popularity
    + content score (1, 8, channels 0). Buffers, released once and then public: `popularity` (the bias),
    `cooc_items` (the item ids of the co-occurrence release, float ids: every shipped array is float) and
    `cooc` (the released symmetric co-occurrence among them, zero diagonal).

    With `transition_items` K > 0 (`transition-release = true`) one more channel, `transition`, and one more
    scale (10 weights, started at 0): buffers `transition_items` [K], `transitions` [K, K] (the released directed
    counts, row = previous item) and `transition_threshold` [1] (TRANSITION_THRESHOLD x the release's noise
    multiplier). A scorer without them is exactly the 9-weight scorer (its state loads as before).

    With `sasrec` (a consenting cohort's pretrained SASRec) the last channel is `sasrec` (`sasrec_channel`) and the
    model holds the SASRec, frozen and always in eval mode, as its `sasrec.*` arrays: shipped, never trained."""

    def __init__(self, num_items: int, cooc_items: int, transition_items: int = 0,
                 sasrec: SASRec | None = None) -> None:
        super().__init__()
        self.channels = CHANNELS + ((TRANSITION,) if transition_items > 0 else ()) + \
            ((SASREC,) if sasrec is not None else ())
        self.sasrec = sasrec
        if sasrec is not None:
            if sasrec.cfg.num_items != num_items:
                raise PrivrecError(f"the SASRec channel knows {sasrec.cfg.num_items} items, the catalogue "
                                   f"{num_items}")
            sasrec.requires_grad_(False)
            sasrec.eval()
        self.content = torch.nn.Parameter(torch.tensor([CONTENT_WEIGHT]))
        self.scales = torch.nn.Parameter(torch.tensor([1.0] + [0.0] * len(self.channels)))
        self.register_buffer("popularity", torch.zeros(num_items + 1))
        self.register_buffer("cooc_items", torch.zeros(cooc_items))
        self.register_buffer("cooc", torch.zeros(cooc_items, cooc_items))
        if transition_items > 0:
            self.register_buffer("transition_items", torch.zeros(transition_items))
            self.register_buffer("transitions", torch.zeros(transition_items, transition_items))
            self.register_buffer("transition_threshold", torch.zeros(1))

    def forward(self, text: torch.Tensor, profile: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """`channels` [B, len(self.channels), items + 1] -> scores [B, items + 1]."""
        out = self.scales[0] * self.popularity + self.content * (profile @ text.T)
        return out + torch.einsum("c,bci->bi", self.scales[1:], channels)

    def train(self, mode: bool = True) -> ChannelScorer:
        super().train(mode)
        if self.sasrec is not None:  # the frozen channel never runs its dropout
            self.sasrec.eval()
        return self

    @classmethod
    def from_state(cls, state, num_items: int, dim: int | None = None, sasrec_config: ModelConfig | None = None,
                   item_text: torch.Tensor | None = None) -> ChannelScorer:
        """The scorer `state` holds; a state with `sasrec.*` arrays needs the SASRec's architecture
        (`sasrec_config`; `item_text`, the public text table, for a text SASRec)."""
        transition_items = int(np.asarray(state["transition_items"]).shape[0]) if "transition_items" in state else 0
        sasrec = None
        if any(str(k).startswith(SASREC_PREFIX) for k in state):
            if sasrec_config is None:
                raise PrivrecError("this channel scorer carries a consenting cohort's SASRec channel (`sasrec.*` "
                                   "arrays), but no SASRec architecture was given to load it")
            sasrec = SASRec(sasrec_config, item_text if sasrec_config.uses_text else None)
        model = cls(num_items, int(np.asarray(state["cooc_items"]).shape[0]), transition_items, sasrec)
        try:
            model.load_state_dict({k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in state.items()})
        except RuntimeError as exc:  # e.g. a SASRec channel built with another architecture
            raise PrivrecError(f"the channel scorer's arrays do not fit its architecture: {exc}") from None
        return model


def sasrec_channel(model: SASRec, histories: Sequence[np.ndarray], width: int, batch: int = 256) -> np.ndarray:
    """The `sasrec` channel [B, width]: the frozen SASRec's next-item scores of each history (its last max-len
    items), standardised over items 1..n (mean 0, std 1) so that the channel's range matches the others; column 0
    (padding) is 0. Computed on the device from its own history and the shipped model only."""
    out = np.zeros((len(histories), width), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(histories), batch):
            part = histories[start:start + batch]
            scores = model.predict_next(torch.from_numpy(left_pad(part, model.cfg.max_len)))[:, 1:].double()
            scores = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, unbiased=False, keepdim=True) + 1e-12)
            out[start:start + len(part), 1:] = scores.numpy()
    return out


def transition_release(model: ChannelScorer) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(item ids, released [K, K] directed counts, threshold) from the model's buffers; None without them."""
    if TRANSITION not in model.channels:
        return None
    return (model.transition_items.numpy().round().astype(np.int64), model.transitions.numpy().astype(np.float64),
            float(model.transition_threshold.item()))


def transition_channel(histories: Sequence[np.ndarray], release: tuple[np.ndarray, np.ndarray, float], width: int,
                       owns: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """The `transition` channel [B, items + 1]: log1p(positive part of the released row of the history's last item
    less the threshold), 0 where that item is outside the release; with `owns` (one [K, K] matrix per history: the
    user's own normalised counts) the user's own contribution is removed first (its training features).
    Post-processing of the release and the device's own history only."""
    items, released, threshold = release
    position = np.full(width, -1, dtype=np.int64)
    position[items] = np.arange(len(items))
    out = np.zeros((len(histories), width))
    for u, seq in enumerate(histories):
        seq = np.asarray(seq, dtype=np.int64).reshape(-1)
        if seq.size == 0 or position[seq[-1]] < 0:
            continue
        row = released[position[seq[-1]]]
        if owns is not None:
            row = row - owns[u][position[seq[-1]]]
        out[u, items] = np.log1p(np.maximum(row - threshold, 0.0))
    return out


def cooc_scale(cooc: np.ndarray) -> float:
    """The factor the `cooc` channel applies to the released co-occurrence: COOC_PEAK / its largest |entry| (0 for
    an all-zero matrix). A function of the released matrix only, computed the same way by every device: this is
    post-processing of the DP release, so it adds no privacy spend and leaves the accounting unchanged. It uses
    no user count (an exact N would be an extra, unaccounted release); scaling the release by any c > 0 leaves the
    channel unchanged."""
    peak = float(np.abs(np.asarray(cooc, dtype=np.float64)).max(initial=0.0))
    return COOC_PEAK / peak if peak > 0 else 0.0


def cooc_matrix(model: ChannelScorer) -> tuple[np.ndarray, np.ndarray]:
    """(item ids of the co-occurrence release, their released symmetric matrix) from the model's buffers."""
    return model.cooc_items.numpy().round().astype(np.int64), model.cooc.numpy().astype(np.float64)


def channel_features(catalogue: Catalogue, histories: Sequence[np.ndarray], items: np.ndarray, cooc: np.ndarray,
                     profile_items: int, decay: float, own: Sequence[np.ndarray] | None = None,
                     transitions: tuple[np.ndarray, np.ndarray, float] | None = None,
                     own_transitions: Sequence[np.ndarray] | None = None, sasrec: SASRec | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a device computes from its own histories and the released things, per history: its unit profile
    [B, d], CHANNELS [B, len(CHANNELS), items + 1] and the mask of its history [B, items + 1] (0 / -1e4):
      cooc  `cooc_scale(cooc)` x (0.8^k-weighted released co-occurrence rows of its last 10 items), minus its own
            contribution when `own` (one [K, K] matrix per history: the user's own normalised pair weights) is
            given -- a device removes itself from its training features; the scale comes from the released matrix
            as a whole (its own contribution included), so the channel's range does not depend on N;
      max10 the largest text cosine to any of its last 10 items; genre the cosine of the genres to those of its
            last 10 items; year / raw the proximities of the content scorer; last the text cosine to its last
            item; long the text cosine to the mean of its whole history.
    Then the transition channel (with `transitions`) and the SASRec channel (with `sasrec`), in that order."""
    text = catalogue.text.numpy().astype(np.float64)
    genres = catalogue.genres if catalogue.genres is not None else np.zeros((len(text), 1))
    n, width = len(histories), catalogue.num_items + 1
    position = np.full(width, -1, dtype=np.int64)
    position[items] = np.arange(len(items))
    scale = cooc_scale(cooc)
    profiles = np.zeros((n, text.shape[1]), dtype=np.float32)
    channels = np.zeros((n, len(CHANNELS) + (transitions is not None) + (sasrec is not None), width),
                        dtype=np.float32)
    mask = np.zeros((n, width), dtype=np.float32)
    if transitions is not None:
        channels[:, len(CHANNELS)] = transition_channel(histories, transitions, width, own_transitions)
    if sasrec is not None:
        channels[:, -1] = sasrec_channel(sasrec, histories, width)
    for u, seq in enumerate(histories):
        seq = np.asarray(seq, dtype=np.int64).reshape(-1)
        if seq.size == 0:
            continue
        mask[u, seq] = HISTORY_MASK
        last = seq[-profile_items:][::-1]
        weights = decay ** np.arange(len(last))
        profile = weights @ text[last]
        profiles[u] = profile / (np.linalg.norm(profile) + 1e-12)
        query = seq[-COOC_QUERY_ITEMS:][::-1]
        at = position[query]
        inside = at >= 0
        query_weights = (COOC_QUERY_DECAY ** np.arange(len(query)))[inside]
        row = np.zeros(width)
        if inside.any():
            rows = cooc[at[inside]]
            if own is not None:
                rows = rows - own[u][at[inside]]
            row[items] = query_weights @ rows
        recent = seq[-RECENT_WINDOW:]
        genre = genres[recent].sum(0)
        mean = text[seq].mean(0)
        values = {"cooc": scale * row,
                  "max10": (text[recent] @ text.T).max(0),
                  "genre": genres @ (genre / (np.linalg.norm(genre) + 1e-12)),
                  "year": -np.abs(catalogue.years - (weights @ catalogue.years[last]) / weights.sum()) / 10.0,
                  "raw": -np.log1p(np.abs(catalogue.raw[None, :]
                                          - catalogue.raw[seq[-RECENT_ITEMS:]][:, None]).min(0)),
                  "last": text @ text[seq[-1]],
                  "long": text @ (mean / (np.linalg.norm(mean) + 1e-12))}
        for c, name in enumerate(CHANNELS):
            channels[u, c] = values[name]
    return torch.from_numpy(profiles), torch.from_numpy(channels), torch.from_numpy(mask)


def channel_user_gradient(model: ChannelScorer, catalogue: Catalogue, train: Sequence[np.ndarray], targets: int,
                          profile_items: int, decay: float, window: int, gap_decay: float) -> dict[str, torch.Tensor]:
    """One user's gradient of its mean softmax loss over its last `targets` training items (its history masked),
    with its own co-occurrence (and transition) contribution removed from its features.
    Zero without a usable example."""
    from shared.analytics import own_cooc_matrix, own_transition_matrix

    trained = {k: p for k, p in model.named_parameters() if p.requires_grad}  # not the frozen SASRec channel
    grads = {k: torch.zeros_like(p) for k, p in trained.items()}
    items, cooc = cooc_matrix(model)
    transitions = transition_release(model)
    histories, nexts, owns, own_transitions = [], [], [], []
    for seq in train:
        seq = np.asarray(seq, dtype=np.int64).reshape(-1)
        own = own_cooc_matrix(seq, items, window, gap_decay)
        own_t = own_transition_matrix(seq, transitions[0]) if transitions is not None else None
        for pos in range(max(1, len(seq) - targets), len(seq)):
            histories.append(seq[:pos])
            nexts.append(seq[pos])
            owns.append(own)
            own_transitions.append(own_t)
    if not histories:
        return grads
    profile, channels, mask = channel_features(catalogue, histories, items, cooc, profile_items, decay, owns,
                                               transitions, own_transitions if transitions is not None else None,
                                               model.sasrec)
    model.zero_grad()
    scores = model(catalogue.text, profile, channels) + mask
    loss = torch.nn.functional.cross_entropy(scores[:, 1:], torch.tensor(nexts) - 1)
    loss.backward()
    return {k: p.grad.detach().clone() for k, p in trained.items()}


def channel_score_histories(model: ChannelScorer, catalogue: Catalogue, histories: Sequence[np.ndarray],
                            profile_items: int, decay: float) -> torch.Tensor:
    items, cooc = cooc_matrix(model)
    profile, channels, _ = channel_features(catalogue, histories, items, cooc, profile_items, decay,
                                            transitions=transition_release(model), sasrec=model.sasrec)
    with torch.no_grad():
        return model(catalogue.text, profile, channels)
