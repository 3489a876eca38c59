"""Out-of-core conversion of row batches into an interaction store.

Four streaming passes, each holding at most one batch or one shard in memory:

1. collect: validate input batches, spill them to an Arrow IPC file, gather the distinct ids;
2. map:     sorted distinct ids become the id maps; rows are rewritten as (user, item, value)
            int32/int32/float32 records and entries per row are counted;
3. bucket:  shard bounds are chosen from the counts (balanced nnz, aligned to ``row_block``),
            cut into assembly units that fit the budget, and each record is appended to its
            user unit's and its item unit's bucket file;
4. assemble: each bucket is sorted, duplicates summed, and appended as those rows of the CSR.

When every id of both sides is an integer over a range the memory share can index, pass 1 also
counts each id's entries (a dense table, no sort), so the shards are planned after pass 1 and
passes 2 and 3 are one: each mapped batch goes straight into the bucket files.

The store is built beside its target and swapped in only when complete (``store.lifecycle``),
so a conversion that fails or is killed leaves an existing store as it was.
"""

from __future__ import annotations

import os
import zlib
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import zarr
from tqdm.auto import tqdm

from ..errors import BudgetWarning, SettingError, WalsError
from ..kernels.assemble import (
    bucket_order,
    bucket_scatter,
    bucket_scatter_by_table,
    count_dense_ids,
    csr_by_columns_into,
    csr_from_entries,
    csr_into,
    fill_dense_table,
    id_range,
    map_dense_ids,
    map_dense_offsets,
    segment_sums,
)
from ..kernels.text import parse_ints
from ..memory import HeapGuard, MemoryBudget, format_bytes, peak_rss, release_free_heap, reused_large_buffers
from .format import ID_ARRAYS, CSR_CHUNK, FORMAT_VERSION, INTERACTIONS_KIND, create_array, is_local, subgroup
from .appender import ChunkAppender
from .ids import DistinctIds, IdIndex, as_text, hash_text, text_buffers, write_id_map
from .lifecycle import Output, output_store
from .sources import BadRowReport, InputError, InputSpec, RowBatch, read_batches


