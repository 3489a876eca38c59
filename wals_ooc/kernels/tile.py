"""Products of a few rows with the f x f Gram, register-tiled, against a Gram packed once.

CG multiplies the Gram by the search directions of a group of rows at every step (``solve.
cg_solve_rows``): 20-64 rows at a time, f = 32..256. BLAS packs its operands on every call
(at f = 128 packing the 64 KB Gram was 7-8% of the training's task CPU), and numba loops over
arrays do not keep a tile of the result in registers (LLVM cannot prove the arrays apart), so
this module packs the Gram once per task into column panels (``pack_gram``: ``Gp[j, k, :] =
G[k, 16 j : 16 j + 16]``) and multiplies with a micro-kernel written as LLVM vector code
(``_tile``): 4 rows x 16 columns of the result held in registers through the whole sum over k,
each step one load of the panel's row and one broadcast of each row's element.

``tiled_product(A, Gp, D, n)`` writes rows up to n rounded up to 4, so A and D must hold them;
f must be a multiple of ``TILE_COLUMNS`` (``tiles(f)``).

The same way, CG's sparse passes over a row's fixed rows (``weighted_pass`` for a step,
``gathered_pass`` for the warm start's residual, which also gathers the rows) hold the row's
vector and the running sum in the host's widest vector registers through the whole pass, so
each fixed row is read once and the sum never goes through memory (``fuses(f, itemsize)``).
In float32 the rows may also be float16 bits (uint16: ``half_rows`` makes such a copy of a
fixed side), widened to float32 as loaded: the gathering pass reads half the bytes at random.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

TILE_ROWS = 4
TILE_COLUMNS = 16
VECTOR_BYTES = 32  # one AVX register; LLVM splits or joins vectors to the target's own width


@intrinsic
def _tile(typingctx, A, i0, Gp, j, D):
    """D[i0:i0+4, 16 j:16 j+16] = A[i0:i0+4, :f] @ G[:, 16 j:16 j+16], the Gram's panel j being Gp[j]."""
    arrays = (A, Gp, D)
    if not (all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)
            and A.ndim == 2 and D.ndim == 2 and Gp.ndim == 3 and A.dtype == Gp.dtype == D.dtype
            and A.dtype in (types.float32, types.float64)
            and isinstance(i0, types.Integer) and isinstance(j, types.Integer)):
        return None
    sig = types.void(A, i0, Gp, j, D)

    def codegen(context, builder, signature, args):
        tA, ti, tG, tj, tD = signature.args
        a_arr = context.make_array(tA)(context, builder, args[0])
        g_arr = context.make_array(tG)(context, builder, args[2])
        d_arr = context.make_array(tD)(context, builder, args[4])
        intp = context.get_value_type(types.intp)

        def const(value):
            return ir.Constant(intp, value)

        i0 = context.cast(builder, args[1], ti, types.intp)
        j = context.cast(builder, args[3], tj, types.intp)
        f = builder.extract_value(g_arr.shape, 1)
        element = context.get_value_type(tA.dtype)
        lanes = VECTOR_BYTES // context.get_abi_sizeof(element)
        pieces = TILE_COLUMNS // lanes
        vector = ir.VectorType(element, lanes)
        fmuladd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fmuladd.v{lanes}{element.intrinsic_name}")
        int32 = ir.IntType(32)
        undef = ir.Constant(vector, ir.Undefined)
        splat = ir.Constant(ir.VectorType(int32, lanes), [0] * lanes)
        a_rows = [cgutils.get_item_pointer(context, builder, tA, a_arr, [builder.add(i0, const(r)), const(0)],
                                           wraparound=False) for r in range(TILE_ROWS)]
        panel = cgutils.get_item_pointer(context, builder, tG, g_arr, [j, const(0), const(0)], wraparound=False)
        column = builder.mul(j, const(TILE_COLUMNS))
        d_rows = [cgutils.get_item_pointer(context, builder, tD, d_arr, [builder.add(i0, const(r)), column],
                                           wraparound=False) for r in range(TILE_ROWS)]

        def vector_at(pointer, offset):
            return builder.bitcast(builder.gep(pointer, [const(offset)]), vector.as_pointer())

        entry = builder.block
        loop = builder.append_basic_block("tile.k")
        done = builder.append_basic_block("tile.done")
        builder.cbranch(builder.icmp_signed(">", f, const(0)), loop, done)
        builder.position_at_end(loop)
        k = builder.phi(intp)
        k.add_incoming(const(0), entry)
        sums = [[builder.phi(vector) for _ in range(pieces)] for _ in range(TILE_ROWS)]
        for row in sums:
            for total in row:
                total.add_incoming(ir.Constant(vector, None), entry)
        g_row = builder.gep(panel, [builder.mul(k, const(TILE_COLUMNS))])
        g = [builder.load(vector_at(g_row, h * lanes), align=context.get_abi_sizeof(element)) for h in range(pieces)]
        updated = []
        for r in range(TILE_ROWS):
            a = builder.load(builder.gep(a_rows[r], [k]))
            broadcast = builder.shuffle_vector(builder.insert_element(undef, a, int32(0)), undef, splat)
            updated.append([builder.call(fmuladd, [broadcast, g[h], sums[r][h]]) for h in range(pieces)])
            for h in range(pieces):
                sums[r][h].add_incoming(updated[r][h], loop)
        following = builder.add(k, const(1))
        k.add_incoming(following, loop)
        builder.cbranch(builder.icmp_signed("<", following, f), loop, done)
        builder.position_at_end(done)
        results = [[builder.phi(vector) for _ in range(pieces)] for _ in range(TILE_ROWS)]  # phis first in a block
        for r in range(TILE_ROWS):
            for h in range(pieces):
                results[r][h].add_incoming(ir.Constant(vector, None), entry)
                results[r][h].add_incoming(updated[r][h], loop)
                builder.store(results[r][h], vector_at(d_rows[r], h * lanes), align=context.get_abi_sizeof(element))
        return context.get_dummy_value()

    return sig, codegen


