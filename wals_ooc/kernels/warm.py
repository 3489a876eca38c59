"""Load every kernel a stage will call, with the argument types it will call them with, before
the stage measures its memory baseline.

Loading a compiled Numba kernel (from its on-disk cache, or compiling it the first time) costs
tens of MB of LLVM state per process whatever the data size, so it belongs to the baseline the
budget's allowance is counted from, not to the allowance. ``tests/test_train.py`` checks that a
training run adds no kernel signature beyond these.
"""

from __future__ import annotations

import numpy as np

from .blocked import (
    accumulate_block,
    cg_begin,
    cg_observed_loss,
    cg_product_block,
    cg_residual_block,
    cg_step,
    column_ranks,
    gather_marked,
    half_counts,
    mark_columns,
    renumber_columns,
    row_regularizations,
    solve_accumulated,
)
from .csr import csr_problem
from .loss import observed_loss_block, regularization_sum
from .rank import rank_counts_close, rank_counts_finish, rank_counts_tile, rank_counts_update
from .solve import CONFIDENCE_KINDS, GATHER_MAX_ENTRIES, cg_solve_rows, cholesky_solve_rows
from .subspace import subspace_solve_rows
from .tile import half_rows
from .topk import candidate_scores, keys_of, mask_columns, new_heaps, select_candidates, topk_finish, topk_select, topk_update, unit_rows
from .assemble import (
    bucket_order,
    bucket_scatter,
    bucket_scatter_by_table,
    count_dense_ids,
    csr_by_columns_into,
    csr_from_entries,
    csr_into,
    fill_dense_table,
    id_range,
    map_dense_ids,
    map_dense_offsets,
    segment_sums,
)
from .text import (
    chunk_runs,
    csv_record_end,
    csv_record_lines,
    distinct_by_hash,
    equal_pairs,
    gather_ranges,
    hash_strings,
    parse_ints,
    parse_ints_each,
    parse_plain_csv,
    scan_chunk,
)

_warmed: set[tuple | str] = set()  # (dtype, solver, ...) training keys, "ids", "serve"


def _tiny_rows(dtype: np.dtype):
    """Two rows of a 3-column problem, typed as the store reader and the trainer type them."""
    indptr = np.array([0, 2, 3], np.int64)
    indices = np.array([0, 2, 1], np.int32)
    values = np.array([1.0, 2.0, 3.0], np.float32)
    Y = np.eye(3, 2, dtype=dtype) + dtype.type(0.1)
    gram = (Y.T @ Y).astype(dtype)
    return indptr, indices, values, Y, gram


