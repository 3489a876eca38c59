"""Whole chunks of rows written straight to their files in a local store, without Zarr's async
pipeline: the factor rows a half-sweep solves.

Zarr writes a chunk through its event-loop thread (encode with the bytes and crc32c codecs,
then a thread-pool hop to write a temporary file and rename it over the chunk). For the factor
rows of a half-sweep that cost 0.16-0.19 s of CPU per 184 MB (f = 128, 360k rows), and more
while the task threads ran beside it; the same bytes written here take 0.07 s: the chunk is the
rows' own buffer (zero padded past the last row, as Zarr pads an edge chunk) followed by its
crc32c, written over the chunk file in place with one ``pwritev`` (no new file, so no fresh
page-cache pages, and no rename).

In place, not atomically: a reader of a chunk while it is written could see a mix of old and
new rows. This is for arrays nobody reads while they are written: a factor slot a half-sweep
fills is never its checkpoint's (``train.factors``), and a killed run writes it again whole on
resuming. A chunk file with more than one link (a store copied with ``cp -l``) is replaced as
Zarr would (a new file renamed over it), so the other copy keeps its bytes.

Anything else (another codec chain, a chunk that does not span whole rows, a remote store, rows
that do not cover whole chunks) is left to Zarr: ``write_rows`` falls back to ``node[a:b] = rows``.
The bytes written are Zarr's own (checked in ``tests/test_chunk_files.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid

from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


class ChunkFiles:
    """The chunk files of an array chunked along its first axis only (a chunk spans every other
    axis: whole rows of a factor matrix, whole matrices of a stack of Grams), whose chunks are
    the bytes codec (little-endian, C order) then crc32c, in a local directory."""

    def __init__(self, directory: str, shape: tuple[int, ...], chunk_rows: int, dtype: np.dtype, fill_value, keys):
        self.directory = directory
        self.n_rows, self.row_shape = shape[0], tuple(shape[1:])
        self.chunk_rows = chunk_rows
        self.dtype = dtype
        self.fill_value = fill_value
        self._keys = keys  # chunk coordinates -> key (Zarr's chunk key encoding)

    def covers(self, start: int, stop: int) -> bool:
        """Whether rows ``[start, stop)`` are whole chunks (the last may end at the array's end)."""
        return (0 <= start < stop <= self.n_rows and start % self.chunk_rows == 0
                and (stop % self.chunk_rows == 0 or stop == self.n_rows))

    def write(self, start: int, stop: int, rows: np.ndarray) -> None:
        """Write rows ``[start, stop)`` (whole chunks: ``covers``), chunk by chunk."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype.newbyteorder("<"))
        if rows.shape != (stop - start, *self.row_shape):
            raise ValueError(f"rows of shape {rows.shape} for rows [{start}, {stop}) of shape {self.row_shape}")
        for lo in range(start, stop, self.chunk_rows):
            part = rows[lo - start : min(stop, lo + self.chunk_rows) - start]
            if len(part) < self.chunk_rows:  # the edge chunk: stored whole, padded with the fill value
                padded = np.full((self.chunk_rows, *self.row_shape), self.fill_value, dtype=part.dtype)
                padded[: len(part)] = part
                part = padded
            self._write_chunk(self._keys((lo // self.chunk_rows,) + (0,) * len(self.row_shape)), part)

    def _write_chunk(self, key: str, data: np.ndarray) -> None:
        import google_crc32c

        checksum = np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()
        path = os.path.join(self.directory, *key.split("/"))
        size = data.nbytes + len(checksum)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            if os.fstat(fd).st_nlink > 1:  # shared with another copy of the store: replace it
                os.close(fd)
                fd = -1
                temp = f"{path}.{uuid.uuid4().hex}.partial"
                try:
                    with open(temp, "wb") as handle:
                        handle.write(data.data.cast("B"))
                        handle.write(checksum)
                    os.replace(temp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temp)
                    raise
                return
            written = os.pwritev(fd, [data.data.cast("B"), checksum], 0)
            if written != size:  # a short write (a full disk): say so, as Zarr's write would
                raise OSError(f"{path}: wrote {written} of {size} bytes")
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)
        finally:
            if fd >= 0:
                os.close(fd)


def chunk_files(node) -> ChunkFiles | None:
    """The ``ChunkFiles`` of a Zarr array, or None when its chunks are not plain files of that
    layout in a local store open for writing (see the module docstring)."""
    import zarr
    from zarr.storage import LocalStore

    if not isinstance(node, zarr.Array):  # a wrapper (a test's) writes its own way
        return None
    try:
        meta: Any = node.metadata  # v3 metadata (checked below); v2 has no chunk key encoder of this kind
        described: dict[str, Any] = dict(meta.to_dict())
        store = node.store_path.store
        inner = getattr(store, "_store", store)  # under ``checked.ChecksumStore``
        if not isinstance(inner, LocalStore) or store.read_only or sys.byteorder != "little":
            return None
        shape, chunks = tuple(node.shape), tuple(node.chunks)
        if (described.get("zarr_format") != 3 or len(shape) < 2 or chunks[1:] != shape[1:]
                or list(described.get("codecs") or ()) != _CODECS or described.get("storage_transformers")
                or (described.get("chunk_grid") or {}).get("name") != "regular" or node.order != "C"):
            return None
        directory = os.path.join(str(inner.root), *[p for p in node.store_path.path.split("/") if p])
        return ChunkFiles(directory, tuple(int(n) for n in shape), int(chunks[0]), np.dtype(node.dtype),
                          meta.fill_value, meta.encode_chunk_key)
    except Exception:  # anything unexpected in Zarr's objects: leave the writes to Zarr
        return None


_checked: dict[str, bool] = {}  # an array's directory -> whether Zarr read our first write back


def write_rows(node, start: int, stop: int, rows: np.ndarray) -> None:
    """``node[start:stop] = rows``: straight to the chunk files when they are whole chunks of a
    layout ``ChunkFiles`` writes (for arrays nobody reads while they are written, see above),
    through Zarr otherwise.

    The first direct write to an array in a process is read back through Zarr: should a Zarr
    release store chunks under other names or bytes than the ones written here, the rows are
    written again through Zarr, and so is every later write to that array (nothing is read back
    stale in silence)."""
    files = chunk_files(node)
    if files is None or not files.covers(start, stop) or _checked.get(files.directory) is False:
        node[start:stop] = rows
        return
    files.write(start, stop, rows)
    if files.directory not in _checked:
        stop_check = min(stop, start + files.chunk_rows)
        same = np.array_equal(np.asarray(node[start:stop_check]), np.asarray(rows[: stop_check - start], dtype=files.dtype), equal_nan=True)
        _checked[files.directory] = same
        if not same:
            log.warning("%s: Zarr did not read back the chunk written to its file; writing through Zarr", files.directory)
            node[start:stop] = rows
