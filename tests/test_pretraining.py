"""Server-side pretraining on the consenting cohort (`public-share`): who is used, and what is never seen."""

import numpy as np
import pytest

import server.pretraining as pretraining
from shared import config
from shared.coldstart import cold_items
from shared.data.store import open_store
from shared.model import ModelConfig
from tests.synthetic import walk_store

NUM_ITEMS = 40


@pytest.fixture
def store(tmp_path):
    return open_store(walk_store(tmp_path / "store", num_users=30, num_items=NUM_ITEMS))


def _cfg(**overrides):
    return config.validate({"public-share": 0.2, "public-epochs": 2, "window": 8, "max-len": 8,
                            "hidden-size": 8, "num-blocks": 1, **overrides})


def test_the_consenting_cohort_is_its_share_distinct_and_fixed_by_the_seed():
    cfg = _cfg()
    chosen = pretraining.consenting_devices(cfg, 30)
    assert len(chosen) == 6 and len(set(chosen.tolist())) == 6 and chosen.min() >= 0 and chosen.max() < 30
    assert np.array_equal(chosen, pretraining.consenting_devices(cfg, 30))
    others = [pretraining.consenting_devices(_cfg(seed=s), 30) for s in range(1, 6)]
    assert any(not np.array_equal(chosen, o) for o in others)
    assert len(pretraining.consenting_devices(_cfg(**{"public-share": 0.0}), 30)) == 0


def test_pretraining_reads_only_the_consenting_users_and_never_a_cold_item(store, monkeypatch):
    cfg = _cfg(**{"cold-item-share": 0.25})
    seen = {}

    def capture(histories, *args, **kwargs):
        seen["histories"] = histories
        return "model"

    monkeypatch.setattr(pretraining, "train_centralized", capture)
    _, info = pretraining.pretrain(cfg, store, ModelConfig(num_items=NUM_ITEMS, max_len=8, hidden_size=8))
    cold = cold_items(NUM_ITEMS, 0.25, cfg["seed"])
    consenting = pretraining.consenting_devices(cfg, store.num_devices)
    originals = [seq for d in consenting for seq in store.device(int(d)).train]
    assert info["consenting-users"] == len(originals) == len(seen["histories"]) == 6
    assert any(np.isin(seq, cold).any() for seq in originals)  # the walk does visit cold items ...
    for original, used in zip(originals, seen["histories"]):
        assert not np.isin(used, cold).any()  # ... pretraining never does
        assert np.array_equal(used, original[~np.isin(original, cold)])  # and keeps the rest, in order
