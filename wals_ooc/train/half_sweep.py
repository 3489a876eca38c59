"""Executing a half-sweep plan: one Dask task per row range, each reading its CSR rows, solving
them with a numba kernel against the fixed factors, and writing its factor rows to Zarr.

Tasks take and return only small objects (paths, row ranges, an f x f Gram matrix, a few
floats): factor matrices go from Zarr to the worker and back to Zarr, never through the
scheduler. The same functions run under the threaded scheduler and on distributed workers.
Writes are idempotent (a fixed row range of a fixed slot), so a retried task is harmless.

Each task also returns the Gram matrix of the rows it solved: their sum is the fixed-side Gram
of the next half-sweep, so no separate pass over the factors is needed.

Under the threaded scheduler the driver passes a ``LocalState``: both factor sides held whole
in memory (so nothing is read back from Zarr) and a pinned cache of CSR rows filled up to the
plan's spare bytes. On a cluster each worker process keeps the fixed side of the running
half-sweep, read once from Zarr and shared by its threads.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import dask
import numpy as np

from ..config import WALSConfig
from ..execute import Executor, single_threaded_blas_in_worker
from ..kernels.gram import block_gram
from ..kernels.loss import gram_quadratic, observed_loss_block, regularization_sum
from ..kernels.solve import (
    CONFIDENCE_KINDS,
    accumulate_block,
    cg_solve_rows,
    cholesky_solve_rows,
    solve_accumulated,
)
from ..store.format import open_group
from ..store.reader import CSRShard, InteractionStore
from .plan import SolveTask

# ---------------------------------------------------------------------------------------------
# Per-process state: opened stores, and (on cluster workers) the running half-sweep's fixed side
# ---------------------------------------------------------------------------------------------

_lock = threading.RLock()
_opened: dict[tuple, Any] = {}
_worker_fixed: dict[tuple, np.ndarray] = {}
_worker_shards: dict[tuple, "LocalState"] = {}  # CSR shards a worker keeps between half-sweeps


def _interactions(location: str, storage_options: dict | None) -> InteractionStore:
    with _lock:
        key = ("interactions", location)
        if key not in _opened:
            _opened[key] = InteractionStore(location, storage_options)
        return _opened[key]


def _factor_array(location: str, storage_options: dict | None, side: str, slot: int):
    with _lock:
        key = ("factors", location, side, slot)
        if key not in _opened:
            _opened[key] = open_group(location, "r+", storage_options)[side][str(slot)]
        return _opened[key]


def _fixed_on_worker(job: HalfSweepJob) -> np.ndarray:
    """The whole fixed side, read once per worker process per half-sweep and shared by its threads."""
    key = (job.model, job.fixed_side, job.fixed_slot, job.step)
    with _lock:
        if key not in _worker_fixed:
            _worker_fixed.clear()  # drop the previous half-sweep's side before reading this one
            array = _factor_array(job.model, job.storage_options, job.fixed_side, job.fixed_slot)
            _worker_fixed[key] = np.ascontiguousarray(array[:])
        return _worker_fixed[key]


def release_caches() -> None:
    """Forget opened stores, and any fixed side and shards held by this process."""
    with _lock:
        _worker_fixed.clear()
        _worker_shards.clear()
        _opened.clear()


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
    """

    cache_bytes: int = 0
    factors: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    shard_cache: dict[tuple, CSRShard] = field(default_factory=dict)
    cached_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

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
            self.factors[side] = (np.ascontiguousarray(array[:]), slot)
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


@dataclass
class TaskResult:
    """What a task reports: timing, its rows' pieces of the objective, and their Gram matrix."""

    shard: int
    part: int
    rows: int
    nnz: int
    seconds: float
    gram: np.ndarray | None = None
    quadratic: float = 0.0
    observed: float = 0.0
    regularization: float = 0.0
    failures: int = 0


def _kernel_scalars(config: WALSConfig):
    t = config.np_dtype.type
    return CONFIDENCE_KINDS[config.confidence], t(config.alpha), t(config.alpha0), t(config.eps)


