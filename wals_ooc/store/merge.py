"""One interaction store from several (e.g. a train and a validation split back together), out of core.

The entries are streamed shard by shard, keyed by their original ids, through the same writer as
``convert``: ids are unified, a pair present in several stores is summed (as duplicate rows are
on conversion), and memory stays within the budget whatever the stores' sizes.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import DataMismatchError, SettingError
from .reader import InteractionStore
from .sources import RowBatch
from .writer import ConvertReport, write_store


def _batch_ids(store: InteractionStore, side: str, rows: np.ndarray):
    """Original ids of rows as a RowBatch carries them (int64 NumPy, or Arrow text), read only
    from the id-map chunks those rows are in."""
    if store.id_map(side).kind == "int":
        return store.ids_of(side, rows)
    return store.ids_of(side, rows, as_arrow=True)


def store_row_batches(store: InteractionStore, with_order: bool) -> Iterator[RowBatch]:
    """Every entry of a store as (user id, item id, value[, order]) rows, one user shard at a time."""
    for lo, hi in store.shard_ranges("user"):
        if hi == lo:
            continue
        shard = store.rows("user", lo, hi, with_order=with_order)
        if not shard.nnz:
            continue
        rows = np.repeat(np.arange(lo, hi), np.diff(shard.indptr))
        yield RowBatch(_batch_ids(store, "user", rows), _batch_ids(store, "item", shard.indices), shard.values,
                       shard.order if with_order else None)


def merge(stores: Sequence[InteractionStore | str | os.PathLike], out: str | os.PathLike,
          storage_options: dict | None = None, **store_options: Any) -> ConvertReport:
    """Write one store holding every entry of ``stores`` (pairs found in several are summed).

    The entry order (time) is kept when every store has one. ``store_options`` go to the writer
    (memory_budget, overwrite, progress, row_block...; row_block defaults to the first store's).
    """
    opened = [s if isinstance(s, InteractionStore) else InteractionStore(s, storage_options) for s in stores]
    if not opened:
        raise SettingError("merge needs at least one store")
    id_types = {}
    for side in ("user", "item"):
        kinds = {s.id_map(side).kind for s in opened}
        if len(kinds) > 1:
            raise DataMismatchError(f"cannot merge stores of integer {side} ids with stores of string {side} ids: "
                                    + ", ".join(f"{s.location} ({s.id_map(side).kind})" for s in opened))
        first = opened[0].id_map(side)
        id_types[side] = "str" if first.kind == "str" else first.id_type
    with_order = all(s.has_order for s in opened)

    def batches() -> Iterator[RowBatch]:
        for store in opened:
            yield from store_row_batches(store, with_order)

    store_options.setdefault("row_block", opened[0].row_block)
    store_options.setdefault("inputs", [s.location for s in opened])  # the door refuses to write over one
    store_options.setdefault("id_type", id_types)
    return write_store(batches(), out, storage_options=storage_options,
                       source_attrs={"merge_of": [s.location for s in opened],
                                     "merged_store_ids": [s.attrs().get("store_id") for s in opened]},
                       **store_options)
