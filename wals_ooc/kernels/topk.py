"""Exact top-K selection over score blocks, without ever holding a full score matrix.

Scores arrive in column blocks (users x a block of items); each row keeps a min-heap of its K
best (score, id) pairs in preallocated arrays. Excluded ids (items a user already has) are
skipped with a per-row cursor over their sorted list.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(cache=True, nogil=True)


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
def topk_update(scores, col_ids, exclude_indptr, exclude_indices, exclude_cursor, heap_scores, heap_ids):
    """Fold a block of scores into each row's heap of the K best.

    scores: (n_rows, m) float32; col_ids: (m,) int64 ascending ids of the block's columns;
    exclude_indptr/indices: CSR of ids to skip per row, sorted; exclude_cursor: (n_rows,) int64
    position in each row's excluded ids, advanced across blocks; heap_scores/heap_ids: (n_rows, K),
    start at -inf / -1.
    """
    n_rows, m = scores.shape
    k = heap_scores.shape[1]
    for u in range(n_rows):
        cur = exclude_cursor[u]
        stop = exclude_indptr[u + 1]
        hs = heap_scores[u]
        hi = heap_ids[u]
        for j in range(m):
            cid = col_ids[j]
            cur, excluded = skip_to(exclude_indices, cur, stop, cid)
            if excluded:
                continue
            s = scores[u, j]
            if _less(hs[0], hi[0], s, cid):
                hs[0] = s
                hi[0] = cid
                _sift_down(hs, hi, k)
        exclude_cursor[u] = cur


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
