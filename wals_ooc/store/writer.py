"""Out-of-core conversion of row batches into an interaction store.

Four streaming passes, each holding at most one batch or one shard in memory:

1. collect: validate input batches, spill them to an Arrow IPC file, gather the distinct ids;
2. map:     sorted distinct ids become the id maps; rows are rewritten as (user, item, value)
            int32/int32/float32 records and entries per row are counted;
3. bucket:  shard bounds are chosen from the counts (balanced nnz, aligned to ``row_block``),
            cut into assembly units that fit the budget, and each record is appended to its
            user unit's and its item unit's bucket file;
4. assemble: each bucket is sorted, duplicates summed, and appended as those rows of the CSR.

The store is built beside its target and swapped in only when complete (``store.lifecycle``),
so a conversion that fails or is killed leaves an existing store as it was.
"""

from __future__ import annotations

import logging
import os
import zlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import zarr
from tqdm.auto import tqdm

from ..memory import MemoryBudget, format_bytes, peak_rss
from ..errors import SettingError, WalsError
from .format import CSR_CHUNK, FORMAT_VERSION, INTERACTIONS_KIND, create_array, is_local
from .lifecycle import Output, output_store
from .sources import BadRowReport, InputError, InputSpec, RowBatch, read_batches

log = logging.getLogger("wals_ooc")

RECORD = np.dtype([("row", np.int32), ("col", np.int32), ("value", np.float32)])
# with an order column: each entry also carries its place in time (the latest wins on duplicates)
ORDERED_RECORD = np.dtype([("row", np.int32), ("col", np.int32), ("value", np.float32), ("order", np.float64)])
# bytes of working memory per entry while assembling one shard (records, sort keys, order, output)
ASSEMBLE_BYTES_PER_NNZ = 48
DEFAULT_ROW_BLOCK = 4096


@dataclass
class ConvertReport:
    """What a conversion read, kept, dropped and how long it took."""

    store: str
    rows_read: int = 0
    nnz: int = 0
    n_users: int = 0
    n_items: int = 0
    duplicates_summed: int = 0
    bad_rows: BadRowReport = field(default_factory=BadRowReport)
    seconds: float = 0.0
    peak_rss: int = 0
    budget: str = ""

    def summary(self) -> str:
        rate = self.rows_read / self.seconds if self.seconds else 0.0
        return (
            f"{self.store}: {self.n_users} users x {self.n_items} items, nnz {self.nnz} "
            f"from {self.rows_read} rows ({self.duplicates_summed} duplicate pairs summed, "
            f"{self.bad_rows.zeros_dropped} zeros dropped; {self.bad_rows.summary()}) in {self.seconds:.1f}s "
            f"({rate:,.0f} rows/s), peak RSS {format_bytes(self.peak_rss)}; {self.budget}"
        )


# ---------------------------------------------------------------------------------------------
# Pass 1 helpers: distinct ids, with bounded pending work
# ---------------------------------------------------------------------------------------------


class DistinctIds:
    """Distinct ids seen so far; int64 NumPy, or UTF-8 bytes ('S') for string ids.

    Per-batch distinct values are merged once the pending ones exceed ``merge_bytes``, so memory
    stays near the size of the final id map.
    """

    def __init__(self, merge_bytes: int):
        self.merge_bytes = merge_bytes
        self.merged: np.ndarray | None = None
        self.pending: list[np.ndarray] = []
        self.pending_bytes = 0

    def add(self, ids: np.ndarray | pa.Array) -> None:
        if isinstance(ids, pa.Array):
            ids = pa.compute.unique(ids).cast(pa.binary()).to_numpy(zero_copy_only=False).astype("S")
        distinct = _sorted_distinct(ids)
        self.pending.append(distinct)
        self.pending_bytes += distinct.nbytes
        if self.pending_bytes > self.merge_bytes:
            self._merge()

    def _merge(self) -> None:
        parts = self.pending + ([self.merged] if self.merged is not None else [])
        if parts:
            width = max(p.dtype.itemsize for p in parts)
            if parts[0].dtype.kind == "S":
                parts = [p.astype(f"S{width}") for p in parts]
            self.merged = _sorted_distinct(np.concatenate(parts))
        self.pending, self.pending_bytes = [], 0

    def sorted_ids(self) -> np.ndarray:
        self._merge()
        return self.merged if self.merged is not None else np.empty(0, dtype=np.int64)


