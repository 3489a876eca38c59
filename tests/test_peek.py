"""`wals-ooc info` reads local stores without zarr (``store.peek``): the same answers as zarr, the
same checks of every chunk, and zarr for whatever it does not read."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import wals_ooc
from wals_ooc.cli import _info, main
from wals_ooc.errors import CorruptStoreError
from wals_ooc.store import format as fmt
from wals_ooc.store import peek

PLAYS = "user,item,plays\n" + "".join(
    f"user-{u:03d}-ü,item-{i},{1 + (u + i) % 4}\n" for u in range(40) for i in range(25) if (u * i) % 3 != 1)
NAMES = "id,name\n" + "".join(f"user-{u:03d}-ü,Ñame {u}\n" for u in range(0, 40, 2))
ITEMS = "id\tname\n" + "".join(f"item-{i}\tSong \"{i}\"\n" for i in range(25))


@pytest.fixture(scope="module")
def named_store(tmp_path_factory):
    """Text ids on both sides, user and item names."""
    root = tmp_path_factory.mktemp("peek")
    for name, text in (("plays.csv", PLAYS), ("users.csv", NAMES), ("items.tsv", ITEMS)):
        (root / name).write_text(text)
    store = str(root / "s.zarr")
    wals_ooc.convert(str(root / "plays.csv"), store, user_names=str(root / "users.csv"),
                     item_names=str(root / "items.tsv"), progress=False)
    return root, store


def _lines(location: str, opener, top: int = 5) -> list[str]:
    lines: list[str] = []
    assert _info(location, top, lines.append, opener) == 0
    return lines


def test_info_reads_the_same_without_zarr(named_store, capsys):
    root, store = named_store
    read = _lines(store, peek.open_group, top=7)
    assert read == _lines(store, fmt.open_group, top=7)  # zarr's answer, line by line
    assert "user names  20 of 40 users named" in read and "item names  25 of 25 items named" in read
    assert "'Ñame" in next(line for line in read if line.startswith("top users"))
    assert _lines(f"file://{store}", peek.open_group)[1:] == _lines(store, fmt.open_group)[1:]
    assert main(["info", store]) == 0 and capsys.readouterr().out.splitlines() == _lines(store, fmt.open_group)


def test_peek_arrays_match_zarr(tmp_path):
    """Slices across chunks, coordinates, an unwritten chunk (fill value), 1-byte and 8-byte types."""
    import zarr

    group = fmt.open_group(str(tmp_path / "a.zarr"), "w")
    data = np.arange(-20, 30, dtype=np.int64) * 3
    fmt.create_array(group, "x", data=data, chunks=(7,), compressors=zarr.codecs.BloscCodec(cname="lz4"), dense=True)
    sparse = fmt.create_array(group, "y", shape=(40,), dtype=np.float32, chunks=(8,), fill_value=1.5)
    sparse[10:14] = [1, 2, 3, 4]
    fmt.create_array(group, "z", data=np.frombuffer(b"hello world", np.uint8), chunks=(4,))
    seen = peek.open_group(str(tmp_path / "a.zarr"))
    for name in ("x", "y", "z"):
        ours, theirs = seen[name], group[name]
        assert (ours.shape, ours.dtype, ours.chunks) == (theirs.shape, theirs.dtype, theirs.chunks)
        for key in (slice(None), slice(3, 16), slice(6, 7), slice(5, 2), slice(-9, None), Ellipsis, 2, -1):
            np.testing.assert_array_equal(ours[key], theirs[key])
        at = np.array([9, 0, 3, 9, len(ours) - 1])
        np.testing.assert_array_equal(ours.get_coordinate_selection(at), theirs.get_coordinate_selection(at))
    assert "x" in seen and "nothing" not in seen


def test_peek_checks_every_chunk_as_zarr_does(named_store, tmp_path, capsys):
    _, store = named_store
    names = os.path.join(store, "user_ids", json.load(open(os.path.join(store, "user_ids", "zarr.json")))
                         ["attributes"]["names"], "bytes", "c", "0")
    damaged = tmp_path / "damaged.zarr"
    for change in ("flip", "drop"):
        shutil.copytree(store, damaged)
        chunk = damaged / os.path.relpath(names, store)
        if change == "flip":
            raw = bytearray(chunk.read_bytes())
            raw[len(raw) // 2] ^= 1
            chunk.write_bytes(bytes(raw))
        else:
            chunk.unlink()
        errors = []
        for opener in (peek.open_group, fmt.open_group):
            with pytest.raises(CorruptStoreError) as caught:
                _lines(str(damaged), opener)
            errors.append(str(caught.value))
        assert errors[0] == errors[1] and "of array user_ids/names-0/bytes is " in errors[0]
        assert ("checksum mismatch" if change == "flip" else "is missing") in errors[0]
        assert main(["info", str(damaged)]) == 2
        out, err = capsys.readouterr()
        assert err.strip() == f"wals-ooc info: error: {errors[0]}" and out.startswith(f"store       {damaged}\n")
        shutil.rmtree(damaged)
    shutil.copytree(store, damaged)
    (damaged / "by_item" / "indptr" / "zarr.json").write_text("{not json")
    assert main(["info", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert f"{damaged}: the metadata of by_item/indptr (by_item/indptr/zarr.json) is corrupt" in err


def test_what_peek_does_not_read_is_read_with_zarr(tmp_path, capsys):
    import zarr

    group = fmt.open_group(str(tmp_path / "g.zarr"), "w")
    group.attrs.update({"kind": "wals-ooc/other", "format_version": 3, "complete": True})
    group.create_array("gz", data=np.arange(10), compressors=zarr.codecs.GzipCodec())
    with pytest.raises(peek.Unsupported):
        peek.open_group(str(tmp_path / "g.zarr"))["gz"]
    assert main(["info", str(tmp_path / "g.zarr")]) == 0
    assert "kind        wals-ooc/other (format version 3, complete)" in capsys.readouterr().out
    array = zarr.create_array(str(tmp_path / "array.zarr"), shape=(3,), dtype="int8")
    array[:] = 1
    with pytest.raises(peek.Unsupported):  # a root that is an array: zarr says what is wrong
        peek.open_group(str(tmp_path / "array.zarr"))
    assert main(["info", str(tmp_path / "array.zarr")]) == 2
    assert "not a wals-ooc store" in capsys.readouterr().err
    with pytest.raises(peek.Unsupported):
        peek.open_group("memory://somewhere")
