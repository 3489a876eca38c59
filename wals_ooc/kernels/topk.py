"""Exact top-K selection over score tiles, without ever holding a full score matrix.

Scores arrive in tiles (some queries x a run of columns); each query keeps a min-heap of its K
best (score, id) pairs in preallocated arrays. The order is total: a higher score wins, and on
equal scores the lower id, so the result does not depend on the order tiles arrive in (the
norm-ordered exact scan of ``serve/scoring.py`` visits items out of id order).

A tile is filtered in two passes: ``mask_columns`` sets the scores of excluded pairs (items a
user already has) to -inf, touching only the excluded entries; ``topk_select`` then scans each
row in chunks, counting the scores that reach the row's current K-th best (a branch-free,
vectorised count) and entering the heap only in the rare chunks that have one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

_JIT: dict[str, Any] = dict(cache=True, nogil=True)
CHUNK = 64  # scores counted per chunk before the heap is visited


@njit(**_JIT)
def _sift_down(heap_scores, heap_ids, k):
    pos = 0
    while True:
        left = 2 * pos + 1
        if left >= k:
            return
        child = left
        right = left + 1
        if right < k and _less(heap_scores[right], heap_ids[right], heap_scores[left], heap_ids[left]):
            child = right
        if _less(heap_scores[child], heap_ids[child], heap_scores[pos], heap_ids[pos]):
            heap_scores[pos], heap_scores[child] = heap_scores[child], heap_scores[pos]
            heap_ids[pos], heap_ids[child] = heap_ids[child], heap_ids[pos]
            pos = child
        else:
            return


@njit(**_JIT)
def _less(score_a, id_a, score_b, id_b):
    """Heap order: lower score is worse; on a tie the larger id is worse (so ties keep low ids)."""
    if score_a != score_b:
        return score_a < score_b
    return id_a > id_b


@njit(**_JIT)
def skip_to(sorted_ids, cursor, stop, target):
    """Advance ``cursor`` over ``sorted_ids[cursor:stop]`` past ids below ``target``; return the new
    cursor and whether ``target`` itself is listed (an excluded id)."""
    while cursor < stop and sorted_ids[cursor] < target:
        cursor += 1
    return cursor, cursor < stop and sorted_ids[cursor] == target


@njit(**_JIT)
def mask_columns(scores, rows, col_keys, exclude_indptr, exclude_keys, exclude_cursor):
    """Set ``scores[r, j]`` to -inf where column ``j`` is excluded for query ``rows[r]``.

    scores: (len(rows), m) float32 tile; rows: (len(rows),) int64 query index of each tile row;
    col_keys: (m,) int64 ascending keys of the tile's columns, in the numbering of
    ``exclude_keys`` (contiguous keys are indexed directly, others binary-searched);
    exclude_indptr/exclude_keys: CSR of excluded keys per query, sorted within a query;
    exclude_cursor: (n_queries,) int64 position in each query's excluded keys, advanced past
    the tile (tiles of a query must come in ascending key order). Cost: the excluded entries.
    """
    m = scores.shape[1]
    if m == 0:
        return
    first = col_keys[0]
    last = col_keys[m - 1]
    contiguous = last - first == m - 1
    for r in range(len(rows)):
        q = rows[r]
        cur = exclude_cursor[q]
        stop = exclude_indptr[q + 1]
        while cur < stop and exclude_keys[cur] < first:
            cur += 1
        while cur < stop and exclude_keys[cur] <= last:
            key = exclude_keys[cur]
            if contiguous:
                scores[r, key - first] = -np.inf
            else:
                j = np.searchsorted(col_keys, key)
                if j < m and col_keys[j] == key:
                    scores[r, j] = -np.inf
            cur += 1
        exclude_cursor[q] = cur


@njit(**_JIT)
def topk_select(scores, rows, col_ids, heap_scores, heap_ids):
    """Fold a tile of scores into the heaps of the K best of queries ``rows``.

    scores: (len(rows), m) float32; rows: (len(rows),) int64 query of each tile row; col_ids:
    (m,) int64 id of each column (any order); heap_scores/heap_ids: (n_queries, K), start at
    -inf / -1. A -inf score (masked) never enters a heap.
    """
    m = scores.shape[1]
    k = heap_scores.shape[1]
    for r in range(len(rows)):
        hs = heap_scores[rows[r]]
        hi = heap_ids[rows[r]]
        row = scores[r]
        threshold = hs[0]
        for lo in range(0, m, CHUNK):
            hi_col = min(m, lo + CHUNK)
            reaching = 0
            for j in range(lo, hi_col):
                reaching += row[j] >= threshold
            if reaching == 0:
                continue
            for j in range(lo, hi_col):
                s = row[j]
                if s >= threshold and _less(hs[0], hi[0], s, col_ids[j]):
                    hs[0] = s
                    hi[0] = col_ids[j]
                    _sift_down(hs, hi, k)
                    threshold = hs[0]


@njit(**_JIT)
def topk_update(scores, col_ids, exclude_indptr, exclude_indices, exclude_cursor, heap_scores, heap_ids):
    """Fold a block of scores of all queries into their heaps, skipping excluded ids.

    scores: (n_queries, m) float32, masked in place; col_ids: (m,) int64 ascending ids of the
    block's columns; exclude_indptr/indices: CSR of ids to skip per query, sorted;
    exclude_cursor: (n_queries,) int64, advanced across blocks; heap_scores/heap_ids: (n_queries, K).
    """
    rows = np.arange(scores.shape[0])
    mask_columns(scores, rows, col_ids, exclude_indptr, exclude_indices, exclude_cursor)
    topk_select(scores, rows, col_ids, heap_scores, heap_ids)


@njit(**_JIT)
def select_candidates(cand_ids, cand_scores, rows, exclude_indptr, exclude_ids, heap_scores, heap_ids):
    """Fold candidate lists (e.g. from an approximate index) into the heaps of queries ``rows``,
    dropping excluded ids exactly.

    cand_ids: (len(rows), m) int64 ids in any order, -1 for none; cand_scores: (len(rows), m)
    float32 exact scores; exclude_indptr/exclude_ids: CSR of sorted ids to drop per query.
    Returns (len(rows),) int64: how many candidates of each query survived the exclusion.
    """
    m = cand_ids.shape[1]
    k = heap_scores.shape[1]
    kept = np.zeros(len(rows), np.int64)
    for r in range(len(rows)):
        q = rows[r]
        lo, hi = exclude_indptr[q], exclude_indptr[q + 1]
        hs = heap_scores[q]
        hid = heap_ids[q]
        for j in range(m):
            cid = cand_ids[r, j]
            if cid < 0:
                continue
            if hi > lo:
                at = lo + np.searchsorted(exclude_ids[lo:hi], cid)
                if at < hi and exclude_ids[at] == cid:
                    continue
            kept[r] += 1
            s = cand_scores[r, j]
            if _less(hs[0], hid[0], s, cid):
                hs[0] = s
                hid[0] = cid
                _sift_down(hs, hid, k)
    return kept


@njit(**_JIT)
def unit_rows(block, out):
    """``out`` = the rows of ``block`` divided by their norms (summed in float64; a zero row stays
    zero): the one normalization cosine similarity uses, in the exact scan and in an index alike,
    so both score the same float32 vectors."""
    for i in range(block.shape[0]):
        total = 0.0
        for j in range(block.shape[1]):
            v = np.float64(block[i, j])
            total += v * v
        norm = np.sqrt(total)
        for j in range(block.shape[1]):
            out[i, j] = block[i, j] / norm if norm > 0 else block[i, j]


@njit(cache=True, nogil=True, fastmath={"contract"})
def candidate_scores(queries, rows, ids, out):
    """Scores of each query's candidates: ``out[q, j] = queries[q] . rows[ids[q, j]]`` in float32
    (-inf where ``ids[q, j]`` is -1), one fused multiply-add per factor in factor order, which is
    how sgemm forms each entry of the exact scan's score tiles: re-scored candidates rank
    near-ties as the exact answer ranks them far more often than another summation order does.
    queries: (n, f); rows: (m, f) the vectors the ids index; ids, out: (n, k)."""
    f = rows.shape[1]
    for q in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            r = ids[q, j]
            if r < 0:
                out[q, j] = -np.inf
                continue
            acc = np.float32(0.0)
            for c in range(f):
                acc += queries[q, c] * rows[r, c]
            out[q, j] = acc


@njit(**_JIT)
def keys_of(exclude_indptr, exclude_ids, key_of_id):
    """The excluded ids renumbered through ``key_of_id`` (e.g. item id -> position in norm
    order), sorted within each query: the CSR ``mask_columns`` takes for tiles in that order."""
    keys = np.empty(len(exclude_ids), np.int64)
    for q in range(len(exclude_indptr) - 1):
        lo, hi = exclude_indptr[q], exclude_indptr[q + 1]
        for t in range(lo, hi):
            keys[t] = key_of_id[exclude_ids[t]]
        keys[lo:hi] = np.sort(keys[lo:hi])
    return keys


@njit(**_JIT)
def topk_finish(heap_scores, heap_ids):
    """Sort each row's heap best first (score descending, then id ascending), in place."""
    n_rows, k = heap_scores.shape
    for u in range(n_rows):
        hs = heap_scores[u]
        hi = heap_ids[u]
        for end in range(k - 1, 0, -1):  # heapsort: move the worst to the end each time
            hs[0], hs[end] = hs[end], hs[0]
            hi[0], hi[end] = hi[end], hi[0]
            _sift_down(hs, hi, end)


def new_heaps(n_rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty heaps: scores -inf, ids -1 (a row with fewer than K candidates keeps -1 ids)."""
    return np.full((n_rows, k), -np.inf, dtype=np.float32), np.full((n_rows, k), -1, dtype=np.int64)
