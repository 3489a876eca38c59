"""An 8 x 8 transpose in registers, for kernels that gather rows into a column-major panel.

``transpose8(Y, r0, ..., r7, k, out, p, stride)`` reads ``Y[r_j, k : k + 8]`` for j < 8 (eight
rows of a C-contiguous float32 or float64 matrix, one vector load each) and writes column i of that 8 x 8
tile, ``(Y[r0, k + i], ..., Y[r7, k + i])``, to ``out[p + i * stride : p + i * stride + 8]``
(``out`` a C-contiguous vector of Y's dtype). The tile goes through 24 shuffles (unpack, in-lane
shuffle, cross-lane permute: what LLVM lowers ``shufflevector`` to on AVX), where element by
element it took 64 scalar loads and 64 scalar stores: the transposing gather of the iALS++ panel
ran at 0.65 ns a float from cache that way, a plain row copy at 0.12 (tools/RESULTS.md, issue 11
round 24). No bounds checks: the caller keeps every index in range.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_LO_PAIRS = [0, 8, 1, 9, 4, 12, 5, 13]  # unpacklo: the low halves of two rows interleaved, per 128-bit lane
_HI_PAIRS = [2, 10, 3, 11, 6, 14, 7, 15]
_LO_QUADS = [0, 1, 8, 9, 4, 5, 12, 13]  # the low pairs of two interleaved vectors, per lane
_HI_QUADS = [2, 3, 10, 11, 6, 7, 14, 15]
_LOW_LANES = [0, 1, 2, 3, 8, 9, 10, 11]  # the low 128-bit lanes of two vectors
_HIGH_LANES = [4, 5, 6, 7, 12, 13, 14, 15]


@intrinsic
def _transpose8(typingctx, Y, r0, r1, r2, r3, r4, r5, r6, r7, k, out, p, stride):
    rows = (r0, r1, r2, r3, r4, r5, r6, r7)
    if not (isinstance(Y, types.Array) and Y.ndim == 2 and Y.dtype in (types.float32, types.float64) and Y.layout == "C"
            and isinstance(out, types.Array) and out.ndim == 1 and out.dtype == Y.dtype and out.layout == "C"
            and all(isinstance(v, types.Integer) for v in (*rows, k, p, stride))):
        return None
    sig = types.void(Y, *rows, k, out, p, stride)

    def codegen(context, builder, signature, args):
        y_type, out_type = signature.args[0], signature.args[10]
        source = context.make_array(y_type)(context, builder, args[0])
        target = context.make_array(out_type)(context, builder, args[10])
        vector = ir.VectorType(context.get_data_type(y_type.dtype), 8)

        def intp(value, index):
            return context.cast(builder, value, signature.args[index], types.intp)

        column = intp(args[9], 9)
        loaded = []
        for j in range(8):
            at = cgutils.get_item_pointer(context, builder, y_type, source, [intp(args[1 + j], 1 + j), column],
                                          wraparound=False)
            loaded.append(builder.load(builder.bitcast(at, vector.as_pointer()), align=4))

        def shuffle(a, b, mask):
            return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), 8), mask))

        pairs = []
        for j in range(0, 8, 2):
            pairs += [shuffle(loaded[j], loaded[j + 1], _LO_PAIRS), shuffle(loaded[j], loaded[j + 1], _HI_PAIRS)]
        # pairs: (t0, t1) rows 0-1, (t2, t3) rows 2-3, (t4, t5) rows 4-5, (t6, t7) rows 6-7
        quads = []
        for base in (0, 4):
            lo, hi, lo2, hi2 = pairs[base], pairs[base + 1], pairs[base + 2], pairs[base + 3]
            quads += [shuffle(lo, lo2, _LO_QUADS), shuffle(lo, lo2, _HI_QUADS),
                      shuffle(hi, hi2, _LO_QUADS), shuffle(hi, hi2, _HI_QUADS)]
        # quads[c] (c < 4): rows 0-3 of columns c and c + 4; quads[4 + c]: rows 4-7 of the same
        columns = [shuffle(quads[c], quads[4 + c], _LOW_LANES) for c in range(4)]
        columns += [shuffle(quads[c], quads[4 + c], _HIGH_LANES) for c in range(4)]
        start, step = intp(args[11], 11), intp(args[12], 12)
        for i in range(8):
            offset = builder.add(start, builder.mul(step, context.get_constant(types.intp, i)))
            at = cgutils.get_item_pointer(context, builder, out_type, target, [offset], wraparound=False)
            builder.store(columns[i], builder.bitcast(at, vector.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


#: ``transpose8(Y, r0, ..., r7, k, out, p, stride)`` in a kernel (see the module's docstring)
transpose8: Any = _transpose8


def transpose_tile(Y, r0, r1, r2, r3, r4, r5, r6, r7, k, out, p, stride):
    """``transpose8`` where its vector path applies (C-contiguous float32/float64 ``Y`` and ``out``
    of one dtype), else the same tile element by element; callable from kernels."""
    rows = (r0, r1, r2, r3, r4, r5, r6, r7)
    for i in range(8):
        for j in range(8):
            out[p + i * stride + j] = Y[rows[j], k + i]


@overload(transpose_tile, jit_options=dict(nogil=True))
def _transpose_tile(Y, r0, r1, r2, r3, r4, r5, r6, r7, k, out, p, stride):
    if (isinstance(Y, types.Array) and Y.layout == "C" and Y.dtype in (types.float32, types.float64)
            and isinstance(out, types.Array) and out.layout == "C" and out.dtype == Y.dtype):
        def vector(Y, r0, r1, r2, r3, r4, r5, r6, r7, k, out, p, stride):
            transpose8(Y, r0, r1, r2, r3, r4, r5, r6, r7, k, out, p, stride)
        return vector

    def scalar(Y, r0, r1, r2, r3, r4, r5, r6, r7, k, out, p, stride):
        for i in range(8):
            q = p + i * stride
            out[q] = Y[r0, k + i]
            out[q + 1] = Y[r1, k + i]
            out[q + 2] = Y[r2, k + i]
            out[q + 3] = Y[r3, k + i]
            out[q + 4] = Y[r4, k + i]
            out[q + 5] = Y[r5, k + i]
            out[q + 6] = Y[r6, k + i]
            out[q + 7] = Y[r7, k + i]
    return scalar
