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
(Gauss-Seidel by blocks on a symmetric positive definite system). A block's system A_BB does not
depend on x: with several sweeps it is built and factored in the first one only and its factor
kept (``kept_factor_bytes``), so a later sweep costs n_u b + f b + b^2 a block.

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

from .solve import _INLINED, _JIT, GATHER_MAX_ENTRIES, cholesky_factor_inplace, cholesky_substitute_inplace, confidence, max_row_nnz, row_regularization
from .transpose import transpose_tile


# a gathered row's entries are padded with zeros (weight 0) to a multiple of this: the entry
# loops then run only their vectorised body (8 float32 lanes), never the scalar remainder. The
# tiled system loops (8 accumulators) are not unrolled further, so 8 is enough; 32 (what the
# one-accumulator loops, unrolled 4 times, needed) costs up to 31 wasted entries a row
ENTRY_PAD = 8  # also the gather's tile (``_gather_panel``): keep it 8
BATCH_ROWS = 64  # rows solved together, one per lane of the batched b x b solves
BATCH_FLOATS = 1 << 18  # a batch's gathered columns: 1 MiB of float32 (a longer row is a batch alone)
# ... but at least this many entries: at f = 512 a 1 MiB batch held ~11 rows of 40 entries, and the
# Gram rows' pass (``_gram_rows``), reloaded into L1 for every batch and block, then ran at half its
# speed alone; 2048 entries (4 MiB at f = 512, the gather scratch of one row of 2048 entries) made a
# 2-sweep call 7-11% faster there and changed nothing at f = 256 (tools/RESULTS.md, issue 11 round 27)
BATCH_MIN_ENTRIES = 2048
LANE_BYTES = 1 << 20  # the batch's float64 b x b systems (fewer rows a batch at large b)


