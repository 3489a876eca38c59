"""How a process's tasks reach the fixed side of the running half-sweep: held whole in memory
("resident"), or a local scratch copy read in blocks ("blocked").

The scratch copy is the fixed factor slot written once, decompressed, into an unlinked
temporary file (``TMPDIR``). The file is mapped whole (a private use of ``mmap`` that nothing
writes) and tasks read it one window at a time, the window's pages dropped from the mapping on
leaving it (``MADV_DONTNEED``), so the page cache serves every sweep after the first without a
copy, without decompression, and without counting more than the windows in use in the
process's RSS (measured: a sweep of 1 GB costs ~20 ms of CPU this way against ~0.4 s with
``os.preadv`` into a buffer). Being unlinked, the file vanishes when the process ends, however
it ends. In a local run the half-sweep before writes its solved rows into the next half-sweep's
copy as it goes (``forward_rows``), so only the first half-sweep copies from Zarr.

Each process keeps the fixed side of one half-sweep at a time: a task of the next half-sweep
drops the previous one before reading its own.

A scratch copy also lends its half-sweep's blocked tasks (one at a time per process) a
``workspace``: one anonymous mapping, reused by every task and released with the copy. A fresh
buffer per task would make the kernel zero and map its pages again every time (the compact
copy of a task's fixed rows is up to a few hundred MB); the workspace asks for transparent
huge pages (``MADV_HUGEPAGE``), which also cuts TLB misses when the solve gathers from it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np

from ..kernels.blocked import half_counts
from ..kernels.tile import half_rows, half_usable

log = logging.getLogger(__name__)

COPY_ROWS = 65536  # rows per write while making a scratch copy
DROP_MARGIN = 2 << 20  # bytes either side of a window also dropped from the mapping on leaving it (``window``)


def _write_all(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        moved = os.pwritev(fd, [buffer[done:]], offset + done)
        if moved <= 0:
            raise OSError(errno.EIO, f"short write of the fixed side's scratch copy at byte {offset + done}")
        done += moved


class ScratchCopy:
    """A factor slot copied into an unlinked local file, read back in row blocks.

    array: anything sliceable by rows into (rows, f) arrays (a Zarr array, or NumPy).
    directory: where the file is made (default: ``tempfile.gettempdir()``, i.e. TMPDIR).
    """

    def __init__(self, array: Any, directory: str | None = None, copy_rows: int = COPY_ROWS, threads: int = 1,
                 empty: bool = False):
        """Copy ``array`` into the file, ``copy_rows`` rows at a time by each of ``threads`` threads
        (``threads * copy_rows`` rows: all the memory it takes). ``empty``: copy nothing (``array``
        gives only the shape and dtype; ``write_rows`` fills the file)."""
        self.n_rows, self.factors = (int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.row_bytes = self.factors * self.dtype.itemsize
        self._workspace: mmap.mmap | None = None
        self._whole: mmap.mmap | None = None
        self._map_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self.half_counts = (0, 0)  # (overflows, tiny) of the rows copied (``half_usable``)
        where = directory or tempfile.gettempdir()
        self._file = tempfile.TemporaryFile(prefix="wals-ooc-fixed-", dir=where)
        fd = self._file.fileno()
        if empty:
            return

        def copy(lo: int) -> None:
            rows = np.ascontiguousarray(array[lo : lo + copy_rows], dtype=self.dtype)
            _write_all(fd, memoryview(rows.data).cast("B"), lo * self.row_bytes)
            self.count_half(rows)

        try:
            starts = range(0, self.n_rows, copy_rows)
            if threads > 1 and len(starts) > 1:  # reads and writes release the GIL: the threads overlap
                with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wals-ooc-copy") as pool:
                    list(pool.map(copy, starts))
            else:
                for lo in starts:
                    copy(lo)
        except OSError as exc:
            self._file.close()
            raise OSError(exc.errno, f"cannot write the fixed side's scratch copy ({self.nbytes} bytes) in {where}: "
                                     f"{exc.strerror}; point TMPDIR at a local disk with room") from exc

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` as rows ``[start, start + len(rows))`` of the copy."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        _write_all(self._file.fileno(), memoryview(rows.data).cast("B"), start * self.row_bytes)

    def count_half(self, rows: np.ndarray) -> tuple[int, int]:
        """Add ``rows``' values beyond float16's range and below its smallest normal to the copy's
        counts (float32 copies only; ``kernels.blocked.half_counts``); returns the rows' own."""
        if self.dtype != np.float32 or not len(rows):
            return (0, 0)
        counts = half_counts(rows)
        with self._counts_lock:
            self.half_counts = (self.half_counts[0] + int(counts[0]), self.half_counts[1] + int(counts[1]))
        return int(counts[0]), int(counts[1])

    def half_usable(self) -> bool:
        """Whether CG may gather this side's rows as float16: the test ``half_copy`` applies to a
        resident side (``tile.half_usable``), on the counts of every row written."""
        return self.dtype == np.float32 and half_usable(*self.half_counts, self.n_rows * self.factors)

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_bytes

    def workspace(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised array of ``shape`` over this copy's reusable workspace (grown when too
        small). Valid until the next call or ``close``; for one task at a time."""
        return self.workspaces((shape, dtype))[0]

    def workspaces(self, *specs: tuple[tuple[int, ...], Any]) -> list[np.ndarray]:
        """Uninitialised arrays of the given (shape, dtype)s, one after another (each from a page
        boundary) over this copy's reusable workspace, as ``workspace``."""
        offsets, needed = [], 0
        for shape, dtype in specs:
            offsets.append(needed)
            needed += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // mmap.PAGESIZE) * mmap.PAGESIZE
        needed = max(1, needed)
        if self._workspace is None or len(self._workspace) < needed:
            self._drop_workspace()  # before mapping the larger one: never both at once
            self._workspace = mmap.mmap(-1, needed, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                self._workspace.madvise(mmap.MADV_HUGEPAGE)
        return [np.frombuffer(self._workspace, dtype, int(np.prod(shape)), at).reshape(shape)
                for (shape, dtype), at in zip(specs, offsets)]

    def _drop_workspace(self) -> None:
        if self._workspace is not None:
            try:
                self._workspace.close()
            except BufferError:  # an array over it is still referenced: freed when that is collected
                pass
            self._workspace = None

    @contextlib.contextmanager
    def window(self, lo: int, hi: int) -> Iterator[np.ndarray]:
        """Rows ``[lo, hi)`` as a (hi - lo, f) array mapped from the file, valid inside the block.

        The whole file is mapped once (``_mapping``) and each window's pages are dropped from the
        mapping on leaving (``MADV_DONTNEED``: the page tables only; the page cache keeps them),
        so the RSS counts the windows in use and nothing more. A mapping and an unmapping a window
        cost more, each taking the process's memory map for writing (and stopping the page faults
        of the other threads' windows) while the tasks' threads sweep their windows at once.

        The mapping is private and writable only so that NumPy and numba see an ordinary array:
        nothing writes to it (a write would copy the page, never reach the file).
        """
        start, stop = lo * self.row_bytes, hi * self.row_bytes
        whole = self._mapping()
        try:
            yield np.frombuffer(whole, self.dtype, (hi - lo) * self.factors, start).reshape(hi - lo, self.factors)
        finally:
            # with DROP_MARGIN either side: a fault maps the pages around it that the page cache holds
            # (fault-around, whole large folios), also outside the window; a neighbour's page in use is
            # mapped again at its next touch
            first = max(0, start - DROP_MARGIN)
            first -= first % mmap.PAGESIZE
            last = min(len(whole), stop + DROP_MARGIN)
            if last > first:
                whole.madvise(mmap.MADV_DONTNEED, first, last - first)

    def _mapping(self) -> mmap.mmap:
        """The whole file, mapped private (made at the first window; the file is complete by then)."""
        with self._map_lock:
            if self._whole is None:
                self._whole = mmap.mmap(self._file.fileno(), max(1, self.nbytes), flags=mmap.MAP_PRIVATE,
                                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
            return self._whole

    def close(self) -> None:
        self._drop_workspace()
        if self._whole is not None:
            try:
                self._whole.close()
            except BufferError:  # a caller still holds a window (an exception's traceback): unmapped when collected
                pass
            self._whole = None
        self._file.close()


def held_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array in an anonymous mapping of its own that asks for transparent huge
    pages (``MADV_HUGEPAGE``), for a factor side held whole: the kernels gather its rows at random,
    and 2 MiB pages cut the TLB misses of those gathers (measured on the item half-sweep's kernel:
    0.92x the time a row at f = 128, 0.99x at f = 64). Unmapped when the array is collected."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    mapping = mmap.mmap(-1, max(1, count * dtype.itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(mapping, dtype, count).reshape(shape)


_lock = threading.RLock()
_held: dict[tuple, Any] = {}
_previous: dict[tuple, ScratchCopy] = {}  # the scratch copy of the half-sweep before (see ``previous_copy``)
_forwarded: dict[tuple, tuple[ScratchCopy, dict[tuple[int, int], tuple[int, int]]]] = {}  # see ``forward_rows``
_forward_failed: set[tuple] = set()
_halves: dict[tuple, np.ndarray | None] = {}  # see ``half_copy``
_bases: dict[tuple, "Eigenbasis"] = {}  # see ``eigenbasis``


def forward_rows(key: tuple, shape: tuple[int, int], dtype: Any, start: int, rows: np.ndarray) -> None:
    """Write a task's solved rows ``[start, start + len(rows))`` into the scratch copy that the
    half-sweep of ``key`` will take as its fixed side (``fixed_side``), so that half-sweep does not
    copy the side again from Zarr (read, decode and write 1.6 GB for the users of a 337M store,
    inside the blocked slot). Used only when every task of the half-sweep runs in this process: the
    copy is taken only when its tasks' row ranges cover every row. A write the disk refuses drops
    the copy (the next half-sweep copies from Zarr, as without it)."""
    with _lock:
        if key in _forward_failed:
            return
        entry = _forwarded.get(key)
        if entry is None:
            try:
                entry = _forwarded[key] = (ScratchCopy(_Shape(shape, dtype), empty=True), {})
            except OSError as exc:
                log.info("no forwarded scratch copy (%s): the next half-sweep copies its fixed side from Zarr", exc)
                _forward_failed.add(key)
                return
    copy, written = entry
    try:
        copy.write_rows(start, rows)
        counts = half_counts(rows) if copy.dtype == np.float32 and len(rows) else (0, 0)
    except OSError as exc:
        log.info("forwarded scratch copy dropped (%s): the next half-sweep copies its fixed side from Zarr", exc)
        with _lock:
            if _forwarded.pop(key, None) is not None:
                copy.close()
            _forward_failed.add(key)
        return
    with _lock:  # a task run again writes its range again: counted once
        written[(int(start), int(start) + len(rows))] = (int(counts[0]), int(counts[1]))


class _Shape:
    """The shape and dtype of a scratch copy that ``write_rows`` fills (``ScratchCopy(..., empty=True)``)."""

    def __init__(self, shape: tuple[int, int], dtype: Any):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)


def _take_forwarded(key: tuple) -> ScratchCopy | None:
    """The forwarded copy for ``key`` if its rows were all written (others are deleted); under ``_lock``."""
    entry = _forwarded.pop(key, None)
    for copy, _ in _forwarded.values():
        copy.close()
    _forwarded.clear()
    _forward_failed.clear()
    if entry is None:
        return None
    copy, written = entry
    if sum(b - a for a, b in written) == copy.n_rows:  # tasks' row ranges never overlap: every row written
        copy.half_counts = (sum(c[0] for c in written.values()), sum(c[1] for c in written.values()))
        return copy
    copy.close()
    return None


def fixed_side(key: tuple, make: Callable[[], Any]) -> tuple[Any, bool]:
    """This process's fixed side for ``key`` (made by ``make()`` on first use, after dropping any
    other); and whether this call made it. Threads asking for the same key wait for one copy.

    A scratch copy dropped this way is kept, without its workspace, as the previous one: it holds
    the rows the next half-sweep starts from (``previous_copy``); the one before it is deleted."""
    with _lock:
        if key in _held:
            return _held[key], False
        kept = {k: held for k, held in _held.items() if isinstance(held, ScratchCopy)}
        _held.clear()
        _release_previous()
        for held in kept.values():
            held._drop_workspace()  # file-backed only from now on: nothing of it in the RSS
        _previous.update(kept)
        forwarded = _take_forwarded(key)
        _held[key] = forwarded if forwarded is not None else make()
        return _held[key], True


def half_copy(key: tuple, fixed: np.ndarray) -> np.ndarray | None:
    """The float16 bits (uint16) of ``fixed``, the resident fixed side of ``key``, made once by the
    first task that asks (``kernels.tile.half_rows``: ~16 ms for 46M values) and dropped with the
    fixed side or by the next key's copy: CG's warm-start pass gathers its random rows from it,
    half the bytes. None (float32 gathers) when float16 cannot carry the side: a value beyond its
    range, or most values below its smallest normal (``tile.half_usable``)."""
    with _lock:
        if key not in _halves:
            _halves.clear()
            held = held_array(fixed.shape, np.uint16)
            overflows, tiny = half_rows(fixed, held, 0, fixed.shape[0])
            _halves[key] = held if half_usable(overflows, tiny, fixed.size) else None
        return _halves[key]


def previous_copy(key: tuple) -> ScratchCopy | None:
    """The scratch copy made for ``key`` when it was the half-sweep before the running one (or
    the running one's), if this process still holds it: a side's rows solved two half-sweeps ago
    are the next half-sweep's starting rows, and its scratch copy holds them undecoded."""
    with _lock:
        held = _previous.get(key, _held.get(key))
        return held if isinstance(held, ScratchCopy) else None


def _release_previous() -> None:
    for held in _previous.values():
        held.close()
    _previous.clear()


def release_fixed_side() -> None:
    """Drop the fixed sides this process holds (closing a scratch copy deletes it)."""
    with _lock:
        for held in _held.values():
            if isinstance(held, ScratchCopy):
                held.close()
        _held.clear()
        _halves.clear()
        _bases.clear()
        _rotation_buffer.clear()
        _release_previous()
        _take_forwarded(())


ROTATED_ROWS = 2048  # rows of the fixed side rotated at a time (``Eigenbasis.rotated``): fixed cuts, so the same bits


class Eigenbasis:
    """The eigenbasis of a half-sweep's fixed-side Gram G = Q diag(lam) Q^T (float64 ``eigh``,
    eigenvalues below 0 by rounding taken as 0, leading directions first), for iALS++ solved in
    it: with the fixed rows Y Q and the rows X Q, G is diag(lam), so the Gram part of a block
    step costs b a row instead of f b (``kernels.subspace``, ``diagonal``); the objective is the
    same (a rotation keeps every score and norm), the solved rows go back as X Q^T.

    basis: Q (f x f) and diagonal: diag(lam) (f x f), both in the factors' dtype.
    ``rotated(fixed)`` is Y Q, made once (``ROTATED_ROWS`` rows at a time, taken by every thread
    that asks while it is made: the threads of a half-sweep share the GEMM rather than wait).
    """

    def __init__(self, gram: np.ndarray):
        lam, vectors = np.linalg.eigh(np.asarray(gram, dtype=np.float64))
        dtype = np.asarray(gram).dtype
        self.basis = np.ascontiguousarray(vectors[:, ::-1], dtype=dtype)
        self.diagonal = np.diag(np.maximum(lam[::-1], 0.0)).astype(dtype)
        self._rows: np.ndarray | None = None
        self._taken = 0
        self._done = 0
        self._failed: BaseException | None = None
        self._cond = threading.Condition()

    def rotated(self, fixed: np.ndarray) -> np.ndarray:
        """Y Q for the resident fixed side Y (an array of its own, as big as Y: the plan counts it)."""
        with self._cond:
            if self._rows is None:
                self._rows = _rotation_rows(fixed.shape, self.basis.dtype)
        rows = self._rows
        pieces = -(-fixed.shape[0] // ROTATED_ROWS)
        while True:
            with self._cond:
                k = self._taken
                self._taken += 1
            if k >= pieces:
                break
            lo, hi = k * ROTATED_ROWS, min(fixed.shape[0], (k + 1) * ROTATED_ROWS)
            try:
                np.dot(fixed[lo:hi], self.basis, out=rows[lo:hi])
            except BaseException as exc:  # the other threads must not wait for it
                with self._cond:
                    self._failed = exc
                    self._cond.notify_all()
                raise
            with self._cond:
                self._done += 1
                self._cond.notify_all()
        with self._cond:
            while self._done < pieces and self._failed is None:
                self._cond.wait()
            if self._failed is not None:
                raise RuntimeError("rotating the fixed side into its eigenbasis failed in another thread") from self._failed
        return rows

    def rotate_in(self, X: np.ndarray) -> np.ndarray:
        """X Q, a new array (a task's rows, a row block at a time)."""
        return np.dot(X, self.basis)

    def rotate_out(self, rotated: np.ndarray, X: np.ndarray) -> None:
        """X = rotated Q^T, in place (X C-contiguous)."""
        np.dot(rotated, self.basis.T, out=X)


_rotation_buffer: list[np.ndarray] = []  # the largest rotated side so far, reused (``_rotation_rows``)


def _rotation_rows(shape: tuple[int, int], dtype: Any) -> np.ndarray:
    """Room for a rotated fixed side: the buffer of the half-sweeps before when it is large enough
    (the sides alternate: the larger one's buffer serves both, so its pages are not mapped and
    zeroed again every half-sweep), else a new one that replaces it."""
    count = shape[0] * shape[1]
    with _lock:
        if not _rotation_buffer or _rotation_buffer[0].dtype != np.dtype(dtype) or _rotation_buffer[0].size < count:
            _rotation_buffer[:] = [held_array((count,), dtype)]
        return _rotation_buffer[0][:count].reshape(shape)


def eigenbasis(key: tuple, gram: np.ndarray) -> Eigenbasis:
    """The half-sweep ``key``'s ``Eigenbasis`` of its fixed-side Gram, made by the first task that
    asks (one ``eigh``: ~30-60 ms at f = 512) and dropped with the fixed side or by the next key's."""
    with _lock:
        if key not in _bases:
            _bases.clear()
            _bases[key] = Eigenbasis(gram)
        return _bases[key]
