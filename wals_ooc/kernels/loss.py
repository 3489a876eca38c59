"""Training objective of implicit ALS, in pieces that can be summed over shards.

For a side whose rows are X and fixed side Y (see ``solve`` for the notation), the objective is

    sum_u [ x_u^T gram x_u + sum_{i in S_u} (c_ui (1 - s)^2 - alpha0 s^2) + reg_u |x_u|^2 ] + other side's reg

with s = x_u . y_i and gram = alpha0 Y^T Y: the Gram trick turns the sum over every (u, i) pair
into one f x f quadratic form per row plus a correction on the observed entries.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .solve import _JIT, _dot, confidence, row_regularization


@njit(**_JIT)
def regularization_sum(indptr, X, lam, nu, alpha0, n_fixed):
    """sum_u reg_u |x_u|^2 over the shard's rows, in float64."""
    n_rows, f = X.shape
    total = 0.0
    for u in range(n_rows):
        reg = row_regularization(indptr[u + 1] - indptr[u], lam, nu, alpha0, n_fixed)
        total += reg * _dot(X[u], X[u], f)
    return total


def gram_quadratic(X, gram):
    """sum_u x_u^T gram x_u (float64), through one matrix product."""
    return float(np.einsum("ij,ij->", X @ gram, X, dtype=np.float64))


def gram_quadratic_of(rows_gram, gram):
    """sum_u x_u^T gram x_u from the rows' own Gram matrix X^T X (f x f), as trace(gram X^T X):
    f^2 operations where ``gram_quadratic`` takes n f^2 (the half-sweep has X^T X already)."""
    return float(np.einsum("ij,ij->", np.asarray(rows_gram, dtype=np.float64), np.asarray(gram, dtype=np.float64)))


def row_penalties(indptr, X, gram, lam, nu, alpha0, n_fixed):
    """(sum_u x_u^T gram x_u, sum_u reg_u |x_u|^2) over the shard's rows, in float64."""
    return gram_quadratic(X, gram), regularization_sum(indptr, X, lam, nu, alpha0, n_fixed)


@njit(**_JIT)
def observed_loss_block(indptr, indices, values, cursor, block_lo, block_hi, Y_block, X, kind, alpha, alpha0, eps):
    """sum over observed entries with column in [block_lo, block_hi) of c (1 - s)^2 - alpha0 s^2.

    cursor: (n_rows,) int64 next unread entry of each row, advanced past the block. For a fixed
    side held whole, pass cursor = indptr[:-1], block [0, n_fixed) and Y_block = Y.
    """
    n_rows, f = X.shape
    total = 0.0
    for u in range(n_rows):
        x = X[u]
        idx = cursor[u]
        stop = indptr[u + 1]
        while idx < stop and indices[idx] < block_hi:
            s = _dot(Y_block[indices[idx] - block_lo], x, f)
            c = confidence(values[idx], kind, alpha, alpha0, eps)
            total += c * (1.0 - s) * (1.0 - s) - alpha0 * s * s
            idx += 1
        cursor[u] = idx
    return total
