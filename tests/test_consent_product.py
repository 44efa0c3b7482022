"""simulations/consent_product.py: how the consenting-cohort runs are summarised and judged."""

from __future__ import annotations

import pytest

from simulations.consent_product import markdown, summarize


def _row(seed: int, ndcg: float, alone: float, epsilon: float = 1.998) -> dict:
    return {"seed": seed, "test-ndcg@10": ndcg, "test-ndcg@10-ci": [ndcg - 0.01, ndcg + 0.01], "test-hr@10": 0.14,
            "valid-ndcg@10": ndcg, "pretraining-only-test-ndcg@10": alone, "pretraining-only-test-hr@10": 0.11,
            "baseline-content-test-ndcg@10": 0.063, "baseline-popularity-test-ndcg@10": 0.043,
            "gain-over-pretraining-only": ndcg / alone - 1, "user-level-epsilon": epsilon, "wall-seconds": 150.0,
            "statement": "Whole pipeline ..."}


def test_the_target_is_the_gain_of_the_means_over_pretraining_only_at_epsilon_at_most_8():
    met = summarize([_row(0, 0.066, 0.060), _row(1, 0.067, 0.060)], [0, 1])
    assert met["gain-of-the-means"] == pytest.approx(0.0665 / 0.060 - 1) and met["target-met"]
    assert met["summary"]["test-ndcg@10"]["mean"] == pytest.approx(0.0665)
    short = summarize([_row(0, 0.065, 0.060), _row(1, 0.066, 0.060)], [0, 1])  # +9%
    assert not short["target-met"]
    over_budget = summarize([_row(0, 0.080, 0.060), _row(1, 0.080, 0.060, epsilon=8.5)], [0, 1])
    assert not over_budget["target-met"]
    text = markdown(met)
    assert "**met**" in text and "| 1 | 0.0670" in text and "+11%" in text
