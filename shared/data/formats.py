"""Read interaction files into an `Interactions` table.

Supported formats (auto-detected from the file or directory name):

- MovieLens-100K: `u.data` (tab-separated user, item, rating, timestamp) + optional `u.item`
  (pipe-separated, latin-1: id|title|...).
- RecBole atomic files: `<name>.inter` (tab-separated, header `field:type`) + optional sibling
  `<name>.item` (item_id, movie_title, release_year, ...).
- MovieLens-1M: `ratings.dat` (user::item::rating::timestamp) + optional `movies.dat`
  (id::title::genres, latin-1).
- Plain CSV: `user,item,timestamp`, header row optional.

Raw ids stay strings and file order is preserved, so a stable sort on timestamps later keeps ties in
file order. Every problem with the input is a `PrivrecError` naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.errors import PrivrecError

LOOKED_FOR = "u.data (MovieLens-100K), ratings.dat (MovieLens-1M), one *.inter (RecBole), one *.csv"


@dataclass(frozen=True)
class Interactions:
    users: list[str]
    items: list[str]
    timestamps: np.ndarray  # float64, file order preserved
    item_titles: dict[str, str]  # raw item id -> title (may be empty)
    source: str  # human-readable description of where the data came from
    item_genres: dict[str, list[str]] = field(default_factory=dict)  # raw item id -> genres (may be empty)

    def __len__(self) -> int:
        return len(self.users)


def load_interactions(path: str | Path) -> Interactions:
    """Load a file or a directory in any supported format (see module docstring)."""
    path = Path(path)
    try:
        if not path.exists():
            raise PrivrecError(f"{path}: no such file or directory")
        data_file = _find_data_file(path) if path.is_dir() else path
    except OSError as exc:  # e.g. a folder without read or search permission
        raise PrivrecError(f"{exc.filename or path}: cannot read ({exc.strerror or exc})") from None
    name = data_file.name
    if name == "u.data":
        return _load_ml100k(data_file)
    if name == "ratings.dat":
        return _load_ml1m(data_file)
    if data_file.suffix == ".inter":
        return _load_recbole(data_file)
    if data_file.suffix == ".csv":
        return _load_csv(data_file)
    raise PrivrecError(f"{path}: unrecognised interaction file format; looked for {LOOKED_FOR}")


def content_sha256(inter: Interactions) -> str:
    """SHA-256 over the canonical table: `user\\titem\\ttimestamp` lines in file order, then titles.

    Timestamps are written with `repr(float)`, so the same data read from different formats
    (e.g. u.data vs ml-100k.inter) hashes the same when the titles agree too.
    """
    h = hashlib.sha256()
    for user, item, ts in zip(inter.users, inter.items, inter.timestamps.tolist()):
        h.update(f"{user}\t{item}\t{ts!r}\n".encode())
    h.update(b"--titles--\n")
    for item in sorted(inter.item_titles):
        h.update(f"{item}\t{inter.item_titles[item]}\n".encode())
    if inter.item_genres:  # only when known, so title-only data keep their earlier hash
        h.update(b"--genres--\n")
        for item in sorted(inter.item_genres):
            h.update(f"{item}\t{'|'.join(inter.item_genres[item])}\n".encode())
    return h.hexdigest()


def duplicate_rows(inter: Interactions) -> int:
    """Rows that repeat an earlier row's user, item and timestamp (kept: they are counted, not dropped)."""
    return len(inter) - len(set(zip(inter.users, inter.items, inter.timestamps.tolist())))


# ----------------------------------------------------------------------------- detection