def warm_training_kernels(dtype: str | np.dtype = "float32") -> None:
    """Every solve and loss kernel, in ``dtype`` (training's and fold-in's signatures)."""
    dtype = np.dtype(dtype)
    key = ("train", dtype.str)
    if key in _warmed:
        return
    t = dtype.type
    kind = CONFIDENCE_KINDS["linear"]  # the kind is a runtime int: one signature for all
    indptr, indices, values, Y, gram = _tiny_rows(dtype)
    csr_problem(indptr, indices, 3)  # every CSR read from a store is checked with it
    X = np.zeros((2, 2), dtype)
    scalars = (kind, t(1.0), t(1.0), t(1.0))
    halves: list[np.ndarray | None] = [None]  # the resident path passes its float16 copy, or None (``solve.gathers_half``)
    if dtype == np.float32:
        halves.append(np.zeros(Y.shape, np.uint16))
        half_rows(Y, halves[-1], 0, Y.shape[0])
    for half in halves:
        for jacobi in (True, False):  # WALSConfig.cg_preconditioner
            cg_solve_rows(indptr, indices, values, Y, gram, X, *scalars, 0.1, 0.0, 3, 2, True, half, jacobi)
    cholesky_solve_rows(indptr, indices, values, Y, gram, X, *scalars, 0.1, 0.0, 3)
    subspace_solve_rows(indptr, indices, values, Y, gram, X, *scalars, 0.1, 0.0, 3, 1, 1, True, GATHER_MAX_ENTRIES, False)  # as half_sweep calls it
    A = np.zeros((2, 2, 2), np.float64)
    b = np.zeros((2, 2), np.float64)
    c_sum = np.zeros(2)
    cursor = indptr[:-1].copy()
    accumulate_block(indptr, indices, values, cursor, 0, 3, Y, A, b, c_sum, *scalars)
    solve_accumulated(indptr, A, b, c_sum, gram, X, 0.1, 0.0, 1.0, 3)
    # blocked CG, with the argument types half_sweep passes (row slices of C arrays)
    reg, rs, steps = np.zeros(2, dtype), np.zeros(2, dtype), np.zeros(2, dtype)
    row_regularizations(indptr, 0.1, 0.0, 1.0, 3, reg)
    R, P, AP, D = (np.zeros((2, 2), dtype) for _ in range(4))
    loss_terms = np.zeros((2, 3))
    gather = np.zeros((4, 2), dtype)
    cursor = indptr[:-1].copy()
    bits = np.zeros(1, np.uint64)  # expanded blocked tasks: their distinct columns, renumbered and copied
    mark_columns(indices, bits)
    first = np.empty(2, np.int64)
    column_ranks(bits, first)
    renumbered = np.empty(3, np.int32)
    renumber_columns(indices, bits, first, renumbered)
    gather_marked(bits, first, 0, 3, 0, Y, np.zeros((3, 2), dtype))
    if dtype == np.float32:  # CG's expanded tasks: compact float16 rows, and the side's counts (``ScratchCopy``)
        gather_marked(bits, first, 0, 3, 0, Y, np.zeros((3, 2), np.uint16))
        half_counts(Y)
    cursor = indptr[:-1].copy()
    cg_residual_block(indptr[0:3], indices, values, cursor[0:2], 0, 3, Y, X[0:2], R[0:2], gather, *scalars)
    cg_begin(X[0:2], R[0:2], D[0:2], reg[0:2], P[0:2], rs[0:2])
    inv = np.zeros((2, 2), dtype)  # Jacobi (WALSConfig.cg_preconditioner): the diagonals' signatures
    cursor = indptr[:-1].copy()
    cg_residual_block(indptr[0:3], indices, values, cursor[0:2], 0, 3, Y, X[0:2], R[0:2], gather, *scalars, inv[0:2])
    cg_begin(X[0:2], R[0:2], D[0:2], reg[0:2], P[0:2], rs[0:2], inv[0:2], gram)
    for with_loss in (False, True):
        cursor = indptr[:-1].copy()
        cg_product_block(indptr[0:3], indices, values, cursor[0:2], 0, 3, Y, P[0:2], AP[0:2], X[0:2], loss_terms[0:2],
                         with_loss, gather, *scalars)
    cg_step(X[0:2], R[0:2], P[0:2], AP[0:2], D[0:2], reg[0:2], rs[0:2], steps[0:2])
    cg_step(X[0:2], R[0:2], P[0:2], AP[0:2], D[0:2], reg[0:2], rs[0:2], steps[0:2], inv[0:2])
    cg_observed_loss(loss_terms, steps)
    regularization_sum(indptr, X, 0.1, 0.0, 1.0, 3)
    cursor = indptr[:-1].copy()
    observed_loss_block(indptr, indices, values, cursor, 0, 3, Y, X, *scalars)
    _warmed.add(key)


