"""Factor rows written straight to the chunk files (``store.chunk_files``) are Zarr's own bytes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from wals_ooc.store.chunk_files import chunk_files, write_rows
from wals_ooc.store.format import array, create_array, open_group, writing_every_chunk


def _slot(location, name="x", shape=(200, 8), chunks=(64, 8), dtype=np.float32, **kwargs):
    group = zarr.open_group(str(location), mode="a")
    create_array(group, name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0, **kwargs)
    return writing_every_chunk(array(open_group(str(location), "r+"), name))


def _files(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name != "zarr.json":
                path = os.path.join(folder, name)
                found[os.path.relpath(path, root)] = open(path, "rb").read()
    return found


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_whole_chunks_are_zarr_s_bytes_and_read_back_checked(tmp_path, dtype):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((200, 8)).astype(dtype)
    direct, through = _slot(tmp_path / "a.zarr", dtype=dtype), _slot(tmp_path / "b.zarr", dtype=dtype)
    assert chunk_files(direct) is not None
    for a, b in [(0, 128), (128, 200)]:  # the last chunk ends at the array's end: padded like Zarr's
        write_rows(direct, a, b, rows[a:b])
        through[a:b] = rows[a:b]
    ours, zarrs = _files(tmp_path / "a.zarr" / "x"), _files(tmp_path / "b.zarr" / "x")
    assert sorted(ours) == sorted(zarrs) and len(ours) == 4
    assert all(ours[key] == zarrs[key] for key in ours)
    again = rng.standard_normal((200, 8)).astype(dtype)  # over existing files, in place
    write_rows(direct, 0, 200, again)
    assert np.array_equal(array(open_group(str(tmp_path / "a.zarr"), "r"), "x")[:], again)


def test_a_stack_of_grams_is_written_a_matrix_a_chunk(tmp_path):
    grams = np.random.default_rng(1).standard_normal((2, 8, 8))
    direct = _slot(tmp_path / "a.zarr", shape=(2, 8, 8), chunks=(1, 8, 8), dtype=np.float64)
    through = _slot(tmp_path / "b.zarr", shape=(2, 8, 8), chunks=(1, 8, 8), dtype=np.float64)
    assert chunk_files(direct) is not None
    for slot in (1, 0):
        write_rows(direct, slot, slot + 1, grams[slot][None])
        through[slot] = grams[slot]
    ours, zarrs = _files(tmp_path / "a.zarr" / "x"), _files(tmp_path / "b.zarr" / "x")
    assert sorted(ours) == sorted(zarrs) == [os.path.join("c", str(k), "0", "0") for k in (0, 1)]
    assert all(ours[key] == zarrs[key] for key in ours)
    assert np.array_equal(array(open_group(str(tmp_path / "a.zarr"), "r"), "x")[:], grams)


def test_other_writes_go_through_zarr(tmp_path):
    rows = np.arange(200 * 8, dtype=np.float32).reshape(200, 8)
    direct = _slot(tmp_path / "a.zarr")
    write_rows(direct, 0, 200, rows)
    write_rows(direct, 10, 70, -rows[10:70])  # not whole chunks: Zarr's read-modify-write
    expected = rows.copy()
    expected[10:70] *= -1
    assert np.array_equal(direct[:], expected)
    assert chunk_files(_slot(tmp_path / "c.zarr", chunks=(64, 4))) is None  # a chunk spans only some columns
    assert chunk_files(_slot(tmp_path / "d.zarr", compressors=zarr.codecs.BloscCodec())) is None  # another codec chain
    memory = _slot("memory://chunk-files-test")
    assert chunk_files(memory) is None
    write_rows(memory, 0, 200, rows)
    assert np.array_equal(memory[:], rows)


def test_a_chunk_file_linked_from_another_copy_is_replaced_not_changed(tmp_path):
    rows = np.ones((200, 8), np.float32)
    direct = _slot(tmp_path / "a.zarr")
    write_rows(direct, 0, 200, rows)
    chunk = tmp_path / "a.zarr" / "x" / "c" / "0" / "0"
    before = chunk.read_bytes()
    os.link(chunk, tmp_path / "copy")
    write_rows(direct, 0, 64, 2 * rows[:64])
    assert (tmp_path / "copy").read_bytes() == before and chunk.read_bytes() != before
    assert np.array_equal(direct[:64], 2 * rows[:64]) and os.stat(chunk).st_nlink == 1


def test_chunks_zarr_does_not_read_back_make_every_write_go_through_zarr(tmp_path, monkeypatch):
    """Should a Zarr release name or encode chunk files otherwise than ``ChunkFiles`` writes them,
    the first write's read-back sees it: the rows are written through Zarr, and so are later ones."""
    import wals_ooc.store.chunk_files as module

    node = _slot(tmp_path / "a.zarr")
    right = chunk_files(node)
    misnamed = module.ChunkFiles(right.directory, (200, 8), 64, np.dtype(np.float32), 0, lambda coords: f"elsewhere/{coords[0]}")
    monkeypatch.setattr(module, "chunk_files", lambda _: misnamed)
    monkeypatch.setattr(module, "_checked", {})
    rows = np.random.default_rng(2).standard_normal((200, 8)).astype(np.float32)
    write_rows(node, 0, 128, rows[:128])
    assert module._checked == {right.directory: False}
    write_rows(node, 128, 200, rows[128:])
    assert np.array_equal(array(open_group(str(tmp_path / "a.zarr"), "r"), "x")[:], rows)
    assert sorted(os.listdir(os.path.join(right.directory, "elsewhere"))) == ["0", "1"]  # only the checked write (2 chunks) went astray
