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

from .prefetch import prefetch_row
from .tile import TILE_COLUMNS, fuses, gathered_pass, pack_gram, tiled_product, tiles, weighted_pass

LINEAR, LOG, CONSTANT = 0, 1, 2
CONFIDENCE_KINDS = {"linear": LINEAR, "log": LOG, "constant": CONSTANT}

# fastmath without "nnan"/"ninf": LLVM may reassociate and contract (what vectorises the loops),
# but may not assume values are finite, so NaN and inf checks keep their meaning
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
_JIT: dict[str, Any] = dict(cache=True, nogil=True, fastmath=FASTMATH)
# A fastmath callee that LLVM leaves as a call must be inlined by Numba instead. Numba links a
# callee into each caller's module as a weak (linkonce_odr) copy, optimised again there; Numba's
# JIT binds the caller to the first copy loaded, which in the process that compiled the kernel is
# the callee's own compilation and, in a process loading the kernel from the cache, the copy in
# the cached caller. With reassoc the two copies round differently: a cold and a warm cache gave
# other bits (tests/test_cache_bits.py). Inlined, there is one body, in the caller.
_INLINED: dict[str, Any] = dict(_JIT, inline="always")
GATHER_MAX_ENTRIES = 16384  # scratch rows per thread for gathered fixed factors (4 MiB at f = 64)
# CG's row groups (``cg_solve_rows``): rows solved in lockstep, and the bytes of fixed rows they
# gather (about L2; measured on the 16M store against 1 row a group and no prefetch, one thread:
# 0.82-0.84x a user row and 0.91-0.96x an item row at f = 64 and 128)
GROUP_ROWS = 64  # a multiple of TILE_ROWS
GROUP_BYTES = 1 << 20
PREFETCH_ENTRIES = 8  # how far ahead the gather prefetches fixed rows
# CG's warm-start pass gathers the fixed rows from a float16 copy of the fixed side (``half`` of
# ``cg_solve_rows``), widened to float32 as loaded: half the bytes of its random reads, which bound
# it, and of the gathered block the steps read. Measured on the 16M store, 2 threads: 0.77x main's
# iteration at f = 128 and 0.88x at f = 64; the losses move within float32's own rounding band
# (5 iterations: 4.603967e7 against float32's 4.604012e7 at f = 128, 4.720325e7 against
# 4.720271e7 at f = 64; tools/RESULTS.md, round 27). ``WALSConfig.half_gathers`` = False (the
# command line's --no-half-gathers) keeps float32 gathers.


def gathers_half(f: int, itemsize: int) -> bool:
    """Whether the trainer gives ``cg_solve_rows`` a float16 copy of the fixed side (``half``) for
    f columns of ``itemsize``-byte factors: float32 whose row pass is fused (``tile.fuses``), when
    the settings ask for it (``WALSConfig.half_gathers``, the default)."""
    return itemsize == 4 and bool(fuses.py_func(f, itemsize))  # Python's: no signature compiled


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


@njit(**_INLINED)
def _dot(a, b, f):
    """a . b over the first f elements, in the arrays' own dtype (float32 stays 8 lanes wide)."""
    total = a.dtype.type(0)
    for k in range(f):
        total += a[k] * b[k]
    return total


@njit(**_INLINED)
def _symv(G, x, out, f):
    """out = G @ x for symmetric G, as axpys over G's rows (no horizontal sums: vectorises well)."""
    for j in range(f):
        out[j] = 0
    for k in range(f):
        xk = x[k]
        for j in range(f):
            out[j] += G[k, j] * xk


@njit(**_INLINED)
def _invert_diagonal(d, f, jacobi):
    """d = 1 / d where d > 0 (A's diagonal: Jacobi's preconditioner), else 1 (no preconditioning
    of that coordinate: a zero diagonal has a zero residual too, and a NaN must reach x); all 1
    when ``jacobi`` is off (plain CG)."""
    T = d.dtype.type
    for k in range(f):
        d[k] = T(1) / d[k] if jacobi and d[k] > 0 else T(1)


@njit(**_INLINED)
def _preconditioned_dot(r, inv, f):
    """r . (inv * r): CG's r.z with z = inv * r."""
    total = r.dtype.type(0)
    for k in range(f):
        total += r[k] * r[k] * inv[k]
    return total


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


