"""Memory budget: parse it, measure the process against it, and split it between consumers.

Every stage takes a ``memory_budget`` (bytes, or a string such as ``"2GB"``) that caps the
peak resident set size (RSS) of the process running it. The interpreter and libraries already
hold some memory when a stage starts; what is left is the stage's *allowance*, which planners
divide between shards, buffers and caches.
"""

from __future__ import annotations

import math
import numbers
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import psutil
from .errors import MemoryBudgetError

DEFAULT_BUDGET_FRACTION = 0.5
MIN_ALLOWANCE = 64 * 2**20


def format_bytes(n: int) -> str:
    """``n`` bytes for a person, e.g. "1.50 GiB" (dask's spelling; dask is imported on first use
    so that commands which need no scheduler start quickly)."""
    from dask.utils import format_bytes as dask_format_bytes

    return dask_format_bytes(n)


def parse_bytes(text: str) -> int:
    """A size such as "4GB" or "512MiB" as a byte count (dask's parser, imported on first use)."""
    from dask.utils import parse_bytes as dask_parse_bytes

    return dask_parse_bytes(text)


def default_memory_budget() -> int:
    """Half of the machine's total RAM: room for the OS page cache that out-of-core work relies on."""
    return int(psutil.virtual_memory().total * DEFAULT_BUDGET_FRACTION)


def to_bytes(budget: int | float | str | None) -> int:
    """Budget as a byte count; ``None`` means the default fraction of RAM."""
    if budget is None:
        return default_memory_budget()
    given = budget
    if isinstance(budget, str):
        try:
            budget = parse_bytes(budget)
        except (ValueError, TypeError, OverflowError):  # "1e400" overflows to inf in parse_bytes
            raise MemoryBudgetError(f"memory budget must be a size such as 4GB or 512MiB, got {given!r}",
                                    flags={"memory budget": "--memory-budget"}) from None
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget) \
            or budget < 1:  # NaN, inf, under one byte (0.5 would truncate to 0)
        raise MemoryBudgetError(f"memory budget must be a positive size, got {given!r}",
                                flags={"memory budget": "--memory-budget"})
    return int(budget)


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    return psutil.Process().memory_info().rss


