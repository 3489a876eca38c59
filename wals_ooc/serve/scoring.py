"""Exact top-K of query vectors against a factor matrix, one tile of scores at a time.

The full score matrix (queries x items) never exists: a block of queries is multiplied with a
run of item factors (a BLAS matrix-matrix product into a tile small enough to stay in cache),
the tile is folded into per-query top-K heaps (and, for evaluation, into per-query rank
counts) and dropped.

When the item factors are held in memory they are kept in descending order of norm
(``NormOrder``), and a query stops early: no item after position ``p`` can score more than
``|query| * |item_p|`` (Cauchy-Schwarz), so once a query's K-th best score exceeds that bound
the rest of the catalogue cannot change its answer. ALS item norms grow with popularity, so
most users are answered after scoring a few percent of the catalogue; the answer is the same
as scoring everything.

The same scan counts, for evaluation, how many candidates outscore each held-out item (AUC):
a query's counts are final once every held-out score is either at or above the bound (no
remaining item can beat it) or below minus the bound (every remaining candidate beats it, and
they are added at once). Held-out items scoring near zero keep a query scanning further than
its top K needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import zarr

from ..kernels.rank import rank_counts_close, rank_counts_finish, rank_counts_tile, rank_counts_update
from ..kernels.topk import candidate_scores, keys_of, mask_columns, new_heaps, topk_select, topk_update, unit_rows

EMPTY_CSR = (np.zeros(1, np.int64), np.zeros(0, np.int64))
QUERY_BLOCK = 512  # queries multiplied together
FIRST_TILE = 1024  # items in the first tile of a norm-ordered scan (doubles while queries remain)
TILE_SCORES = 1 << 20  # scores per tile (4 MiB): a tile stays in the L2/L3 cache between BLAS and selection
BOUND_MARGIN = 1.0 + 1e-4  # the Cauchy-Schwarz bound, widened past float32 rounding of the scores
PRUNE = True  # stop each query at its bound (False scores every item: for benchmarks)


@dataclass
class NormOrder:
    """A factor matrix held in memory with its rows in descending order of norm.

    rows: (n, f) float32 factor rows, largest norm first; ids: (n,) int64 row id at each
    position; positions: (n,) int64 position of each row id; norms: (n,) float32, descending.
    """

    rows: np.ndarray
    ids: np.ndarray
    positions: np.ndarray
    norms: np.ndarray

    @staticmethod
    def nbytes_for(n_rows: int, factors: int) -> int:
        """Bytes a NormOrder of this shape holds (plus the block it is built from)."""
        return n_rows * (4 * factors + 20) + min(n_rows, 1 << 16) * 4 * factors

    @classmethod
    def of(cls, array: zarr.Array | np.ndarray, block_rows: int = 1 << 16) -> NormOrder:
        """Read ``array`` block by block into norm order (float32)."""
        n, f = int(array.shape[0]), int(array.shape[1])
        norms = np.empty(n, np.float32)
        for lo in range(0, n, block_rows):  # float32 blocks (what nbytes_for counts), summed in float64
            block = np.asarray(array[lo : lo + block_rows], dtype=np.float32)
            norms[lo : lo + len(block)] = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
        ids = np.argsort(-norms, kind="stable").astype(np.int64)
        positions = np.empty(n, np.int64)
        positions[ids] = np.arange(n, dtype=np.int64)
        rows = np.empty((n, f), np.float32)
        for lo in range(0, n, block_rows):
            block = np.asarray(array[lo : lo + block_rows], dtype=np.float32)
            rows[positions[lo : lo + len(block)]] = block
        return cls(rows, ids, positions, norms[ids])

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.shape

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Factor rows of the given ids (any order)."""
        return self.rows[self.positions[np.asarray(ids, np.int64)]]


