"""A local raw copy of a side's CSR rows for the blocked plan: each task reads its rows from Zarr
once, in the first iteration, and from this copy after that.

Reading a blocked task's rows through Zarr costs ~15-20 ms of CPU whatever its size (three
arrays opened, three reads through Zarr's event loop and its thread pool, each decoding whole
chunks; measured on the 30M store: 4 ms a read, 3.5 ms to open the arrays), and a blocked plan
has hundreds of tasks a half-sweep: on the 30M store at 400 MB half of the process's CPU went to
Zarr's threads. The resident plan caches the rows in memory; the blocked plan has no memory to
spare, but a local disk does: the rows go, undecoded, into an unlinked temporary file
(``TMPDIR``, as the fixed side's scratch copy), and a task reads them back with ``preadv`` (the
page cache serves them; no decoding; nothing counted in the RSS but the task's own arrays).

The file holds, for rows ``[0, n_rows)``: the global row pointers (int64), then the column
indices (int32) and values (float32) of every entry, each at its global position. A row range is
read back only after a task wrote it (``filled``): the plan's tasks are the same every
half-sweep of a side, so the second iteration on finds every range. The rows were checked when
read from Zarr (``InteractionStore.rows``) and the file is this process's own, unlinked.

The copy is an optimisation: when the disk refuses a write (full), the copy is dropped for the
run and tasks read from Zarr as before.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import threading
from typing import BinaryIO

import numpy as np

from ..store.reader import CSRShard, InteractionStore

log = logging.getLogger(__name__)


def _move_all(move, fd: int, buffer: memoryview, offset: int, what: str) -> None:
    """Run ``os.pwritev`` or ``os.preadv`` (``move``) until all of ``buffer`` has moved."""
    done = 0
    while done < len(buffer):
        moved = move(fd, [buffer[done:]], offset + done)
        if moved <= 0:
            raise OSError(errno.EIO, f"short {what} of the local copy of the entries")
        done += moved


def _write_all(fd: int, data: np.ndarray, offset: int) -> None:
    _move_all(os.pwritev, fd, memoryview(np.ascontiguousarray(data).data).cast("B"), offset, "write")


def _read_into(fd: int, out: np.ndarray, offset: int) -> None:
    _move_all(os.preadv, fd, memoryview(out.data).cast("B"), offset, "read")


ROOM_LEFT = 4 << 30  # free bytes an entry copy must leave on its disk


def has_room(nbytes: int, free: int) -> bool:
    """Whether a copy of ``nbytes`` fits in ``free`` bytes of disk, taking at most half of it and
    leaving at least ``ROOM_LEFT``."""
    return nbytes <= free // 2 and free - nbytes >= ROOM_LEFT


class EntryCache:
    """The CSR rows of one side of an interaction store, copied into a local unlinked file as
    tasks read them (``rows``)."""

    def __init__(self, n_rows: int, nnz: int, directory: str | None = None, free_bytes: int | None = None):
        self.n_rows, self.nnz = int(n_rows), int(nnz)
        self._indices_at = (self.n_rows + 1) * 8
        self._values_at = self._indices_at + self.nnz * 4
        self.nbytes = self._values_at + self.nnz * 4
        self._lock = threading.Lock()
        self.filled: dict[tuple[int, int], int] = {}  # row range -> its first entry's global position
        self.broken = False  # a write failed, or the disk has no room: read from Zarr from now on
        where = directory or tempfile.gettempdir()
        free = shutil.disk_usage(where).free if free_bytes is None else int(free_bytes)
        if not has_room(self.nbytes, free):
            # The copy only saves CPU; the model's own writes and the fixed side's scratch copy need
            # the disk more. Never start one that could fill it.
            log.info("no local copy of the entries: %d bytes would leave too little of %d free in %s", self.nbytes, free, where)
            self.broken = True
            self._file: BinaryIO = open(os.devnull, "rb")
            return
        self._file = tempfile.TemporaryFile(prefix="wals-ooc-entries-", dir=where)

    def rows(self, store: InteractionStore, side: str, start: int, stop: int) -> CSRShard:
        """CSR rows ``[start, stop)`` of ``side``: from the copy when a task wrote them before,
        else from ``store`` (and written to the copy)."""
        with self._lock:
            first = None if self.broken else self.filled.get((start, stop))
        if first is not None:
            return self._read(start, stop, first)
        shard = store.rows(side, start, stop)
        if not self.broken:
            self._write(shard)
        return shard

    def _read(self, start: int, stop: int, first: int) -> CSRShard:
        fd = self._file.fileno()
        indptr = np.empty(stop - start + 1, np.int64)
        _read_into(fd, indptr, start * 8)
        indptr -= first
        nnz = int(indptr[-1])
        indices = np.empty(nnz, np.int32)
        values = np.empty(nnz, np.float32)
        _read_into(fd, indices, self._indices_at + first * 4)
        _read_into(fd, values, self._values_at + first * 4)
        return CSRShard(start, stop, indptr, indices, values, None, first)

    def _write(self, shard: CSRShard) -> None:
        fd = self._file.fileno()
        first = shard.entry_start
        try:
            _write_all(fd, shard.indptr + first, shard.row_start * 8)
            _write_all(fd, shard.indices.astype(np.int32, copy=False), self._indices_at + first * 4)
            _write_all(fd, shard.values.astype(np.float32, copy=False), self._values_at + first * 4)
        except OSError as exc:
            with self._lock:
                if not self.broken:
                    log.warning("local copy of the entries dropped (%s): tasks read their rows from the store", exc)
                self.broken = True
            return
        with self._lock:
            self.filled[(shard.row_start, shard.row_stop)] = first

    def close(self) -> None:
        self._file.close()


_lock = threading.Lock()
_caches: dict[tuple[str, str], EntryCache] = {}


def entry_cache(store: InteractionStore, side: str) -> EntryCache:
    """This process's entry cache for ``side`` of ``store`` (made on first use; a cache of
    another store is dropped first)."""
    key = (store.location, side)
    with _lock:
        cache = _caches.get(key)
        if cache is None:
            for other in [k for k in _caches if k[0] != store.location]:
                _caches.pop(other).close()
            cache = _caches[key] = EntryCache(store.n_rows(side), store.nnz)
        return cache


def release_entry_caches() -> None:
    """Drop every entry cache of this process (closing one deletes its file)."""
    with _lock:
        for cache in _caches.values():
            cache.close()
        _caches.clear()
