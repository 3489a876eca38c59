"""Software prefetch for kernels that gather random rows of a large matrix.

``prefetch_row(Y, i)`` asks the CPU to start loading row ``i`` of a C-contiguous 2-D array into
cache (LLVM's ``llvm.prefetch``: a hint, never a fault, nothing returned). A gather loop that
prefetches the row a few entries ahead keeps more cache misses in flight than the out-of-order
window finds on its own (the item half-sweep reads random rows of the user factors, far beyond
the last-level cache).
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LINE_BYTES = 64
MAX_ROW_LINES = 16  # rows up to 1 KiB (f = 256 in float32) are prefetched whole, longer ones in part


@intrinsic
def _prefetch_row(typingctx, rows, index):
    """Prefetch the cache lines of ``rows[index]`` (2-D; ``index`` in range; nothing unless C-contiguous)."""
    if not (isinstance(rows, types.Array) and rows.ndim == 2 and isinstance(index, types.Integer)):
        return None
    sig = types.void(rows, index)

    def codegen(context, builder, signature, args):
        array_type, index_type = signature.args
        if array_type.layout != "C":  # rows not known to be contiguous: no hint (it is only a hint)
            return context.get_dummy_value()
        array = context.make_array(array_type)(context, builder, args[0])
        row = context.cast(builder, args[1], index_type, types.intp)
        zero = context.get_constant(types.intp, 0)
        start = cgutils.get_item_pointer(context, builder, array_type, array, [row, zero], wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        base = builder.bitcast(start, byte_pointer)
        int32 = ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]), "llvm.prefetch.p0")
        itemsize = context.get_abi_sizeof(context.get_data_type(array_type.dtype))
        row_bytes = builder.mul(builder.extract_value(array.shape, 1), context.get_constant(types.intp, itemsize))
        for line in range(MAX_ROW_LINES):
            offset = context.get_constant(types.intp, LINE_BYTES * line)
            with builder.if_then(builder.icmp_signed("<", offset, row_bytes)):
                # read, locality 2 (prefetcht1: into L2, not L1, which holds the kernel's working rows), data cache
                builder.call(function, [builder.gep(base, [offset]), int32(0), int32(2), int32(1)])
        return context.get_dummy_value()

    return sig, codegen


#: ``prefetch_row(rows, index)`` in a kernel (the intrinsic's first parameter is numba's typing context)
prefetch_row: Any = _prefetch_row
