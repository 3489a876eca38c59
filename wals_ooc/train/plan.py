"""Planning a half-sweep: which tasks, how the fixed side is reached, and what memory each needs.

Pure functions of the store's metadata, the config and the budget: the plan can be printed and
tested without running anything (the rechunker habit). Two ways to reach the fixed factors:

- "resident": the whole fixed side is read once per process and shared by its task threads;
  rows are solved with CG or Cholesky against it. Chosen when it fits in the allowance. A local
  run also holds the solved side when both fit (``holds_own``), so nothing is read back.
- "blocked": the fixed side does not fit. Each process copies it once into a local scratch file
  (decompressed), and tasks sweep it in windows of ``block_rows`` rows mapped from the page
  cache (see ``fixed_side``: a sweep costs ~20 ms of CPU a GB, and counts one window in the
  RSS). Blocked tasks sweep one at a time per process, their rows spread over its threads, so
  each sweep serves all of them; meanwhile the next task reads its entries and starting rows
  (counted in ``task_bytes``). A task is one of:
  "expanded": the task marks the distinct fixed rows its entries use (a bit a fixed row) and
  one sweep copies them, in column order, into a compact array (f numbers a distinct column:
  at most one an entry); the resident kernels then solve against it with the entries
  renumbered, the same arithmetic as the resident plan;
  "cg": for a row block too heavy to expand, CG with one sweep per pass (4f numbers a row,
  ``1 + cg_steps`` sweeps); "cholesky": f x f normal equations accumulated for ``row_batch``
  rows at a time, one sweep per batch. The "ialspp" solver runs only as "expanded" tasks (its
  row state lives in the kernel's cache of predictions), and a blocked plan whose tasks cannot
  all expand raises SettingError rather than silently solving with another method.

``fixed_passes`` is how many times a half-sweep reads the whole fixed side (blocked: sweeps of
the scratch copies); the executor counts what it reads, and tests hold the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from ..errors import SettingError
from ..kernels.solve import GATHER_MAX_ENTRIES, gathers_half
from ..memory import format_bytes

# working bytes per stored entry in a task: indices + values as read, zarr decode buffers, and
# the per-entry arrays a kernel call touches
BYTES_PER_ENTRY = 24
# what a plan leaves of the allowance for Zarr's decode buffers, allocator slack and Dask: a
# share, and at least a fixed amount (measured: a plan of 45 MiB in 64 MiB peaked at 74 MiB,
# so small allowances keep half; large ones peak at a fixed overhead plus a few percent)
PLAN_HEADROOM = 0.2
PLAN_RESERVE = 64 << 20
# bytes of fixed factors a blocked task reads at a time: a block is swept by every row of the
# task before the next is read, so it should stay in the last-level cache (measured in
# tools/bench_scale.py --blocked)
BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class SolveTask:
    """Rows ``[row_start, row_stop)`` of one side, solved by one Dask task."""

    shard: int
    part: int
    row_start: int
    row_stop: int
    nnz: int
    method: str = "resident"  # blocked tasks: "expanded", "cg" or "cholesky" (see the module docstring)
    sweeps: int = 0  # sweeps of the fixed side (blocked tasks)

    @property
    def name(self) -> str:
        return f"shard{self.shard:05d}" + (f".{self.part}" if self.part else "")


@dataclass
class HalfSweepPlan:
    """Everything a half-sweep executor needs to run one side within the budget."""

    side: str
    fixed_side: str
    n_rows: int
    n_fixed: int
    factors: int
    mode: str  # "resident" or "blocked"
    solver: str  # the solver actually used: "cg" or "cholesky"
    tasks: list[SolveTask]
    concurrency: int
    resident_bytes: int  # factor sides held whole in memory ("resident" mode)
    block_rows: int  # rows of the fixed side per streamed block ("blocked" mode)
    row_batch: int  # rows whose normal equations are held at once (blocked Cholesky)
    task_bytes: int  # the most one running task needs
    spare_bytes: int  # what is left of the usable allowance (the shard cache may take it)
    allowance: int
    notes: list[str] = field(default_factory=list)
    holds_own: bool = False  # resident and local: the solved side is held in memory too
    fixed_passes: int = 1  # reads of the whole fixed side per half-sweep (see the module docstring)
    task_threads: int = 1  # threads one task spreads its rows over (blocked CG: all of the process's)
    itemsize: int = 4

    @property
    def fixed_bytes(self) -> int:
        """Bytes of the whole fixed side."""
        return self.n_fixed * self.factors * self.itemsize

    @property
    def peak_bytes(self) -> int:
        """Planned peak above the baseline, not counting the shard cache."""
        return self.resident_bytes + self.concurrency * self.task_bytes

    @property
    def usable_bytes(self) -> int:
        """What the plan may commit of the allowance (the rest is headroom; see ``usable_bytes``)."""
        return usable_bytes(self.allowance)

    @property
    def within_budget(self) -> bool:
        """The planned peak fits in the usable part of the allowance."""
        return self.peak_bytes <= self.usable_bytes

    @property
    def task_rows(self) -> tuple[int, int]:
        """Fewest and most rows of a task (0, 0 without tasks)."""
        rows = [t.row_stop - t.row_start for t in self.tasks]
        return (min(rows), max(rows)) if rows else (0, 0)

    def budget_problem(self) -> str | None:
        """Why the plan does not fit its allowance, and what to change; None when it fits."""
        if self.within_budget:
            return None
        return (f"the {self.side} half-sweep plans a peak of {format_bytes(self.peak_bytes)} against "
                f"{format_bytes(self.usable_bytes)} usable of its {format_bytes(self.allowance)} allowance "
                f"(its heaviest task, a run of whole row blocks, needs {format_bytes(self.task_bytes)}): training may exceed "
                "memory_budget; raise memory_budget, or convert with a smaller row_block")

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        least, most = self.task_rows
        lines = [
            f"{self.side} half-sweep: {_count(len(self.tasks), 'task')} over {self.n_rows} rows ({least}-{most} rows a task)"
            + (f" ({self.concurrency} at a time, {self.task_threads} threads each)" if self.task_threads > 1 else "")
            + "; fixed side "
            f"{self.fixed_side} ({self.n_fixed} x {self.factors}) {self.mode}; solver {self.solver}",
            f"  planned peak {format_bytes(self.peak_bytes)} of {format_bytes(self.usable_bytes)} usable "
            f"(allowance {format_bytes(self.allowance)}; {'within' if self.within_budget else 'OVER'} budget): "
            f"{_count(self.concurrency, 'concurrent task')} of at most {format_bytes(self.task_bytes)}, "
            f"resident factors {format_bytes(self.resident_bytes)}",
        ]
        if self.mode == "resident":
            held = "both sides held" if self.holds_own else f"{self.side} factors read and written per task"
            lines.append(f"  fixed side ({format_bytes(self.fixed_bytes)}) read once per process and shared by its tasks; {held}")
        else:
            methods: dict[str, tuple[int, int]] = {}  # method -> (tasks, sweeps)
            for task in self.tasks:
                count, sweeps = methods.get(task.method, (0, 0))
                methods[task.method] = (count + 1, sweeps + task.sweeps)
            how = ", ".join(f"{count} {method} ({sweeps} sweeps)" for method, (count, sweeps) in methods.items())
            lines.append(
                f"  fixed side ({format_bytes(self.fixed_bytes)}) copied once per process to a local scratch file, then read "
                f"{self.fixed_passes} times in windows of {self.block_rows} rows mapped from the page cache "
                f"({format_bytes(self.fixed_passes * self.fixed_bytes)} per half-sweep); tasks: {how}; "
                "the next task reads its entries while one sweeps"
            )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass
class TrainingPlan:
    """What a training run would do: both half-sweep plans, and the budget and executor they
    were made for (``WALS.plan``, ``wals-ooc train --dry-run``). Making it runs and writes nothing."""

    store: str
    model: str | None  # where ``fit`` would write (None: not asked)
    model_state: str  # "new", or what the existing model holds (it is resumed)
    executor: str
    budget: int  # the cap on peak RSS, bytes
    baseline: int  # the process's RSS when the plan was made (libraries and kernels loaded)
    iterations: int
    user: HalfSweepPlan
    item: HalfSweepPlan

    @property
    def sides(self) -> dict[str, HalfSweepPlan]:
        return {"user": self.user, "item": self.item}

    def __getitem__(self, side: str) -> HalfSweepPlan:
        return self.sides[side]

    @property
    def allowance(self) -> int:
        return self.budget - self.baseline

    @property
    def within_budget(self) -> bool:
        return self.user.within_budget and self.item.within_budget

    def __str__(self) -> str:
        lines = [f"plan: train {self.store}" + (f" -> {self.model} ({self.model_state})" if self.model else ""),
                 f"  {self.iterations} iterations on {self.executor}; memory budget {format_bytes(self.budget)} "
                 f"(process at start {format_bytes(self.baseline)}, allowance {format_bytes(self.allowance)} a process)"]
        for plan in (self.user, self.item):
            lines += ["  " + line for line in plan.describe().splitlines()]
        lines.append("  within budget" if self.within_budget else "  OVER BUDGET: " + "; ".join(
            p.budget_problem() or "" for p in (self.user, self.item) if not p.within_budget))
        return "\n".join(lines)


def split_rows(block_starts: np.ndarray, block_weight: np.ndarray, row_stop: int, max_weight: int) -> list[tuple[int, int]]:
    """Cut a shard into row ranges of whole blocks weighing at most ``max_weight`` where possible."""
    ranges = []
    start, acc = int(block_starts[0]), 0
    for k, weight in enumerate(block_weight):
        if acc and acc + weight > max_weight:
            ranges.append((start, int(block_starts[k])))
            start, acc = int(block_starts[k]), 0
        acc += int(weight)
    ranges.append((start, row_stop))
    return ranges


def _tasks(shard_ranges, shard_block_nnz, bytes_per_row: int, max_task_bytes: int) -> tuple[list[SolveTask], int]:
    """Tasks no heavier than ``max_task_bytes`` where a row block allows, and the heaviest one's bytes."""
    tasks, heaviest = [], 0
    for k, ((lo, hi), (starts, nnz)) in enumerate(zip(shard_ranges, shard_block_nnz)):
        if hi == lo:
            continue
        rows_per_block = np.diff(np.append(starts, hi))
        weight = nnz * BYTES_PER_ENTRY + rows_per_block * bytes_per_row
        for part, (start, stop) in enumerate(split_rows(starts, weight, hi, max(1, max_task_bytes))):
            inside = (starts >= start) & (starts < stop)
            tasks.append(SolveTask(k, part, start, stop, int(nnz[inside].sum())))
            heaviest = max(heaviest, int(weight[inside].sum()))
    return tasks, heaviest


