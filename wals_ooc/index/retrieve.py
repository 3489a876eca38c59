"""Approximate top-N with exact filtering: over-fetch from the index, drop excluded ids, and answer
exactly the queries the over-fetch could not fill.

A query with ``e`` excluded ids (already-liked items, or itself for similar items) is searched
in two rounds. The first fetches ``N + min(e, 3N)`` candidates (rounded up to a power of two):
most users' liked items are not all among their best-scored ones, and a graph search costs about
its candidate count, so fetching ``N + e`` for a user with hundreds of liked items would make the
heavy users the whole bill. Queries left with fewer than N after dropping their excluded ids are
searched again with ``N + e`` (at most ``max_fetch``), which leaves at least N whatever the index
returns. The excluded ids are dropped exactly (binary search in the query's sorted list), never
approximately. A query still short (the fetch was capped, or the index found fewer) is answered
by the exact scan instead, so filtering never shortens or pads an answer that the exact path
would fill. An index with ``candidates`` fetches at least that many per query in both rounds
(re-scored exactly by ``AnnIndex.search``), so near-ties just past the N-th are in reach.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..kernels.topk import new_heaps, select_candidates, topk_finish
from .ann import AnnIndex

FIRST_ROUND_EXTRA = 3  # the first round fetches N + min(excluded, FIRST_ROUND_EXTRA * N) candidates
BATCH_BYTES = 64 << 20  # candidates (ids, scores) and faiss's result heaps searched at once

ExactAnswer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def subset_csr(indptr: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``rows`` of a CSR (indptr, ids), as a CSR of their own."""
    counts = np.diff(indptr)[rows]
    out_indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(counts, out=out_indptr[1:])
    out_ids = np.concatenate([ids[indptr[r] : indptr[r + 1]] for r in rows]) if len(rows) else np.zeros(0, np.int64)
    return out_indptr, np.asarray(out_ids, np.int64)


def fetch_sizes(k: int, excluded: np.ndarray, n_rows: int, max_fetch: int, first: bool = False) -> np.ndarray:
    """Candidates to fetch per query: ``k`` plus its excluded count (``first``: plus at most
    ``FIRST_ROUND_EXTRA * k`` of them), rounded up to a power of two (so queries batch together), capped at
    ``max(k, max_fetch)`` and the index size."""
    excluded = np.asarray(excluded, np.int64)
    need = k + (np.minimum(excluded, FIRST_ROUND_EXTRA * k) if first else excluded)
    rounded = np.left_shift(1, np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64))
    return np.minimum(np.minimum(rounded, max(k, max_fetch)), n_rows)


def approximate_top_k(
    index: AnnIndex,
    queries: np.ndarray,
    k: int,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    exact: ExactAnswer | None = None,
    threads: int = 1,
    stats: dict | None = None,
    stored: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-``k`` (ids, scores) of each query from ``index``, excluded ids dropped exactly.

    exclude: CSR (indptr, sorted ids) per query; exact: answers the given query positions
    exactly (ids, scores), for the queries the index could not fill; stats: when given, filled
    with how many queries each round searched and the seconds spent in faiss; stored: the
    queries are the index's own rows (``AnnIndex.vectors``: normalized already). Returns (ids
    (n, k) int64 -1 padded, scores (n, k) float32 best first, how many queries were answered
    exactly).
    """
    n = len(queries)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    exclude_indptr, exclude_ids = exclude if exclude is not None else (np.zeros(n + 1, np.int64), np.zeros(0, np.int64))
    exclude_indptr = np.asarray(exclude_indptr, np.int64)
    exclude_ids = np.asarray(exclude_ids, np.int64)
    excluded = np.diff(exclude_indptr)
    floor = min(index.candidates, index.n_rows)  # fewest candidates, re-scored exactly (IndexSettings.candidates)
    full = np.maximum(fetch_sizes(k, excluded, index.n_rows, index.settings.max_fetch), floor)
    first = np.maximum(fetch_sizes(k, excluded, index.n_rows, index.settings.max_fetch, first=True), floor)
    stats = stats if stats is not None else {}
    stats.update(first_round=n, second_round=0, exact=0, search_seconds=0.0)
    heap_scores, heap_ids, kept = _search_rounds(index, queries, first, k, exclude_indptr, exclude_ids, threads, stats,
                                                 stored)
    again = np.flatnonzero((kept < k) & (full > first))
    if len(again):
        stats["second_round"] = int(len(again))
        sub_indptr, sub_ids = subset_csr(exclude_indptr, exclude_ids, again)
        heap_scores[again], heap_ids[again], kept[again] = _search_rounds(
            index, queries[again], full[again], k, sub_indptr, sub_ids, threads, stats, stored)
    topk_finish(heap_scores, heap_ids)
    short = np.flatnonzero(kept < k)
    if len(short) and exact is not None:
        ids, scores = exact(short)
        heap_ids[short], heap_scores[short] = ids, scores
    stats["exact"] = int(len(short))
    return heap_ids, heap_scores, int(len(short))


def _search_rounds(index: AnnIndex, queries: np.ndarray, fetch: np.ndarray, k: int, exclude_indptr: np.ndarray,
                   exclude_ids: np.ndarray, threads: int, stats: dict,
                   stored: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Unfinished) heaps of the queries from ``fetch[q]`` candidates each, and how many
    candidates each kept after the exclusion; queries of one fetch size are searched together,
    in batches of about ``BATCH_BYTES``."""
    rows = np.arange(len(queries), dtype=np.int64)
    heap_scores, heap_ids = new_heaps(len(rows), k)
    kept = np.zeros(len(rows), np.int64)
    per_candidate = 12 + 16  # ids, scores, faiss's own result heap
    for size in np.unique(fetch):
        chosen = rows[fetch == size]
        step = max(1, BATCH_BYTES // (int(size) * per_candidate))
        for lo in range(0, len(chosen), step):
            batch = chosen[lo : lo + step]
            started = time.perf_counter()
            candidates, scores = index.search(queries[batch], int(size), threads, stored=stored)
            stats["search_seconds"] += time.perf_counter() - started
            kept[batch] = select_candidates(candidates, scores, batch, exclude_indptr, exclude_ids, heap_scores, heap_ids)
    return heap_scores, heap_ids, kept
