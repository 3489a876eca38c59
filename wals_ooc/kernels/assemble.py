"""Kernels of conversion's assembly step."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def segment_sums(values, starts):
    """Sum of each segment ``values[starts[k]:starts[k + 1]]`` (the last runs to the end), in
    float64, adding left to right: the same order and precision as ``np.add.at`` into a float64
    accumulator, so the two assembly paths give bit-identical sums whatever the budget."""
    n = len(starts)
    out = np.empty(n, np.float64)
    for k in range(n):
        stop = starts[k + 1] if k + 1 < n else len(values)
        acc = 0.0
        for p in range(starts[k], stop):
            acc += np.float64(values[p])
        out[k] = acc
    return out


@njit(cache=True, nogil=True)
def map_dense_ids(ids, lowest, table, counts):
    """Rows of integer ids through a dense table (``table[id - lowest]``, -1 for an id not in
    the map); adds one to ``counts`` per row. Returns (int32 rows, index of the first id not in
    the map or -1)."""
    n = len(ids)
    rows = np.empty(n, np.int32)
    span = len(table)
    for k in range(n):
        at = ids[k] - lowest
        if at < 0 or at >= span or table[at] < 0:
            return rows, k
        row = table[at]
        rows[k] = row
        counts[row] += 1
    return rows, -1


@njit(cache=True, nogil=True)
def id_range(ids):
    """(smallest, largest) of a non-empty int64 array."""
    low = ids[0]
    high = ids[0]
    for k in range(1, len(ids)):
        value = ids[k]
        if value < low:
            low = value
        elif value > high:
            high = value
    return low, high


@njit(cache=True, nogil=True)
def count_dense_ids(ids, lowest, counts):
    """counts[id - lowest] += 1 for each id (every id must fall in the table)."""
    for k in range(len(ids)):
        counts[ids[k] - lowest] += 1


@njit(cache=True, nogil=True)
def fill_dense_table(keys, lowest, table):
    """table[key - lowest] = position of key in the sorted distinct ``keys`` (others stay -1)."""
    for k in range(len(keys)):
        table[keys[k] - lowest] = k


@njit(cache=True, nogil=True)
def _shards_of(keys, bounds):
    """The shard of each key (``bounds``: ascending shard starts, then the end) and the shards'
    cut points in key order (length len(bounds)): the counting pass of the sorts below."""
    n_shards = len(bounds) - 1
    shard = np.empty(len(keys), np.int32)
    cuts = np.zeros(n_shards + 1, np.int64)
    for k in range(len(keys)):
        lo, hi = 0, n_shards - 1
        key = keys[k]
        while lo < hi:  # last shard whose start <= key
            mid = (lo + hi + 1) >> 1
            if bounds[mid] <= key:
                lo = mid
            else:
                hi = mid - 1
        shard[k] = lo
        cuts[lo + 1] += 1
    for s in range(n_shards):
        cuts[s + 1] += cuts[s]
    return shard, cuts


@njit(cache=True, nogil=True)
def bucket_order(keys, bounds):
    """Stable counting sort of entries by the shard their key falls in (``bounds``: ascending
    shard starts, then the end): (entry order, shard cut points of length len(bounds))."""
    shard, cuts = _shards_of(keys, bounds)
    fill = cuts[:-1].copy()
    order = np.empty(len(keys), np.int64)
    for k in range(len(keys)):
        s = shard[k]
        order[fill[s]] = k
        fill[s] += 1
    return order, cuts


@njit(cache=True, nogil=True)
def csr_into(rows, cols, values, row_start, n_rows, n_cols, counts, row_cols, row_values, indptr, indices, sums):
    """``csr_from_entries`` into buffers the caller keeps from unit to unit (fresh memory faults
    in every page anew): counts and indptr of at least n_rows + 1, row_cols, row_values (the
    values' dtype), indices and sums (float64) of at least len(rows). Returns the entries
    written to indices[:k], sums[:k]; indptr[: n_rows + 1] holds the row pointers."""
    n = len(rows)
    counts[: n_rows + 1] = 0
    for k in range(n):
        counts[rows[k] - row_start + 1] += 1
    for r in range(n_rows):
        counts[r + 1] += counts[r]
    indptr[0] = 0
    fill = counts[:n_rows].copy()
    for k in range(n):
        r = rows[k] - row_start
        at = fill[r]
        row_cols[at] = cols[k]
        row_values[at] = values[k]
        fill[r] = at + 1
    out = 0
    for r in range(n_rows):
        lo, hi = counts[r], counts[r + 1]
        if hi - lo <= 32:  # stable insertion sort by column (entries of a row, in input order)
            for p in range(lo + 1, hi):
                c = row_cols[p]
                v = row_values[p]
                q = p
                while q > lo and row_cols[q - 1] > c:
                    row_cols[q] = row_cols[q - 1]
                    row_values[q] = row_values[q - 1]
                    q -= 1
                row_cols[q] = c
                row_values[q] = v
        else:
            within = np.argsort(row_cols[lo:hi], kind="mergesort")  # stable: duplicates in input order
            segment_cols = row_cols[lo:hi][within]
            segment_values = row_values[lo:hi][within]
            row_cols[lo:hi] = segment_cols
            row_values[lo:hi] = segment_values
        previous = -1
        for p in range(lo, hi):
            col = row_cols[p]
            if col != previous:
                indices[out] = col
                sums[out] = np.float64(row_values[p])
                out += 1
                previous = col
            else:
                sums[out - 1] += np.float64(row_values[p])
        indptr[r + 1] = out
    return out


@njit(cache=True, nogil=True)
def csr_by_columns_into(rows, cols, values, row_start, n_rows, n_cols, col_counts, col_rows, col_values, counts,
                        row_cols, row_values, indptr, indices, sums):
    """``csr_into`` by two stable counting sorts (by column, then by row) instead of a sort of
    each row's columns: the same output, bit for bit (duplicates still meet in input order), in
    two streaming passes. Worth it when the unit has at least about as many entries as there
    are columns (each call clears and scans a table over the columns). Buffers as for
    ``csr_into``, and col_counts (at least n_cols + 1, int64), col_rows (int32) and col_values
    (the values' dtype) of at least len(rows). Returns the entries written."""
    n = len(rows)
    col_counts[: n_cols + 1] = 0
    counts[: n_rows + 1] = 0
    for k in range(n):
        col_counts[cols[k] + 1] += 1
        counts[rows[k] - row_start + 1] += 1
    for c in range(n_cols):
        col_counts[c + 1] += col_counts[c]
    for r in range(n_rows):
        counts[r + 1] += counts[r]
    for k in range(n):  # by column; col_counts[c] ends as the end of column c
        c = cols[k]
        at = col_counts[c]
        col_rows[at] = rows[k] - row_start
        col_values[at] = values[k]
        col_counts[c] = at + 1
    fill = counts[:n_rows].copy()
    lo = 0
    for c in range(n_cols):  # by row, columns in ascending order: each row's entries come out sorted
        hi = col_counts[c]
        for p in range(lo, hi):
            r = col_rows[p]
            at = fill[r]
            row_cols[at] = c
            row_values[at] = col_values[p]
            fill[r] = at + 1
        lo = hi
    indptr[0] = 0
    out = 0
    for r in range(n_rows):
        previous = -1
        for p in range(counts[r], counts[r + 1]):
            col = row_cols[p]
            if col != previous:
                indices[out] = col
                sums[out] = np.float64(row_values[p])
                out += 1
                previous = col
            else:
                sums[out - 1] += np.float64(row_values[p])
        indptr[r + 1] = out
    return out


@njit(cache=True, nogil=True)
def csr_from_entries(rows, cols, values, row_start, n_rows, n_cols):
    """Entries of rows ``[row_start, row_start + n_rows)`` (columns < ``n_cols``) -> (indptr,
    indices, values float64), sorted by row then column, duplicates summed in float64 in input
    order (as ``segment_sums`` over a stable sort): a counting sort by row that moves the
    columns and values themselves (one streaming read of the entries, so the sorts below work
    on contiguous memory), then a stable sort of each row's columns in place (insertion sort
    for short rows, merge sort for long ones)."""
    n = len(rows)
    counts = np.empty(n_rows + 1, np.int64)
    indptr = np.empty(n_rows + 1, np.int64)
    indices = np.empty(n, np.int32)
    sums = np.empty(n, np.float64)
    out = csr_into(rows, cols, values, row_start, n_rows, n_cols, counts, np.empty(n, np.int32),
                   np.empty(n, values.dtype), indptr, indices, sums)
    return indptr, indices[:out], sums[:out]


@njit(cache=True, nogil=True)
def bucket_scatter(keys, others, values, bounds, out_keys, out_others, out_values):
    """Stable counting sort of entries (key, other, value) by the shard their key falls in
    (``bounds``: ascending shard starts, then the end), written into the ``out_`` arrays; the
    entries are read once, in order, and written to one stream per shard. Returns the shard
    cut points (length len(bounds))."""
    n = len(keys)
    shard, cuts = _shards_of(keys, bounds)
    fill = cuts[:-1].copy()
    for k in range(n):
        s = shard[k]
        at = fill[s]
        out_keys[at] = keys[k]
        out_others[at] = others[k]
        out_values[at] = values[k]
        fill[s] = at + 1
    return cuts


@njit(cache=True, nogil=True)
def bucket_scatter_by_table(keys, others, values, shard_of, n_shards, out_keys, out_others, out_values):
    """``bucket_scatter`` with each key's shard read from a table (``shard_of[key]``) instead of
    searched for among the bounds: the same output."""
    n = len(keys)
    cuts = np.zeros(n_shards + 1, np.int64)
    for k in range(n):
        cuts[shard_of[keys[k]] + 1] += 1
    for s in range(n_shards):
        cuts[s + 1] += cuts[s]
    fill = cuts[:-1].copy()
    for k in range(n):
        s = shard_of[keys[k]]
        at = fill[s]
        out_keys[at] = keys[k]
        out_others[at] = others[k]
        out_values[at] = values[k]
        fill[s] = at + 1
    return cuts
