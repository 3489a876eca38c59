"""Scoring query vectors against a factor matrix held in Zarr, one block of its rows at a time.

The full score matrix (queries x items) never exists: each block of item factors yields a
queries x block score tile, which is folded into per-query top-K heaps (and, for evaluation,
into per-query rank counts) and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import zarr

from ..kernels.topk import new_heaps, topk_finish, topk_update
from ..kernels.rank import rank_counts_update

EMPTY_CSR = (np.zeros(1, np.int64), np.zeros(0, np.int64))


@dataclass
class FactorSource:
    """Rows of a factor matrix: a Zarr array read in blocks, or an in-memory copy when it fits.

    normalized: divide each row by its norm as it is read (cosine similarity).
    """

    array: zarr.Array | np.ndarray
    block_rows: int
    normalized: bool = False

    @property
    def n_rows(self) -> int:
        return int(self.array.shape[0])

    @property
    def factors(self) -> int:
        return int(self.array.shape[1])

    def blocks(self, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row ids, factor block) pairs in ascending id order; ``rows`` restricts to sorted ids."""
        if rows is not None:
            for lo in range(0, len(rows), self.block_rows):
                ids = rows[lo : lo + self.block_rows]
                yield ids, self._prepare(_take_rows(self.array, ids))
            return
        for lo in range(0, self.n_rows, self.block_rows):
            hi = min(self.n_rows, lo + self.block_rows)
            yield np.arange(lo, hi, dtype=np.int64), self._prepare(np.asarray(self.array[lo:hi]))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Factor rows of the given ids (any order), as an in-memory array."""
        return self._prepare(_take_rows(self.array, ids))

    def _prepare(self, block: np.ndarray) -> np.ndarray:
        if not self.normalized:
            return np.ascontiguousarray(block)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        return np.ascontiguousarray(block / np.where(norms == 0, 1, norms)).astype(block.dtype)


def _take_rows(array, ids: np.ndarray) -> np.ndarray:
    """Rows by id from a Zarr or NumPy array (Zarr wants sorted unique ids for orthogonal selection)."""
    ids = np.asarray(ids, dtype=np.int64)
    if isinstance(array, np.ndarray):
        return array[ids]
    unique, inverse = np.unique(ids, return_inverse=True)
    return np.asarray(array.get_orthogonal_selection((unique, slice(None))))[inverse]


def top_k(
    queries: np.ndarray,
    source: FactorSource,
    k: int,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    candidates: np.ndarray | None = None,
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Exact top-K row ids and scores of ``queries @ source.T`` per query, best first.

    exclude: CSR (indptr, sorted ids) of ids never to return, per query (already-liked items).
    candidates: sorted ids to score (default all rows).
    test: CSR (indptr, ids) of held-out ids per query; when given, also returns for each held-out
        id how many scored candidates outrank it (for AUC), in the CSR's order.
    Returns (ids (n, k) int64 with -1 padding, scores (n, k) float32, outranked or None).
    """
    n = queries.shape[0]
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap_scores, heap_ids = new_heaps(n, k)
    exclude_indptr, exclude_ids = exclude if exclude is not None else (np.zeros(n + 1, np.int64), EMPTY_CSR[1])
    cursor = exclude_indptr[:-1].astype(np.int64).copy()
    outranked = test_scores = None
    if test is not None:
        test_indptr, test_ids = test
        test_scores = _pair_scores(queries, source, test_indptr, test_ids)
        outranked = np.zeros(len(test_ids), np.int64)
        rank_cursor = exclude_indptr[:-1].astype(np.int64).copy()
    for ids, block in source.blocks(candidates):
        scores = queries @ block.T.astype(np.float32, copy=False)
        if test is not None:
            rank_counts_update(scores, ids, exclude_indptr, exclude_ids, rank_cursor, test_indptr, test_ids, test_scores, outranked)
        topk_update(scores, ids, exclude_indptr, exclude_ids, cursor, heap_scores, heap_ids)
    topk_finish(heap_scores, heap_ids)
    return heap_ids, heap_scores, outranked


def _pair_scores(queries, source: FactorSource, indptr: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Score of each (query, id) pair listed in a CSR, in the same precision as the blocks."""
    if not len(ids):
        return np.zeros(0, np.float32)
    rows = source.rows(ids).astype(np.float32)
    owner = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    return np.einsum("ij,ij->i", queries[owner], rows).astype(np.float32)
