"""A half-sweep's sums in a fixed shape: the same bits however its rows were cut into tasks.

The Gram matrix X^T X of the solved side (the next half-sweep's ``gram``) and the pieces of the
objective are sums over every solved row. Summed task by task, their rounding would follow the
plan's task cut, and the cut follows the memory allowance: the budget less the process's RSS
when training starts, which is larger after a cold numba compile, or when the caller holds
data. Two runs of one seed on one store would then differ in the last bits, and training
amplifies such differences. So the rows are cut at the store's row blocks (fixed by the data),
each block's Gram is computed on its own, and the blocks are added along one binary tree over
the block numbers: node ``(level, i)`` holds blocks ``[i * 2**level, (i + 1) * 2**level)``, the
sum of its two children, left plus right (a node whose right child lies past the last block is
its left child). A task returns the nodes lying wholly inside its rows (at most about 2 log2 of
its blocks: the driver never holds a Gram per block), and the driver completes the tree.
Scalars are summed exactly (``math.fsum``), so their order does not matter.

A task that covers a row block only in part (a blocked plan's pieces of a heavy block) returns
that part's Gram with its first row; the driver adds a block's parts in row order. Such a sum
depends on the cut, as a blocked plan's arithmetic does anyway (see README, Reproducibility).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np


def block_ranges(start: int, stop: int, row_block: int) -> list[tuple[int, int]]:
    """Rows ``[start, stop)`` cut at every multiple of ``row_block`` (absolute row numbers)."""
    if row_block <= 0:
        return [(start, stop)] if stop > start else []
    cuts = [start] + list(range((start // row_block + 1) * row_block, stop, row_block)) + [stop]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


@dataclass
class GramPieces:
    """A task's share of the Gram tree: whole nodes by (level, index), and parts of row blocks
    it covers only in part, as (block, first row, Gram)."""

    nodes: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    parts: list[tuple[int, int, np.ndarray]] = field(default_factory=list)

    def arrays(self) -> Iterable[np.ndarray]:
        yield from self.nodes.values()
        yield from (gram for _, _, gram in self.parts)

    def finite(self) -> bool:
        return all(bool(np.isfinite(a).all()) for a in self.arrays())


def task_pieces(ranges: list[tuple[int, int]], grams: list[np.ndarray], row_block: int, n_rows: int) -> GramPieces:
    """The tree nodes inside one task's rows, from the Grams of its ``ranges`` (``block_ranges``)."""
    pieces = GramPieces()
    level_nodes: dict[int, np.ndarray] = {}
    for (a, b), gram in zip(ranges, grams):
        block = a // row_block
        whole = a % row_block == 0 and (b - a == row_block or b == n_rows)
        if whole:
            level_nodes[block] = gram
        else:
            pieces.parts.append((block, a, gram))
    level = 0
    while level_nodes:
        parents: dict[int, np.ndarray] = {}
        for i in sorted(level_nodes):
            if i % 2 == 0 and i + 1 in level_nodes:
                parents[i // 2] = level_nodes[i] + level_nodes[i + 1]
            elif i % 2 == 1 and i - 1 in level_nodes:
                continue  # added into its left sibling's parent
            else:
                pieces.nodes[(level, i)] = level_nodes[i]  # its sibling lies outside this task
        level_nodes = parents
        level += 1
    return pieces


def tree_sum(all_pieces: Iterable[GramPieces], n_rows: int, row_block: int) -> np.ndarray:
    """The Gram of all ``n_rows`` rows from every task's pieces: the root of the tree."""
    n_blocks = max(1, -(-n_rows // row_block))
    by_level: dict[int, dict[int, np.ndarray]] = {}
    parts: dict[int, list[tuple[int, np.ndarray]]] = {}
    for pieces in all_pieces:
        for (level, i), gram in pieces.nodes.items():
            by_level.setdefault(level, {})[i] = gram
        for block, first, gram in pieces.parts:
            parts.setdefault(block, []).append((first, gram))
    leaves = by_level.setdefault(0, {})
    for block, block_parts in parts.items():  # a block's parts, in row order
        block_parts.sort(key=lambda part: part[0])
        total = block_parts[0][1].copy()
        for _, gram in block_parts[1:]:
            total = total + gram
        leaves[block] = total
    given = {(level, i) for level, nodes in by_level.items() if level > 0 for i in nodes}
    top = max((level for level, _ in given), default=0)

    def covered(level: int, i: int) -> bool:  # inside a node a task gave whole
        return any((up, i >> (up - level)) in given for up in range(level + 1, top + 1))

    level, count = 0, n_blocks
    current = by_level.pop(0)
    while count > 1:
        parents = by_level.pop(level + 1, {})
        for p in range(-(-count // 2)):
            if p in parents or covered(level + 1, p):
                continue
            left, right = 2 * p, 2 * p + 1
            for i in (left, right)[: 2 if right < count else 1]:
                if i not in current:
                    raise ValueError(f"the half-sweep's tasks left rows of block {i << level} without a Gram")
            parents[p] = current[left] + current[right] if right < count else current[left]
        current, level, count = parents, level + 1, -(-count // 2)
    if 0 not in current:
        raise ValueError("the half-sweep's tasks left rows without a Gram")
    return current[0]


def exact_sum(values: Iterable[float]) -> float:
    """The correctly rounded sum of ``values``, whatever their order."""
    return math.fsum(values)
