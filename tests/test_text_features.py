"""Item text features: item text, offline MiniLM with a pinned hash, and the hash-keyed cache."""

import hashlib
import os
import shutil

import numpy as np
import pytest

from shared.data.formats import load_interactions
from shared.data.split import leave_one_out
from shared.data.store import write_store
from shared.errors import PrivrecError
from shared.text import encoder as enc
from shared.text.features import Catalogue, item_text, read_catalogue, store_text_features, text_features


class FakeEncoder:
    """A deterministic stand-in for MiniLM that counts how often it is built and used."""

    encoder_id = "fake-encoder-1"
    dim = 8
    built = 0
    encoded: list[list[str]] = []

    def __init__(self):
        FakeEncoder.built += 1

    def encode(self, texts, batch_size=64, progress=True):
        FakeEncoder.encoded.append(list(texts))
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[:8], dtype=np.uint8) for t in texts]
        return np.array(rows, dtype=np.float32) / 255.0


@pytest.fixture(autouse=True)
def _reset_fake():
    FakeEncoder.built, FakeEncoder.encoded = 0, []


def catalogue(titles=("Alien (1979)", "Aliens (1986)", "Emma (1996)"), genres=None) -> Catalogue:
    ids = ["<pad>"] + [str(i) for i in range(1, len(titles) + 1)]
    return Catalogue("tiny", ids, [None, *titles], genres or [[] for _ in ids])


def test_item_text_uses_title_and_genres_and_survives_missing_fields():
    assert item_text("7", "Alien (1979)", ["Horror", "Sci-Fi"]) == "Alien (1979). Genres: Horror, Sci-Fi"
    assert item_text("7", "  Alien \n (1979) ") == "Alien (1979)"
    assert item_text("7", None) == "item 7"
    assert item_text("7", "   ", ["", "Drama"]) == "item 7. Genres: Drama"


def test_cached_vectors_are_reused_without_loading_the_encoder(tmp_path):
    first = text_features(catalogue(), tmp_path, encoder=FakeEncoder, progress=False)
    second = text_features(catalogue(), tmp_path, encoder=FakeEncoder, progress=False)
    assert FakeEncoder.built == 1 and len(FakeEncoder.encoded) == 1
    assert np.array_equal(first.vectors, second.vectors)
    assert first.vectors.shape == (4, 8) and not first.vectors[0].any()  # padding row is zero
    assert len(list((tmp_path / "text-features").glob("*.npz"))) == 1


def test_a_changed_catalogue_is_re_encoded_never_reused(tmp_path):
    old = text_features(catalogue(), tmp_path, encoder=FakeEncoder, progress=False)
    new = text_features(catalogue(titles=("Alien (1979)", "Aliens (1986)", "Emma (2020)")), tmp_path,
                        encoder=FakeEncoder, progress=False)
    assert FakeEncoder.built == 2 and new.catalogue_sha256 != old.catalogue_sha256
    assert not np.array_equal(old.vectors[3], new.vectors[3]) and np.array_equal(old.vectors[1], new.vectors[1])
    # Genres are part of the text, so they change the hash too.
    text_features(catalogue(genres=[[], ["Horror"], [], []]), tmp_path, encoder=FakeEncoder, progress=False)
    assert FakeEncoder.built == 3


def test_a_cache_file_that_does_not_match_its_name_is_not_used(tmp_path):
    good = text_features(catalogue(), tmp_path, encoder=FakeEncoder, progress=False)
    path = tmp_path / "text-features" / f"{good.key}.npz"
    other = text_features(catalogue(titles=("A", "B", "C")), tmp_path, encoder=FakeEncoder, progress=False)
    shutil.copy(tmp_path / "text-features" / f"{other.key}.npz", path)  # stale content under the right name
    again = text_features(catalogue(), tmp_path, encoder=FakeEncoder, progress=False)
    assert FakeEncoder.built == 3 and np.array_equal(again.vectors, good.vectors)
    path.write_bytes(b"not an npz")  # damaged: re-encoded too
    text_features(catalogue(), tmp_path, encoder=FakeEncoder, progress=False)
    assert FakeEncoder.built == 4