def _sorted_distinct(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (NumPy 2's hash-based unique is several times slower on ids)."""
    ordered = np.sort(values)
    if not len(ordered):
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def lookup_sorted(sorted_ids: np.ndarray, ids: np.ndarray | pa.Array) -> np.ndarray:
    """Row index of each id in the sorted id map (all ids must be present)."""
    if isinstance(ids, pa.Array):
        ids = ids.cast(pa.binary()).to_numpy(zero_copy_only=False).astype(sorted_ids.dtype)
    return np.searchsorted(sorted_ids, ids).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Shard planning
# ---------------------------------------------------------------------------------------------


def plan_shard_bounds(row_counts: np.ndarray, row_block: int, target_nnz: int) -> list[int]:
    """Shard bounds over rows: multiples of ``row_block`` holding at most about ``target_nnz`` entries.

    A cut goes before each block that takes the running total past a multiple of the target
    (vectorised: no Python loop over rows). A block is never split, so a shard exceeds the
    target only when one block does.
    """
    n_rows = len(row_counts)
    if n_rows == 0:
        return [0, 0]
    block_starts = np.arange(0, n_rows, row_block)
    cumulative = np.cumsum(np.add.reduceat(row_counts.astype(np.int64), block_starts))
    n_parts = max(1, -(-int(cumulative[-1]) // max(1, target_nnz)))
    cut_blocks = np.searchsorted(cumulative, np.arange(1, n_parts, dtype=np.int64) * target_nnz, side="right")
    cut_blocks = np.unique(cut_blocks[(cut_blocks > 0) & (cut_blocks < len(block_starts))])
    return [0] + [int(block_starts[b]) for b in cut_blocks] + [n_rows]


def assembly_units(row_counts: np.ndarray, shard_bounds: list[int], unit_nnz: int) -> list[int]:
    """Bounds of the row ranges assembled one at a time: the shard bounds, cut further (at any
    row) wherever a shard holds more than ``unit_nnz`` entries, so assembly fits the budget even
    when one row block of a power-law side is huge. A row of more than ``unit_nnz`` entries is a
    unit of its own (assembled by ``dense_row_to_csr``); other units hold at most about twice it."""
    units = [0]
    for lo, hi in zip(shard_bounds[:-1], shard_bounds[1:]):
        inner = plan_shard_bounds(row_counts[lo:hi], 1, unit_nnz)
        units.extend(lo + b for b in inner[1:])
    if len(units) == 1:
        units.append(0)
    heavy = np.flatnonzero(row_counts > unit_nnz)
    if len(heavy):
        units = sorted(set(units) | set(heavy.tolist()) | set((heavy + 1).tolist()))
    return units


def default_shard_nnz(nnz: int, allowance: int) -> int:
    """Entries per shard: at most what one shard assembly may hold, and about 32 shards for load balance."""
    cap = max(1 << 14, allowance // (2 * ASSEMBLE_BYTES_PER_NNZ))
    return int(min(cap, max(1 << 16, -(-nnz // 32))))


# ---------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------


class _Workspace:
    """Where one conversion's spill files go: a directory the door removes however the run ends."""

    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)


def write_store(
    batches: Iterable[RowBatch],
    store: str | os.PathLike,
    *,
    memory_budget: MemoryBudget | int | str | None = None,
    shard_nnz: int | None = None,
    row_block: int = DEFAULT_ROW_BLOCK,
    tmp_dir: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    storage_options: dict | None = None,
    report: ConvertReport | None = None,
    source_attrs: dict[str, Any] | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> ConvertReport:
    """Write validated row batches into an interaction store, out of core.

    memory_budget caps peak RSS (see ``wals_ooc.memory``); shard_nnz overrides the entries per
    shard; row_block is the row alignment of shards (and the factor chunk size in training).
    The store is built beside ``store`` and swapped in when complete (``store.lifecycle``):
    a failure leaves an existing store as it was. inputs: what the batches are read from (the
    store may not be one of them).
    """
    store = os.fspath(store)
    _check_layout_args(row_block, shard_nnz)
    # measured once, before the door opens anything (convert passes the budget it started)
    budget = memory_budget if isinstance(memory_budget, MemoryBudget) else MemoryBudget.start(memory_budget)
    with output_store(store, INTERACTIONS_KIND, version=FORMAT_VERSION, overwrite=overwrite, inputs=inputs,
                      storage_options=storage_options, tmp_dir=tmp_dir) as out:
        return build_store(batches, out, memory_budget=budget, shard_nnz=shard_nnz, row_block=row_block,
                           progress=progress, report=report, source_attrs=source_attrs)


def _check_layout_args(row_block: int, shard_nnz: int | None) -> None:
    if not isinstance(row_block, (int, np.integer)) or row_block < 1:
        raise SettingError(f"row_block must be an integer >= 1, got {row_block!r}", flags={"row_block": "--row-block"})
    if shard_nnz is not None and (not isinstance(shard_nnz, (int, np.integer)) or shard_nnz < 1):
        raise SettingError(f"shard_nnz must be an integer >= 1, got {shard_nnz!r}", flags={"shard_nnz": "--shard-nnz"})


def build_store(
    batches: Iterable[RowBatch],
    out: Output,
    *,
    memory_budget: MemoryBudget | int | str | None = None,
    shard_nnz: int | None = None,
    row_block: int = DEFAULT_ROW_BLOCK,
    progress: bool | None = None,
    report: ConvertReport | None = None,
    source_attrs: dict[str, Any] | None = None,
) -> ConvertReport:
    """The body of ``write_store``: the four passes, into an output opened by ``store.lifecycle``
    (spill files in its workspace). ``split`` builds its two outputs this way in one transaction.
    memory_budget: a budget, or a ``MemoryBudget`` already started (measured before the door)."""
    started = time.perf_counter()
    _check_layout_args(row_block, shard_nnz)
    budget = memory_budget if isinstance(memory_budget, MemoryBudget) else MemoryBudget.start(memory_budget)
    report = report or ConvertReport(store=out.target)
    report.budget = budget.describe()
    group = out.group
    workspace = _Workspace(out.workspace())
    disable = None if progress is None else not progress
    spill, id_kind, user_ids, item_ids, record = _collect(batches, workspace, budget, report, disable)
    counts, mapped_path = _map_rows(spill, workspace, user_ids, item_ids, record, disable)
    report.n_users, report.n_items = len(user_ids), len(item_ids)
    raw_nnz = int(counts["user"].sum())
    target = shard_nnz or default_shard_nnz(raw_nnz, budget.allowance)
    bounds = {side: plan_shard_bounds(counts[side], row_block, target) for side in ("user", "item")}
    per_entry = ASSEMBLE_BYTES_PER_NNZ + 3 * (record.itemsize - RECORD.itemsize)  # order: kept, sorted, reduced
    unit_nnz = max(1, budget.allowance // (4 * per_entry))
    units = {side: assembly_units(counts[side], bounds[side], unit_nnz) for side in ("user", "item")}
    del counts
    buckets = _bucket(mapped_path, workspace, units, budget, record, disable)
    nnz = {}
    for side, orientation, n_cols in (("user", "by_user", len(item_ids)), ("item", "by_item", len(user_ids))):
        nnz[side] = _assemble(group, orientation, buckets[side], units[side], n_cols, record, unit_nnz,
                              budget.allowance, disable)
        group[orientation].attrs.update({"shard_bounds": [int(b) for b in bounds[side]], "row_block": int(row_block)})
    assert nnz["user"] == nnz["item"], "both orientations must hold the same entries"
    _write_ids(group, "user_ids", user_ids, id_kind)
    _write_ids(group, "item_ids", item_ids, id_kind)
    report.nnz = nnz["user"]
    report.duplicates_summed = raw_nnz - report.nnz
    report.seconds = time.perf_counter() - started
    report.peak_rss = peak_rss()
    group.attrs.update(
        {
            "n_users": report.n_users,
            "n_items": report.n_items,
            "nnz": report.nnz,
            "id_kind": id_kind,
            "has_order": record is ORDERED_RECORD,
            "store_id": uuid.uuid4().hex,
            "rows_read": report.rows_read,
            "duplicates_summed": report.duplicates_summed,
            "zeros_dropped": report.bad_rows.zeros_dropped,
            "bad_rows_skipped": report.bad_rows.skipped,
            "sources": source_attrs or {},
        }
    )  # ``complete`` is set by the door once this returns and the store is verified
    return report


def _collect(batches, workspace, budget, report, disable):
    """Pass 1: spill every validated batch to Arrow IPC and gather the distinct ids.

    Returns the spill path, the id kind, the sorted distinct ids and the record dtype of pass 2."""
    users = DistinctIds(merge_bytes=max(1 << 20, budget.allowance // 16))
    items = DistinctIds(merge_bytes=max(1 << 20, budget.allowance // 16))
    path = workspace.file("rows.arrow")
    writer = None
    id_kind = None
    with tqdm(desc="read", unit="rows", unit_scale=True, disable=disable) as bar:
        for batch in batches:
            kind = "int" if isinstance(batch.users, np.ndarray) else "str"
            if writer is None:
                id_kind = kind
                id_type = pa.int64() if kind == "int" else pa.string()
                fields = [("user", id_type), ("item", id_type), ("value", pa.float32())]
                has_order = batch.order is not None
                schema = pa.schema(fields + ([("order", pa.float64())] if has_order else []))
                writer = pa.ipc.new_stream(pa.OSFile(path, "wb"), schema)
            columns = [pa.array(batch.users), pa.array(batch.items), pa.array(batch.values)]
            table = pa.record_batch(columns + ([pa.array(batch.order)] if has_order else []), schema=schema)
            writer.write_batch(table)
            users.add(batch.users)
            items.add(batch.items)
            report.rows_read += len(batch)
            bar.update(len(batch))
    if writer is None:
        raise InputError(report.store, None, None, "empty input: no valid rows to convert")
    writer.close()
    return path, id_kind, users.sorted_ids(), items.sorted_ids(), ORDERED_RECORD if has_order else RECORD


def _map_rows(spill_path, workspace, user_ids, item_ids, record, disable):
    """Pass 2: original ids -> row indices, written as fixed-size records; count entries per row."""
    counts = {"user": np.zeros(len(user_ids), np.int64), "item": np.zeros(len(item_ids), np.int64)}
    mapped_path = workspace.file("rows.records")
    with pa.OSFile(spill_path, "rb") as source, open(mapped_path, "wb") as sink, tqdm(
        desc="map ids", unit="rows", unit_scale=True, disable=disable
    ) as bar:
        for batch in pa.ipc.open_stream(source):
            records = np.empty(batch.num_rows, record)
            records["row"] = lookup_sorted(user_ids, _column(batch, 0))
            records["col"] = lookup_sorted(item_ids, _column(batch, 1))
            records["value"] = batch.column(2).to_numpy()
            if "order" in record.names:
                records["order"] = batch.column(3).to_numpy()
            counts["user"] += np.bincount(records["row"], minlength=len(user_ids))
            counts["item"] += np.bincount(records["col"], minlength=len(item_ids))
            records.tofile(sink)
            bar.update(batch.num_rows)
    os.remove(spill_path)
    return counts, mapped_path


def _column(batch: pa.RecordBatch, k: int):
    column = batch.column(k)
    return column.to_numpy() if pa.types.is_integer(column.type) else column


def _bucket(mapped_path, workspace, bounds, budget, record, disable):
    """Pass 3: append each record to its user shard's and its item shard's bucket file."""
    chunk_rows = max(1 << 14, budget.allowance // (16 * record.itemsize))
    paths = {
        side: [workspace.file(f"{side}-{k:06d}.records") for k in range(len(bounds[side]) - 1)]
        for side in ("user", "item")
    }
    total = os.path.getsize(mapped_path) // record.itemsize
    with open(mapped_path, "rb") as source, tqdm(
        desc="bucket", total=total, unit="rows", unit_scale=True, disable=disable
    ) as bar:
        while True:
            records = np.fromfile(source, record, count=chunk_rows)
            if not len(records):
                break
            for side, key in (("user", "row"), ("item", "col")):
                shard_of = np.searchsorted(np.asarray(bounds[side][1:-1]), records[key], side="right")
                order = np.argsort(shard_of, kind="stable")
                cuts = np.searchsorted(shard_of[order], np.arange(len(paths[side]) + 1))
                grouped = records[order]
                if side == "item":
                    grouped = _swap_row_col(grouped)
                for k in range(len(paths[side])):
                    if cuts[k + 1] > cuts[k]:
                        with open(paths[side][k], "ab") as sink:
                            grouped[cuts[k] : cuts[k + 1]].tofile(sink)
            bar.update(len(records))
    os.remove(mapped_path)
    return paths


def _swap_row_col(records: np.ndarray) -> np.ndarray:
    swapped = records.copy()
    swapped["row"], swapped["col"] = records["col"], records["row"]
    return swapped


def _csr_array(group: zarr.Group, name: str, shape: int, dtype) -> zarr.Array:
    return create_array(
        group,
        name,
        dense=True,
        shape=(shape,),
        dtype=dtype,
        chunks=(CSR_CHUNK,),
        compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
        fill_value=0,
    )


class ChunkAppender:
    """Appends to a 1-d Zarr array in whole chunks only.

    Writing a shard's entries straight to the array would re-read, re-compress and re-write the
    chunk it shares with the previous shard; buffering up to one chunk writes each chunk once.
    """

    def __init__(self, array: zarr.Array, start: int = 0):
        self.array = array
        self.chunk = array.chunks[0]
        self.written = start  # elements already in the array
        self.pending: list[np.ndarray] = []
        self.pending_len = 0

    def append(self, values: np.ndarray) -> None:
        if len(values):
            self.pending.append(values)
            self.pending_len += len(values)
        if self.pending_len >= self.chunk:
            self._flush(whole_chunks_only=True)

    def _flush(self, whole_chunks_only: bool) -> None:
        if not self.pending_len:
            return
        data = np.concatenate(self.pending)
        # keep the write aligned: end it on a chunk boundary unless this is the final flush
        end = self.written + len(data)
        if whole_chunks_only:
            end -= end % self.chunk
        take = end - self.written
        if take > 0:
            if self.array.shape[0] < end:
                self.array.resize((end,))
            self.array[self.written : end] = data[:take]
            self.written = end
        rest = data[take:]
        self.pending = [rest] if len(rest) else []
        self.pending_len = len(rest)

    def close(self) -> int:
        self._flush(whole_chunks_only=False)
        return self.written


def _assemble(group, orientation, bucket_paths, bounds, n_cols, record, unit_nnz, allowance, disable) -> int:
    """Pass 4: sort each unit's bucket, sum duplicates, and append its CSR rows to the store.

    A unit is at most ``unit_nnz`` entries unless it is one row with more (a very popular item):
    that row is summed in chunks into a dense accumulator over the columns instead.
    """
    n_rows = bounds[-1]
    csr = group.create_group(orientation)
    indptr_out = ChunkAppender(_csr_array(csr, "indptr", n_rows + 1, np.int64), start=1)  # [0] is fill 0
    indices_out = ChunkAppender(_csr_array(csr, "indices", 0, np.int32))
    values_out = ChunkAppender(_csr_array(csr, "values", 0, np.float32))
    order_out = ChunkAppender(_csr_array(csr, "order", 0, np.float64)) if "order" in record.names else None
    offset = 0
    for k, path in enumerate(tqdm(bucket_paths, desc=f"assemble {orientation}", unit="shards", disable=disable)):
        entries = os.path.getsize(path) // record.itemsize if os.path.exists(path) else 0
        if entries > unit_nnz and bounds[k + 1] - bounds[k] == 1 and n_cols * DENSE_ROW_BYTES <= allowance // 2:
            indptr, indices, values, order = dense_row_to_csr(path, record, n_cols, unit_nnz)
        else:  # passed without a name, so rows_to_csr can free the records once it has read them
            if entries > 2 * unit_nnz:
                log.warning("row %d of %s has %d entries: assembling it in memory may exceed the budget",
                            bounds[k], orientation, entries)
            indptr, indices, values, order = rows_to_csr(
                np.fromfile(path, record) if entries else np.empty(0, record), bounds[k], bounds[k + 1], n_cols
            )
        if os.path.exists(path):
            os.remove(path)
        indices_out.append(indices)
        values_out.append(values)
        if order_out is not None:
            order_out.append(order)
        indptr_out.append(indptr[1:] + offset)
        offset += len(indices)
    for appender in (indptr_out, indices_out, values_out, order_out):
        if appender is not None:
            appender.close()
    csr.attrs["n_cols"] = int(n_cols)
    return offset


DENSE_ROW_BYTES = 17  # per column: float64 sum, float64 latest order, bool seen


def dense_row_to_csr(path: str, record: np.dtype, n_cols: int, chunk_entries: int):
    """The one row in a bucket file -> (indptr, indices, values, order), read ``chunk_entries`` at a
    time into per-column sums (memory: n_cols * DENSE_ROW_BYTES plus one chunk)."""
    has_order = "order" in record.names
    sums = np.zeros(n_cols, np.float64)
    seen = np.zeros(n_cols, bool)
    latest = np.full(n_cols, -np.inf) if has_order else None
    with open(path, "rb") as source:
        while True:
            records = np.fromfile(source, record, count=chunk_entries)
            if not len(records):
                break
            np.add.at(sums, records["col"], records["value"])
            seen[records["col"]] = True
            if has_order:
                np.maximum.at(latest, records["col"], records["order"])
    indices = np.flatnonzero(seen).astype(np.int32)
    order = latest[indices] if has_order else None
    return np.array([0, len(indices)], np.int64), indices, sums[indices].astype(np.float32), order


def rows_to_csr(records: np.ndarray, row_start: int, row_stop: int, n_cols: int):
    """Records of rows in ``[row_start, row_stop)`` -> (indptr, indices, values, order), duplicates
    summed (order: the latest of them, or None when the records carry no order).

    Entries come out sorted by row, then column; values are summed in float64 then cast.
    """
    n_rows = row_stop - row_start
    has_order = "order" in records.dtype.names
    if not len(records):
        return (np.zeros(n_rows + 1, np.int64), np.empty(0, np.int32), np.empty(0, np.float32),
                np.empty(0, np.float64) if has_order else None)
    keys = (records["row"].astype(np.int64) - row_start) * n_cols + records["col"]
    raw_values = records["value"].copy()
    raw_order = records["order"].copy() if has_order else None
    del records  # the caller holds no other reference: 12 bytes per entry back before sorting
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    starts = np.flatnonzero(first)
    del first
    values = np.add.reduceat(raw_values[order], starts, dtype=np.float64).astype(np.float32)
    latest = np.maximum.reduceat(raw_order[order], starts) if has_order else None
    del raw_values, raw_order, order
    keys = keys[starts]
    rows = keys // n_cols
    indices = (keys - rows * n_cols).astype(np.int32)
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return indptr, indices, values, latest


def _write_ids(group: zarr.Group, name: str, ids: np.ndarray, id_kind: str) -> None:
    if id_kind == "int":
        data = ids.astype(np.int64)
        dtype = np.int64
    else:
        data = np.array([value.decode("utf-8") for value in ids], dtype=np.dtypes.StringDType())
        dtype = str
    array = create_array(group, name, shape=(len(ids),), dtype=dtype, chunks=(max(1, min(len(ids), CSR_CHUNK)),),
                         dense=True)
    if len(ids):
        array[:] = data


def convert(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    store: str | os.PathLike,
    *,
    user_col: str | int = 0,
    item_col: str | int = 1,
    value_col: str | int | None = 2,
    order_col: str | int | None = None,
    delimiter: str = ",",
    header: bool = True,
    id_type: str = "auto",
    on_bad_lines: str = "error",
    memory_budget: int | str | None = None,
    shard_nnz: int | None = None,
    row_block: int = DEFAULT_ROW_BLOCK,
    tmp_dir: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    storage_options: dict | None = None,
) -> ConvertReport:
    """Convert CSV (plain or gzip) or Parquet files of (user, item, value) rows into a store.

    Duplicate (user, item) pairs are summed, explicit zeros dropped; NaN, inf, negative or
    non-numeric values and malformed rows raise ``InputError`` naming file, line and field, or
    are skipped and counted with ``on_bad_lines="skip"``. Input files are only read.
    """
    paths = [os.fspath(inputs)] if isinstance(inputs, (str, os.PathLike)) else [os.fspath(p) for p in inputs]
    for path in paths:
        _check_input_file(path)
    _check_layout_args(row_block, shard_nnz)
    spec = InputSpec(user_col=user_col, item_col=item_col, value_col=value_col, order_col=order_col, delimiter=delimiter,
                     header=header, id_kind=id_type, on_bad_lines=on_bad_lines)
    report = ConvertReport(store=os.fspath(store))
    budget = MemoryBudget.start(memory_budget)
    budget_bytes = budget.allowance
    block_bytes = int(min(64 << 20, max(1 << 20, budget_bytes // 48)))
    reading: list[str] = [paths[0] if paths else ""]
    batches = _located(read_batches(paths, spec, report.bad_rows, block_bytes=block_bytes,
                                    on_file=lambda path: reading.__setitem__(0, path)), reading)
    sources = {
        "inputs": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in paths if os.path.exists(p)],
        "user_col": str(user_col),
        "item_col": str(item_col),
        "value_col": None if value_col is None else str(value_col),
        "order_col": None if order_col is None else str(order_col),
    }
    return write_store(
        batches,
        store,
        memory_budget=budget,
        shard_nnz=shard_nnz,
        row_block=row_block,
        tmp_dir=tmp_dir,
        overwrite=overwrite,
        progress=progress,
        storage_options=storage_options,
        report=report,
        source_attrs=sources,
        inputs=paths,
    )


def _check_input_file(path: str) -> None:
    """An input must be a readable file (checked before anything is written)."""
    if not is_local(path):
        return
    local = path.removeprefix("file://")
    if not os.path.lexists(local):
        raise InputError(path, None, None, "no such file")
    if os.path.isdir(local):
        raise InputError(path, None, None, "is a directory, not an input file")
    if os.path.exists(local) and not os.access(local, os.R_OK):
        raise InputError(path, None, None, "permission denied: the file cannot be read")


def _located(batches: Iterable[RowBatch], reading: list[str]) -> Iterable[RowBatch]:
    """The batches, with a failure to read an input (a truncated gzip, an I/O error) turned into
    an ``InputError`` naming the file being read. Errors of the consumer (writing) pass through."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except WalsError:
            raise
        except (OSError, EOFError, zlib.error, pa.ArrowException) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            if isinstance(exc, EOFError) or any(w in reason.lower() for w in ("gzip", "inflate", "compress", "truncat")):
                reason = f"truncated or corrupt compressed data ({reason})"
            raise InputError(reading[0], None, None, f"unreadable: {reason}") from exc
        yield batch

