"""Fold-in: solve a new or changed row against the frozen factors of the other side.

The row is solved exactly (Cholesky) from the same normal equations the trainer uses, with the
other side's stored Gram matrix, so only the factor rows the row touches are read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import WALSConfig
from ..errors import SettingError
from ..kernels.solve import CONFIDENCE_KINDS, cholesky_solve_rows


def merge_entries(columns: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique columns with summed values, zeros dropped (as conversion does)."""
    columns = np.asarray(columns, dtype=np.int64).ravel()
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(columns) != len(values):
        raise SettingError(f"fold-in ids and values must have the same length, got {len(columns)} and {len(values)}")
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        raise SettingError(f"fold-in values must be finite and >= 0, got {values[bad][0]} (the {int(bad.sum())} such "
                           f"of {len(values)})")
    unique, inverse = np.unique(columns, return_inverse=True)
    summed = np.zeros(len(unique), np.float64)
    np.add.at(summed, inverse, values)
    keep = summed > 0
    return unique[keep], summed[keep].astype(np.float32)


def fold_in(
    columns: np.ndarray,
    values: np.ndarray,
    fixed_rows: np.ndarray,
    fixed_gram: np.ndarray,
    n_fixed: int,
    config: WALSConfig,
) -> np.ndarray:
    """Factors (f,) of one row whose entries are at sorted unique ``columns`` with ``values``.

    fixed_rows: (len(columns), f) fixed factors of those columns, same order;
    fixed_gram: Y^T Y of the whole fixed side (float64); n_fixed: rows of the fixed side.
    """
    dtype = config.np_dtype
    t = dtype.type
    n = len(columns)
    X = np.zeros((1, config.factors), dtype=dtype)
    failures = cholesky_solve_rows(
        np.array([0, n], np.int64), np.arange(n, dtype=np.int32), np.asarray(values, np.float32),
        np.ascontiguousarray(fixed_rows, dtype=dtype), (config.alpha0 * np.asarray(fixed_gram)).astype(dtype), X,
        CONFIDENCE_KINDS[config.confidence], t(config.alpha), t(config.alpha0), t(config.eps), float(config.regularization),
        float(config.nu), int(n_fixed),
    )
    if failures:
        raise np.linalg.LinAlgError("the fold-in system is not positive definite")
    return X[0]
