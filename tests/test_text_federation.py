"""Text item representations through the real ServerApp and ClientApp (in process), and cold-start items."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.coldstart import cold_items, without_items
from shared.text.features import read_catalogue, text_features
from tests.test_federation import NUM_DEVICES, NUM_ITEMS, run_federation


@pytest.fixture
def real_text_cache(tmp_path, monkeypatch, minilm):
    """PRIVREC_CACHE_DIR with the walk catalogue already encoded by the real MiniLM (as a first run would)."""
    from tests.synthetic import walk_store

    cache = tmp_path / "cache"
    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(cache))
    store = walk_store(tmp_path / "probe", num_users=NUM_DEVICES, num_items=NUM_ITEMS)
    text_features(read_catalogue(store), cache, encoder=minilm, progress=False)
    return cache


def test_text_model_federates_ships_only_trainable_weights_and_reports_cold_items(tmp_path, real_text_cache):
    cfg, path, grid, rows, summary = run_federation(
        tmp_path, **{"num-rounds": 2, "eval-every": 1, "item-representation": "text", "cold-item-share": 0.2})
    _, _, id_grid, _, _ = run_federation(tmp_path / "id", **{"num-rounds": 1, "eval-every": 1})
    sent = {k for k in grid.delivered[0].content.array_records["arrays"]}
    assert "item_text" not in sent and "item_emb.weight" not in sent and "text_out.weight" in sent

    def nbytes(msg):
        return sum(a.numpy().nbytes for a in msg.content.array_records["arrays"].values())

    # Exactly the trainable weights go each way (no copy of the 61 x 384 text table); on a catalogue this
    # small the projections outweigh ID embeddings, on ML-100K it is the reverse (simulations/text_items.py).
    hidden, blocks = 32, 1
    block = 6 * (hidden * hidden + hidden) + 4 * hidden
    trainable = 2 * (384 * hidden) + 384 + hidden + 16 * hidden + blocks * block + 2 * hidden
    assert nbytes(grid.replies[0]) == nbytes(grid.delivered[0]) == 4 * trainable
    assert nbytes(id_grid.replies[0]) == 4 * (2 * 61 * hidden + 61 + 16 * hidden + blocks * block + 2 * hidden)
    # Only one catalogue encoding happened (before the run): server and devices reused it.
    assert len(list((real_text_cache / "text-features").glob("*.npz"))) == 1
    central = summary["central-evaluation"]
    held_out = cold_items(NUM_ITEMS, 0.2, cfg["seed"])
    assert len(held_out) == 12
    assert central["test-cold-users"] + central["test-warm-users"] == central["test-users"]
    arch = json.loads((path / "model.json").read_text())
    assert arch["item_representation"] == "text" and arch["text_dim"] == 384 and arch["item-text"]["key"]


def test_held_out_items_never_reach_a_training_window(tmp_path):
    from client.device import load_device, training_windows
    from tests.synthetic import walk_store

    store = walk_store(tmp_path / "s", num_users=6, num_items=30)
    held_out = cold_items(30, 0.1, seed=3)
    assert len(held_out) == 3 and np.array_equal(held_out, cold_items(30, 0.1, seed=3))
    for device in range(6):
        data, _ = load_device(store, device)
        windows = training_windows(data, 8, held_out)
        assert not np.isin(windows, held_out).any()
        kept = np.concatenate(without_items(data.train, held_out))
        assert (windows > 0).sum() <= kept.size and not np.isin(kept, held_out).any()