def balanced_tasks(shard_ranges, shard_block_nnz, entry_bytes: int, bytes_per_row: int, max_task_bytes: int,
                   multiple: int = 1, block_extra: list[np.ndarray] | None = None) -> tuple[list[SolveTask], int]:
    """As few tasks as fit in ``max_task_bytes`` (a multiple of ``multiple``), of about equal
    weight, each a run of whole row blocks that may span shards; and the heaviest one's bytes.

    A block heavier than ``max_task_bytes`` on its own is a task alone, and the runs of blocks
    between such blocks are balanced each on its own (one heavy block does not cut every other
    task down to one block). The "blocks" are whatever ``shard_block_nnz`` lists: row blocks, or
    pieces of them (``row_pieces``).

    For the blocked plan, where every task reads the whole fixed side a few times: fewer tasks
    mean fewer reads, and equal ones keep every process busy to the end. ``block_extra``: bytes
    a block takes beyond its entries and rows (one array a shard, as ``shard_block_nnz``).
    """
    # per row block of every shard: first row, entries, planned bytes, shard
    block_parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [], [])
    for k, ((lo, hi), (block_starts, block_nnz)) in enumerate(zip(shard_ranges, shard_block_nnz)):
        if hi == lo:
            continue
        rows = np.diff(np.append(block_starts, hi))
        block_parts[0].append(block_starts)
        block_parts[1].append(block_nnz)
        block_parts[2].append(block_nnz * entry_bytes + rows * bytes_per_row + (0 if block_extra is None else block_extra[k]))
        block_parts[3].append(np.full(len(block_starts), k))
    if not block_parts[0]:
        return [], 0
    starts, nnz, weights, shard_of = (np.concatenate(a) for a in block_parts)
    n_rows = shard_ranges[-1][1]
    alone = np.flatnonzero(weights > max_task_bytes)
    if len(alone) == 0:
        bounds = _balanced_bounds(weights, max_task_bytes, multiple)
    else:
        pieces = [np.zeros(1, np.int64)]
        edges = np.concatenate([[-1], alone, [len(weights)]])
        for a, b in zip(edges[:-1], edges[1:]):  # the run of blocks between two heavy ones, then the heavy one
            if b - a > 1:
                pieces.append(a + 1 + _balanced_bounds(weights[a + 1:b], max_task_bytes, 1)[1:])
            if b < len(weights):
                pieces.append(np.array([b + 1]))
        bounds = np.unique(np.concatenate(pieces))
    heaviest = max(int(weights[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:]))
    tasks: list[SolveTask] = []
    parts: dict[int, int] = {}  # shard -> its last part number
    for a, b in zip(bounds[:-1], bounds[1:]):
        shard = int(shard_of[a])
        part = parts[shard] = parts.get(shard, -1) + 1
        stop = int(starts[b]) if b < len(starts) else n_rows
        tasks.append(SolveTask(shard, part, int(starts[a]), stop, int(nnz[a:b].sum())))
    return tasks, heaviest


