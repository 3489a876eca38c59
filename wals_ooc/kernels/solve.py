"""Row solves of implicit ALS: for each row u of a shard, minimise over x

    sum_{i in S_u} c_ui (1 - x.y_i)^2 + alpha0 * sum_{i not in S_u} (x.y_i)^2 + reg_u |x|^2

whose normal equations are

    (alpha0 * Y^T Y + sum_{i in S_u} (c_ui - alpha0) y_i y_i^T + reg_u I) x = sum_{i in S_u} c_ui y_i.

``gram`` is always ``alpha0 * Y^T Y`` (f x f) of the whole fixed side. Confidence
``c = alpha0 + alpha * g(r)`` with g(r) = r (linear), log(1 + r / eps) (log) or 1 (constant);
with alpha0 = 1 and linear this is Hu, Koren & Volinsky (2008). Regularisation is
``reg_u = lam * (n_u + alpha0 * n_fixed) ** nu`` (nu = 0: plain lam; nu = 1: Rendle et al. 2022).

Every kernel works on one shard: CSR arrays with a local ``indptr``, column indices into the
fixed factor matrix ``Y`` (C-contiguous; the whole fixed side, or any rows holding the entries'
fixed rows, e.g. one copy per entry), the shard's output rows ``X``, and ``n_fixed``, the
rows of the whole fixed side (for the regularization).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

LINEAR, LOG, CONSTANT = 0, 1, 2
CONFIDENCE_KINDS = {"linear": LINEAR, "log": LOG, "constant": CONSTANT}

# fastmath without "nnan"/"ninf": LLVM may reassociate and contract (what vectorises the loops),
# but may not assume values are finite, so NaN and inf checks keep their meaning
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
_JIT: dict[str, Any] = dict(cache=True, nogil=True, fastmath=FASTMATH)
GATHER_MAX_ENTRIES = 16384  # scratch rows per thread for gathered fixed factors (4 MiB at f = 64)


@njit(**_JIT)
def confidence(value, kind, alpha, alpha0, eps):
    """c = alpha0 + alpha * g(value); see the module docstring."""
    if kind == LINEAR:
        return alpha0 + alpha * value
    if kind == LOG:
        return alpha0 + alpha * np.log1p(value / eps)
    return alpha0 + alpha


@njit(**_JIT)
def row_regularization(count, lam, nu, alpha0, n_fixed):
    """lam * (count + alpha0 * n_fixed) ** nu; plain lam when nu == 0."""
    if nu == 0.0:
        return lam
    return lam * (count + alpha0 * n_fixed) ** nu


@njit(**_JIT)
def _dot(a, b, f):
    """a . b over the first f elements, in the arrays' own dtype (float32 stays 8 lanes wide)."""
    total = a.dtype.type(0)
    for k in range(f):
        total += a[k] * b[k]
    return total


@njit(**_JIT)
def _symv(G, x, out, f):
    """out = G @ x for symmetric G, as axpys over G's rows (no horizontal sums: vectorises well)."""
    for j in range(f):
        out[j] = 0
    for k in range(f):
        xk = x[k]
        for j in range(f):
            out[j] += G[k, j] * xk


@njit(**_JIT)
def max_row_nnz(indptr):
    longest = 0
    for u in range(len(indptr) - 1):
        longest = max(longest, indptr[u + 1] - indptr[u])
    return longest


@njit(**_JIT)
def _fixed_row(rows, ids, base, t):
    """The t-th fixed factor row of a row: ``rows[t]`` of a gathered block (``ids`` None: Numba
    compiles that case without the branch) or ``rows[ids[base + t]]`` of Y itself."""
    if ids is None:
        return rows[t]
    return rows[ids[base + t]]


@njit(**_JIT)
def _cg_row(rows, ids, base, n_u, values, weight, x, r, p, Ap, gram, reg, kind, alpha, alpha0, eps, cg_steps, f,
            observed_loss):
    """CG on one row, its fixed factors being ``_fixed_row(rows, ids, base, t)`` for t < n_u.
    Returns the row's observed-loss terms sum c (1 - s)^2 - alpha0 s^2 at the solution when
    ``observed_loss`` is set, else 0."""
    T = x.dtype.type
    # r = b - A x
    _symv(gram, x, r, f)
    for k in range(f):
        r[k] = -r[k] - reg * x[k]
    for t in range(n_u):
        y = _fixed_row(rows, ids, base, t)
        c = T(confidence(values[t], kind, alpha, alpha0, eps))
        w = c - alpha0
        weight[t] = w
        coef = c - w * _dot(y, x, f)
        for k in range(f):
            r[k] += coef * y[k]
    rs_old = _dot(r, r, f)
    for k in range(f):
        p[k] = r[k]
    for _ in range(0 if rs_old < 1e-20 else cg_steps):  # NaN steps on, so the NaN reaches x and is caught
        _symv(gram, p, Ap, f)
        for k in range(f):
            Ap[k] += reg * p[k]
        for t in range(n_u):
            y = _fixed_row(rows, ids, base, t)
            coef = weight[t] * _dot(y, p, f)
            for k in range(f):
                Ap[k] += coef * y[k]
        step = rs_old / _dot(p, Ap, f)
        for k in range(f):
            x[k] += step * p[k]
            r[k] -= step * Ap[k]
        rs_new = _dot(r, r, f)
        if rs_new < 1e-20:
            break
        beta = rs_new / rs_old
        for k in range(f):
            p[k] = r[k] + beta * p[k]
        rs_old = rs_new
    observed = 0.0
    for t in range(n_u if observed_loss else 0):
        score = _dot(_fixed_row(rows, ids, base, t), x, f)
        c = weight[t] + alpha0
        observed += c * (1 - score) * (1 - score) - alpha0 * score * score
    return observed


