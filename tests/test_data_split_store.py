"""Leave-one-out split, device store round trip and validation, prepare_store caching, windows."""

import json
from pathlib import Path

import numpy as np
import pytest

import shared.data.store as store_mod
from shared.data.formats import Interactions
from shared.data.split import leave_one_out
from shared.data.store import (
    STORE_FORMAT_VERSION,
    DeviceData,
    open_store,
    prepare_store,
    write_store,
)
from shared.data.windows import make_windows
from shared.errors import PrivrecError


def make_inter(rows, titles=None) -> Interactions:
    users, items, ts = zip(*rows)
    return Interactions(
        users=list(users),
        items=list(items),
        timestamps=np.asarray(ts, dtype=np.float64),
        item_titles=titles or {},
        source="test rows",
    )


# Hand-built example (user, item, timestamp), worked out by hand below.
ROWS = [
    ("a", "x", 5),
    ("b", "y", 1),
    ("a", "y", 5),  # same time as ("a", "x"): file order must win, so x before y
    ("c", "z", 1),  # c has 2 interactions: dropped
    ("a", "w", 1),
    ("c", "x", 2),
    ("b", "x", 2),
    ("b", "q", 3),
    ("d", "only", 1),  # d has 1 interaction: dropped, but item "only" is still in the catalogue
    ("e", "q", 9),
    ("e", "w", 8),
    ("e", "y", 7),
    ("e", "x", 6),
]
# Items by first appearance: x=1 y=2 z=3 w=4 q=5 only=6.
# a: w(1) x(5) y(5)        -> train [4],    valid 1, test 2
# b: y(1) x(2) q(3)        -> train [2],    valid 1, test 5
# e: x(6) y(7) w(8) q(9)   -> train [1, 2], valid 4, test 5


def test_leave_one_out_by_hand():
    split = leave_one_out(make_inter(ROWS, titles={"x": "Ex", "only": "Lonely"}))
    assert split.num_items == 6
    assert split.item_ids == ["<pad>", "x", "y", "z", "w", "q", "only"]
    assert split.item_titles == [None, "Ex", None, None, None, None, "Lonely"]
    assert split.user_ids == ["a", "b", "e"]
    assert [t.tolist() for t in split.train] == [[4], [2], [1, 2]]
    assert split.valid.tolist() == [1, 1, 4]
    assert split.test.tolist() == [2, 5, 5]
    assert split.dropped_users == 2
    assert all(t.dtype == np.int64 for t in split.train)
    assert split.valid.dtype == np.int64 and split.test.dtype == np.int64


def test_all_ties_keep_file_order():
    rows = [("u", item, 7) for item in ["p", "q", "r", "s", "t"]]
    split = leave_one_out(make_inter(rows))
    assert split.train[0].tolist() == [1, 2, 3] and split.valid[0] == 4 and split.test[0] == 5


def test_many_ties_keep_file_order():
    # Long enough that an unstable sort (quicksort/introsort) would reorder equal timestamps.
    rows = [("u", f"i{k}", k % 3) for k in range(60)]
    split = leave_one_out(make_inter(rows))
    seq = [*split.train[0].tolist(), int(split.valid[0]), int(split.test[0])]
    raw = [split.item_ids[i] for i in seq]
    expected = [f"i{k}" for t in range(3) for k in range(60) if k % 3 == t]
    assert raw == expected


def test_no_user_with_three_interactions():
    with pytest.raises(PrivrecError, match="test rows: no user has at least 3"):
        leave_one_out(make_inter([("a", "x", 1), ("a", "y", 2), ("b", "x", 1)]))


def test_min_interactions_below_three_rejected():
    with pytest.raises(PrivrecError, match="min_interactions=2"):
        leave_one_out(make_inter(ROWS), min_interactions=2)


def test_min_interactions_higher_drops_more():
    split = leave_one_out(make_inter(ROWS), min_interactions=4)
    assert split.user_ids == ["e"] and split.dropped_users == 4 and split.num_items == 6


# ----------------------------------------------------------------------------- store


