"""Approximate top-N with exact filtering: over-fetch from the index, drop excluded ids, and answer
exactly the queries the over-fetch could not fill.

A query with ``e`` excluded ids (already-liked items, or itself for similar items) fetches
``N + e`` candidates (rounded up to a power of two, at most ``max_fetch``), so that at least N
remain after dropping them whatever the index returns; the excluded ids are dropped exactly
(binary search in the query's sorted list), never approximately. A query left with fewer than N
(the fetch was capped, or the index found fewer) is answered by the exact scan instead, so
filtering never shortens or pads an answer that the exact path would fill.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..kernels.topk import new_heaps, select_candidates, topk_finish
from .ann import AnnIndex

BATCH_BYTES = 64 << 20  # candidates (ids, scores, reconstructed vectors) searched at once

ExactAnswer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def subset_csr(indptr: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``rows`` of a CSR (indptr, ids), as a CSR of their own."""
    counts = np.diff(indptr)[rows]
    out_indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(counts, out=out_indptr[1:])
    out_ids = np.concatenate([ids[indptr[r] : indptr[r + 1]] for r in rows]) if len(rows) else np.zeros(0, np.int64)
    return out_indptr, np.asarray(out_ids, np.int64)


def fetch_sizes(k: int, excluded: np.ndarray, n_rows: int, max_fetch: int) -> np.ndarray:
    """Candidates to fetch per query: ``k`` plus its excluded count, rounded up to a power of two
    (so queries batch together), capped at ``max(k, max_fetch)`` and the index size."""
    need = k + np.asarray(excluded, np.int64)
    rounded = np.left_shift(1, np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64))
    return np.minimum(np.minimum(rounded, max(k, max_fetch)), n_rows)


def approximate_top_k(
    index: AnnIndex,
    queries: np.ndarray,
    k: int,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    exact: ExactAnswer | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-``k`` (ids, scores) of each query from ``index``, excluded ids dropped exactly.

    exclude: CSR (indptr, sorted ids) per query; exact: answers the given query positions
    exactly (ids, scores), for the queries the index could not fill. Returns (ids (n, k) int64
    -1 padded, scores (n, k) float32 best first, how many queries were answered exactly).
    """
    n = len(queries)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    exclude_indptr, exclude_ids = exclude if exclude is not None else (np.zeros(n + 1, np.int64), np.zeros(0, np.int64))
    exclude_indptr = np.asarray(exclude_indptr, np.int64)
    exclude_ids = np.asarray(exclude_ids, np.int64)
    heap_scores, heap_ids = new_heaps(n, k)
    kept = np.zeros(n, np.int64)
    fetch = fetch_sizes(k, np.diff(exclude_indptr), index.n_rows, index.settings.max_fetch)
    per_candidate = 12 + 4 * (queries.shape[1] + 1)
    for size in np.unique(fetch):
        rows = np.flatnonzero(fetch == size).astype(np.int64)
        step = max(1, BATCH_BYTES // (int(size) * per_candidate))
        for lo in range(0, len(rows), step):
            batch = rows[lo : lo + step]
            candidates, scores = index.search(queries[batch], int(size), threads)
            kept[batch] = select_candidates(candidates, scores, batch, exclude_indptr, exclude_ids, heap_scores, heap_ids)
    topk_finish(heap_scores, heap_ids)
    short = np.flatnonzero(kept < k)
    if len(short) and exact is not None:
        ids, scores = exact(short)
        heap_ids[short], heap_scores[short] = ids, scores
    return heap_ids, heap_scores, int(len(short))
