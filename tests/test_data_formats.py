"""Parsing of every supported interaction format, and a clear error for every kind of bad input."""

from pathlib import Path

import numpy as np
import pytest

from shared.data.formats import content_sha256, load_interactions
from shared.errors import PrivrecError

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# ----------------------------------------------------------------------------- good inputs


@pytest.mark.parametrize("target", ["ml100k", "ml100k/u.data"])
def test_ml100k_dir_or_file(target):
    inter = load_interactions(FIXTURES / target)
    assert inter.users == ["1", "1", "2", "1", "2", "3"]
    assert inter.items == ["10", "20", "10", "30", "40", "20"]
    assert inter.timestamps.dtype == np.float64
    assert inter.timestamps.tolist() == [300, 100, 50, 200, 50, 10]
    # u.item is latin-1: accented titles must come back as the right characters.
    assert inter.item_titles["10"] == "Misérables, Les (1995)"
    assert inter.item_titles["30"] == "Café au lait (1993)"
    assert inter.item_titles["40"] == "Zoë (1999)"
    assert "MovieLens-100K" in inter.source and "u.item" in inter.source


def test_ml100k_without_titles(tmp_path):
    write(tmp_path / "u.data", "5\t7\t1\t123\n")
    inter = load_interactions(tmp_path)
    assert inter.item_titles == {} and inter.users == ["5"] and inter.items == ["7"]


@pytest.mark.parametrize("target", ["recbole", "recbole/tiny.inter"])
def test_recbole_columns_in_any_order(target):
    inter = load_interactions(FIXTURES / target)
    # Header is timestamp, item_id, rating, user_id: columns are found by name, not position.
    assert inter.users == ["u1", "u1", "u2", "u1"]
    assert inter.items == ["i1", "i2", "i1", "i3"]
    assert inter.timestamps.tolist() == [300.0, 100.0, 50.0, 200.5]
    assert inter.item_titles == {"i1": "Amélie (2001)", "i2": "Untitled Short", "i3": "Heat (1995)"}


def test_ml1m_with_latin1_titles():
    inter = load_interactions(FIXTURES / "ml1m")
    assert inter.users == ["1", "1", "2"]
    assert inter.items == ["1193", "661", "1193"]
    assert inter.timestamps.tolist() == [978300760, 978302109, 978298413]
    assert inter.item_titles["661"] == "Señorita Extraviada (2001)"
    assert load_interactions(FIXTURES / "ml1m" / "ratings.dat").items == inter.items


def test_csv_with_header_quotes_and_crlf():
    inter = load_interactions(FIXTURES / "csv" / "with_header.csv")
    assert inter.users == ["alice", "bob", "alice"]
    assert inter.items == ["item, with comma", "i2", "i2"]
    assert inter.timestamps.tolist() == [10.0, 20.5, 30.0]
    assert inter.item_titles == {}


def test_csv_without_header_skips_blank_lines():
    inter = load_interactions(FIXTURES / "csv" / "no_header.csv")
    assert inter.users == ["alice", "bob", "alice"]
    assert inter.items == ["i1", "i2", "i2"]


def test_csv_in_a_directory(tmp_path):
    write(tmp_path / "events.csv", "u,i,1\n")
    assert load_interactions(tmp_path).items == ["i"]


def test_content_hash_is_format_independent(tmp_path):
    write(tmp_path / "u.data", "1\t10\t5\t300\n2\t20\t3\t100\n")
    csv = write(tmp_path / "same.csv", "user,item,timestamp\n1,10,300\n2,20,100.0\n")
    other = write(tmp_path / "other.csv", "1,10,300\n2,20,101\n")
    h = content_sha256(load_interactions(tmp_path / "u.data"))
    assert h == content_sha256(load_interactions(csv))
    assert h != content_sha256(load_interactions(other))


# ----------------------------------------------------------------------------- bad inputs


def error_of(path) -> str:
    with pytest.raises(PrivrecError) as info:
        load_interactions(path)
    return str(info.value)


def test_missing_path(tmp_path):
    msg = error_of(tmp_path / "nope.csv")
    assert "nope.csv" in msg and "no such file" in msg


def test_unrecognised_directory_lists_what_was_looked_for(tmp_path):
    write(tmp_path / "readme.txt", "hello")
    msg = error_of(tmp_path)
    assert str(tmp_path) in msg
    for looked_for in ("u.data", "ratings.dat", ".inter", ".csv"):
        assert looked_for in msg


def test_unrecognised_file_extension(tmp_path):
    msg = error_of(write(tmp_path / "data.parquet", "x"))
    assert "data.parquet" in msg and "u.data" in msg


