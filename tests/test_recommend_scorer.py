"""`privrec recommend` on a `model = content-scorer` run (what `privrec simulate` makes by default): it ranks with
the scorer's own scoring function over the released popularity, the public text and the given history."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from shared.scorer import ContentScorer, popularity_bias, public_catalogue, read_catalogue, score_histories
from shared.text.features import item_text, store_text_features
from tests.test_cli import assert_user_error, run_cli
from tests.test_scorer_pipeline import NUM_ITEMS, _run, digit_store  # noqa: F401 - the fixture is used by name


@pytest.fixture
def scorer_run(tmp_path, digit_store):  # noqa: F811
    cfg, path, *_ = _run(tmp_path, digit_store, "rec", **{"num-rounds": 2, "fraction-train": 1.0,
                                                         "user-noise-multiplier": 8.2})
    return cfg, path, digit_store


def _expected(cfg, store, history: list[int], k: int, extra=None) -> list[tuple[str, float]]:
    """The scorer's own ranking for `history`, built from the store (not the run directory's copy), history
    items and padding excluded."""
    model_path = cfg["run-dir"] + "/" + cfg["run-name"] + "/model.pt"
    catalogue = read_catalogue(store / "items.json", store_text_features(store).vectors)
    model = ContentScorer.from_state(torch.load(model_path, weights_only=True), catalogue.num_items,
                                     catalogue.text.shape[1])
    ids = json.loads((store / "items.json").read_text())["item_ids"]
    if extra is not None:
        catalogue, model, ids = extra(catalogue, model, ids)
    scores = score_histories(model, catalogue, [np.array(history)], cfg["profile-items"], cfg["profile-decay"])[0]
    scores[[0, *history]] = float("-inf")
    top = torch.topk(scores, k)
    return [(str(ids[i]), float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]


def test_recommend_ranks_a_scorer_run_as_its_scoring_function_does(scorer_run, capsys, tmp_path):
    cfg, path, store = scorer_run
    assert json.loads((path / "model.json").read_text())["model"] == "content-scorer"
    # The bias it ranks with is the run's one DP popularity release.
    released = json.loads((path / "popularity.json").read_text())["histogram"]
    assert torch.equal(torch.load(path / "model.pt", weights_only=True)["popularity"], popularity_bias(released))
    history = [12, 13, 14]
    code, out, err = run_cli(capsys, "recommend", "--model", path, "--history", "12 13 14", "-k", "10")
    assert code == 0, err
    lines = out.strip().splitlines()
    expected = _expected(cfg, store, history, 10)
    assert [line.split()[1] for line in lines] == [item for item, _ in expected]
    assert not {line.split()[1] for line in lines} & {"12", "13", "14"}
    for line, (item, score) in zip(lines, expected):
        assert f"Item {item}  (score {score:.3f})" in line  # with its title
    # --input: one JSON object per history, the same ranking.
    path_in = tmp_path / "h.jsonl"
    path_in.write_text(json.dumps({"user": "a", "history": ["12", "13", "14"]}) + "\n"
                       + json.dumps({"history": [30, 2]}) + "\n")
    code, out, err = run_cli(capsys, "recommend", "--model", path, "--input", path_in, "-k", "5")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert records[0]["user"] == "a"
    for record, hist in zip(records, ([12, 13, 14], [30, 2])):
        got = [(r["item"], r["score"]) for r in record["recommendations"]]
        want = _expected(cfg, store, hist, 5)
        assert [i for i, _ in got] == [i for i, _ in want]
        assert np.allclose([s for _, s in got], [s for _, s in want])


def test_recommend_on_a_scorer_run_names_bad_input_in_one_line(scorer_run, capsys, tmp_path):
    _, path, _ = scorer_run
    code, out, err = run_cli(capsys, "recommend", "--model", path, "--history", "12 99")
    assert_user_error(code, err, "unknown item id '99'")
    code, out, err = run_cli(capsys, "recommend", "--model", path, "--history", " ")
    assert_user_error(code, err, "history is empty")
    for name in ("dataset.json", "model.pt", "items.json"):
        damaged = tmp_path / f"without-{name}"
        shutil.copytree(path, damaged)
        (damaged / name).unlink()
        code, out, err = run_cli(capsys, "recommend", "--model", damaged, "--history", "12")
        assert_user_error(code, err, name, "missing")
        assert out == ""
    damaged = tmp_path / "garbage"
    shutil.copytree(path, damaged)
    (damaged / "model.pt").write_bytes(b"not a torch file")
    code, out, err = run_cli(capsys, "recommend", "--model", damaged, "--history", "12")
    assert_user_error(code, err, str(damaged), "cannot load the content scorer", "model.pt")
    (damaged / "model.json").write_text(json.dumps({"model": "content-scorer", "num_items": NUM_ITEMS}))
    code, out, err = run_cli(capsys, "recommend", "--model", damaged, "--history", "12")
    assert_user_error(code, err, str(damaged), "model.json lacks key(s) dim, profile-items, profile-decay")


def test_new_items_are_ranked_from_their_text_with_zero_popularity_bias(scorer_run, minilm, tmp_path):
    from tools.recommend import Recommender

    cfg, path, store = scorer_run
    recommender = Recommender.load(path)
    before = recommender.scores([12, 13, 14])
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"item": "41", "title": "Item 41", "genres": ["Drama"]}) + "\n")
    assert recommender.add_items(new, encoder=minilm) == 1
    assert torch.equal(recommender.scores([12, 13, 14])[:NUM_ITEMS + 1], before)  # the trained items unchanged

    def grown(catalogue, model, ids):
        vector = minilm.encode([item_text("41", "Item 41", ["Drama"])], progress=False)
        items = json.loads((store / "items.json").read_text())
        bigger = public_catalogue(np.vstack([store_text_features(store).vectors, vector]), [*ids, "41"],
                                  [*items["item_titles"], "Item 41"])
        scorer = ContentScorer(NUM_ITEMS + 1, catalogue.text.shape[1])
        scorer.load_state_dict({**model.state_dict(), "popularity": torch.cat([model.popularity, torch.zeros(1)])})
        return bigger, scorer, [*ids, "41"]

    got = recommender.top_k(["12", "13", "14"], NUM_ITEMS + 1 - 3, where="--history")  # all but the history
    want = _expected(cfg, store, [12, 13, 14], NUM_ITEMS + 1 - 3, extra=grown)
    assert [r["item"] for r in got] == [i for i, _ in want] and "41" in [r["item"] for r in got]
    assert np.allclose([r["score"] for r in got], [s for _, s in want], atol=1e-5)
    assert [r for r in got if r["item"] == "41"][0]["new"] is True
