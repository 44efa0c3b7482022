"""SASRec-style causal self-attention next-item model (plain torch, no Flower, Opacus-compatible).

Design constraints (Opacus with attention models):

* Attention is built from ``nn.Linear`` (q, k, v, out) + ``F.scaled_dot_product_attention``; no
  ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` (their masks break under Opacus).
* Every parameter is used *inside* a module's ``forward`` (Embedding, Linear, LayerNorm): the output
  head is an untied ``nn.Linear``, so Opacus' per-sample hooks see every weight (nothing escapes clipping)
  and ``grad_sample_mode="ghost"`` works (it refuses tied weights).
* Position ids are built with ``.repeat`` (contiguous), as ghost clipping's embedding norm requires.

Item representations (``ModelConfig.item_representation``):

* ``"id"``: a trainable embedding per item in, an ``nn.Linear`` head over the catalogue out.
* ``"text"``: each item is its frozen text vector (a non-persistent buffer ``item_text [N+1, D]``, never
  trained, never in ``state_dict()``, so never shipped). In: ``text_in`` (Linear D->H) applied per position
  to the looked-up vectors. Out: the user state is projected INTO text space by ``text_out`` (Linear
  H->D, per position) and scored against the frozen table: ``text_out(h) @ item_text.T``. Every trainable
  weight acts on per-example activations, so Opacus' per-sample gradients are exact (a Linear applied to
  the catalogue table itself would have no per-example structure and its per-sample gradient would be
  wrong). An item added after training is scored from its text alone.
* ``"text+id"``: both, summed (inputs and scores).

Conventions: item ids are ``1..num_items``; ``0`` is padding and sequences are LEFT-padded.
Positions are counted from the most recent item backwards (the last input position has position id 0),
so left padding does not change the outputs at real positions, and a sequence longer than ``max_len``
is cut to its most recent ``max_len`` items.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.config import REPRESENTATIONS, SCHEMA, ModelSection, RunConfig, heads_problem, strict_problem
from shared.errors import PrivrecError

__all__ = ["REPRESENTATIONS", "ModelConfig", "SASRec", "architecture_for", "model_for"]


def _default(key: str):
    return SCHEMA[key].default


@dataclass(frozen=True)
class ModelConfig:
    """The architecture: the run config's model section over a catalogue of `num_items` items.

    Defaults and ranges are the run-config schema's (shared/config.py); a run builds this with `from_run_config`.
    """
    num_items: int
    max_len: int = _default("max-len")
    hidden_size: int = _default("hidden-size")
    num_heads: int = _default("num-heads")
    num_blocks: int = _default("num-blocks")
    dropout: float = _default("dropout")
    item_representation: str = _default("item-representation")  # one of REPRESENTATIONS
    text_dim: int = 0  # width of the frozen item text vectors (text models only)

    @classmethod
    def from_run_config(cls, cfg: RunConfig | Mapping, num_items: int, text_dim: int = 0) -> ModelConfig:
        """The architecture a run config asks for, over `num_items` items (text_dim: text models' vector width)."""
        model = RunConfig.of(cfg).model
        return cls(num_items=num_items, **{f.name: getattr(model, f.name) for f in fields(ModelSection)},
                   text_dim=text_dim if model.item_representation != "id" else 0)

    @property
    def uses_text(self) -> bool:
        return self.item_representation != "id"

    @property
    def uses_ids(self) -> bool:
        return self.item_representation != "text"

    def __post_init__(self) -> None:
        if not isinstance(self.num_items, int) or isinstance(self.num_items, bool) or self.num_items < 1:
            raise PrivrecError(f"model config: num_items must be an integer >= 1, got {self.num_items!r}")
        for f in fields(ModelSection):  # the schema's checks, for a caller that did not come through it
            key = f.name.replace("_", "-")
            problem = strict_problem(key, getattr(self, f.name))
            if problem:
                raise PrivrecError(f"model config: {f.name} {problem}, got {getattr(self, f.name)!r}")
        if heads_problem(self.hidden_size, self.num_heads):
            raise PrivrecError(f"model config: hidden_size={self.hidden_size} must be divisible by "
                               f"num_heads={self.num_heads}")
        if self.uses_text and (not isinstance(self.text_dim, int) or self.text_dim < 1):
            raise PrivrecError(f"model config: item_representation={self.item_representation!r} needs "
                               f"text_dim >= 1, got {self.text_dim!r}")


def architecture_for(cfg: RunConfig | Mapping, num_items: int, item_text=None) -> tuple[ModelConfig, Tensor | None]:
    """A run's architecture and frozen text table: text features -> ModelConfig, in one place.

    `item_text`: the catalogue's text features (`shared.text.features.features_for`: TextFeatures, array or
    tensor), None for ID-only models.
    """
    if item_text is not None and hasattr(item_text, "vectors"):
        item_text = item_text.vectors
    table = None if item_text is None else torch.as_tensor(item_text)
    return ModelConfig.from_run_config(cfg, num_items, 0 if table is None else int(table.shape[1])), table


def model_for(cfg: RunConfig | Mapping, num_items: int, item_text=None,
              state: Mapping[str, Tensor] | None = None) -> SASRec:
    """A run's model: `architecture_for`, then SASRec with `state`'s weights (else a fresh initialisation)."""
    model_cfg, table = architecture_for(cfg, num_items, item_text)
    return SASRec(model_cfg, table) if state is None else SASRec.from_state(model_cfg, state, table)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention from four ``nn.Linear`` layers and SDPA with a boolean mask."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.attn_dropout = dropout

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # x: [B, L, H]; mask: [B, 1, L, L] bool, True = query may attend to key.
        b, length, hidden = x.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(b, length, hidden)
        return self.out(y)


class FeedForward(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, heads, dropout)
        self.ln2 = nn.LayerNorm(hidden)
        self.ffn = FeedForward(hidden, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), mask))
        x = x + self.dropout(self.ffn(self.ln2(x)))
        return x