def warm_id_kernels() -> None:
    """The id map and input kernels (hashing, parsing, lookups, CSV record scanning) and the
    assembly sums: what convert, split and every id lookup call."""
    if "ids" in _warmed:
        return
    writable = (np.array([0, 1, 3], np.int64), np.frombuffer(b'7"a', np.uint8).copy())
    readonly = (np.frombuffer(writable[0].tobytes(), np.int64), np.frombuffer(b'7"a', np.uint8))  # as from Arrow
    order = np.arange(2, dtype=np.int64)
    for offsets, data in (writable, readonly):
        hashes = hash_strings(offsets, data)
        parse_ints(offsets, data, True)
        parse_ints_each(offsets, data, False)
        distinct_by_hash(np.sort(hashes), order, offsets, data)
        gather_ranges(data, 0, order, order + 1, np.zeros(2, np.uint8), np.arange(3, dtype=np.int64))
        csv_record_end(data, 0, 44, 34)
        csv_record_lines(data, 44, 34)
        parse_plain_csv(data, 3, 0, 1, 2, 44)
        scan_chunk(data)
        for other in (writable, readonly):
            equal_pairs(offsets, data, order, other[0], other[1], order)
    chunk_runs(order, order, 2)
    segment_sums(np.ones(3, np.float32), np.array([0, 2], np.int64))
    # conversion's passes: records as the writer holds them (fields of a structured array),
    # ids as Arrow hands them over (read-only int64)
    records = np.zeros(3, np.dtype([("row", "<i4"), ("col", "<i4"), ("value", "<f4")]))
    csr_from_entries(records["row"], records["col"], records["value"], 0, 1, 1)
    csr_into(records["row"], records["col"], records["value"], 0, 1, 1, np.zeros(2, np.int64), np.zeros(3, np.int32),
             np.zeros(3, np.float32), np.zeros(2, np.int64), np.zeros(3, np.int32), np.zeros(3, np.float64))
    csr_by_columns_into(records["row"], records["col"], records["value"], 0, 1, 1, np.zeros(2, np.int64),
                        np.zeros(3, np.int32), np.zeros(3, np.float32), np.zeros(2, np.int64), np.zeros(3, np.int32),
                        np.zeros(3, np.float32), np.zeros(2, np.int64), np.zeros(3, np.int32), np.zeros(3, np.float64))
    bucket_order(np.ascontiguousarray(records["row"]), np.array([0, 1], np.int64))
    grouped = np.zeros(3, records.dtype)
    bucket_scatter(records["row"], records["col"], records["value"], np.array([0, 1], np.int64), grouped["row"],
                   grouped["col"], grouped["value"])
    bucket_scatter_by_table(records["row"], records["col"], records["value"], np.zeros(1, np.int32), 1, grouped["row"],
                            grouped["col"], grouped["value"])
    table = np.full(2, -1, np.int32)
    fill_dense_table(order, 0, table)
    map_dense_ids(np.frombuffer(order.tobytes(), np.int64), 0, table, np.zeros(2, np.int64))
    map_dense_offsets(np.zeros(2, np.uint32), 0, table, np.zeros(2, np.int64))  # the spill's id offsets
    for ids in (order, np.frombuffer(order.tobytes(), np.int64)):  # pass 1's entries per integer id
        id_range(ids)
        count_dense_ids(ids, 0, np.zeros(2, np.int64))
    _warmed.add("ids")


def warm_serving_kernels() -> None:
    """Top-K and rank counting over float32 score blocks, and the id lookups serving does."""
    if "serve" in _warmed:
        return
    warm_id_kernels()
    csr_problem(np.array([0, 1], np.int64), np.array([0], np.int32), 1)  # filtering reads CSR rows
    scores = np.ones((2, 3), np.float32)
    ids = np.arange(3, dtype=np.int64)
    exclude_indptr = np.array([0, 1, 1], np.int64)
    exclude_ids = np.array([1], np.int64)
    heap_scores, heap_ids = new_heaps(2, 2)
    topk_update(scores.copy(), ids, exclude_indptr, exclude_ids, exclude_indptr[:-1].copy(), heap_scores, heap_ids)
    rows = np.arange(2, dtype=np.int64)
    keys = keys_of(exclude_indptr, exclude_ids, ids)
    mask_columns(scores, rows, ids, exclude_indptr, keys, exclude_indptr[:-1].copy())
    topk_select(scores, rows, ids, heap_scores, heap_ids)
    select_candidates(np.ones((2, 3), np.int64), scores, rows, exclude_indptr, exclude_ids, heap_scores, heap_ids)
    topk_finish(heap_scores, heap_ids)
    candidate_rows = np.ones((4, 3), np.float32)
    candidate_scores(np.ones((2, 3), np.float32), candidate_rows, np.array([[0, 1], [-1, 3]], np.int64),
                     np.empty((2, 2), np.float32))
    candidate_rows.flags.writeable = False  # an HNSW index's flat storage is scored through a read-only view
    candidate_scores(np.ones((2, 3), np.float32), candidate_rows, np.array([[0, 1], [-1, 3]], np.int64),
                     np.empty((2, 2), np.float32))
    unit_rows(np.ones((2, 3), np.float32), np.empty((2, 3), np.float32))
    test_indptr = np.array([0, 1, 1], np.int64)
    rank_counts_update(scores, ids, exclude_indptr, exclude_ids, exclude_indptr[:-1].copy(), test_indptr,
                       np.array([2], np.int64), np.ones(1, np.float32), np.zeros(1, np.int64))
    # the norm-ordered scan's rank counting (evaluate's AUC)
    auc_open = np.ones(2, np.bool_)
    beaten = np.zeros(1, np.int64)
    rank_counts_tile(scores, rows, 0, test_indptr, np.array([2], np.int64), np.ones(1, np.float32), auc_open, beaten)
    rank_counts_close(rows, np.ones(2), 3, 3, test_indptr, np.array([2], np.int64), np.ones(1, np.float32),
                      exclude_indptr, exclude_indptr[:-1].copy(), auc_open, beaten)
    rank_counts_finish(test_indptr, beaten, np.zeros(1, np.int64))
    _warmed.add("serve")
