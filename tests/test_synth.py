"""`privrec data synth`: deterministic, close to its source, readable by privrec, bad input refused."""

from pathlib import Path

import numpy as np
import pytest

from shared.data import synth
from shared.data.formats import load_interactions
from shared.data.split import leave_one_out
from shared.data.store import open_store, prepare_store
from shared.data.synth import bigram_hit_rate, fit_source, gini, write_synthetic
from shared.errors import PrivrecError
from tools.cli import main

NUM_ITEMS = 40


def write_source(directory: Path, num_users: int = 60, seed: int = 0, timestamps: bool = True) -> Path:
    """A RecBole source with a catalogue: users mostly walk +1 through the items (sometimes jump), starting at
    popular items, so history lengths, popularity and sequential dependence all have a shape to match."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    start_weights = 1.0 / np.arange(1, NUM_ITEMS + 1)
    for user in range(num_users):
        length = int(rng.integers(5, 30))
        seen: list[int] = [int(rng.choice(NUM_ITEMS, p=start_weights / start_weights.sum()))]
        while len(seen) < length:
            step = 1 if rng.random() < 0.8 else int(rng.integers(2, NUM_ITEMS))
            nxt = (seen[-1] + step) % NUM_ITEMS
            while nxt in seen:
                nxt = (nxt + 1) % NUM_ITEMS
            seen.append(nxt)
        time = 1_000_000 + int(rng.integers(0, 10_000))
        for item in seen:
            time += int(rng.integers(0, 100)) if timestamps else 0
            rows.append(f"u{user}\ti{item}\t4\t{time if timestamps else 7}")
    (directory / "src.inter").write_text("\n".join(rows) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    items += [f"i{i}\tFilm number {i}\t{1990 + i % 10}\t{'Comedy Drama' if i % 2 else 'Sci-Fi'}"
              for i in range(NUM_ITEMS + 5)]  # five catalogue items nobody met
    (directory / "src.item").write_text("\n".join(items) + "\n")
    return directory


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_source(tmp_path_factory.mktemp("source"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_same_seed_same_files_other_seed_other_files(source, tmp_path):
    inter = load_interactions(source)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_synthetic(inter, tmp_path / name, 300, seed)
    a, b, c = ((tmp_path / n / f"{n}.inter").read_text().split("\n", 1)[1] for n in "abc")
    assert a == b and a != c
    assert (tmp_path / "a" / "a.item").read_bytes() == (tmp_path / "c" / "c.item").read_bytes()


def test_statistics_close_to_the_source(source, tmp_path):
    inter = load_interactions(source)
    write_synthetic(inter, tmp_path / "syn", 3000, 0)
    syn = load_interactions(tmp_path / "syn")
    assert len(set(syn.users)) == 3000

    def lengths(data):
        return np.unique(np.asarray(data.users, dtype=object), return_counts=True)[1]

    src_len, syn_len = lengths(inter), lengths(syn)
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(syn_len, q) - np.quantile(src_len, q)) <= 2
    assert syn_len.min() >= src_len.min() and syn_len.max() <= src_len.max()

    def popularity(data):
        counts = np.array([data.items.count(f"i{i}") for i in range(NUM_ITEMS + 5)], dtype=float)
        return counts / counts.sum()

    assert 0.5 * np.abs(popularity(syn) - popularity(inter)).sum() < 0.1  # total variation distance
    assert abs(gini(popularity(syn)) - gini(popularity(inter))) < 0.03
    assert popularity(syn)[NUM_ITEMS:].sum() == 0  # never-met catalogue items stay unmet

    def predictability(data):
        sp = leave_one_out(data)  # chronological histories
        user = np.concatenate([np.full(len(t) + 2, u) for u, t in enumerate(sp.train)])
        item = np.concatenate([np.r_[t, v, te] for t, v, te in zip(sp.train, sp.valid, sp.test)])
        return bigram_hit_rate(user, item, sp.num_items + 1)

    src_hit, syn_hit = predictability(inter), predictability(syn)
    assert src_hit > 0.4  # the walk is predictable: a generator without sequential dependence would fail here
    assert abs(syn_hit - src_hit) < 0.1


def test_histories_have_no_repeats_and_timestamps_in_order(source, tmp_path):
    write_synthetic(load_interactions(source), tmp_path / "syn", 500, 1)
    rows = (tmp_path / "syn" / "syn.inter").read_text().splitlines()[1:]
    users, items, times = zip(*(row.split("\t") for row in rows))
    pairs = list(zip(users, items))
    assert len(set(pairs)) == len(pairs)
    times = np.asarray(times, dtype=float)
    same_user = np.asarray(users[1:]) == np.asarray(users[:-1])
    assert np.all(np.diff(times)[same_user] >= 0)


def test_output_reads_back_with_the_real_catalogue_and_builds_a_device_store(source, tmp_path):
    inter = load_interactions(source)
    write_synthetic(inter, tmp_path / "syn", 200, 0)
    syn = load_interactions(tmp_path / "syn")
    assert syn.item_titles == inter.item_titles and len(syn.item_titles) == NUM_ITEMS + 5
    assert syn.item_genres == inter.item_genres
    # The path logic of `privrec simulate --dataset DIR`.
    store = open_store(prepare_store(str(tmp_path / "syn"), 1, cache_dir=tmp_path / "cache"))
    assert store.num_devices == 200
    assert store.meta["dataset"] == "syn"


def test_cli_writes_the_dataset(source, tmp_path, capsys):
    code, out, err = run_cli(capsys, "data", "synth", "--like", str(source), "--users", "25", "--seed", "2",
                             "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "25 synthetic users" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["SYNTH.json", "out.inter", "out.item"]


def refused(capsys, tmp_path, like: Path, users: str, needle: str) -> None:
    out = tmp_path / "refused"
    code, _, err = run_cli(capsys, "data", "synth", "--like", str(like), "--users", users, "--out", str(out))
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert needle in err
    assert not out.exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".refused")]


@pytest.mark.parametrize("users", ["0", "-5"])
def test_refuses_no_users(source, tmp_path, capsys, users):
    refused(capsys, tmp_path, source, users, f"--users {users}")


def test_refuses_more_users_than_memory_allows(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(synth, "available_memory", lambda: 10 * 2**20)
    refused(capsys, tmp_path, source, "100000", "--users 100000")


def test_refuses_a_source_with_fewer_than_ten_users(tmp_path, capsys):
    small = write_source(tmp_path / "small", num_users=9)
    refused(capsys, tmp_path, small, "100", "9 users")


def test_refuses_a_source_without_timestamps(tmp_path, capsys):
    flat = write_source(tmp_path / "flat", timestamps=False)
    refused(capsys, tmp_path, flat, "100", "every timestamp is 7.0")
    no_column = tmp_path / "nocol"
    no_column.mkdir()
    (no_column / "x.csv").write_text("1,10\n2,20\n")
    refused(capsys, tmp_path, no_column, "100", "x.csv line 1")


def test_refuses_an_out_folder_that_holds_files(source, tmp_path, capsys):
    (tmp_path / "refused").mkdir()
    (tmp_path / "refused" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "data", "synth", "--like", str(source), "--users", "5",
                           "--out", str(tmp_path / "refused"))
    assert code == 2 and "--out" in err and err.count("\n") == 1
    assert [p.name for p in (tmp_path / "refused").iterdir()] == ["keep.txt"]


def test_generate_refuses_directly(source):
    model = fit_source(load_interactions(source), smoothing=2.0)
    with pytest.raises(PrivrecError, match="--users 0"):
        next(synth.generate(model, 0, seed=0))


def test_a_csv_source_with_repeats_and_no_catalogue(tmp_path):
    rng = np.random.default_rng(5)
    rows = [f"{u},{rng.integers(0, 6)},{t}" for u in range(12) for t in range(int(rng.integers(4, 15)))]
    (tmp_path / "src.csv").write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    summary = write_synthetic(load_interactions(tmp_path / "src.csv"), tmp_path / "syn", 50, 0)
    assert summary["repeats_allowed"] and summary["files"] == ["syn.inter"]  # no titles: no .item file
    syn = load_interactions(tmp_path / "syn")
    assert len(set(syn.users)) == 50 and set(syn.items) <= {str(i) for i in range(6)}


def test_refuses_an_out_folder_it_cannot_create(source, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "data", "synth", "--like", str(source), "--users", "5",
                           "--out", str(blocker / "out"))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(blocker) in err
