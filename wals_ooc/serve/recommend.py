"""Top-N recommendations for every user, streamed over user shards as Dask tasks.

Each task reads one shard's user factors and already-liked items, scores them against the item
factors block by block, and writes its rows of the output (a Zarr group, or one Parquet file
per shard). Memory per task: the shard's rows and one score tile.
"""

from __future__ import annotations

import os
import threading

import dask
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from ..execute import Executor, single_threaded_blas_in_worker
from ..kernels.warm import warm_serving_kernels
from ..memory import MemoryBudget
from ..store.format import open_group
from ..store.reader import InteractionStore
from ..train.factors import FactorStore
from ..outputs import building
from .ids import id_dtype, ids_of_range, original_ids
from .scoring import FactorSource, NormOrder, top_k

RECOMMENDATIONS_KIND = "wals-ooc/recommendations"
RECOMMENDATIONS_PARQUET_KIND = "wals-ooc/recommendations-parquet"

_lock = threading.Lock()
_items_in_memory: dict[tuple, NormOrder] = {}
_interaction_stores: dict[tuple, InteractionStore] = {}


def score_block_rows(n_queries: int, factors: int, allowance: int) -> int:
    """Item rows per score tile so the tile and the item block take about an eighth of the allowance."""
    per_row = 4 * (n_queries + factors)
    return int(max(256, min(1 << 20, (allowance // 8) // max(1, per_row))))


def item_source(model: FactorStore, allowance: int, block_rows: int) -> FactorSource:
    """The current item factors: held in memory in norm order (once per process) when they fit a
    quarter of the allowance, so exact top-K can stop early; else read from Zarr block by block."""
    array = model.current("item")
    if NormOrder.nbytes_for(*array.shape) <= allowance // 4:
        key = (model.location, model.checkpoint.slots["item"], model.checkpoint.step)
        with _lock:
            if key not in _items_in_memory:
                _items_in_memory.clear()
                _items_in_memory[key] = NormOrder.of(array)
            array = _items_in_memory[key]
    return FactorSource(array, block_rows)


def release_items() -> None:
    """Drop the in-memory item factors of this process."""
    with _lock:
        _items_in_memory.clear()
        _interaction_stores.clear()


def open_interactions(location: str, storage_options: dict | None) -> InteractionStore:
    """The interaction store at ``location``, opened once per process (its id maps are cached)."""
    key = (location, repr(storage_options))
    with _lock:
        if key not in _interaction_stores:
            _interaction_stores[key] = InteractionStore(location, storage_options)
        return _interaction_stores[key]


def _recommend_shard(model_location, interactions_location, storage_options, start, stop, n, filter_liked,
                     allowance, output, fmt) -> int:
    single_threaded_blas_in_worker()
    model = FactorStore.open(model_location, "r", storage_options)
    store = open_interactions(interactions_location, storage_options)
    queries = model.current("user")[start:stop]
    block_rows = score_block_rows(stop - start, queries.shape[1], allowance)
    liked = None
    if filter_liked:
        shard = store.rows("user", start, stop)
        liked = (shard.indptr, shard.indices.astype(np.int64))
    ids, scores, _ = top_k(queries, item_source(model, allowance, block_rows), n, exclude=liked)
    original = original_ids(store, "item", ids)
    if fmt == "zarr":
        group = open_group(output, "r+", storage_options)
        group["item_ids"][start:stop] = original
        group["scores"][start:stop] = scores
    else:
        users = np.repeat(ids_of_range(store, "user", start, stop), n)
        ranks = np.tile(np.arange(1, n + 1, dtype=np.int32), stop - start)
        keep = ids.ravel() >= 0
        table = pa.table({
            "user": pa.array(users[keep]), "rank": pa.array(ranks[keep]),
            "item": pa.array(original.ravel()[keep]), "score": pa.array(scores.ravel()[keep]),
        })
        pq.write_table(table, os.path.join(output, f"part-{start:012d}.parquet"))
    return stop - start


def recommend_all(
    model: FactorStore,
    store: InteractionStore,
    output: str,
    n: int = 10,
    filter_already_liked: bool = True,
    fmt: str = "zarr",
    client=None,
    threads: int | None = None,
    memory_budget=None,
    storage_options: dict | None = None,
    overwrite: bool = False,
    executor: Executor | None = None,
) -> str:
    """Write the top ``n`` items of every user to ``output`` (Zarr group or Parquet directory).

    Zarr layout: user_ids (n_users,), item_ids (n_users, n) original ids, scores (n_users, n);
    missing slots (fewer than n candidates) hold -1 or "" with score -inf. ``complete`` is set last.
    """
    if fmt not in ("zarr", "parquet"):
        raise ValueError("fmt must be zarr or parquet")
    warm_serving_kernels()  # fixed per-process cost: part of the baseline
    budget = MemoryBudget.start(memory_budget)
    executor = Executor.of(executor, client, threads)
    allowance = budget.allowance // executor.threads_per_process
    kind = RECOMMENDATIONS_KIND if fmt == "zarr" else RECOMMENDATIONS_PARQUET_KIND
    with building(output, kind, overwrite, inputs=[model.location, store.location]) as build:
        if fmt == "zarr":
            group = open_group(build, "w" if overwrite or build != output else "w-", storage_options)
            group.attrs.update({"kind": RECOMMENDATIONS_KIND, "format_version": 1, "complete": False, "n": n})
            user_dtype, item_dtype = id_dtype(store, "user"), id_dtype(store, "item")
            rows = store.row_block
            user_ids = group.create_array("user_ids", shape=(store.n_users,), dtype=_zarr_dtype(user_dtype),
                                          chunks=(max(1, min(store.n_users, 1 << 20)),))
            for lo in range(0, store.n_users, 1 << 20):
                user_ids[lo : lo + (1 << 20)] = ids_of_range(store, "user", lo, min(store.n_users, lo + (1 << 20)))
            group.create_array("item_ids", shape=(store.n_users, n), dtype=_zarr_dtype(item_dtype), chunks=(rows, n))
            group.create_array("scores", shape=(store.n_users, n), dtype=np.float32, chunks=(rows, n))
        else:
            os.makedirs(build, exist_ok=True)
        tasks = [
            dask.delayed(_recommend_shard, pure=False)(
                model.location, store.location, storage_options, lo, hi, n, filter_already_liked, allowance, build, fmt,
                dask_key_name=f"recommend-shard{k:05d}",
            )
            for k, (lo, hi) in enumerate(store.shard_ranges("user"))
            if hi > lo
        ]
        try:
            with executor.single_threaded_blas():
                executor.run(tasks)
        finally:
            executor.run_everywhere(release_items)
        if fmt == "zarr":
            group.attrs["complete"] = True
        else:
            with open(os.path.join(build, "_SUCCESS"), "w") as marker:
                marker.write("complete\n")
    return output


def _zarr_dtype(dtype: np.dtype):
    return str if dtype.kind in "TUO" else dtype


def open_recommendations(location: str, storage_options: dict | None = None) -> zarr.Group:
    """A finished recommend_all output (refuses an interrupted one)."""
    from ..store.format import check_complete

    group = open_group(location, "r", storage_options)
    check_complete(group, RECOMMENDATIONS_KIND, location, 1)
    return group
