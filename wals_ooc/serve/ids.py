"""Row numbers -> the ids (and display names) users gave: the one place serving, indexing and
export convert them.

The id maps are being replaced (issue 10: ``store.ids(side)`` loads a whole map, and its lookup
is wrong for long strings); these helpers are where the new API drops in.
"""

from __future__ import annotations

import numpy as np


def missing_id(dtype: np.dtype):
    """The placeholder of an empty result slot: -1 for integer ids, "" for strings."""
    return -1 if np.issubdtype(dtype, np.integer) else ""


def original_ids(store, side: str, rows: np.ndarray) -> np.ndarray:
    """Original ids of row numbers (any shape); rows < 0 (empty slots) give ``missing_id``."""
    rows = np.asarray(rows, np.int64)
    id_map = store.ids(side)
    return np.where(rows >= 0, id_map[np.maximum(rows, 0)], missing_id(id_map.dtype))


def ids_of_range(store, side: str, start: int, stop: int) -> np.ndarray:
    """Original ids of the contiguous rows ``[start, stop)`` (a shard)."""
    return store.ids(side)[start:stop]


def id_dtype(store, side: str) -> np.dtype:
    return store.ids(side).dtype


def names_of_range(store, side: str, start: int, stop: int) -> np.ndarray | None:
    """Display names of the rows ``[start, stop)``, or None when the store has none.

    Hook for display names (issue 14): a store that keeps them exposes ``names(side)`` (an array
    aligned with the rows, or None); export and recommend_all add a ``name`` column from here.
    """
    names = getattr(store, "names", None)
    if names is None:
        return None
    column = names(side)
    return None if column is None else np.asarray(column[start:stop])