_STAGE: ContextVar[str] = ContextVar("wals_ooc_build_stage", default="")  # see build_store(stage=)
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
    names: list = field(default_factory=list)  # a ``names.NamesSummary`` per side given names

    def summary(self) -> str:
        rate = self.rows_read / self.seconds if self.seconds else 0.0
        text = (
            f"{self.store}: {self.n_users} users x {self.n_items} items, nnz {self.nnz} "
            f"from {self.rows_read} rows ({self.duplicates_summed} duplicate pairs summed, "
            f"{self.bad_rows.zeros_dropped} zeros dropped; {self.bad_rows.summary()}) in {self.seconds:.1f}s "
            f"({rate:,.0f} rows/s), peak RSS {format_bytes(self.peak_rss)}; {self.budget}"
        )
        return "\n".join([text] + [names.summary() for names in self.names])


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
    id_type: str | dict[str, str] = "auto",
    source_name: str | None = None,
    inputs: Sequence[str | os.PathLike] = (),
    names: dict | None = None,
) -> ConvertReport:
    """Write validated row batches into an interaction store, out of core.

    memory_budget caps peak RSS (see ``wals_ooc.memory``); shard_nnz overrides the entries per
    shard; row_block is the row alignment of shards (and the factor chunk size in training).
    id_type: "auto", "int" or "str", or a dict of them per side (see ``_id_types``); batches
    carry ids as int64 arrays or as Arrow text. source_name: what errors about the rows name
    (default: the store).
    The store is built beside ``store`` and swapped in when complete (``store.lifecycle``):
    a failure leaves an existing store as it was. inputs: what the batches are read from (the
    store may not be one of them). names: {side: (names file, ``names.NamesSpec``)}, display
    names written into the new store with it (see ``names``).
    """
    store = os.fspath(store)
    _check_layout_args(row_block, shard_nnz)
    id_types = _id_types(id_type)
    # measured once, before the door opens anything (convert passes the budget it started)
    budget = memory_budget if isinstance(memory_budget, MemoryBudget) else MemoryBudget.start(memory_budget)
    with output_store(store, INTERACTIONS_KIND, version=FORMAT_VERSION, overwrite=overwrite, inputs=inputs,
                      storage_options=storage_options, tmp_dir=tmp_dir) as out:
        report = build_store(batches, out, memory_budget=budget, shard_nnz=shard_nnz, row_block=row_block,
                             progress=progress, report=report, source_attrs=source_attrs, id_type=id_types,
                             source_name=source_name)
        if names:
            from .names import NAMES_ATTR, write_side_names

            workspace = out.workspace()
            for side, (path, spec) in names.items():
                holder = subgroup(out.group, ID_ARRAYS[side])
                report.names.append(write_side_names(holder, IdIndex(holder, out.target), side, path, spec, workspace,
                                                     budget.allowance, f"{NAMES_ATTR}-0"))
        return report


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
    id_type: str | dict[str, str] = "auto",
    source_name: str | None = None,
    stage: str | None = None,
) -> ConvertReport:
    """The body of ``write_store``: the four passes, into an output opened by ``store.lifecycle``
    (spill files in its workspace). ``split`` builds its two outputs this way in one transaction.
    memory_budget: a budget, or a ``MemoryBudget`` already started (measured before the door).
    id_type, source_name: as for ``write_store``. stage: what the progress bars call this build
    ("split train": "split train: read", ...; default: the passes' names alone)."""
    token = _STAGE.set(f"{stage}: " if stage else "")
    budget = memory_budget if isinstance(memory_budget, MemoryBudget) else MemoryBudget.start(memory_budget)
    peak_before = peak_rss()
    try:
        # batch buffers and chunk encodes reuse their pages; the guard gives the free ones back
        # whenever the RSS nears the budget (what the passes hold alive is planned within it)
        with reused_large_buffers(budget.allowance), \
                HeapGuard(budget.baseline + budget.allowance * 3 // 4, step=max(1 << 20, budget.allowance // 64)) as guard:
            report = _build_store(batches, out, budget, shard_nnz, row_block, progress, report, source_attrs,
                                  id_type, source_name)
    finally:
        _STAGE.reset(token)
    # never silently: the caller asked for a cap (VmHWM is the process's: it counts only if the
    # build raised it; the guard's samples are the build's own)
    highest = max(guard.highest, report.peak_rss if report.peak_rss > peak_before else 0)
    if highest > budget.total:
        warnings.warn(BudgetWarning(f"{out.target}: peak RSS {format_bytes(highest)} went over the memory budget of "
                                    f"{format_bytes(budget.total)}"), stacklevel=2)
    return report


def _desc(name: str) -> str:
    """A progress bar's name: the pass, after the stage of the build when one is set."""
    return _STAGE.get() + name


def _build_store(batches, out, memory_budget, shard_nnz, row_block, progress, report, source_attrs, id_type,
                 source_name) -> ConvertReport:
    started = time.perf_counter()
    _check_layout_args(row_block, shard_nnz)
    id_types = _id_types(id_type)
    source = source_name or out.target
    budget = memory_budget if isinstance(memory_budget, MemoryBudget) else MemoryBudget.start(memory_budget)
    report = report or ConvertReport(store=out.target)
    report.budget = budget.describe()
    group = out.group
    workspace = _Workspace(out.workspace())
    disable = None if progress is None else not progress
    spill, sides, record = _collect(batches, workspace, budget, report, disable, id_types, source)
    counted = {side: sides[side].finish() for side in ("user", "item")}  # entries per row, when pass 1 counted them
    maps = {}
    for side in ("user", "item"):
        write_id_map(group, ID_ARRAYS[side], sides[side].distinct, id_types[side])
        maps[side] = IdIndex(group[ID_ARRAYS[side]], out.target)
    del sides
    release_free_heap()  # pass 1's batch buffers
    # with each row's entries known from pass 1, the shards are planned now and pass 2 puts each
    # mapped batch straight into its bucket files (no file of mapped records written and read back)
    fused = all(counts is not None for counts in counted.values())
    mapped_paths: list[str] = []
    if fused:
        counts = {side: counted[side] for side in ("user", "item")}
    else:
        counts, mapped_paths = _map_rows(spill, workspace, maps, record, disable, budget.allowance)
    del counted
    report.n_users, report.n_items = maps["user"].n, maps["item"].n
    raw_nnz = int(counts["user"].sum())
    target = shard_nnz or default_shard_nnz(raw_nnz, budget.allowance)
    bounds = {side: plan_shard_bounds(counts[side], row_block, target) for side in ("user", "item")}
    per_entry = ASSEMBLE_BYTES_PER_NNZ + 3 * (record.itemsize - RECORD.itemsize)  # order: kept, sorted, reduced
    unit_nnz = max(1, budget.allowance // (8 * per_entry))  # a quarter of half the allowance: two assemble at once
    units = {side: assembly_units(counts[side], bounds[side], unit_nnz) for side in ("user", "item")}
    bucketer = _Bucketer(workspace, units, record, budget.allowance // 32)
    try:
        if fused:  # counts are used up (counted down to zero) by the check of pass 2
            _map_rows(spill, workspace, maps, record, disable, budget.allowance, bucketer=bucketer, expected=counts)
        else:
            _bucket(mapped_paths, bucketer, budget, record, disable)
    finally:
        bucketer.close()
    release_free_heap()  # pass 2's batch buffers, before the units are assembled
    del counts
    buckets = bucketer.paths
    # the two orientations are assembled at once, each in half the allowance (its units were cut
    # for that): the kernels and the chunk compression release the GIL, so both cores work
    nnz = {}
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="wals-ooc-assemble") as pool:
        futures = {
            side: pool.submit(_assemble, group, orientation, buckets[side], units[side], maps[other].n, record, unit_nnz,
                              budget.allowance // 2, disable, _OverflowNamer(source, side, maps), raw_nnz)
            for side, orientation, other in (("user", "by_user", "item"), ("item", "by_item", "user"))
        }
        for side in ("user", "item"):
            nnz[side] = futures[side].result()
    for side, orientation in (("user", "by_user"), ("item", "by_item")):
        group[orientation].attrs.update({"shard_bounds": [int(b) for b in bounds[side]], "row_block": int(row_block)})
    assert nnz["user"] == nnz["item"], "both orientations must hold the same entries"
    report.nnz = nnz["user"]
    report.duplicates_summed = raw_nnz - report.nnz
    report.seconds = time.perf_counter() - started
    report.peak_rss = peak_rss()
    group.attrs.update(
        {
            "n_users": report.n_users,
            "n_items": report.n_items,
            "nnz": report.nnz,
            "id_kinds": {side: maps[side].kind for side in ("user", "item")},
            "has_order": record is ORDERED_RECORD,
            "store_id": uuid.uuid4().hex,
            "rows_read": report.rows_read,
            "duplicates_summed": report.duplicates_summed,
            "zeros_dropped": report.bad_rows.zeros_dropped,
            "bad_rows_skipped": report.bad_rows.skipped,
            "sources": source_attrs or {},
        }
    )
    return report


ID_TYPES = ("auto", "int", "str")


def _id_types(id_type: str | dict) -> dict[str, str]:
    """Per side id type: "auto" (integers when every id of the whole input is a canonical
    integer, else text), "int" (parse as integers: "007" and "7" are one id) or "str"."""
    types = {"user": id_type, "item": id_type} if isinstance(id_type, str) else dict(id_type)
    for side in ("user", "item"):
        if types.get(side) not in ID_TYPES:
            raise SettingError(f"id_type must be one of {ID_TYPES} (or a dict of them per side), not {types.get(side)!r}",
                               flags={"id_type": "--id-type"})
    return types


SEGMENT_BYTES = 1 << 30  # spill files are cut at about this size: each is deleted once read,
# so the next pass's output replaces them as it grows instead of adding to them (disk peak)


class _Offsets:
    """A spilled batch's integer ids as uint32 offsets from its smallest id (``base``)."""

    def __init__(self, base: int, offsets: np.ndarray):
        self.base, self.offsets = base, offsets

    def ids(self) -> np.ndarray:
        return self.offsets.astype(np.int64) + self.base


@dataclass
class _SpilledBatch:
    """One batch of pass 1 as pass 2 reads it back: ids as ``_Offsets`` (integer sides whose
    batch spans less than 2**32), an int64 or text Arrow array otherwise; values float32."""

    users: Any
    items: Any
    values: np.ndarray
    order: np.ndarray | None

    @property
    def num_rows(self) -> int:
        return len(self.values)


RAW_RING = 4  # raw batches read back into this many reused buffers: ``_ahead`` holds at most three


class _Spill:
    """Validated rows of pass 1, in segments of two kinds: raw, when both sides' ids are integers
    and no order is kept (each batch as uint32 id offsets from the batch's smallest user and
    item id, then float32 values: 12 bytes a row, read back into reused buffers), and Arrow IPC
    otherwise (text ids, ids spanning 2**32 or more, an order column). A new segment starts
    whenever the kind or a side's id type changes (integers until an id that is not a canonical
    integer turns up, then text), and every ``SEGMENT_BYTES``."""

    def __init__(self, workspace: _Workspace, has_order: bool):
        self.workspace, self.has_order = workspace, has_order
        self.segments: list[tuple[str, list[tuple[int, int, int]] | None]] = []  # (path, raw batches or None)
        self.writer: Any = None  # the open Arrow IPC stream writer of the current segment
        self.raw: Any = None  # the open file of the current raw segment
        self.schema: Any = None
        self.written = 0
        self.buffer = np.empty(0, np.uint8)

    def write(self, users, items, values: np.ndarray, order: np.ndarray | None) -> None:
        if order is None and isinstance(users, np.ndarray) and isinstance(items, np.ndarray) and len(values):
            user_low, user_high = (int(v) for v in id_range(users))
            item_low, item_high = (int(v) for v in id_range(items))
            if user_high - user_low < 1 << 32 and item_high - item_low < 1 << 32:
                self._write_raw(users, user_low, items, item_low, values)
                return
        self._write_arrow(users, items, values, order)

    def _write_raw(self, users: np.ndarray, user_low: int, items: np.ndarray, item_low: int,
                   values: np.ndarray) -> None:
        if self.raw is None or self.written >= SEGMENT_BYTES:
            self.close()
            self.segments.append((self.workspace.file(f"rows-{len(self.segments):02d}.raw"), []))
            self.raw = open(self.segments[-1][0], "wb")
            self.written = 0
        n = len(values)
        if len(self.buffer) < 12 * n:  # reused: fresh memory would fault in every page anew
            self.buffer = np.empty(0, np.uint8)
            self.buffer = np.empty(12 * n, np.uint8)
        block = self.buffer[: 12 * n]
        np.subtract(users, user_low, out=block[: 4 * n].view(np.uint32), casting="unsafe")
        np.subtract(items, item_low, out=block[4 * n : 8 * n].view(np.uint32), casting="unsafe")
        block[8 * n :].view(np.float32)[:] = values
        self.raw.write(block.data)
        index = self.segments[-1][1]
        assert index is not None
        index.append((n, user_low, item_low))
        self.written += 12 * n

    def _write_arrow(self, users, items, values: np.ndarray, order: np.ndarray | None) -> None:
        columns = [_as_arrow(users), _as_arrow(items), pa.array(values)]
        fields = [("user", columns[0].type), ("item", columns[1].type), ("value", pa.float32())]
        if self.has_order:
            columns.append(pa.array(order))
            fields.append(("order", pa.float64()))
        schema = pa.schema(fields)
        if self.writer is None or schema != self.schema or self.written >= SEGMENT_BYTES:
            self.close()
            path = self.workspace.file(f"rows-{len(self.segments):02d}.arrow")
            self.writer = pa.ipc.new_stream(pa.OSFile(path, "wb"), schema)
            self.schema = schema
            self.segments.append((path, None))
            self.written = 0
        batch = pa.record_batch(columns, schema=schema)
        self.writer.write_batch(batch)
        self.written += batch.nbytes

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.raw is not None:
            self.raw.close()
            self.raw = None

    def batches(self) -> Iterator[_SpilledBatch]:
        """The batches in the order written. A raw batch's arrays are views of one of
        ``RAW_RING`` buffers, valid until that many more batches have been asked for."""
        ring: list[np.ndarray] = [np.empty(0, np.uint8) for _ in range(RAW_RING)]
        turn = 0
        for path, index in self.segments:
            if index is None:
                with pa.OSFile(path, "rb") as source:
                    for batch in pa.ipc.open_stream(source):
                        yield _SpilledBatch(batch.column(0), batch.column(1), batch.column(2).to_numpy(),
                                            batch.column(3).to_numpy() if self.has_order else None)
            else:
                with open(path, "rb") as source:
                    for n, user_low, item_low in index:
                        if len(ring[turn]) < 12 * n:
                            ring[turn] = np.empty(0, np.uint8)
                            ring[turn] = np.empty(12 * n, np.uint8)
                        block = ring[turn][: 12 * n]
                        turn = (turn + 1) % RAW_RING
                        if source.readinto(block.data) != 12 * n:
                            raise RuntimeError(f"{path}: the spill ends early")
                        yield _SpilledBatch(_Offsets(user_low, block[: 4 * n].view(np.uint32)),
                                            _Offsets(item_low, block[4 * n : 8 * n].view(np.uint32)),
                                            block[8 * n :].view(np.float32), None)
            os.remove(path)


def _as_arrow(ids):
    return pa.array(ids) if isinstance(ids, np.ndarray) else ids


class _DenseCounts:
    """Entries per integer id in a table over the range of ids seen so far (``counts[id -
    lowest]``), while that range fits ``memory_bytes``: the distinct ids and each one's entries
    in one O(n) pass per batch (no sort), and the entries per row that pass 2 would count."""

    def __init__(self, memory_bytes: int):
        self.cap = max(1, memory_bytes // 8)  # table slots (int64 counts)
        self.lowest = 0
        self.counts = np.zeros(0, np.int64)

    def add(self, ids: np.ndarray) -> bool:
        """Count a batch of int64 ids; False (nothing counted) when their range outgrows the share."""
        if not len(ids):
            return True
        low, high = (int(v) for v in id_range(ids))
        have = len(self.counts)
        if not have or low < self.lowest or high >= self.lowest + have:
            new_low = low if not have else min(low, self.lowest)
            new_high = high if not have else max(high, self.lowest + have - 1)
            need = new_high - new_low + 1
            if need > self.cap:
                return False
            slack = min(self.cap - need, need // 2)  # room to grow into: fewer copies of the table
            if have and low < self.lowest:
                new_low = max(-(1 << 63), new_low - slack)
            else:
                new_high = min((1 << 63) - 1, new_high + slack)
            counts = np.zeros(new_high - new_low + 1, np.int64)
            if have:
                counts[self.lowest - new_low : self.lowest - new_low + have] = self.counts
            self.counts, self.lowest = counts, new_low
        count_dense_ids(ids, self.lowest, self.counts)
        return True

    def distinct(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted distinct ids, entries of each)."""
        present = np.flatnonzero(self.counts)
        return present.astype(np.int64) + self.lowest, self.counts[present]


class _SideIds:
    """One side's ids through pass 1: their form (integers or text) and their distinct values.

    With id type "auto" a side stays integer while every id is a canonical integer (the text
    ``str(int(text))`` gives back) and turns to text for good at the first one that is not, so
    the kind is decided by the whole input, the same way at any budget or batch size.
    Integer ids are counted in a dense table (``_DenseCounts``) while their range fits the
    memory share, which also gives each row's entries; past it, or once the side turns to text,
    they go to ``DistinctIds`` (sorted per batch) and pass 2 counts the entries."""

    def __init__(self, side: str, id_type: str, workspace: _Workspace, memory_bytes: int, source: str):
        self.side, self.id_type, self.source = side, id_type, source
        self.kind = "str" if id_type == "str" else "int"
        self.distinct = DistinctIds(self.kind, workspace.path, memory_bytes, side)
        self.dense: _DenseCounts | None = _DenseCounts(memory_bytes) if self.kind == "int" else None

    def _leave_dense(self) -> None:
        """Hand the ids counted so far to ``distinct`` and count no more."""
        if self.dense is not None:
            ids, _ = self.dense.distinct()
            self.dense = None
            if len(ids):
                self.distinct.add(ids)

    def finish(self) -> np.ndarray | None:
        """At the end of pass 1: the entries of each row (the rows in sorted id order, as the id
        map numbers them) when the dense table held the side to the end, else None. Either way
        ``distinct`` then holds every distinct id."""
        if self.dense is None:
            return None
        ids, counts = self.dense.distinct()
        self.dense = None
        if len(ids):
            self.distinct.add(ids)
        return counts

    def take(self, ids) -> np.ndarray | pa.Array:
        """The batch's ids in this side's current form (int64 or large_string), recorded as seen."""
        if self.kind == "int" and not isinstance(ids, np.ndarray):
            text = as_text(ids)
            offsets, data = text_buffers(text)
            values, bad = parse_ints(offsets, data, self.id_type == "auto")
            if bad < 0:
                ids = values
            elif self.id_type == "int":
                raise InputError(self.source, None, self.side, f"non-integer id: {text[bad].as_py()!r} (use --id-type str)")
            else:
                self.kind = "str"
                self._leave_dense()
                self.distinct.to_text()
                ids = text
        if self.kind == "int":
            ids = np.asarray(ids, np.int64)
            if self.dense is not None:
                if self.dense.add(ids):
                    return ids
                self._leave_dense()
        else:
            ids = as_text(ids)
        self.distinct.add(ids)
        return ids


_DONE = object()
_Batch = TypeVar("_Batch")


def _ahead(batches: Iterable[_Batch]) -> Iterator[_Batch]:
    """The batches, each read (and parsed) by a helper thread while the caller handles the one
    before (Arrow's reads and parser and the numba kernels release the GIL, so the two overlap):
    pass 1's input batches, pass 2's spilled ones. At most two batches are held at once; an
    error of the reader is raised here, in the caller, and a caller that stops early stops the
    reader."""
    import queue
    import threading

    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for batch in batches:
                if not put((batch, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # handed to the caller, raised there
            put((None, exc))

    reader = threading.Thread(target=read, name="wals-ooc-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            batch, error = handoff.get()
            if error is not None:
                raise error
            if batch is _DONE:
                return
            yield batch
    finally:
        stop.set()
        reader.join()


def _collect(batches, workspace, budget, report, disable, id_types, source):
    """Pass 1: spill every validated batch to Arrow IPC and gather each side's distinct ids.

    Returns the spill, the two sides' ``_SideIds`` and the record dtype of pass 2."""
    share = max(1 << 20, budget.allowance // 8)
    sides = {side: _SideIds(side, id_types[side], workspace, share, source) for side in ("user", "item")}
    spill = None
    with tqdm(desc=_desc("read"), unit="rows", unit_scale=True, disable=disable) as bar:
        for batch in _ahead(batches):
            if spill is None:
                spill = _Spill(workspace, batch.order is not None)
            users = sides["user"].take(batch.users)
            items = sides["item"].take(batch.items)
            spill.write(users, items, batch.values, batch.order)
            report.rows_read += len(batch)
            bar.update(len(batch))
    if spill is None:
        raise InputError(report.store, None, None, "empty input: no valid rows to convert")
    spill.close()
    return spill, sides, ORDERED_RECORD if spill.has_order else RECORD


class _RowMapper:
    """Original id -> row for pass 2: every id is known to be in the map, so a key lookup is
    exact except for hashes that several ids share (resolved by their bytes). The keys are held
    in memory when they fit ``memory_bytes``, else searched in the map chunk by chunk."""

    hold_keys = True  # tests set it False to run the chunked path on small maps

    def __init__(self, index: IdIndex, memory_bytes: int):
        self.index = index
        self.keys = index.keys() if self.hold_keys and index.n * 8 <= memory_bytes else None
        self.colliding = index._collisions[:, 0] if len(index._collisions) else None
        self.table = None
        if self.keys is not None and index.kind == "int" and len(self.keys):
            # integer ids over a range the memory share can index: one table lookup per id
            self.lowest = int(self.keys[0])
            span = int(self.keys[-1]) - self.lowest + 1
            if span * 4 + self.keys.nbytes <= memory_bytes:
                self.table = np.full(span, -1, np.int32)
                fill_dense_table(self.keys, self.lowest, self.table)

    def rows(self, column: pa.Array | _Offsets, counts: np.ndarray) -> np.ndarray:
        """Rows of the column's ids (int32); adds each row's entries to ``counts``."""
        if self.table is not None:
            if isinstance(column, _Offsets):
                rows, missing = map_dense_offsets(column.offsets, column.base - self.lowest, self.table, counts)
            else:
                rows, missing = map_dense_ids(column.to_numpy(), self.lowest, self.table, counts)
            if missing >= 0:
                raise RuntimeError("an id of the input is missing from the id map being written")
            return rows
        if isinstance(column, _Offsets):
            column = pa.array(column.ids())
        rows = self._rows(column)
        counts += np.bincount(rows, minlength=len(counts))
        return rows

    def _rows(self, column: pa.Array) -> np.ndarray:
        if self.index.kind == "int":
            keys, text = column.to_numpy(), None
        else:
            text = as_text(column)
            keys = hash_text(text)
        if self.keys is not None:
            # the needles in order, so each binary search starts where the last one ended and
            # reads keys already in cache: 8x faster than random needles once the keys outgrow
            # the cache (6M ids: 1.9 s -> 0.23 s per 1M lookups)
            order = np.argsort(keys)
            rows = np.empty(len(keys), np.intp)
            rows[order] = np.searchsorted(self.keys, keys[order])
            found = rows < len(self.keys)
            found[found] = self.keys[rows[found]] == keys[found]
        else:
            order = np.argsort(keys, kind="stable")
            rows_sorted, found_sorted = self.index.positions(keys[order])
            rows, found = np.empty_like(rows_sorted), np.empty_like(found_sorted)
            rows[order], found[order] = rows_sorted, found_sorted
        if not found.all():
            raise RuntimeError("an id of the input is missing from the id map being written")
        if self.colliding is not None:
            shared = np.flatnonzero(np.isin(keys, self.colliding))
            if len(shared):
                assert text is not None, "hash collisions exist among text ids only"
                rows[shared] = self.index.index_of(text.take(pa.array(shared)))
        return rows.astype(np.int32)


def _map_rows(spill, workspace, maps, record, disable, allowance, bucketer: _Bucketer | None = None,
              expected: dict[str, np.ndarray] | None = None):
    """Pass 2: original ids -> row indices, written as fixed-size records; count entries per row.

    With a ``bucketer`` (the shards planned from the entries per row pass 1 counted, given as
    ``expected``) each batch's records go straight to their bucket files instead, and the
    counts are checked against ``expected``."""
    mappers = {side: _RowMapper(maps[side], allowance // 8) for side in ("user", "item")}
    if expected is not None:  # counted down to zero in place (the shards are planned: no second array)
        counts = {side: np.negative(expected[side], out=expected[side]) for side in ("user", "item")}
    else:
        counts = {side: np.zeros(maps[side].n, np.int64) for side in ("user", "item")}
    mapped_paths: list[str] = []
    sink = None
    # two record buffers in turn, reused (fresh memory would fault in every page anew): a batch
    # is mapped into one while the other's records are still being bucketed
    buffers = [np.empty(0, record), np.empty(0, record)]
    turn = 0
    bucketing: list = []  # the bucketer's work on the batch before, running meanwhile
    with tqdm(desc=_desc("map ids" if bucketer is None else "map ids and bucket"), unit="rows", unit_scale=True,
              disable=disable) as bar, \
            ThreadPoolExecutor(max_workers=3, thread_name_prefix="wals-ooc-map") as pool:
        for batch in _ahead(spill.batches()):  # the next batch read while this one is mapped
            if bucketer is None and (sink is None or sink.tell() >= SEGMENT_BYTES):
                if sink is not None:
                    sink.close()
                mapped_paths.append(workspace.file(f"rows-{len(mapped_paths):05d}.records"))
                sink = open(mapped_paths[-1], "wb")
            if len(buffers[turn]) < batch.num_rows:
                buffers[turn] = np.empty(0, record)
                buffers[turn] = np.empty(batch.num_rows, record)
            records = buffers[turn][: batch.num_rows]
            turn ^= 1
            # the items are mapped in a helper thread while this one maps the users (the kernels release the GIL)
            items = pool.submit(_map_into, mappers["item"], batch.items, counts["item"], records["col"])
            records["row"] = mappers["user"].rows(batch.users, counts["user"])
            records["value"] = batch.values
            items.result()
            if "order" in record.names:
                records["order"] = batch.order
            if bucketer is not None:
                for future in bucketing:  # in batch order: the files get the records in input order
                    future.result()
                bucketing = bucketer.submit(records, pool)
            elif sink is not None:
                records.tofile(sink)
            bar.update(batch.num_rows)
        for future in bucketing:
            future.result()
    if sink is not None:
        sink.close()
    if expected is not None and any(counts[side].any() for side in ("user", "item")):
        raise RuntimeError("the entries per row of pass 2 differ from those pass 1 counted")
    return counts, mapped_paths


def _map_into(mapper: _RowMapper, column, counts: np.ndarray, out: np.ndarray) -> None:
    """``mapper.rows`` of the column, stored into ``out`` (a field of the records) by the thread
    that mapped them."""
    out[:] = mapper.rows(column, counts)


def _mapped_chunks(mapped_paths: list[str], record: np.dtype, chunk_rows: int) -> Iterator[np.ndarray]:
    """The records of pass 2, ``chunk_rows`` at a time; each segment is deleted once read. The
    chunks are read into one buffer (each is valid until the next is asked for): reading into
    fresh memory would fault in every page of every chunk anew."""
    buffer = np.empty(chunk_rows, record)
    raw = buffer.view(np.uint8)
    for path in mapped_paths:
        with open(path, "rb") as source:
            while True:
                got = source.readinto(raw.data) // record.itemsize
                if not got:
                    break
                yield buffer[:got]
        os.remove(path)


OPEN_BUCKETS = 512  # bucket files kept open through pass 2 at most (both sides)


class _Bucketer:
    """Pass 3's bucket files: each record appended to its user unit's and its item unit's file
    (the two sides in two threads: the sort kernel and the file writes release the GIL)."""

    def __init__(self, workspace: _Workspace, bounds: dict[str, list[int]], record: np.dtype, table_bytes: int = 0):
        self.record = record
        self.ordered = record.names is not None and "order" in record.names
        self.paths = {
            side: [workspace.file(f"{side}-{k:06d}.records") for k in range(len(bounds[side]) - 1)]
            for side in ("user", "item")
        }
        self.starts = {side: np.asarray(bounds[side], np.int64) for side in ("user", "item")}
        # each row's unit, when the table is small (int32 per row, at most table_bytes a side): a
        # lookup per record instead of a search among the units' bounds
        self.shard_of: dict[str, np.ndarray | None] = {
            side: np.repeat(np.arange(len(starts) - 1, dtype=np.int32), np.diff(starts))
            if 4 * int(starts[-1]) <= table_bytes else None
            for side, starts in self.starts.items()
        }
        self.grouped_buffers: dict[str, np.ndarray] = {}  # one per side, reused from chunk to chunk
        # the files stay open from batch to batch (an open and a close per unit and batch cost
        # more than the writes of small units) while there are at most OPEN_BUCKETS of them
        self.sinks: dict[str, dict[int, Any]] | None = \
            {"user": {}, "item": {}} if sum(len(p) for p in self.paths.values()) <= OPEN_BUCKETS else None

    def add(self, records: np.ndarray, pool: ThreadPoolExecutor) -> None:
        for future in self.submit(records, pool):
            future.result()

    def submit(self, records: np.ndarray, pool: ThreadPoolExecutor) -> list:
        """``add`` without waiting: the futures of the two sides' work, to be waited for before
        the next records are given (each side reuses one buffer, and files keep input order)."""
        return [pool.submit(self.spread, records, side) for side in ("user", "item")]

    def spread(self, records: np.ndarray, side: str) -> None:
        record, starts, paths = self.record, self.starts[side], self.paths[side]
        first, second = ("row", "col") if side == "user" else ("col", "row")
        if self.ordered:
            order, cuts = bucket_order(np.ascontiguousarray(records[first]), starts)  # stable counting sort
            grouped = records[order]
            del order
            if side == "item":
                grouped = _swap_row_col(grouped)
        else:  # the same stable counting sort, moving the fields themselves
            if len(self.grouped_buffers.get(side, ())) < len(records):
                self.grouped_buffers[side] = np.empty(0, record)
                self.grouped_buffers[side] = np.empty(len(records), record)
            grouped = self.grouped_buffers[side][: len(records)]
            table = self.shard_of[side]
            if table is not None:
                cuts = bucket_scatter_by_table(records[first], records[second], records["value"], table, len(paths),
                                               grouped["row"], grouped["col"], grouped["value"])
            else:
                cuts = bucket_scatter(records[first], records[second], records["value"], starts, grouped["row"],
                                      grouped["col"], grouped["value"])
        sinks = self.sinks[side] if self.sinks is not None else None
        for k in range(len(paths)):
            if cuts[k + 1] > cuts[k]:
                piece = grouped[cuts[k] : cuts[k + 1]].view(np.uint8).data
                if sinks is None:
                    with open(paths[k], "ab") as once:
                        once.write(piece)
                else:
                    if k not in sinks:
                        sinks[k] = open(paths[k], "ab")
                    sinks[k].write(piece)

    def close(self) -> None:
        """Close the bucket files kept open (before they are read)."""
        for sinks in (self.sinks or {}).values():
            for sink in sinks.values():
                sink.close()
            sinks.clear()


def _bucket(mapped_paths, bucketer: _Bucketer, budget, record, disable) -> None:
    """Pass 3: the records of pass 2's files into the bucket files."""
    chunk_rows = max(1 << 14, budget.allowance // (16 * record.itemsize))
    total = sum(os.path.getsize(path) for path in mapped_paths) // record.itemsize
    with tqdm(desc=_desc("bucket"), total=total, unit="rows", unit_scale=True, disable=disable) as bar, \
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="wals-ooc-bucket") as pool:
        for records in _mapped_chunks(mapped_paths, record, chunk_rows):
            bucketer.add(records, pool)
            bar.update(len(records))


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


class _OverflowNamer:
    """The error for a sum of duplicates beyond float32's range, naming the (user, item) pair."""

    def __init__(self, source: str, side: str, maps: dict[str, IdIndex]):
        self.source, self.side, self.maps = source, side, maps

    def check(self, row_start: int, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
        bad = np.flatnonzero(~np.isfinite(values))
        if not len(bad):
            return
        entry = int(bad[0])
        row = row_start + int(np.searchsorted(indptr, entry, side="right")) - 1
        other = "item" if self.side == "user" else "user"
        ids = {self.side: self.maps[self.side].ids_of([row])[0], other: self.maps[other].ids_of([int(indices[entry])])[0]}
        raise InputError(self.source, None, None,
                         f"the values of user {ids['user']!r} and item {ids['item']!r} sum to more than float32 holds "
                         f"({float(np.finfo(np.float32).max):.4g}); scale the values down")


def _assemble(group, orientation, bucket_paths, bounds, n_cols, record, unit_nnz, allowance, disable,
              overflow: _OverflowNamer | None = None, capacity: int = 0) -> int:
    """Pass 4: sort each unit's bucket, sum duplicates, and append its CSR rows to the store.

    A unit is at most ``unit_nnz`` entries unless it is one row with more (a very popular item):
    that row is summed in chunks into a dense accumulator over the columns instead. Either way
    duplicates are summed in float64 in input order, so the store does not depend on the budget.
    capacity: the entries before duplicates are summed (an upper bound of what is written).
    """
    n_rows = bounds[-1]
    csr = group.create_group(orientation)
    indptr_out = ChunkAppender(_csr_array(csr, "indptr", n_rows + 1, np.int64), start=1)  # [0] is fill 0
    # sized once to the entries before duplicates are summed and cut to the end on close: no
    # resize (a metadata write) per append
    indices_out = ChunkAppender(_csr_array(csr, "indices", capacity, np.int32), trim=True)
    values_out = ChunkAppender(_csr_array(csr, "values", capacity, np.float32), trim=True)
    order_out = ChunkAppender(_csr_array(csr, "order", capacity, np.float64), trim=True) \
        if "order" in record.names else None
    offset = 0
    sizes = [os.path.getsize(path) // record.itemsize if os.path.exists(path) else 0 for path in bucket_paths]

    def dense(k: int) -> bool:  # a row too long for a unit, summed into per-column accumulators
        return sizes[k] > unit_nnz and bounds[k + 1] - bounds[k] == 1 and n_cols * DENSE_ROW_BYTES <= allowance // 2

    # the working arrays are made once, at the largest unit's size: grown unit by unit, each
    # smaller one left behind would stay resident in malloc's heap (not planned in the budget)
    work = _Buffers(entries=max((n for k, n in enumerate(sizes) if not dense(k)), default=0),
                    rows=max((bounds[k + 1] - bounds[k] for k in range(len(sizes))), default=0) + 1)
    for k, path in enumerate(tqdm(bucket_paths, desc=_desc(f"assemble {orientation}"), unit="shards", disable=disable)):
        entries = sizes[k]
        if dense(k):
            indptr, indices, values, order = dense_row_to_csr(path, record, n_cols, unit_nnz)
        else:
            if entries > 2 * unit_nnz:
                warnings.warn(BudgetWarning(
                    f"row {bounds[k]} of {orientation} has {entries} entries, more than its columns' dense "
                    f"accumulator allows in the budget: assembling it in memory may exceed memory_budget"),
                    stacklevel=2)
            if entries and "order" not in record.names:
                # the file's pages mapped, not copied (copy-on-write, so the arrays are writable
                # as the kernels were compiled for; nothing writes them)
                mapped = np.memmap(path, record, mode="c", shape=(entries,)).view(np.ndarray)
                indptr, indices, values, order = rows_to_csr(mapped, bounds[k], bounds[k + 1], n_cols, work)
                del mapped  # unmapped here: nothing else refers to it
            else:  # passed without a name, so rows_to_csr can free the records once it has read them
                indptr, indices, values, order = rows_to_csr(
                    np.fromfile(path, record) if entries else np.empty(0, record), bounds[k], bounds[k + 1], n_cols
                )
        if os.path.exists(path):
            os.remove(path)
        if overflow is not None:
            overflow.check(bounds[k], indptr, indices, values)
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
    has_order = record.names is not None and "order" in record.names
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
            if latest is not None:  # has_order
                np.maximum.at(latest, records["col"], records["order"])
    indices = np.flatnonzero(seen).astype(np.int32)
    order = latest[indices] if latest is not None else None
    with np.errstate(over="ignore"):  # a sum beyond float32 becomes inf, which the caller reports
        values = sums[indices].astype(np.float32)
    return np.array([0, len(indices)], np.int64), indices, values, order


class _Buffers:
    """Working arrays kept from one assembly unit to the next, grown as needed: fresh memory
    would fault in every page anew for every unit."""

    def __init__(self, entries: int = 0, rows: int = 0) -> None:
        """entries, rows: the largest unit's entries and rows + 1, if known: arrays of either
        length are made that long at once (``get(..., per=)``), never grown."""
        self.arrays: dict[str, np.ndarray] = {}
        self.least = {"entries": entries, "rows": rows}

    def get(self, name: str, size: int, dtype, per: str = "") -> np.ndarray:
        """An array ``name`` of ``size`` (its first ``size`` elements); per="entries" or
        "rows": made at least as long as the largest unit needs."""
        array = self.arrays.get(name)
        if array is None or len(array) < size or array.dtype != dtype:
            self.arrays.pop(name, None)  # the old one is freed before the new one is made
            array = self.arrays[name] = np.empty(max(size, self.least.get(per, 0)), dtype)
        return array[:size]


def rows_to_csr(records: np.ndarray, row_start: int, row_stop: int, n_cols: int, work: _Buffers | None = None):
    """Records of rows in ``[row_start, row_stop)`` -> (indptr, indices, values, order), duplicates
    summed (order: the latest of them, or None when the records carry no order).

    Entries come out sorted by row, then column; values are summed in float64 in input order
    (the order of the records) then cast (a sum beyond float32 becomes inf).
    """
    n_rows = row_stop - row_start
    has_order = records.dtype.names is not None and "order" in records.dtype.names
    if not len(records):
        return (np.zeros(n_rows + 1, np.int64), np.empty(0, np.int32), np.empty(0, np.float32),
                np.empty(0, np.float64) if has_order else None)
    if not has_order and work is not None:  # the same, into the caller's buffers
        n = len(records)
        values_dtype = records.dtype["value"]
        indptr = work.get("indptr", n_rows + 1, np.int64, "rows")
        indices, sums = work.get("indices", n, np.int32, "entries"), work.get("sums", n, np.float64, "entries")
        counts = work.get("counts", n_rows + 1, np.int64, "rows")
        row_cols, row_values = work.get("row_cols", n, np.int32, "entries"), work.get("row_values", n, values_dtype, "entries")
        if n_cols <= n // 2:  # two counting sorts (by column, then row): the column table is small beside the unit
            out = csr_by_columns_into(records["row"], records["col"], records["value"], row_start, n_rows, n_cols,
                                      work.get("col_counts", n_cols + 1, np.int64),
                                      work.get("col_rows", n, np.int32, "entries"),
                                      work.get("col_values", n, values_dtype, "entries"), counts, row_cols, row_values,
                                      indptr, indices, sums)
        else:
            out = csr_into(records["row"], records["col"], records["value"], row_start, n_rows, n_cols, counts,
                           row_cols, row_values, indptr, indices, sums)
        values = work.get("values", out, np.float32, "entries")
        with np.errstate(over="ignore"):
            np.copyto(values, sums[:out], casting="unsafe")
        return indptr, indices[:out], values, None
    if not has_order:  # one counting sort by row, a stable sort of each row's columns (numba)
        indptr, indices, sums = csr_from_entries(records["row"], records["col"], records["value"], row_start, n_rows,
                                               n_cols)
        del records
        with np.errstate(over="ignore"):
            return indptr, indices, sums.astype(np.float32), None
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
    with np.errstate(over="ignore"):
        values = segment_sums(raw_values[order], starts).astype(np.float32)
    latest = np.maximum.reduceat(raw_order[order], starts) if has_order else None
    del raw_values, raw_order, order
    keys = keys[starts]
    rows = keys // n_cols
    indices = (keys - rows * n_cols).astype(np.int32)
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return indptr, indices, values, latest


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
    item_names: str | os.PathLike | None = None,
    user_names: str | os.PathLike | None = None,
    names_options: dict | None = None,
) -> ConvertReport:
    """Convert CSV (plain or gzip) or Parquet files of (user, item, value) rows into a store.

    Duplicate (user, item) pairs are summed, explicit zeros dropped; NaN, inf, negative or
    non-numeric values, values or sums beyond float32 and malformed rows raise ``InputError``
    naming file, line and field (or the pair), or are skipped and counted with
    ``on_bad_lines="skip"``. Input files are only read; the store is the same at any budget.

    id_type: "auto" makes a side's ids integers when every id of that column in the whole input
    is a canonical integer (its text is ``str(int(text))``: no leading zeros, sign or spaces),
    else keeps them as text, so "007" and "7" stay two ids; "int" parses them as integers
    ("007" and "7" are one id); "str" keeps text. A dict gives it per side.

    item_names, user_names: names files (one row per id: id and display name) stored with the
    ids (see ``wals_ooc.add_names``, which adds them to a store already written);
    names_options: how to read them (``id_col``, ``name_col``, ``delimiter``, ``encoding``,
    ``quote``, ``header``: see ``names.NamesSpec``).
    """
    paths = [os.fspath(inputs)] if isinstance(inputs, (str, os.PathLike)) else [os.fspath(p) for p in inputs]
    for path in paths:
        _check_input_file(path)
    _check_layout_args(row_block, shard_nnz)
    spec = InputSpec(user_col=user_col, item_col=item_col, value_col=value_col, order_col=order_col, delimiter=delimiter,
                     header=header, id_kind=id_type, on_bad_lines=on_bad_lines)
    report = ConvertReport(store=os.fspath(store))
    budget = MemoryBudget.start(memory_budget)  # first: what is imported below counts against the budget
    names = {}
    if item_names is not None or user_names is not None:
        from .names import NamesSpec

        names_spec = NamesSpec(**(names_options or {}))
        names = {side: (os.fspath(path), names_spec) for side, path in (("item", item_names), ("user", user_names))
                 if path is not None}
        for path, _ in names.values():
            _check_input_file(path)
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
        id_type=id_type,
        source_name=paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more inputs)",
        inputs=paths + [path for path, _ in names.values()],
        names=names,
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

