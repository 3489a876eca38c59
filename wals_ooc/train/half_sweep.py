"""Executing a half-sweep plan: one Dask task per row range, each reading its CSR rows, solving
them with a numba kernel against the fixed factors, and writing its factor rows to Zarr.

Tasks take and return only small objects (paths, row ranges, an f x f Gram matrix, a few
floats): factor matrices go from Zarr to the worker and back to Zarr, never through the
scheduler. The same functions run under the threaded scheduler and on distributed workers.
Writes are idempotent (a fixed row range of a fixed slot), so a retried task is harmless.

Each task also returns the Gram matrix of the rows it solved: their sum is the fixed-side Gram
of the next half-sweep, so no separate pass over the factors is needed.

Under the threaded scheduler the driver passes a ``LocalState`` when both factor sides fit: both
held whole in memory (so nothing is read back from Zarr) and a pinned cache of CSR rows filled
up to the plan's spare bytes. Otherwise (and on a cluster) each process keeps the fixed side of
the running half-sweep (``fixed_side``): whole when it fits, else a local scratch copy that
tasks sweep in mapped windows. A blocked task runs alone in its process and spreads its rows
over the process's threads, so every window it maps serves all of them.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import dask
import numpy as np

from ..config import WALSConfig
from ..execute import Executor, single_threaded_blas_in_worker
from ..kernels.gram import block_gram
from ..kernels.blocked import (
    accumulate_block,
    cg_begin,
    cg_observed_loss,
    cg_product_block,
    cg_residual_block,
    cg_step,
    column_ranks,
    gather_marked,
    mark_columns,
    renumber_columns,
    row_regularizations,
    solve_accumulated,
)
from ..kernels.loss import gram_quadratic_of, observed_loss_block, regularization_sum
from ..kernels.solve import CONFIDENCE_KINDS, GATHER_MAX_ENTRIES, cg_solve_rows, cholesky_solve_rows, gathers_half
from ..kernels.subspace import subspace_solve_rows
from ..store.chunk_files import write_rows
from ..store.format import array, open_group, subgroup, writing_every_chunk
from ..store.reader import CSRShard, InteractionStore
from .entry_cache import entry_cache, release_entry_caches
from .fixed_side import ROTATED_ROWS, ScratchCopy, eigenbasis, fixed_side, forward_rows, half_copy, held_array, previous_copy, release_fixed_side
from .plan import SolveTask
from .sums import GramPieces, block_ranges, task_pieces

# ---------------------------------------------------------------------------------------------
# Per-process state: opened stores, and (on cluster workers) the running half-sweep's fixed side
# ---------------------------------------------------------------------------------------------

_lock = threading.RLock()
_opened: dict[tuple, Any] = {}
_worker_shards: dict[tuple, "LocalState"] = {}  # CSR shards a worker keeps between half-sweeps
_blocked_task = threading.Lock()  # one blocked task at a time per process: it uses every thread
_blocked_inputs = threading.BoundedSemaphore(2)  # blocked tasks holding their entries: one sweeping, one reading
_shared_chunks = threading.Lock()  # writes of tasks that share a factor chunk (pieces of one row block, ``plan.row_pieces``)
_pool: ThreadPoolExecutor | None = None
_writer: ThreadPoolExecutor | None = None  # a local fit's write-behind thread (see ``LocalState.write_behind``)
WARM_STARTED = ("cg", "ialspp")  # solvers that start from the previous factors (Cholesky solves afresh)
CHUNKS_A_THREAD = 4  # a blocked expanded task's gather and solve, in chunks its threads take as they finish (``_in_chunks``)
GATHER_ENTRIES = 256  # rows of a blocked CG task's gather scratch (per thread)


def _interactions(location: str, storage_options: dict | None) -> InteractionStore:
    with _lock:
        key = ("interactions", location)
        if key not in _opened:
            _opened[key] = InteractionStore(location, storage_options)
        return _opened[key]


def _factor_array(location: str, storage_options: dict | None, side: str, slot: int):
    """A factor slot, opened once per process. Its writes skip Zarr's check of each chunk for
    all-fill-value (a chunk of zeros is written rather than deleted, and reads back the same):
    the check compared every chunk byte by byte, 0.12 s of CPU per 184 MB of rows written
    (f = 128, 360k rows), taken from the task threads on a machine with as many as them."""
    with _lock:
        key = ("factors", location, side, slot)
        if key not in _opened:
            _opened[key] = writing_every_chunk(array(subgroup(open_group(location, "r+", storage_options), side), str(slot)))
        return _opened[key]


def _fixed_key(model: str, side: str, slot: int, step: int, mode: str) -> tuple:
    """What names the fixed side of a half-sweep in ``fixed_side``: that side's factors of ``slot``, at ``step``."""
    return (model, side, slot, step, mode)


