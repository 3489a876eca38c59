"""Planning a half-sweep: which tasks, how the fixed side is reached, and what memory each needs.

Pure functions of the store's metadata, the config and the budget: the plan can be printed and
tested without running anything (the rechunker habit). Two ways to reach the fixed factors:

- "resident": the whole fixed side is read once per process and shared by its task threads;
  rows are solved with CG or Cholesky against it. Chosen when it fits in the allowance.
- "blocked": the fixed side is streamed in row blocks and each row's normal equations are
  accumulated block by block (as Spark's block ALS does), then solved by Cholesky. Memory is
  bounded by the block and the row batch, whatever the size of either side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..memory import format_bytes

# working bytes per stored entry in a task: indices + values as read, zarr decode buffers, and
# the per-entry arrays a kernel call touches
BYTES_PER_ENTRY = 24
# share of the allowance a plan may commit; the rest covers Zarr's decode buffers, allocator
# slack and Dask (measured: a plan of 45 MiB in 64 MiB peaked at 74 MiB; at 0.5 it stays under)
PLAN_HEADROOM = 0.5


@dataclass(frozen=True)
class SolveTask:
    """Rows ``[row_start, row_stop)`` of one side, solved by one Dask task."""

    shard: int
    part: int
    row_start: int
    row_stop: int
    nnz: int

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
    row_batch: int  # rows whose normal equations are held at once ("blocked" mode)
    task_bytes: int  # the most one running task needs
    spare_bytes: int  # what is left of the usable allowance (the shard cache may take it)
    allowance: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        """Planned peak above the baseline, not counting the shard cache."""
        return self.resident_bytes + self.concurrency * self.task_bytes

    def describe(self) -> str:
        lines = [
            f"{self.side} half-sweep: {len(self.tasks)} tasks over {self.n_rows} rows; fixed side "
            f"{self.fixed_side} ({self.n_fixed} x {self.factors}) {self.mode}; solver {self.solver}",
            f"  planned peak {format_bytes(self.peak_bytes)} of allowance {format_bytes(self.allowance)}: "
            f"{self.concurrency} concurrent tasks of at most {format_bytes(self.task_bytes)}, "
            f"resident factors {format_bytes(self.resident_bytes)}"
            + (f", fixed blocks of {self.block_rows} rows, row batches of {self.row_batch}" if self.mode == "blocked" else ""),
        ]
        lines += [f"  note: {note}" for note in self.notes]
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
) -> HalfSweepPlan:
    """Plan one half-sweep within ``allowance`` bytes for ``concurrency`` simultaneous tasks.

    shard_block_nnz: for each shard, (first row of each row block, entries per block), so large
    shards can be split into tasks without reading any entries.
    local: tasks run in this process (threaded scheduler), which then holds both sides whole
    ("resident") so no factor is read back from Zarr; on a cluster each worker holds the fixed side.
    """
    usable = int(allowance * PLAN_HEADROOM)
    n_rows = shard_ranges[-1][1] if shard_ranges else 0
    row_bytes = factors * itemsize * 2  # solved rows and their write buffer
    resident = (n_fixed + (n_rows if local else 0)) * factors * itemsize
    notes: list[str] = []

    per_task = (usable - resident) // max(1, concurrency)
    if max_block_rows is not None:
        notes.append(f"fixed side streamed in blocks of at most {max_block_rows} rows, as asked")
    elif per_task > 0:
        tasks, task_bytes = _tasks(shard_ranges, shard_block_nnz, row_bytes, per_task)
        if task_bytes <= per_task:
            spare = usable - resident - concurrency * task_bytes
            return HalfSweepPlan(
                side, _other(side), n_rows, n_fixed, factors, "resident", solver, tasks, concurrency,
                resident, n_fixed, 0, task_bytes, spare, allowance, notes,
            )
        notes.append(f"a row block needs {format_bytes(task_bytes)}, more than {format_bytes(per_task)} beside the resident factors")
    else:
        notes.append(f"resident factors ({format_bytes(resident)}) do not fit in {format_bytes(usable)}")

    # blocked: each task streams the fixed side in blocks and holds normal equations per row batch
    if solver == "cg":
        notes.append("streaming the fixed side in blocks with exact normal equations (Cholesky) instead of CG")
    per_thread = usable // max(1, concurrency)
    normal_eq_row = factors * factors * 8 + factors * 8 + 8  # A (float64), b, cursor
    block_rows = int(max(1, min(n_fixed, (per_thread // 4) // (factors * itemsize), max_block_rows or n_fixed)))
    remaining = per_thread - block_rows * factors * itemsize
    tasks, entry_bytes = _tasks(shard_ranges, shard_block_nnz, row_bytes, max(1, remaining // 2))
    row_batch = int(max(1, (remaining - entry_bytes) // normal_eq_row))
    largest_rows = max([t.row_stop - t.row_start for t in tasks] or [1])
    task_bytes = entry_bytes + min(row_batch, largest_rows) * normal_eq_row + block_rows * factors * itemsize
    if entry_bytes > remaining // 2:
        notes.append(f"a row block needs {format_bytes(entry_bytes)}: over the per-task share of the budget")
    return HalfSweepPlan(
        side, _other(side), n_rows, n_fixed, factors, "blocked", "cholesky", tasks, concurrency,
        0, block_rows, row_batch, task_bytes, 0, allowance, notes,
    )


def _other(side: str) -> str:
    return "item" if side == "user" else "user"
