"""Each numba kernel against a dense NumPy closed form on random small problems."""

import numpy as np
import pytest
from numba import njit

from wals_ooc.kernels.blocked import (
    accumulate_block,
    column_ranks,
    gather_marked,
    mark_columns,
    renumber_columns,
    solve_accumulated,
)
from wals_ooc.kernels.loss import observed_loss_block, row_penalties
from wals_ooc.kernels.solve import CONFIDENCE_KINDS, GATHER_MAX_ENTRIES, GROUP_ROWS, cg_solve_rows, cholesky_solve_rows
from wals_ooc.kernels.subspace import subspace_solve_rows
from wals_ooc.kernels.tile import WIDE_BYTES, fuses, gathered_pass, half_rows, half_usable, pack_gram, tiled_product, tiles, weighted_pass
from wals_ooc.kernels.topk import new_heaps, topk_finish, topk_update
from wals_ooc.kernels.transpose import transpose_tile

from .reference import dense_objective, dense_solve, random_interactions

SETTINGS = [
    dict(kind="linear", alpha=2.0, alpha0=1.0, lam=0.1, nu=0.0),
    dict(kind="log", alpha=3.0, alpha0=0.5, lam=0.05, nu=0.0),
    dict(kind="constant", alpha=4.0, alpha0=0.1, lam=0.01, nu=1.0),
]


def _problem(seed, n_rows=25, n_fixed=40, f=8, density=0.25, dtype=np.float32):
    R = random_interactions(n_rows, n_fixed, density, seed)
    rng = np.random.default_rng(seed + 100)
    Y = rng.normal(0, 0.3, size=(n_fixed, f)).astype(dtype)
    return R, Y


def _args(setting):
    return CONFIDENCE_KINDS[setting["kind"]], setting["alpha"], setting["alpha0"], 1.0, setting["lam"], setting["nu"]