def _fixed_of(job: HalfSweepJob) -> tuple[Any, bool]:
    """This process's fixed side for the job's half-sweep: the whole array ("resident") or a
    scratch copy ("blocked"), made by the first task that asks; and whether this call made it."""
    key = _fixed_key(job.model, job.fixed_side, job.fixed_slot, job.step, job.mode)
    array = _factor_array(job.model, job.storage_options, job.fixed_side, job.fixed_slot)
    if job.mode == "resident":
        return fixed_side(key, lambda: np.ascontiguousarray(array[:]))
    threads = max(1, job.task_threads)  # the copy buffers of all the threads take one window's rows
    return fixed_side(key, lambda: ScratchCopy(array, copy_rows=max(1, job.block_rows // threads), threads=threads))


def release_caches() -> None:
    """Forget opened stores, and any fixed side and shards held by this process."""
    global _pool, _writer
    with _lock:
        release_fixed_side()
        release_entry_caches()
        _worker_shards.clear()
        _opened.clear()
        if _pool is not None:
            _pool.shutdown(wait=False)
            _pool = None
        if _writer is not None:
            _writer.shutdown(wait=True)  # a half-sweep drains its writes: nothing is left running
            _writer = None


def _in_parts(parts: list[tuple[int, int]], work) -> None:
    """Call ``work(a, b)`` for every row range, the first in this thread and the rest in the
    process's pool (numba kernels and BLAS release the GIL, so they run at once)."""
    global _pool
    if len(parts) == 1:
        work(*parts[0])
        return
    with _lock:
        if _pool is None or _pool._max_workers < len(parts) - 1:
            _pool = ThreadPoolExecutor(max_workers=len(parts) - 1, thread_name_prefix="wals-ooc-rows")
        pool = _pool
    futures = [pool.submit(work, a, b) for a, b in parts[1:]]
    try:
        work(*parts[0])
    finally:
        for future in futures:
            future.result()


def _in_chunks(chunks: list[tuple[int, int]], work, threads: int) -> None:
    """Call ``work(a, b)`` for every range of ``chunks``, taken in order by ``threads`` threads
    (this one and the process's pool) as each finishes its last: a thread slowed down (another
    task's thread, Zarr's, on the same cores) takes fewer, and none waits on another before the
    last chunk (with one fixed range a thread, the threads waited 17-20% of a blocked task's
    solve and of its gather on the 30M store)."""
    taken = iter(range(len(chunks)))
    take = threading.Lock()

    def drain(_a: int = 0, _b: int = 0) -> None:
        while True:
            with take:
                k = next(taken, None)
            if k is None:
                return
            work(*chunks[k])

    _in_parts([(0, 0)] * max(1, min(threads, len(chunks))), drain)


def _row_parts(indptr: np.ndarray, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous row ranges of about equal work (entries plus a row's dense part)."""
    n_rows = len(indptr) - 1
    if count <= 1 or n_rows < 2 * count:
        return [(0, n_rows)]
    work = indptr[1:] + np.arange(1, n_rows + 1) * 8  # a row's dense products weigh ~8 entries
    cuts = np.searchsorted(work, work[-1] * np.arange(1, count) / count)
    bounds = np.unique(np.concatenate([[0], cuts, [n_rows]]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _shard_cache_on_worker(job: HalfSweepJob) -> LocalState:
    """This worker's shard cache for the job's training run (one run's cache at a time)."""
    key = (job.interactions, job.model)
    with _lock:
        if key not in _worker_shards:
            _worker_shards.clear()
            _worker_shards[key] = LocalState(cache_bytes=job.shard_cache_bytes)
        return _worker_shards[key]


@dataclass
class LocalState:
    """What a local (threaded) fit keeps in memory between half-sweeps.

    factors[side] = (array, slot): the side's factors whole, equal to that Zarr slot. During a
    half-sweep its tasks overwrite their own rows in place (each task reads only its rows).
    shard_cache: CSR rows by (side, row_start, row_stop), filled until ``cache_bytes`` is used;
    nothing is evicted, which suits the cyclic access of training.
    writes: the solved rows' writes to Zarr still running. A task hands its rows (a view of the
    held side, which nothing changes before the half-sweep after next) to one writer thread and
    goes on to its next task; the half-sweep waits for them all before it returns, so a commit
    still follows every write of its half-sweep. (A task thread otherwise waited on Zarr for
    10-13% of its time, mostly on the file writes rather than on CPU.)
    """

    cache_bytes: int = 0
    factors: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    shard_cache: dict[tuple, CSRShard] = field(default_factory=dict)
    cached_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    writes: list[Future] = field(default_factory=list)

    def write_behind(self, target, start: int, stop: int, rows: np.ndarray) -> None:
        """``target[start:stop] = rows`` on this process's writer thread (``drain`` waits for it),
        straight to the chunk files when it can (``chunk_files.write_rows``)."""
        global _writer
        with _lock:
            if _writer is None:
                _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wals-ooc-write")
            future = _writer.submit(write_rows, target, start, stop, rows)
        with self.lock:
            self.writes.append(future)

    def drain(self, raise_errors: bool = True) -> None:
        """Wait for every pending write; raise the first failure's error (unless told not to)."""
        with self.lock:
            pending, self.writes = self.writes, []
        failures = [exc for exc in (future.exception() for future in pending) if exc is not None]
        if failures and raise_errors:
            raise failures[0]

    def rows(self, store: InteractionStore, side: str, start: int, stop: int) -> CSRShard:
        key = (side, start, stop)
        shard = self.shard_cache.get(key)
        if shard is None:
            shard = store.rows(side, start, stop)
            with self.lock:
                if self.cached_bytes + shard.nbytes() <= self.cache_bytes:
                    self.shard_cache[key] = shard
                    self.cached_bytes += shard.nbytes()
        return shard

    def ensure(self, model_location: str, storage_options, side: str, slot: int) -> np.ndarray:
        """The side's factors of ``slot`` in memory, read from Zarr unless already held."""
        held = self.factors.get(side)
        if held is None or held[1] != slot:
            self.factors.pop(side, None)
            array = _factor_array(model_location, storage_options, side, slot)
            whole = held_array(array.shape, array.dtype)
            step = array.chunks[0] * 16
            for lo in range(0, array.shape[0], step):  # read a piece at a time: no second whole copy
                whole[lo : lo + step] = array[lo : lo + step]
            self.factors[side] = (whole, slot)
        return self.factors[side][0]


# ---------------------------------------------------------------------------------------------
# Task functions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HalfSweepJob:
    """What every task of one half-sweep shares (small and picklable)."""

    interactions: str
    model: str
    storage_options: dict | None
    side: str
    fixed_side: str
    step: int
    fixed_slot: int
    warm_slot: int
    out_slot: int
    config: WALSConfig
    mode: str
    solver: str
    block_rows: int
    row_batch: int
    n_fixed: int
    gram: np.ndarray  # alpha0 * fixed^T fixed, (f, f) in the factor dtype
    loss: bool
    shard_cache_bytes: int = 0  # on cluster workers: CSR shards kept between half-sweeps
    task_threads: int = 1  # blocked: threads a task spreads its rows over
    entry_cache: bool = False  # local blocked: tasks read their rows from a local raw copy after the first time (``entry_cache``)
    row_block: int = 0  # the store's row block: rows are solved and summed block by block (``sums``)
    forward: bool = False  # local, next half-sweep blocked: solved rows also go into its scratch copy (``forward_rows``)


@dataclass
class TaskResult:
    """What a task reports: timing, its rows' pieces of the objective (float64 partial sums, one
    a row block where the solve allows: the driver adds them exactly, ``sums.exact_sum``), and
    their share of the Gram tree (``sums``)."""

    shard: int
    part: int
    rows: int
    nnz: int
    seconds: float
    gram: GramPieces | None = None
    quadratic: list[float] = field(default_factory=list)
    observed: list[float] = field(default_factory=list)
    regularization: list[float] = field(default_factory=list)
    failures: int = 0
    fixed_bytes_read: int = 0  # bytes of fixed factors this task read (from the store or the scratch copy)


def _kernel_scalars(config: WALSConfig):
    t = config.np_dtype.type
    return CONFIDENCE_KINDS[config.confidence], t(config.alpha), t(config.alpha0), t(config.eps)


def solve_task(job: HalfSweepJob, task: SolveTask, local: LocalState | None = None) -> TaskResult:
    """Solve rows ``[task.row_start, task.row_stop)`` of ``job.side`` and write them to ``job.out_slot``.

    A blocked task holds the process's blocked slot (``_blocked_task``) only to sweep and solve:
    it reads its entries and warm factors before, and writes its rows after, so a second task
    of the process reads while the first sweeps. ``_blocked_inputs`` lets two blocked tasks at
    most hold their entries at once (the plan counts the second's, see ``plan``).
    """
    started = time.perf_counter()
    single_threaded_blas_in_worker()
    if job.mode != "blocked":
        csr, X, result = _task_inputs(job, task, local)
        _solve_resident(job, task, csr, X, local, result)
        return _finish(job, task, csr, X, result, started, local)
    with _blocked_inputs:
        csr, X, result = _task_inputs(job, task, local)
        if task.method == "expanded":  # before the slot: while another task sweeps
            columns = DistinctColumns.of(csr.indptr, csr.indices, job.n_fixed, _long_rows_apart(job))
        with _blocked_task:
            scratch, _ = _fixed_of(job)
            if task.method == "expanded" and columns.split and not scratch.half_usable():
                _expanded_in_float32(job, csr, X, scratch, result, columns)
            elif task.method == "expanded":
                _blocked_expanded(job, csr, X, scratch, result, columns)
            else:
                {"cg": _blocked_cg, "cholesky": _blocked_cholesky}[task.method](job, csr, X, scratch, result)
        return _finish(job, task, csr, X, result, started)


def _warm_copy(job: HalfSweepJob) -> ScratchCopy | None:
    """A blocked task's starting rows as the previous half-sweep's scratch copy of its fixed side
    (this side, from the same slot), when the process still holds it (see ``fixed_side``)."""
    if job.mode != "blocked" or job.step == 0:
        return None
    return previous_copy((job.model, job.side, job.warm_slot, job.step - 1, job.mode))


def _task_inputs(job: HalfSweepJob, task: SolveTask, local: LocalState | None) -> tuple[CSRShard, np.ndarray, TaskResult]:
    """The task's CSR rows, its rows' starting factors (a view of the held side when resident and
    local: solved in place), and its result to fill."""
    store = _interactions(job.interactions, job.storage_options)
    lo_row, hi_row = task.row_start, task.row_stop
    if local is not None:
        csr = local.rows(store, job.side, lo_row, hi_row)
    elif job.shard_cache_bytes:
        csr = _shard_cache_on_worker(job).rows(store, job.side, lo_row, hi_row)
    elif job.entry_cache:
        csr = entry_cache(store, job.side).rows(store, job.side, lo_row, hi_row)
    else:
        csr = store.rows(job.side, lo_row, hi_row)
    cfg = job.config
    if local is not None and job.mode == "resident":
        X = local.factors[job.side][0][lo_row:hi_row]  # a view: solved in place
    elif job.solver in WARM_STARTED and (copy := _warm_copy(job)) is not None:
        with copy.window(lo_row, hi_row) as rows:  # the rows solved two half-sweeps ago, undecoded
            X = np.array(rows)
            del rows
    elif job.solver in WARM_STARTED:
        X = np.ascontiguousarray(_factor_array(job.model, job.storage_options, job.side, job.warm_slot)[lo_row:hi_row])
    else:
        X = np.zeros((csr.n_rows, cfg.factors), dtype=cfg.np_dtype)
    return csr, X, TaskResult(task.shard, task.part, csr.n_rows, csr.nnz, 0.0)


def _task_blocks(job: HalfSweepJob, task: SolveTask) -> list[tuple[int, int]]:
    """The task's rows cut at the store's row blocks, relative to its first row: each is solved
    by its own kernel call, so that its rows' arithmetic (CG's row groups, their BLAS products)
    and its partial sums do not depend on where the plan cut the tasks."""
    return [(a - task.row_start, b - task.row_start) for a, b in block_ranges(task.row_start, task.row_stop, job.row_block)]


def _solve_resident(job: HalfSweepJob, task: SolveTask, csr: CSRShard, X: np.ndarray, local: LocalState | None,
                    result: TaskResult) -> None:
    cfg = job.config
    kind, alpha, alpha0, eps = _kernel_scalars(cfg)
    lam, nu = float(cfg.regularization), float(cfg.nu)
    if local is not None:
        Y = local.factors[job.fixed_side][0]
    else:
        Y, made = _fixed_of(job)
        result.fixed_bytes_read += Y.nbytes if made else 0
    half = None
    if job.solver == "cg" and cfg.half_gathers and gathers_half(Y.shape[1], Y.dtype.itemsize):
        half = half_copy(_fixed_key(job.model, job.fixed_side, job.fixed_slot, job.step, "half"), Y)
    basis = None
    if job.solver == "ialspp" and cfg.eigenbasis:  # solved in the eigenbasis of the fixed side's Gram
        basis = eigenbasis(_fixed_key(job.model, job.fixed_side, job.fixed_slot, job.step, "eigen"), job.gram)
        Y = basis.rotated(Y)
    for a, b in _task_blocks(job, task):
        ip = csr.indptr[a:b + 1]
        if job.solver == "cg":
            result.observed.append(cg_solve_rows(
                ip, csr.indices, csr.values, Y, job.gram, X[a:b], kind, alpha, alpha0, eps, lam, nu, job.n_fixed,
                cfg.cg_steps, job.loss, half, cfg.cg_preconditioner == "jacobi"
            ))
        elif job.solver == "ialspp":
            result.observed.append(_subspace_solve(ip, csr.indices, csr.values, Y, job.gram, X[a:b], job, basis))
        else:
            result.failures += cholesky_solve_rows(ip, csr.indices, csr.values, Y, job.gram, X[a:b], kind, alpha, alpha0,
                                                   eps, lam, nu, job.n_fixed)
            if job.loss:
                result.observed.append(observed_loss_block(ip, csr.indices, csr.values, ip[:-1].copy(), 0, job.n_fixed, Y,
                                                           X[a:b], kind, alpha, alpha0, eps))


def _subspace_solve(indptr, indices, values, Y, gram, X, job: HalfSweepJob, basis) -> float:
    """iALS++ on rows X (in place) against the fixed rows Y; with a ``fixed_side.Eigenbasis``, Y
    is the fixed side already rotated into it and X goes in and out (GEMMs over the row block)."""
    cfg = job.config
    kind, alpha, alpha0, eps = _kernel_scalars(cfg)
    rows = X if basis is None else basis.rotate_in(X)
    observed = subspace_solve_rows(indptr, indices, values, Y, gram if basis is None else basis.diagonal, rows, kind, alpha,
                                   alpha0, eps, float(cfg.regularization), float(cfg.nu), job.n_fixed, cfg.block_size,
                                   cfg.sweeps_at(job.step), job.loss, GATHER_MAX_ENTRIES, basis is not None)
    if basis is not None:
        basis.rotate_out(rows, X)
    return observed


def _finish(job: HalfSweepJob, task: SolveTask, csr: CSRShard, X: np.ndarray, result: TaskResult, started: float,
            local: LocalState | None = None) -> TaskResult:
    """The solved rows' pieces of the objective and Gram matrix; write them to the out slot (behind
    the task's back in a local fit: ``LocalState.write_behind``)."""
    cfg = job.config
    blocks = _task_blocks(job, task)
    for a, b in blocks:
        result.regularization.append(regularization_sum(csr.indptr[a:b + 1], X[a:b], float(cfg.regularization),
                                                        float(cfg.nu), float(cfg.alpha0), job.n_fixed))
    out = _factor_array(job.model, job.storage_options, job.side, job.out_slot)
    if local is not None:
        local.write_behind(out, task.row_start, task.row_stop, X)  # one writer thread: writes in turn
    elif _shares_chunk(out, task.row_start, task.row_stop):
        with _shared_chunks:  # a chunk write reads, changes and writes the whole chunk: one at a time
            out[task.row_start:task.row_stop] = X
    else:
        write_rows(out, task.row_start, task.row_stop, X)
    if job.forward:
        forward_rows(_fixed_key(job.model, job.side, job.out_slot, job.step + 1, "blocked"), tuple(out.shape), out.dtype,
                     task.row_start, X)
    grams = [block_gram(X[a:b]) for a, b in blocks]
    if job.loss:
        result.quadratic = [gram_quadratic_of(gram, job.gram) for gram in grams]
    result.gram = task_pieces([(task.row_start + a, task.row_start + b) for a, b in blocks], grams, job.row_block,
                              int(out.shape[0]))
    result.seconds = time.perf_counter() - started
    return result


def _shares_chunk(out, start: int, stop: int) -> bool:
    """Whether rows ``[start, stop)`` cover a factor chunk only in part (another task writes the rest)."""
    rows = int(out.chunks[0])
    return bool(start % rows or (stop % rows and stop != out.shape[0]))


def _sweep(job: HalfSweepJob, scratch: ScratchCopy, result: TaskResult, per_block) -> None:
    """Map the scratch copy window by window and call ``per_block(lo, hi, Y_block)`` on each."""
    for lo in range(0, job.n_fixed, job.block_rows):
        hi = min(job.n_fixed, lo + job.block_rows)
        with scratch.window(lo, hi) as Y_block:
            result.fixed_bytes_read += Y_block.nbytes
            per_block(lo, hi, Y_block)
            del Y_block  # the window is unmapped on leaving: hold no view of it


@dataclass
class Marks:
    """Distinct fixed rows: bit ``j`` of ``bits`` is set for each column ``j`` used, ``first``
    ranks them (``column_ranks``), ``count`` of them in all."""

    bits: np.ndarray
    first: np.ndarray
    count: int

    @classmethod
    def of(cls, indices: np.ndarray, segments: list[tuple[int, int]], n_fixed: int) -> "Marks":
        bits = np.zeros(n_fixed // 64 + 1, np.uint64)
        for e0, e1 in segments:
            mark_columns(indices[e0:e1], bits)
        first = np.empty(len(bits) + 1, np.int64)
        return cls(bits, first, int(column_ranks(bits, first)))


@dataclass
class DistinctColumns:
    """The distinct fixed rows a blocked task's entries use, as one set of ``Marks`` or, split,
    two: the columns of the rows of at most ``split_at`` entries, and those of longer rows;
    ``renumbered`` holds every entry's column as its rank in its row's set: the entry's row in
    that set's compact copy. Split, CG reads the short rows' fixed rows as float16 and the long
    rows' as float32, as the resident plan reads them (``_long_rows_apart``)."""

    sets: list[Marks]
    renumbered: np.ndarray
    split: bool = False

    @classmethod
    def of(cls, indptr: np.ndarray, indices: np.ndarray, n_fixed: int, split_at: int | None = None) -> "DistinctColumns":
        runs = [(int(indptr[0]), int(indptr[-1]), 0)]
        if split_at is not None and len(indptr) > 1:
            long = np.diff(indptr) > split_at
            change = np.flatnonzero(long[1:] != long[:-1]) + 1
            starts, stops = np.concatenate([[0], change]), np.concatenate([change, [len(long)]])
            runs = [(int(indptr[a]), int(indptr[b]), int(long[a])) for a, b in zip(starts, stops)]
        sets = [Marks.of(indices, [(e0, e1) for e0, e1, k in runs if k == which], n_fixed)
                for which in range(2 if split_at is not None else 1)]
        renumbered = np.empty(len(indices), np.int32)
        for e0, e1, which in runs:
            renumber_columns(indices[e0:e1], sets[which].bits, sets[which].first, renumbered[e0:e1])
        return cls(sets, renumbered, split_at is not None)


def _long_rows_apart(job: HalfSweepJob) -> int | None:
    """Where an expanded CG task's rows split into two sets of columns (``DistinctColumns``), or
    None: when CG gathers from a float16 copy (``solve.gathers_half``, ``half_gathers``), rows of
    at most ``GATHER_MAX_ENTRIES`` entries read their fixed rows' float16 bits and longer rows
    read them in float32 (``solve.cg_solve_rows``); each set is copied in its own width."""
    cfg = job.config
    if job.solver == "cg" and cfg.half_gathers and gathers_half(cfg.factors, np.dtype(cfg.np_dtype).itemsize):
        return GATHER_MAX_ENTRIES
    return None


def _rotation_parts(n_rows: int, count: int) -> list[tuple[int, int]]:
    """About ``count`` ranges of ``n_rows`` rows cut at multiples of ``ROTATED_ROWS`` (the rotation's
    pieces do not depend on the thread count)."""
    pieces = -(-n_rows // ROTATED_ROWS)
    step = max(1, -(-pieces // max(1, count))) * ROTATED_ROWS
    return [(lo, min(n_rows, lo + step)) for lo in range(0, n_rows, step)]


def _column_parts(first: np.ndarray, n_fixed: int, count: int) -> list[tuple[int, int]]:
    """``count`` ranges of the fixed rows ``[0, n_fixed)`` holding about equal numbers of a task's
    distinct columns (``first``: ``DistinctColumns.first``), cut at multiples of 64 (whole words
    of the marks). A blocked task's threads sweep these ranges window by window, each taking the
    next range when done (``_in_chunks``), with no wait for one another until the last: a wait
    every window (a submit and a barrier each) left the threads idle more than the copies took."""
    if count <= 1:
        return [(0, n_fixed)]
    words = np.searchsorted(first[:-1], first[-1] * np.arange(1, count) / count, side="left")
    cuts = np.unique(np.concatenate([[0], np.minimum(words.astype(np.int64) * 64, n_fixed), [n_fixed]]))
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def _blocked_expanded(job: HalfSweepJob, csr: CSRShard, X: np.ndarray, scratch: ScratchCopy, result: TaskResult,
                      columns: DistinctColumns) -> None:
    """One sweep copies the distinct fixed rows the task uses, in column order, into a compact
    array; then the resident kernels solve the rows against it (entries renumbered to its rows).

    Where CG gathers float16 (``_long_rows_apart``, and the side fits float16 as ``half_copy``
    asks of a resident side), the rows of at most ``GATHER_MAX_ENTRIES`` entries take their
    fixed rows' float16 bits in one compact array (half the bytes copied and read) and longer
    rows the float32 rows in another: the resident plan's arithmetic, on the same rounded rows."""
    cfg = job.config
    kind, alpha, alpha0, eps = _kernel_scalars(cfg)
    lam, nu = float(cfg.regularization), float(cfg.nu)
    indptr = csr.indptr
    halves = columns.split  # the side fits float16 (else ``_expanded_in_float32``)
    f, dtype = cfg.factors, cfg.np_dtype
    widths = [np.uint16, dtype] if halves else [dtype]
    compacts = scratch.workspaces(*[((marks.count, f), width) for marks, width in zip(columns.sets, widths)])
    entry = columns.renumbered
    threads = max(1, job.task_threads)
    rows = max(1, job.block_rows // threads)  # the threads' windows together: one window of the plan
    copied = [(marks.bits, marks.first, compact) for marks, compact in zip(columns.sets, compacts) if marks.count]

    def gather(a: int, b: int) -> None:  # this thread's columns [a, b), window by window
        for lo in range(a, b, rows):
            hi = min(b, lo + rows)
            with scratch.window(lo, hi) as Y_block:
                for bits, first, compact in copied:
                    gather_marked(bits, first, lo, hi, lo, Y_block, compact)
                del Y_block  # the window's pages are dropped on leaving: hold no view of it

    weights = np.sum([marks.first for marks in columns.sets], axis=0)  # columns of both sets, by word
    _in_chunks(_column_parts(weights, job.n_fixed, CHUNKS_A_THREAD * threads), gather, threads)
    half = compacts[0] if halves else None
    compact = compacts[1] if halves else compacts[0]
    result.fixed_bytes_read += job.n_fixed * cfg.factors * np.dtype(cfg.np_dtype).itemsize  # one sweep
    basis = None
    if job.solver == "ialspp" and cfg.eigenbasis:  # the compact rows rotated in place, as the resident side is
        basis = eigenbasis(_fixed_key(job.model, job.fixed_side, job.fixed_slot, job.step, "eigen"), job.gram)

        def rotate(a: int, b: int) -> None:
            for lo in range(a, b, ROTATED_ROWS):
                hi = min(b, lo + ROTATED_ROWS)
                compact[lo:hi] = basis.rotate_in(compact[lo:hi])

        _in_chunks(_rotation_parts(len(compact), CHUNKS_A_THREAD * threads), rotate, threads)
    parts = _row_parts(indptr, CHUNKS_A_THREAD * threads)
    observed = [0.0] * len(parts)
    failures = [0] * len(parts)
    part_of = {p: k for k, p in enumerate(parts)}

    def solve(a: int, b: int) -> None:
        part = part_of[(a, b)]
        ip = indptr[a:b + 1]
        if job.solver == "cg":
            observed[part] = cg_solve_rows(ip, entry, csr.values, compact, job.gram, X[a:b], kind, alpha, alpha0, eps,
                                           lam, nu, job.n_fixed, cfg.cg_steps, job.loss, half,
                                           cfg.cg_preconditioner == "jacobi")
            return
        if job.solver == "ialspp":
            observed[part] = _subspace_solve(ip, entry, csr.values, compact, job.gram, X[a:b], job, basis)
            return
        failures[part] = cholesky_solve_rows(ip, entry, csr.values, compact, job.gram, X[a:b], kind, alpha, alpha0, eps, lam,
                                             nu, job.n_fixed)
        if job.loss:
            observed[part] = observed_loss_block(ip, entry, csr.values, ip[:-1].copy(), 0, len(compact), compact, X[a:b],
                                                 kind, alpha, alpha0, eps)

    _in_chunks(parts, solve, threads)
    result.observed += observed
    result.failures += sum(failures)


def _expanded_in_float32(job: HalfSweepJob, csr: CSRShard, X: np.ndarray, scratch: ScratchCopy, result: TaskResult,
                         columns: DistinctColumns) -> None:
    """An expanded CG task planned with float16 rows (``_long_rows_apart``) whose fixed side float16
    cannot carry (``ScratchCopy.half_usable``: the resident plan then gathers float32): its rows
    in runs whose float32 rows take no more than its float16 and float32 sets together, each run
    marked, copied and solved on its own (a sweep each; rare: values beyond float16's range)."""
    f = job.config.factors
    room = columns.sets[0].count * f * 2 + sum(marks.count for marks in columns.sets[1:]) * f * 4
    limit = max(1, room // (f * 4))  # entries of a run: one float32 row each at most
    indptr = csr.indptr
    a = 0
    while a < csr.n_rows:
        b = max(a + 1, int(np.searchsorted(indptr, indptr[a] + limit, side="right")) - 1)
        e0, e1 = int(indptr[a]), int(indptr[b])
        run = CSRShard(csr.row_start + a, csr.row_start + b, indptr[a:b + 1] - e0, csr.indices[e0:e1], csr.values[e0:e1])
        _blocked_expanded(job, run, X[a:b], scratch, result, DistinctColumns.of(run.indptr, run.indices, job.n_fixed))
        a = b


def _blocked_cg(job: HalfSweepJob, csr: CSRShard, X: np.ndarray, scratch: ScratchCopy, result: TaskResult) -> None:
    """CG on every row of the task at once, one sweep of the fixed blocks per pass (1 + cg_steps)."""
    cfg = job.config
    kind, alpha, alpha0, eps = _kernel_scalars(cfg)
    n, f, dtype = csr.n_rows, cfg.factors, cfg.np_dtype
    indptr, indices, values, G = csr.indptr, csr.indices, csr.values, job.gram
    parts = _row_parts(indptr, job.task_threads)
    reg = np.empty(n, dtype)
    row_regularizations(indptr, float(cfg.regularization), float(cfg.nu), float(cfg.alpha0), job.n_fixed, reg)
    R, P, AP, D = (np.zeros((n, f), dtype) for _ in range(4))
    jacobi = cfg.cg_preconditioner == "jacobi"
    inv = np.zeros((n if jacobi else 0, f), dtype)  # the rows' diagonals, then their inverses (Jacobi)
    rs, steps = np.zeros(n, dtype), np.zeros(n, dtype)
    loss_terms = np.zeros((n if job.loss else 0, 3))
    cursor = np.empty(n, np.int64)
    gathers = [np.empty((GATHER_ENTRIES, f), dtype) for _ in parts]

    def sweep(kernel) -> None:
        cursor[:] = indptr[:-1]
        _sweep(job, scratch, result, lambda lo, hi, Y_block: _in_parts(parts, lambda a, b: kernel(a, b, lo, hi, Y_block)))

    def gather(a: int) -> np.ndarray:
        return gathers[[p[0] for p in parts].index(a)]

    sweep(lambda a, b, lo, hi, Yb: cg_residual_block(indptr[a:b + 1], indices, values, cursor[a:b], lo, hi, Yb, X[a:b], R[a:b],
                                                     gather(a), kind, alpha, alpha0, eps, inv[a:b] if jacobi else None))

    def begin(a: int, b: int) -> None:
        np.dot(X[a:b], G, out=D[a:b])
        if jacobi:
            cg_begin(X[a:b], R[a:b], D[a:b], reg[a:b], P[a:b], rs[a:b], inv[a:b], G)
        else:
            cg_begin(X[a:b], R[a:b], D[a:b], reg[a:b], P[a:b], rs[a:b])

    _in_parts(parts, begin)
    for step in range(cfg.cg_steps):
        with_loss = job.loss and step == cfg.cg_steps - 1
        AP[:] = 0
        sweep(lambda a, b, lo, hi, Yb: cg_product_block(
            indptr[a:b + 1], indices, values, cursor[a:b], lo, hi, Yb, P[a:b], AP[a:b], X[a:b],
            loss_terms[a:b] if with_loss else loss_terms, with_loss, gather(a), kind, alpha, alpha0, eps))

        def finish(a: int, b: int) -> None:
            np.dot(P[a:b], G, out=D[a:b])
            cg_step(X[a:b], R[a:b], P[a:b], AP[a:b], D[a:b], reg[a:b], rs[a:b], steps[a:b], inv[a:b] if jacobi else None)

        _in_parts(parts, finish)
    if job.loss:
        result.observed.append(cg_observed_loss(loss_terms, steps))


def _blocked_cholesky(job: HalfSweepJob, csr: CSRShard, X: np.ndarray, scratch: ScratchCopy, result: TaskResult) -> None:
    """Exact solves of ``row_batch`` rows at a time, their normal equations accumulated over one sweep."""
    cfg = job.config
    kind, alpha, alpha0, eps = _kernel_scalars(cfg)
    f = cfg.factors
    for b0 in range(0, csr.n_rows, job.row_batch):
        b1 = min(csr.n_rows, b0 + job.row_batch)
        indptr = csr.indptr[b0 : b1 + 1]
        A = np.zeros((b1 - b0, f, f), dtype=np.float64)
        b = np.zeros((b1 - b0, f), dtype=np.float64)
        c_sum = np.zeros(b1 - b0)
        cursor = indptr[:-1].copy()
        parts = _row_parts(indptr - indptr[0], job.task_threads)
        _sweep(job, scratch, result, lambda lo, hi, Y_block: _in_parts(parts, lambda p, q: accumulate_block(
            indptr[p:q + 1], csr.indices, csr.values, cursor[p:q], lo, hi, Y_block, A[p:q], b[p:q], c_sum[p:q],
            kind, alpha, alpha0, eps)))
        failures, observed = solve_accumulated(indptr, A, b, c_sum, job.gram, X[b0:b1], float(cfg.regularization),
                                               float(cfg.nu), float(cfg.alpha0), job.n_fixed)
        result.failures += failures
        result.observed.append(observed)
        del A, b  # freed before the next batch allocates its own


def init_task(
    model_location: str, storage_options: dict | None, side: str, slot: int, start: int, stop: int,
    seed: int, row_block: int, scale: float, dtype: str, held: np.ndarray | None = None,
) -> np.ndarray:
    """Write uniform [0, scale) initial factors for rows ``[start, stop)``; return their Gram.
    With ``held`` (the side's factors whole, held by a local fit: ``LocalState``) the rows go
    into it too, so the first half-sweep does not read them back from Zarr.

    Each row block has its own seed, so the result does not depend on how blocks are grouped.
    """
    array = _factor_array(model_location, storage_options, side, slot)
    gram = np.zeros((array.shape[1], array.shape[1]))
    for lo in range(start, stop, row_block):
        hi = min(stop, lo + row_block)
        rows = initial_rows(side, lo, hi, array.shape[1], seed, row_block, scale, dtype)
        if held is not None:
            held[lo:hi] = rows
        write_rows(array, lo, hi, rows)  # the slot is no checkpoint's yet: straight to its chunk files
        gram += block_gram(rows)
    return gram


def initial_rows(side: str, lo: int, hi: int, factors: int, seed: int, row_block: int, scale: float, dtype: str) -> np.ndarray:
    """The initial factors of rows ``[lo, hi)`` of one row block (``lo`` a multiple of
    ``row_block``): what ``init_task`` writes (tools/bench_vs_implicit.py starts implicit from them)."""
    rng = np.random.default_rng([seed, 0 if side == "user" else 1, lo // row_block])
    return (rng.random((hi - lo, factors)) * scale).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Running a half-sweep
# ---------------------------------------------------------------------------------------------


class LargestFirst:
    """A local half-sweep's tasks, handed out largest first: each Dask task of the half-sweep
    solves the largest task not yet taken (``solve_next``), so the half-sweep ends on small tasks
    whatever order the scheduler starts its tasks in (the threaded scheduler follows its own
    graph order, not the list's). Work of a task: its entries plus ``factors / 2`` a row (a
    row's dense products, 4 f^2, weigh as much as that many entries' 8 f each)."""

    def __init__(self, tasks: Sequence[SolveTask], factors: int):
        weight = [t.nnz + (t.row_stop - t.row_start) * factors // 2 for t in tasks]
        self.tasks = [tasks[i] for i in sorted(range(len(tasks)), key=lambda i: -weight[i])]
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> SolveTask:
        with self._lock:
            task = self.tasks[self._next]
            self._next += 1
            return task


def solve_next(job: HalfSweepJob, queue: LargestFirst, local: LocalState) -> TaskResult:
    """``solve_task`` on the largest task of ``queue`` not yet taken (local half-sweeps)."""
    return solve_task(job, queue.take(), local)


def run_half_sweep(job: HalfSweepJob, tasks: Sequence[SolveTask], local: LocalState | None, executor: Executor,
                   bar, label: str) -> list[TaskResult]:
    """Run every task of a planned half-sweep; results come back in task order.

    The local state and the job go in as one opaque key each: passed plainly, dask walks (and may
    rebuild) a dataclass argument's fields for every task, here dicts of factor arrays and cached
    shards (measured: 1.2 s of the driver's time before the first task of a 32-task half-sweep).
    A local half-sweep hands its tasks out largest first (``LargestFirst``): the last task to
    finish is then a small one, so neither thread waits long for the other at the end."""
    shared = dask.delayed(job, name=f"job-{label}", traverse=False)  # walked once, not once a task
    if local is None:
        delayed = [
            dask.delayed(solve_task, pure=False)(shared, task, None, dask_key_name=f"solve-{label}-{task.name}")
            for task in tasks
        ]
    else:
        held = dask.delayed(local, name=f"local-{label}", traverse=False)
        queue = dask.delayed(LargestFirst(tasks, job.config.factors), name=f"queue-{label}", traverse=False)
        delayed = [
            dask.delayed(solve_next, pure=False)(shared, queue, held, dask_key_name=f"solve-{label}-{i:05d}")
            for i in range(len(tasks))
        ]
    try:
        results = executor.run(delayed, bar, prefix=f"solve-{label}")
    except BaseException:
        if local is not None:
            local.drain(raise_errors=False)  # no write outlives the half-sweep, failed or not
        raise
    if local is None:
        return results
    local.drain()
    by_task = {(r.shard, r.part): r for r in results}
    return [by_task[(t.shard, t.part)] for t in tasks]