def _find_data_file(directory: Path) -> Path:
    os.listdir(directory)  # raises PermissionError for an unreadable folder (glob would just find nothing)
    for fixed in ("u.data", "ratings.dat"):
        if (directory / fixed).is_file():
            return directory / fixed
    for suffix, what in ((".inter", "RecBole .inter"), (".csv", "CSV")):
        found = sorted(p for p in directory.glob(f"*{suffix}") if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise PrivrecError(
                f"{directory}: more than one {what} file ({names}); pass the file itself"
            )
    raise PrivrecError(f"{directory}: no interaction file found; looked for {LOOKED_FOR}")


# ----------------------------------------------------------------------------- low-level reading


def _read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """Decode a whole file and split it on newlines; decode errors name the line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PrivrecError(f"{path}: cannot read ({exc.strerror or exc})") from None
    what = _looks_like(raw)
    if what:
        raise PrivrecError(f"{path.name}: this file looks like {what}, not {encoding} text")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        bad = raw[exc.start : exc.end].hex()
        msg = f"{path.name} line {line}: bytes 0x{bad} are not valid {encoding}"
        raise PrivrecError(msg) from None
    if text.startswith("\ufeff"):  # BOM written by some spreadsheet tools
        text = text[1:]
    return [line.rstrip("\r") for line in text.split("\n")]


# Leading bytes of files people save under a .csv name that are not UTF-8 text.
_SIGNATURES = (
    (b"\x1f\x8b", "a gzip archive: decompress it first (gunzip FILE)"),
    (b"PK\x03\x04", "a zip archive (or an .xlsx workbook): extract it, or export CSV as UTF-8"),
    (b"BZh", "a bzip2 archive: decompress it first (bunzip2 FILE)"),
    (b"\xfd7zXZ\x00", "an xz archive: decompress it first (unxz FILE)"),
    (b"\xff\xfe\x00\x00", "UTF-32 text (little-endian BOM): save it as UTF-8"),
    (b"\x00\x00\xfe\xff", "UTF-32 text (big-endian BOM): save it as UTF-8"),
    (b"\xff\xfe", "UTF-16 text (little-endian BOM): save it as UTF-8 (iconv -f UTF-16 -t UTF-8)"),
    (b"\xfe\xff", "UTF-16 text (big-endian BOM): save it as UTF-8 (iconv -f UTF-16 -t UTF-8)"),
)


def _looks_like(raw: bytes) -> str | None:
    """What a file that is not text seems to be, from its first bytes (None: nothing recognised)."""
    for magic, what in _SIGNATURES:
        if raw.startswith(magic):
            return what
    head = raw[:4096]
    if head and head.count(b"\x00") > len(head) // 4:  # UTF-16 without a BOM: every other byte is 0
        return "UTF-16 text without a byte-order mark (every other byte is 0): save it as UTF-8"
    return None


def _parse_timestamp(value: str, fname: str, lineno: int) -> float:
    try:
        ts = float(value)
    except ValueError:
        raise PrivrecError(f"{fname} line {lineno}: timestamp {value!r} is not a number") from None
    if not math.isfinite(ts):
        raise PrivrecError(f"{fname} line {lineno}: timestamp {value!r} is not a finite number")
    return ts


def _check_id(value: str, what: str, fname: str, lineno: int) -> str:
    value = value.strip()
    if not value:
        raise PrivrecError(f"{fname} line {lineno}: empty {what} id")
    return value


def _split_fields(
    line: str, sep: str, expected: int, names: str, fname: str, lineno: int
) -> list[str]:
    fields = line.split(sep)
    if len(fields) != expected:
        raise PrivrecError(
            f"{fname} line {lineno}: expected {expected} fields ({names}) separated by {sep!r}, "
            f"got {len(fields)}"
        )
    return fields


class _Table:
    """Accumulates rows; builds the frozen `Interactions` at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.users: list[str] = []
        self.items: list[str] = []
        self.timestamps: list[float] = []

    def add(self, user: str, item: str, ts: str, lineno: int) -> None:
        fname = self.path.name
        self.users.append(_check_id(user, "user", fname, lineno))
        self.items.append(_check_id(item, "item", fname, lineno))
        self.timestamps.append(_parse_timestamp(ts.strip(), fname, lineno))

    def build(self, titles: dict[str, str], source: str, genres: dict[str, list[str]] | None = None) -> Interactions:
        if not self.users:
            raise PrivrecError(
                f"{self.path.name}: no interactions (file is empty or has only a header)"
            )
        return Interactions(
            users=self.users,
            items=self.items,
            timestamps=np.asarray(self.timestamps, dtype=np.float64),
            item_titles=titles,
            source=source,
            item_genres=genres or {},
        )


def _data_lines(lines: list[str], start: int = 0):
    """Yield (1-based line number, line) for non-blank lines from index `start`."""
    for idx in range(start, len(lines)):
        if lines[idx].strip():
            yield idx + 1, lines[idx]


def _describe(kind: str, data_file: Path, title_file: Path | None) -> str:
    extra = f" with titles from {title_file.name}" if title_file is not None else ""
    return f"{kind} {data_file}{extra}"


# ----------------------------------------------------------------------------- MovieLens-100K


def _load_ml100k(path: Path) -> Interactions:
    return _load_movielens(path, "MovieLens-100K", "\t", "u.item", _load_pipe_titles, _load_ml100k_genres)


def _load_movielens(path: Path, kind: str, separator: str, item_file_name: str,
                    load_titles: Callable[[Path], dict[str, str]],
                    load_genres: Callable[[Path], dict[str, list[str]]]) -> Interactions:
    """A MovieLens ratings file (user, item, rating, timestamp), with titles and genres from its item file."""
    table = _Table(path)
    names = "user, item, rating, timestamp"
    for lineno, line in _data_lines(_read_lines(path)):
        user, item, _rating, ts = _split_fields(line, separator, 4, names, path.name, lineno)
        table.add(user, item, ts, lineno)
    item_file = path.with_name(item_file_name)
    titles = load_titles(item_file) if item_file.is_file() else {}
    genres = load_genres(item_file) if item_file.is_file() else {}
    return table.build(titles, _describe(kind, path, item_file if titles else None), genres)


def _load_pipe_titles(path: Path) -> dict[str, str]:
    return _load_titles(path, "|", "id|title|...")


# The 19 genre flags at the end of a u.item line, in u.genre's order (used when u.genre is absent).
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")


def _load_ml100k_genres(path: Path) -> dict[str, list[str]]:
    """Item id -> genre names from u.item's trailing 0/1 flags; lines without the flags get none."""
    names = list(ML100K_GENRES)
    genre_file = path.with_name("u.genre")
    if genre_file.is_file():
        listed = [line.rsplit("|", 1)[0] for _, line in _data_lines(_read_lines(genre_file, "latin-1"))]
        if len(listed) == len(names):
            names = listed
    genres: dict[str, list[str]] = {}
    for lineno, line in _data_lines(_read_lines(path, "latin-1")):
        fields = line.split("|")
        flags = [f.strip() for f in fields[-len(names):]]
        if len(fields) < 2 + len(names) or any(f not in ("0", "1") for f in flags):
            continue  # no (or malformed) genre flags: the item simply has no genres
        item = _check_id(fields[0], "item", path.name, lineno)
        genres[item] = [n for n, f in zip(names, flags) if f == "1" and n != "unknown"]
    return genres


def _load_titles(path: Path, separator: str, layout: str) -> dict[str, str]:
    """Item id -> title from a MovieLens item file (latin-1, id first, title second)."""
    titles: dict[str, str] = {}
    for lineno, line in _data_lines(_read_lines(path, "latin-1")):
        fields = line.split(separator)
        if len(fields) < 2:
            raise PrivrecError(f"{path.name} line {lineno}: expected at least 2 '{separator}'-separated "
                               f"fields ({layout})")
        titles[_check_id(fields[0], "item", path.name, lineno)] = fields[1].strip()
    return titles


# ----------------------------------------------------------------------------- MovieLens-1M


def _load_ml1m(path: Path) -> Interactions:
    return _load_movielens(path, "MovieLens-1M", "::", "movies.dat", _load_ml1m_titles, _load_ml1m_genres)


def _load_ml1m_titles(path: Path) -> dict[str, str]:
    return _load_titles(path, "::", "id::title::genres")


def _load_ml1m_genres(path: Path) -> dict[str, list[str]]:
    genres: dict[str, list[str]] = {}
    for lineno, line in _data_lines(_read_lines(path, "latin-1")):
        fields = line.split("::")
        if len(fields) >= 3:
            genres[_check_id(fields[0], "item", path.name, lineno)] = [g for g in fields[2].split("|") if g.strip()]
    return genres


# ----------------------------------------------------------------------------- RecBole


def _recbole_header(lines: list[str], path: Path, required: tuple[str, ...]) -> dict[str, int]:
    """Map field name (the part before ':') -> column index, checking `required` are present."""
    if not lines or not lines[0].strip():
        raise PrivrecError(
            f"{path.name} line 1: missing RecBole header (e.g. 'user_id:token\\t...')"
        )
    columns = {field.split(":", 1)[0].strip(): i for i, field in enumerate(lines[0].split("\t"))}
    missing = [name for name in required if name not in columns]
    if missing:
        raise PrivrecError(
            f"{path.name} line 1: header lacks field(s) {', '.join(missing)} "
            f"(found: {', '.join(columns) or 'none'})"
        )
    return columns


def _load_recbole(path: Path) -> Interactions:
    lines = _read_lines(path)
    cols = _recbole_header(lines, path, ("user_id", "item_id", "timestamp"))
    width = len(lines[0].split("\t"))
    u, i, t = cols["user_id"], cols["item_id"], cols["timestamp"]
    table = _Table(path)
    names = ", ".join(cols)
    for lineno, line in _data_lines(lines, start=1):
        fields = _split_fields(line, "\t", width, names, path.name, lineno)
        table.add(fields[u], fields[i], fields[t], lineno)
    item_file = path.with_suffix(".item")
    titles, genres = _load_recbole_items(item_file) if item_file.is_file() else ({}, {})
    source = _describe("RecBole atomic file", path, item_file if titles else None)
    return table.build(titles, source, genres)


def _load_recbole_items(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(titles, genres) from a RecBole .item file; genres from its `class` column when present."""
    lines = _read_lines(path)
    cols = _recbole_header(lines, path, ("item_id",))
    if "movie_title" not in cols:
        return {}, {}  # an .item file without titles (only features) is fine
    width = len(lines[0].split("\t"))
    year_col = cols.get("release_year")
    genre_col = cols.get("class")
    titles: dict[str, str] = {}
    genres: dict[str, list[str]] = {}
    for lineno, line in _data_lines(lines, start=1):
        fields = _split_fields(line, "\t", width, ", ".join(cols), path.name, lineno)
        title = fields[cols["movie_title"]].strip()
        year = fields[year_col].strip() if year_col is not None else ""
        item = _check_id(fields[cols["item_id"]], "item", path.name, lineno)
        titles[item] = f"{title} ({year})" if year else title
        if genre_col is not None:
            genres[item] = fields[genre_col].split()
    return titles, genres


# ----------------------------------------------------------------------------- CSV


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _load_csv(path: Path) -> Interactions:
    lines = _read_lines(path)
    table = _Table(path)
    first = True
    try:
        # csv.reader over one line at a time keeps our own line numbering exact.
        for lineno, line in _data_lines(lines):
            fields = next(csv.reader([line]))
            if len(fields) != 3:
                raise PrivrecError(
                    f"{path.name} line {lineno}: expected 3 comma-separated fields "
                    f"(user,item,timestamp), got {len(fields)}"
                )
            ts = fields[2].strip()
            if first and not _is_number(ts) and ts.lower() == "timestamp":
                first = False
                continue  # header row
            first = False
            table.add(fields[0], fields[1], ts, lineno)
    except csv.Error as exc:
        raise PrivrecError(f"{path.name} line {lineno}: malformed CSV ({exc})") from None
    return table.build({}, f"CSV {path}")
