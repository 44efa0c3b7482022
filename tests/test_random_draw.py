"""simulations/random_draw.py: the data-independent draw over the product's grid. The draw and the pipeline seeds
depend on the seed only (never on data), every candidate runs at factor 1 (its own epsilon 2), and the reported
figure is the exact mean over the grid (the protocol's expectation over a uniform draw)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulations import random_draw as rd


def test_the_draw_and_pipeline_seeds_are_functions_of_the_seed_only_and_avoid_earlier_seeds():
    seeds = [[rd.pipeline_seed(s, k) for k in range(16)] for s in rd.SEEDS]
    assert seeds == [[rd.pipeline_seed(s, k) for k in range(16)] for s in rd.SEEDS]  # reproducible
    flat = [x for row in seeds for x in row]
    assert len(set(flat)) == len(flat)  # every run its own noise
    assert min(flat) >= 1_000  # never 0-5, the seeds the budget study and the selection used
    assert not set(rd.SEEDS) & set(range(6))


def test_the_realized_draw_is_uniform_over_the_grid():
    counts = np.bincount([rd.drawn_candidate(s, 16) for s in range(16_000)], minlength=16)
    assert counts.min() > 850 and counts.max() < 1150  # 1,000 expected each; 4.7 binomial std either side


def _row(name: str, test: float, valid: float) -> dict:
    return {"candidate": name, "test": {"ndcg@10": test, "hr@10": 2 * test}, "valid": {"ndcg@10": valid},
            "seconds": 1.0}


def test_every_candidate_runs_once_at_factor_one_and_the_figure_is_their_mean(monkeypatch):
    from simulations import product_selection as ps

    calls = []

    def fake_run(pop, name, ref, factor, run_seed):
        calls.append((name, factor, run_seed))
        return None, _row(name, 0.07 + 0.001 * len(calls), 0.08)

    monkeypatch.setattr(ps, "run_candidate", fake_run)
    refs = {f"c{k}": {"z": {}} for k in range(4)}
    out = rd.run_seed(None, refs, 7)
    assert [c[0] for c in calls] == list(refs) and {c[1] for c in calls} == {1.0}
    assert [c[2] for c in calls] == [rd.pipeline_seed(7, k) for k in range(4)]
    assert out["expected test ndcg@10"] == pytest.approx(np.mean([0.071, 0.072, 0.073, 0.074]))
    assert out["drawn"]["index"] == rd.drawn_candidate(7, 4)


def test_the_summary_reports_the_expectation_the_realized_draws_and_each_candidate():
    per_seed = []
    for s, shift in ((6, 0.0), (7, 0.01)):
        rows = [_row("a", 0.06 + shift, 0.07), _row("b", 0.08 + shift, 0.09)]
        per_seed.append({"seed": s, "grid": ["a", "b"], "runs": rows, "drawn": {"index": s - 6},
                         "expected test ndcg@10": rd.expectation(rows),
                         "expected test hr@10": rd.expectation(rows, "hr@10"),
                         "expected valid ndcg@10": rd.expectation(rows, split="valid")})
    s = rd.summarize(per_seed)
    assert s["expected test ndcg@10"]["mean"] == pytest.approx(0.075)
    assert s["realized draws test ndcg@10"]["mean"] == pytest.approx((0.06 + 0.09) / 2)
    assert s["per candidate test ndcg@10"]["b"]["mean"] == pytest.approx(0.085)
    assert s["candidates whose mean is >= target"] == 1
    json.dumps(s)  # the results file is written from it


def test_a_rerun_computes_only_the_missing_seeds_and_writes_whole_files(tmp_path, monkeypatch):
    from simulations import output

    monkeypatch.setattr(output, "RESULTS", tmp_path)
    (tmp_path / "study-seed6.json").write_text('{"seed": 6, "kept": true}\n')
    computed = []
    output.run_missing_seeds("study-seed", [6, 7], lambda s: computed.append(s) or {"seed": s})
    assert computed == [7]
    assert json.loads((tmp_path / "study-seed6.json").read_text())["kept"] is True
    assert json.loads((tmp_path / "study-seed7.json").read_text()) == {"seed": 7}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study-seed6.json", "study-seed7.json"]  # no temp left
