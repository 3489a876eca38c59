"""Validation of CSR rows read from a store, before any kernel indexes with them."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def csr_problem(indptr: np.ndarray, indices: np.ndarray, n_cols: int) -> tuple[int, int]:
    """First problem of CSR rows with a local ``indptr`` (int64, starting at 0) and ``indices``
    (int32): (0, -1) if none; (1, row) where ``indptr`` decreases or leaves ``[0, len(indices)]``;
    (2, entry) where an index is outside ``[0, n_cols)``. One pass, no allocation."""
    n = len(indices)
    for row in range(len(indptr) - 1):
        if indptr[row + 1] < indptr[row] or indptr[row] < 0 or indptr[row + 1] > n:
            return 1, row
    for k in range(n):
        if indices[k] < 0 or indices[k] >= n_cols:
            return 2, k
    return 0, -1