def _vm_hwm() -> int | None:
    """VmHWM from /proc/self/status in bytes; None without /proc (not Linux)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss() -> int:
    """Highest resident set size this process has reached, in bytes.

    Linux: VmHWM of this address space. ``ru_maxrss`` is not used there because it survives
    ``execve``: a child started from a large parent would report the parent's peak.
    """
    high_water = _vm_hwm()
    if high_water is not None:
        return high_water
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, others KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


_warmed = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 1 << 20
# malloc arenas at most (glibc's default is 8 per core): each thread allocates from its arena, and
# what a thread frees stays in its arena, resident, until that arena reuses it. Streaming stages
# run a dozen short-lived threads (readers, parse and map helpers, assembly, Zarr's encoders):
# with an arena each, their freed buffers add up (measured: 14 arenas holding ~80 MiB free during
# conversion at a 256 MiB allowance). Few arenas share those pages between the threads instead.
ARENA_MAX = 2


def return_freed_memory_to_os() -> None:
    """Make freed buffers leave the RSS: large allocations through mmap (glibc's default
    threshold grows to 32 MiB, after which freed batch buffers stay resident), and Arrow on the
    system allocator instead of its own caching pool. Streaming allocates and frees one batch
    after another; without this the RSS climbs well past the data actually alive."""
    import ctypes
    import ctypes.util

    import pyarrow as pa

    global _mallopt, _malloc_trim
    pa.set_memory_pool(pa.system_memory_pool())
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 20)
        # glibc fixes its arena limit when the ninth arena is made: this runs first (at warm-up)
        libc.mallopt(_M_ARENA_MAX, ARENA_MAX)
        _mallopt = libc.mallopt
        _malloc_trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return


_mallopt = None  # glibc's mallopt, once ``return_freed_memory_to_os`` has found it
_malloc_trim = None  # and its malloc_trim


def release_free_heap() -> None:
    """Give the free memory malloc's heaps still hold back to the OS (glibc ``malloc_trim``:
    every arena, free pages inside them too). Between a stage's passes, so what one pass freed
    is not still resident when the next one allocates (buffers of up to ``reuse_threshold``
    come from those heaps while ``reused_large_buffers`` is on)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class HeapGuard:
    """Keeps freed heap memory from pushing the RSS past a mark: a thread reads the RSS every
    ``period`` seconds and gives malloc's free memory back (``release_free_heap``) whenever the
    RSS is above ``mark``. What a stage plans for (its buffers) is what it holds alive; the free
    memory malloc keeps for reuse (``reused_large_buffers``) is what it cannot plan, so it is
    released when it would crowd the budget, and kept otherwise. ``highest`` is the largest RSS
    sampled; ``trims`` counts the releases."""

    def __init__(self, mark: int, step: int = 4 << 20, period: float = 0.004):
        self.mark, self.step, self.period = mark, step, period
        self.highest = 0
        self.trims = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HeapGuard:
        try:
            fd = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:  # not Linux: nothing to watch
            return self
        page = os.sysconf("SC_PAGE_SIZE")

        def watch() -> None:
            try:
                trimmed_at = 0  # RSS after the last release: while live data alone holds the RSS
                # above the mark, release again only once it has grown by a step (or 50 ms on)
                last = 0.0
                while not self._stop.wait(self.period):
                    rss = int(os.pread(fd, 128, 0).split()[1]) * page
                    self.highest = max(self.highest, rss)
                    now = time.monotonic()
                    if rss > self.mark and _malloc_trim is not None and (rss > trimmed_at + self.step
                                                                         or now - last > 0.05):
                        _malloc_trim(0)
                        self.trims += 1
                        last = now
                        trimmed_at = int(os.pread(fd, 128, 0).split()[1]) * page
            finally:
                os.close(fd)

        self._thread = threading.Thread(target=watch, name="wals-ooc-heap-guard", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


_reuse_lock = threading.Lock()
_reuse_depth = 0
REUSE_THRESHOLD_MAX = 4 << 20


def reuse_threshold(allowance: int) -> int:
    """The mmap threshold while streaming under ``allowance``: 1/64 of it, between
    ``MMAP_THRESHOLD`` and ``REUSE_THRESHOLD_MAX`` (64 KiB steps)."""
    return min(REUSE_THRESHOLD_MAX, max(MMAP_THRESHOLD, (allowance // 64) >> 16 << 16))


@contextmanager
def reused_large_buffers(allowance: int) -> Iterator[None]:
    """While inside, allocations up to ``reuse_threshold(allowance)`` come from malloc's heap
    instead of a fresh mmap each, so a stage that allocates and frees buffers of a few MiB
    over and over (batches, chunk encodes) reuses their pages instead of faulting in new ones
    (conversion of 20M rows at a 256 MiB allowance: 350k -> 120k minor faults, ~0.7 CPU-s).
    The price is memory that freed heap chunks keep (about 10 times the threshold, measured),
    so the threshold scales with the allowance and stays at ``MMAP_THRESHOLD`` for small ones.
    Process-wide (glibc has one threshold): nested or concurrent uses keep the first one's."""
    global _reuse_depth
    threshold = reuse_threshold(allowance)
    with _reuse_lock:
        _reuse_depth += 1
        if _reuse_depth == 1 and _mallopt is not None and threshold > MMAP_THRESHOLD:
            _mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        with _reuse_lock:
            _reuse_depth -= 1
            if _reuse_depth == 0 and _mallopt is not None:
                _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def warm_libraries() -> None:
    """Import the package's stages and initialise the libraries' fixed state (Arrow's compute
    kernels and CSV parser, Zarr's codecs, the id-map kernels) once, so the baseline a budget is measured from includes it and the allowance is
    left for data. These costs are tens of MB whatever the data size."""
    global _warmed
    if _warmed:
        return
    return_freed_memory_to_os()
    import importlib

    # the package's stages (and numba, dask, pyarrow under them): ``import wals_ooc`` loads them
    # lazily, so a baseline measured before first use would leave their import for the allowance
    for module in ("wals_ooc.model", "wals_ooc.store.writer", "wals_ooc.evaluate.split"):
        importlib.import_module(module)
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import zarr
    import zarr.codecs

    table = pacsv.read_csv(pa.BufferReader(b"a,b,c\n1,x,2.5\n"), read_options=pacsv.ReadOptions(use_threads=False))
    pc.cast(pc.cast(table.column("a"), pa.string()), pa.int64())
    pc.cast(pa.array(["1.5"]), pa.float64())
    pc.unique(table.column("b"))
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=(4,), dtype="int32", chunks=(2,),
                              compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"))
    array[:] = np.arange(4, dtype=np.int32)
    from .kernels.warm import warm_id_kernels

    warm_id_kernels()  # id maps and input parsing: every stage reads or writes ids
    _warmed = True


@dataclass(frozen=True)
class MemoryBudget:
    """A peak-RSS cap and the part of it still free for a stage's own data.

    total: the cap on the process's peak RSS, in bytes.
    baseline: RSS when the stage started (interpreter, libraries, caller's data).
    """

    total: int
    baseline: int

    @classmethod
    def start(cls, budget: int | float | str | None) -> MemoryBudget:
        """Measure the process now and check the budget leaves a usable allowance."""
        total = to_bytes(budget)
        warm_libraries()
        baseline = current_rss()
        if total - baseline < MIN_ALLOWANCE:
            raise MemoryBudgetError(
                f"memory budget {format_bytes(total)} leaves less than {format_bytes(MIN_ALLOWANCE)} "
                f"for data: this process already uses {format_bytes(baseline)}"
            )
        return cls(total=total, baseline=baseline)

    @property
    def allowance(self) -> int:
        """Bytes the stage may allocate for its own data, above the baseline."""
        return self.total - self.baseline

    def describe(self) -> str:
        return (
            f"budget {format_bytes(self.total)} (process at start {format_bytes(self.baseline)}, "
            f"allowance {format_bytes(self.allowance)})"
        )


__all__ = [
    "MemoryBudget",
    "MemoryBudgetError",
    "current_rss",
    "default_memory_budget",
    "format_bytes",
    "peak_rss",
    "to_bytes",
]
