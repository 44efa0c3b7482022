"""Cold items and items added after training are recommended from their text (real all-MiniLM-L6-v2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared.errors import PrivrecError
from shared.model import ModelConfig, SASRec
from shared.text.features import Catalogue, text_features
from shared.training import LocalTrainConfig, train_local
from tools.recommend import Recommender

SCIFI = ["Star Wars (1977)", "Return of the Jedi (1983)", "Empire Strikes Back, The (1980)",
         "Star Trek: The Wrath of Khan (1982)", "Alien (1979)", "Aliens (1986)"]
ROMANCE = ["Sense and Sensibility (1995)", "Emma (1996)", "Pride and Prejudice (1995)", "Sabrina (1995)",
           "While You Were Sleeping (1995)", "Notting Hill (1999)"]
KIDS = ["Toy Story (1995)", "Aladdin (1992)", "Lion King, The (1994)", "Pinocchio (1940)"]
COLD = "Star Trek: First Contact (1996)"
GENRES = {**{t: ["Action", "Adventure", "Sci-Fi"] for t in [*SCIFI, COLD]},
          **{t: ["Drama", "Romance"] for t in ROMANCE}, **{t: ["Animation", "Children's"] for t in KIDS}}
TITLES = [*SCIFI, *ROMANCE, *KIDS, COLD]
N = len(TITLES)
COLD_ID = N  # ids are 1..N in TITLES order


def catalogue() -> Catalogue:
    return Catalogue("tiny-movies", ["<pad>"] + [f"m{i}" for i in range(1, N + 1)], [None, *TITLES],
                     [[]] + [GENRES[t] for t in TITLES])


def windows(seed=0) -> np.ndarray:
    """Users who stay within one genre group; the cold item is in no window."""
    rng = np.random.default_rng(seed)
    groups = [list(range(1, 7)), list(range(7, 13)), list(range(13, 17))]
    rows = [rng.choice(groups[u % 3], size=8) for u in range(60)]
    return np.array(rows, dtype=np.int64)


@pytest.fixture
def run_dir(tmp_path, monkeypatch, minilm):
    """A trained text run directory, as `privrec simulate` leaves it (features cached by the first encoding)."""
    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(tmp_path / "cache"))
    features = text_features(catalogue(), tmp_path / "cache", encoder=minilm, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=N, max_len=8, hidden_size=16, num_heads=2, num_blocks=1, dropout=0.0,
                      item_representation="text", text_dim=384)
    model = SASRec(cfg, torch.from_numpy(features.vectors))
    train_local(model, windows(), LocalTrainConfig(epochs=30, lr=0.01, batch_size=16, dp=False, seed=0))
    path = tmp_path / "run"
    path.mkdir()
    torch.save(model.state_dict(), path / "model.pt")
    from dataclasses import asdict
    (path / "model.json").write_text(json.dumps({"model": "SASRec", **asdict(cfg), "item-text": {"key": features.key}}))
    cat = catalogue()
    (path / "items.json").write_text(json.dumps({"item_ids": cat.item_ids, "item_titles": cat.titles,
                                                 "item_genres": cat.genres}))
    (path / "dataset.json").write_text(json.dumps({"dataset": "tiny-movies"}))
    return path


def test_cold_and_new_items_are_ranked_by_their_text(run_dir, minilm, tmp_path):
    rec = Recommender.load(run_dir)
    scifi_history, romance_history = ["m1", "m2", "m3"], ["m7", "m8", "m9"]
    top = [r["item"] for r in rec.top_k(scifi_history, 4, "test")]
    assert f"m{COLD_ID}" in top  # never trained on, found by its text
    assert f"m{COLD_ID}" not in [r["item"] for r in rec.top_k(romance_history, 4, "test")]
    # An item added after training, given only its text: no retraining.
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"item": "n1", "title": "Star Trek: Generations", "year": 1994,
                               "genres": ["Action", "Adventure", "Sci-Fi"]}) + "\n"
                   + json.dumps({"item": "n2", "title": "Persuasion", "year": 1995, "genres": ["Drama", "Romance"]}))
    assert rec.add_items(new, encoder=minilm) == 2
    scifi = {r["item"]: r for r in rec.top_k(scifi_history, 5, "test")}
    romance = {r["item"]: r for r in rec.top_k(romance_history, 5, "test")}
    assert "n1" in scifi and "n1" not in romance and scifi["n1"]["new"] is True
    assert "n2" in romance and "n2" not in scifi
    assert scifi["n1"]["title"] == "Star Trek: Generations (1994)"
    assert [r["item"] for r in rec.top_k(["n1", "m4"], 3, "test")]  # a new item may be in the history too


def test_new_items_file_errors_name_the_line(run_dir, tmp_path, minilm):
    rec = Recommender.load(run_dir)
    bad = tmp_path / "bad.jsonl"
    for line, message in [('{"item": "m1", "title": "Again"}', "'m1' is already in the catalogue"),
                          ('{"item": "x", "title": "  "}', "'title' must be a non-empty string"),
                          ('{"item": "x", "title": "T", "genres": "Drama"}', "'genres' must be a list"),
                          ('{"item": "x", "title": "T", "year": {"from": 1999}}', "'year' must be a number"),
                          ('{"item": "x", "title": "T", "year": true}', "'year' must be a number"),
                          ('{"item": "x"', "not valid JSON")]:
        bad.write_text('{"item": "ok", "title": "Fine"}\n' + line + "\n")
        with pytest.raises(PrivrecError, match=f"bad.jsonl line 2: .*{message}"):
            rec.add_items(bad, encoder=minilm)


def test_a_run_whose_catalogue_changed_since_training_is_refused(run_dir, tmp_path, minilm):
    items = json.loads((run_dir / "items.json").read_text())
    items["item_titles"][1] = "Star Wars: A New Hope (1977)"
    (run_dir / "items.json").write_text(json.dumps(items))
    changed = Catalogue("tiny-movies", items["item_ids"], items["item_titles"], items["item_genres"])
    text_features(changed, tmp_path / "cache", encoder=minilm, progress=False)  # encoded, so no model load
    with pytest.raises(PrivrecError, match="the catalogue or the encoder changed since training"):
        Recommender.load(run_dir)
