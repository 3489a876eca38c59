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
