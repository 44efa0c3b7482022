"""SASRec-style causal self-attention next-item model (plain torch, no Flower, Opacus-compatible).

Design constraints (see /work/shared/BRIEF.md, "Opacus with attention models"):

* Attention is built from ``nn.Linear`` (q, k, v, out) + ``F.scaled_dot_product_attention``; no
  ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` (their masks break under Opacus).
* Every parameter is used *inside* a module's ``forward`` (Embedding, Linear, LayerNorm): the output
  head is an untied ``nn.Linear``, so Opacus' per-sample hooks see every weight (nothing escapes clipping)
  and ``grad_sample_mode="ghost"`` works (it refuses tied weights).
* Position ids are built with ``.repeat`` (contiguous), as ghost clipping's embedding norm requires.

Conventions: item ids are ``1..num_items``; ``0`` is padding and sequences are LEFT-padded.
Positions are counted from the most recent item backwards (the last input position has position id 0),
so left padding does not change the outputs at real positions, and a sequence longer than ``max_len``
is cut to its most recent ``max_len`` items.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.errors import PrivrecError

__all__ = ["ModelConfig", "SASRec"]


@dataclass(frozen=True)
class ModelConfig:
    num_items: int
    max_len: int = 50
    hidden_size: int = 64
    num_heads: int = 2
    num_blocks: int = 2
    dropout: float = 0.2

    @classmethod
    def from_run_config(cls, cfg, num_items: int) -> ModelConfig:
        """The architecture a run config (see shared/config.py) asks for, over `num_items` items."""
        return cls(num_items=num_items, max_len=cfg["max-len"], hidden_size=cfg["hidden-size"],
                   num_heads=cfg["num-heads"], num_blocks=cfg["num-blocks"], dropout=cfg["dropout"])

    def __post_init__(self) -> None:
        for key in ("num_items", "max_len", "hidden_size", "num_heads"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PrivrecError(f"model config: {key} must be an integer >= 1, got {value!r}")
        if not isinstance(self.num_blocks, int) or self.num_blocks < 0:
            raise PrivrecError(
                f"model config: num_blocks must be an integer >= 0, got {self.num_blocks!r}"
            )
        if self.hidden_size % self.num_heads != 0:
            raise PrivrecError(
                f"model config: hidden_size={self.hidden_size} must be divisible by "
                f"num_heads={self.num_heads}"
            )
        if not (0.0 <= float(self.dropout) < 1.0):
            raise PrivrecError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")


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


TRAINABLE_SCOPES: dict[str, tuple[str, ...]] = {
    "all": (),
    "no-item-tables": ("item_emb.weight", "head.weight"),
}


class SASRec(nn.Module):
    """Causal self-attentive next-item model.

    ``forward(seqs [B, L]) -> logits [B, L, num_items + 1]``: at every position t, scores for the item
    that follows ``seqs[:, t]`` (column 0 is padding and should never be a target).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.item_emb = nn.Embedding(cfg.num_items + 1, h, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, h)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            [Block(h, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_blocks)]
        )
        self.final_ln = nn.LayerNorm(h)
        self.head = nn.Linear(h, cfg.num_items + 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
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
        seqs = self._prepare(seqs)
        b, length = seqs.shape
        real = seqs != 0  # [B, L]
        # Recency positions: last input position = 0. Built with .repeat (contiguous) for ghost mode.
        positions = torch.arange(length - 1, -1, -1, device=seqs.device).repeat(b, 1)
        x = self.item_emb(seqs) * math.sqrt(self.cfg.hidden_size)
        x = x * real.unsqueeze(-1).to(x.dtype) + self.pos_emb(positions)
        x = self.emb_dropout(x)

        causal = torch.ones(length, length, dtype=torch.bool, device=seqs.device).tril()
        mask = causal.unsqueeze(0) & real.unsqueeze(1)  # [B, L(query), L(key)]
        eye = torch.eye(length, dtype=torch.bool, device=seqs.device).unsqueeze(0)
        mask = (mask | eye).unsqueeze(1)  # diagonal always visible: padded rows never NaN
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.final_ln(x))

    @classmethod
    def from_state(cls, cfg: ModelConfig, state: Mapping[str, Tensor]) -> SASRec:
        """A model holding a copy of `state`'s weights.

        (Building on the meta device to skip the random init was measured: 5x slower on CPU.)
        """
        model = cls(cfg)
        model.load_state_dict(state)
        return model

    def set_trainable(self, scope: str) -> int:
        """Freeze what a device must not train; returns the number of trainable parameters.

        "all": every parameter. "no-item-tables": the two per-item tables (input embedding and
        output weight matrix, ~80% of the parameters) stay at the global values, so on-device DP
        noise falls only on the attention body, position embeddings and the output bias.
        """
        if scope not in TRAINABLE_SCOPES:
            raise ValueError(f"trainable scope must be one of {', '.join(TRAINABLE_SCOPES)}, got {scope!r}")
        frozen = TRAINABLE_SCOPES[scope]
        for name, param in self.named_parameters():
            param.requires_grad_(name not in frozen)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def predict_next(self, seqs: Tensor) -> Tensor:
        """Logits for the item after the last position, ``[B, num_items + 1]``; column 0 is -inf."""
        logits = self.forward(seqs)[:, -1, :].clone()
        logits[:, 0] = float("-inf")
        return logits
