"""Rank counting for AUC: how many candidates outscore each held-out item, block by block."""

from __future__ import annotations

from typing import Any

from numba import njit

from .topk import skip_to

_JIT: dict[str, Any] = dict(cache=True, nogil=True)


@njit(**_JIT)
def rank_counts_update(scores, col_ids, exclude_indptr, exclude_ids, exclude_cursor, test_indptr, test_ids, test_scores, outranked):
    """Add, for every held-out id of every row, the candidates in this block scoring above it.

    Candidates are the block's columns minus the row's excluded ids (training items) and minus
    its held-out ids (positives are not negatives). scores: (n_rows, m); col_ids: (m,) ascending;
    test_indptr/test_ids/test_scores/outranked: CSR-aligned arrays over the held-out ids.
    """
    n_rows, m = scores.shape
    for u in range(n_rows):
        t0, t1 = test_indptr[u], test_indptr[u + 1]
        if t0 == t1:
            continue
        cur = exclude_cursor[u]
        stop = exclude_indptr[u + 1]
        for j in range(m):
            cid = col_ids[j]
            cur, excluded = skip_to(exclude_ids, cur, stop, cid)
            if excluded:
                continue
            is_test = False
            for t in range(t0, t1):
                if test_ids[t] == cid:
                    is_test = True
                    break
            if is_test:
                continue
            s = scores[u, j]
            for t in range(t0, t1):
                if s > test_scores[t]:
                    outranked[t] += 1
        exclude_cursor[u] = cur


@njit(**_JIT)
def rank_counts_tile(scores, rows, first_key, test_indptr, test_keys, sorted_scores, auc_open, beaten):
    """Count, for a tile of contiguous columns, the candidates scoring above each held-out item.

    For the norm-ordered scan: columns are keys ``first_key .. first_key + m - 1`` (positions in
    norm order), excluded pairs (training items) already -inf. Per query the held-out items'
    scores are ``sorted_scores[test_indptr[q]:test_indptr[q + 1]]``, ascending, and their keys
    ``test_keys`` (same segments, any order). A column scoring above the lowest ``b`` held-out
    scores adds 1 to ``beaten[t0 + b - 1]``; item ``t0 + i``'s count of candidates above it is
    then the sum of ``beaten[t0 + i:t1]`` (``rank_counts_finish``). Held-out items are positives,
    not candidates: their own columns are taken back. Queries with ``auc_open[q]`` False are skipped.
    scores: (len(rows), m) float32; rows: (len(rows),) int64 query of each tile row.
    """
    m = scores.shape[1]
    for r in range(len(rows)):
        q = rows[r]
        if not auc_open[q]:
            continue
        t0, t1 = test_indptr[q], test_indptr[q + 1]
        if t0 == t1:
            continue
        lowest = sorted_scores[t0]
        row = scores[r]
        for j in range(m):
            s = row[j]
            if s > lowest:
                b = t0 + 1
                while b < t1 and s > sorted_scores[b]:
                    b += 1
                beaten[b - 1] += 1
        for t in range(t0, t1):
            key = test_keys[t]
            if first_key <= key < first_key + m:
                s = row[key - first_key]
                if s > lowest:
                    b = t0 + 1
                    while b < t1 and s > sorted_scores[b]:
                        b += 1
                    beaten[b - 1] -= 1


@njit(**_JIT)
def rank_counts_close(rows, bounds, next_key, n_keys, test_indptr, test_keys, sorted_scores, exclude_indptr,
                      exclude_cursor, auc_open, beaten):
    """Close the rank counts of queries whose held-out items no remaining column can reorder.

    bounds: (len(rows),) float64, a bound on |score| of every column from ``next_key`` on (the
    Cauchy-Schwarz bound of the norm-ordered scan, widened past rounding). A held-out score at or
    above the bound can be beaten by none of them; one below minus the bound by every remaining
    candidate: the columns left, minus the query's excluded keys left (``exclude_indptr[q + 1] -
    exclude_cursor[q]``, the cursor past ``next_key - 1``) and its held-out keys left. When every
    held-out score of a query is of one of these kinds, those candidates are added at once and
    the query's ``auc_open`` turns False.
    """
    for r in range(len(rows)):
        q = rows[r]
        if not auc_open[q]:
            continue
        t0, t1 = test_indptr[q], test_indptr[q + 1]
        bound = bounds[r]
        below = 0
        settled = True
        for t in range(t0, t1):
            s = sorted_scores[t]
            if s < -bound:
                below += 1
            elif s < bound:
                settled = False
                break
        if not settled:
            continue
        auc_open[q] = False
        if below == 0:
            continue
        tail = n_keys - next_key - (exclude_indptr[q + 1] - exclude_cursor[q])
        for t in range(t0, t1):
            if test_keys[t] >= next_key:
                tail -= 1
        beaten[t0 + below - 1] += tail


@njit(**_JIT)
def rank_counts_finish(test_indptr, beaten, outranked):
    """Candidates above each held-out item (ascending score order within each query), from
    ``beaten`` of ``rank_counts_tile``: the suffix sums of each query's segment."""
    for q in range(len(test_indptr) - 1):
        total = 0
        for t in range(test_indptr[q + 1] - 1, test_indptr[q] - 1, -1):
            total += beaten[t]
            outranked[t] = total
