"""Kernels of conversion's assembly step."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def segment_sums(values, starts):
    """Sum of each segment ``values[starts[k]:starts[k + 1]]`` (the last runs to the end), in
    float64, adding left to right: the same order and precision as ``np.add.at`` into a float64
    accumulator, so the two assembly paths give bit-identical sums whatever the budget."""
    n = len(starts)
    out = np.empty(n, np.float64)
    for k in range(n):
        stop = starts[k + 1] if k + 1 < n else len(values)
        acc = 0.0
        for p in range(starts[k], stop):
            acc += np.float64(values[p])
        out[k] = acc
    return out
