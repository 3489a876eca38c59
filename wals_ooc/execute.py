"""Running a stage's tasks: one interface over Dask's threaded scheduler and a distributed Client.

Every stage (train, serve, evaluate, tune, index, export) builds a list of ``dask.delayed``
tasks and hands them to an ``Executor``. This module is the only place that knows a local
thread pool from a cluster: stages ask it how many tasks share a process (to divide the memory
budget), whether tasks run in this process (to share in-memory state with them), and to run a
function once in every process (to drop caches).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence

import dask
import numpy as np
import threadpoolctl
from dask.callbacks import Callback

from .errors import SettingError

_blas_limited = False


def single_threaded_blas_in_worker() -> None:
    """On a distributed worker, cap BLAS at one thread, once: the parallelism is one task per
    thread, and a BLAS pool per task would oversubscribe the cores (and spin while it waits).
    Locally ``Executor.single_threaded_blas`` caps BLAS around the computation instead."""
    global _blas_limited
    if _blas_limited:
        return
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return
    threadpoolctl.threadpool_limits(1, user_api="blas")
    _blas_limited = True


class _TaskProgress(Callback):
    """Advances a progress bar as threaded-scheduler tasks whose key starts with a prefix finish."""

    def __init__(self, bar, prefix: str):
        super().__init__()
        self.bar, self.prefix = bar, prefix

    def _posttask(self, key, result, dsk, state, worker_id):
        if isinstance(key, str) and key.startswith(self.prefix):
            self.bar.update(1)


def checked_threads(threads: Any) -> int | None:
    """``threads`` if it is None or an integer >= 0 (0 and None: all cores), else SettingError."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
        raise SettingError(f"threads must be an integer >= 1 (0 or None: all cores), got {threads!r}",
                           flags={"threads must": "--threads must"})
    return int(threads)


class Executor:
    """Where tasks run: ``threads`` local threads (``client=None``) or a distributed Client's workers.

    threads: local task threads (default: all cores); ignored with a client, whose workers
    decide. retries: how often a task is retried when a worker dies (cluster only).
    """

    def __init__(self, client: Any = None, threads: int | None = None, retries: int = 3):
        self.client = client
        self._threads = checked_threads(threads)
        self.retries = retries

    @classmethod
    def of(cls, executor: "Executor | None" = None, client: Any = None, threads: int | None = None) -> "Executor":
        """An executor passed through, or one made from a client and a thread count."""
        return executor if executor is not None else cls(client, threads)

    @property
    def is_local(self) -> bool:
        """Tasks run in this process, so they can share in-memory state with the caller."""
        return self.client is None

    @property
    def threads_per_process(self) -> int:
        """Tasks that run at once in one process: the concurrency a per-process plan budgets for."""
        if self.client is None:
            return self._threads or os.cpu_count() or 1
        per_worker = self.client.nthreads()
        return max(per_worker.values()) if per_worker else 1

    @property
    def total_threads(self) -> int:
        """Tasks that run at once over all processes."""
        if self.client is None:
            return self.threads_per_process
        return sum(self.client.nthreads().values()) or 1

    def check_reachable(self, *locations: str | None) -> None:
        """Refuse locations the tasks cannot reach: a ``memory://`` store lives in this process's
        memory, which a distributed Client's worker processes do not share (they would find no
        store, or an empty one of their own)."""
        if self.client is None:
            return
        for location in locations:
            if location is not None and str(location).startswith("memory://"):
                from .errors import PathError

                raise PathError(f"{location} lives in this process's memory, which the workers of a distributed "
                                "client cannot reach: use a path or an object store (s3://...) the workers share, "
                                "or run without a client", flags={"client": "--scheduler/--workers"})

    def describe(self) -> str:
        if self.client is None:
            return f"threaded, {self.threads_per_process} thread(s)"
        return f"distributed, {len(self.client.nthreads())} worker(s) x {self.threads_per_process} thread(s)"

    @contextlib.contextmanager
    def single_threaded_blas(self) -> Iterator[None]:
        """BLAS at one thread while local tasks run (each task is one thread's work); workers cap
        their own BLAS in ``single_threaded_blas_in_worker``."""
        if self.client is None:
            with threadpoolctl.threadpool_limits(1, user_api="blas"):
                yield
        else:
            yield

    def run(self, tasks: Sequence, bar=None, prefix: str = "") -> list:
        """Compute Dask delayed tasks and return their results in order.

        bar: a progress bar advanced once per finished task whose key starts with ``prefix``.
        """
        if not tasks:
            return []
        if self.client is not None:
            from distributed import as_completed

            futures = self.client.compute(list(tasks), retries=self.retries)
            for _ in as_completed(futures):
                if bar is not None:
                    bar.update(1)
            return self.client.gather(futures)
        with contextlib.ExitStack() as stack:
            stack.enter_context(dask.config.set(scheduler="threads", num_workers=self.threads_per_process))
            if bar is not None:
                stack.enter_context(_TaskProgress(bar, prefix))
            return list(dask.compute(*tasks))

    def run_everywhere(self, function: Callable[[], Any]) -> None:
        """Call ``function()`` in this process and in every worker process (e.g. to drop caches).

        A dead worker has nothing left to release, so failures on workers are ignored.
        """
        function()
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.run(function)


@contextlib.contextmanager
def connect(scheduler: str | None = None, workers: int | None = None, threads_per_worker: int = 1) -> Iterator[Any]:
    """A distributed Client of the scheduler at ``scheduler``, or of a LocalCluster of ``workers``
    worker processes started here (closed on exit); None (the threaded scheduler) for neither."""
    if scheduler:
        from distributed import Client

        with Client(scheduler) as client:
            yield client
    elif workers:
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True) as cluster, \
                Client(cluster) as client:
            yield client
    else:
        yield None


def run_tasks(tasks: Sequence, client: Any = None, threads: int = 1, bar=None, prefix: str = "", retries: int = 3) -> list:
    """``Executor(client, threads, retries).run(tasks, bar, prefix)``."""
    return Executor(client, threads, retries).run(tasks, bar, prefix)


__all__ = ["Executor", "connect", "run_tasks", "single_threaded_blas_in_worker"]
