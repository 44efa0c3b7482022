"""fetch_ml100k offline: fake wheels/archives, checksums, cache reuse, local path, all-fail message.

One test really fetches; it runs only with PRIVREC_TEST_FETCH=1.
"""

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import shared.data.fetch as fetch
from shared.data.fetch import ML100K_SOURCES, extract_recbole_ml100k, fetch_ml100k
from shared.data.formats import load_interactions
from shared.errors import PrivrecError

# A tiny stand-in for ML-100K: 3 users x 3 items = 9 interactions.
FAKE_INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
    f"{u}\t{i}\t3\t{100 * u + i}\n" for u in (1, 2, 3) for i in (1, 2, 3)
)
FAKE_ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n" + "".join(
    f"{i}\tFilm {i}\t1995\tDrama\n" for i in (1, 2, 3)
)
FAKE_UDATA = "".join(f"{u}\t{i}\t3\t{100 * u + i}\n" for u in (1, 2, 3) for i in (1, 2, 3))
FAKE_COUNTS = {"interactions": 9, "users": 3, "items": 3}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fake_hashes() -> dict[str, str]:
    return {"ml-100k.inter": sha(FAKE_INTER), "ml-100k.item": sha(FAKE_ITEM)}


def make_fake_wheel(directory: Path, inter: str = FAKE_INTER, item: str = FAKE_ITEM) -> Path:
    wheel = directory / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("recbole/__init__.py", "raise RuntimeError('must never be imported')\n")
        zf.writestr(fetch.RECBOLE_MEMBERS["ml-100k.inter"], inter)
        zf.writestr(fetch.RECBOLE_MEMBERS["ml-100k.item"], item)
    return wheel