def five_user_split():
    rows = ROWS + [("f", "z", 1), ("f", "x", 2), ("f", "y", 3), ("g", "q", 1), ("g", "only", 2),
                   ("g", "w", 3), ("g", "z", 4), ("g", "x", 5)]  # fmt: skip
    split = leave_one_out(make_inter(rows, titles={"y": "Why (1999)"}))
    assert len(split.user_ids) == 5
    return split


def assert_user(dev: DeviceData, k: int, split, u: int):
    np.testing.assert_array_equal(dev.train[k], split.train[u])
    assert dev.train[k].dtype == np.int64
    assert dev.valid[k] == split.valid[u] and dev.test[k] == split.test[u]


def test_round_trip_one_user_per_device(tmp_path):
    split = five_user_split()
    path = write_store(split, tmp_path / "store", meta_extra={"dataset": "toy"})
    store = open_store(path)
    assert (store.num_users, store.num_devices, store.users_per_device) == (5, 5, 1)
    assert store.num_items == split.num_items
    assert store.meta["format_version"] == STORE_FORMAT_VERSION
    assert store.meta["dropped_users"] == 2 and store.meta["dataset"] == "toy"
    assert store.item_ids == split.item_ids and store.item_titles == split.item_titles
    for d in range(5):
        dev = store.device(d)
        assert dev.device_id == d and len(dev.train) == 1
        assert_user(dev, 0, split, d)


