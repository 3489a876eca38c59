"""Dense NumPy references the kernels and the trainer are checked against (small matrices only)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def confidence(values, kind, alpha, alpha0, eps=1.0):
    if kind == "linear":
        return alpha0 + alpha * values
    if kind == "log":
        return alpha0 + alpha * np.log1p(values / eps)
    return alpha0 + alpha * np.ones_like(values)


def row_regularization(count, lam, nu, alpha0, n_fixed):
    return lam if nu == 0 else lam * (count + alpha0 * n_fixed) ** nu


def dense_solve(R: sp.csr_matrix, Y, kind="linear", alpha=2.0, alpha0=1.0, eps=1.0, lam=0.1, nu=0.0):
    """Closed form x_u = (Y^T C_u Y + reg_u I)^-1 Y^T C_u p_u for every row, in float64.

    C_u is diagonal: c_ui on observed entries, alpha0 elsewhere; p_u is 1 on observed entries.
    """
    R = sp.csr_matrix(R)
    Y = np.asarray(Y, dtype=np.float64)
    n, f = R.shape[0], Y.shape[1]
    X = np.zeros((n, f))
    for u in range(n):
        weights = np.full(Y.shape[0], alpha0, dtype=np.float64)
        target = np.zeros(Y.shape[0])
        cols = R.indices[R.indptr[u] : R.indptr[u + 1]]
        vals = R.data[R.indptr[u] : R.indptr[u + 1]].astype(np.float64)
        weights[cols] = confidence(vals, kind, alpha, alpha0, eps)
        target[cols] = 1.0
        reg = row_regularization(len(cols), lam, nu, alpha0, Y.shape[0])
        A = Y.T @ (weights[:, None] * Y) + reg * np.eye(f)
        X[u] = np.linalg.solve(A, Y.T @ (weights * target))
    return X


def dense_objective(R: sp.csr_matrix, X, Y, kind="linear", alpha=2.0, alpha0=1.0, eps=1.0, lam=0.1, nu=0.0):
    """The full weighted objective summed over every (user, item) pair, in float64."""
    R = sp.csr_matrix(R)
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    scores = X @ Y.T
    weights = np.full(R.shape, alpha0, dtype=np.float64)
    target = np.zeros(R.shape)
    coo = R.tocoo()
    weights[coo.row, coo.col] = confidence(coo.data.astype(np.float64), kind, alpha, alpha0, eps)
    target[coo.row, coo.col] = 1.0
    data = float((weights * (target - scores) ** 2).sum())
    user_counts = np.diff(R.indptr)
    item_counts = np.bincount(coo.col, minlength=R.shape[1])
    user_reg = row_regularization(user_counts, lam, nu, alpha0, R.shape[1]) * np.ones(R.shape[0])
    item_reg = row_regularization(item_counts, lam, nu, alpha0, R.shape[0]) * np.ones(R.shape[1])
    return data + float((user_reg * (X**2).sum(1)).sum() + (item_reg * (Y**2).sum(1)).sum())


def random_interactions(n_rows, n_cols, density, seed, max_value=5):
    rng = np.random.default_rng(seed)
    mask = rng.random((n_rows, n_cols)) < density
    values = rng.integers(1, max_value + 1, size=(n_rows, n_cols)).astype(np.float32)
    return sp.csr_matrix(np.where(mask, values, 0).astype(np.float32))