# What each of the schema's TRAINABLE_SCOPES (config key `device-trains`) keeps frozen on a device.
FROZEN_BY_SCOPE: dict[str, tuple[str, ...]] = {
    "all": (),
    # Everything that maps items to or from the hidden space: ID tables and, in text models, the
    # projections of the frozen text features. What is left is the sequence body.
    "no-item-tables": ("item_emb.weight", "head.weight", "text_in.weight", "text_in.bias",
                       "text_out.weight", "text_out.bias"),
}


class SASRec(nn.Module):
    """Causal self-attentive next-item model.

    ``forward(seqs [B, L]) -> logits [B, L, num_items + 1]``: at every position t, scores for the item
    that follows ``seqs[:, t]`` (column 0 is padding and should never be a target).
    """

    def __init__(self, cfg: ModelConfig, item_text: Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        # Creation order (and so the seeded init) of the ID model is unchanged by the text options.
        if cfg.uses_ids:
            self.item_emb = nn.Embedding(cfg.num_items + 1, h, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, h)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            [Block(h, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_blocks)]
        )
        self.final_ln = nn.LayerNorm(h)
        if cfg.uses_ids:
            self.head = nn.Linear(h, cfg.num_items + 1)
        if cfg.uses_text:
            self.text_in = nn.Linear(cfg.text_dim, h)
            self.text_out = nn.Linear(h, cfg.text_dim)
            self.register_buffer("item_text", self._check_text(item_text), persistent=False)
        elif item_text is not None:
            raise PrivrecError("model config: item_representation='id' takes no item text features")
        self._init_weights()

    def _check_text(self, item_text) -> Tensor:
        want = (self.cfg.num_items + 1, self.cfg.text_dim)
        if item_text is None:
            raise PrivrecError(f"item_representation={self.cfg.item_representation!r} needs the catalogue's "
                               "text features (shared/text/features.py)")
        item_text = torch.as_tensor(item_text, dtype=torch.float32)
        if tuple(item_text.shape) != want:
            raise PrivrecError(f"item text features have shape {tuple(item_text.shape)}, expected {want} "
                               "(num_items + 1 rows, row 0 = padding)")
        return item_text.detach().clone()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        if self.cfg.uses_ids:
            with torch.no_grad():
                self.item_emb.weight[0].zero_()

    def _prepare(self, seqs: Tensor) -> Tensor:
        if not isinstance(seqs, Tensor):
            seqs = torch.as_tensor(seqs)
        if seqs.dim() != 2:
            raise ValueError(
                f"SASRec expects item ids of shape [batch, length], got {tuple(seqs.shape)}"
            )
        if seqs.dtype != torch.long:
            seqs = seqs.long()
        if seqs.shape[1] == 0:
            raise ValueError("SASRec got an empty sequence length (L = 0)")
        if seqs.shape[1] > self.cfg.max_len:
            seqs = seqs[:, -self.cfg.max_len :]  # keep the most recent max_len items
        return seqs.contiguous()

    def forward(self, seqs: Tensor) -> Tensor:
        return self.score(self.encode(seqs))

    def _item_inputs(self, seqs: Tensor) -> Tensor:
        x = self.item_emb(seqs) if self.cfg.uses_ids else 0.0
        if self.cfg.uses_text:
            # Per-position Linear on looked-up frozen vectors: per-example activations for Opacus.
            x = x + self.text_in(self.item_text[seqs])
        return x * math.sqrt(self.cfg.hidden_size)

    def score(self, h: Tensor) -> Tensor:
        """Logits ``[..., num_items + 1]`` from user states ``h [..., H]``."""
        logits = self.head(h) if self.cfg.uses_ids else 0.0
        if self.cfg.uses_text:
            # The projection acts on h (per example); the frozen table is only multiplied against.
            logits = logits + self.text_out(h) @ self.item_text.T
        return logits

    def encode(self, seqs: Tensor) -> Tensor:
        """User states ``[B, L, H]`` (after the final LayerNorm), one per input position."""
        seqs = self._prepare(seqs)
        b, length = seqs.shape
        real = seqs != 0  # [B, L]
        # Recency positions: last input position = 0. Built with .repeat (contiguous) for ghost mode.
        positions = torch.arange(length - 1, -1, -1, device=seqs.device).repeat(b, 1)
        x = self._item_inputs(seqs)
        x = x * real.unsqueeze(-1).to(x.dtype) + self.pos_emb(positions)
        x = self.emb_dropout(x)

        causal = torch.ones(length, length, dtype=torch.bool, device=seqs.device).tril()
        mask = causal.unsqueeze(0) & real.unsqueeze(1)  # [B, L(query), L(key)]
        eye = torch.eye(length, dtype=torch.bool, device=seqs.device).unsqueeze(0)
        mask = (mask | eye).unsqueeze(1)  # diagonal always visible: padded rows never NaN
        for block in self.blocks:
            x = block(x, mask)
        return self.final_ln(x)

    @classmethod
    def from_state(cls, cfg: ModelConfig, state: Mapping[str, Tensor], item_text: Tensor | None = None) -> SASRec:
        """A model holding a copy of `state`'s weights (and the frozen text features, for text models).

        (Building on the meta device to skip the random init was measured: 5x slower on CPU.)
        """
        model = cls(cfg, item_text)
        model.load_state_dict(state)
        return model

    def set_trainable(self, scope: str) -> int:
        """Freeze what a device must not train; returns the number of trainable parameters.

        "all": every parameter. "no-item-tables": the item-side layers stay at the global values
        (ID input embedding and output weight matrix, ~80% of the ID model; the text projections
        text_in/text_out in text models), so on-device DP noise falls only on the attention body,
        position embeddings and the output bias.
        """
        if scope not in FROZEN_BY_SCOPE:
            raise ValueError(f"trainable scope must be one of {', '.join(FROZEN_BY_SCOPE)}, got {scope!r}")
        frozen = FROZEN_BY_SCOPE[scope]
        for name, param in self.named_parameters():
            param.requires_grad_(name not in frozen)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
    def with_new_items(self, vectors: Tensor) -> SASRec:
        """A copy that also knows ``len(vectors)`` items added after training (ids num_items+1...).

        New items are known by their text only: text models score them through ``text_out``; in
        ``text+id`` their ID embedding is zero and their ID head row is zero with the catalogue's mean
        bias (an average item, neither favoured nor buried).
        """
        if not self.cfg.uses_text:
            raise PrivrecError("this model uses item IDs only (item-representation = id): it cannot score an item "
                               "it was not trained with; train with item-representation = text or text+id")
        vectors = torch.as_tensor(vectors, dtype=torch.float32).reshape(-1, self.cfg.text_dim)
        new = len(vectors)
        cfg = replace(self.cfg, num_items=self.cfg.num_items + new)
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if cfg.uses_ids:
            h = cfg.hidden_size
            state["item_emb.weight"] = torch.cat([state["item_emb.weight"], torch.zeros(new, h)])
            state["head.weight"] = torch.cat([state["head.weight"], torch.zeros(new, h)])
            mean_bias = state["head.bias"][1:].mean()
            state["head.bias"] = torch.cat([state["head.bias"], mean_bias.repeat(new)])
        return SASRec.from_state(cfg, state, torch.cat([self.item_text, vectors])).train(self.training)

    def predict_next(self, seqs: Tensor) -> Tensor:
        """Logits for the item after the last position, ``[B, num_items + 1]``; column 0 is -inf."""
        logits = self.forward(seqs)[:, -1, :].clone()
        logits[:, 0] = float("-inf")
        return logits