SUM_GROUP = 256  # a long row's residual and products A p are summed this many entries at a time, then added (``_cg_row``)
# One float32 sum over a row's 10^5 entries lost enough that the third step went astray (an item of
# 186,343 entries ended 4.7% off its CG solution, 2.4e-5 of the 30M bench's loss: tools/RESULTS.md,
# round 28, lead); partial sums of 256 bring it to float64's result.


@njit(**_INLINED)
def _cg_row(rows, ids, base, n_u, values, weight, x, r, p, Ap, inv, gram, reg, kind, alpha, alpha0, eps, cg_steps, f,
            observed_loss, jacobi):
    """CG on one row, its fixed factors being ``_fixed_row(rows, ids, base, t)`` for t < n_u
    (preconditioned by the inverse of A's diagonal, kept in ``inv``, when ``jacobi`` is set).
    Returns the row's observed-loss terms sum c (1 - s)^2 - alpha0 s^2 at the solution when
    ``observed_loss`` is set, else 0."""
    T = x.dtype.type
    # r = b - A x; inv = A's diagonal (then its inverse)
    _symv(gram, x, r, f)
    for k in range(f):
        r[k] = -r[k] - reg * x[k]
        if jacobi:
            inv[k] = gram[k, k] + reg
    part = np.zeros(f, dtype=x.dtype)
    for t in range(n_u):  # summed SUM_GROUP entries at a time into ``part``, then into r
        y = _fixed_row(rows, ids, base, t)
        c = T(confidence(values[t], kind, alpha, alpha0, eps))
        w = c - alpha0
        weight[t] = w
        coef = c - w * _dot(y, x, f)
        for k in range(f):
            part[k] += coef * y[k]
        if (t + 1) % SUM_GROUP == 0 or t == n_u - 1:
            for k in range(f):
                r[k] += part[k]
                part[k] = 0
        if jacobi:
            for k in range(f):
                inv[k] += w * y[k] * y[k]
    rs_old = _dot(r, r, f)
    converged = rs_old < 1e-20
    if jacobi:
        _invert_diagonal(inv, f, jacobi)
        rs_old = _preconditioned_dot(r, inv, f)
        for k in range(f):
            p[k] = r[k] * inv[k]
    else:
        for k in range(f):
            p[k] = r[k]
    for _ in range(0 if converged else cg_steps):  # NaN steps on, so the NaN reaches x and is caught
        _symv(gram, p, Ap, f)
        for k in range(f):
            Ap[k] += reg * p[k]
        for t in range(n_u):  # summed SUM_GROUP entries at a time into ``part``, then into Ap
            y = _fixed_row(rows, ids, base, t)
            coef = weight[t] * _dot(y, p, f)
            for k in range(f):
                part[k] += coef * y[k]
            if (t + 1) % SUM_GROUP == 0 or t == n_u - 1:
                for k in range(f):
                    Ap[k] += part[k]
                    part[k] = 0
        step = rs_old / _dot(p, Ap, f)
        for k in range(f):
            x[k] += step * p[k]
            r[k] -= step * Ap[k]
        rs_new = _dot(r, r, f)
        if rs_new < 1e-20:
            break
        if jacobi:
            rs_new = _preconditioned_dot(r, inv, f)
            beta = rs_new / rs_old
            for k in range(f):
                p[k] = r[k] * inv[k] + beta * p[k]
        else:
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
def _gram_product(A, G, Gp, D, n, tiled):
    """D[:n] = A[:n] @ G: register-tiled against the packed Gram ``Gp`` when ``tiled`` (rows up to
    n rounded up to ``TILE_ROWS`` written), else BLAS."""
    if tiled:
        tiled_product(A, Gp, D, n)
    else:
        np.dot(A[:n], G, D[:n])


