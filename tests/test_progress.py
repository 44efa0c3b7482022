"""The live progress of `privrec simulate`: each round's line names the privacy figure the run actually has."""

from __future__ import annotations

import json

from tools.progress import Progress


def _row(round_: int, **figures) -> dict:
    row = {"round": round_, "devices-trained": 3 * round_, "failures": 0, "seconds": 1.5, "train-loss": None,
           "ndcg@10": None, "hr@10": None, "epsilon-max": None, "epsilon-median": None, "user-level-epsilon": None}
    return {**row, **figures}


def _lines(tmp_path, capsys, rows: list[dict]) -> list[str]:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with Progress(tmp_path, rounds=2) as progress:
        progress.poll()
        progress.poll()  # a second poll prints nothing already shown
    return capsys.readouterr().out.splitlines()


def test_a_user_level_run_shows_its_composed_epsilon_not_empty_device_figures(tmp_path, capsys):
    lines = _lines(tmp_path, capsys, [_row(0, **{"user-level-epsilon": 1.7984}),
                                      _row(1, **{"user-level-epsilon": 1.8403}),
                                      _row(2, **{"user-level-epsilon": 1.9981, "ndcg@10": 0.07681})])
    assert len(lines) == 3
    assert "user-level epsilon so far 1.80" in lines[0] and "user-level epsilon so far 2.00" in lines[2]
    assert "NDCG@10 0.0768" in lines[2]
    assert not any("epsilon max" in line for line in lines)


def test_an_on_device_dp_run_keeps_its_per_device_maximum(tmp_path, capsys):
    lines = _lines(tmp_path, capsys, [_row(0), _row(1, **{"epsilon-max": 3.25, "epsilon-median": 3.1})])
    assert lines[1].endswith("epsilon max 3.25, 1.5 s")
    assert not any("user-level" in line for line in lines)


def test_both_figures_when_a_run_has_both(tmp_path, capsys):
    lines = _lines(tmp_path, capsys, [_row(1, **{"epsilon-max": 9.5, "user-level-epsilon": 4.0})])
    assert "user-level epsilon so far 4.00, epsilon max 9.50" in lines[0]


def test_a_failed_round_is_named_with_its_first_error(tmp_path, capsys):
    lines = _lines(tmp_path, capsys, [_row(1, failures=2, **{"devices-asked": 5, "first-error": "boom",
                                                           "round-status": "failed"})])
    assert lines[1] == "round 1: 2 of 5 devices failed; the run stops; first device error: boom"


def test_the_terminal_table_has_the_same_privacy_columns(tmp_path):
    progress = Progress(tmp_path, rounds=2)
    user_level = progress._table([_row(0, **{"user-level-epsilon": 1.7984})])
    on_device = progress._table([_row(1, **{"epsilon-max": 3.25, "epsilon-median": 3.1})])
    assert [c.header for c in user_level.columns][-2:] == ["user-level epsilon", "s"]
    assert list(user_level.columns[-2].cells) == ["1.80"]
    assert [c.header for c in on_device.columns][-3:] == ["epsilon max", "epsilon median", "s"]