def _balanced_bounds(weights: np.ndarray, max_bytes: int, multiple: int) -> np.ndarray:
    """Cuts of ``weights`` (each at most ``max_bytes``) into about equal runs of at most ``max_bytes``
    (a multiple of ``multiple`` of them where that allows): [0, cuts..., len(weights)]."""
    total = int(weights.sum())
    count = max(1, -(-total // max(1, max_bytes)), int(multiple))
    count = min(len(weights), -(-count // multiple) * multiple)
    cumulative = np.cumsum(weights)
    while True:
        # cut before the block where the running weight passes each k/count of the total
        cuts = np.unique(np.searchsorted(cumulative, total * np.arange(1, count) / count, side="left") + 1)
        cuts = cuts[(cuts > 0) & (cuts < len(weights))]
        bounds = np.concatenate([[0], cuts, [len(weights)]]).astype(np.int64)
        heaviest = max(int(weights[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:]))
        if heaviest <= max_bytes:
            return bounds
        if count >= len(weights):  # equal shares cannot separate uneven blocks: fill runs in order instead
            return _greedy_bounds(cumulative, max_bytes)
        count = min(len(weights), count + multiple)


def _greedy_bounds(cumulative: np.ndarray, max_bytes: int) -> np.ndarray:
    """Runs filled in order up to ``max_bytes`` (a block heavier alone is a run alone), from the
    running weight ``cumulative``: [0, cuts..., len(cumulative)]."""
    bounds, at = [0], 0
    while at < len(cumulative):
        before = int(cumulative[at - 1]) if at else 0
        at = max(at + 1, int(np.searchsorted(cumulative, before + max_bytes, side="right")))
        bounds.append(min(at, len(cumulative)))
    return np.array(bounds, np.int64)


def row_pieces(shard_ranges, shard_block_nnz, row_counts, entry_bytes: int, bytes_per_row: int,
               max_bytes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``shard_block_nnz`` with every row block heavier than ``max_bytes`` replaced by runs of its
    rows weighing at most ``max_bytes`` each (a row heavier alone is a run alone), from the rows'
    entry counts ``row_counts(start, stop)`` (the store's row pointers, read once for each shard
    that holds such a block).

    Pieces of one row block share its factor chunk: their writes are serialised
    (``half_sweep._finish``), so only the tasks of one process may be planned this way.
    """
    out = []
    for (lo, hi), (block_starts, block_nnz) in zip(shard_ranges, shard_block_nnz):
        rows = np.diff(np.append(block_starts, hi))
        heavy = np.flatnonzero(block_nnz * entry_bytes + rows * bytes_per_row > max_bytes)
        if len(heavy) == 0:
            out.append((block_starts, block_nnz))
            continue
        shard_counts = np.asarray(row_counts(lo, hi), np.int64)
        starts: list[np.ndarray] = []
        nnz: list[np.ndarray] = []
        done = 0
        for k in heavy:
            starts.append(block_starts[done:k])
            nnz.append(block_nnz[done:k])
            first = int(block_starts[k])
            counts = shard_counts[first - lo:first - lo + int(rows[k])]
            bounds = _greedy_bounds(np.cumsum(counts * entry_bytes + bytes_per_row), max_bytes)
            entries = np.concatenate([[0], np.cumsum(counts)])
            starts.append(first + bounds[:-1])
            nnz.append(entries[bounds[1:]] - entries[bounds[:-1]])
            done = k + 1
        starts.append(block_starts[done:])
        nnz.append(block_nnz[done:])
        out.append((np.concatenate(starts).astype(np.int64), np.concatenate(nnz).astype(np.int64)))
    return out


def usable_bytes(allowance: int) -> int:
    """What a plan may commit of the allowance (see PLAN_HEADROOM and PLAN_RESERVE)."""
    reserve = max(allowance * PLAN_HEADROOM, min(allowance / 2, PLAN_RESERVE))
    return int(allowance - reserve)


def blocked_cg_row_bytes(factors: int, itemsize: int, jacobi: bool = False) -> int:
    """Bytes a row needs in a blocked CG task: x, r, p, Ap, the dense product, its regularization,
    squared residual and step, a cursor, three float64 loss terms and its row pointer; and the
    inverse diagonal with ``jacobi`` (``WALSConfig.cg_preconditioner``)."""
    return (6 if jacobi else 5) * factors * itemsize + 3 * itemsize + 8 + 24 + 8


# a local blocked plan cuts row blocks heavier than 1/PIECES_A_TASK of a task by rows (``row_pieces``)
PIECES_A_TASK = 4
# entries a blocked task holds for all its passes: indices and values (8 bytes) and read slack
BLOCKED_BYTES_PER_ENTRY = 12


def plan_half_sweep(
    side: str,
    shard_ranges: list[tuple[int, int]],
    shard_block_nnz: list[tuple[np.ndarray, np.ndarray]],
    n_fixed: int,
    factors: int,
    itemsize: int,
    solver: str,
    allowance: int,
    concurrency: int,
    local: bool = True,
    max_block_rows: int | None = None,
    cg_steps: int = 3,
    processes: int = 1,
    blocked_method: str | None = None,
    row_counts: Callable[[int, int], np.ndarray] | None = None,
    blocked_task_bytes: int | None = None,
    kernel_bytes: int = 0,
    half_gathers: bool = True,
    eigenbasis: bool = False,
    jacobi: bool = False,
) -> HalfSweepPlan:
    """Plan one half-sweep within ``allowance`` bytes for ``concurrency`` simultaneous tasks.

    shard_block_nnz: for each shard, (first row of each row block, entries per block), so large
    shards can be split into tasks without reading any entries.
    local: tasks run in this process (threaded scheduler), which then holds both sides whole
    ("resident") when they fit, so no factor is read back from Zarr; otherwise (and on a
    cluster) each process holds the fixed side. processes: worker processes (cluster).
    max_block_rows: stream the fixed side in blocks of at most this many rows even if it fits.
    blocked_method: "expanded", "cg" or "cholesky" for every blocked task (default: expanded
    where the entries fit, else the solver's streamed method); for tests and benchmarks.
    row_counts: entries of each row of ``[start, stop)`` (the store's row pointers): given, a
    local blocked plan cuts a row block too heavy to expand into runs of its rows that expand
    (``row_pieces``); a row too heavy alone is streamed.
    blocked_task_bytes: what a blocked task may take, instead of what the allowance leaves (for tests).
    kernel_bytes: what a task's solver holds beside its rows and entries, whatever the task's size
    (ialspp's kept block factors: ``kernels.subspace.kept_factor_bytes``).
    half_gathers: CG may hold a float16 copy of the fixed side (``WALSConfig.half_gathers``).
    eigenbasis: ialspp holds the fixed side rotated into its Gram's eigenbasis beside it
    (``WALSConfig.eigenbasis``, ``fixed_side.Eigenbasis``).
    jacobi: blocked CG tasks hold each row's inverse diagonal too (``WALSConfig.cg_preconditioner``).
    """
    usable = usable_bytes(allowance)
    n_rows = shard_ranges[-1][1] if shard_ranges else 0
    row_bytes = factors * itemsize * 2  # solved rows and their write buffer
    fixed_bytes = n_fixed * factors * itemsize
    notes: list[str] = []

    def plan(mode, solver_used, tasks, resident, block_rows, row_batch, task_bytes, spare, holds_own, passes, at_once=concurrency):
        return HalfSweepPlan(
            side, _other(side), n_rows, n_fixed, factors, mode, solver_used, tasks, at_once, resident,
            block_rows, row_batch, task_bytes, spare, allowance, notes, holds_own, passes, concurrency // at_once, itemsize,
        )

    if max_block_rows is not None:
        notes.append(f"fixed side streamed in blocks of at most {max_block_rows} rows, as asked")
    else:
        # CG's warm-start gathers read a float16 copy of the fixed side beside it (``half_sweep``)
        half_bytes = n_fixed * factors * 2 if solver == "cg" and half_gathers and gathers_half(factors, itemsize) else 0
        if solver == "ialspp" and eigenbasis:  # ... and iALS++'s solves read it rotated into its eigenbasis
            half_bytes = fixed_bytes
        holdings = [(True, fixed_bytes + half_bytes + n_rows * factors * itemsize)] if local else []
        holdings.append((False, fixed_bytes + half_bytes))
        for holds_own, resident in holdings:
            per_task = (usable - resident) // max(1, concurrency) - kernel_bytes
            if per_task <= 0:
                continue
            tasks, task_bytes = _tasks(shard_ranges, shard_block_nnz, row_bytes, per_task)
            if task_bytes <= per_task:
                task_bytes += kernel_bytes
                spare = usable - resident - concurrency * task_bytes
                return plan("resident", solver, tasks, resident, n_fixed, 0, task_bytes, spare, holds_own, 1)
        notes.append(f"the fixed side ({format_bytes(fixed_bytes)}) and a task beside it do not fit in {format_bytes(usable)}")

    block_bytes = min(BLOCK_BYTES, usable // 8)  # the rest holds rows: fewer tasks, fewer sweeps
    block_rows = max(1, min(n_fixed, block_bytes // (factors * itemsize), max_block_rows or n_fixed))
    block_bytes = block_rows * factors * itemsize
    # one blocked task at a time per process, one window mapped; two tasks' marks of their columns
    room = max(1, usable - block_bytes - 2 * distinct_columns_bytes(n_fixed) - kernel_bytes)
    if blocked_task_bytes is not None:
        room = blocked_task_bytes
    # CSR, a renumbered index and the entry's fixed row (fewer rows when entries share a column:
    # the plan, made without reading entries, counts one an entry). Where CG gathers float16
    # (``half_sweep._long_rows_apart``) a row's fixed rows are copied as float16 bits, but those
    # of rows over ``GATHER_MAX_ENTRIES`` entries in float32: counted from the row counts, where given
    half_width = factors * 2 if (solver == "cg" and half_gathers and gathers_half(factors, itemsize) and row_counts is not None
                                 and blocked_method in (None, "expanded")) else 0
    expanded_entry = BYTES_PER_ENTRY + 4 + (half_width or factors * itemsize)
    # while one task sweeps, the next reads its entries and starting rows (``half_sweep.solve_task``):
    # tasks are cut counting a neighbour of their own size, then the largest neighbour is reserved
    # and, where they expand in what is left, cut again to fill it
    pieces = row_counts is not None and local and processes == 1 and blocked_method is None

    long_at: list[np.ndarray] = []

    def long_rows() -> tuple[np.ndarray, np.ndarray]:  # rows over GATHER_MAX_ENTRIES entries, and their counts
        if not long_at and row_counts is not None:
            rows, counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
            for lo, hi in shard_ranges:  # the row counts read once a plan
                if hi > lo:
                    shard_counts = row_counts(lo, hi)
                    at = np.flatnonzero(shard_counts > GATHER_MAX_ENTRIES)
                    rows.append(at + lo)
                    counts.append(shard_counts[at].astype(np.int64))
            long_at.extend([np.concatenate(rows), np.concatenate([[0], np.cumsum(np.concatenate(counts))])])
        return long_at[0], long_at[1]

    def long_entries(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:  # entries of long rows in [start, stop)
        rows, cumulative = long_rows()
        return cumulative[np.searchsorted(rows, stops)] - cumulative[np.searchsorted(rows, starts)]

    def long_extra(blocks) -> list[np.ndarray] | None:  # float32 rows of long rows' entries, beyond float16's
        if not half_width:
            return None
        extra = []
        for (lo, hi), (block_starts, _) in zip(shard_ranges, blocks):
            stops = np.append(block_starts[1:], hi).astype(np.int64)
            extra.append(long_entries(np.asarray(block_starts, np.int64), stops) * (factors * itemsize - half_width))
        return extra

    def cut(entry_bytes: int, bytes_per_row: int, max_bytes: int) -> tuple[list[SolveTask], int]:
        blocks = shard_block_nnz
        if pieces:  # blocks heavier than a quarter task cut by rows, so that tasks fill up to max_bytes
            blocks = row_pieces(shard_ranges, shard_block_nnz, row_counts, entry_bytes, bytes_per_row,
                                max(1, max_bytes // PIECES_A_TASK))
        cut_tasks, _ = balanced_tasks(shard_ranges, blocks, entry_bytes, bytes_per_row, max_bytes,
                                      multiple=max(1, processes), block_extra=long_extra(blocks))
        return cut_tasks, max((t.nnz * BYTES_PER_ENTRY + (t.row_stop - t.row_start) * row_bytes for t in cut_tasks),
                              default=0)

    tasks, waiting = cut(expanded_entry + BYTES_PER_ENTRY, 2 * row_bytes, room)
    if pieces and waiting < room:
        refilled, refilled_waiting = cut(expanded_entry, row_bytes, room - waiting)
        if refilled_waiting <= waiting:  # each expands beside the largest neighbour of the new cut
            tasks, waiting = refilled, refilled_waiting
    room = max(1, room - waiting)

    def expanded_bytes(task: SolveTask) -> int:  # a compact row for each distinct column: at most one an entry
        if half_width:
            long = int(long_entries(np.array([task.row_start]), np.array([task.row_stop]))[0])
            return (task.nnz * (BYTES_PER_ENTRY + 4) + min(task.nnz - long, n_fixed) * half_width
                    + min(long, n_fixed) * factors * itemsize)
        distinct = min(task.nnz, n_fixed)
        return task.nnz * (expanded_entry - factors * itemsize) + distinct * factors * itemsize

    def expands(task: SolveTask) -> bool:
        fits = expanded_bytes(task) + (task.row_stop - task.row_start) * row_bytes <= room
        return blocked_method == "expanded" or (blocked_method is None and fits)

    method = blocked_method if blocked_method in ("cg", "cholesky") else solver
    if solver == "ialspp" and (method != "ialspp" or not all(expands(t) for t in tasks)):
        raise SettingError(
            f"solver 'ialspp' on the blocked plan needs every task's entries expanded beside their fixed rows, and the "
            f"{side} half-sweep's do not fit in the memory_budget's share ({format_bytes(room)}): raise memory_budget or "
            f"use solver 'cg' or 'cholesky'", flags={"memory_budget": "--memory-budget", "solver": "--solver"})
    streamed = [t.nnz * BLOCKED_BYTES_PER_ENTRY + (t.row_stop - t.row_start) * row_bytes for t in tasks if not expands(t)]
    normal_row = normal_equations_row_bytes(factors)
    row_batch = max(1, (room - max(streamed)) // normal_row) if streamed and method == "cholesky" else 0
    planned, heaviest = [], 0
    for task in tasks:
        rows = task.row_stop - task.row_start
        if expands(task):
            planned.append(replace(task, method="expanded", sweeps=1))
            heaviest = max(heaviest, expanded_bytes(task) + rows * row_bytes)
            continue
        weight = task.nnz * BLOCKED_BYTES_PER_ENTRY + rows * row_bytes
        if method == "cg":  # too heavy to expand: CG vectors per row, a sweep per pass
            planned.append(replace(task, method="cg", sweeps=1 + cg_steps))
            weight += rows * blocked_cg_row_bytes(factors, itemsize, jacobi)
        else:  # normal equations of row_batch rows at a time, a sweep per batch
            planned.append(replace(task, method="cholesky", sweeps=-(-rows // row_batch)))
            weight += min(rows, row_batch) * normal_row
        heaviest = max(heaviest, weight)
    if heaviest > room:
        notes.append(f"a row block needs {format_bytes(heaviest)}: over the budget's share ({format_bytes(room)})")
    passes = sum(t.sweeps for t in planned)
    return plan("blocked", solver, planned, 0, block_rows, row_batch, heaviest + waiting + block_bytes + kernel_bytes, 0, False, passes,
                at_once=1)


def distinct_columns_bytes(n_fixed: int) -> int:
    """Bytes an expanded task's marks of the fixed rows it uses take (``half_sweep.DistinctColumns``):
    a bit a fixed row and a count a word of them."""
    return 16 * (n_fixed // 64 + 2)


def normal_equations_row_bytes(factors: int) -> int:
    """A row's f x f normal equations (float64), right-hand side, confidence sum and cursor."""
    return factors * factors * 8 + factors * 8 + 16


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _other(side: str) -> str:
    return "item" if side == "user" else "user"