def test_encoding_reads_only_the_public_catalogue(tmp_path):
    from tests.synthetic import walk_split

    store = write_store(walk_split(num_users=3, num_items=5), tmp_path / "store")
    for name in ("train_items.npy", "train_offsets.npy", "valid.npy", "test.npy"):
        (store / name).unlink()  # no user data left: encoding must still work
    features = store_text_features(store, tmp_path / "cache", encoder=FakeEncoder, progress=False)
    assert features.vectors.shape == (6, 8)
    assert FakeEncoder.encoded == [["Item 1", "Item 2", "Item 3", "Item 4", "Item 5"]]


def test_genres_and_latin1_titles_reach_the_catalogue(tmp_path):
    (tmp_path / "u.data").write_text("1\t1\t5\t10\n1\t2\t5\t20\n1\t3\t5\t30\n")
    flags = ["0"] * 19
    action = flags.copy()
    action[1] = "1"
    (tmp_path / "u.item").write_bytes(
        ("1|Mis\xe9rables, Les (1995)|01-Jan-1995||url|" + "|".join(action) + "\n").encode("latin-1")
        + b"2||||\n"  # empty title, no genre flags
        + b"3|Short (1990)\n")
    write_store(leave_one_out(load_interactions(tmp_path / "u.data")), tmp_path / "store")
    cat = read_catalogue(tmp_path / "store")
    assert cat.texts() == ["Misérables, Les (1995). Genres: Action", "item 2", "Short (1990)"]


def test_non_utf8_item_file_is_named_with_its_line(tmp_path):
    (tmp_path / "m.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu\ti1\t1\n")
    (tmp_path / "m.item").write_bytes(b"item_id:token\tmovie_title:token_seq\ni1\tGood\ni2\tBad \xff title\n")
    with pytest.raises(PrivrecError, match=r"m\.item line 3: bytes 0xff are not valid utf-8"):
        load_interactions(tmp_path / "m.inter")


def test_weight_file_hash_is_checked_and_a_tampered_copy_refused(tmp_path):
    original = enc.model_dir() / enc.WEIGHTS_FILE
    assert enc.verify_weights(enc.model_dir()) == original  # the installed copy is the official file
    copy = tmp_path / "model"
    copy.mkdir()
    data = bytearray(original.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    (copy / enc.WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(PrivrecError, match="does not match the pinned 53aa5117"):
        enc.TextEncoder(copy)
    (copy / enc.WEIGHTS_FILE).write_bytes(b"short")
    with pytest.raises(PrivrecError, match="5 bytes, expected 90868376"):
        enc.TextEncoder(copy)
    os.remove(copy / enc.WEIGHTS_FILE)
    with pytest.raises(PrivrecError, match="missing"):
        enc.verify_weights(copy)


def test_real_minilm_puts_related_titles_close(minilm, tmp_path):
    cat = catalogue(titles=("Alien (1979). Genres: Horror, Sci-Fi", "Aliens (1986). Genres: Action, Sci-Fi",
                            "Emma (1996). Genres: Drama, Romance"))
    features = text_features(cat, tmp_path, encoder=minilm, progress=False)
    v = features.vectors
    assert v.shape == (4, 384) and np.allclose(np.linalg.norm(v[1:], axis=1), 1, atol=1e-5)
    assert v[1] @ v[2] > v[1] @ v[3] + 0.1




def test_a_deployments_server_catalogue_gives_the_devices_text_features(tmp_path):
    """The ServerApp of a deployment reads DEVICES_DIR/catalogue (catalogue.json, no meta.json): it must build
    the very text features each device builds from its own store, or every text model is refused."""
    from shared.data.devices import CATALOGUE_DIR, CATALOGUE_FILE, split_devices
    from shared.data.store import open_store
    from tests.synthetic import walk_store

    devices = split_devices(open_store(walk_store(tmp_path / "store", num_users=2, num_items=6)), tmp_path / "dev")
    server = store_text_features(devices / CATALOGUE_DIR, tmp_path / "cache", encoder=FakeEncoder, progress=False,
                                 meta_file=CATALOGUE_FILE)
    device = store_text_features(devices / "device-1" / "data", tmp_path / "cache", encoder=FakeEncoder,
                                 progress=False)
    assert server.key == device.key and np.array_equal(server.vectors, device.vectors)
    assert server.dataset == "synthetic-walk"