def _gram(Y, alpha0):
    return (alpha0 * (Y.astype(np.float64).T @ Y.astype(np.float64))).astype(Y.dtype)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cholesky_equals_dense_closed_form(setting, seed):
    R, Y = _problem(seed)
    X = np.zeros((R.shape[0], Y.shape[1]), np.float32)
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    failures = cholesky_solve_rows(R.indptr.astype(np.int64), R.indices, R.data, Y, _gram(Y, alpha0), X,
                                   kind, alpha, alpha0, eps, lam, nu, Y.shape[0])
    assert failures == 0
    expected = dense_solve(R, Y, **{k: setting[k] for k in ("kind", "alpha", "alpha0", "lam", "nu")})
    np.testing.assert_allclose(X, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("setting", SETTINGS)
def test_cholesky_float64_is_exact(setting):
    R, Y = _problem(7, dtype=np.float64)
    X = np.zeros((R.shape[0], Y.shape[1]), np.float64)
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    cholesky_solve_rows(R.indptr.astype(np.int64), R.indices, R.data, Y, _gram(Y, alpha0), X,
                        kind, alpha, alpha0, eps, lam, nu, Y.shape[0])
    expected = dense_solve(R, Y, **{k: setting[k] for k in ("kind", "alpha", "alpha0", "lam", "nu")})
    np.testing.assert_allclose(X, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("setting", SETTINGS)
def test_cg_converges_to_closed_form_with_more_steps(setting):
    R, Y = _problem(3, dtype=np.float64)
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    expected = dense_solve(R, Y, **{k: setting[k] for k in ("kind", "alpha", "alpha0", "lam", "nu")})
    errors = []
    for steps in (1, 2, 4, 8):
        X = np.zeros_like(expected)
        cg_solve_rows(R.indptr.astype(np.int64), R.indices, R.data, Y, _gram(Y, alpha0), X,
                      kind, alpha, alpha0, eps, lam, nu, Y.shape[0], steps)
        errors.append(np.linalg.norm(X - expected) / np.linalg.norm(expected))
    assert all(later <= earlier * 1.0001 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6, errors  # f = 8 steps: exact up to rounding


@pytest.mark.parametrize("setting", SETTINGS)
def test_jacobi_cg_reaches_closed_form_and_each_step_lowers_every_rows_objective(setting):
    """Jacobi-preconditioned CG (z = r / diag A): 2f steps reach the closed form (f do not quite in
    float64 on systems this badly conditioned, plain CG neither), every added step
    lowers (never raises) each row's objective, and on rows whose diagonals spread (play counts
    as confidences) 3 preconditioned steps end lower than 3 plain ones overall."""
    R, Y = _problem(3, n_rows=40, n_fixed=60, f=16, dtype=np.float64)
    R.data = R.data ** 3  # confidences over two orders of magnitude, as play counts
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    keys = ("kind", "alpha", "alpha0", "lam", "nu")
    expected = dense_solve(R, Y, **{k: setting[k] for k in keys})
    start = np.random.default_rng(4).normal(0, 0.1, size=expected.shape)
    indptr = R.indptr.astype(np.int64)

    def solve(steps, jacobi):
        X = start.copy()
        cg_solve_rows(indptr, R.indices, R.data, Y, _gram(Y, alpha0), X, kind, alpha, alpha0, eps, lam, nu, Y.shape[0],
                      steps, False, None, jacobi)
        return X

    objectives = [_row_objectives(R, start, Y, setting)]
    for steps in range(1, 33):
        objectives.append(_row_objectives(R, solve(steps, True), Y, setting))
    for earlier, later in zip(objectives, objectives[1:]):
        assert (later <= earlier * (1 + 1e-12)).all()
    X = solve(32, True)
    assert np.linalg.norm(X - expected) / np.linalg.norm(expected) < 1e-10
    assert objectives[3].sum() < _row_objectives(R, solve(3, False), Y, setting).sum()


@pytest.mark.parametrize("jacobi", [False, True])
@pytest.mark.parametrize("f", [8, 32])  # 32: the Gram products register-tiled (tile.py), 8: BLAS
def test_cg_row_groups_empty_and_long_rows_reach_closed_form(f, jacobi):
    """Rows over several lockstep groups, an empty row, and a row longer than the gather block
    (solved alone from Y): f steps reach the closed form, and the loss returned (scores carried
    through the steps) equals a pass over the solved rows."""
    n_rows, n_fixed = 2 * GROUP_ROWS + 22, GATHER_MAX_ENTRIES + 300
    R = random_interactions(n_rows, n_fixed, 0.002, 7).tolil()
    R[3, :] = 0
    R[GROUP_ROWS + 5, :] = np.random.default_rng(8).integers(1, 4, size=n_fixed).astype(R.dtype)
    R = R.tocsr()
    R.eliminate_zeros()
    assert R.getnnz(axis=1)[3] == 0 and R.getnnz(axis=1).max() > GATHER_MAX_ENTRIES
    rng = np.random.default_rng(9)
    Y = rng.normal(0, 0.3, size=(n_fixed, f))
    setting = SETTINGS[1]
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    indptr = R.indptr.astype(np.int64)
    X = rng.normal(0, 0.1, size=(n_rows, f))  # warm start, as in training
    observed = cg_solve_rows(indptr, R.indices, R.data, Y, _gram(Y, alpha0), X, kind, alpha, alpha0, eps, lam, nu,
                             n_fixed, f, True, None, jacobi)
    expected = dense_solve(R, Y, **{k: setting[k] for k in ("kind", "alpha", "alpha0", "lam", "nu")})
    assert np.linalg.norm(X - expected) / np.linalg.norm(expected) < 1e-6
    direct = observed_loss_block(indptr, R.indices, R.data, indptr[:-1].copy(), 0, n_fixed, Y, X, kind, alpha, alpha0, eps)
    assert observed == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("f", [16, 48])
def test_tiled_gram_product_equals_matmul(f, dtype):
    """Rows times the Gram packed in 16-column panels, for row counts that are not a multiple of 4
    (the padding rows are computed too, and nothing past them is written)."""
    rng = np.random.default_rng(f)
    A = rng.normal(size=(12, f)).astype(dtype)
    G = rng.normal(size=(f, f)).astype(dtype)
    assert tiles(f) and not tiles(f + 8) and not tiles(0)
    Gp = pack_gram(G)
    for n in (1, 4, 7, 12):
        D = np.full((12, f), np.nan, dtype)
        tiled_product(A, Gp, D, n)
        m = -(-n // 4) * 4
        np.testing.assert_allclose(D[:m], A[:m].astype(np.float64) @ G, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                   atol=1e-4 if dtype == np.float32 else 1e-12)
        assert np.isnan(D[m:]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_row_passes_equal_numpy(dtype):
    """CG's sparse passes with the sums in registers (tile.py): the step's dots and weighted sum,
    and the residual's pass gathering its rows (a strided source takes the plain loop)."""
    itemsize = np.dtype(dtype).itemsize
    lanes = WIDE_BYTES // itemsize
    assert fuses(lanes, itemsize) and fuses(8 * lanes, itemsize) and not fuses(9 * lanes, itemsize)
    assert not fuses(lanes + 1, itemsize) and not fuses(0, itemsize)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    rng = np.random.default_rng(3)
    for f in (lanes, 3 * lanes, 8 * lanes):
        wide = rng.normal(size=(50, 2 * f)).astype(dtype)
        ids = rng.integers(0, 50, size=40).astype(np.int32)
        v, acc0 = rng.normal(size=f).astype(dtype), rng.normal(size=f).astype(dtype)
        weight = rng.normal(size=30).astype(dtype)
        for source in (np.ascontiguousarray(wide[:, :f]), wide[:, :f]):
            rows, dots, acc = np.full((30, f), np.nan, dtype), np.zeros(30, dtype), acc0.copy()
            gathered_pass(source, ids, 5, 40, rows, 2, 27, v, weight, dots, acc, 1.5)
            y = source[ids[7:32]].astype(np.float64)
            s = y @ v
            np.testing.assert_array_equal(rows[2:27], source[ids[7:32]])
            assert np.isnan(rows[:2]).all() and np.isnan(rows[27:]).all()
            np.testing.assert_allclose(dots[2:27], s, **tolerance)
            np.testing.assert_allclose(acc, acc0 + (1.5 + weight[2:27] * (1 - s)) @ y, **tolerance)
            squares, acc = acc0.copy(), acc0.copy()  # with the diagonal of sum w y y^T (Jacobi): the same, and it
            gathered_pass(source, ids, 5, 40, rows, 2, 27, v, weight, dots, acc, 1.5, squares)
            np.testing.assert_allclose(acc, acc0 + (1.5 + weight[2:27] * (1 - s)) @ y, **tolerance)
            np.testing.assert_allclose(squares, acc0 + weight[2:27] @ (y * y), **tolerance)
        acc = acc0.copy()
        weighted_pass(rows, 2, 27, v, weight, dots, acc)
        np.testing.assert_allclose(dots[2:27], s, **tolerance)
        np.testing.assert_allclose(acc, acc0 + (weight[2:27] * s) @ y, **tolerance)
        acc = acc0.copy()
        weighted_pass(rows, 4, 4, v, weight, dots, acc)  # no entries: the sum unchanged
        np.testing.assert_array_equal(acc, acc0)


def test_half_rows_round_as_numpy_and_count_overflows():
    """The float16 copy of a fixed side: NumPy's rounding (to nearest even), subnormals, inf and
    NaN kept, and a count of the finite values beyond float16's range (then unusable)."""
    rng = np.random.default_rng(5)
    source = (rng.normal(0, 0.5, size=(20, 32)) * 10.0 ** rng.integers(-9, 3, size=(20, 32))).astype(np.float32)
    target = np.zeros_like(source, dtype=np.uint16)
    overflows, tiny = half_rows(source, target, 3, 17)
    assert overflows == 0 and tiny == np.count_nonzero((np.abs(source[3:17]) < 2.0**-14) & (source[3:17] != 0))
    np.testing.assert_array_equal(target[3:17], source[3:17].astype(np.float16).view(np.uint16))
    assert not target[:3].any() and not target[17:].any()
    special = np.array([[np.inf, -np.inf, np.nan, 65504.0, 6e-8, 1e-9, -7e4, 1e30]], np.float32)
    bits = np.zeros(special.shape, np.uint16)
    assert half_rows(special, bits, 0, 1) == (2, 2)  # -7e4 and 1e30: finite, beyond 65504; 6e-8 and 1e-9 subnormal
    widened = bits.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(widened[0, [0, 1, 3, 4, 5, 6, 7]], [np.inf, -np.inf, 65504.0, np.float16(6e-8), 0, -np.inf, np.inf])
    assert np.isnan(widened[0, 2])


def test_a_half_copy_is_refused_beyond_float16s_range_or_below_its_normals():
    """The trainer keeps float32 gathers when float16 cannot carry the fixed side: one value
    beyond 65504, or more than one non-zero value in 8 subnormal (a side of tiny values)."""
    from wals_ooc.train.fixed_side import half_copy, release_fixed_side

    assert half_usable(0, 0, 100) and half_usable(0, 12, 100) and not half_usable(0, 13, 100)
    assert not half_usable(1, 0, 100)
    rng = np.random.default_rng(7)
    usual = (rng.random((64, 32)) * 0.01).astype(np.float32)  # the default init_scale: 0.6% subnormal
    try:
        assert half_copy(("test-usual",), usual) is not None
        assert half_copy(("test-tiny",), usual * np.float32(1e-3)) is None  # ~61% subnormal
        assert half_copy(("test-huge",), usual * np.float32(1e7)) is None  # beyond 65504
    finally:
        release_fixed_side()


def test_row_passes_widen_a_half_copy():
    """The residual's pass gathering from float16 bits (uint16): the rows it keeps are the float16
    values (widened exactly to float32, or as they are), and its dots and sum are NumPy's over
    them; so are the step's pass's over float16 rows."""
    lanes = WIDE_BYTES // 4
    rng = np.random.default_rng(6)
    for f in (lanes, 8 * lanes):
        fixed = rng.normal(size=(50, f)).astype(np.float32)
        half = np.zeros(fixed.shape, np.uint16)
        half_rows(fixed, half, 0, 50)
        ids = rng.integers(0, 50, size=40).astype(np.int32)
        v, acc0 = rng.normal(size=f).astype(np.float32), rng.normal(size=f).astype(np.float32)
        weight = rng.normal(size=30).astype(np.float32)
        y = fixed[ids[7:32]].astype(np.float16).astype(np.float64)
        s = y @ v
        for rows in (np.full((30, f), np.nan, np.float32), np.full((30, f), 0xFFFF, np.uint16)):  # kept widened, or as float16
            dots, acc = np.zeros(30, np.float32), acc0.copy()
            gathered_pass(half, ids, 5, 40, rows, 2, 27, v, weight, dots, acc, 1.5)
            kept = rows.view(np.float16) if rows.dtype == np.uint16 else rows
            np.testing.assert_array_equal(kept[2:27], y)
            assert np.isnan(kept[:2]).all() and np.isnan(kept[27:]).all()
            np.testing.assert_allclose(dots[2:27], s, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(acc, acc0 + (1.5 + weight[2:27] * (1 - s)) @ y, rtol=1e-4, atol=1e-4)
            squares = acc0.copy()  # Jacobi's diagonal, over the widened rows
            gathered_pass(half, ids, 5, 40, rows, 2, 27, v, weight, dots, acc0.copy(), 1.5, squares)
            np.testing.assert_allclose(squares, acc0 + weight[2:27] @ (y * y), rtol=1e-4, atol=1e-4)
        dots, acc = np.zeros(30, np.float32), acc0.copy()
        weighted_pass(rows, 2, 27, v, weight, dots, acc)  # the step's pass over float16 rows
        np.testing.assert_allclose(dots[2:27], s, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(acc, acc0 + (weight[2:27] * s) @ y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("jacobi", [False, True])
def test_cg_with_a_half_copy_reaches_its_closed_form(jacobi):
    """CG gathering from the fixed side's float16 copy (groups of rows, fused passes): f steps reach
    the closed form of the rows it gathered (float16-rounded fixed rows, float32 Gram), and stay
    within float16's rounding of the exact closed form: each fixed value is off by at most 2^-11
    relatively, which moves the solution by that times the system's conditioning (3.3e-4 here)."""
    f = 2 * (WIDE_BYTES // 4)
    assert fuses(f, 4)
    R, Y = _problem(11, n_rows=150, n_fixed=120, f=f, density=0.3)
    kind, alpha, alpha0, eps, lam, nu = _args(SETTINGS[0])
    gram = _gram(Y, alpha0)
    half = np.zeros(Y.shape, np.uint16)
    assert half_rows(Y, half, 0, len(Y))[0] == 0
    indptr = R.indptr.astype(np.int64)
    X0 = np.random.default_rng(12).normal(0, 0.1, size=(R.shape[0], f)).astype(np.float32)
    X, X_exact = X0.copy(), X0.copy()
    cg_solve_rows(indptr, R.indices, R.data, Y, gram, X, kind, alpha, alpha0, eps, lam, nu, len(Y), f, False, half, jacobi)
    cg_solve_rows(indptr, R.indices, R.data, Y, gram, X_exact, kind, alpha, alpha0, eps, lam, nu, len(Y), f, False, None, jacobi)
    Yh = Y.astype(np.float16).astype(np.float64)
    rounded = np.empty_like(X, dtype=np.float64)
    for u in range(R.shape[0]):
        cols, r = R.indices[R.indptr[u]:R.indptr[u + 1]], R.data[R.indptr[u]:R.indptr[u + 1]].astype(np.float64)
        c = alpha0 + alpha * r
        A = gram.astype(np.float64) + (Yh[cols].T * (c - alpha0)) @ Yh[cols] + lam * np.eye(f)
        rounded[u] = np.linalg.solve(A, Yh[cols].T @ c)
    exact = dense_solve(R, Y, kind="linear", alpha=alpha, alpha0=alpha0, lam=lam)
    assert np.linalg.norm(X - rounded) / np.linalg.norm(rounded) < 1e-4
    assert np.linalg.norm(X_exact - exact) / np.linalg.norm(exact) < 1e-4  # float32 gathers: exact
    moved = np.linalg.norm(X - exact) / np.linalg.norm(exact)
    assert 1e-6 < moved < 2e-3, moved  # the copy was used, and only rounds


def test_cg_float32_warm_start_reaches_closed_form():
    R, Y = _problem(4)
    setting = SETTINGS[0]
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    expected = dense_solve(R, Y, kind="linear", alpha=2.0, alpha0=1.0, lam=0.1)
    X = np.zeros((R.shape[0], Y.shape[1]), np.float32)
    errors = []
    for _ in range(6):  # warm-started rounds of 3 steps, as successive training iterations do
        cg_solve_rows(R.indptr.astype(np.int64), R.indices, R.data, Y, _gram(Y, alpha0), X,
                      kind, alpha, alpha0, eps, lam, nu, Y.shape[0], 3)
        errors.append(np.linalg.norm(X - expected) / np.linalg.norm(expected))
    assert errors[0] < 0.2 and errors[-1] < 1e-4, errors


@pytest.mark.parametrize("setting", SETTINGS)
def test_blocked_normal_equations_equal_closed_form(setting):
    R, Y = _problem(5, dtype=np.float64)
    n_rows, f = R.shape[0], Y.shape[1]
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    indptr = R.indptr.astype(np.int64)
    A = np.zeros((n_rows, f, f))
    b = np.zeros((n_rows, f))
    c_sum = np.zeros(n_rows)
    cursor = indptr[:-1].copy()
    for lo in range(0, Y.shape[0], 13):  # blocks of 13 fixed rows
        hi = min(lo + 13, Y.shape[0])
        accumulate_block(indptr, R.indices, R.data, cursor, lo, hi, Y[lo:hi], A, b, c_sum, kind, alpha, alpha0, eps)
    assert (cursor == indptr[1:]).all()
    X = np.zeros((n_rows, f))
    failures, observed = solve_accumulated(indptr, A, b, c_sum, _gram(Y, alpha0), X, lam, nu, alpha0, Y.shape[0])
    assert failures == 0
    expected = dense_solve(R, Y, **{k: setting[k] for k in ("kind", "alpha", "alpha0", "lam", "nu")})
    np.testing.assert_allclose(X, expected, rtol=1e-9, atol=1e-12)
    cursor = indptr[:-1].copy()  # the loss folded into the solve equals the loss of a pass over Y
    direct = observed_loss_block(indptr, R.indices, R.data, cursor, 0, Y.shape[0], Y, X, kind, alpha, alpha0, eps)
    assert observed == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("setting", SETTINGS)
def test_loss_pieces_sum_to_dense_objective(setting):
    R, Y = _problem(6, dtype=np.float64)
    rng = np.random.default_rng(0)
    X = rng.normal(0, 0.3, size=(R.shape[0], Y.shape[1]))
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    indptr = R.indptr.astype(np.int64)
    quadratic, user_reg = row_penalties(indptr, X, _gram(Y, alpha0), lam, nu, alpha0, Y.shape[0])
    cursor = indptr[:-1].copy()
    observed = 0.0
    for lo in (0, 20):  # two blocks give the same sum as one
        observed += observed_loss_block(indptr, R.indices, R.data, cursor, lo, lo + 20, Y[lo:lo + 20], X,
                                        kind, alpha, alpha0, eps)
    RT = R.T.tocsr()
    _, item_reg = row_penalties(RT.indptr.astype(np.int64), Y, _gram(X, alpha0), lam, nu, alpha0, X.shape[0])
    expected = dense_objective(R, X, Y, **{k: setting[k] for k in ("kind", "alpha", "alpha0", "lam", "nu")})
    np.testing.assert_allclose(quadratic + observed + user_reg + item_reg, expected, rtol=1e-9)


def test_topk_equals_argsort_with_exclusions():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(30, 200)).astype(np.float32)
    liked = random_interactions(30, 200, 0.1, seed=2)
    k = 7
    heap_scores, heap_ids = new_heaps(30, k)
    cursor = liked.indptr[:-1].astype(np.int64).copy()
    for lo in range(0, 200, 64):  # blocks of items, as recommend streams them
        cols = np.arange(lo, min(lo + 64, 200), dtype=np.int64)
        topk_update(np.ascontiguousarray(scores[:, cols]), cols, liked.indptr.astype(np.int64),
                    liked.indices.astype(np.int64), cursor, heap_scores, heap_ids)
    topk_finish(heap_scores, heap_ids)
    masked = np.where(liked.toarray() > 0, -np.inf, scores)
    expected = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(heap_ids, expected)
    np.testing.assert_allclose(heap_scores, np.take_along_axis(masked, expected, 1))


def test_topk_with_fewer_candidates_than_k_pads_with_minus_one():
    scores = np.array([[0.5, 0.1, 0.9]], np.float32)
    heap_scores, heap_ids = new_heaps(1, 5)
    cursor = np.zeros(1, np.int64)
    topk_update(scores, np.arange(3, dtype=np.int64), np.array([0, 1], np.int64), np.array([1], np.int64),
                cursor, heap_scores, heap_ids)
    topk_finish(heap_scores, heap_ids)
    assert heap_ids.tolist() == [[2, 0, -1, -1, -1]]


@pytest.mark.parametrize("jacobi", [False, True])
@pytest.mark.parametrize("setting", SETTINGS)
def test_blocked_cg_passes_equal_row_by_row_cg(setting, jacobi):
    """CG run one sweep of the fixed blocks per pass takes the same steps as the row-by-row CG
    kernel (plain or Jacobi-preconditioned), and the loss it folds into its last pass is the
    loss at the final factors."""
    from wals_ooc.kernels.blocked import cg_begin, cg_observed_loss, cg_product_block, cg_residual_block, cg_step, row_regularizations

    R, Y = _problem(8, dtype=np.float64)
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    indptr, gram, n, f = R.indptr.astype(np.int64), _gram(Y, alpha0), R.shape[0], Y.shape[1]
    start = np.random.default_rng(1).normal(0, 0.1, size=(n, f))
    expected = start.copy()
    expected_loss = cg_solve_rows(indptr, R.indices, R.data, Y, gram, expected, kind, alpha, alpha0, eps, lam, nu, Y.shape[0], 3, True,
                                  None, jacobi)
    plain = start.copy()
    cg_solve_rows(indptr, R.indices, R.data, Y, gram, plain, kind, alpha, alpha0, eps, lam, nu, Y.shape[0], 3)
    assert jacobi == (np.abs(plain - expected).max() > 1e-6)  # the preconditioner takes other steps

    X = start.copy()
    reg = np.empty(n)
    row_regularizations(indptr, lam, nu, alpha0, Y.shape[0], reg)
    Res, P, AP = np.zeros((n, f)), np.zeros((n, f)), np.zeros((n, f))
    rs, steps, loss_terms = np.zeros(n), np.zeros(n), np.zeros((n, 3))
    gather = np.zeros((4, f))  # smaller than a row's entries in a block: the kernels gather in pieces

    def sweep(kernel):
        cursor = indptr[:-1].copy()
        for lo in range(0, Y.shape[0], 13):
            kernel(cursor, lo, min(lo + 13, Y.shape[0]))
        assert (cursor == indptr[1:]).all()

    inv = np.zeros((n, f)) if jacobi else None
    sweep(lambda cur, lo, hi: cg_residual_block(indptr, R.indices, R.data, cur, lo, hi, Y[lo:hi], X, Res, gather, kind, alpha, alpha0, eps,
                                                inv))
    if jacobi:
        cg_begin(X, Res, X @ gram, reg, P, rs, inv, gram)
    else:
        cg_begin(X, Res, X @ gram, reg, P, rs)
    for step in range(3):
        AP[:] = 0
        sweep(lambda cur, lo, hi: cg_product_block(indptr, R.indices, R.data, cur, lo, hi, Y[lo:hi], P, AP, X, loss_terms,
                                                   step == 2, gather, kind, alpha, alpha0, eps))
        cg_step(X, Res, P, AP, P @ gram, reg, rs, steps, inv)
    np.testing.assert_allclose(X, expected, rtol=1e-10, atol=1e-12)
    assert cg_observed_loss(loss_terms, steps) == pytest.approx(expected_loss, rel=1e-9)


def _row_objectives(R, X, Y, setting):
    """Each row's own objective (its terms of the dense objective with Y held)."""
    from .reference import confidence, row_regularization

    X, Y = X.astype(np.float64), Y.astype(np.float64)
    out = np.empty(R.shape[0])
    for u in range(R.shape[0]):
        cols = R.indices[R.indptr[u]:R.indptr[u + 1]]
        weights = np.full(Y.shape[0], setting["alpha0"])
        weights[cols] = confidence(R.data[R.indptr[u]:R.indptr[u + 1]].astype(np.float64), setting["kind"],
                                   setting["alpha"], setting["alpha0"])
        target = np.zeros(Y.shape[0])
        target[cols] = 1.0
        reg = row_regularization(len(cols), setting["lam"], setting["nu"], setting["alpha0"], Y.shape[0])
        out[u] = (weights * (target - Y @ X[u]) ** 2).sum() + reg * X[u] @ X[u]
    return out


@pytest.mark.parametrize("setting", SETTINGS)
def test_ialspp_one_block_of_every_coordinate_is_the_closed_form(setting):
    """block_size >= f: one block step is the row's exact solve, from any start."""
    R, Y = _problem(8, dtype=np.float64)
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    expected = dense_solve(R, Y, **{k: setting[k] for k in ("kind", "alpha", "alpha0", "lam", "nu")})
    for block_size in (8, 20):
        X = np.random.default_rng(0).normal(size=expected.shape)
        subspace_solve_rows(R.indptr.astype(np.int64), R.indices, R.data, Y, _gram(Y, alpha0), X,
                            kind, alpha, alpha0, eps, lam, nu, Y.shape[0], block_size, 1)
        np.testing.assert_allclose(X, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ialspp_converges_to_closed_form_with_sweeps_and_no_row_objective_rises(setting, dtype):
    """Blocks of 3 coordinates (the last one 2 wide) at f = 8: each sweep lowers every row's
    objective, and the sweeps reach the dense closed form."""
    R, Y = _problem(9, dtype=dtype)
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    t = np.dtype(dtype).type
    expected = dense_solve(R, Y, **{k: setting[k] for k in ("kind", "alpha", "alpha0", "lam", "nu")})
    X = np.zeros(expected.shape, dtype)
    objectives, errors = [_row_objectives(R, X, Y, setting)], []

    def sweeps(count):
        observed = subspace_solve_rows(R.indptr.astype(np.int64), R.indices, R.data, Y, _gram(Y, alpha0), X,
                                       kind, t(alpha), t(alpha0), t(eps), lam, nu, Y.shape[0], 3, count, True)
        objectives.append(_row_objectives(R, X, Y, setting))
        errors.append(np.linalg.norm(X - expected) / np.linalg.norm(expected))
        return observed

    for _ in range(8):
        sweeps(1)
    observed = sweeps(200)  # block Gauss-Seidel converges linearly: many sweeps reach the closed form
    tolerance = 1e-12 if dtype == np.float64 else 1e-5
    for earlier, later in zip(objectives, objectives[1:]):
        assert np.all(later <= earlier * (1 + tolerance) + tolerance), (earlier - later).min()
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < (1e-9 if dtype == np.float64 else 1e-4), errors
    # the returned observed-loss terms are those of the final factors
    from .reference import confidence

    c = confidence(R.data.astype(np.float64), setting["kind"], alpha, alpha0)
    s = np.asarray((X.astype(np.float64) @ Y.astype(np.float64).T)[R.nonzero()]).ravel()
    assert observed == pytest.approx(float((c * (1 - s) ** 2 - alpha0 * s ** 2).sum()), rel=1e-4)


@pytest.mark.parametrize("setting", SETTINGS[:2])
def test_ialspp_rows_done_in_chunks_equal_rows_gathered_whole(setting):
    """Rows longer than the gather scratch (here 4 entries) take the chunked path: same result."""
    R, Y = _problem(10, dtype=np.float64)
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    start = np.random.default_rng(1).normal(size=(R.shape[0], Y.shape[1]))
    whole, chunked = start.copy(), start.copy()
    args = (kind, alpha, alpha0, eps, lam, nu, Y.shape[0], 3, 2, True)
    expected = subspace_solve_rows(R.indptr.astype(np.int64), R.indices, R.data, Y, _gram(Y, alpha0), whole, *args)
    got = subspace_solve_rows(R.indptr.astype(np.int64), R.indices, R.data, Y, _gram(Y, alpha0), chunked, *args, 4)
    assert np.diff(R.indptr).max() > 3 * 4
    np.testing.assert_allclose(chunked, whole, rtol=1e-10, atol=1e-12)
    assert got == pytest.approx(expected, rel=1e-10)


def test_ialspp_gram_rows_tiles_cover_every_row_and_gram_row():
    """``_gram_rows`` (4 x 4 register tiles) against NumPy when neither the rows nor the block's
    Gram rows fill a tile, and from a row offset: every output written, nothing beyond n or kb."""
    from wals_ooc.kernels.subspace import _gram_rows

    rng = np.random.default_rng(3)
    X = rng.normal(size=(12, 13))
    G = rng.normal(size=(13, 13))
    for n in (1, 2, 3, 4, 5, 7, 9):
        for k0, kb in ((0, 1), (2, 3), (4, 4), (5, 5), (3, 8)):
            out = np.full((10, 9), 7.0)
            _gram_rows(X, 2, n, G, k0, kb, out)
            np.testing.assert_allclose(out[:n, :kb], X[2 : 2 + n] @ G[k0 : k0 + kb].T, rtol=1e-12)
            assert (out[n:] == 7.0).all() and (out[:, kb:] == 7.0).all()


@pytest.mark.parametrize("gather_entries", [16384, 4])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ialspp_sweeps_on_kept_factors_equal_sweeps_rebuilt_and_reach_the_closed_form(dtype, gather_entries):
    """A call of several sweeps factors each block's system once and keeps it (batched rows, and
    rows longer than the gather scratch): the same factors as one call a sweep, which rebuilds
    every system; and one call of many sweeps reaches the dense closed form. f = 10 in blocks of
    3 (the last one 1 wide), 90 rows (two batches)."""
    setting = SETTINGS[0]
    R, Y = _problem(11, n_rows=90, f=10, dtype=dtype)
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    t = np.dtype(dtype).type
    start = np.random.default_rng(2).normal(0, 0.3, size=(R.shape[0], Y.shape[1])).astype(dtype)
    args = (kind, t(alpha), t(alpha0), t(eps), lam, nu, Y.shape[0], 3)

    def run(X, sweeps):
        return subspace_solve_rows(R.indptr.astype(np.int64), R.indices, R.data, Y, _gram(Y, alpha0), X, *args, sweeps,
                                   True, gather_entries)

    kept, rebuilt = start.copy(), start.copy()
    loss_kept = run(kept, 3)
    for _ in range(3):
        loss_rebuilt = run(rebuilt, 1)
    assert not np.array_equal(kept, start)
    tolerance = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(kept, rebuilt, rtol=tolerance, atol=tolerance)
    assert loss_kept == pytest.approx(loss_rebuilt, rel=tolerance)
    if dtype == np.float64:
        expected = dense_solve(R, Y, **{k: setting[k] for k in ("kind", "alpha", "alpha0", "lam", "nu")})
        many = start.copy()
        run(many, 300)
        np.testing.assert_allclose(many, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("fixed", ["tiny", "rank_deficient", "ill_conditioned"])
@pytest.mark.parametrize("gather_entries", [16384, 4])
def test_ialspp_in_the_eigenbasis_reaches_the_unrotated_fixed_point_and_no_row_objective_rises(fixed, gather_entries):
    """Solved in the eigenbasis of a non-diagonal fixed-side Gram (Y Q against diag(lam), the rows
    in as X Q and out as X Q^T, ``fixed_side.Eigenbasis``): every sweep lowers every row's objective
    (measured in the original basis), and the sweeps reach the dense closed form, the fixed point of
    the unrotated solve; for a tiny fixed side (3 rows, f = 10: most eigenvalues 0), a rank-deficient
    one (rank 4 of f = 10) and an ill-conditioned one (singular values 1 to 1e-6); batched rows and
    rows longer than the gather scratch. float64."""
    from wals_ooc.train.fixed_side import Eigenbasis

    setting = SETTINGS[0]
    f = 10
    rng = np.random.default_rng(7)
    if fixed == "tiny":
        R, _ = _problem(12, n_rows=30, n_fixed=3, f=f, density=0.6, dtype=np.float64)
        Y = rng.normal(0, 0.3, size=(3, f))
    else:
        R, _ = _problem(12, n_rows=30, n_fixed=40, f=f, dtype=np.float64)
        U = np.linalg.qr(rng.normal(size=(40, f)))[0]
        V = np.linalg.qr(rng.normal(size=(f, f)))[0]
        sv = np.r_[np.ones(4), np.zeros(f - 4)] if fixed == "rank_deficient" else np.logspace(0, -6, f)
        Y = (U * sv) @ V.T + 0.2  # a shared offset: one leading direction couples every coordinate
    kind, alpha, alpha0, eps, lam, nu = _args(setting)
    gram = _gram(Y, alpha0)
    assert np.abs(gram - np.diag(np.diag(gram))).max() > 0.1 * np.abs(gram).max()  # far from diagonal
    basis = Eigenbasis(gram)
    Q, D = basis.basis, basis.diagonal
    np.testing.assert_allclose(Q @ D @ Q.T, gram, atol=1e-10)
    assert np.all(np.diff(np.diag(D)) <= 0)  # leading directions first
    rotated = basis.rotated(Y)
    np.testing.assert_allclose(rotated, Y @ Q, rtol=1e-12, atol=1e-14)
    expected = dense_solve(R, Y, **{k: setting[k] for k in ("kind", "alpha", "alpha0", "lam", "nu")})
    X = np.random.default_rng(3).normal(0, 0.3, size=expected.shape)
    objectives, errors = [_row_objectives(R, X, Y, setting)], []
    plain = X.copy()
    for sweeps in (1, 1, 1, 2, 300):
        rows = basis.rotate_in(X)
        subspace_solve_rows(R.indptr.astype(np.int64), R.indices, R.data, rotated, D, rows, kind, alpha, alpha0, eps, lam,
                            nu, Y.shape[0], 3, sweeps, False, gather_entries, True)
        basis.rotate_out(rows, X)
        objectives.append(_row_objectives(R, X, Y, setting))
        errors.append(np.linalg.norm(X - expected) / np.linalg.norm(expected))
    for earlier, later in zip(objectives, objectives[1:]):
        assert np.all(later <= earlier * (1 + 1e-12) + 1e-12), (earlier - later).min()
    assert all(later < earlier or later < 1e-12 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-8, errors
    # the unrotated solve reaches the same point
    subspace_solve_rows(R.indptr.astype(np.int64), R.indices, R.data, Y, gram, plain, kind, alpha, alpha0, eps, lam, nu,
                        Y.shape[0], 3, 2000, False, gather_entries)
    np.testing.assert_allclose(X, plain, rtol=1e-7, atol=1e-9)


@njit(cache=False, nogil=True)
def _tile(Y, rows, k, out, p, stride):
    transpose_tile(Y, rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6], rows[7], k, out, p, stride)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_transpose_tile_writes_the_columns_of_eight_rows(dtype, contiguous):
    """The in-register 8 x 8 transpose (and its element-by-element fallback for a strided Y):
    column i of rows r_0..r_7 lands at out[p + i * stride:][:8], and nothing else is written."""
    whole = np.arange(20 * 38, dtype=dtype).reshape(20, 38)
    Y = whole if contiguous else whole[:, ::2]  # the fallback: Y not C-contiguous
    rows = np.array([3, 0, 19, 7, 7, 2, 11, 5])
    out = np.full(200, -1, dtype)
    _tile(Y, rows, 11, out, 3, 20)
    for i in range(8):
        np.testing.assert_array_equal(out[3 + 20 * i : 3 + 20 * i + 8], Y[rows, 11 + i])
    assert (out == -1).sum() == 200 - 64


@pytest.mark.parametrize("n_fixed", [1, 63, 64, 200, 1000])
def test_distinct_columns_copied_in_windows_hold_every_entrys_fixed_row(n_fixed):
    """Marking an entry list's columns, renumbering the entries by rank and copying the marked
    rows window by window (windows and their parts cut anywhere, not only at whole words) gives
    a compact array with compact[renumbered] == Y[indices], one row per distinct column, in order."""
    rng = np.random.default_rng(n_fixed)
    Y = rng.random((n_fixed, 3)).astype(np.float32)
    indices = rng.integers(0, n_fixed, 3 * n_fixed // 2 + 1).astype(np.int32)
    bits = np.zeros(n_fixed // 64 + 1, np.uint64)
    mark_columns(indices, bits)
    first = np.empty(len(bits) + 1, np.int64)
    distinct = np.unique(indices)
    assert column_ranks(bits, first) == len(distinct) == first[-1]
    renumbered = np.empty(len(indices), np.int32)
    renumber_columns(indices, bits, first, renumbered)
    np.testing.assert_array_equal(renumbered, np.searchsorted(distinct, indices))
    compact = np.full((len(distinct), 3), np.nan, np.float32)
    for lo in range(0, n_fixed, 37):
        hi = min(n_fixed, lo + 37)
        for a, b in ((lo, lo + 5), (lo + 5, hi)):
            gather_marked(bits, first, a, min(b, hi), lo, Y[lo:hi], compact)
    np.testing.assert_array_equal(compact, Y[distinct])
    np.testing.assert_array_equal(compact[renumbered], Y[indices])


def test_a_long_rows_cg_sums_its_entries_in_groups_and_stays_near_float64():
    """A row of 120,000 entries with play counts up to 3e5 (the long-row path): summed one entry
    at a time in float32, its 3 CG steps ended 2.5e-3 (relative) from the same steps in float64;
    summed ``SUM_GROUP`` entries at a time, 6-7e-4 (round 28: an item of 186,343 entries had ended
    4.7% off, 2.4e-5 of the 30M bench's loss)."""
    from wals_ooc.kernels.solve import cg_solve_rows

    rng = np.random.default_rng(3)
    n, f = 120_000, 32
    Y64 = (rng.random((n, f)) * 0.3).astype(np.float32).astype(np.float64)
    values = np.minimum(rng.lognormal(1.0, 2.5, n), 3e5).astype(np.float32)
    indptr, indices = np.array([0, n], dtype=np.int64), np.arange(n, dtype=np.int32)
    x0 = (rng.random((1, f)) * 0.01).astype(np.float32).astype(np.float64)
    for jacobi in (False, True):
        solved = {}
        for dtype in (np.float32, np.float64):
            Y, X = Y64.astype(dtype), x0.astype(dtype)
            cg_solve_rows(indptr, indices, values, Y, (Y.T @ Y).astype(dtype), X, "linear", 1.0, 1.0, 1.0, 0.1, 0.0, n, 3,
                          False, None, jacobi)
            solved[dtype] = X[0].astype(np.float64)
        error = np.abs(solved[np.float32] - solved[np.float64]).max() / np.abs(solved[np.float64]).max()
        assert error < 1e-3, (jacobi, error)