@njit(**_JIT)
def cg_solve_rows(indptr, indices, values, Y, gram, X, kind, alpha, alpha0, eps, lam, nu, n_fixed, cg_steps, observed_loss=False):
    """Conjugate-gradient solve of every row, warm-started from X (updated in place).

    Returns sum over entries of c (1 - s)^2 - alpha0 s^2 at the solution (s = x.y) when
    ``observed_loss`` is set (see ``loss``), computed from the gathered rows; else 0.

    Never forms a row's f x f system (Takacs et al. 2011, as implicit's CG). The fixed rows a
    row touches are gathered once into a contiguous scratch block, so the CG steps after the
    first read them from cache instead of chasing random rows of Y; rows longer than the block
    read Y directly (the same arithmetic, one code path: ``_cg_row``).
    Arithmetic stays in X's dtype (scalars are cast to it), so float32 runs 8 lanes wide.
    """
    n_rows, f = X.shape
    T = X.dtype.type
    gather_cap = min(max_row_nnz(indptr), GATHER_MAX_ENTRIES)
    Y_row = np.empty((gather_cap, f), dtype=X.dtype)
    weight = np.empty(max_row_nnz(indptr), dtype=X.dtype)  # c - alpha0 of each entry
    r = np.empty(f, dtype=X.dtype)
    p = np.empty(f, dtype=X.dtype)
    Ap = np.empty(f, dtype=X.dtype)
    observed = 0.0
    for u in range(n_rows):
        start, stop = indptr[u], indptr[u + 1]
        n_u = stop - start
        reg = T(row_regularization(n_u, lam, nu, alpha0, n_fixed))
        row_values = values[start:stop]
        if n_u <= gather_cap:  # a loop of independent copies: many cache misses in flight at once
            for t in range(n_u):
                source = Y[indices[start + t]]
                for k in range(f):
                    Y_row[t, k] = source[k]
            row_observed = _cg_row(Y_row, None, 0, n_u, row_values, weight, X[u], r, p, Ap, gram, reg,
                                   kind, alpha, alpha0, eps, cg_steps, f, observed_loss)
        else:
            row_observed = _cg_row(Y, indices, start, n_u, row_values, weight, X[u], r, p, Ap, gram, reg,
                                   kind, alpha, alpha0, eps, cg_steps, f, observed_loss)
        observed += row_observed
    return observed


@njit(**_JIT)
def cholesky_solve_inplace(A, b, f):
    """Solve A z = b for symmetric positive definite A (lower triangle used); A and b overwritten, z in b.

    Returns False when A is not positive definite (a pivot <= 0). A system holding NaN or inf
    gives a NaN solution (and True), so the half-sweep's finite check reports it instead of the
    row being kept as a mere failure.
    """
    for j in range(f):
        diag = A[j, j]
        for k in range(j):
            diag -= A[j, k] * A[j, k]
        if diag != diag or diag == np.inf:
            for i in range(f):
                b[i] = np.nan
            return True
        if diag <= 0:
            return False
        diag = np.sqrt(diag)
        A[j, j] = diag
        for i in range(j + 1, f):
            acc = A[i, j]
            for k in range(j):
                acc -= A[i, k] * A[j, k]
            A[i, j] = acc / diag
    for i in range(f):  # L z = b
        acc = b[i]
        for k in range(i):
            acc -= A[i, k] * b[k]
        b[i] = acc / A[i, i]
    for i in range(f - 1, -1, -1):  # L^T x = z
        acc = b[i]
        for k in range(i + 1, f):
            acc -= A[k, i] * b[k]
        b[i] = acc / A[i, i]
    return True


@njit(**_JIT)
def _add_rank_one_lower(A, y, weight, f):
    for i in range(f):
        wy = weight * y[i]
        for k in range(i + 1):
            A[i, k] += wy * y[k]


@njit(**_JIT)
def cholesky_solve_rows(indptr, indices, values, Y, gram, X, kind, alpha, alpha0, eps, lam, nu, n_fixed):
    """Exact solve of every row: form the f x f normal equations (lower triangle) and factor them.

    Returns the number of rows whose system was not positive definite (left unchanged).
    """
    n_rows, f = X.shape
    A = np.empty((f, f), dtype=np.float64)
    b = np.empty(f, dtype=np.float64)
    failures = 0
    for u in range(n_rows):
        start, stop = indptr[u], indptr[u + 1]
        reg = row_regularization(stop - start, lam, nu, alpha0, n_fixed)
        for i in range(f):
            b[i] = 0.0
            for k in range(i + 1):
                A[i, k] = gram[i, k]
            A[i, i] += reg
        for idx in range(start, stop):
            y = Y[indices[idx]]
            c = confidence(values[idx], kind, alpha, alpha0, eps)
            _add_rank_one_lower(A, y, c - alpha0, f)
            for k in range(f):
                b[k] += c * y[k]
        if cholesky_solve_inplace(A, b, f):
            for k in range(f):
                X[u, k] = b[k]
        else:
            failures += 1
    return failures
