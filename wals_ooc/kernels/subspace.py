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

Like ``cg_solve_rows``, a row's fixed factors are gathered once into a contiguous scratch block
(rows longer than the block read Y directly) and every sweep reads them from cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .solve import _JIT, GATHER_MAX_ENTRIES, _dot, _fixed_row, cholesky_solve_inplace, confidence, max_row_nnz, \
    row_regularization


@njit(**_JIT)
def _block_step(rows, ids, base, n_u, conf, weight, scores, x, gram, reg, k0, kb, A, r, A64, d64):
    """Minimise the row's objective over coordinates [k0, k0 + kb) with the others held, and
    update x and the prediction cache ``scores``. A system that is not positive definite (in
    exact arithmetic it always is: a principal block of the row's SPD matrix) takes a zero step."""
    f = x.shape[0]
    # the block's b x b system and residual; A is filled as a full square (a fixed-length inner
    # loop vectorises), the Cholesky reads its lower triangle
    for i in range(kb):
        for k in range(kb):
            A[i, k] = gram[k0 + i, k0 + k]
        A[i, i] += reg
        r[i] = -_dot(gram[k0 + i], x, f) - reg * x[k0 + i]
    for t in range(n_u):
        y = _fixed_row(rows, ids, base, t)
        w = weight[t]
        coef = conf[t] - w * scores[t]
        for i in range(kb):
            yi = y[k0 + i]
            r[i] += coef * yi
            wy = w * yi
            for k in range(kb):
                A[i, k] += wy * y[k0 + k]
    for i in range(kb):
        d64[i] = r[i]
        for k in range(i + 1):
            A64[i, k] = A[i, k]
    if not cholesky_solve_inplace(A64, d64, kb):
        return
    for i in range(kb):
        r[i] = d64[i]  # the step, in x's dtype
        x[k0 + i] += r[i]
    for t in range(n_u):
        y = _fixed_row(rows, ids, base, t)
        scores[t] += _dot(y[k0:k0 + kb], r, kb)


@njit(**_JIT)
def _subspace_row(rows, ids, base, n_u, values, conf, weight, scores, x, gram, reg, kind, alpha, alpha0, eps,
                  block_size, sweeps, A, r, A64, d64, observed_loss):
    """``sweeps`` passes of block coordinate descent over one row (fixed factors as in
    ``solve._cg_row``). Returns the row's observed-loss terms sum c (1 - s)^2 - alpha0 s^2 at
    the result when ``observed_loss`` is set, else 0."""
    T = x.dtype.type
    f = x.shape[0]
    for t in range(n_u):
        c = T(confidence(values[t], kind, alpha, alpha0, eps))
        conf[t] = c
        weight[t] = c - alpha0
        scores[t] = _dot(_fixed_row(rows, ids, base, t), x, f)
    for _ in range(sweeps):
        for k0 in range(0, f, block_size):
            _block_step(rows, ids, base, n_u, conf, weight, scores, x, gram, reg, k0, min(block_size, f - k0),
                        A, r, A64, d64)
    observed = 0.0
    for t in range(n_u if observed_loss else 0):
        s = _dot(_fixed_row(rows, ids, base, t), x, f)  # afresh: the cache drifts by rounding
        observed += conf[t] * (1 - s) * (1 - s) - alpha0 * s * s
    return observed


@njit(**_JIT)
def subspace_solve_rows(indptr, indices, values, Y, gram, X, kind, alpha, alpha0, eps, lam, nu, n_fixed, block_size,
                        sweeps, observed_loss=False):
    """iALS++ on every row, warm-started from X (updated in place): ``sweeps`` passes over the
    blocks of ``block_size`` coordinates (the last block may be narrower).

    Returns sum over entries of c (1 - s)^2 - alpha0 s^2 at the result when ``observed_loss``
    is set (see ``loss``); else 0. Arithmetic in X's dtype except each block's Cholesky
    (float64: b x b, cheap beside the rest).
    """
    n_rows, f = X.shape
    T = X.dtype.type
    b = max(1, min(block_size, f))
    longest = max_row_nnz(indptr)
    gather_cap = min(longest, GATHER_MAX_ENTRIES)
    Y_row = np.empty((gather_cap, f), dtype=X.dtype)
    conf = np.empty(longest, dtype=X.dtype)
    weight = np.empty(longest, dtype=X.dtype)
    scores = np.empty(longest, dtype=X.dtype)
    A = np.empty((b, b), dtype=X.dtype)
    r = np.empty(b, dtype=X.dtype)
    A64 = np.empty((b, b), dtype=np.float64)
    d64 = np.empty(b, dtype=np.float64)
    observed = 0.0
    for u in range(n_rows):
        start, stop = indptr[u], indptr[u + 1]
        n_u = stop - start
        reg = T(row_regularization(n_u, lam, nu, alpha0, n_fixed))
        row_values = values[start:stop]
        if n_u <= gather_cap:
            for t in range(n_u):
                source = Y[indices[start + t]]
                for k in range(f):
                    Y_row[t, k] = source[k]
            observed += _subspace_row(Y_row, None, 0, n_u, row_values, conf, weight, scores, X[u], gram, reg, kind,
                                      alpha, alpha0, eps, b, sweeps, A, r, A64, d64, observed_loss)
        else:
            observed += _subspace_row(Y, indices, start, n_u, row_values, conf, weight, scores, X[u], gram, reg, kind,
                                      alpha, alpha0, eps, b, sweeps, A, r, A64, d64, observed_loss)
    return observed
