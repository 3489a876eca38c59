"""Row solves against a fixed side streamed in row blocks, for when it does not fit in memory.

The fixed side is read block by block (columns ``[block_lo, block_hi)`` of the shard's rows);
columns are sorted within each row, so each row's entries in a block start at its ``cursor``
and the cursor only moves forward: one sweep of the blocks visits every entry once. The
notation is that of ``solve``.

Three ways:

- Expanded rows: the task marks the distinct columns its entries use (a bit a fixed row) and
  renumbers its entries by their rank among them; one sweep copies those fixed rows, in column
  order, into a compact (distinct columns, f) array, and the resident kernels solve against it
  with the renumbered entries: the very same arithmetic (at most f numbers an entry, fewer when
  entries share columns; for tasks whose entries fit). The copy reads each block's rows in
  increasing order and writes the compact rows one after another.
- Conjugate gradient, one sweep of the blocks per CG pass ("column blocks outermost"): a row
  keeps only its CG vectors (x, r, p, Ap: 4f numbers), so a task can hold many rows and every
  block is read once per pass for all of them. The dense part of each product (gram @ p for all
  rows at once) is one matrix-matrix product done by the caller between passes.
- Exact normal equations: each row's f x f system accumulated block by block (as Spark's block
  ALS does), then Cholesky. 8 f^2 bytes a row, so only small row batches fit.

Both return the observed part of the objective at the solution without another sweep.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .solve import (SUM_GROUP, _JIT, _add_rank_one_lower, _dot, _invert_diagonal, _preconditioned_dot, cholesky_solve_inplace, confidence,
                    row_regularization)
from .tile import HALF_LIMIT, HALF_TINY, _half_bits_kernel

CONVERGED = 1e-20  # a row whose squared residual is below this takes no more CG steps


@njit(**_JIT)
def row_regularizations(indptr, lam, nu, alpha0, n_fixed, out):
    """out[u] = lam * (n_u + alpha0 * n_fixed) ** nu for every row (out's dtype)."""
    T = out.dtype.type
    for u in range(len(indptr) - 1):
        out[u] = T(row_regularization(indptr[u + 1] - indptr[u], lam, nu, alpha0, n_fixed))


# ---------------------------------------------------------------------------------------------
# Expanded rows: the distinct fixed rows a task's entries use, copied out in column order
# ---------------------------------------------------------------------------------------------

_ONE = np.uint64(1)


@njit(**_JIT)
def _popcount(word):
    """Set bits of a uint64 (the SWAR count: no table, no branch)."""
    word = word - ((word >> _ONE) & np.uint64(0x5555555555555555))
    word = (word & np.uint64(0x3333333333333333)) + ((word >> np.uint64(2)) & np.uint64(0x3333333333333333))
    word = (word + (word >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((word * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(**_JIT)
def mark_columns(indices, bits):
    """Set bit ``j`` of ``bits`` (uint64 words, zeroed by the caller) for every column ``j`` of ``indices``."""
    for e in range(len(indices)):
        j = np.int64(indices[e])
        bits[j >> 6] |= _ONE << np.uint64(j & 63)


@njit(**_JIT)
def column_ranks(bits, first):
    """first[w] = set bits in the words before w (len(bits) + 1 entries); returns the total:
    the distinct columns marked, and the rank of column j is first[j >> 6] plus the set bits
    below j in its word."""
    total = 0
    for w in range(len(bits)):
        first[w] = total
        total += _popcount(bits[w])
    first[len(bits)] = total
    return total


@njit(**_JIT)
def renumber_columns(indices, bits, first, out):
    """out[e] = the rank of indices[e] among the marked columns (see ``column_ranks``)."""
    for e in range(len(indices)):
        j = np.int64(indices[e])
        w = j >> 6
        below = (_ONE << np.uint64(j & 63)) - _ONE
        out[e] = first[w] + _popcount(bits[w] & below)


def _store_row(source, target):
    raise NotImplementedError("numba kernels only: see gather_marked")


@overload(_store_row, inline="always")
def _store_row_overload(source, target):
    """target[:] = source, or the float16 bits of source (rounded as ``tile.half_rows`` rounds)
    when target holds uint16: chosen when compiled, no branch a row."""
    if isinstance(target, types.Array) and target.dtype == types.uint16:
        def half(source, target):
            for k in range(len(target)):
                target[k] = _half_bits_kernel(source[k])
        return half

    def same(source, target):
        for k in range(len(target)):
            target[k] = source[k]
    return same


@njit(cache=True, nogil=True)
def half_counts(rows):
    """(overflows, tiny) of a (n, f) float32 array, counted as ``tile.half_rows`` counts them for
    ``tile.half_usable``: finite values beyond float16's largest, non-zero values below its
    smallest normal (not fastmath: the comparisons with inf must stay)."""
    overflows = 0
    tiny = 0
    for i in range(rows.shape[0]):
        for k in range(rows.shape[1]):
            magnitude = np.abs(rows[i, k])
            overflows += magnitude > HALF_LIMIT and magnitude < np.inf
            tiny += magnitude < HALF_TINY and magnitude > 0
    return overflows, tiny


@njit(**_JIT)
def gather_marked(bits, first, row_lo, row_hi, block_lo, Y_block, compact):
    """compact[rank(j)] = Y[j] for every marked column j in [row_lo, row_hi) (rows of the mapped
    block ``Y_block``, whose first row is ``block_lo``): the block's rows are read in increasing
    order and the compact rows written one after another. A uint16 ``compact`` receives the rows'
    float16 bits (``tile.half_rows``'s rounding: the rows CG's float16 gathers read)."""
    if row_hi <= row_lo:
        return
    for w in range(row_lo >> 6, ((row_hi - 1) >> 6) + 1):
        word = bits[w]
        base = np.int64(w) << 6
        if base < row_lo:  # drop the columns before row_lo (they belong to another part or block)
            cut = np.uint64(row_lo - base)
            rank = first[w] + _popcount(word & ((_ONE << cut) - _ONE))
            word = (word >> cut) << cut
        else:
            rank = first[w]
        if base + 64 > row_hi:
            word &= (_ONE << np.uint64(row_hi - base)) - _ONE
        while word:
            low = word & (~word + _ONE)
            j = base + _popcount(low - _ONE)
            _store_row(Y_block[j - block_lo], compact[rank])
            rank += 1
            word ^= low


# ---------------------------------------------------------------------------------------------
# Conjugate gradient, one sweep of the fixed blocks per pass
# ---------------------------------------------------------------------------------------------


@njit(**_JIT)
def _gather_segment(indices, first, last, block_lo, Y_block, gather):
    """Copy the block rows of entries [first, last) into gather[:last - first]: a loop of
    independent loads, which keeps many cache misses in flight (chasing them one by one between
    the arithmetic would wait for each)."""
    f = Y_block.shape[1]
    for t in range(last - first):
        source = Y_block[indices[first + t] - block_lo]
        for k in range(f):
            gather[t, k] = source[k]


@njit(**_JIT)
def _advance(indptr, indices, cursor, u, block_hi):
    """Row u's entries in the current column block: [idx, end) from its cursor (idx == end when
    none); the cursor moves past them."""
    idx = cursor[u]
    stop = indptr[u + 1]
    end = idx
    while end < stop and indices[end] < block_hi:
        end += 1
    cursor[u] = end
    return idx, end


@njit(**_JIT)
def cg_residual_block(indptr, indices, values, cursor, block_lo, block_hi, Y_block, X, R, gather,
                      kind, alpha, alpha0, eps, squares=None):
    """R[u] += sum over the row's entries in the block of (c - (c - alpha0) y.x_u) y; given
    ``squares`` (Jacobi), also squares[u] += sum of (c - alpha0) y * y (elementwise).

    Summed over every block this is b - S x of the row's system (the sparse part of the
    residual) and the diagonal of S; ``cg_begin`` adds the dense parts. gather: (m, f) scratch
    in Y's dtype.
    """
    n_rows, f = X.shape
    T = X.dtype.type
    cap = gather.shape[0]
    part = np.zeros(f, dtype=X.dtype)  # SUM_GROUP entries summed apart, then added to R[u] (as ``solve._cg_row``)
    for u in range(n_rows):
        idx, end = _advance(indptr, indices, cursor, u, block_hi)
        if idx == end:
            continue
        x = X[u]
        r = R[u]
        for first in range(idx, end, cap):
            last = min(end, first + cap)
            _gather_segment(indices, first, last, block_lo, Y_block, gather)
            for t in range(last - first):
                y = gather[t]
                c = T(confidence(values[first + t], kind, alpha, alpha0, eps))
                coef = c - (c - alpha0) * _dot(y, x, f)
                for k in range(f):
                    part[k] += coef * y[k]
                if (t + 1) % SUM_GROUP == 0 or t == last - first - 1:
                    for k in range(f):
                        r[k] += part[k]
                        part[k] = 0
                if squares is not None:
                    w = c - alpha0
                    sq = squares[u]
                    for k in range(f):
                        sq[k] += w * y[k] * y[k]


@njit(**_JIT)
def cg_product_block(indptr, indices, values, cursor, block_lo, block_hi, Y_block, P, AP, X, loss_terms, with_loss,
                     gather, kind, alpha, alpha0, eps):
    """AP[u] += sum over the row's entries in the block of (c - alpha0) (y.p_u) y.

    with_loss: also accumulate, per row, the observed loss at x_u + t p_u as a polynomial in
    the step t: loss_terms[u] += (sum c(1-s)^2 - alpha0 s^2, -2 sum q (c(1-s) + alpha0 s),
    sum (c - alpha0) q^2) with s = y.x_u, q = y.p_u (float64). gather: (m, f) scratch.
    """
    n_rows, f = X.shape
    T = X.dtype.type
    cap = gather.shape[0]
    part = np.zeros(f, dtype=X.dtype)  # SUM_GROUP entries summed apart, then added to AP[u] (as ``solve._cg_row``)
    for u in range(n_rows):
        idx, end = _advance(indptr, indices, cursor, u, block_hi)
        if idx == end:
            continue
        p = P[u]
        ap = AP[u]
        x = X[u]
        for first in range(idx, end, cap):
            last = min(end, first + cap)
            _gather_segment(indices, first, last, block_lo, Y_block, gather)
            for t in range(last - first):
                y = gather[t]
                c = T(confidence(values[first + t], kind, alpha, alpha0, eps))
                w = c - alpha0
                q = _dot(y, p, f)
                coef = w * q
                for k in range(f):
                    part[k] += coef * y[k]
                if (t + 1) % SUM_GROUP == 0 or t == last - first - 1:
                    for k in range(f):
                        ap[k] += part[k]
                        part[k] = 0
                if with_loss:
                    s = np.float64(_dot(y, x, f))
                    c64, q64 = np.float64(c), np.float64(q)
                    loss_terms[u, 0] += c64 * (1.0 - s) * (1.0 - s) - alpha0 * s * s
                    loss_terms[u, 1] -= 2.0 * q64 * (c64 * (1.0 - s) + alpha0 * s)
                    loss_terms[u, 2] += (c64 - alpha0) * q64 * q64


@njit(**_JIT)
def cg_begin(X, R, XG, reg, P, rs, inv=None, gram=None):
    """Finish the residual r = b - A x (R holds b - S x; XG = X @ gram), set p = r, rs = r.r.

    Jacobi (``inv`` holding the diagonal of S from ``cg_residual_block``, and the Gram): inv =
    1 / diag(A), p = z = inv * r, rs = r.z, and rs = 0 for a row whose r.r is below
    ``CONVERGED`` (as ``solve.cg_solve_rows``: the exit tests r.r)."""
    n_rows, f = X.shape
    for u in range(n_rows):
        r = R[u]
        for k in range(f):
            r[k] -= XG[u, k] + reg[u] * X[u, k]
            P[u, k] = r[k]
        rs[u] = _dot(r, r, f)
        if inv is not None:  # Jacobi: the Gram is given too
            d = inv[u]
            for k in range(f):
                d[k] += gram[k, k] + reg[u]
            _invert_diagonal(d, f, True)
            if rs[u] < CONVERGED:
                rs[u] = 0
                continue
            rs[u] = _preconditioned_dot(r, d, f)
            for k in range(f):
                P[u, k] = r[k] * d[k]


@njit(**_JIT)
def cg_step(X, R, P, AP, PG, reg, rs, steps, inv=None):
    """One CG step for every row still above ``CONVERGED`` (AP holds the sparse part of A p;
    PG = P @ gram). steps[u] receives the step length taken (0 for a converged row). Given
    ``inv`` (Jacobi, from ``cg_begin``): preconditioned, rs = r.z, 0 once r.r is below ``CONVERGED``."""
    n_rows, f = X.shape
    for u in range(n_rows):
        steps[u] = 0
        if rs[u] < CONVERGED if inv is None else rs[u] == 0:  # converged (a NaN steps on, so the NaN reaches x)
            continue
        p, ap, x, r = P[u], AP[u], X[u], R[u]
        for k in range(f):
            ap[k] += PG[u, k] + reg[u] * p[k]
        step = rs[u] / _dot(p, ap, f)
        for k in range(f):
            x[k] += step * p[k]
            r[k] -= step * ap[k]
        steps[u] = step
        rs_new = _dot(r, r, f)
        if rs_new < CONVERGED:
            rs[u] = rs_new if inv is None else 0
            continue
        if inv is not None:
            d = inv[u]
            rs_new = _preconditioned_dot(r, d, f)
            beta = rs_new / rs[u]
            for k in range(f):
                p[k] = r[k] * d[k] + beta * p[k]
        else:
            beta = rs_new / rs[u]
            for k in range(f):
                p[k] = r[k] + beta * p[k]
        rs[u] = rs_new


@njit(**_JIT)
def cg_observed_loss(loss_terms, steps):
    """sum_u of the observed loss at each row's final x: the polynomial of ``cg_product_block`` at its last step."""
    total = 0.0
    for u in range(len(steps)):
        t = np.float64(steps[u])
        total += loss_terms[u, 0] + t * (loss_terms[u, 1] + t * loss_terms[u, 2])
    return total


# ---------------------------------------------------------------------------------------------
# Exact normal equations, accumulated block by block
# ---------------------------------------------------------------------------------------------


@njit(**_JIT)
def accumulate_block(indptr, indices, values, cursor, block_lo, block_hi, Y_block, A, b, c_sum, kind, alpha, alpha0, eps):
    """Add the entries with column in [block_lo, block_hi) to each row's normal equations.

    A: (n_rows, f, f) float64, lower triangles; b: (n_rows, f) float64; c_sum: (n_rows,)
    float64, the sum of the row's confidences (for the loss); cursor: (n_rows,) int64, each
    row's next unread entry (start it at indptr[:-1]).
    """
    n_rows = len(indptr) - 1
    f = Y_block.shape[1]
    for u in range(n_rows):
        idx = cursor[u]
        stop = indptr[u + 1]
        while idx < stop and indices[idx] < block_hi:
            y = Y_block[indices[idx] - block_lo]
            c = np.float64(confidence(values[idx], kind, alpha, alpha0, eps))
            _add_rank_one_lower(A[u], y, c - alpha0, f)
            for k in range(f):
                b[u, k] += c * y[k]
            c_sum[u] += c
            idx += 1
        cursor[u] = idx


@njit(**_JIT)
def solve_accumulated(indptr, A, b, c_sum, gram, X, lam, nu, alpha0, n_fixed):
    """Finish blocked normal equations (add gram and reg), solve each row into X.

    Returns (rows whose system was not positive definite, set to zero; the observed loss
    sum c (1 - s)^2 - alpha0 s^2 over the rows' entries at their new x). The loss needs no
    pass over the fixed side: with S = sum (c - alpha0) y y^T and (gram + reg I + S) x = b it
    is sum c - 2 x.b + x^T S x = sum c - x.b - x^T gram x - reg |x|^2 (0 for x = 0).
    """
    n_rows, f = X.shape
    failures = 0
    observed = 0.0
    rhs = np.empty(f, dtype=np.float64)
    for u in range(n_rows):
        reg = row_regularization(indptr[u + 1] - indptr[u], lam, nu, alpha0, n_fixed)
        Au = A[u]
        for i in range(f):
            rhs[i] = b[u, i]
            for k in range(i + 1):
                Au[i, k] += gram[i, k]
            Au[i, i] += reg
        x = b[u]
        if cholesky_solve_inplace(Au, x, f):
            for k in range(f):
                X[u, k] = x[k]
        else:
            failures += 1
            for k in range(f):
                X[u, k] = 0
                x[k] = 0.0
        row = c_sum[u]
        for i in range(f):
            gx = 0.0
            for k in range(f):
                gx += gram[i, k] * x[k]
            row -= x[i] * (rhs[i] + gx + reg * x[i])
        observed += row
    return failures, observed
