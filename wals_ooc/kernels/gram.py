"""Gram matrix Y^T Y of a block of factor rows, accumulated in float64.

This is one dense matrix product per block, which BLAS (through NumPy, releasing the GIL) does
faster than any loop we could write; the f x f partials are summed in float64 in block order,
so the result does not depend on the scheduler.
"""

from __future__ import annotations

import numpy as np


def block_gram(Y_block: np.ndarray) -> np.ndarray:
    """Y_block^T Y_block as float64 (f x f)."""
    return (Y_block.T @ Y_block).astype(np.float64)
