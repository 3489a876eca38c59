"""Plans you can see before a run: ``WALS.plan``, ``wals-ooc train --dry-run``, ``BudgetWarning``,
and property tests (hypothesis) of the planners: half-sweep tasks, shard bounds, assembly units."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wals_ooc import WALS, WALSConfig, open_store
from wals_ooc.errors import BudgetWarning
from wals_ooc.execute import Executor
from wals_ooc.memory import MemoryBudget
from wals_ooc.store.writer import assembly_units, plan_shard_bounds
from wals_ooc.synthetic import SyntheticSpec, write_synthetic_store
from wals_ooc.train.plan import (BLOCKED_BYTES_PER_ENTRY, HalfSweepPlan, TrainingPlan, blocked_cg_row_bytes,
                                 normal_equations_row_bytes, plan_half_sweep, split_rows, usable_bytes)
from wals_ooc.train.trainer import executor_plans

MiB = 1 << 20


def _tiles(plan: HalfSweepPlan, n_rows: int, row_block: int, nnz: int) -> None:
    """Tasks cover [0, n_rows) in order, contiguously, on row-block bounds, and hold every entry."""
    starts = [t.row_start for t in plan.tasks]
    stops = [t.row_stop for t in plan.tasks]
    if n_rows == 0:
        assert plan.tasks == []
        return
    assert starts[0] == 0 and stops[-1] == n_rows
    assert starts[1:] == stops[:-1], "a gap or an overlap between tasks"
    assert all(a < b for a, b in zip(starts, stops)), "an empty task"
    assert all(s % row_block == 0 for s in starts)
    assert all(s % row_block == 0 or s == n_rows for s in stops)
    assert sum(t.nnz for t in plan.tasks) == nnz


def test_plan_shows_both_half_sweeps_and_writes_nothing(small_store, tmp_path):
    before = sorted(os.listdir(os.path.dirname(small_store)))
    plan = WALS(factors=8, iterations=3, threads=2).plan(small_store)
    assert isinstance(plan, TrainingPlan) and plan.within_budget
    store = open_store(small_store)
    for side in ("user", "item"):
        assert plan[side].side == side and plan[side].mode == "resident"
        assert plan[side].peak_bytes <= plan[side].usable_bytes <= plan[side].allowance
        _tiles(plan[side], store.n_rows(side), store.row_block, store.nnz)
    text = str(plan)
    assert "user half-sweep" in text and "item half-sweep" in text and "within budget" in text
    assert plan.model.endswith("small-model.zarr") and plan.model_state == "new"
    assert sorted(os.listdir(os.path.dirname(small_store))) == before  # nothing created beside the store


def test_dry_run_prints_the_plans_and_creates_no_path(small_store, tmp_path, capsys):
    from wals_ooc.cli import main

    model = tmp_path / "model.zarr"
    assert main(["train", small_store, "--model", str(model), "--factors", "8", "--dry-run", "-q"]) == 0
    out = capsys.readouterr().out
    assert f"-> {model} (new)" in out and "user half-sweep" in out and "resident" in out
    assert not model.exists() and os.listdir(tmp_path) == []
    from wals_ooc.memory import current_rss
    # a small budget, above what this process holds already (earlier tests' compiled kernels and
    # heap raise it: a fixed 1GB failed when the kernel tests ran just before)
    small = (current_rss() >> 20) + 512
    blocked = main(["train", small_store, "--model", str(model), "--factors", "8", "--dry-run",
                    "--memory-budget", f"{small}MB", "--threads", "1"])
    assert blocked == 0 and not model.exists()


@pytest.fixture(scope="module")
def one_block_store(tmp_path_factory):
    """About 1,200 items in one row block (row_block 4096): the item side cannot be split into tasks."""
    path = str(tmp_path_factory.mktemp("plan") / "one-block.zarr")
    write_synthetic_store(SyntheticSpec(n_users=60, n_items=2500, rows=4000, clusters=3, seed=2), path,
                          row_block=4096, progress=False)
    return path


def test_a_plan_over_its_allowance_warns_and_says_what_to_change(one_block_store):
    """Streamed with CG as one task (whole row blocks, as asked), the one block is over the
    smallest allowance: a warning says what to change. By default the block is cut by rows (from
    its row pointers) into pieces that expand, and the plan fits."""
    store = open_store(one_block_store)
    budget = MemoryBudget(total=1 << 30, baseline=(1 << 30) - 64 * MiB)  # the smallest allowance there is
    config = WALSConfig(factors=2048)
    with pytest.warns(BudgetWarning, match="item half-sweep plans a peak of .* raise memory_budget"):
        plans = executor_plans(store, config, Executor(threads=2), budget, blocked_method="cg")
    assert plans["item"].mode == "blocked" and not plans["item"].within_budget
    assert "OVER budget" in plans["item"].describe()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)  # cut by rows, or a roomy budget: no warning at all
        local = executor_plans(store, config, Executor(threads=2), budget)
        roomy = executor_plans(store, config, Executor(threads=2), MemoryBudget(total=8 << 30, baseline=0))
    assert local["item"].mode == "blocked" and local["item"].within_budget
    assert any(t.row_start % store.row_block for t in local["item"].tasks)
    assert all(p.within_budget for p in roomy.values())


# -- property tests of the planners ----------------------------------------------------------------

def _shards(row_counts: np.ndarray, row_block: int, shard_nnz: int):
    """(shard ranges, per shard: first row of each row block and its entries) as the trainer makes them."""
    bounds = plan_shard_bounds(row_counts, row_block, shard_nnz)
    n = len(row_counts)
    starts = np.arange(0, n, row_block, dtype=np.int64)
    per_block = np.add.reduceat(row_counts, starts) if n else np.zeros(0, np.int64)
    ranges = list(zip(bounds[:-1], bounds[1:]))
    blocks = [(starts[(starts >= lo) & (starts < hi)], per_block[(starts >= lo) & (starts < hi)]) for lo, hi in ranges]
    return bounds, ranges, blocks


row_counts_st = st.lists(st.integers(0, 400), min_size=0, max_size=300).map(lambda c: np.array(c, np.int64))
fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(counts=row_counts_st, row_block=st.sampled_from([1, 3, 8, 32]), shard_nnz=st.integers(1, 5000))
def test_shard_bounds_are_row_block_multiples_covering_every_row(counts, row_block, shard_nnz):
    bounds = plan_shard_bounds(counts, row_block, shard_nnz)
    assert bounds[0] == 0 and bounds[-1] == len(counts)
    assert all(a < b for a, b in zip(bounds[:-1], bounds[1:])) or len(counts) == 0
    assert all(b % row_block == 0 for b in bounds[:-1])
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # over the target only when one row block is
        heaviest_block = max((int(counts[s:s + row_block].sum()) for s in range(lo, hi, row_block)), default=0)
        assert counts[lo:hi].sum() <= shard_nnz + heaviest_block


@fast
@given(counts=row_counts_st, row_block=st.sampled_from([1, 4, 16]), shard_nnz=st.integers(1, 3000),
       unit_nnz=st.integers(1, 2000))
def test_assembly_units_cover_the_shards_and_cut_at_every_shard_bound(counts, row_block, shard_nnz, unit_nnz):
    bounds = plan_shard_bounds(counts, row_block, shard_nnz)
    units = assembly_units(counts, bounds, unit_nnz)
    assert units[0] == 0 and units[-1] == len(counts)
    if len(counts) == 0:
        assert units == bounds == [0, 0]  # one empty unit, as the shards are one empty shard
        return
    assert units == sorted(set(units)), "units overlap or repeat"
    assert set(bounds) <= set(units), "a unit spans two shards"
    for lo, hi in zip(units[:-1], units[1:]):  # a unit over the target is one row, or holds at most about twice it
        assert hi - lo == 1 or counts[lo:hi].sum() <= 2 * unit_nnz


@fast
@given(weights=st.lists(st.integers(1, 1000), min_size=1, max_size=60), max_weight=st.integers(1, 3000))
def test_split_rows_cuts_whole_blocks_no_heavier_than_asked_where_a_block_allows(weights, max_weight):
    """Weights of row blocks are positive (every row costs its factor bytes)."""
    starts = np.arange(0, 4 * len(weights), 4)
    ranges = split_rows(starts, np.array(weights), 4 * len(weights) - 1, max_weight)
    assert ranges[0][0] == 0 and ranges[-1][1] == 4 * len(weights) - 1
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:]))
    for lo, hi in ranges:
        inside = [w for s, w in zip(starts, weights) if lo <= s < hi]
        assert inside, "an empty range"
        assert sum(inside) <= max_weight or len(inside) == 1


@fast
@given(
    counts=row_counts_st,
    row_block=st.sampled_from([1, 8, 32]),
    shard_nnz=st.integers(50, 5000),
    n_fixed=st.integers(1, 200_000),
    factors=st.sampled_from([4, 32, 128, 512]),
    allowance_mib=st.integers(64, 2048),
    concurrency=st.integers(1, 8),
    local=st.booleans(),
    processes=st.integers(1, 4),
    solver=st.sampled_from(["cg", "cholesky"]),
    max_block_rows=st.one_of(st.none(), st.integers(1, 5000)),
)
def test_half_sweep_plans_tile_the_rows_and_stay_within_the_allowance_where_a_row_block_can(
        counts, row_block, shard_nnz, n_fixed, factors, allowance_mib, concurrency, local, processes, solver,
        max_block_rows):
    _, ranges, blocks = _shards(counts, row_block, shard_nnz)
    allowance = allowance_mib * MiB
    plan = plan_half_sweep("user", ranges, blocks, n_fixed, factors, 4, solver, allowance, concurrency, local,
                           max_block_rows, 3, processes)
    _tiles(plan, len(counts), row_block, int(counts.sum()))
    assert plan.mode in ("resident", "blocked")
    if plan.mode == "resident":
        assert plan.within_budget and plan.peak_bytes <= usable_bytes(allowance)
    else:
        assert plan.concurrency == 1 and all(t.method in ("expanded", "cg", "cholesky") and t.sweeps >= 1
                                             for t in plan.tasks)
        assert plan.fixed_passes == sum(t.sweeps for t in plan.tasks)
    if not plan.within_budget:  # over only where one row block, streamed as cheaply as it can be, is too heavy
        assert plan.budget_problem() is not None
        row_bytes = 2 * factors * 4
        per_row = blocked_cg_row_bytes(factors, 4) if solver == "cg" else 0
        batch = normal_equations_row_bytes(factors) if solver == "cholesky" else 0
        heaviest_alone = max(int(nnz) * BLOCKED_BYTES_PER_ENTRY + (min(len(counts), s + row_block) - s) * (row_bytes + per_row)
                             + batch for starts, per in blocks for s, nnz in zip(starts, per))
        room = usable_bytes(allowance) - plan.block_rows * factors * 4
        assert heaviest_alone > room, "over budget although its row blocks could be planned within it"


@fast
@given(
    counts=row_counts_st,
    row_block=st.sampled_from([4, 32]),
    shard_nnz=st.integers(50, 5000),
    n_fixed=st.integers(1, 200_000),
    factors=st.sampled_from([4, 32]),
    task_kib=st.integers(1, 256),
)
def test_a_local_blocked_plan_cuts_heavy_row_blocks_by_rows_and_every_expanded_task_fits(
        counts, row_block, shard_nnz, n_fixed, factors, task_kib):
    """Given the rows' entry counts, a local blocked plan may cut row blocks by rows: its tasks still
    tile the rows and hold every entry, each expanded task fits what a task may take, and a task
    that cannot expand there is streamed (and counted in the plan's sweeps)."""
    _, ranges, blocks = _shards(counts, row_block, shard_nnz)
    room = task_kib << 10
    plan = plan_half_sweep("user", ranges, blocks, n_fixed, factors, 4, "cg", 1 << 30, 2, True, 1000, 3, 1,
                           row_counts=lambda a, b: counts[a:b], blocked_task_bytes=room)
    _tiles(plan, len(counts), 1, int(counts.sum()))
    assert all(t.nnz == int(counts[t.row_start:t.row_stop].sum()) for t in plan.tasks)
    from wals_ooc.kernels.solve import GATHER_MAX_ENTRIES, gathers_half

    # CG copies float16 rows where it gathers them, but float32 for rows over GATHER_MAX_ENTRIES
    short_row = factors * 2 if gathers_half(factors, 4) else factors * 4
    for task in plan.tasks:
        rows = task.row_stop - task.row_start
        if task.method == "expanded":
            assert task.sweeps == 1
            row_counts = counts[task.row_start:task.row_stop]
            long = int(row_counts[row_counts > GATHER_MAX_ENTRIES].sum()) if short_row < factors * 4 else task.nnz
            assert (task.nnz * 28 + min(task.nnz - long, n_fixed) * short_row + min(long, n_fixed) * factors * 4
                    + rows * 8 * factors <= room)
        else:
            assert task.method == "cg" and task.sweeps == 4
    assert plan.fixed_passes == sum(t.sweeps for t in plan.tasks)
    whole = plan_half_sweep("user", ranges, blocks, n_fixed, factors, 4, "cg", 1 << 30, 2, False, 1000, 3, 1,
                            row_counts=lambda a, b: counts[a:b], blocked_task_bytes=room)
    _tiles(whole, len(counts), row_block, int(counts.sum()))  # on a cluster, whole row blocks only


def test_a_plan_counts_the_solvers_own_bytes_in_every_task():
    """kernel_bytes (ialspp's kept block factors, 2 MiB at f = 512, b = 8, 2 sweeps) is held by
    each task beside its rows: the planned task and peak count it, and resident tasks are cut
    smaller to leave room for it."""
    from wals_ooc.kernels.subspace import kept_factor_bytes

    assert kept_factor_bytes(512, 8, 2) == 512 * 8 * 65 * 8 and kept_factor_bytes(512, 8, 1) == 8 * 8 * 65 * 8
    counts = np.full(3000, 40, np.int64)
    _, ranges, blocks = _shards(counts, 32, 4000)
    args = ("user", ranges, blocks, 5000, 512, 4, "ialspp", 200 * MiB, 2, True)
    plain = plan_half_sweep(*args)
    kept = plan_half_sweep(*args, kernel_bytes=kept_factor_bytes(512, 8, 2))
    assert plain.mode == kept.mode == "resident" and kept.tasks == plain.tasks
    assert kept.task_bytes == plain.task_bytes + kept_factor_bytes(512, 8, 2)
    assert kept.peak_bytes == plain.peak_bytes + 2 * kept_factor_bytes(512, 8, 2) and kept.within_budget
    left = (usable_bytes(200 * MiB) - (5000 + 3000) * 512 * 4) // 2  # what each of 2 tasks may take
    tight = plan_half_sweep(*args, kernel_bytes=left - 200_000)  # room for about one row block a task
    assert len(tight.tasks) > len(plain.tasks) and tight.task_bytes <= left


def test_the_trainer_plans_ialspp_with_its_kept_factors(small_store):
    """ialspp's tasks count the block factors kept across sweeps and the batch's gathered panel
    (4 MiB at f = 512 in float32); in the eigenbasis also a row block rotated (the store's row
    block, at least ``ROTATED_ROWS`` rows), and the resident plan the rotated fixed side."""
    from wals_ooc.kernels.subspace import kept_factor_bytes, panel_bytes
    from wals_ooc.train.fixed_side import ROTATED_ROWS
    from wals_ooc.train.trainer import make_plans

    store = open_store(small_store)
    base = make_plans(store, WALSConfig(factors=16, solver="cg"), 256 * MiB, 2)
    plain = make_plans(store, WALSConfig(factors=16, solver="cholesky"), 256 * MiB, 2)  # no copy of the fixed side
    for solver, eigen in (("ialspp", False), ("ialspp", True)):
        config = WALSConfig(factors=16, solver=solver, block_size=4, eigenbasis=eigen)
        plans = make_plans(store, config, 256 * MiB, 2)
        extra = kept_factor_bytes(16, 4, 2 if eigen else 3) + panel_bytes(16, 4)
        rotated = max(store.row_block, ROTATED_ROWS) * 16 * 4 if eigen else 0
        for side in ("user", "item"):
            assert plans[side].mode == "resident"
            assert plans[side].task_bytes == base[side].task_bytes + extra + rotated
            fixed = plans[side].n_fixed * 16 * 4 if rotated else 0
            assert plans[side].resident_bytes == plain[side].resident_bytes + fixed


def test_a_resident_cg_plan_counts_the_half_copy_of_the_fixed_side():
    """CG's float16 copy of the fixed side (``solve.gathers_half``: float32 rows that fuse) is held
    beside it: a resident plan counts its n_fixed x f x 2 bytes; none for other solvers or f."""
    from wals_ooc.kernels.solve import gathers_half
    from wals_ooc.kernels.tile import WIDE_BYTES

    f = 2 * (WIDE_BYTES // 4)
    assert gathers_half(f, 4) and not gathers_half(f, 8) and not gathers_half(f + 1, 4)
    counts = np.full(3000, 40, np.int64)
    _, ranges, blocks = _shards(counts, 32, 4000)
    cg, cholesky = (plan_half_sweep("user", ranges, blocks, 5000, f, 4, solver, 200 * MiB, 2, True) for solver in ("cg", "cholesky"))
    assert cg.mode == cholesky.mode == "resident"
    assert cg.resident_bytes == cholesky.resident_bytes + 5000 * f * 2
    odd = [plan_half_sweep("user", ranges, blocks, 5000, f + 1, 4, solver, 200 * MiB, 2, True) for solver in ("cg", "cholesky")]
    assert odd[0].resident_bytes == odd[1].resident_bytes
    off = plan_half_sweep("user", ranges, blocks, 5000, f, 4, "cg", 200 * MiB, 2, True, half_gathers=False)
    assert off.resident_bytes == cholesky.resident_bytes  # --no-half-gathers: no copy held
