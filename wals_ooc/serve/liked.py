"""The stored entries (already-liked items) of arbitrary rows, read in few requests.

Reading rows one by one costs a round of Zarr reads each; reading the span from the first to the
last row may read far more than needed. Rows are grouped into runs whose gaps hold few entries,
and each run is one read of the store.
"""

from __future__ import annotations

import numpy as np

from ..store.format import SIDES
from ..store.reader import InteractionStore

GAP_ENTRIES = 1 << 14  # entries worth reading past to save a separate read
RUN_ENTRIES = 1 << 22  # most entries read at once (32 MiB of indices and values)


def liked_csr(store: InteractionStore, side: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr int64, sorted ids int64) of the stored entries of ``rows`` (any order; -1: a row
    unknown to the store, with nothing to exclude)."""
    rows = np.asarray(rows, np.int64).ravel()
    counts = np.zeros(len(rows), np.int64)
    known = np.flatnonzero(rows >= 0)
    if not len(known):
        return np.zeros(len(rows) + 1, np.int64), np.zeros(0, np.int64)
    unique, inverse = np.unique(rows[known], return_inverse=True)
    starts = np.empty(len(unique), np.int64)  # each unique row's entries in ``gathered``
    lengths = np.empty(len(unique), np.int64)
    gathered, offset = [], 0
    for lo, hi in _runs(store, side, unique):
        shard = store.rows(side, int(lo), int(hi))
        first, last = np.searchsorted(unique, [lo, hi])
        local = unique[first:last] - lo
        row_starts = shard.indptr[local].astype(np.int64)
        row_lengths = shard.indptr[local + 1].astype(np.int64) - row_starts
        gathered.append(shard.indices[_ranges(row_starts, row_lengths)].astype(np.int64))
        starts[first:last] = offset + np.cumsum(row_lengths) - row_lengths
        lengths[first:last] = row_lengths
        offset += int(row_lengths.sum())
    pool = np.concatenate(gathered) if gathered else np.zeros(0, np.int64)
    counts[known] = lengths[inverse]
    indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    ids = pool[_ranges(starts[inverse], lengths[inverse])] if len(pool) else np.zeros(0, np.int64)
    return indptr, ids


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions ``starts[i] .. starts[i] + lengths[i] - 1`` of every range, one after another."""
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(starts - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def _runs(store, side: str, unique: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges covering the sorted ``unique`` rows, merging neighbours whose gap holds fewer
    than GAP_ENTRIES entries while a run stays under RUN_ENTRIES."""
    runs: list[tuple[int, int]] = []
    lo: int = 0
    hi: int | None = None  # the open run [lo, hi), None before the first row
    start_entry = gap_entry = 0
    for lo_block in range(0, len(unique), 1 << 16):  # row pointers of 65k rows at a time
        block = unique[lo_block : lo_block + (1 << 16)]
        starts, stops = _row_pointers(store, side, block)
        for row, row_start, row_stop in zip(block.tolist(), starts.tolist(), stops.tolist()):
            if hi is not None and row_start - gap_entry <= GAP_ENTRIES and row_stop - start_entry <= RUN_ENTRIES:
                hi, gap_entry = row + 1, row_stop
                continue
            if hi is not None:
                runs.append((lo, hi))
            lo, hi, start_entry, gap_entry = row, row + 1, row_start, row_stop
    if hi is not None:
        runs.append((lo, hi))
    return runs


def _row_pointers(store, side: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and past-last entry of each of the sorted ``rows``: the span of pointers when it is
    dense enough, else just the pointers needed."""
    span = int(rows[-1]) - int(rows[0]) + 2
    if span <= 8 * len(rows):
        pointers = store.indptr(side, int(rows[0]), int(rows[-1]) + 1)
        local = rows - rows[0]
        return pointers[local], pointers[local + 1]
    indptr = store.group[SIDES[side]]["indptr"]
    both = indptr.get_coordinate_selection(np.concatenate([rows, rows + 1]))
    return both[: len(rows)], both[len(rows) :]
