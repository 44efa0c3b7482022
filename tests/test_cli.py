"""The `privrec` command line: user mistakes give one clear line on stderr, exit 2, no traceback.

Most tests call `tools.cli.main([...])` in-process (fast); one runs the installed console script.
Bad config must be rejected before any dataset work or Flower process starts; bad data before any
run directory exists; bad `recommend` input before anything is printed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import shared.data.store
import tools.launch
from tests.test_federation import NUM_ITEMS, run_federation
from tools.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "cli"


# ----------------------------------------------------------------------------- helpers


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> str:
    """Exit 2, exactly one `privrec: error:` line on stderr, no traceback, naming every needle."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    line = lines[0]
    assert line.startswith("privrec: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(path))
    return path


@pytest.fixture
def no_simulation(monkeypatch):
    """Fail the test if Flower would be started."""

    def forbidden(*args, **kwargs):
        raise AssertionError("run_simulation must not be reached")

    monkeypatch.setattr(tools.launch, "run_simulation", forbidden)


@pytest.fixture
def no_dataset_work(monkeypatch, no_simulation):
    """Fail the test if a dataset would be read or a device store prepared."""

    def forbidden(*args, **kwargs):
        raise AssertionError("prepare_store must not be reached")

    monkeypatch.setattr(shared.data.store, "prepare_store", forbidden)
    monkeypatch.setattr(shared.data.store, "open_store", forbidden)


# ----------------------------------------------------------------------------- simulate: config


CONFIG_MISTAKES = {
    "typo-in-set-key": (["--set", "noise-multipler=1"],
                        ["'noise-multipler'", "did you mean 'noise-multiplier'"]),
    "negative-noise": (["--noise-multiplier", "-1"], ["'noise-multiplier'", "-1", ">= 0"]),
    "no-device-trains": (["--devices-per-round", "0", "--set", "fraction-train=0"],
                         ["devices-per-round", "fraction-train", "no device would train"]),
    "window-zero": (["--set", "window=0"], ["'window' = 0", ">= 2"]),
    "delta-above-one": (["--set", "delta=1.5"], ["'delta' = 1.5", "(0, 1)"]),
    "set-without-value": (["--set", "delta"], ["--set 'delta'", "KEY=VALUE"]),
    "set-wrong-type": (["--set", "num-rounds=ten"], ["'num-rounds'", "'ten'", "int"]),
}


@pytest.mark.parametrize("argv, needles", CONFIG_MISTAKES.values(), ids=CONFIG_MISTAKES.keys())
def test_simulate_rejects_bad_config_before_any_work(tmp_path, capsys, cache, no_dataset_work, argv, needles):
    run_dir = tmp_path / "runs"
    start = time.perf_counter()
    code, out, err = run_cli(capsys, "simulate", "--run-dir", run_dir, *argv)
    assert time.perf_counter() - start < 5
    assert_user_error(code, err, *needles)
    assert not run_dir.exists()
    assert not cache.exists()


def _config_file_cases(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    unknown = tmp_path / "unknown-key.toml"
    unknown.write_text('num-rounds = 2\nnoise-multipler = 1.0\n')
    invalid = tmp_path / "invalid.toml"
    invalid.write_text("num-rounds = 2\nnoise-multiplier = = 1\n")
    section = tmp_path / "section.toml"
    section.write_text("[privrec]\nnum-rounds = 2\n")
    out_of_range = tmp_path / "range.toml"
    out_of_range.write_text("delta = 2.0\n")
    missing = tmp_path / "nowhere" / "sim.toml"
    return {
        "missing": (missing, [str(missing), "does not exist"]),
        "unknown-key": (unknown, [str(unknown), "'noise-multipler'", "did you mean 'noise-multiplier'"]),
        "invalid-toml": (invalid, [str(invalid), "not valid TOML", "line 2"]),
        "section": (section, [str(section), "[privrec]"]),
        "out-of-range": (out_of_range, [str(out_of_range), "'delta' = 2.0"]),
    }


@pytest.mark.parametrize("case", ["missing", "unknown-key", "invalid-toml", "section", "out-of-range"])
def test_simulate_rejects_bad_config_file_naming_it(tmp_path, capsys, cache, no_dataset_work, case):
    path, needles = _config_file_cases(tmp_path)[case]
    run_dir = tmp_path / "runs"
    start = time.perf_counter()
    code, out, err = run_cli(capsys, "simulate", "--config", path, "--run-dir", run_dir)
    assert time.perf_counter() - start < 5
    assert_user_error(code, err, *needles)
    assert not run_dir.exists()
    assert out == ""


def test_flags_override_a_valid_config_file_and_are_still_checked(tmp_path, capsys, cache, no_dataset_work):
    config = tmp_path / "ok.toml"
    config.write_text("num-rounds = 2\nnoise-multiplier = 0.5\n")
    code, _, err = run_cli(capsys, "simulate", "--config", config, "--noise-multiplier", "-2",
                           "--run-dir", tmp_path / "runs")
    assert_user_error(code, err, "'noise-multiplier' = -2.0")


# ----------------------------------------------------------------------------- simulate: data


def test_simulate_missing_dataset_names_the_path(tmp_path, capsys, cache, no_simulation):
    missing = tmp_path / "no-such-data.csv"
    code, out, err = run_cli(capsys, "simulate", "--dataset", missing, "--run-dir", tmp_path / "runs")
    assert_user_error(code, err, str(missing))
    assert not (tmp_path / "runs").exists()
    assert out == ""


def test_simulate_corrupt_csv_names_file_and_line(tmp_path, capsys, cache, no_simulation):
    corrupt = tmp_path / "corrupt.csv"
    corrupt.write_text("user,item,timestamp\nu1,i1,100\nu1,i2,yesterday\nu1,i3,300\n")
    code, out, err = run_cli(capsys, "simulate", "--dataset", corrupt, "--run-dir", tmp_path / "runs")
    assert_user_error(code, err, "corrupt.csv", "line 3", "'yesterday'")
    assert not (tmp_path / "runs").exists()
    # No device store was published for the broken data (nothing in the cache looks complete).
    assert not list(cache.glob("stores/*/meta.json"))
    assert out == ""


# ----------------------------------------------------------------------------- baseline


def test_popularity_baseline_ranks_the_most_popular_unseen_item_first(tmp_path, capsys, cache):
    # Every user's test item is the most frequent training item they have not seen, in a
    # catalogue of 16 items; their validation items never occur in training.
    out_file = tmp_path / "figures" / "popularity.json"
    code, out, err = run_cli(capsys, "baseline", "popularity", "--dataset", FIXTURES / "popular_unseen.csv",
                             "--out", out_file)
    assert code == 0, err
    assert "NDCG@10 1.0000" in out and "HR@10 1.0000" in out
    assert "7 users" in out
    result = json.loads(out_file.read_text())
    assert result["baseline"] == "popularity" and result["users"] == 7
    for split in ("valid", "test"):
        for key in ("hr@10", "ndcg@10"):
            assert 0.0 <= result[split][key] <= 1.0
            low, high = result[split][f"{key}-ci"]
            assert 0.0 <= low <= result[split][key] <= high <= 1.0
    assert result["test"]["hr@10"] == 1.0
    assert result["test"]["ndcg@10"] == pytest.approx(1.0)  # rank 1 for every user, not just top 10
    # Validation items have zero popularity and tie with 13 other unseen items: all outside the top 10.
    assert result["valid"]["hr@10"] == 0.0


def test_baseline_out_to_unwritable_place_is_a_clean_error(tmp_path, capsys, cache):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "baseline", "popularity", "--dataset", FIXTURES / "popular_unseen.csv",
                           "--out", blocker / "x.json")
    assert_user_error(code, err, "--out", str(blocker / "x.json"))


def test_baseline_corrupt_dataset_names_file_and_line(tmp_path, capsys, cache):
    corrupt = tmp_path / "bad.csv"
    corrupt.write_text("u1,i1,1\nu1,i2\n")
    code, out, err = run_cli(capsys, "baseline", "popularity", "--dataset", corrupt)
    assert_user_error(code, err, "bad.csv", "line 2")
    assert out == ""


# ----------------------------------------------------------------------------- recommend


@pytest.fixture(scope="module")
def run_path(tmp_path_factory) -> Path:
    _, path, _, _, _ = run_federation(tmp_path_factory.mktemp("fed"), **{"num-rounds": 2})
    return path


def test_recommend_history_prints_k_titled_items_never_from_the_history(run_path, capsys):
    history = ["i3", "i4", "i5"]
    code, out, err = run_cli(capsys, "recommend", "--model", run_path, "--history", " ".join(history), "-k", "5")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 5
    items = []
    for rank, line in enumerate(lines, 1):
        fields = line.split()
        assert fields[0] == f"{rank}."
        item = fields[1]
        assert item.startswith("i") and 1 <= int(item[1:]) <= NUM_ITEMS
        assert f"Item {int(item[1:])}" in line  # the title of that very item
        items.append(item)
    assert len(set(items)) == 5
    assert not set(items) & set(history)


def test_recommend_never_returns_history_even_when_k_exceeds_the_catalogue(run_path, capsys):
    history = [f"i{n}" for n in range(1, 56)]  # 55 of the 60 items
    code, out, err = run_cli(capsys, "recommend", "--model", run_path, "--history", " ".join(history), "-k", "50")
    assert code == 0, err
    items = [line.split()[1] for line in out.strip().splitlines()]
    assert sorted(items) == sorted(f"i{n}" for n in range(56, 61))


def test_recommend_unknown_history_id_is_named(run_path, capsys):
    code, out, err = run_cli(capsys, "recommend", "--model", run_path, "--history", "i3 nope")
    assert_user_error(code, err, "'nope'", "--history")
    assert out == ""


def test_recommend_empty_history_is_an_error(run_path, capsys):
    code, out, err = run_cli(capsys, "recommend", "--model", run_path, "--history", "  ")
    assert_user_error(code, err, "empty")
    assert out == ""


def _jsonl(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "histories.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


BAD_JSONL = {
    "unknown-id": (['{"history": ["i1", "i2"]}', '{"history": ["i3", "bad-id"]}', '{"history": ["i4"]}'],
                   ["line 2", "'bad-id'"]),
    "invalid-json": (['{"history": ["i1"]}', '{"history": ["i2"', '{"history": ["i4"]}'],
                     ["line 2", "not valid JSON"]),
    "not-an-object": (['{"history": ["i1"]}', '["i2", "i3"]'], ["line 2", '"history"']),
    "history-not-a-list": (['{"history": ["i1"]}', '{"history": "i2 i3"}'], ["line 2"]),
    "empty-history": (['{"history": ["i1"]}', '{"history": []}'], ["line 2", "empty"]),
    "bad-id-after-blank-line": (['{"history": ["i1"]}', "", '{"history": ["zz"]}'], ["line 3", "'zz'"]),
}


@pytest.mark.parametrize("lines, needles", BAD_JSONL.values(), ids=BAD_JSONL.keys())
def test_recommend_input_is_validated_before_anything_is_printed(run_path, tmp_path, capsys, lines, needles):
    path = _jsonl(tmp_path, *lines)
    code, out, err = run_cli(capsys, "recommend", "--model", run_path, "--input", path)
    assert_user_error(code, err, str(path), *needles)
    assert out == ""  # line 1 was fine, but nothing may be printed before the whole file is checked


def test_recommend_input_gives_one_json_object_per_line(run_path, tmp_path, capsys):
    path = _jsonl(tmp_path, '{"history": ["i1", "i2"], "user": "alice"}', "",
                  '{"history": ["i7", "i8", "i9"]}', '{"history": ["i60"]}')
    code, out, err = run_cli(capsys, "recommend", "--model", run_path, "--input", path, "-k", "4")
    assert code == 0, err
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert len(records) == 3
    assert records[0]["user"] == "alice"  # other keys pass through
    assert [r["history"] for r in records] == [["i1", "i2"], ["i7", "i8", "i9"], ["i60"]]
    for record in records:
        recs = record["recommendations"]
        assert len(recs) == 4
        seen = set(record["history"])
        for rec in recs:
            assert rec["item"] not in seen
            assert rec["title"] == f"Item {int(rec['item'][1:])}"
            assert isinstance(rec["score"], float)
        scores = [rec["score"] for rec in recs]
        assert scores == sorted(scores, reverse=True)


def test_recommend_input_integer_ids_are_matched_as_strings(run_path, tmp_path, capsys):
    # The catalogue's ids are "i1".."i60": the integer 7 is not one of them.
    path = _jsonl(tmp_path, '{"history": [7]}')
    code, out, err = run_cli(capsys, "recommend", "--model", run_path, "--input", path)
    assert_user_error(code, err, "line 1", "'7'")
    assert out == ""


def test_recommend_missing_input_file_is_named(run_path, tmp_path, capsys):
    missing = tmp_path / "nothere.jsonl"
    code, out, err = run_cli(capsys, "recommend", "--model", run_path, "--input", missing)
    assert_user_error(code, err, str(missing))


@pytest.mark.parametrize("mode", ["history", "input"])
def test_recommend_k_must_be_positive(run_path, tmp_path, capsys, mode):
    source = ["--history", "i1 i2"] if mode == "history" else ["--input", _jsonl(tmp_path, '{"history": ["i1"]}')]
    code, out, err = run_cli(capsys, "recommend", "--model", run_path, *source, "-k", "0")
    assert_user_error(code, err, "-k 0", ">= 1")
    assert out == ""


@pytest.mark.parametrize("source", [[], ["--history", "i1", "--input", "x.jsonl"]], ids=["neither", "both"])
def test_recommend_needs_exactly_one_of_history_and_input(run_path, capsys, source):
    code, out, err = run_cli(capsys, "recommend", "--model", run_path, *source)
    assert_user_error(code, err, "--history", "--input")
    assert out == ""


def test_recommend_folder_without_model_is_named(tmp_path, capsys):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    code, out, err = run_cli(capsys, "recommend", "--model", folder, "--history", "i1")
    assert_user_error(code, err, str(folder), "model.pt")


def test_recommend_missing_model_folder_is_named(tmp_path, capsys):
    folder = tmp_path / "no-such-run"
    code, out, err = run_cli(capsys, "recommend", "--model", folder, "--history", "i1")
    assert_user_error(code, err, str(folder), "no such run directory")


def _damage(path: Path, kind: str) -> None:
    if kind == "garbage-model":
        (path / "model.pt").write_bytes(b"this is not a torch file\n")
    elif kind == "empty-model":
        (path / "model.pt").write_bytes(b"")
    elif kind == "wrong-weights":
        torch.save({"x": torch.zeros(2)}, path / "model.pt")
    elif kind == "items-without-ids":
        (path / "items.json").write_text("{}")
    elif kind == "items-a-list":
        (path / "items.json").write_text('["i1", "i2"]')
    elif kind == "items-too-few":
        items = json.loads((path / "items.json").read_text())
        (path / "items.json").write_text(json.dumps({k: v[:10] for k, v in items.items()}))
    elif kind == "model-json-incomplete":
        (path / "model.json").write_text('{"num_items": 60}')
    elif kind == "model-json-invalid":
        (path / "model.json").write_text("{")
    elif kind == "model-json-bad-value":
        arch = json.loads((path / "model.json").read_text())
        (path / "model.json").write_text(json.dumps({**arch, "max_len": 0}))


DAMAGE = {
    "garbage-model": "cannot load the model",
    "empty-model": "cannot load the model",
    "wrong-weights": "cannot load the model",
    "items-without-ids": "items.json",
    "items-a-list": "items.json",
    "items-too-few": "items.json",
    "model-json-incomplete": "model.json lacks key(s) max_len",
    "model-json-invalid": "model.json: not readable JSON",
    "model-json-bad-value": "max_len",
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_recommend_damaged_run_directory_is_a_one_line_error(run_path, tmp_path, capsys, kind):
    damaged = tmp_path / "run"
    shutil.copytree(run_path, damaged)
    _damage(damaged, kind)
    code, out, err = run_cli(capsys, "recommend", "--model", damaged, "--history", "i3", "-k", "2")
    assert_user_error(code, err, str(damaged), DAMAGE[kind])
    assert out == ""


# ----------------------------------------------------------------------------- data fetch


def test_data_fetch_unknown_dataset_is_named(capsys, cache):
    code, out, err = run_cli(capsys, "data", "fetch", "movielens-20m")
    assert_user_error(code, err, "'movielens-20m'", "ml-100k")
    assert not cache.exists()


# ----------------------------------------------------------------------------- the real entry point


def test_console_script_exits_2_with_one_line_and_no_traceback(tmp_path):
    script = Path(sys.executable).parent / "privrec"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tools.cli"]
    run_dir = tmp_path / "runs"
    env_cache = tmp_path / "cache"
    proc = subprocess.run(
        [*command, "simulate", "--set", "noise-multipler=1", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=60,
        env={**__import__("os").environ, "PRIVREC_CACHE_DIR": str(env_cache)},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "privrec: error: --set: unknown config key 'noise-multipler' (did you mean 'noise-multiplier'?)"
    ]
    assert proc.stdout == ""
    assert not run_dir.exists() and not env_cache.exists()


def test_recommend_new_items_with_an_id_model_is_a_one_line_error(run_path, tmp_path, capsys):
    new = _jsonl(tmp_path, '{"item": "n1", "title": "Brand New (2030)"}')
    code, _, err = run_cli(capsys, "recommend", "--model", str(run_path), "--history", "i1", "--new-items", str(new))
    assert_user_error(code, err, "item IDs only", "item-representation = text")


# ----------------------------------------------------------------------------- simulate: failing devices


@pytest.fixture
def inprocess_simulation(monkeypatch):
    """`privrec simulate` with the real ServerApp and ClientApp in one process instead of Flower's processes."""
    from flwr.app import Context, RecordDict

    from client.app import app as client_app
    from server.app import main as server_main
    from simulations.inprocess import InProcessGrid, serve

    def run(cfg, num_devices, run_path, on_poll=None, cpus_per_device=1, ray_address=None):
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
        try:
            serve(server_main, InProcessGrid(client_app, num_devices), context)
            status = "finished:completed"
        except Exception:  # noqa: BLE001 - Flower would record the ServerApp's exception the same way
            status = "finished:failed"
        if on_poll:
            on_poll()
        return tools.launch.SimulationResult(run_id=1, flower_status=status, returncode=0)

    monkeypatch.setattr(tools.launch, "run_simulation", run)


def test_simulate_whose_devices_all_fail_exits_non_zero_with_the_device_error(tmp_path, capsys, cache,
                                                                              inprocess_simulation, monkeypatch):
    from tests.synthetic import walk_store
    from tests.test_federation import _failing_train_round

    store = walk_store(tmp_path / "store", num_users=6, num_items=30)
    _failing_train_round(monkeypatch, lambda device: True)
    code, out, err = run_cli(capsys, "simulate", "--set", "model=sasrec", "--set", f"data-store={store}", "--rounds",
                             "2", "--devices-per-round", "4", "--run-dir", tmp_path / "runs", "--run-name", "bad",
                             "--set", "eval-every=0", "--set", "max-len=16", "--set", "window=12",
                             "--set", "hidden-size=16", "--set", "num-blocks=1")
    line = assert_user_error(code, err, "run failed", "round 1: 4 of 4 devices failed",
                             "ValueError: device", "simulated fault")
    assert "95% CI" not in out  # no final figures of an untrained model
    assert "round 1: 4 of 4 devices failed; the run stops; first device error: ValueError: device" in out
    assert json.loads((tmp_path / "runs" / "bad" / "status.json").read_text())["state"] == "failed", line


# ----------------------------------------------------------------------------- small things said on the console


def test_recommend_says_so_when_the_history_covers_the_catalogue(run_path, tmp_path, capsys):
    history = " ".join(f"i{n}" for n in range(1, NUM_ITEMS + 1))
    code, out, err = run_cli(capsys, "recommend", "--model", run_path, "--history", history)
    assert code == 0, err
    assert out.strip() == f"nothing to recommend: the history already holds every one of the {NUM_ITEMS} items " \
                          "in the catalogue"
    path = _jsonl(tmp_path, json.dumps({"history": history.split()}))
    code, out, err = run_cli(capsys, "recommend", "--model", run_path, "--input", path)
    assert code == 0 and json.loads(out)["recommendations"] == []
    assert "record 1: nothing to recommend" in err


def test_set_values_overridden_by_a_flag_are_still_checked(tmp_path, capsys, cache, no_dataset_work):
    code, _, err = run_cli(capsys, "simulate", "--set", "noise-multiplier=abc", "--noise-multiplier", "1",
                           "--run-dir", tmp_path / "runs")
    assert_user_error(code, err, "--set: config key 'noise-multiplier': 'abc' is not a valid float")
    code, _, err = run_cli(capsys, "simulate", "--set", "num-rounds=-3", "--rounds", "2", "--run-dir", tmp_path / "r")
    assert_user_error(code, err, "--set: config key 'num-rounds' = -3")


def test_a_set_value_a_flag_overrides_is_pointed_out(tmp_path, capsys, cache, no_simulation):
    from tools.cli import build_parser
    from tools.options import config_from_args

    args = build_parser().parse_args(["simulate", "--set", "num-rounds=5", "--rounds", "2"])
    assert config_from_args(args)["num-rounds"] == 2
    assert "--set num-rounds=5 is overridden by its flag (2)" in capsys.readouterr().err


def _small_run_flags(store):
    # SASRec runs (`privrec simulate` without a model runs the content-scorer pipeline since issue 13)
    return ["--set", "model=sasrec", "--set", f"data-store={store}", "--set", "eval-every=0", "--set", "max-len=16",
            "--set", "window=12",
            "--set", "hidden-size=16", "--set", "num-blocks=1"]


def test_devices_per_round_above_the_population_is_said_and_recorded(tmp_path, capsys, cache,
                                                                     inprocess_simulation):
    from tests.synthetic import walk_store

    store = walk_store(tmp_path / "store", num_users=3, num_items=30)
    code, out, err = run_cli(capsys, "simulate", *_small_run_flags(store), "--rounds", "1",
                             "--devices-per-round", "10", "--run-dir", tmp_path / "runs", "--run-name", "c")
    assert code == 0, err
    assert "devices-per-round = 10 is more than the 3 devices" in out
    recorded = json.loads((tmp_path / "runs" / "c" / "config.json").read_text())
    assert recorded["devices-per-round"] == 3


def test_server_records_the_effective_devices_per_round_too(tmp_path):
    from flwr.app import Context, RecordDict

    from client.app import app as client_app
    from server.app import main as server_main
    from simulations.inprocess import InProcessGrid, serve
    from tests.synthetic import walk_store

    store = walk_store(tmp_path / "store", num_users=3, num_items=30)
    run_config = {"data-store": str(store), "num-rounds": 1, "devices-per-round": 10, "eval-every": 0,
                  "max-len": 16, "window": 12, "hidden-size": 16, "num-blocks": 1,
                  "run-dir": str(tmp_path / "runs"), "run-name": "s"}
    serve(server_main, InProcessGrid(client_app, 3), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                      run_config=run_config))
    assert json.loads((tmp_path / "runs" / "s" / "config.json").read_text())["devices-per-round"] == 3


def test_dropped_users_and_duplicated_rows_are_counted_on_the_console(tmp_path, capsys, cache):
    data = tmp_path / "dups.csv"
    data.write_text("user,item,timestamp\n" + "".join(f"u{u},i{i},{i}\n" for u in range(3) for i in range(5))
                    + "u0,i1,1\nu0,i1,1\nshort,i1,1\nshort,i2,2\nlone,i3,3\n")
    code, out, err = run_cli(capsys, "baseline", "popularity", "--dataset", data)
    assert code == 0, err
    assert "privrec: note: 2 user(s) with fewer than 3 interactions left out" in out
    assert "privrec: note: 2 duplicated row(s) (same user, item and timestamp as an earlier row) kept" in out


def test_unreadable_dataset_folder_is_one_line(tmp_path, capsys, cache, no_simulation, monkeypatch):
    import os

    folder = tmp_path / "locked"
    folder.mkdir()
    real = os.listdir

    def listdir(path="."):
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr("shared.data.formats.os.listdir", listdir)
    code, out, err = run_cli(capsys, "simulate", "--dataset", folder, "--run-dir", tmp_path / "runs")
    assert_user_error(code, err, str(folder), "Permission denied")


def test_any_permission_error_is_one_line(tmp_path, capsys, cache, no_simulation, monkeypatch):
    def locked(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/locked/x.csv")

    monkeypatch.setattr(shared.data.store, "prepare_store", locked)
    code, _, err = run_cli(capsys, "simulate", "--dataset", "x.csv", "--run-dir", tmp_path / "runs")
    assert_user_error(code, err, "/data/locked/x.csv: Permission denied")


def test_simulate_with_a_few_failing_devices_completes_and_counts_them(tmp_path, capsys, cache,
                                                                      inprocess_simulation, monkeypatch):
    from tests.synthetic import walk_store
    from tests.test_federation import _failing_train_round

    store = walk_store(tmp_path / "store", num_users=4, num_items=30)
    _failing_train_round(monkeypatch, lambda device: device == "0")
    code, out, err = run_cli(capsys, "simulate", *_small_run_flags(store), "--rounds", "2", "--devices-per-round", "4",
                             "--run-dir", tmp_path / "runs", "--run-name", "p")
    assert code == 0, err
    assert out.count("round 1: 1 of 4 devices failed; first device error: ValueError: device 0") == 1
    assert "device failures: 2 train and 0 evaluate replies were errors" in out