@njit(**_JIT)
def cg_solve_rows(indptr, indices, values, Y, gram, X, kind, alpha, alpha0, eps, lam, nu, n_fixed, cg_steps, observed_loss=False,
                  half=None, jacobi=False):
    """Conjugate-gradient solve of every row, warm-started from X (updated in place).

    Returns sum over entries of c (1 - s)^2 - alpha0 s^2 at the solution (s = x.y) when
    ``observed_loss`` is set (see ``loss``), else 0. The scores s are carried through the CG
    steps (s += step * y.p) rather than recomputed by another pass over the rows.

    Never forms a row's f x f system (Takacs et al. 2011, as implicit's CG). Rows go in groups
    of up to ``GROUP_ROWS`` rows and ``GROUP_BYTES`` of fixed rows, whose CG steps run in
    lockstep: the fixed rows of the group are gathered once into a contiguous block (prefetched
    ``PREFETCH_ENTRIES`` entries ahead) by the residual pass itself, which uses each row as it
    arrives, so every CG step after it reads them from cache; and the dense part of each step,
    Gram times the search directions of the group's rows, is one matrix-matrix product instead
    of one matrix-vector product a row (the f x f Gram is read once a group instead of once a
    row: at f = 128 it does not fit in L1). When f is a multiple of 16 that product is
    register-tiled against the Gram packed once per call (``tile.tiled_product``: 89 GFLOP/s a
    core against BLAS's 32-42 at these row counts, which packs the Gram on every call), else
    BLAS. The sparse passes over a row's fixed rows (the residual's, which gathers them, and
    each step's y.p and Ap += w (y.p) y) are LLVM vector code holding the row's x or p and the
    sum in registers, each fixed row read once a pass, when the row fits the host's vector
    registers (``tile.fuses``: f a multiple of 16 up to 128 in float32 with AVX-512); else numba
    loops. A row longer than the gather block reads Y directly, alone (``_cg_row``).

    ``half``: None, or Y's values as float16 bits (uint16, same shape; ``tile.half_rows``), from
    which the residual's pass gathers the fixed rows when it is fused, into a block of float16
    rows that the steps' passes read too (each widened to float32 as loaded: half the bytes of
    the random reads, and of the block the steps read from cache): the rows' solves and carried
    scores then use those rounded rows (relative error <= 2^-11 an element); the Gram, the plain
    loops and rows longer than the block use Y. ``half`` may hold other rows than Y (a blocked
    task's compact copies: ``half`` those of the rows up to ``GATHER_MAX_ENTRIES`` entries, Y
    those of longer rows, ``indices`` numbering each row's entries in its own), not other columns.

    ``jacobi``: preconditioned CG, z = r / diag(A) (Jacobi), the diagonal diag(gram) + reg +
    sum (c - alpha0) y * y accumulated by the residual's pass as it reads the rows (the fused
    pass holds it in registers too); the steps then use r.z for r.r and z for r (the early exit
    still tests r.r). Three steps of it reach a lower loss than three plain ones (the diagonal
    of the rows' systems spans orders of magnitude with play counts as confidences).
    Arithmetic stays in X's dtype (scalars are cast to it), so float32 runs 8 lanes wide.
    """
    n_rows, f = X.shape
    T = X.dtype.type
    if half is not None and half.shape[1] != Y.shape[1]:
        raise ValueError("cg_solve_rows: the float16 copy does not have the fixed side's columns")
    nnz = indptr[n_rows] - indptr[0]
    longest = max_row_nnz(indptr)
    gather_cap = min(longest, GATHER_MAX_ENTRIES)
    group_entries = max(1, GROUP_BYTES // (f * X.itemsize))
    held = max(1, gather_cap, min(group_entries, nnz))  # a group holds at most this many entries
    fused = fuses(f, X.itemsize)
    halves = fused and half is not None  # the gathered rows kept as float16 (the steps widen them too)
    Y_rows = np.empty((0 if halves else held, f), dtype=X.dtype)
    H_rows = np.empty((held if halves else 0, f), dtype=np.uint16)
    weight = np.empty(max(held, longest), dtype=X.dtype)  # c - alpha0 of each entry
    score = np.empty(held, dtype=X.dtype)  # x.y of each entry, kept current through the steps
    proj = np.empty(held, dtype=X.dtype)  # p.y of each entry in the current step
    G = np.ascontiguousarray(gram.astype(X.dtype))
    tiled = tiles(f)
    Gp = pack_gram(G) if tiled else np.empty((0, f, TILE_COLUMNS), dtype=X.dtype)
    # rows of a group's products (zeros: the tiled product also reads the padding up to a multiple of 4)
    X_group = np.zeros((GROUP_ROWS, f), dtype=X.dtype)
    R = np.empty((GROUP_ROWS, f), dtype=X.dtype)
    P = np.zeros((GROUP_ROWS, f), dtype=X.dtype)
    D = np.empty((GROUP_ROWS, f), dtype=X.dtype)  # Gram times X, then times P, of the group's rows
    Ap = np.empty(f, dtype=X.dtype)
    r1 = np.empty(f, dtype=X.dtype)
    p1 = np.empty(f, dtype=X.dtype)
    Inv = np.ones((GROUP_ROWS, f), dtype=X.dtype)  # 1 / diag(A) of the group's rows (Jacobi)
    inv1 = np.empty(f, dtype=X.dtype)
    G_diagonal = np.empty(f, dtype=X.dtype)
    for k in range(f):
        G_diagonal[k] = G[k, k]
    rs = np.empty(GROUP_ROWS, dtype=X.dtype)  # r.r (r.z with ``jacobi``) of the group's rows
    regs = np.empty(GROUP_ROWS, dtype=X.dtype)
    active = np.empty(GROUP_ROWS, dtype=np.bool_)
    last = indptr[n_rows]
    observed = 0.0
    u0 = 0
    while u0 < n_rows:
        base = indptr[u0]
        n0 = indptr[u0 + 1] - base
        if n0 > gather_cap:  # longer than the gather block: alone, reading Y directly
            reg = T(row_regularization(n0, lam, nu, alpha0, n_fixed))
            observed += _cg_row(Y, indices, base, n0, values[base:base + n0], weight, X[u0], r1, p1, Ap, inv1, gram, reg,
                                kind, alpha, alpha0, eps, cg_steps, f, observed_loss, jacobi)
            u0 += 1
            continue
        u1 = u0 + 1
        while (u1 < n_rows and u1 - u0 < GROUP_ROWS and indptr[u1 + 1] - base <= group_entries
               and indptr[u1 + 1] - indptr[u1] <= gather_cap):
            u1 += 1
        nb = u1 - u0
        for i in range(nb):
            for k in range(f):
                X_group[i, k] = X[u0 + i, k]
        _gram_product(X_group, G, Gp, D, nb, tiled)
        for i in range(nb):  # r = b - A x, p = r; the fixed rows gathered as the residual takes them
            e0, e1 = indptr[u0 + i] - base, indptr[u0 + i + 1] - base
            reg = T(row_regularization(e1 - e0, lam, nu, alpha0, n_fixed))
            regs[i] = reg
            x = X[u0 + i]
            r = R[i]
            inv = Inv[i]
            for k in range(f):
                r[k] = -D[i, k] - reg * x[k]
            if jacobi:
                for k in range(f):
                    inv[k] = G_diagonal[k] + reg
            if fused:  # the row's pass with x and r in registers (``tile.gathered_pass``)
                for e in range(e0, e1):
                    weight[e] = T(confidence(values[base + e], kind, alpha, alpha0, eps)) - alpha0
                if half is None:
                    if jacobi:
                        gathered_pass(Y, indices, base, last, Y_rows, e0, e1, X_group[i], weight, score, r, alpha0, inv)
                    else:
                        gathered_pass(Y, indices, base, last, Y_rows, e0, e1, X_group[i], weight, score, r, alpha0)
                elif jacobi:
                    gathered_pass(half, indices, base, last, H_rows, e0, e1, X_group[i], weight, score, r, alpha0, inv)
                else:
                    gathered_pass(half, indices, base, last, H_rows, e0, e1, X_group[i], weight, score, r, alpha0)
            else:
                for e in range(e0, e1):
                    ahead = base + e + PREFETCH_ENTRIES  # independent copies: many cache misses in flight at once
                    if ahead < last:
                        prefetch_row(Y, indices[ahead])
                    source = Y[indices[base + e]]
                    y = Y_rows[e]
                    for k in range(f):
                        y[k] = source[k]
                    c = T(confidence(values[base + e], kind, alpha, alpha0, eps))
                    w = c - alpha0
                    weight[e] = w
                    s = _dot(y, x, f)
                    score[e] = s
                    coef = c - w * s
                    for k in range(f):
                        r[k] += coef * y[k]
                    if jacobi:
                        for k in range(f):
                            inv[k] += w * y[k] * y[k]
            if jacobi:  # inv = 1 / diag (as ``_invert_diagonal``), p = z = inv r, rs = r.z, in one loop
                rr = T(0)
                rz = T(0)
                for k in range(f):
                    dk = inv[k]
                    ik = T(1) / dk if dk > 0 else T(1)
                    inv[k] = ik
                    rk = r[k]
                    rr += rk * rk
                    rz += rk * rk * ik
                    P[i, k] = rk * ik
                rs[i] = rz
                active[i] = not rr < 1e-20  # the exit tests r.r, as plain CG's
            else:
                rs[i] = _dot(r, r, f)
                for k in range(f):
                    P[i, k] = r[k]
                active[i] = not rs[i] < 1e-20  # NaN steps on, so the NaN reaches x and is caught
        for _ in range(cg_steps):
            running = False
            for i in range(nb):
                running = running or active[i]
            if not running:
                break
            _gram_product(P, G, Gp, D, nb, tiled)
            for i in range(nb):
                if not active[i]:
                    continue
                e0, e1 = indptr[u0 + i] - base, indptr[u0 + i + 1] - base
                reg = regs[i]
                x = X[u0 + i]
                r = R[i]
                p = P[i]
                for k in range(f):
                    Ap[k] = D[i, k] + reg * p[k]
                if fused:  # each gathered row read once, p and Ap in registers (``tile.weighted_pass``)
                    if half is None:
                        weighted_pass(Y_rows, e0, e1, p, weight, proj, Ap)
                    else:
                        weighted_pass(H_rows, e0, e1, p, weight, proj, Ap)
                else:
                    for e in range(e0, e1):
                        y = Y_rows[e]
                        d = _dot(y, p, f)
                        proj[e] = d
                        coef = weight[e] * d
                        for k in range(f):
                            Ap[k] += coef * y[k]
                rs_old = rs[i]
                step = rs_old / _dot(p, Ap, f)
                for e in range(e0, e1):
                    score[e] += step * proj[e]
                if jacobi:  # x, r, r.r and r.z in one loop, then p = z + beta p
                    inv = Inv[i]
                    rr = T(0)
                    rz = T(0)
                    for k in range(f):
                        x[k] += step * p[k]
                        rk = r[k] - step * Ap[k]
                        r[k] = rk
                        rr += rk * rk
                        rz += rk * rk * inv[k]
                    if rr < 1e-20:
                        active[i] = False
                        continue
                    beta = rz / rs_old
                    for k in range(f):
                        p[k] = r[k] * inv[k] + beta * p[k]
                    rs[i] = rz
                    continue
                for k in range(f):
                    x[k] += step * p[k]
                    r[k] -= step * Ap[k]
                rs_new = _dot(r, r, f)
                if rs_new < 1e-20:
                    active[i] = False
                    continue
                beta = rs_new / rs_old
                for k in range(f):
                    p[k] = r[k] + beta * p[k]
                rs[i] = rs_new
        for e in range(indptr[u1] - base if observed_loss else 0):
            s = score[e]
            c = weight[e] + alpha0
            observed += c * (1 - s) * (1 - s) - alpha0 * s * s
        u0 = u1
    return observed


@njit(**_INLINED)
def cholesky_factor_inplace(A, f):
    """A's lower triangle (f x f) overwritten by its Cholesky factor L (A = L L^T). Returns 0
    factored, 1 not positive definite (a pivot <= 0), 2 a NaN or inf pivot."""
    for j in range(f):
        diag = A[j, j]
        for k in range(j):
            diag -= A[j, k] * A[j, k]
        if diag != diag or diag == np.inf:
            return 2
        if diag <= 0:
            return 1
        diag = np.sqrt(diag)
        A[j, j] = diag
        for i in range(j + 1, f):
            acc = A[i, j]
            for k in range(j):
                acc -= A[i, k] * A[j, k]
            A[i, j] = acc / diag
    return 0


@njit(**_INLINED)
def cholesky_substitute_inplace(L, b, f):
    """b = (L L^T)^-1 b for L from ``cholesky_factor_inplace`` (forward, then back substitution)."""
    for i in range(f):  # L z = b
        acc = b[i]
        for k in range(i):
            acc -= L[i, k] * b[k]
        b[i] = acc / L[i, i]
    for i in range(f - 1, -1, -1):  # L^T x = z
        acc = b[i]
        for k in range(i + 1, f):
            acc -= L[k, i] * b[k]
        b[i] = acc / L[i, i]


@njit(**_INLINED)
def cholesky_solve_inplace(A, b, f):
    """Solve A z = b for symmetric positive definite A (lower triangle used); A and b overwritten, z in b.

    Returns False when A is not positive definite (a pivot <= 0). A system holding NaN or inf
    gives a NaN solution (and True), so the half-sweep's finite check reports it instead of the
    row being kept as a mere failure.
    """
    status = cholesky_factor_inplace(A, f)
    if status == 1:
        return False
    if status == 2:
        for i in range(f):
            b[i] = np.nan
        return True
    cholesky_substitute_inplace(A, b, f)
    return True


@njit(**_INLINED)
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