_tile_kernel: Any = _tile  # called in kernels; the intrinsic's first parameter is numba's typing context


@njit(cache=True, nogil=True)
def tiles(f):
    """Whether ``tiled_product`` takes f columns."""
    return f > 0 and f % TILE_COLUMNS == 0


@njit(cache=True, nogil=True)
def pack_gram(G):
    """G (f x f, f a multiple of 16) as column panels: Gp[j, k, c] = G[k, 16 j + c]."""
    f = G.shape[0]
    Gp = np.empty((f // TILE_COLUMNS, f, TILE_COLUMNS), G.dtype)
    for j in range(f // TILE_COLUMNS):
        for k in range(f):
            for c in range(TILE_COLUMNS):
                Gp[j, k, c] = G[k, j * TILE_COLUMNS + c]
    return Gp


@njit(cache=True, nogil=True)
def tiled_product(A, Gp, D, n):
    """D[:m] = A[:m] @ G for m = n rounded up to a multiple of 4 (A and D hold at least m rows)."""
    for j in range(Gp.shape[0]):  # one 16-column panel (f x 16) stays in L1 while the rows go by
        for i0 in range(0, n, TILE_ROWS):
            _tile_kernel(A, i0, Gp, j, D)


def _wide_vector_bytes() -> int:
    """The widest vector register of the host: 64 bytes with AVX-512, else 32 (numba compiles,
    and caches, for the host CPU, so the choice is baked in with the code)."""
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
        return 64 if features.get("avx512f", False) else 32
    except Exception:  # pragma: no cover - features unknown: the width every x86-64 with AVX has
        return 32


WIDE_BYTES = _wide_vector_bytes()
PASS_MAX_PIECES = 8  # registers of the sum (and as many of the entry's row) kept through a pass


PREFETCH_ENTRIES = 8  # how far ahead a gathering pass prefetches its source rows
LINE_BYTES = 64


@intrinsic(prefer_literal=True)
def _row_pass(typingctx, source, ids, base, last, rows, e0, e1, v, weight, dots, acc, squares, a0, b0, c0, pieces):
    """For e in [e0, e1): y = rows[e] (gathered first, when ``source`` is an array: rows[e] =
    source[ids[base + e]], prefetching the row ``PREFETCH_ENTRIES`` entries ahead, below ``last``);
    d = y . v; dots[e] = d; acc += (a0 + weight[e] * (c0 + b0 * d)) * y, with acc and v held in
    ``pieces`` vector registers through the whole pass (f = pieces x lanes); and, when ``squares``
    is an array, squares += weight[e] * y * y (elementwise: the diagonal of sum w y y^T), held in
    registers too."""
    gather = not isinstance(source, (types.NoneType, types.Omitted))
    diagonal = not isinstance(squares, (types.NoneType, types.Omitted))
    value = acc.dtype if isinstance(acc, types.Array) else None  # the arithmetic's type; rows may be float16 bits
    vectors_ok = all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == value
                     for a in (v, weight, dots, acc) + ((squares,) if diagonal else ()))
    if not (isinstance(pieces, types.IntegerLiteral) and isinstance(rows, types.Array) and rows.ndim == 2
            and rows.layout == "C" and value in (types.float32, types.float64) and vectors_ok
            and (rows.dtype == value or (rows.dtype == types.uint16 and value == types.float32))
            and all(isinstance(n, types.Integer) for n in (base, last, e0, e1))
            and all(isinstance(s, types.Float) for s in (a0, b0, c0))
            and (not gather or (isinstance(source, types.Array) and source.ndim == 2 and source.layout == "C"
                                and (source.dtype == rows.dtype
                                     or (source.dtype == types.uint16 and rows.dtype == types.float32))
                                and isinstance(ids, types.Array) and ids.ndim == 1
                                and isinstance(ids.dtype, types.Integer)))):
        return None
    count = pieces.literal_value
    sig = types.void(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, squares, a0, b0, c0, pieces)

    def codegen(context, builder, signature, args):
        (t_src, t_ids, t_base, t_last, t_rows, t_e0, t_e1, t_v, t_w, t_d, t_acc, t_sq, t_a0, t_b0, t_c0, _) = signature.args
        a_rows, a_v, a_w, a_d, a_acc = [context.make_array(t)(context, builder, args[n])
                                        for t, n in ((t_rows, 4), (t_v, 7), (t_w, 8), (t_d, 9), (t_acc, 10))]
        intp = context.get_value_type(types.intp)

        def const(value):
            return ir.Constant(intp, value)

        def index(n, t):
            return context.cast(builder, args[n], t, types.intp)

        start, stop = index(5, t_e0), index(6, t_e1)
        element = context.get_value_type(t_acc.dtype)
        size = context.get_abi_sizeof(element)

        def scalar(n, t):
            return context.cast(builder, args[n], t, t_acc.dtype)

        a0, b0, c0 = scalar(12, t_a0), scalar(13, t_b0), scalar(14, t_c0)
        lanes = WIDE_BYTES // size
        vector = ir.VectorType(element, lanes)
        half_vector = ir.VectorType(ir.HalfType(), lanes)
        int32 = ir.IntType(32)
        fmuladd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fmuladd.v{lanes}{element.intrinsic_name}")
        undef = ir.Constant(vector, ir.Undefined)
        splat = ir.Constant(ir.VectorType(int32, lanes), [0] * lanes)

        def pointer(t, a, at):
            return cgutils.get_item_pointer(context, builder, t, a, at, wraparound=False)

        def vector_pointers(first, kind=vector):  # the row's ``count`` vectors from ``first`` (any element pointer)
            first = builder.bitcast(first, kind.element.as_pointer())
            return [builder.bitcast(builder.gep(first, [const(h * lanes)]), kind.as_pointer()) for h in range(count)]

        def load_vectors(first, kind=vector):
            return [builder.load(p, align=2 if kind is half_vector else size) for p in vector_pointers(first, kind)]

        rows_half = t_rows.dtype == types.uint16  # float16 bits, widened as loaded
        if gather:
            a_src = context.make_array(t_src)(context, builder, args[0])
            a_ids = context.make_array(t_ids)(context, builder, args[1])
            g_base, g_last = index(2, t_base), index(3, t_last)
            byte_pointer = ir.IntType(8).as_pointer()
            prefetch = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]), "llvm.prefetch.p0")
            id_type = context.get_value_type(t_ids.dtype)
            half = t_src.dtype == types.uint16  # float16 bits: widened to float32 as loaded
            source_bytes = 2 if half else size

            def source_row(position):  # source[ids[position]]
                raw = builder.load(pointer(t_ids, a_ids, [position]))
                row = builder.sext(raw, intp) if id_type.width < intp.width else raw
                return pointer(t_src, a_src, [row, const(0)])

        v_vectors = load_vectors(pointer(t_v, a_v, [const(0)]))
        acc_base = pointer(t_acc, a_acc, [const(0)])
        initial = load_vectors(acc_base)
        if diagonal:
            sq_base = pointer(t_sq, context.make_array(t_sq)(context, builder, args[11]), [const(0)])
            sq_initial = load_vectors(sq_base)
        entry = builder.block
        loop = builder.append_basic_block("pass.e")
        done = builder.append_basic_block("pass.done")
        builder.cbranch(builder.icmp_signed("<", start, stop), loop, done)
        builder.position_at_end(loop)
        e = builder.phi(intp)
        e.add_incoming(start, entry)
        sums = [builder.phi(vector) for _ in range(count)]
        for total, first in zip(sums, initial):
            total.add_incoming(first, entry)
        if diagonal:
            sq_sums = [builder.phi(vector) for _ in range(count)]
            for total, first in zip(sq_sums, sq_initial):
                total.add_incoming(first, entry)
        row_here = pointer(t_rows, a_rows, [e, const(0)])
        if gather:
            ahead = builder.add(builder.add(g_base, e), const(PREFETCH_ENTRIES))
            last_one = builder.sub(g_last, const(1))
            ahead = builder.select(builder.icmp_signed("<", ahead, g_last), ahead, last_one)
            target = builder.bitcast(source_row(ahead), byte_pointer)
            for line in range(max(1, count * lanes * source_bytes // LINE_BYTES)):  # into L2 (locality 2), as prefetch.py
                builder.call(prefetch, [builder.gep(target, [const(line * LINE_BYTES)]), int32(0), int32(2), int32(1)])
            loaded = load_vectors(source_row(builder.add(g_base, e)), half_vector if half else vector)
            y = [builder.fpext(h, vector) for h in loaded] if half else loaded
            kept = loaded if rows_half else y  # float16 rows only from a float16 source
            for value, p in zip(kept, vector_pointers(row_here, half_vector if rows_half else vector)):
                builder.store(value, p, align=2 if rows_half else size)
        elif rows_half:
            y = [builder.fpext(h, vector) for h in load_vectors(row_here, half_vector)]
        else:
            y = load_vectors(row_here)
        terms = [builder.fmul(a, b) for a, b in zip(y, v_vectors)]
        while len(terms) > 1:  # a tree: independent adds
            terms = [builder.fadd(terms[i], terms[i + 1]) if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
        folded, width = terms[0], lanes
        while width > 1:  # halves added until one lane holds the dot
            width //= 2
            upper = builder.shuffle_vector(folded, undef, ir.Constant(ir.VectorType(int32, lanes),
                                                                      [width + i if i < width else i for i in range(lanes)]))
            folded = builder.fadd(folded, upper)
        d = builder.extract_element(folded, int32(0))
        builder.store(d, pointer(t_d, a_d, [e]))
        w = builder.load(pointer(t_w, a_w, [e]))
        coef = builder.fadd(a0, builder.fmul(w, builder.fadd(c0, builder.fmul(b0, d))))
        broadcast = builder.shuffle_vector(builder.insert_element(undef, coef, int32(0)), undef, splat)
        updated = [builder.call(fmuladd, [broadcast, yh, total]) for yh, total in zip(y, sums)]
        for total, new in zip(sums, updated):
            total.add_incoming(new, loop)
        if diagonal:
            w_broadcast = builder.shuffle_vector(builder.insert_element(undef, w, int32(0)), undef, splat)
            sq_updated = [builder.call(fmuladd, [builder.fmul(w_broadcast, yh), yh, total]) for yh, total in zip(y, sq_sums)]
            for total, new in zip(sq_sums, sq_updated):
                total.add_incoming(new, loop)
        following = builder.add(e, const(1))
        e.add_incoming(following, loop)
        builder.cbranch(builder.icmp_signed("<", following, stop), loop, done)
        builder.position_at_end(done)
        results = [builder.phi(vector) for _ in range(count)]  # phis first in a block
        sq_results = [builder.phi(vector) for _ in range(count)] if diagonal else []
        for result, first, new in zip(results, initial, updated):
            result.add_incoming(first, entry)
            result.add_incoming(new, loop)
        for result, first, new in zip(sq_results, sq_initial if diagonal else [], sq_updated if diagonal else []):
            result.add_incoming(first, entry)
            result.add_incoming(new, loop)
        for result, p in zip(results, vector_pointers(acc_base)):
            builder.store(result, p, align=size)
        for result, p in zip(sq_results, vector_pointers(sq_base) if diagonal else []):
            builder.store(result, p, align=size)
        return context.get_dummy_value()

    return sig, codegen


_row_pass_kernel: Any = _row_pass


@njit(cache=True, nogil=True)
def fuses(f, itemsize):
    """Whether ``weighted_pass`` and ``gathered_pass`` take f columns of ``itemsize``-byte elements."""
    lanes = WIDE_BYTES // itemsize
    return f > 0 and f % lanes == 0 and f // lanes <= PASS_MAX_PIECES


@njit(cache=True, nogil=True)
def _pass(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, squares, a0, b0, c0):
    pieces = acc.shape[0] // (WIDE_BYTES // acc.itemsize)
    if pieces == 1:
        _row_pass_kernel(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, squares, a0, b0, c0, 1)
    elif pieces == 2:
        _row_pass_kernel(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, squares, a0, b0, c0, 2)
    elif pieces == 3:
        _row_pass_kernel(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, squares, a0, b0, c0, 3)
    elif pieces == 4:
        _row_pass_kernel(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, squares, a0, b0, c0, 4)
    elif pieces == 5:
        _row_pass_kernel(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, squares, a0, b0, c0, 5)
    elif pieces == 6:
        _row_pass_kernel(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, squares, a0, b0, c0, 6)
    elif pieces == 7:
        _row_pass_kernel(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, squares, a0, b0, c0, 7)
    else:
        _row_pass_kernel(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, squares, a0, b0, c0, 8)


@njit(cache=True, nogil=True)
def weighted_pass(rows, e0, e1, v, weight, dots, acc):
    """For e in [e0, e1): dots[e] = rows[e] . v and acc += weight[e] * dots[e] * rows[e], each row
    read once and acc and v kept in registers (``fuses(f, itemsize)`` must hold)."""
    T = acc.dtype.type
    _pass(None, None, 0, 0, rows, e0, e1, v, weight, dots, acc, None, T(0), T(1), T(0))


def _gathered(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, a0, squares):
    raise NotImplementedError("numba kernels only: see gathered_pass")


@overload(_gathered)
def _gathered_overload(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, a0, squares):
    if isinstance(source, types.Array) and source.layout == "C" and source.dtype == types.uint16:
        def widened(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, a0, squares):  # float16 bits
            T = acc.dtype.type
            _pass(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, squares, T(a0), T(-1), T(1))
        return widened
    if isinstance(source, types.Array) and source.layout == "C" and all(
            isinstance(a, types.Array) and a.layout == "C" for a in (rows, v, weight, dots, acc)):
        def fused(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, a0, squares):
            T = acc.dtype.type
            _pass(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, squares, T(a0), T(-1), T(1))
        return fused

    def plain(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, a0, squares):  # rows not known contiguous
        f = acc.shape[0]
        for e in range(e0, e1):
            y = rows[e]
            y[:] = source[ids[base + e]]
            d = acc.dtype.type(0)
            for k in range(f):
                d += y[k] * v[k]
            dots[e] = d
            coef = a0 + weight[e] * (1 - d)
            for k in range(f):
                acc[k] += coef * y[k]
            if squares is not None:
                for k in range(f):
                    squares[k] += weight[e] * y[k] * y[k]
    return plain


@njit(cache=True, nogil=True)
def gathered_pass(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, a0, squares=None):
    """For e in [e0, e1): rows[e] = source[ids[base + e]] (prefetched ``PREFETCH_ENTRIES`` ahead,
    below ``ids[last]``), dots[e] = rows[e] . v and acc += (a0 + weight[e] (1 - dots[e])) rows[e];
    given ``squares`` (f values), also squares += weight[e] rows[e] * rows[e] elementwise (CG's
    Jacobi preconditioner: the diagonal of the row's sparse part, in the same pass)
    (``fuses(f, itemsize)`` must hold; a source not known to be C-contiguous takes a plain loop)."""
    _gathered(source, ids, base, last, rows, e0, e1, v, weight, dots, acc, a0, squares)


@intrinsic
def _half_bits(typingctx, value):
    """The float16 bits (round to nearest even) of a float32, as a uint16."""
    if value != types.float32:
        return None
    sig = types.uint16(value)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


_half_bits_kernel: Any = _half_bits


HALF_LIMIT = 65504.0  # float16's largest finite value
HALF_TINY = 2.0**-14  # float16's smallest normal value: below it a value keeps less than 11 bits


@njit(cache=True, nogil=True)
def half_rows(source, target, a, b):
    """target[a:b] = the float16 bits of source[a:b] (float32, rounded to nearest even), the copy
    that ``gathered_pass`` widens. Returns (overflows, tiny): how many finite values lie beyond
    float16's largest (most round to inf: the copy is then unusable, its user keeps float32), and
    how many non-zero values lie below its smallest normal (``HALF_TINY``: subnormal, fewer bits;
    ``half_usable`` weighs them)."""
    f = source.shape[1]
    overflows = 0
    tiny = 0
    for i in range(a, b):
        for k in range(f):
            value = source[i, k]
            target[i, k] = _half_bits_kernel(value)
            magnitude = np.abs(value)
            overflows += magnitude > HALF_LIMIT and magnitude < np.inf
            tiny += magnitude < HALF_TINY and magnitude > 0
    return overflows, tiny


def half_usable(overflows: int, tiny: int, values: int) -> bool:
    """Whether a float16 copy carries its float32 source well enough for CG's gathers: no value
    beyond float16's range, and at most one non-zero value in 8 below its smallest normal. A
    subnormal is off by up to 2^-25 absolutely; while 7 values in 8 are larger than 2^-14 that is
    within float16's own relative rounding (2^-11) of a row's typical value. A side whose values
    are mostly that small (a tiny ``init_scale``, say) keeps float32 gathers."""
    return overflows == 0 and 8 * tiny <= values
