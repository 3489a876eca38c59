"""The stored entries (already-liked items) of arbitrary rows, read in few requests.

Reading rows one by one costs a round of Zarr reads each (row pointers, entries and values, a
chunk of each even for a row of ten entries); reading the span from the first to the last row may
read far more than needed. So the rows' pointers are read first (one selection), then only their
entries' ids: the rows are cut into windows of at most RUN_ENTRIES entries, and a window whose
rows lie close together (their entries fill at least 1 / SPARSE_RATIO of the span they cover) is
one slice of the store, a sparse one (random users of a large store) one coordinate selection,
which reads each chunk it touches once, however many rows fall in it. Pointers and ids are
checked, so a damaged store raises ``CorruptStoreError`` rather than answering wrongly.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptStoreError
from ..store.format import SIDES, array, subgroup
from ..store.reader import InteractionStore

SPARSE_RATIO = 4  # a window whose entries fill less than 1/4 of their span is read by coordinates
RUN_ENTRIES = 1 << 22  # most entries read at once (32 MiB of positions, 16 MiB of ids)
POINTER_BLOCK = 1 << 16  # rows whose pointers are read at once


def liked_csr(store: InteractionStore, side: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr int64, sorted ids int64) of the stored entries of ``rows`` (any order; -1: a row
    unknown to the store, with nothing to exclude)."""
    rows = np.asarray(rows, np.int64).ravel()
    counts = np.zeros(len(rows), np.int64)
    known = np.flatnonzero(rows >= 0)
    if not len(known):
        return np.zeros(len(rows) + 1, np.int64), np.zeros(0, np.int64)
    unique, inverse = np.unique(rows[known], return_inverse=True)
    starts = np.empty(len(unique), np.int64)
    stops = np.empty(len(unique), np.int64)
    for lo in range(0, len(unique), POINTER_BLOCK):
        block = unique[lo : lo + POINTER_BLOCK]
        starts[lo : lo + len(block)], stops[lo : lo + len(block)] = _row_pointers(store, side, block)
    orientation = SIDES[side]
    overlap = np.zeros(len(unique), bool)
    overlap[1:] = starts[1:] < stops[:-1]  # rows are sorted: their entries cannot overlap
    bad = np.flatnonzero((starts < 0) | (stops < starts) | (stops > store.nnz) | overlap)
    if len(bad):
        raise CorruptStoreError(f"{store.location}: {orientation}/indptr is damaged at row {int(unique[bad[0]])} "
                                f"(decreasing, or beyond the {store.nnz} entries): write the store again")
    lengths = stops - starts
    pool = _read_entries(array(subgroup(store.group, orientation), "indices"), starts, lengths)
    other = store.n_rows("item" if side == "user" else "user")
    if len(pool) and (int(pool.min()) < 0 or int(pool.max()) >= other):
        at = int(np.flatnonzero((pool < 0) | (pool >= other))[0])
        raise CorruptStoreError(f"{store.location}: {orientation}/indices holds {int(pool[at])}, outside [0, {other}): "
                                "the store is damaged; write it again")
    offsets = np.cumsum(lengths) - lengths  # each unique row's entries in ``pool``
    counts[known] = lengths[inverse]
    indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    ids = pool[_ranges(offsets[inverse], lengths[inverse])] if len(pool) else np.zeros(0, np.int64)
    return indptr, ids


def _read_entries(indices, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The entries ``indices[starts[i] : starts[i] + lengths[i]]`` of every row (sorted by start),
    one after another, as int64: windows of at most RUN_ENTRIES entries, each a slice when dense,
    else a coordinate selection."""
    out = np.empty(int(lengths.sum()), np.int64)
    ends = np.cumsum(lengths)
    done = first = 0
    while first < len(starts):
        last = max(first + 1, int(np.searchsorted(ends, done + RUN_ENTRIES, side="right")))
        window_starts, window_lengths = starts[first:last], lengths[first:last]
        needed = int(window_lengths.sum())
        if needed:
            lo, hi = int(window_starts[0]), int(window_starts[-1] + window_lengths[-1])
            if SPARSE_RATIO * needed >= hi - lo:
                span = np.asarray(indices[lo:hi])
                out[done : done + needed] = span[_ranges(window_starts - lo, window_lengths)]
            else:
                out[done : done + needed] = indices.get_coordinate_selection(_ranges(window_starts, window_lengths))
        done += needed
        first = last
    return out


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions ``starts[i] .. starts[i] + lengths[i] - 1`` of every range, one after another."""
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(starts - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


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