def test_two_users_per_device_odd_count(tmp_path):
    split = five_user_split()
    store = open_store(write_store(split, tmp_path / "s", users_per_device=2))
    assert store.num_devices == 3
    sizes = [len(store.device(d).train) for d in range(3)]
    assert sizes == [2, 2, 1]
    for u in range(5):
        assert_user(store.device(u // 2), u % 2, split, u)
    everyone = store.all_users()
    assert len(everyone.train) == 5
    for u in range(5):
        assert_user(everyone, u, split, u)
    with pytest.raises(PrivrecError, match=r"device id 3 out of range: valid ids are 0\.\.2"):
        store.device(3)
    with pytest.raises(PrivrecError, match="device id -1"):
        store.device(-1)


def test_device_reads_are_memory_mapped(tmp_path, monkeypatch):
    path = write_store(five_user_split(), tmp_path / "s")
    calls = []
    real_load = np.load

    def spy(file, *args, **kwargs):
        calls.append((Path(file).name, kwargs.get("mmap_mode")))
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    store = open_store(path)
    dev = store.device(4)
    assert sorted(calls) == sorted((n, "r") for n in store_mod.ARRAY_FILES)
    expected = five_user_split().train[4]
    assert expected.size > 0
    dev.train[0][...] = 0  # a device gets its own writable copy, never a view into the file
    np.testing.assert_array_equal(store.device(4).train[0], expected)


def test_write_is_atomic_and_leaves_no_temp_dirs(tmp_path, monkeypatch):
    split = five_user_split()
    real = store_mod.write_json_synced

    def fail_on_meta(path, obj):
        if Path(path).name == "meta.json":
            raise KeyboardInterrupt  # interrupted just before the store would be complete
        real(path, obj)

    monkeypatch.setattr(store_mod, "write_json_synced", fail_on_meta)
    with pytest.raises(KeyboardInterrupt):
        write_store(split, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(store_mod, "write_json_synced", real)
    write_store(split, tmp_path / "s")
    write_store(split, tmp_path / "s", users_per_device=3)  # replaces the old store
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    assert open_store(tmp_path / "s").num_devices == 2


def test_write_store_rejects_bad_arguments(tmp_path):
    with pytest.raises(PrivrecError, match="users-per-device=0"):
        write_store(five_user_split(), tmp_path / "s", users_per_device=0)
    with pytest.raises(PrivrecError, match="'num_users' is reserved"):
        write_store(five_user_split(), tmp_path / "s", meta_extra={"num_users": 1})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def store_dir(tmp_path):
    return write_store(five_user_split(), tmp_path / "s", users_per_device=2)


def open_error(path) -> str:
    with pytest.raises(PrivrecError) as info:
        open_store(path).item_ids  # noqa: B018 - also loads items.json
    return str(info.value)


def test_open_missing_dir(tmp_path):
    assert "nowhere" in open_error(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["meta.json", "train_items.npy", "train_offsets.npy", "valid.npy",
                                  "test.npy", "items.json"])  # fmt: skip
def test_open_missing_file(store_dir, name):
    (store_dir / name).unlink()
    msg = open_error(store_dir)
    assert name in msg and "missing" in msg


def edit_meta(store_dir, **changes):
    meta = json.loads((store_dir / "meta.json").read_text())
    meta.update(changes)
    (store_dir / "meta.json").write_text(json.dumps(meta))


def test_open_wrong_format_version(store_dir):
    edit_meta(store_dir, format_version=99)
    msg = open_error(store_dir)
    assert "meta.json" in msg and "format_version 99" in msg


def test_open_inconsistent_sizes(store_dir):
    edit_meta(store_dir, num_devices=7)
    assert "num_devices 7" in open_error(store_dir)
    edit_meta(store_dir, num_devices=3)
    np.save(store_dir / "valid.npy", np.ones(4, dtype=np.int64))
    msg = open_error(store_dir)
    assert "valid.npy" in msg and "4 entries, expected 5" in msg


def test_open_bad_offsets_items_and_json(store_dir):
    np.save(store_dir / "train_offsets.npy", np.arange(6, dtype=np.int64) * 100)
    assert "train_offsets.npy" in open_error(store_dir)


def test_open_items_json_wrong_length(store_dir):
    short = {"item_ids": ["<pad>"], "item_titles": [None]}
    (store_dir / "items.json").write_text(json.dumps(short))
    msg = open_error(store_dir)
    assert "items.json" in msg and "expected 7" in msg


def test_open_corrupt_json_names_line(store_dir):
    (store_dir / "meta.json").write_text('{\n"format_version": 1,\n oops\n}')
    msg = open_error(store_dir)
    assert "meta.json line 3" in msg


def test_out_of_range_item_is_reported(store_dir):
    np.save(store_dir / "test.npy", np.array([1, 2, 3, 4, 99], dtype=np.int64))
    store = open_store(store_dir)
    store.device(0)  # users 0-1 are fine
    with pytest.raises(PrivrecError, match="test.npy: item ids outside 1..6"):
        store.device(2)


# ----------------------------------------------------------------------------- prepare_store


def test_prepare_store_from_path_and_reuse(tmp_path, monkeypatch):
    data = tmp_path / "toy.csv"
    data.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in ROWS))
    cache = tmp_path / "cache"
    path = prepare_store(str(data), users_per_device=2, cache_dir=cache)
    assert path.parent == cache / "stores"
    assert path.name.startswith("toy-") and path.name.endswith("-u2")
    store = open_store(path)
    assert store.meta["content_sha256"].startswith(path.name.split("-")[1])
    assert len(path.name.split("-")[1]) == 12
    assert store.meta["dataset"] == "toy" and "toy.csv" in store.meta["source"]
    assert (store.num_users, store.meta["dropped_users"]) == (3, 2)

    # Reuse: a second call must not rebuild.
    def no_rebuild(*a, **k):
        raise AssertionError("store rebuilt instead of reused")

    monkeypatch.setattr(store_mod, "_write_store", no_rebuild)
    assert prepare_store(str(data), users_per_device=2, cache_dir=cache) == path
    monkeypatch.undo()

    # An incomplete store (no meta.json) is rebuilt, not trusted.
    (path / "meta.json").unlink()
    assert open_store(prepare_store(str(data), 2, cache)).num_users == 3

    # Different content -> a different store.
    data.write_text(data.read_text() + "a,new,10\n")
    assert prepare_store(str(data), 2, cache) != path


def test_concurrent_publish_keeps_the_first_complete_store(tmp_path):
    split = five_user_split()
    first = write_store(split, tmp_path / "s", users_per_device=1)
    before = (first / "meta.json").stat().st_mtime_ns
    # A second writer of the same store (replace=False, as prepare_store does) must not swap it out.
    store_mod._write_store(split, tmp_path / "s", 2, {}, replace=False)
    assert (first / "meta.json").stat().st_mtime_ns == before
    assert open_store(first).users_per_device == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_unwritable_cache_is_a_clear_error(tmp_path):
    data = tmp_path / "toy.csv"
    data.write_text("".join(f"{u},{i},{t}\n" for u, i, t in ROWS))
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    with pytest.raises(PrivrecError, match="cache.*cannot create store directory"):
        prepare_store(str(data), cache_dir=blocker)


def test_prepare_store_uses_env_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(tmp_path / "envcache"))
    data = tmp_path / "ml" / "u.data"
    data.parent.mkdir()
    data.write_text("".join(f"{u}\t{i}\t1\t{t}\n" for u, i, t in ROWS))
    path = prepare_store(str(data))
    assert path.parent == tmp_path / "envcache" / "stores" and path.name.startswith("ml-")