@dataclass
class FactorSource:
    """Rows of a factor matrix: a Zarr array read in blocks, an in-memory copy, or a ``NormOrder``.

    normalized: divide each row by its norm as it is read (cosine similarity).
    """

    array: zarr.Array | np.ndarray | NormOrder
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
            ids = np.arange(lo, hi, dtype=np.int64)
            block = self.array.take(ids) if isinstance(self.array, NormOrder) else np.asarray(self.array[lo:hi])
            yield ids, self._prepare(block)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Factor rows of the given ids (any order), as an in-memory array."""
        return self._prepare(_take_rows(self.array, ids))

    def _prepare(self, block: np.ndarray) -> np.ndarray:
        if not self.normalized:
            return np.ascontiguousarray(block)
        block = np.ascontiguousarray(block)
        out = np.empty_like(block)
        unit_rows(block, out)  # as a cosine index stores its rows (index/ann.py), to the last bit
        return out


def _take_rows(array, ids: np.ndarray) -> np.ndarray:
    """Rows by id from a Zarr or NumPy array (Zarr wants sorted unique ids for orthogonal selection)."""
    ids = np.asarray(ids, dtype=np.int64)
    if isinstance(array, NormOrder):
        return array.take(ids)
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
    Ties are broken towards the lower id. Returns (ids (n, k) int64 with -1 padding, scores
    (n, k) float32, outranked or None).

    A query's answer does not depend on the queries asked with it: BLAS forms a tile's scores in
    an order that can depend on the tile's shape (a one-row product, small tiles), so the scan
    keeps ``k + rescore_slack(k)`` candidates and the answer is the best k of them re-scored in
    one order (``_canonical``).
    """
    wanted, k = k, k + rescore_slack(k)
    n = queries.shape[0]
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    exclude_indptr, exclude_ids = exclude if exclude is not None else (np.zeros(n + 1, np.int64), EMPTY_CSR[1])
    exclude_indptr = np.asarray(exclude_indptr, np.int64)
    exclude_ids = np.asarray(exclude_ids, np.int64)
    if isinstance(source.array, NormOrder) and candidates is None and not source.normalized:
        heap_scores, heap_ids, outranked = _norm_ordered_scan(queries, source.array, k, exclude_indptr, exclude_ids, test)
        heap_ids, heap_scores = _canonical(queries, source, heap_ids, wanted)
        return heap_ids, heap_scores, outranked
    heap_scores, heap_ids = new_heaps(n, k)
    cursor = exclude_indptr[:-1].copy()
    outranked = test_scores = None
    if test is not None:
        test_indptr, test_ids = test
        test_scores = _pair_scores(queries, source, test_indptr, test_ids)
        outranked = np.zeros(len(test_ids), np.int64)
        rank_cursor = exclude_indptr[:-1].copy()
    buffer = np.empty(max(TILE_SCORES, min(n, QUERY_BLOCK) * FIRST_TILE), np.float32)
    for ids, block in source.blocks(candidates):
        block = np.ascontiguousarray(block, dtype=np.float32)
        if test is not None:  # rank counting needs every score, before any is masked
            scores = queries @ block.T
            rank_counts_update(scores, ids, exclude_indptr, exclude_ids, rank_cursor, test_indptr, test_ids, test_scores, outranked)
            topk_update(scores, ids, exclude_indptr, exclude_ids, cursor, heap_scores, heap_ids)
            continue
        for lo in range(0, n, QUERY_BLOCK):
            hi = min(n, lo + QUERY_BLOCK)
            rows = np.arange(lo, hi, dtype=np.int64)
            width = max(FIRST_TILE, TILE_SCORES // (hi - lo))
            for c0 in range(0, len(ids), width):
                c1 = min(len(ids), c0 + width)
                scores = np.matmul(queries[lo:hi], block[c0:c1].T, out=_tile(buffer, hi - lo, c1 - c0))
                col_ids = ids[c0:c1]
                mask_columns(scores, rows, col_ids, exclude_indptr, exclude_ids, cursor)
                topk_select(scores, rows, col_ids, heap_scores, heap_ids)
    heap_ids, heap_scores = _canonical(queries, source, heap_ids, wanted)
    return heap_ids, heap_scores, outranked


def rescore_slack(k: int) -> int:
    """Candidates kept beyond the K asked, so that re-scoring can reorder near-ties at the K-th
    place: scores from two orders of summation differ by a few ulps, so only candidates that
    close to the K-th can trade places, and ``k`` more cover any but a crowd of exact ties."""
    return min(k, 64)


def _canonical(queries: np.ndarray, source: FactorSource, heap_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each query's candidates (ids, -1 = none) by scores formed one fused
    multiply-add per factor in factor order (``candidate_scores``, the order sgemm forms the
    entries of large tiles in), best first, ties towards the lower id: (ids (n, k), scores)."""
    found = heap_ids >= 0
    unique = np.unique(heap_ids[found])
    rows = np.ascontiguousarray(source.rows(unique), dtype=np.float32)
    local = np.where(found, np.searchsorted(unique, heap_ids), -1).astype(np.int64)
    scores = np.empty(heap_ids.shape, np.float32)
    candidate_scores(queries, rows, local, scores)
    order = np.lexsort((heap_ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(heap_ids, order, axis=-1), np.take_along_axis(scores, order, axis=-1)


def _tile(buffer: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) C-contiguous score tile in a reused buffer (fresh pages cost as much as BLAS)."""
    return buffer[: rows * cols].reshape(rows, cols)


def _norm_ordered_scan(queries: np.ndarray, order: NormOrder, k: int, exclude_indptr: np.ndarray,
                       exclude_ids: np.ndarray, test: tuple[np.ndarray, np.ndarray] | None = None,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Heaps of the K best items per query, visiting items by descending norm and dropping each
    query once no remaining item can enter its heap, nor (with ``test``) change the rank count
    of one of its held-out items. Returns (heap scores, heap ids, outranked or None), outranked
    as ``top_k`` returns it."""
    n = len(queries)
    n_items = order.rows.shape[0]
    heap_scores, heap_ids = new_heaps(n, k)
    exclude_keys = keys_of(exclude_indptr, exclude_ids, order.positions)
    cursor = exclude_indptr[:-1].copy()
    query_norms = np.sqrt(np.einsum("ij,ij->i", queries, queries, dtype=np.float64))
    ranks = None if test is None else _RankCounts.of(queries, order, test)
    buffer = np.empty(max(TILE_SCORES, min(n, QUERY_BLOCK) * FIRST_TILE), np.float32)
    for lo in range(0, n, QUERY_BLOCK):
        active = np.arange(lo, min(n, lo + QUERY_BLOCK), dtype=np.int64)
        block = queries[lo : lo + len(active)]
        pos, width = 0, FIRST_TILE
        while len(active) and pos < n_items:
            stop = min(n_items, pos + width)
            scores = np.matmul(block, order.rows[pos:stop].T, out=_tile(buffer, len(active), stop - pos))
            mask_columns(scores, active, np.arange(pos, stop, dtype=np.int64), exclude_indptr, exclude_keys, cursor)
            if ranks is not None:
                rank_counts_tile(scores, active, pos, ranks.indptr, ranks.keys, ranks.scores, ranks.open, ranks.beaten)
            topk_select(scores, active, order.ids[pos:stop], heap_scores, heap_ids)
            pos = stop
            if pos < n_items and PRUNE:
                bounds = query_norms[active] * (float(order.norms[pos]) * BOUND_MARGIN)
                open_ = heap_scores[active, 0] <= bounds
                if ranks is not None:
                    rank_counts_close(active, bounds, pos, n_items, ranks.indptr, ranks.keys, ranks.scores,
                                      exclude_indptr, cursor, ranks.open, ranks.beaten)
                    open_ |= ranks.open[active]
                if not open_.all():
                    active = active[open_]
                    block = queries[active]
            width = max(FIRST_TILE, min(2 * width, TILE_SCORES // max(1, len(active))))
    return heap_scores, heap_ids, None if ranks is None else ranks.outranked()


@dataclass
class _RankCounts:
    """The held-out items of a norm-ordered scan, per query (CSR segments of ``indptr``): keys
    (positions in norm order), scores ascending (the same pairs, sorted by score within a
    query), the permutation back to the caller's order, the counts being gathered and which
    queries are still counting."""

    indptr: np.ndarray
    keys: np.ndarray
    scores: np.ndarray
    order: np.ndarray
    beaten: np.ndarray
    open: np.ndarray

    @classmethod
    def of(cls, queries: np.ndarray, items: NormOrder, test: tuple[np.ndarray, np.ndarray]) -> _RankCounts:
        indptr, ids = np.asarray(test[0], np.int64), np.asarray(test[1], np.int64)
        lengths = np.diff(indptr)
        owner = np.repeat(np.arange(len(lengths)), lengths)
        pair_scores = _pair_scores(queries, FactorSource(items, 1), indptr, ids)
        order = np.lexsort((pair_scores, owner))  # by query, then ascending score
        return cls(indptr, items.positions[ids[order]], pair_scores[order], order, np.zeros(len(ids), np.int64),
                   lengths > 0)

    def outranked(self) -> np.ndarray:
        """Candidates scoring above each held-out item, in the caller's order."""
        counts = np.empty(len(self.beaten), np.int64)
        rank_counts_finish(self.indptr, self.beaten, counts)
        out = np.empty_like(counts)
        out[self.order] = counts
        return out


def _pair_scores(queries, source: FactorSource, indptr: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Score of each (query, id) pair listed in a CSR, in the same precision as the blocks."""
    if not len(ids):
        return np.zeros(0, np.float32)
    rows = source.rows(ids).astype(np.float32)
    owner = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    return np.einsum("ij,ij->i", queries[owner], rows).astype(np.float32)
