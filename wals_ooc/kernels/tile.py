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
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

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
