"""iALS++ row solves: block coordinate descent over subspaces of ``block_size`` coordinates
(Rendle, Krichene, Zhang & Koren 2021, "iALS++: Speeding up Matrix Factorization with Subspace
Optimization"), for the objective and normal equations of ``solve`` (same arguments, same
confidence forms, alpha0 and nu).

For a row x with normal equations A x = b (A = gram + sum_t w_t y_t y_t^T + reg I, b = sum_t c_t
y_t, w_t = c_t - alpha0), a block B of coordinates is minimised exactly with the others held:

    A_BB d = r_B,   r_B = b_B - (A x)_B = sum_t (c_t - w_t s_t) y_tB - gram_B: x - reg x_B,
    x_B += d,       s_t += y_tB . d

where s_t = x . y_t is the row's prediction cache over its entries. A block costs
n_u b^2 (its b x b system) + n_u b (residual, cache) + f b (the Gram rows) + b^3 / 6 (Cholesky),
so a sweep over the f / b blocks costs n_u f b + f^2 + f b^2 / 6 against CG's (1 + steps) f^2
and Cholesky's n_u f^2 + f^3 / 6. Each block step is an exact minimisation of a convex
quadratic, so the row's objective never rises; repeated sweeps converge to the closed form
(Gauss-Seidel by blocks on a symmetric positive definite system).

A row's fixed factors are gathered once, transposed (f x n_u, contiguous), into a scratch
block that every sweep reads from cache: then the block's system, residual and cache update are
all loops over the row's entries (dot products and axpys of length n_u, which vectorise), where
the entry-by-entry outer products of a row-major layout did not (measured 8-10x slower at
b = 16). A row longer than the scratch block is done in chunks of it, gathering each chunk's
block columns twice per block (system, then cache update).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .solve import _JIT, GATHER_MAX_ENTRIES, cholesky_solve_inplace, confidence, max_row_nnz, row_regularization


# a gathered row's entries are padded with zeros (weight 0) to a multiple of this: the entry
# loops then run only their vectorised body (8 float32 lanes), never the scalar remainder. The
# tiled system loops (8 accumulators) are not unrolled further, so 8 is enough; 32 (what the
# one-accumulator loops, unrolled 4 times, needed) costs up to 31 wasted entries a row
ENTRY_PAD = 8


@njit(**_JIT)
def _gather_columns(Y, indices, start, n, k0, kb, out):
    """out[i, t] = Y[indices[start + t], k0 + i] for i < kb, t < n, and 0 for n <= t < out's
    width (out: kb x width)."""
    for t in range(n):
        source = Y[indices[start + t]]
        for i in range(kb):
            out[i, t] = source[k0 + i]
    for i in range(kb):
        for t in range(n, out.shape[1]):
            out[i, t] = 0


@njit(**_JIT)
def _scores(Y, indices, start, n, x, scores):
    """scores[t] = Y[indices[start + t]] . x (one pass over the row's fixed rows)."""
    f = x.shape[0]
    for t in range(n):
        source = Y[indices[start + t]]
        total = x.dtype.type(0)
        for k in range(f):
            total += source[k] * x[k]
        scores[t] = total


@njit(**_JIT)
def _accumulate(YT, k0, n, conf, weight, scores, w0, w1, A, r, kb):
    """Add the entries' part of the block's system and residual: A += sum_t w_t y_tB y_tB^T
    (lower triangle; a few entries above it too), r += sum_t (c_t - w_t s_t) y_tB; rows k0..
    k0 + kb of YT are the block's columns (YT whole, C order: a slice of it would lose the layout
    the loops vectorise on). w0 and w1 are scratch of n entries.

    The system is built in 2 x 4 register tiles: two weighted block rows (w_t y_ti) against four
    block rows, eight dot products over the entries in one pass, so each pass reads six entry
    vectors for eight multiply-adds (one dot product at a time read two for one, and its
    horizontal sum and loop overhead were paid 8 times as often): 1.3-2x faster than that at
    f = 256, b = 16-32, 24-150 entries (tools/RESULTS.md, issue 11 round 22)."""
    T = r.dtype.type
    for i in range(kb):
        y = YT[k0 + i]
        acc = T(0)
        for t in range(n):
            acc += (conf[t] - weight[t] * scores[t]) * y[t]
        r[i] += acc
    i0 = 0
    while i0 + 2 <= kb:
        ya = YT[k0 + i0]
        yb = YT[k0 + i0 + 1]
        for t in range(n):
            w0[t] = weight[t] * ya[t]
            w1[t] = weight[t] * yb[t]
        c = 0
        while c <= i0 + 1:  # column tiles reaching the diagonal
            if c + 4 <= kb:
                y0 = YT[k0 + c]
                y1 = YT[k0 + c + 1]
                y2 = YT[k0 + c + 2]
                y3 = YT[k0 + c + 3]
                a00 = T(0)
                a01 = T(0)
                a02 = T(0)
                a03 = T(0)
                a10 = T(0)
                a11 = T(0)
                a12 = T(0)
                a13 = T(0)
                for t in range(n):
                    v0 = w0[t]
                    v1 = w1[t]
                    a00 += v0 * y0[t]
                    a01 += v0 * y1[t]
                    a02 += v0 * y2[t]
                    a03 += v0 * y3[t]
                    a10 += v1 * y0[t]
                    a11 += v1 * y1[t]
                    a12 += v1 * y2[t]
                    a13 += v1 * y3[t]
                A[i0, c] += a00
                A[i0, c + 1] += a01
                A[i0, c + 2] += a02
                A[i0, c + 3] += a03
                A[i0 + 1, c] += a10
                A[i0 + 1, c + 1] += a11
                A[i0 + 1, c + 2] += a12
                A[i0 + 1, c + 3] += a13
            else:  # the block's last columns, fewer than 4
                for i in range(i0, i0 + 2):
                    w = w0 if i == i0 else w1
                    for k in range(c, min(kb, c + 4)):
                        y = YT[k0 + k]
                        acc = T(0)
                        for t in range(n):
                            acc += w[t] * y[t]
                        A[i, k] += acc
            c += 4
        i0 += 2
    if i0 < kb:  # an odd last row
        ya = YT[k0 + i0]
        for t in range(n):
            w0[t] = weight[t] * ya[t]
        for k in range(i0 + 1):
            y = YT[k0 + k]
            acc = T(0)
            for t in range(n):
                acc += w0[t] * y[t]
            A[i0, k] += acc


@njit(**_JIT)
def _update_scores(YT, k0, n, step, scores, kb):
    """scores[t] += y_tB . step, as axpys over the entries (rows k0.. k0 + kb of YT)."""
    for i in range(kb):
        d = step[i]
        for t in range(n):
            scores[t] += d * YT[k0 + i, t]


@njit(**_JIT)
def _begin_block(gram, x, reg, k0, kb, A, r):
    """The block's system and residual before the entries: gram_BB + reg I and -gram_B: x - reg x_B."""
    f = x.shape[0]
    T = x.dtype.type
    for i in range(kb):
        for k in range(i + 1):
            A[i, k] = gram[k0 + i, k0 + k]
        A[i, i] += reg
        g = gram[k0 + i]
        acc = T(0)
        for k in range(f):
            acc += g[k] * x[k]
        r[i] = -acc - reg * x[k0 + i]


@njit(**_JIT)
def _solve_block(A, r, A64, d64, x, k0, kb):
    """Solve A d = r (float64 Cholesky of the lower triangle), x_B += d, and leave d in r.
    Returns False (and changes nothing) when A is not positive definite: in exact arithmetic it
    always is, a principal block of the row's positive definite matrix."""
    for i in range(kb):
        d64[i] = r[i]
        for k in range(i + 1):
            A64[i, k] = A[i, k]
    if not cholesky_solve_inplace(A64, d64, kb):
        return False
    for i in range(kb):
        r[i] = d64[i]
        x[k0 + i] += r[i]
    return True


@njit(**_JIT)
def subspace_solve_rows(indptr, indices, values, Y, gram, X, kind, alpha, alpha0, eps, lam, nu, n_fixed, block_size,
                        sweeps, observed_loss=False, gather_entries=GATHER_MAX_ENTRIES):
    """iALS++ on every row, warm-started from X (updated in place): ``sweeps`` passes over the
    blocks of ``block_size`` coordinates (the last block may be narrower).

    Returns sum over entries of c (1 - s)^2 - alpha0 s^2 at the result when ``observed_loss``
    is set (see ``loss``); else 0. Arithmetic in X's dtype except each block's Cholesky
    (float64: b x b, cheap beside the rest). Rows of more than ``gather_entries`` entries are
    done in chunks of that many (the argument is there for tests).
    """
    n_rows, f = X.shape
    T = X.dtype.type
    b = max(1, min(block_size, f))
    longest = max_row_nnz(indptr)
    cap = max(1, min(longest, gather_entries))
    # a row's gathered columns, f x n_u padded (or a chunk's kb x cap)
    buffer = np.empty(f * (cap + ENTRY_PAD), dtype=X.dtype)
    conf = np.zeros(longest + ENTRY_PAD, dtype=X.dtype)
    weight = np.zeros(longest + ENTRY_PAD, dtype=X.dtype)
    scores = np.zeros(longest + ENTRY_PAD, dtype=X.dtype)
    wy = np.empty(cap + ENTRY_PAD, dtype=X.dtype)
    wy1 = np.empty(cap + ENTRY_PAD, dtype=X.dtype)
    A = np.empty((b, b), dtype=X.dtype)
    r = np.empty(b, dtype=X.dtype)
    A64 = np.empty((b, b), dtype=np.float64)
    d64 = np.empty(b, dtype=np.float64)
    observed = 0.0
    for u in range(n_rows):
        start, stop = indptr[u], indptr[u + 1]
        n_u = stop - start
        x = X[u]
        reg = T(row_regularization(n_u, lam, nu, alpha0, n_fixed))
        for t in range(n_u):
            c = T(confidence(values[start + t], kind, alpha, alpha0, eps))
            conf[t] = c
            weight[t] = c - alpha0
        _scores(Y, indices, start, n_u, x, scores)
        if n_u <= cap:  # gathered once, all f columns; every block reads its rows of it
            n_pad = -(-n_u // ENTRY_PAD) * ENTRY_PAD
            for t in range(n_u, n_pad):  # padding entries weigh nothing
                conf[t] = 0
                weight[t] = 0
                scores[t] = 0
            YT = buffer[: f * n_pad].reshape((f, n_pad))
            _gather_columns(Y, indices, start, n_u, 0, f, YT)
            for _ in range(sweeps):
                for k0 in range(0, f, b):
                    kb = min(b, f - k0)
                    _begin_block(gram, x, reg, k0, kb, A, r)
                    _accumulate(YT, k0, n_pad, conf, weight, scores, wy, wy1, A, r, kb)
                    if _solve_block(A, r, A64, d64, x, k0, kb):
                        _update_scores(YT, k0, n_pad, r, scores, kb)
        else:  # chunks of ``cap`` entries, the block's columns gathered per chunk
            for _ in range(sweeps):
                for k0 in range(0, f, b):
                    kb = min(b, f - k0)
                    _begin_block(gram, x, reg, k0, kb, A, r)
                    for c0 in range(0, n_u, cap):
                        m = min(cap, n_u - c0)
                        YT = buffer[: kb * m].reshape((kb, m))
                        _gather_columns(Y, indices, start + c0, m, k0, kb, YT)
                        _accumulate(YT, 0, m, conf[c0:], weight[c0:], scores[c0:], wy, wy1, A, r, kb)
                    if _solve_block(A, r, A64, d64, x, k0, kb):
                        for c0 in range(0, n_u, cap):
                            m = min(cap, n_u - c0)
                            YT = buffer[: kb * m].reshape((kb, m))
                            _gather_columns(Y, indices, start + c0, m, k0, kb, YT)
                            _update_scores(YT, 0, m, r, scores[c0:], kb)
        if observed_loss:
            _scores(Y, indices, start, n_u, x, scores)  # afresh: the cache drifts by rounding
            for t in range(n_u):
                s = scores[t]
                observed += conf[t] * (1 - s) * (1 - s) - alpha0 * s * s
    return observed
