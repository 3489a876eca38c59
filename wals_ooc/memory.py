"""Memory budget: parse it, measure the process against it, and split it between consumers.

Every stage takes a ``memory_budget`` (bytes, or a string such as ``"2GB"``) that caps the
peak resident set size (RSS) of the process running it. The interpreter and libraries already
hold some memory when a stage starts; what is left is the stage's *allowance*, which planners
divide between shards, buffers and caches.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import psutil
from dask.utils import format_bytes, parse_bytes

DEFAULT_BUDGET_FRACTION = 0.5
MIN_ALLOWANCE = 16 * 2**20


class MemoryBudgetError(ValueError):
    """The budget cannot hold even the smallest unit of work."""


def default_memory_budget() -> int:
    """Half of the machine's total RAM: room for the OS page cache that out-of-core work relies on."""
    return int(psutil.virtual_memory().total * DEFAULT_BUDGET_FRACTION)


def to_bytes(budget: int | float | str | None) -> int:
    """Budget as a byte count; ``None`` means the default fraction of RAM."""
    if budget is None:
        return default_memory_budget()
    if isinstance(budget, str):
        return int(parse_bytes(budget))
    if budget <= 0:
        raise MemoryBudgetError(f"memory budget must be positive, got {budget}")
    return int(budget)


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Highest resident set size this process has reached, in bytes (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