def batch_lanes(block_size: int) -> int:
    """Rows a batch solves together (one per vector lane of its b x b systems); the kernel's own
    ``lanes`` (plain Python here, so that a plan does not load numba)."""
    return max(1, min(BATCH_ROWS, LANE_BYTES // (block_size * block_size * 8)))


def kept_factor_bytes(factors: int, block_size: int, sweeps: int) -> int:
    """Bytes a kernel call keeps for its blocks' factored systems: with more than one sweep, every
    block's b x b float64 factors for a batch's lanes (f b lanes 8 bytes, 2 MiB at f = 512, b = 8)
    and a long row's (f b 8), so the later sweeps do not rebuild them; one block's otherwise."""
    b = max(1, min(block_size, factors))
    blocks = -(-factors // b) if sweeps > 1 else 1
    return blocks * b * b * (batch_lanes(b) + 1) * 8


def panel_bytes(factors: int, itemsize: int) -> int:
    """Bytes of a kernel call's gathered panel for a batch of short rows (``subspace_solve_rows``'
    ``buffer``: at least ``BATCH_MIN_ENTRIES`` entries of f values, 4 MiB at f = 512 in float32);
    a row longer than that widens it, as the gather scratch of the other solvers does."""
    return max(BATCH_MIN_ENTRIES, BATCH_FLOATS // max(1, factors)) * factors * itemsize


def kernel_scratch_bytes(factors: int, block_size: int, sweeps: int, itemsize: int) -> int:
    """What a kernel call holds whatever its task's size: the kept factors and the batch's panel
    (the plan's ``kernel_bytes`` for ialspp)."""
    return kept_factor_bytes(factors, block_size, sweeps) + panel_bytes(factors, itemsize)


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
def _gather_panel(Y, indices, start, n, buffer, base, width):
    """buffer[base + i * width + t] = Y[indices[start + t], i] for all f columns i, t < n: the
    row's panel, f x width, C order; the padding entries n <= t < width (a multiple of
    ENTRY_PAD = 8) repeat the row's first entry (they weigh nothing, and a row's own entry cannot
    bring it a NaN it does not have). Eight entries at a time, in 8 x 8 tiles transposed in
    registers (``transpose_tile``: 8 vector loads and stores a tile, where element by element it
    was 64 scalar ones each; the gather took 0.32-0.39 of the kernel's time at f = 256 that way)."""
    f = Y.shape[1]
    if n == 0:
        return
    f8 = f - f % 8
    for t0 in range(0, width, ENTRY_PAD):
        i0 = indices[start + min(t0, n - 1)]
        i1 = indices[start + min(t0 + 1, n - 1)]
        i2 = indices[start + min(t0 + 2, n - 1)]
        i3 = indices[start + min(t0 + 3, n - 1)]
        i4 = indices[start + min(t0 + 4, n - 1)]
        i5 = indices[start + min(t0 + 5, n - 1)]
        i6 = indices[start + min(t0 + 6, n - 1)]
        i7 = indices[start + min(t0 + 7, n - 1)]
        for k in range(0, f8, 8):
            transpose_tile(Y, i0, i1, i2, i3, i4, i5, i6, i7, k, buffer, base + k * width + t0, width)
        for k in range(f8, f):  # the last columns, fewer than 8
            p = base + k * width + t0
            buffer[p] = Y[i0, k]
            buffer[p + 1] = Y[i1, k]
            buffer[p + 2] = Y[i2, k]
            buffer[p + 3] = Y[i3, k]
            buffer[p + 4] = Y[i4, k]
            buffer[p + 5] = Y[i5, k]
            buffer[p + 6] = Y[i6, k]
            buffer[p + 7] = Y[i7, k]


@njit(**_JIT)
def _panel_scores(P, base, width, X, u, scores, o):
    """scores[o + t] = X[u] . y_t for t < width, the row's panel at P[base:] (f x width, C order)."""
    f = X.shape[1]
    panel = P[base : base + f * width]
    s = scores[o : o + width]  # stores through a view indexed by the loop variable: what vectorises
    for t in range(width):
        s[t] = 0
    for i in range(f):
        xi = X[u, i]
        p = i * width
        for t in range(width):
            s[t] += xi * panel[p + t]


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
def _accumulate(YT, k0, n, conf, weight, scores, w0, w1, A, r, kb, system=True):
    """Add the entries' part of the block's system and residual: A += sum_t w_t y_tB y_tB^T
    (lower triangle; a few entries above it too; only when ``system``), r += sum_t (c_t - w_t
    s_t) y_tB; rows k0..
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
    if not system:
        return
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
def _lane_entry(AL, gram, k0, i, k, q, reg, acc):
    """AL[i, k, q] = gram_BB[i, k] + reg [i == k] + acc, in float64."""
    AL[i, k, q] = np.float64(gram[k0 + i, k0 + k]) + np.float64(acc) + (np.float64(reg) if i == k else 0.0)


@njit(**_JIT)
def _lane_residual(P, base, width, o, conf, weight, scores, GR, X, u, reg, k0, kb, e, RL, q):
    """Batch row q's block residual, written to lane q: RL[i, q] = sum_t (c_t - w_t s_t) y_ti -
    GR[q, i] - reg X[u, k0 + i]. Feature k0 + i of the row's entry t is P[base + i * width + t]
    (the row's panel from the block's first feature on), its confidence, weight and score at
    o + t; e is scratch of width entries."""
    T = P.dtype.type
    Pb = P[base : base + kb * width]  # one view a call (a view per block row cost two atomic counts each)
    cw = conf[o : o + width]
    ww = weight[o : o + width]
    sw = scores[o : o + width]
    for t in range(width):
        e[t] = cw[t] - ww[t] * sw[t]
    for i in range(kb):
        p = i * width
        acc = T(0)
        for t in range(width):
            acc += e[t] * Pb[p + t]
        RL[i, q] = np.float64(acc) - np.float64(GR[q, i]) - np.float64(reg) * np.float64(X[u, k0 + i])


@njit(**_JIT)
def _lane_system(P, base, width, o, weight, gram, reg, k0, kb, w0, w1, AL, q):
    """Batch row q's block system, written to lane q: AL[i, k, q] = gram_BB + reg I + sum_t w_t
    y_ti y_tk (lower triangle, a few entries above it too); the panel and entries as in
    ``_lane_residual``, w0 and w1 scratch of width entries. It does not depend on the row's
    factors, so a half-sweep of several sweeps builds and factors it once (``subspace_solve_rows``).
    Flat indices throughout: a view per block row (what ``_accumulate`` takes) cost two atomic
    reference counts each, 7% of the kernel's time at f = 256, b = 8. The 2 x 4 register tiles of
    ``_accumulate``."""
    T = P.dtype.type
    Pb = P[base : base + kb * width]
    ww = weight[o : o + width]
    i0 = 0
    while i0 < kb:
        pa = i0 * width
        pb = pa + width if i0 + 1 < kb else pa  # an odd last row pairs with itself (its second row unused)
        for t in range(width):
            wt = ww[t]
            w0[t] = wt * Pb[pa + t]
            w1[t] = wt * Pb[pb + t]
        c = 0
        while c <= i0 + 1 and c < kb:  # column tiles reaching the diagonal
            if c + 4 <= kb:
                p0 = c * width
                p1 = p0 + width
                p2 = p1 + width
                p3 = p2 + width
                a00 = T(0)
                a01 = T(0)
                a02 = T(0)
                a03 = T(0)
                a10 = T(0)
                a11 = T(0)
                a12 = T(0)
                a13 = T(0)
                for t in range(width):
                    v0 = w0[t]
                    v1 = w1[t]
                    y0 = Pb[p0 + t]
                    y1 = Pb[p1 + t]
                    y2 = Pb[p2 + t]
                    y3 = Pb[p3 + t]
                    a00 += v0 * y0
                    a01 += v0 * y1
                    a02 += v0 * y2
                    a03 += v0 * y3
                    a10 += v1 * y0
                    a11 += v1 * y1
                    a12 += v1 * y2
                    a13 += v1 * y3
                _lane_entry(AL, gram, k0, i0, c, q, reg, a00)
                _lane_entry(AL, gram, k0, i0, c + 1, q, reg, a01)
                _lane_entry(AL, gram, k0, i0, c + 2, q, reg, a02)
                _lane_entry(AL, gram, k0, i0, c + 3, q, reg, a03)
                if i0 + 1 < kb:
                    _lane_entry(AL, gram, k0, i0 + 1, c, q, reg, a10)
                    _lane_entry(AL, gram, k0, i0 + 1, c + 1, q, reg, a11)
                    _lane_entry(AL, gram, k0, i0 + 1, c + 2, q, reg, a12)
                    _lane_entry(AL, gram, k0, i0 + 1, c + 3, q, reg, a13)
            else:  # the block's last columns, fewer than 4
                for k in range(c, kb):
                    pk = k * width
                    a0 = T(0)
                    a1 = T(0)
                    for t in range(width):
                        y = Pb[pk + t]
                        a0 += w0[t] * y
                        a1 += w1[t] * y
                    _lane_entry(AL, gram, k0, i0, k, q, reg, a0)
                    if i0 + 1 < kb:
                        _lane_entry(AL, gram, k0, i0 + 1, k, q, reg, a1)
            c += 4
        i0 += 2


@njit(**_JIT)
def _lane_update(P, base, width, o, step, scores, kb):
    """scores[o + t] += sum_i P[base + i * width + t] step[i] (the row's step on its cache)."""
    panel = P[base : base + kb * width]
    s = scores[o : o + width]
    for i in range(kb):
        d = step[i]
        p = i * width
        for t in range(width):
            s[t] += d * panel[p + t]


@njit(**_JIT)
def _begin_block(gram, x, reg, k0, kb, A, r, diagonal):
    """The block's system and residual before the entries: gram_BB + reg I and -gram_B: x - reg x_B
    (gram_B: x = gram_ii x_i when ``diagonal``: the Gram is diagonal, the eigenbasis's)."""
    f = x.shape[0]
    T = x.dtype.type
    for i in range(kb):
        for k in range(i + 1):
            A[i, k] = gram[k0 + i, k0 + k]
        A[i, i] += reg
        if diagonal:  # one product: -g x - reg x would be contracted to a multiply-add one way or another
            # by each of fastmath's compilations of this callee (cold and warm caches rounded differently)
            r[i] = -(gram[k0 + i, k0 + i] + reg) * x[k0 + i]
            continue
        g = gram[k0 + i]
        acc = T(0)
        for k in range(f):
            acc += g[k] * x[k]
        r[i] = -acc - reg * x[k0 + i]


@njit(**_INLINED)
def _diagonal_rows(X, u0, n, gram, k0, kb, out):
    """out[r, i] = gram[k0 + i, k0 + i] X[u0 + r, k0 + i] for r < n, i < kb: ``_gram_rows`` when
    the Gram is diagonal (the rows and the fixed side in the eigenbasis of its Gram): b a row and
    block instead of f b."""
    for r in range(n):
        x = X[u0 + r]
        for i in range(kb):
            out[r, i] = gram[k0 + i, k0 + i] * x[k0 + i]


@njit(**_JIT)
def _gram_rows(X, u0, n, gram, k0, kb, out):
    """out[r, i] = gram[k0 + i] . X[u0 + r] for r < n, i < kb: the Gram part of block B's
    residual for n rows at once. Register tiles of 4 rows x 4 Gram rows (the kb x f Gram rows
    stay in L1 while the rows stream past; a tile's last rows or Gram rows, when n or kb is not a
    multiple of 4, repeat its first ones and are not stored). 4 x 4 reads 8 vectors for 16
    multiply-adds where round 23's 2 x 4 read 6 for 8: 0.174 s against 0.196 a sweep in the
    kernel at f = 512 (20,000 users, one thread; tools/RESULTS.md, issue 11 round 27)."""
    T = X.dtype.type
    f = X.shape[1]
    r = 0
    while r < n:
        x0 = X[u0 + r]
        x1 = X[u0 + r + 1] if r + 1 < n else x0
        x2 = X[u0 + r + 2] if r + 2 < n else x0
        x3 = X[u0 + r + 3] if r + 3 < n else x0
        rows = min(4, n - r)
        i = 0
        while i < kb:
            g0 = gram[k0 + i]
            g1 = gram[k0 + i + 1] if i + 1 < kb else g0
            g2 = gram[k0 + i + 2] if i + 2 < kb else g0
            g3 = gram[k0 + i + 3] if i + 3 < kb else g0
            a00 = T(0)
            a01 = T(0)
            a02 = T(0)
            a03 = T(0)
            a10 = T(0)
            a11 = T(0)
            a12 = T(0)
            a13 = T(0)
            a20 = T(0)
            a21 = T(0)
            a22 = T(0)
            a23 = T(0)
            a30 = T(0)
            a31 = T(0)
            a32 = T(0)
            a33 = T(0)
            for k in range(f):
                v0 = x0[k]
                v1 = x1[k]
                v2 = x2[k]
                v3 = x3[k]
                h0 = g0[k]
                h1 = g1[k]
                h2 = g2[k]
                h3 = g3[k]
                a00 += v0 * h0
                a01 += v0 * h1
                a02 += v0 * h2
                a03 += v0 * h3
                a10 += v1 * h0
                a11 += v1 * h1
                a12 += v1 * h2
                a13 += v1 * h3
                a20 += v2 * h0
                a21 += v2 * h1
                a22 += v2 * h2
                a23 += v2 * h3
                a30 += v3 * h0
                a31 += v3 * h1
                a32 += v3 * h2
                a33 += v3 * h3
            cols = min(4, kb - i)
            _store_tile_row(out, r, i, cols, a00, a01, a02, a03)
            if rows > 1:
                _store_tile_row(out, r + 1, i, cols, a10, a11, a12, a13)
            if rows > 2:
                _store_tile_row(out, r + 2, i, cols, a20, a21, a22, a23)
            if rows > 3:
                _store_tile_row(out, r + 3, i, cols, a30, a31, a32, a33)
            i += 4
        r += 4


@njit(**_INLINED)
def _store_tile_row(out, r, i, cols, a0, a1, a2, a3):
    """out[r, i:i + cols] = (a0, a1, a2, a3)[:cols] (a tile row of ``_gram_rows``)."""
    out[r, i] = a0
    if cols > 1:
        out[r, i + 1] = a1
    if cols > 2:
        out[r, i + 2] = a2
    if cols > 3:
        out[r, i + 3] = a3


@njit(**_JIT)
def _factor_lanes(AL, kb, n, status):
    """Factor n systems at once, lane by lane: AL[:kb, :kb, l] = L L^T in place (float64 Cholesky
    of the lower triangles; the lanes are the last, contiguous axis, so every loop over them is a
    vector loop). status[l] = 0 factored, 1 not positive definite (the caller keeps that row's
    block unchanged), 2 a NaN or inf pivot (the caller makes the step NaN, so the half-sweep's
    finite check reports it): ``cholesky_solve_inplace``'s outcomes, with a bad pivot replaced by
    1 so the other lanes' loops stay branch-free."""
    for l in range(n):
        status[l] = 0.0
    for j in range(kb):
        d = AL[j, j]
        for k in range(j):
            a = AL[j, k]
            for l in range(n):
                d[l] -= a[l] * a[l]
        for l in range(n):
            v = d[l]
            finite = v - v == 0.0  # False for NaN and +-inf
            positive = v > 0.0
            status[l] = max(status[l], 0.0 if positive and finite else (1.0 if finite else 2.0))
            d[l] = np.sqrt(v) if positive and finite else 1.0
        for i in range(j + 1, kb):
            e = AL[i, j]
            for k in range(j):
                a = AL[i, k]
                c = AL[j, k]
                for l in range(n):
                    e[l] -= a[l] * c[l]
            for l in range(n):
                e[l] = e[l] / d[l]


@njit(**_JIT)
def _solve_lanes(AL, RL, kb, n):
    """L L^T d = RL[:kb, l] for each lane l < n, L from ``_factor_lanes``; d is left in RL."""
    for i in range(kb):  # L z = r
        z = RL[i]
        for k in range(i):
            a = AL[i, k]
            zk = RL[k]
            for l in range(n):
                z[l] -= a[l] * zk[l]
        d = AL[i, i]
        for l in range(n):
            z[l] = z[l] / d[l]
    for i in range(kb - 1, -1, -1):  # L^T d = z
        z = RL[i]
        for k in range(i + 1, kb):
            a = AL[k, i]
            zk = RL[k]
            for l in range(n):
                z[l] -= a[l] * zk[l]
        d = AL[i, i]
        for l in range(n):
            z[l] = z[l] / d[l]


@njit(**_JIT)
def _factor_block(A, A64, kb):
    """A64 = L, the float64 Cholesky factor of A's lower triangle (kb x kb). Returns 0 factored,
    1 not positive definite, 2 a NaN or inf pivot (``cholesky_factor_inplace``'s outcomes)."""
    for i in range(kb):
        for k in range(i + 1):
            A64[i, k] = A[i, k]
    return cholesky_factor_inplace(A64, kb)


@njit(**_JIT)
def _solve_factored(L, status, r, d64, x, k0, kb):
    """d = (L L^T)^-1 r in float64 with L from ``_factor_block``, x_B += d, d left in r. Returns
    False (and changes nothing) when the block's status is 1 (not positive definite: in exact
    arithmetic it always is, a principal block of the row's positive definite matrix); a NaN or
    inf pivot (2) gives a NaN step, so the half-sweep's finite check reports it."""
    if status == 1:
        return False
    for i in range(kb):
        d64[i] = r[i] if status == 0 else np.nan
    if status == 0:
        cholesky_substitute_inplace(L, d64, kb)
    for i in range(kb):
        r[i] = d64[i]
        x[k0 + i] += r[i]
    return True


@njit(**_JIT)
def _long_row(indptr, indices, values, Y, gram, x, u, kind, alpha, alpha0, eps, reg, sweeps, b, cap, buffer, conf, weight,
              scores, wy, wy1, A, r, KA, KS, d64, diagonal):
    """One row of more than ``cap`` entries: chunks of ``cap`` entries, the block's columns
    gathered per chunk (twice per block: system or residual, then cache update). Each block's
    system is built and factored in the first sweep only, its factor kept in KA[j] (status in
    KS[j]; KA and KS hold one block when ``sweeps`` is 1) for the later ones, which gather for
    the residual alone."""
    f = x.shape[0]
    start, stop = indptr[u], indptr[u + 1]
    n_u = stop - start
    _scores(Y, indices, start, n_u, x, scores)
    for sweep in range(sweeps):
        for j in range(-(-f // b)):
            k0 = j * b
            kb = min(b, f - k0)
            _begin_block(gram, x, reg, k0, kb, A, r, diagonal)
            for c0 in range(0, n_u, cap):
                m = min(cap, n_u - c0)
                YT = buffer[: kb * m].reshape((kb, m))
                _gather_columns(Y, indices, start + c0, m, k0, kb, YT)
                _accumulate(YT, 0, m, conf[c0:], weight[c0:], scores[c0:], wy, wy1, A, r, kb, sweep == 0)
            slot = j if sweeps > 1 else 0  # one block's room when nothing is kept
            if sweep == 0:
                KS[slot] = _factor_block(A, KA[slot], kb)
            if _solve_factored(KA[slot], KS[slot], r, d64, x, k0, kb):
                for c0 in range(0, n_u, cap):
                    m = min(cap, n_u - c0)
                    YT = buffer[: kb * m].reshape((kb, m))
                    _gather_columns(Y, indices, start + c0, m, k0, kb, YT)
                    _update_scores(YT, 0, m, r, scores[c0:], kb)


@njit(**_JIT)
def subspace_solve_rows(indptr, indices, values, Y, gram, X, kind, alpha, alpha0, eps, lam, nu, n_fixed, block_size,
                        sweeps, observed_loss=False, gather_entries=GATHER_MAX_ENTRIES, diagonal=False):
    """iALS++ on every row, warm-started from X (updated in place): ``sweeps`` passes over the
    blocks of ``block_size`` coordinates (the last block may be narrower).

    Returns sum over entries of c (1 - s)^2 - alpha0 s^2 at the result when ``observed_loss``
    is set (see ``loss``); else 0. Arithmetic in X's dtype except each block's Cholesky
    (float64). Rows of more than ``gather_entries`` entries are done alone, in chunks of that
    many (the argument is there for tests). ``diagonal``: ``gram`` is diagonal (zero off its
    diagonal: Y and X in the eigenbasis of the fixed side's Gram, ``train.fixed_side.Eigenbasis``),
    so the Gram part of a block's residual costs b a row instead of f b.

    Rows are solved in batches (up to ``BATCH_ROWS`` rows whose gathered columns fit
    ``BATCH_FLOATS``), block by block: for each block, the Gram part of every batch row's
    residual in one register-tiled pass (``_gram_rows``), each row's entries part of its
    residual (``_lane_residual``) and, in the first sweep, of its system (``_lane_system``), then
    the rows' b x b systems factored (first sweep) and solved together, one row per vector lane
    (``_factor_lanes``, ``_solve_lanes``), and each row's step applied. A block's system does not
    depend on the row's factors, so with several sweeps each block's factored lanes are kept from
    the first sweep (``kept_factor_bytes``: f b lanes float64) and a later sweep costs the Gram
    part, the residual, two triangular solves and the cache update. Rows are independent and
    each row sees its blocks in order, so the result is the row-by-row one up to rounding.
    """
    n_rows, f = X.shape
    T = X.dtype.type
    b = max(1, min(block_size, f))
    longest = max_row_nnz(indptr)
    cap = max(1, min(longest, gather_entries))
    lanes = max(1, min(BATCH_ROWS, LANE_BYTES // (b * b * 8)))  # batch_lanes(b)
    batch_entries = max(BATCH_MIN_ENTRIES, BATCH_FLOATS // f)  # a batch's gathered entries (a longer row is a batch alone)
    width = max(cap + ENTRY_PAD, batch_entries)
    buffer = np.empty(f * width, dtype=X.dtype)
    conf = np.zeros(max(width, longest), dtype=X.dtype)
    weight = np.zeros(max(width, longest), dtype=X.dtype)
    scores = np.zeros(max(width, longest), dtype=X.dtype)
    wy = np.empty(width, dtype=X.dtype)
    wy1 = np.empty(width, dtype=X.dtype)
    e = np.empty(width, dtype=X.dtype)
    A = np.empty((b, b), dtype=X.dtype)
    r = np.empty(b, dtype=X.dtype)
    d64 = np.empty(b, dtype=np.float64)
    blocks = -(-f // b)
    kept = blocks if sweeps > 1 else 1  # each block's factored systems, kept for the later sweeps
    KA = np.empty((kept, b, b), dtype=np.float64)  # a long row's
    KS = np.zeros(kept, dtype=np.int64)
    AL = np.empty((kept, b, b, lanes), dtype=np.float64)  # a batch's, one row a lane
    RL = np.empty((b, lanes), dtype=np.float64)
    status = np.empty((kept, lanes), dtype=np.float64)
    GR = np.empty((lanes, b), dtype=X.dtype)
    offset = np.empty(lanes + 1, dtype=np.int64)
    regs = np.empty(lanes, dtype=X.dtype)
    observed = 0.0
    u0 = 0
    while u0 < n_rows:
        n_u = indptr[u0 + 1] - indptr[u0]
        if n_u > cap:
            reg = T(row_regularization(n_u, lam, nu, alpha0, n_fixed))
            start = indptr[u0]
            for t in range(n_u):
                c = T(confidence(values[start + t], kind, alpha, alpha0, eps))
                conf[t] = c
                weight[t] = c - alpha0
            _long_row(indptr, indices, values, Y, gram, X[u0], u0, kind, alpha, alpha0, eps, reg, sweeps, b, cap, buffer,
                      conf, weight, scores, wy, wy1, A, r, KA, KS, d64, diagonal)
            if observed_loss:
                observed += _row_observed(Y, indices, start, n_u, X[u0], conf, scores, alpha0)
            u0 += 1
            continue
        # the batch: rows u0..u1 of at most cap entries each, their padded entries within width
        n = 0
        offset[0] = 0
        while u0 + n < n_rows and n < lanes:
            m = indptr[u0 + n + 1] - indptr[u0 + n]
            m_pad = -(-m // ENTRY_PAD) * ENTRY_PAD
            if m > cap or (n > 0 and offset[n] + m_pad > batch_entries):
                break
            offset[n + 1] = offset[n] + m_pad
            n += 1
        for q in range(n):
            u = u0 + q
            start, stop = indptr[u], indptr[u + 1]
            m = stop - start
            o, o1 = offset[q], offset[q + 1]
            regs[q] = T(row_regularization(m, lam, nu, alpha0, n_fixed))
            for t in range(m):
                c = T(confidence(values[start + t], kind, alpha, alpha0, eps))
                conf[o + t] = c
                weight[o + t] = c - alpha0
            for t in range(o + m, o1):  # padding entries weigh nothing
                conf[t] = 0
                weight[t] = 0
            _gather_panel(Y, indices, start, m, buffer, f * o, o1 - o)
            _panel_scores(buffer, f * o, o1 - o, X, u, scores, o)
        for sweep in range(sweeps):
            for j in range(blocks):
                k0 = j * b
                kb = min(b, f - k0)
                slot = j if sweeps > 1 else 0
                ALj = AL[slot]
                sj = status[slot]
                if diagonal:
                    _diagonal_rows(X, u0, n, gram, k0, kb, GR)
                else:
                    _gram_rows(X, u0, n, gram, k0, kb, GR)
                # two loops, not one with the system under a test: that one ran every sweep 2.4x slower
                # (tools/RESULTS.md, issue 11 round 26)
                if sweep == 0:
                    for q in range(n):
                        o, o1 = offset[q], offset[q + 1]
                        base = f * o + k0 * (o1 - o)
                        _lane_residual(buffer, base, o1 - o, o, conf, weight, scores, GR, X, u0 + q, regs[q], k0, kb, e, RL, q)
                        _lane_system(buffer, base, o1 - o, o, weight, gram, regs[q], k0, kb, wy, wy1, ALj, q)
                    _factor_lanes(ALj, kb, n, sj)
                else:
                    for q in range(n):
                        o, o1 = offset[q], offset[q + 1]
                        base = f * o + k0 * (o1 - o)
                        _lane_residual(buffer, base, o1 - o, o, conf, weight, scores, GR, X, u0 + q, regs[q], k0, kb, e, RL, q)
                _solve_lanes(ALj, RL, kb, n)
                for q in range(n):
                    if sj[q] == 1.0:  # not positive definite: the row keeps this block
                        continue
                    o, o1 = offset[q], offset[q + 1]
                    for i in range(kb):
                        r[i] = RL[i, q] if sj[q] == 0.0 else np.nan
                        X[u0 + q, k0 + i] += r[i]
                    _lane_update(buffer, f * o + k0 * (o1 - o), o1 - o, o, r, scores, kb)
        if observed_loss:  # from the prediction cache: it drifts from X . y by float rounding only (one
            # update a block), and a fresh pass over the panel cost 1/3 of the scores' share (tools/RESULTS.md,
            # issue 11 round 25)
            for q in range(n):
                u = u0 + q
                o = offset[q]
                for t in range(o, o + indptr[u + 1] - indptr[u]):
                    s = scores[t]
                    observed += conf[t] * (1 - s) * (1 - s) - alpha0 * s * s
        u0 += n
    return observed


@njit(**_JIT)
def _row_observed(Y, indices, start, n_u, x, conf, scores, alpha0):
    """sum over the row's entries of c (1 - s)^2 - alpha0 s^2, the scores computed afresh (the
    cache drifts by rounding)."""
    _scores(Y, indices, start, n_u, x, scores)
    observed = 0.0
    for t in range(n_u):
        s = scores[t]
        observed += conf[t] * (1 - s) * (1 - s) - alpha0 * s * s
    return observed
