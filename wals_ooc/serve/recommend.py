"""Top-N recommendations for every user, streamed over user shards as Dask tasks.

Each task reads one shard's user factors and already-liked items, scores them against the item
factors block by block, and writes its rows of the output (a Zarr group, or one Parquet file
per shard). Memory per task: the shard's rows and one score tile.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import dask
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from ..errors import DataMismatchError, SettingError
from ..execute import Executor, single_threaded_blas_in_worker
from ..index import approximate_top_k, forget_indexes, resolve_index, subset_csr
from ..kernels.warm import warm_serving_kernels
from ..memory import MemoryBudget
from ..store.format import array, as_int, create_array, open_group, read, subgroup
from ..store.lifecycle import output_store
from ..store.reader import InteractionStore
from ..train.factors import FactorStore
from .ids import forget_ids, model_ids
from .scoring import FactorSource, NormOrder, top_k

RECOMMENDATIONS_KIND = "wals-ooc/recommendations"
RECOMMENDATIONS_PARQUET_KIND = "wals-ooc/recommendations-parquet"
# 2: checksums, written through store.lifecycle; 3: ragged (indptr), no padding slots, item_names
RECOMMENDATIONS_FORMAT_VERSION = 3

_lock = threading.Lock()
_items_in_memory: dict[tuple, NormOrder] = {}
_interaction_stores: dict[tuple, InteractionStore] = {}


def score_block_rows(n_queries: int, factors: int, allowance: int) -> int:
    """Item rows per score tile so the tile and the item block take about an eighth of the allowance."""
    per_row = 4 * (n_queries + factors)
    return int(max(256, min(1 << 20, (allowance // 8) // max(1, per_row))))


def item_source(model: FactorStore, allowance: int, block_rows: int) -> FactorSource:
    """The current item factors: held in memory in norm order (once per process) when they fit a
    quarter of the allowance, so exact top-K can stop early; else read from Zarr block by block.
    (The copy is shared by the process's tasks: give the process's allowance, see ``item_cache_plan``.)"""
    array = model.current("item")
    if NormOrder.nbytes_for(*array.shape) <= allowance // 4:
        # the model's id too: a model trained again at the same path must not be served from this cache
        checkpoint = model.trained()
        key = (model.location, model.group.attrs.get("model_id"), checkpoint.slots["item"], checkpoint.step)
        with _lock:
            if key not in _items_in_memory:
                _items_in_memory.clear()
                _items_in_memory[key] = NormOrder.of(array)
            return FactorSource(_items_in_memory[key], block_rows)
    return FactorSource(array, block_rows)


def item_cache_plan(allowance: int, threads: int, shape: tuple[int, int]) -> tuple[int, int]:
    """(each task's allowance, the allowance ``item_source`` judges the item factors against) for
    ``threads`` tasks sharing a process's ``allowance``. The norm-ordered item factors are held
    once per process, not once per task, so they are weighed against the process's allowance
    (a quarter of it at most), and what they take is left out of the tasks' shares."""
    held = NormOrder.nbytes_for(*shape)
    if held <= allowance // 4:
        return (allowance - held) // threads, allowance
    return allowance // threads, allowance


def release_items() -> None:
    """Drop the in-memory item factors of this process."""
    with _lock:
        _items_in_memory.clear()
        _interaction_stores.clear()
    forget_ids()
    forget_indexes()


def open_interactions(location: str, storage_options: dict | None) -> InteractionStore:
    """The interaction store at ``location``, opened once per process (its id maps are cached)."""
    key = (location, repr(storage_options))
    with _lock:
        if key not in _interaction_stores:
            _interaction_stores[key] = InteractionStore(location, storage_options)
        return _interaction_stores[key]


def display_names(ids, store: InteractionStore | None, side: str):
    """A side's display names (``names.NameIndex``): the model's own copy, else those of the
    interaction store it is bound to; None when neither has any."""
    names = ids.name_map(side)
    return store.name_map(side) if names is None and store is not None else names


def _recommend_shard(model_location, interactions_location, storage_options, start, stop, n, filter_liked,
                     allowance, output, fmt, index=None, names_location=None, items_allowance=None) -> int:
    single_threaded_blas_in_worker()
    model = FactorStore.open(model_location, "r", storage_options)
    ids = model_ids(model)
    queries = read(model.current("user"), slice(start, stop))
    block_rows = score_block_rows(stop - start, queries.shape[1], allowance)
    liked = None
    if filter_liked:
        shard = open_interactions(interactions_location, storage_options).rows("user", start, stop)
        liked = (shard.indptr, shard.indices.astype(np.int64))
    source = item_source(model, items_allowance or allowance, block_rows)
    if index is None:
        top, scores, _ = top_k(queries, source, n, exclude=liked)
    else:  # approximate candidates, liked items dropped exactly; users it cannot fill answered exactly
        location, ef_search, nprobe, candidates = index
        ann = resolve_index(location, model, "item", "inner_product", ef_search=ef_search, nprobe=nprobe,
                            candidates=candidates)
        assert ann is not None, "an index location resolves to an index (or raises)"

        def exact(positions):
            sub = None if liked is None else subset_csr(liked[0], liked[1], positions)
            return top_k(queries[positions], source, n, exclude=sub)[:2]

        top, scores, _ = approximate_top_k(ann, queries, n, liked, exact, threads=1)
    store = None  # the interaction store, opened only for names the model's copy of the id maps lacks
    if names_location is not None and (ids.name_map("item") is None or ids.name_map("user") is None):
        store = open_interactions(names_location, storage_options)
    names, user_names = display_names(ids, store, "item"), display_names(ids, store, "user")
    if fmt == "zarr":
        group = open_group(output, "r+", storage_options)  # rows of row-block-aligned shards: no chunk shared
        array(group, "user_ids")[start:stop] = ids.ids_of("user", np.arange(start, stop))
        if user_names is not None:
            labels = user_names.names_of(np.arange(start, stop))
            array(group, "user_names")[start:stop] = np.where(labels == None, "", labels).astype(object)  # noqa: E711
        array(group, f"{_SCRATCH}/rows")[start:stop] = top  # -1: no result; compacted away by _compact
        array(group, f"{_SCRATCH}/scores")[start:stop] = scores
    else:
        keep = top.ravel() >= 0
        user_rows = np.repeat(np.arange(start, stop), n)[keep]
        ranks = np.tile(np.arange(1, n + 1, dtype=np.int32), stop - start)
        columns = {
            "user": ids.ids_of("user", user_rows, as_arrow=True), "rank": pa.array(ranks[keep]),
            "item": ids.ids_of("item", top.ravel()[keep], as_arrow=True), "score": pa.array(scores.ravel()[keep]),
        }
        if names is not None:
            columns["name"] = names.names_arrow(top.ravel()[keep])
        if user_names is not None:
            columns["user_name"] = user_names.names_arrow(user_rows)
        table = pa.table(columns)
        pq.write_table(table, os.path.join(output, f"part-{start:012d}.parquet"))
    return stop - start


_SCRATCH = "unpacked"


def _compact(group: zarr.Group, ids, names, n_users: int, rows: int) -> None:
    """The shards' (n_users, n) rows and scores (-1: no result) as ragged arrays, a row block at a
    time: indptr (n_users + 1,), item_ids, scores and (with names) item_names (nnz,)."""
    from ..store.appender import ChunkAppender

    scratch = subgroup(group, _SCRATCH)
    kinds = ids.id_kinds
    chunk = max(1 << 16, rows * array(scratch, "rows").shape[1])
    columns: dict[str, Any] = {"item_ids": np.int64 if kinds["item"] == "int" else str, "scores": np.float32}
    if names is not None:
        columns["item_names"] = str
    out = {name: ChunkAppender(create_array(group, name, shape=(0,), dtype=dtype, chunks=(chunk,), dense=True))
           for name, dtype in columns.items()}
    indptr = ChunkAppender(create_array(group, "indptr", shape=(0,), dtype=np.int64, chunks=(1 << 16,), dense=True))
    indptr.append(np.zeros(1, np.int64))
    total = 0
    for lo in range(0, n_users, rows):
        top = read(array(scratch, "rows"), slice(lo, lo + rows))
        keep = top >= 0
        found = top[keep]
        indptr.append(total + np.cumsum(keep.sum(axis=1)))
        total += len(found)
        out["item_ids"].append(np.asarray(ids.ids_of("item", found)))
        out["scores"].append(read(array(scratch, "scores"), slice(lo, lo + rows))[keep])
        if names is not None:
            labels = names.names_of(found)
            out["item_names"].append(np.where(labels == None, "", labels).astype(object))  # noqa: E711
    for appender in (*out.values(), indptr):
        appender.close()
    del group[_SCRATCH]


def _user_ranges(model: FactorStore, store: InteractionStore | None) -> list[tuple[int, int]]:
    """The user shards of the interaction store, or (without it) row ranges of about 1/32 of
    the users, aligned to the model's row block."""
    if store is not None:
        return store.shard_ranges("user")
    n_users, block = as_int(model.group.attrs["n_users"]), as_int(model.group.attrs["row_block"])
    step = block * max(1, -(-n_users // (32 * block)))
    return [(lo, min(n_users, lo + step)) for lo in range(0, n_users, step)]


def recommend_all(
    model: FactorStore,
    store: InteractionStore | None,
    output: str,
    n: int = 10,
    filter_already_liked: bool = True,
    fmt: str = "zarr",
    client: Any = None,
    threads: int | None = None,
    memory_budget: int | str | None = None,
    storage_options: dict | None = None,
    overwrite: bool = False,
    executor: Executor | None = None,
    index: tuple[str, int, int, int | None] | None = None,
) -> str:
    """Write the top ``n`` items of every user to ``output`` (Zarr group or Parquet directory).

    No padding: a user with fewer than n candidates left (most items already liked) gets fewer
    results. Zarr layout (ragged, like CSR): user_ids (n_users,), user_names (n_users,; when the
    model or its store has user names, "" for a user without one), indptr (n_users + 1,) and
    item_ids, scores, item_names (when there are item names; "" for an item without one) of
    length nnz: user k's results, best first, are ``[indptr[k]:indptr[k + 1]]``. Parquet: one
    file per user shard (user, rank, item, score, then name and user_name when there are item
    and user names; null for one without) and ``_SUCCESS``. Either is written through
    ``store.lifecycle`` (built beside, swapped in when complete). ``store`` (the interaction
    store) is needed only to filter already-liked items; ids come from the model. index:
    (location, ef_search, nprobe, candidates) of an approximate index over the item factors (inner
    product) to answer from.
    """
    if fmt not in ("zarr", "parquet"):
        raise SettingError(f"format must be zarr or parquet, not {fmt!r}", flags={"format": "--format"})
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise SettingError(f"N must be an integer >= 1, got {n!r}", flags={"N": "-n"})
    if filter_already_liked and store is None:
        raise DataMismatchError(f"{model.location}: filtering already-liked items needs the interaction store")
    warm_serving_kernels()  # fixed per-process cost: part of the baseline
    budget = MemoryBudget.start(memory_budget)
    executor = Executor.of(executor, client, threads)
    executor.check_reachable(model.location, None if store is None else store.location, output)
    allowance, items_allowance = item_cache_plan(budget.allowance, executor.threads_per_process,
                                                 (int(model.current("item").shape[0]), int(model.current("item").shape[1])))
    ids = model_ids(model)
    kind = RECOMMENDATIONS_KIND if fmt == "zarr" else RECOMMENDATIONS_PARQUET_KIND
    inputs = [model.location] + ([store.location] if store is not None else [])
    with output_store(output, kind, version=RECOMMENDATIONS_FORMAT_VERSION, overwrite=overwrite, inputs=inputs,
                      storage_options=storage_options, layout="zarr" if fmt == "zarr" else "files") as out:
        n_users = ids.n_users
        if fmt == "zarr":
            group = out.group
            group.attrs.update({"n": n, "model": model.location})
            kinds = ids.id_kinds
            rows = as_int(model.group.attrs["row_block"])
            # plain arrays of original ids (int64 or variable-length text), written shard by shard
            create_array(group, "user_ids", shape=(n_users,), dtype=np.int64 if kinds["user"] == "int" else str,
                         chunks=(rows,), dense=True)
            if display_names(ids, store, "user") is not None:
                create_array(group, "user_names", shape=(n_users,), dtype=str, chunks=(rows,), dense=True)
            scratch = group.create_group(_SCRATCH)
            create_array(scratch, "rows", shape=(n_users, n), dtype=np.int64, chunks=(rows, n), dense=True)
            create_array(scratch, "scores", shape=(n_users, n), dtype=np.float32, chunks=(rows, n), dense=True)
        tasks = [
            dask.delayed(_recommend_shard, pure=False)(
                model.location, store.location if filter_already_liked and store is not None else None, storage_options, lo, hi, n,
                filter_already_liked, allowance, out.location, fmt, index, None if store is None else store.location,
                items_allowance,
                dask_key_name=f"recommend-shard{k:05d}",
            )
            for k, (lo, hi) in enumerate(_user_ranges(model, store))
            if hi > lo
        ]
        try:
            with executor.single_threaded_blas():
                executor.run(tasks)
        finally:
            executor.run_everywhere(release_items)
        if fmt == "zarr":
            _compact(out.group, ids, display_names(ids, store, "item"), n_users, as_int(model.group.attrs["row_block"]))
        if fmt == "parquet":
            with open(os.path.join(out.location, "_SUCCESS"), "w") as marker:
                marker.write("complete\n")
    return output


def open_recommendations(location: str, storage_options: dict | None = None) -> zarr.Group:
    """A finished recommend_all output (refuses an interrupted one)."""
    from ..store.format import check_complete

    group = open_group(location, "r", storage_options)
    check_complete(group, RECOMMENDATIONS_KIND, location, RECOMMENDATIONS_FORMAT_VERSION)
    return group