def test_prepare_store_unknown_dataset(tmp_path):
    with pytest.raises(PrivrecError, match="'ml-1m': neither 'ml-100k' nor an existing"):
        prepare_store("ml-1m", cache_dir=tmp_path)
    with pytest.raises(PrivrecError, match="users-per-device=0"):
        prepare_store("ml-1m", users_per_device=0, cache_dir=tmp_path)


def test_prepare_store_recbole_fixture_with_titles(tmp_path):
    fixture = Path(__file__).parent / "fixtures" / "data" / "recbole"
    store = open_store(prepare_store(str(fixture), cache_dir=tmp_path))
    # u1 has 3 interactions (kept), u2 has 1 (dropped).
    assert (store.num_users, store.meta["dropped_users"]) == (1, 1)
    assert store.item_titles[store.item_ids.index("i1")] == "Amélie (2001)"
    assert store.item_titles[store.item_ids.index("i2")] == "Untitled Short"
    dev = store.device(0)  # u1 by time: i2(100) i3(200.5) i1(300)
    names = [store.item_ids[i] for i in [*dev.train[0], dev.valid[0], dev.test[0]]]
    assert names == ["i2", "i3", "i1"]


# ----------------------------------------------------------------------------- windows


def test_windows_aligned_to_end_short_leftover_dropped():
    w = make_windows(np.arange(1, 8), 3)  # [1] [2 3 4] [5 6 7]: the lone oldest item is dropped
    assert w.dtype == np.int64
    assert w.tolist() == [[2, 3, 4], [5, 6, 7]]


def test_windows_leftover_of_two_is_padded():
    assert make_windows(np.arange(1, 9), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_windows_short_sequences():
    assert make_windows(np.array([5, 6]), 4).tolist() == [[0, 0, 5, 6]]
    for seq in ([], [5]):
        out = make_windows(np.array(seq, dtype=np.int64), 4)
        assert out.shape == (0, 4) and out.dtype == np.int64


@pytest.mark.parametrize("window", [2, 3, 5, 50])
def test_every_interaction_in_at_most_one_window(window):
    rng = np.random.default_rng(window)
    for n in range(0, 3 * window + 3):
        seq = rng.integers(1, 1000, size=n)
        w = make_windows(seq, window)
        assert w.shape[1] == window
        real = [row[row != 0] for row in w]
        assert all(len(r) >= 2 for r in real)
        flat = np.concatenate(real) if real else np.zeros(0, dtype=np.int64)
        # Concatenated windows are exactly the sequence's most recent items, each once, in order.
        kept = len(flat)
        assert kept in (n, n - 1) and (kept == n or n % window == 1)
        np.testing.assert_array_equal(flat, seq[n - kept :])
        # Padding only on the left of the oldest window; all later windows are full.
        assert all((row != 0).all() for row in w[1:])


@pytest.mark.parametrize("bad", [1, 0, -3, True, 2.5])
def test_bad_window(bad):
    with pytest.raises(PrivrecError, match="window="):
        make_windows(np.arange(1, 10), bad)


def test_a_store_that_cannot_be_written_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    """The staging directory is made, then writing fails: one PrivrecError naming the store, no leftovers."""
    split = leave_one_out(make_inter(ROWS))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod, "_write_store_files", disk_full)
    with pytest.raises(PrivrecError, match=r"/s: cannot write the device store \(.*No space left"):
        store_mod._write_store(split, tmp_path / "s", 1, {}, replace=True)
    assert list(tmp_path.iterdir()) == []
