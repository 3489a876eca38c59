"""Row numbers <-> the ids users gave: the one place serving, indexing and export convert them.

Ids come from the model's own copy of its id maps (``FactorStore.id_maps()``), so serving needs
no interaction store. Every conversion goes through the helpers below (``model_ids`` to get the
maps, then ``original_ids``/``ids_of_range``/``id_kind``/``names_of_range``), which delegate to
the maps' chunked, verified lookups (``ids_of``, ``ids``; issue 10).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..store.reader import IdMaps, InteractionStore
    from ..train.factors import FactorStore

_lock = threading.Lock()
_maps: dict[tuple, IdMaps] = {}


def model_ids(model: FactorStore) -> IdMaps:
    """The id maps of a ``FactorStore``, opened once per process (their arrays are cached)."""
    binding = model.binding
    # the group's path names an object store's current generation: a replaced model is not
    # served with the id maps of its deleted predecessor
    key = (model.location, model.group.path, str(model.group.store), binding.get("store_id"),
           model.group.attrs.get("n_users"), model.group.attrs.get("n_items"))
    with _lock:
        if key not in _maps:
            _maps.clear()
            _maps[key] = model.id_maps()
        return _maps[key]


def forget_ids() -> None:
    """Drop the cached id maps of this process."""
    with _lock:
        _maps.clear()


def original_ids(maps: InteractionStore, side: str, rows: np.ndarray) -> np.ndarray:
    """Original ids of row numbers (any shape); rows < 0 (empty slots) give -1 or ""."""
    return maps.ids_of(side, np.asarray(rows, np.int64))


def ids_of_range(maps: InteractionStore, side: str, start: int, stop: int) -> np.ndarray:
    """Original ids of the contiguous rows ``[start, stop)`` (a shard): int64 or str objects."""
    return maps.ids(side, start, stop)


def ids_of_range_arrow(maps: InteractionStore, side: str, start: int, stop: int) -> Any:
    """The same as a flat Arrow array (int64 or large_string), for Parquet."""
    return maps.ids_of(side, np.arange(start, stop, dtype=np.int64), as_arrow=True)


def id_kind(maps: InteractionStore, side: str) -> str:
    """"int" or "text"."""
    return maps.id_kinds[side]


def names_of_range(maps: InteractionStore, side: str, start: int, stop: int) -> Any:
    """Display names of the rows ``[start, stop)`` as Arrow (null where a row has none), read
    chunk by chunk from the maps' names (see ``store.names``), or None when the maps have none."""
    names = maps.name_map(side)
    if names is None:
        return None
    return names.names_arrow(np.arange(start, stop, dtype=np.int64))
