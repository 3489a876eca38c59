"""What a demanding user runs into, each a failure found by trying the tool (round 24, trust5):
a full disk and damaged bytes under an index, settings out of their domain in the API, a test
store of other data, a failed first run of training. Each must end in one clear error of its
kind (never a traceback, never a silent wrong answer) and leave no store of its own behind."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import wals_ooc
from wals_ooc import WALS
from wals_ooc.cli import main as cli_main
from wals_ooc.errors import CorruptStoreError, DataMismatchError, SettingError, StorageError, WalsError

from .conftest import run_python


@pytest.fixture(scope="module")
def model(small_store, tmp_path_factory):
    location = str(tmp_path_factory.mktemp("faults") / "model.zarr")
    return WALS(factors=8, iterations=2, random_state=3, threads=2).fit(small_store, location, progress=False)


def _flip(path: str, offset: int) -> None:
    data = bytearray(open(path, "rb").read())
    data[offset % len(data)] ^= 0x10
    with open(path, "wb") as handle:
        handle.write(data)


# --- the index: a full disk, damaged bytes --------------------------------------------------


def test_an_index_that_does_not_fit_on_the_disk_is_a_one_line_storage_error(model, tmp_path):
    """faiss's own writer turned a full disk into an internal RuntimeError; the file limit of a
    child process (EFBIG, as a full disk gives ENOSPC) must end as StorageError, nothing left."""
    pytest.importorskip("faiss")
    target = tmp_path / "small.ann"
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
from wals_ooc.cli import main
sys.exit(main(["index", {model.factors_store.location!r}, "--output", {str(target)!r}, "-q"]))
"""
    done = run_python(code)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wals-ooc index: error:"), done.stderr
    assert f"{target} was not written: File too large; nothing was changed" in lines[0]
    assert sorted(os.listdir(tmp_path)) == []  # no build, no lock, no index


def test_a_damaged_index_file_is_refused_naming_it_and_a_sound_one_answers(model, tmp_path):
    """index.faiss had no checksum: a flipped byte crashed faiss's reader (an internal error) or,
    in a stored row, changed answers silently. Its crc32 is recorded and checked on opening."""
    pytest.importorskip("faiss")
    from wals_ooc.index import forget_indexes

    location = str(tmp_path / "cos.ann")
    model.build_index(location=location, metric="cosine")
    item = model.interactions.ids("item")[:1]
    sound = model.similar_items(item, N=5, index=location)
    data = os.path.join(location, "index.faiss")
    original = open(data, "rb").read()
    for offset in (20, len(original) // 2, len(original) - 40):  # header, graph, stored rows
        forget_indexes()
        _flip(data, offset)
        with pytest.raises(CorruptStoreError, match=f"{location}: index.faiss is corrupt"):
            model.similar_items(item, N=5, index=location)
        with open(data, "wb") as handle:
            handle.write(original)
    forget_indexes()
    with open(data, "wb") as handle:
        handle.write(original[: len(original) // 3])  # truncated
    with pytest.raises(CorruptStoreError, match="index.faiss is corrupt"):
        model.similar_items(item, N=5, index=location)
    with open(data, "wb") as handle:
        handle.write(original)
    forget_indexes()
    again = model.similar_items(item, N=5, index=location)
    np.testing.assert_array_equal(sound[0], again[0])
    np.testing.assert_array_equal(sound[1], again[1])


def test_an_index_saved_without_a_checksum_still_opens_and_a_damaged_one_is_still_an_error(model, tmp_path):
    """Indexes written before the checksum have none in index.json: they open as before, and
    faiss's own complaint about damaged bytes becomes CorruptStoreError, not an internal error."""
    pytest.importorskip("faiss")
    from wals_ooc.index import forget_indexes

    location = str(tmp_path / "old.ann")
    model.build_index(location=location)
    meta_path = os.path.join(location, "index.json")
    meta = json.load(open(meta_path))
    meta.pop("checksum")
    json.dump(meta, open(meta_path, "w"))
    user = model.interactions.ids("user")[:1]
    forget_indexes()
    assert model.recommend(user, N=3, index=location)[0].shape == (1, 3)
    data = os.path.join(location, "index.faiss")
    original = open(data, "rb").read()
    with open(data, "wb") as handle:
        handle.write(original[: len(original) // 3])
    forget_indexes()
    with pytest.raises(CorruptStoreError, match="index.faiss is corrupt"):
        model.recommend(user, N=3, index=location)