def fake_grouplens_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-100k/u.data", FAKE_UDATA)
        zf.writestr("ml-100k/u.item", "".join(f"{i}|Film {i} (1995)|x\n" for i in (1, 2, 3)))
        zf.writestr("ml-100k/README", "fake")
    return buf.getvalue()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network; a fake wheel stands in for `pip download`; counts and hashes match the fakes."""
    calls = {"grouplens": 0, "pip": 0}
    wheel_src = make_fake_wheel(tmp_path)

    def no_grouplens(timeout):
        calls["grouplens"] += 1
        raise PrivrecError(f"{fetch.GROUPLENS_URL}: Name or service not known")

    def fake_pip(dest):
        calls["pip"] += 1
        target = dest / wheel_src.name
        target.write_bytes(wheel_src.read_bytes())
        return target

    monkeypatch.setattr(fetch, "download_grouplens", no_grouplens)
    monkeypatch.setattr(fetch, "pip_download_wheel", fake_pip)
    monkeypatch.setattr(fetch, "ML100K_COUNTS", FAKE_COUNTS)
    monkeypatch.setattr(fetch, "RECBOLE_ML100K_SHA256", fake_hashes())
    return calls


def test_fake_wheel_fails_the_real_pinned_checksums(tmp_path):
    wheel = make_fake_wheel(tmp_path)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(PrivrecError) as info:
        extract_recbole_ml100k(wheel, dest)  # default: the real pinned hashes
    msg = str(info.value)
    assert "ml-100k.inter" in msg and "sha256 mismatch" in msg
    assert "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff" in msg
    assert sha(FAKE_INTER) in msg
    assert not (dest / "ml-100k.inter").exists()


def test_extract_with_injected_hashes(tmp_path):
    wheel = make_fake_wheel(tmp_path)
    dest = tmp_path / "out"
    dest.mkdir()
    extract_recbole_ml100k(wheel, dest, fake_hashes())
    assert (dest / "ml-100k.inter").read_text() == FAKE_INTER
    assert (dest / "ml-100k.item").read_text() == FAKE_ITEM


def test_wheel_without_the_dataset_or_not_a_zip(tmp_path):
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("recbole/__init__.py", "")
    with pytest.raises(PrivrecError, match="no member recbole/.*/ml-100k.inter"):
        extract_recbole_ml100k(wheel, tmp_path)
    wheel.write_bytes(b"not a zip")
    with pytest.raises(PrivrecError, match="recbole-1.2.1-py3-none-any.whl: not a readable zip"):
        extract_recbole_ml100k(wheel, tmp_path)


def test_pypi_source_then_cache_reuse(tmp_path, offline):
    cache = tmp_path / "cache"
    path = fetch_ml100k(cache_dir=cache)
    assert path == cache / "datasets" / "ml-100k"
    assert offline == {"grouplens": 1, "pip": 1}
    record = json.loads((path / "SOURCE.json").read_text())
    assert record["source"] == "pypi-recbole" and record["source"] in ML100K_SOURCES
    assert record["files"]["ml-100k.inter"]["sha256"] == sha(FAKE_INTER)
    assert record["files"]["ml-100k.item"]["bytes"] == len(FAKE_ITEM)
    assert "fetched_at" in record
    inter = load_interactions(path)
    assert len(inter.users) == 9 and inter.item_titles["2"] == "Film 2 (1995)"
    # Only the published dir remains: no temp dirs, no unpacked wheel.
    assert [p.name for p in (cache / "datasets").iterdir()] == ["ml-100k"]

    assert fetch_ml100k(cache_dir=cache) == path
    assert offline == {"grouplens": 1, "pip": 1}  # cached copy reused, nothing downloaded


def test_corrupt_cache_is_refetched(tmp_path, offline):
    path = fetch_ml100k(cache_dir=tmp_path)
    (path / "ml-100k.inter").write_text(FAKE_INTER.replace("\t3\t", "\t4\t"))
    assert fetch_ml100k(cache_dir=tmp_path) == path
    assert offline["pip"] == 2
    assert (path / "ml-100k.inter").read_text() == FAKE_INTER


def test_env_cache_dir(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(tmp_path / "env"))
    assert fetch_ml100k() == tmp_path / "env" / "datasets" / "ml-100k"


def test_grouplens_source(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(fetch, "download_grouplens", lambda timeout: fake_grouplens_zip())
    path = fetch_ml100k(cache_dir=tmp_path)
    record = json.loads((path / "SOURCE.json").read_text())
    assert record["source"] == "grouplens" and set(record["files"]) == {"u.data", "u.item"}
    assert offline["pip"] == 0
    assert load_interactions(path).item_titles["1"] == "Film 1 (1995)"


def test_grouplens_content_check(tmp_path, offline, monkeypatch):
    # An archive with the wrong amount of data is rejected (and pip is tried next).
    monkeypatch.setattr(fetch, "ML100K_COUNTS", {"interactions": 10, "users": 3, "items": 3})
    monkeypatch.setattr(fetch, "download_grouplens", lambda timeout: fake_grouplens_zip())
    with pytest.raises(PrivrecError) as info:
        fetch_ml100k(cache_dir=tmp_path)
    msg = str(info.value)
    assert "grouplens:" in msg and "not MovieLens-100K" in msg and "found 9 interactions" in msg


def test_local_path_source(tmp_path, offline):
    local = tmp_path / "my-ml100k"
    local.mkdir()
    (local / "u.data").write_text(FAKE_UDATA)
    (local / "notes.txt").write_text("not copied")
    path = fetch_ml100k(local_path=local, cache_dir=tmp_path / "cache")
    record = json.loads((path / "SOURCE.json").read_text())
    assert record["source"] == "local" and record["origin"] == str(local.resolve())
    assert sorted(p.name for p in path.iterdir()) == ["SOURCE.json", "u.data"]
    assert offline == {"grouplens": 0, "pip": 0}


def test_local_inter_file_source(tmp_path, offline):
    (tmp_path / "ml-100k.inter").write_text(FAKE_INTER)
    (tmp_path / "ml-100k.item").write_text(FAKE_ITEM)
    path = fetch_ml100k(local_path=tmp_path / "ml-100k.inter", cache_dir=tmp_path / "cache")
    names = sorted(p.name for p in path.iterdir())
    assert names == ["SOURCE.json", "ml-100k.inter", "ml-100k.item"]


def test_bad_local_path_is_an_error_not_a_fallthrough(tmp_path, offline):
    with pytest.raises(PrivrecError, match="local ML-100K path .*missing: no such file"):
        fetch_ml100k(local_path=tmp_path / "missing", cache_dir=tmp_path / "c")
    small = tmp_path / "small"
    small.mkdir()
    (small / "u.data").write_text("1\t1\t3\t5\n")
    with pytest.raises(PrivrecError, match="not MovieLens-100K .*found 1 interactions, 1 users"):
        fetch_ml100k(local_path=small, cache_dir=tmp_path / "c")
    (tmp_path / "other").mkdir()
    with pytest.raises(PrivrecError, match="expected u.data or exactly one .inter"):
        fetch_ml100k(local_path=tmp_path / "other", cache_dir=tmp_path / "c")
    assert offline == {"grouplens": 0, "pip": 0}
    assert not (tmp_path / "c" / "datasets" / "ml-100k").exists()


def test_all_sources_fail_lists_each(tmp_path, offline, monkeypatch):
    wrong = {"ml-100k.inter": "0" * 64, "ml-100k.item": "1" * 64}
    monkeypatch.setattr(fetch, "RECBOLE_ML100K_SHA256", wrong)
    with pytest.raises(PrivrecError) as info:
        fetch_ml100k(cache_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("could not obtain ML-100K from any source")
    assert "local: no local path given" in msg
    assert "cache: no cached copy" in msg
    assert "grouplens: " in msg and "Name or service not known" in msg
    assert "pypi-recbole: ml-100k.inter: sha256 mismatch (expected " + "0" * 64 in msg
    assert list((tmp_path / "datasets").iterdir()) == []  # nothing half-written left behind


def test_pip_failure_message(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        stderr = "Looking in indexes...\nERROR: No matching distribution found for recbole==1.2.1\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    with pytest.raises(PrivrecError, match="pip download recbole==1.2.1: ERROR: No matching"):
        fetch.pip_download_wheel(tmp_path)
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "recbole==1.2.1" in cmd and cmd[-1] == str(tmp_path)


def test_grouplens_download_fails_fast_and_quietly(monkeypatch):
    def refuse(url, timeout):
        assert timeout == 0.5
        raise OSError("Name or service not known")

    monkeypatch.setattr(fetch.urllib.request, "urlopen", refuse)
    with pytest.raises(PrivrecError, match="files.grouplens.org.*Name or service not known"):
        fetch.download_grouplens(0.5)


@pytest.mark.skipif(
    os.environ.get("PRIVREC_TEST_FETCH") != "1", reason="set PRIVREC_TEST_FETCH=1 to really fetch"
)
def test_real_fetch(tmp_path):
    path = fetch_ml100k(cache_dir=tmp_path)
    record = json.loads((path / "SOURCE.json").read_text())
    assert record["source"] in ("grouplens", "pypi-recbole")
    if record["source"] == "pypi-recbole":
        for name, digest in fetch.RECBOLE_ML100K_SHA256.items():
            assert record["files"][name]["sha256"] == digest
    inter = load_interactions(path)
    assert (len(inter.users), len(set(inter.users)), len(set(inter.items))) == (100_000, 943, 1682)