def solve_task(job: HalfSweepJob, task: SolveTask, local: LocalState | None = None) -> TaskResult:
    """Solve rows ``[task.row_start, task.row_stop)`` of ``job.side`` and write them to ``job.out_slot``."""
    started = time.perf_counter()
    single_threaded_blas_in_worker()
    cfg = job.config
    store = _interactions(job.interactions, job.storage_options)
    lo_row, hi_row = task.row_start, task.row_stop
    if local is not None:
        csr = local.rows(store, job.side, lo_row, hi_row)
    elif job.shard_cache_bytes:
        csr = _shard_cache_on_worker(job).rows(store, job.side, lo_row, hi_row)
    else:
        csr = store.rows(job.side, lo_row, hi_row)
    f = cfg.factors
    kind, alpha, alpha0, eps = _kernel_scalars(cfg)
    lam, nu = float(cfg.regularization), float(cfg.nu)
    result = TaskResult(task.shard, task.part, csr.n_rows, csr.nnz, 0.0)

    if local is not None and job.mode == "resident":
        own = local.factors[job.side][0]
        X = own[lo_row:hi_row]  # a view: solved in place
    elif job.solver == "cg":
        X = np.ascontiguousarray(_factor_array(job.model, job.storage_options, job.side, job.warm_slot)[lo_row:hi_row])
    else:
        X = np.zeros((csr.n_rows, f), dtype=cfg.np_dtype)

    if job.mode == "resident":
        Y = local.factors[job.fixed_side][0] if local is not None else _fixed_on_worker(job)
        if job.solver == "cg":
            result.observed = cg_solve_rows(
                csr.indptr, csr.indices, csr.values, Y, job.gram, X, kind, alpha, alpha0, eps, lam, nu, cfg.cg_steps, job.loss
            )
        else:
            result.failures = cholesky_solve_rows(csr.indptr, csr.indices, csr.values, Y, job.gram, X, kind, alpha, alpha0, eps, lam, nu)

        def fixed_blocks():
            yield 0, job.n_fixed, Y
    else:
        fixed = _factor_array(job.model, job.storage_options, job.fixed_side, job.fixed_slot)

        def fixed_blocks():
            for lo in range(0, job.n_fixed, job.block_rows):
                hi = min(job.n_fixed, lo + job.block_rows)
                yield lo, hi, np.ascontiguousarray(fixed[lo:hi])

        for b0 in range(0, csr.n_rows, job.row_batch):
            b1 = min(csr.n_rows, b0 + job.row_batch)
            indptr = csr.indptr[b0 : b1 + 1]
            A = np.zeros((b1 - b0, f, f), dtype=np.float64)
            b = np.zeros((b1 - b0, f), dtype=np.float64)
            cursor = indptr[:-1].copy()
            for lo, hi, Y_block in fixed_blocks():
                accumulate_block(indptr, csr.indices, csr.values, cursor, lo, hi, Y_block, A, b, kind, alpha, alpha0, eps)
            result.failures += solve_accumulated(indptr, A, b, job.gram, X[b0:b1], lam, nu, float(cfg.alpha0), job.n_fixed)
            del A, b

    result.regularization = regularization_sum(csr.indptr, X, lam, nu, float(cfg.alpha0), job.n_fixed)
    if job.loss:
        result.quadratic = gram_quadratic(X, job.gram)
    if job.loss and not (job.mode == "resident" and job.solver == "cg"):  # CG returned it already
        cursor = csr.indptr[:-1].copy()
        for lo, hi, Y_block in fixed_blocks():
            result.observed += observed_loss_block(csr.indptr, csr.indices, csr.values, cursor, lo, hi, Y_block, X, kind, alpha, alpha0, eps)

    _factor_array(job.model, job.storage_options, job.side, job.out_slot)[lo_row:hi_row] = X
    result.gram = block_gram(X)
    result.seconds = time.perf_counter() - started
    return result


def init_task(
    model_location: str, storage_options: dict | None, side: str, slot: int, start: int, stop: int,
    seed: int, row_block: int, scale: float, dtype: str,
) -> np.ndarray:
    """Write uniform [0, scale) initial factors for rows ``[start, stop)``; return their Gram.

    Each row block has its own seed, so the result does not depend on how blocks are grouped.
    """
    array = _factor_array(model_location, storage_options, side, slot)
    side_index = 0 if side == "user" else 1
    gram = np.zeros((array.shape[1], array.shape[1]))
    for lo in range(start, stop, row_block):
        hi = min(stop, lo + row_block)
        rng = np.random.default_rng([seed, side_index, lo // row_block])
        rows = (rng.random((hi - lo, array.shape[1])) * scale).astype(dtype)
        array[lo:hi] = rows
        gram += block_gram(rows)
    return gram


# ---------------------------------------------------------------------------------------------
# Running a half-sweep
# ---------------------------------------------------------------------------------------------


def run_half_sweep(job: HalfSweepJob, tasks: Sequence[SolveTask], local: LocalState | None, executor: Executor,
                   bar, label: str) -> list[TaskResult]:
    """Run every task of a planned half-sweep; results come back in task order."""
    delayed = [
        dask.delayed(solve_task, pure=False)(job, task, local, dask_key_name=f"solve-{label}-{task.name}")
        for task in tasks
    ]
    return executor.run(delayed, bar, prefix=f"solve-{label}")
