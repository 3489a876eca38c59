"""How a process's tasks reach the fixed side of the running half-sweep: held whole in memory
("resident"), or a local scratch copy read in blocks ("blocked").

The scratch copy is the fixed factor slot written once, decompressed, into an unlinked
temporary file (``TMPDIR``), and read with positioned reads (``os.preadv``) into one block
buffer a task reuses. Repeated reads are served by the page cache, which does not count in the
process's RSS and needs no decompression; on data larger than RAM the disk serves them as long
sequential reads. Being unlinked, the file vanishes when the process ends, however it ends.

Each process keeps the fixed side of one half-sweep at a time: a task of the next half-sweep
drops the previous one before reading its own.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from typing import Any, Callable

import numpy as np

COPY_ROWS = 65536  # rows per write while making a scratch copy


def _positioned(call: Callable[[int, list, int], int], fd: int, buffer: memoryview, offset: int, what: str) -> None:
    done = 0
    while done < len(buffer):
        moved = call(fd, [buffer[done:]], offset + done)
        if moved <= 0:
            raise OSError(errno.EIO, f"short {what} of the fixed side's scratch copy at byte {offset + done}")
        done += moved


class ScratchCopy:
    """A factor slot copied into an unlinked local file, read back in row blocks.

    array: anything sliceable by rows into (rows, f) arrays (a Zarr array, or NumPy).
    directory: where the file is made (default: ``tempfile.gettempdir()``, i.e. TMPDIR).
    """

    def __init__(self, array: Any, directory: str | None = None, copy_rows: int = COPY_ROWS):
        self.n_rows, self.factors = (int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.row_bytes = self.factors * self.dtype.itemsize
        where = directory or tempfile.gettempdir()
        self._file = tempfile.TemporaryFile(prefix="wals-ooc-fixed-", dir=where)
        try:
            for lo in range(0, self.n_rows, copy_rows):
                rows = np.ascontiguousarray(array[lo : lo + copy_rows], dtype=self.dtype)
                _positioned(os.pwritev, self._file.fileno(), memoryview(rows).cast("B"), lo * self.row_bytes, "write")
        except OSError as exc:
            self._file.close()
            raise OSError(exc.errno, f"cannot write the fixed side's scratch copy ({self.nbytes} bytes) in {where}: "
                                     f"{exc.strerror}; point TMPDIR at a local disk with room") from exc

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_bytes

    def read(self, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
        """Rows ``[lo, hi)`` into the first ``hi - lo`` rows of ``out`` (C-contiguous); returns that view."""
        view = out[: hi - lo]
        _positioned(os.preadv, self._file.fileno(), memoryview(view).cast("B"), lo * self.row_bytes, "read")
        return view

    def close(self) -> None:
        self._file.close()


_lock = threading.RLock()
_held: dict[tuple, Any] = {}


def fixed_side(key: tuple, make: Callable[[], Any]) -> tuple[Any, bool]:
    """This process's fixed side for ``key`` (made by ``make()`` on first use, after dropping any
    other); and whether this call made it. Threads asking for the same key wait for one copy."""
    with _lock:
        if key in _held:
            return _held[key], False
        release_fixed_side()
        _held[key] = make()
        return _held[key], True


def release_fixed_side() -> None:
    """Drop the fixed side this process holds (closing a scratch copy deletes it)."""
    with _lock:
        for held in _held.values():
            if isinstance(held, ScratchCopy):
                held.close()
        _held.clear()