def test_two_inter_files_are_ambiguous(tmp_path):
    write(tmp_path / "a.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    write(tmp_path / "b.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    msg = error_of(tmp_path)
    assert "a.inter" in msg and "b.inter" in msg


@pytest.mark.parametrize(
    "name, content, where",
    [
        ("u.data", "1\t2\t3\t4\n1\t2\t3\n", "u.data line 2"),
        ("ratings.dat", "1::2::3::4\n\n1::2::3\n", "ratings.dat line 3"),
        ("x.csv", "user,item,timestamp\n1,2,3\n1,2\n", "x.csv line 3"),
        ("x.csv", "1,2,3,4\n", "x.csv line 1"),
        ("x.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\n", "x.inter line 2"),
    ],
)
def test_wrong_number_of_fields(tmp_path, name, content, where):
    msg = error_of(write(tmp_path / name, content))
    assert where in msg and "fields" in msg


@pytest.mark.parametrize(
    "name, content, where, value",
    [
        ("ratings.csv", "user,item,timestamp\n1,2,3\n1,3,abc\n", "ratings.csv line 3", "'abc'"),
        ("ratings.csv", "1,2,when\n", "ratings.csv line 1", "'when'"),
        ("u.data", "1\t2\t3\tnan\n", "u.data line 1", "'nan'"),
        ("ratings.dat", "1::2::3::4\n1::2::3::12:00\n", "ratings.dat line 2", "'12:00'"),
        (
            "x.inter",
            "timestamp:float\tuser_id:token\titem_id:token\nyesterday\t1\t2\n",
            "x.inter line 2",
            "'yesterday'",
        ),
    ],
)
def test_non_numeric_timestamp(tmp_path, name, content, where, value):
    msg = error_of(write(tmp_path / name, content))
    assert where in msg and value in msg and "timestamp" in msg


@pytest.mark.parametrize(
    "name, content",
    [("empty.csv", ""), ("header.csv", "user,item,timestamp\n"), ("u.data", "\n\n"),
     ("x.inter", "user_id:token\titem_id:token\ttimestamp:float\n")],
)
def test_no_interactions(tmp_path, name, content):
    msg = error_of(write(tmp_path / name, content))
    assert name in msg and "no interactions" in msg


def test_empty_inter_file_has_no_header(tmp_path):
    msg = error_of(write(tmp_path / "x.inter", ""))
    assert "x.inter line 1" in msg and "header" in msg


def test_undecodable_bytes_name_the_line(tmp_path):
    msg = error_of(write(tmp_path / "bad.csv", b"a,b,1\nc,d,2\ne,\xff\xfe,3\n"))
    assert "bad.csv line 3" in msg and "utf-8" in msg


def test_undecodable_bytes_in_recbole_item_file(tmp_path):
    write(tmp_path / "m.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    write(tmp_path / "m.item", b"item_id:token\tmovie_title:token_seq\n2\tCaf\xe9\n")
    msg = error_of(tmp_path / "m.inter")
    assert "m.item line 2" in msg


def test_recbole_header_missing_field(tmp_path):
    header = "user_id:token\titem_id:token\trating:float\n"
    msg = error_of(write(tmp_path / "x.inter", header + "1\t2\t3\n"))
    assert "x.inter line 1" in msg and "timestamp" in msg


def test_empty_id(tmp_path):
    msg = error_of(write(tmp_path / "x.csv", "a,b,1\n,b,2\n"))
    assert "x.csv line 2" in msg and "user" in msg


def test_bad_title_file_line(tmp_path):
    write(tmp_path / "u.data", "1\t2\t3\t4\n")
    write(tmp_path / "u.item", "2|Fine\nno pipes here\n")
    msg = error_of(tmp_path)
    assert "u.item line 2" in msg


# ----------------------------------------------------------------------------- files that are not text

CSV_TEXT = "user,item,timestamp\nu1,i1,1\nu1,i2,2\nu1,i3,3\n"


@pytest.mark.parametrize("encode, needles", [
    (lambda t: __import__("gzip").compress(t.encode()), ["gzip archive", "gunzip"]),
    (lambda t: t.encode("utf-16"), ["UTF-16 text", "little-endian BOM", "UTF-8"]),
    (lambda t: t.encode("utf-16-be"), ["UTF-16 text without a byte-order mark"]),
    (lambda t: b"\xfe\xff" + t.encode("utf-16-be"), ["UTF-16 text", "big-endian BOM"]),
    (lambda t: __import__("bz2").compress(t.encode()), ["bzip2 archive"]),
])
def test_a_csv_that_is_not_utf8_text_says_what_it_seems_to_be(tmp_path, encode, needles):
    message = error_of(write(tmp_path / "data.csv", encode(CSV_TEXT)))
    assert message.startswith("data.csv: this file looks like")
    assert "not valid utf-8" not in message
    for needle in needles:
        assert needle in message


def test_utf8_bom_is_still_fine(tmp_path):
    assert load_interactions(write(tmp_path / "data.csv", b"\xef\xbb\xbf" + CSV_TEXT.encode())).users == ["u1"] * 3


def test_unreadable_folder_is_a_one_line_error(tmp_path, monkeypatch):
    # Tests may run as root, which reads any folder: fake the permission error a user would get.
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "x.csv", CSV_TEXT)
    real_listdir = __import__("os").listdir

    def listdir(path="."):
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr("shared.data.formats.os.listdir", listdir)
    assert error_of(folder) == f"{folder}: cannot read (Permission denied)"


def test_unreadable_path_is_a_one_line_error(tmp_path, monkeypatch):
    target = tmp_path / "locked" / "x.csv"

    def stat(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "stat", stat)
    assert error_of(target) == f"{target}: cannot read (Permission denied)"
