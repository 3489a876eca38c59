"""Writing a 1-d Zarr array front to back, a whole chunk at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import zarr


class ChunkAppender:
    """Appends to a 1-d Zarr array in whole chunks only.

    Writing a shard's entries straight to the array would re-read, re-compress and re-write the
    chunk it shares with the previous shard; buffering up to one chunk writes each chunk once.
    """

    def __init__(self, array: zarr.Array, start: int = 0, trim: bool = False):
        """trim: the array was made longer than what will be appended (sized once to a bound,
        so appends need no ``resize``, a metadata write each); ``close`` cuts it to the end."""
        self.array = array
        self.chunk = array.chunks[0]
        self.written = start  # elements already in the array
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.trim = trim

    def append(self, values: np.ndarray) -> None:
        """Add ``values`` after what was appended before. The whole chunks they complete are
        written at once, straight from ``values``; only a tail short of a chunk is kept, as a
        copy (so the caller may reuse ``values``' memory, and nothing large is concatenated)."""
        if not len(values):
            return
        need = -(self.written + self.pending_len) % self.chunk or self.chunk  # to the next chunk boundary
        if len(values) < need:
            self.pending.append(values.copy())
            self.pending_len += len(values)
            return
        whole = (len(values) - need) // self.chunk * self.chunk
        stop = need + whole
        end = self.written + self.pending_len + stop
        if self.array.shape[0] < end:
            self.array.resize((end,))
        if self.pending_len:
            head = np.concatenate(self.pending + [values[:need]])
            self.array[self.written : self.written + len(head)] = head
            self.written += len(head)
            start = need
        else:
            start = 0
        if stop > start:
            self.array[self.written : end] = values[start:stop]
        self.written = end
        tail = values[stop:]
        self.pending = [tail.copy()] if len(tail) else []
        self.pending_len = len(tail)

    def _flush(self, whole_chunks_only: bool) -> None:
        if not self.pending_len:
            return
        data = np.concatenate(self.pending)
        # keep the write aligned: end it on a chunk boundary unless this is the final flush
        end = self.written + len(data)
        if whole_chunks_only:
            end -= end % self.chunk
        take = end - self.written
        if take > 0:
            if self.array.shape[0] < end:
                self.array.resize((end,))
            self.array[self.written : end] = data[:take]
            self.written = end
        rest = data[take:]
        self.pending = [rest] if len(rest) else []
        self.pending_len = len(rest)

    def close(self) -> int:
        self._flush(whole_chunks_only=False)
        if self.trim and self.array.shape[0] > self.written:
            self.array.resize((self.written,))
        return self.written
