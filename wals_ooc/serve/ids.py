"""Row numbers <-> the ids users gave: the one place serving, indexing and export convert them.

Ids come from the model's own copy of its id maps (``FactorStore.id_maps()``), so serving needs
no interaction store. Every conversion goes through the helpers below (``model_ids`` to get the
maps, then ``original_ids``/``ids_of_range``/``id_dtype``/``names_of_range``); a new id-map API
(issue 10: chunked, verified lookup) changes this module only.
"""

from __future__ import annotations

import threading

import numpy as np

_lock = threading.Lock()
_maps: dict[tuple, object] = {}


def model_ids(model):
    """The id maps of a ``FactorStore``, opened once per process (their arrays are cached)."""
    binding = model.binding
    key = (model.location, binding.get("store_id"), int(model.group.attrs["n_users"]), int(model.group.attrs["n_items"]))
    with _lock:
        if key not in _maps:
            _maps.clear()
            _maps[key] = model.id_maps()
        return _maps[key]


def forget_ids() -> None:
    """Drop the cached id maps of this process."""
    with _lock:
        _maps.clear()


def missing_id(dtype: np.dtype):
    """The placeholder of an empty result slot: -1 for integer ids, "" for strings."""
    return -1 if np.issubdtype(dtype, np.integer) else ""


def original_ids(maps, side: str, rows: np.ndarray) -> np.ndarray:
    """Original ids of row numbers (any shape); rows < 0 (empty slots) give ``missing_id``."""
    rows = np.asarray(rows, np.int64)
    id_map = maps.ids(side)
    return np.where(rows >= 0, id_map[np.maximum(rows, 0)], missing_id(id_map.dtype))


def ids_of_range(maps, side: str, start: int, stop: int) -> np.ndarray:
    """Original ids of the contiguous rows ``[start, stop)`` (a shard)."""
    return maps.ids(side)[start:stop]


def id_dtype(maps, side: str) -> np.dtype:
    return maps.ids(side).dtype


def names_of_range(maps, side: str, start: int, stop: int) -> np.ndarray | None:
    """Display names of the rows ``[start, stop)``, or None when the maps have none.

    Hook for display names: maps that keep them expose ``names(side)`` (an array aligned with
    the rows, or None); export adds a ``name`` column from here.
    """
    names = getattr(maps, "names", None)
    if names is None:
        return None
    column = names(side)
    return None if column is None else np.asarray(column[start:stop])
