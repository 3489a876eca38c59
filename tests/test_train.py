"""The trainer on real stores with the threaded scheduler: against the dense closed-form ALS,
falling loss, reported loss = dense objective, determinism, blocked = resident, kill -9 resume,
and peak RSS under the budget."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from wals_ooc import WALSConfig, open_store
from wals_ooc.errors import SettingError
from wals_ooc.train import FactorStore, train
from wals_ooc.train.objective import objective

from .conftest import assert_close_rel, run_python, store_to_scipy
from .reference import dense_objective, dense_solve

OBJECTIVES = {
    "hu": dict(alpha=2.0, alpha0=1.0, regularization=0.1, nu=0.0, confidence="linear"),
    "rendle": dict(alpha=3.0, alpha0=0.3, regularization=0.002, nu=1.0, confidence="log"),
}


def _reference_kwargs(config: WALSConfig) -> dict:
    return dict(kind=config.confidence, alpha=config.alpha, alpha0=config.alpha0, eps=config.eps,
                lam=config.regularization, nu=config.nu)


def _factors(model: FactorStore) -> tuple[np.ndarray, np.ndarray]:
    return model.current("user")[:], model.current("item")[:]


def _fit(store, location, **settings) -> FactorStore:
    extra = {k: settings.pop(k) for k in ("threads", "max_block_rows", "resume", "client", "blocked_method",
                                               "blocked_task_bytes") if k in settings}
    config = WALSConfig(**{"factors": 8, "iterations": 4, "random_state": 0, **settings})
    return train(store, str(location), config, progress=False, **{"resume": False, **extra})


@pytest.mark.parametrize("objective_name", sorted(OBJECTIVES))
def test_cholesky_trainer_equals_dense_closed_form_als(small_store, tmp_path, objective_name):
    """Two more iterations after a checkpoint equal the dense NumPy ALS from that checkpoint."""
    store = open_store(small_store)
    settings = dict(OBJECTIVES[objective_name], solver="cholesky", dtype="float64")
    model = _fit(store, tmp_path / "m.zarr", iterations=2, **settings)
    X, Y = _factors(model)
    model = _fit(store, tmp_path / "m.zarr", iterations=4, resume=True, **settings)
    R = store_to_scipy(store)
    kwargs = _reference_kwargs(model.config)
    for _ in range(2):
        X = dense_solve(R, Y, **kwargs)
        Y = dense_solve(R.T.tocsr(), X, **kwargs)
    got_X, got_Y = _factors(model)
    assert_close_rel(got_X, X, 1e-8)
    assert_close_rel(got_Y, Y, 1e-8)


@pytest.mark.parametrize("solver", ["cg", "cholesky", "ialspp"])
@pytest.mark.parametrize("objective_name", sorted(OBJECTIVES))
def test_loss_never_rises_and_reported_loss_is_the_dense_objective(small_store, tmp_path, solver, objective_name):
    store = open_store(small_store)
    seen = []
    config = WALSConfig(factors=8, iterations=8, random_state=1, solver=solver, block_size=3, **OBJECTIVES[objective_name])
    model = train(store, str(tmp_path / "m.zarr"), config, progress=False, callback=lambda it, s, loss: seen.append(loss))
    losses = [entry["loss"] for entry in model.loss_history]
    assert losses == pytest.approx(seen)
    assert len(losses) == 8
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0]
    X, Y = _factors(model)
    dense = dense_objective(store_to_scipy(store), X, Y, **_reference_kwargs(config))
    assert losses[-1] == pytest.approx(dense, rel=1e-4)
    assert objective(store, model.current("user"), model.current("item"), config) == pytest.approx(dense, rel=1e-6)


def test_cg_converges_to_the_cholesky_solution_with_more_steps(small_store, tmp_path):
    store = open_store(small_store)
    exact = _fit(store, tmp_path / "exact.zarr", solver="cholesky", dtype="float64", iterations=3)
    X_exact, _ = _factors(exact)
    errors = []
    for steps in (1, 3, 8):
        model = _fit(store, tmp_path / f"cg{steps}.zarr", solver="cg", cg_steps=steps, dtype="float64", iterations=3)
        X, _ = _factors(model)
        errors.append(np.linalg.norm(X - X_exact) / np.linalg.norm(X_exact))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-3, errors


def test_ialspp_trainer_is_exact_with_one_block_and_converges_to_cholesky_with_sweeps(small_store, tmp_path):
    """One block of all f coordinates is the exact row solve (the Cholesky trainer's factors);
    with blocks of 3, the first half-sweep (both from the same initial items) reaches the
    Cholesky solution as the sweeps per half-sweep grow."""
    store = open_store(small_store)
    settings = dict(dtype="float64", **OBJECTIVES["hu"])
    X_first, Y_first = _factors(_fit(store, tmp_path / "exact.zarr", solver="cholesky", iterations=1, **settings))
    whole = _factors(_fit(store, tmp_path / "whole.zarr", solver="ialspp", block_size=8, iterations=1, **settings))
    assert_close_rel(whole[0], X_first, 1e-8)
    assert_close_rel(whole[1], Y_first, 1e-8)
    errors = []
    for sweeps in (1, 3, 12):
        X, _ = _factors(_fit(store, tmp_path / f"s{sweeps}.zarr", solver="ialspp", block_size=3, block_sweeps=sweeps,
                             first_sweeps=1, iterations=1, **settings))
        errors.append(np.linalg.norm(X - X_first) / np.linalg.norm(X_first))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-3, errors


def test_ialspp_first_iteration_takes_first_sweeps_and_later_ones_block_sweeps(small_store, tmp_path):
    """first_sweeps passes in the first iteration's half-sweeps (the same factors as block_sweeps
    that many), block_sweeps after; a bad count is refused naming its flag."""
    store = open_store(small_store)
    settings = dict(dtype="float64", solver="ialspp", block_size=3, iterations=1, **OBJECTIVES["hu"])
    first = _factors(_fit(store, tmp_path / "first.zarr", block_sweeps=1, first_sweeps=3, **settings))
    every = _factors(_fit(store, tmp_path / "every.zarr", block_sweeps=3, first_sweeps=1, **settings))
    one = _factors(_fit(store, tmp_path / "one.zarr", block_sweeps=1, first_sweeps=1, **settings))
    np.testing.assert_array_equal(first[0], every[0])
    np.testing.assert_array_equal(first[1], every[1])
    assert np.abs(first[0] - one[0]).max() > 1e-6
    config = WALSConfig(block_sweeps=1, first_sweeps=3)
    assert [config.sweeps_at(step) for step in range(5)] == [3, 3, 1, 1, 1]
    assert WALSConfig(block_sweeps=4, first_sweeps=2).sweeps_at(0) == 4
    # block_sweeps and first_sweeps None (the defaults): in the eigenbasis 2 passes below f = 512, 1
    # from 512 on (the first iteration too); in the factors' basis 3 below f = 512, 2 from 512 on
    assert [WALSConfig(factors=f).sweeps_at(step) for f in (256, 512) for step in (0, 2)] == [2, 2, 1, 1]
    assert WALSConfig(factors=512, first_sweeps=2).sweeps_at(0) == 2 and WALSConfig().first_sweeps is None
    assert [WALSConfig(factors=f, eigenbasis=False).sweeps_at(step) for f in (256, 512) for step in (0, 2)] == [3, 3, 2, 2]
    assert WALSConfig(factors=512, first_sweeps=4).sweeps_at(1) == 4 and WALSConfig().block_sweeps is None
    with pytest.raises(SettingError, match="first_sweeps must be >= 1") as refused:
        WALSConfig(first_sweeps=0)
    assert refused.value.flags == {"first_sweeps": "--first-sweeps"}


def test_same_seed_same_factors_and_other_seed_other_factors(small_store, tmp_path):
    store = open_store(small_store)
    a = _factors(_fit(store, tmp_path / "a.zarr", random_state=5, threads=2))
    b = _factors(_fit(store, tmp_path / "b.zarr", random_state=5, threads=1))
    c = _factors(_fit(store, tmp_path / "c.zarr", random_state=6, threads=2))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0])


@pytest.mark.parametrize("solver", ["cg", "cholesky", "ialspp"])
def test_same_seed_gives_the_same_bits_whatever_the_task_cut(small_store, tmp_path, monkeypatch, solver):
    """The plan's task cut follows the allowance (the budget less the RSS at start: larger after a
    cold numba compile), so it must not reach the arithmetic: a fit whose half-sweeps run one task
    per row block gives the same factors, Grams and losses, bit for bit, as the plan's own cut."""
    from wals_ooc.train import trainer
    from wals_ooc.train.plan import SolveTask

    store = open_store(small_store)
    settings = dict(solver=solver, block_size=3, iterations=3, random_state=3, threads=2, **OBJECTIVES["rendle"])
    planned = _fit(store, tmp_path / "planned.zarr", **settings)
    real_make_plans = trainer.make_plans
    cut_counts = []

    def one_task_a_block(*args, **kwargs):
        plans = real_make_plans(*args, **kwargs)
        for plan in plans.values():
            tasks, parts = [], {}
            for task in plan.tasks:
                for lo in range(task.row_start, task.row_stop, store.row_block):
                    part = parts[task.shard] = parts.get(task.shard, -1) + 1
                    tasks.append(SolveTask(task.shard, part, lo, min(task.row_stop, lo + store.row_block), 0))
            cut_counts.append((len(plan.tasks), len(tasks)))
            plan.tasks = tasks
        return plans

    monkeypatch.setattr(trainer, "make_plans", one_task_a_block)
    cut = _fit(store, tmp_path / "cut.zarr", **settings)
    assert all(many > few for few, many in cut_counts), cut_counts  # the cut did change
    for a, b in zip(_factors(planned), _factors(cut)):
        np.testing.assert_array_equal(a, b)
    for side in ("user", "item"):
        slot = planned.trained().slots[side]
        np.testing.assert_array_equal(planned.gram(side, slot), cut.gram(side, slot))
    assert [e["loss"] for e in planned.loss_history] == [e["loss"] for e in cut.loss_history]


@pytest.mark.parametrize("solver,method", [("cholesky", "expanded"), ("cholesky", "cholesky"), ("cg", "expanded"), ("cg", "cg"),
                                           ("ialspp", "expanded")])
def test_blocked_fixed_side_equals_resident_and_reads_it_as_often_as_planned(small_store, tmp_path, monkeypatch, solver,
                                                                            method):
    """Sweeping the fixed side in 37-row windows of a scratch copy (expanded entry rows;
    accumulated normal equations; CG one sweep per pass) gives the same factors and losses as
    holding it whole, and reads the fixed side exactly as many times as the plan says. Only the
    first half-sweep copies its fixed side from Zarr: the others take the rows the half-sweep
    before them forwarded (``fixed_side.forward_rows``)."""
    from wals_ooc.train import half_sweep, make_plans

    copied = []

    class CountedCopy(half_sweep.ScratchCopy):
        def __init__(self, array, *args, **kwargs):
            copied.append(array.shape)
            super().__init__(array, *args, **kwargs)

    monkeypatch.setattr(half_sweep, "ScratchCopy", CountedCopy)  # the copies made from Zarr
    store = open_store(small_store)
    settings = dict(solver=solver, dtype="float64", iterations=3, **OBJECTIVES["rendle"])
    resident_model = _fit(store, tmp_path / "r.zarr", **settings)
    resident = _factors(resident_model)
    blocked_model = _fit(store, tmp_path / "b.zarr", max_block_rows=37, threads=2, blocked_method=method, **settings)
    assert copied == [(store.n_items, 8)], "a half-sweep after the first copied its fixed side from Zarr"
    blocked = _factors(blocked_model)
    assert_close_rel(blocked[0], resident[0], 1e-9)
    assert_close_rel(blocked[1], resident[1], 1e-9)
    assert [e["loss"] for e in blocked_model.loss_history] == pytest.approx(
        [e["loss"] for e in resident_model.loss_history], rel=1e-9)
    plans = make_plans(store, blocked_model.config, 2**30, 2, max_block_rows=37, blocked_method=method)
    for side in ("user", "item"):
        plan = plans[side]
        assert plan.mode == "blocked" and {t.method for t in plan.tasks} == {method}
        assert plan.fixed_passes == sum(t.sweeps for t in plan.tasks) >= len(plan.tasks)
        assert f"read {plan.fixed_passes} times" in plan.describe()
        expected = plan.fixed_passes * plan.fixed_bytes
        assert [e[f"{side}_fixed_bytes"] for e in blocked_model.loss_history] == [expected] * 3


@pytest.fixture(scope="module")
def long_row_store(tmp_path_factory):
    """17,000 users x 40 items, one item used by every user: a row longer than CG's gather block
    (``solve.GATHER_MAX_ENTRIES``), which CG reads in float32 while the others gather float16."""
    from wals_ooc.kernels.solve import GATHER_MAX_ENTRIES
    from wals_ooc.store.writer import RowBatch, write_store

    rng = np.random.default_rng(5)
    n_users = GATHER_MAX_ENTRIES + 616
    users = np.concatenate([np.arange(n_users), rng.integers(0, n_users, 3 * n_users)]).astype(np.int64)
    items = np.concatenate([np.zeros(n_users, np.int64), rng.integers(1, 40, 3 * n_users)])
    pairs = np.unique(np.stack([users, items], axis=1), axis=0)
    values = rng.integers(1, 5, len(pairs)).astype(np.float32)
    path = str(tmp_path_factory.mktemp("stores") / "long.zarr")
    write_store(iter([RowBatch(pairs[:, 0], pairs[:, 1], values)]), path, row_block=1024, shard_nnz=8192, progress=False)
    return path


@pytest.mark.parametrize("half_gathers", [True, False, "refused"])
def test_blocked_cg_gathers_float16_where_resident_does_and_equals_it(long_row_store, tmp_path, monkeypatch, half_gathers):
    """With CG's float16 gathers (f = one wide vector of float32), an expanded blocked task copies
    its short rows' fixed rows as float16 bits and its long rows' (over ``GATHER_MAX_ENTRIES``
    entries) as float32, each set numbered apart: the factors and losses equal the resident plan's,
    which gathers from a float16 copy of the whole side, on the first half-sweeps (copied from
    Zarr) and the later ones (forwarded); with ``half_gathers=False`` both read float32. A side
    float16 cannot carry ("refused": the resident plan gathers float32) is solved in float32 in
    runs of rows that fit the task's planned copies."""
    import wals_ooc.train.half_sweep as half_sweep
    from wals_ooc.kernels.tile import WIDE_BYTES

    if not half_sweep.gathers_half(WIDE_BYTES // 4, 4):
        pytest.skip("CG gathers float16 only where its rows fuse")
    store = open_store(long_row_store)
    real, calls = half_sweep.cg_solve_rows, []

    def spy(*args):
        calls.append((args[3].shape[0], args[15] is not None, int(np.diff(args[0]).max())))
        return real(*args)

    monkeypatch.setattr(half_sweep, "cg_solve_rows", spy)
    refused = half_gathers == "refused"
    settings = dict(solver="cg", factors=WIDE_BYTES // 4, iterations=2, **OBJECTIVES["hu"])
    resident_model = _fit(store, tmp_path / "r.zarr", threads=2, half_gathers=half_gathers is True, **settings)
    assert calls and all(h == (half_gathers is True) for _, h, _ in calls)
    calls.clear()
    if refused:
        monkeypatch.setattr(half_sweep.ScratchCopy, "half_usable", lambda self: False)
    blocked_model = _fit(store, tmp_path / "b.zarr", max_block_rows=300, threads=2, blocked_method="expanded",
                         half_gathers=bool(half_gathers), **settings)
    assert calls and all(h == (half_gathers is True) for _, h, _ in calls)
    if half_gathers is True:  # the long row's task holds float32 rows of its columns, tasks without one none
        assert any(longest > 16384 and rows > 0 for rows, _, longest in calls)
        assert all(rows == 0 for rows, _, longest in calls if longest < 100)  # the user half-sweeps: no long row
    for got, want in zip(_factors(blocked_model), _factors(resident_model)):
        assert_close_rel(got, want, 1e-9)
    assert [e["loss"] for e in blocked_model.loss_history] == pytest.approx(
        [e["loss"] for e in resident_model.loss_history], rel=1e-9)


def test_blocked_row_blocks_too_heavy_to_expand_are_cut_by_rows_and_equal_resident(small_store, tmp_path):
    """A row block whose entries do not fit beside their fixed rows is cut into runs of its rows
    that do (counts read from the row pointers; the pieces of a block share its factor chunk and
    write it in turn); a row too heavy alone is streamed with CG. The factors and losses equal the
    resident plan's."""
    from wals_ooc.train import make_plans

    store = open_store(small_store)
    settings = dict(solver="cg", dtype="float64", iterations=1, **OBJECTIVES["rendle"])
    heaviest = max(int(store.row_counts(side).max()) for side in ("user", "item"))
    task_bytes = int(0.9 * heaviest * (24 + 4 + 8 * 8))  # the heaviest row cannot expand (f = 8, float64)
    plans = make_plans(store, WALSConfig(factors=8, **settings), 2**30, 2, max_block_rows=128,
                       blocked_task_bytes=task_bytes)
    for side, plan in plans.items():
        starts = [t.row_start for t in plan.tasks]
        stops = [t.row_stop for t in plan.tasks]
        assert starts[0] == 0 and stops[-1] == store.n_rows(side) and starts[1:] == stops[:-1]
        assert sum(t.nnz for t in plan.tasks) == store.nnz
        assert any(s % store.row_block for s in starts), "no row block was cut by rows"
        assert plan.fixed_passes == sum(t.sweeps for t in plan.tasks)
        streamed = [t for t in plan.tasks if t.method == "cg"]
        assert all(t.row_stop - t.row_start == 1 for t in streamed), "a streamed task of several rows: they would expand"
    assert {t.method for plan in plans.values() for t in plan.tasks} == {"expanded", "cg"}
    resident_model = _fit(store, tmp_path / "r.zarr", **settings)
    blocked_model = _fit(store, tmp_path / "b.zarr", max_block_rows=128, threads=2, blocked_task_bytes=task_bytes, **settings)
    for got, want in zip(_factors(blocked_model), _factors(resident_model)):
        assert_close_rel(got, want, 1e-9)
    assert [e["loss"] for e in blocked_model.loss_history] == pytest.approx(
        [e["loss"] for e in resident_model.loss_history], rel=1e-9)


def test_a_scratch_copy_lends_one_workspace_that_grows_and_is_released_with_it(tmp_path):
    """Blocked tasks reuse one workspace per scratch copy (no fresh pages a task): a smaller or
    equal request gets the same memory, a larger one replaces it, and closing frees it."""
    from wals_ooc.train.fixed_side import ScratchCopy

    copy = ScratchCopy(np.arange(40, dtype=np.float32).reshape(10, 4), directory=str(tmp_path))
    first = copy.workspace((6, 4), np.float32)
    first[:] = 7
    again = copy.workspace((3, 4), np.float32)
    assert again.shape == (3, 4) and np.shares_memory(first, again) and (again == 7).all()
    del first, again
    larger = copy.workspace((50, 4), np.float64)
    assert larger.shape == (50, 4) and larger.dtype == np.float64
    larger[:] = 1.5
    with copy.window(2, 5) as rows:
        np.testing.assert_array_equal(rows, np.arange(8, 20, dtype=np.float32).reshape(3, 4))
        del rows
    del larger
    copy.close()
    assert copy._workspace is None


def test_forwarded_rows_make_the_next_scratch_copy_only_when_every_row_was_written(monkeypatch):
    """A half-sweep's solved rows written ahead into the next half-sweep's scratch copy are taken
    as its fixed side only when their ranges cover every row; otherwise (rows missing, or a write
    the disk refused) the next half-sweep copies its fixed side as before."""
    from wals_ooc.train import fixed_side as fs

    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    made = []

    def make():
        made.append(1)
        return fs.ScratchCopy(rows)

    try:
        fs.forward_rows(("k", 1), (10, 4), np.float32, 6, rows[6:])
        fs.forward_rows(("k", 1), (10, 4), np.float32, 0, rows[:6])
        copy, was_made = fs.fixed_side(("k", 1), make)
        assert was_made and not made
        with copy.window(0, 10) as got:
            np.testing.assert_array_equal(got, rows)
            del got
        fs.forward_rows(("k", 2), (10, 4), np.float32, 0, rows[:6])  # rows 6-9 never written
        fs.fixed_side(("k", 2), make)
        assert made == [1]

        def refused(self, start, block):
            raise OSError(28, "No space left on device")

        fs.forward_rows(("k", 3), (10, 4), np.float32, 0, rows[:6])
        monkeypatch.setattr(fs.ScratchCopy, "write_rows", refused)
        fs.forward_rows(("k", 3), (10, 4), np.float32, 6, rows[6:])
        monkeypatch.undo()
        fs.forward_rows(("k", 3), (10, 4), np.float32, 6, rows[6:])  # dropped for this key: not written again
        copy, _ = fs.fixed_side(("k", 3), make)
        assert made == [1, 1]
        with copy.window(0, 10) as got:
            np.testing.assert_array_equal(got, rows)
            del got
    finally:
        fs.release_fixed_side()


def test_ialspp_on_a_blocked_plan_that_cannot_expand_its_entries_is_refused(small_store, tmp_path):
    """iALS++ runs blocked tasks only as expanded entries; a plan that would stream them refuses
    with a SettingError naming the budget and the solver, rather than solving another way."""
    from wals_ooc.errors import SettingError

    store = open_store(small_store)
    with pytest.raises(SettingError, match="ialspp.*memory_budget") as refused:
        _fit(store, tmp_path / "b.zarr", solver="ialspp", max_block_rows=37, blocked_method="cg")
    assert "--memory-budget" in refused.value.cli_message() and "--solver" in refused.value.cli_message()


def test_resume_refuses_other_settings_and_continues_when_iterations_grow(small_store, tmp_path):
    store = open_store(small_store)
    _fit(store, tmp_path / "m.zarr", iterations=2)
    with pytest.raises(ValueError, match="other settings"):
        _fit(store, tmp_path / "m.zarr", iterations=3, resume=True, alpha=7.0)
    straight = _factors(_fit(store, tmp_path / "straight.zarr", iterations=3))
    continued = _fit(store, tmp_path / "m.zarr", iterations=3, resume=True)
    assert continued.checkpoint.iteration == 3 and continued.complete
    np.testing.assert_array_equal(_factors(continued)[0], straight[0])


KILL_AND_TRAIN = """
import os, signal, sys
import wals_ooc.train.half_sweep as half_sweep
from wals_ooc import WALSConfig, open_store
from wals_ooc.train import train

kill_at = int(sys.argv[1])
calls = [0]
real_solve = half_sweep.solve_task

def solve_then_maybe_die(*args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # mid half-sweep: earlier tasks of it already wrote
    return real_solve(*args, **kwargs)

if kill_at:
    half_sweep.solve_task = solve_then_maybe_die
config = WALSConfig(factors=8, iterations=4, random_state=3, solver=sys.argv[2])
train(open_store(sys.argv[3]), sys.argv[4], config, progress=False, threads=2, resume=True)
print("finished")
"""


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_kill_9_mid_half_sweep_then_resume_equals_uninterrupted(small_store, tmp_path, solver):
    script = tmp_path / "kill_and_train.py"
    script.write_text(KILL_AND_TRAIN)
    import subprocess
    import sys

    def run(kill_at: int, location: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(kill_at), solver, small_store, location],
                              capture_output=True, text=True, timeout=300)

    straight = run(0, str(tmp_path / "straight.zarr"))
    assert straight.returncode == 0, straight.stderr
    n_tasks = len(open_store(small_store).shard_ranges("user"))
    killed_at = 3 * n_tasks + 2  # inside the second iteration's user half-sweep
    killed = run(killed_at, str(tmp_path / "resumed.zarr"))
    assert killed.returncode == -9, killed.stderr
    interrupted = FactorStore.open(str(tmp_path / "resumed.zarr"))
    assert not interrupted.complete
    assert interrupted.checkpoint.step < 8
    resumed = run(0, str(tmp_path / "resumed.zarr"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = FactorStore.open(str(tmp_path / "straight.zarr")), FactorStore.open(str(tmp_path / "resumed.zarr"))
    np.testing.assert_array_equal(_factors(a)[0], _factors(b)[0])
    np.testing.assert_array_equal(_factors(a)[1], _factors(b)[1])
    assert [e["loss"] for e in a.loss_history] == [e["loss"] for e in b.loss_history]


@pytest.mark.parametrize("solver", ["cg", "ialspp"])
def test_kill_9_in_the_first_half_sweep_then_resume_equals_uninterrupted(small_store, tmp_path, solver):
    """A local fit hands its initial rows to the first half-sweep in memory; a run killed in that
    half-sweep resumes from the rows it wrote (``initial_rows``, read back from Zarr) and ends
    with the same bits and losses as the run that never read them back."""
    from wals_ooc.train.half_sweep import initial_rows

    script = tmp_path / "kill_and_train.py"
    script.write_text(KILL_AND_TRAIN)
    import subprocess
    import sys

    store = open_store(small_store)
    config = WALSConfig(factors=8, iterations=4, random_state=3, solver=solver)
    straight = train(store, str(tmp_path / "straight.zarr"), config, progress=False, threads=2)
    location = str(tmp_path / "resumed.zarr")
    killed = subprocess.run([sys.executable, str(script), "2", solver, small_store, location], capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    interrupted = FactorStore.open(location)
    assert interrupted.checkpoint.step == 0 and interrupted.checkpoint.slots == {"user": 0, "item": 0}
    for side in ("user", "item"):
        n, block = store.n_rows(side), store.row_block
        expected = np.concatenate([initial_rows(side, lo, min(n, lo + block), 8, 3, block, config.init_scale, config.dtype)
                                   for lo in range(0, n, block)])
        np.testing.assert_array_equal(interrupted.slot(side, 0)[:], expected)
        exact = expected.T.astype(np.float64) @ expected.astype(np.float64)
        np.testing.assert_allclose(interrupted.gram(side, 0), exact, rtol=1e-5)  # its blocks' float32 products
    resumed = train(store, location, config, progress=False, threads=2)
    for a, b in zip(_factors(straight), _factors(resumed)):
        np.testing.assert_array_equal(a, b)
    assert [e["loss"] for e in straight.loss_history] == [e["loss"] for e in resumed.loss_history]


def test_training_peak_rss_stays_under_budget_on_a_store_several_times_the_allowance(tmp_path):
    """Factors and interactions together are several times the 64 MiB allowance: the planner
    streams the fixed side in blocks, peak RSS stays under the budget, and the factors are
    those of the resident plan (run here with a budget that holds everything)."""
    from wals_ooc.synthetic import SyntheticSpec, write_synthetic_store

    path = str(tmp_path / "big.zarr")
    write_synthetic_store(SyntheticSpec(n_users=1_200_000, n_items=400_000, rows=5_000_000, seed=4), path, progress=False)
    allowance = 72 * 2**20  # the 64 MiB minimum, and room for what opening the store allocates
    settings = dict(factors=8, iterations=1, random_state=0, solver="cg", dtype="float64")
    code = f"""
import json
from wals_ooc import WALSConfig, open_store
from wals_ooc.memory import current_rss, peak_rss, warm_libraries
from wals_ooc.kernels.warm import warm_training_kernels
from wals_ooc.train import train, make_plans
warm_libraries()
warm_training_kernels("float64")  # loaded kernels are a fixed cost: the baseline, as train() measures it
store = open_store({path!r})
budget = current_rss() + {allowance}
config = WALSConfig(**{settings!r})
model = train(store, {str(tmp_path / 'model.zarr')!r}, config, memory_budget=budget, threads=2, progress=False)
modes = sorted({{p.mode for p in make_plans(store, config, budget - current_rss(), 2).values()}})
print(json.dumps({{"budget": budget, "peak": peak_rss(), "modes": modes, "loss": model.loss_history[-1]["loss"]}}))
"""
    done = run_python(code, timeout=600)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(tmp_path) for f in files)
    assert on_disk > 3 * allowance, on_disk
    assert "blocked" in figures["modes"], figures
    assert figures["peak"] <= figures["budget"], figures

    store = open_store(path)
    resident = train(store, str(tmp_path / "resident.zarr"), WALSConfig(**settings), threads=2, progress=False)
    blocked = FactorStore.open(str(tmp_path / "model.zarr"))
    assert figures["loss"] == pytest.approx(resident.loss_history[-1]["loss"], rel=1e-9)
    for side in ("user", "item"):
        assert_close_rel(blocked.current(side)[:], resident.current(side)[:], 1e-9)


def test_kernel_warm_up_covers_every_signature_training_and_serving_use(small_store, tmp_path):
    """The budget's baseline is measured after loading the kernels; a run that compiled a new
    signature later would spend the allowance on code instead of data."""
    code = f"""
import json
import numba
from wals_ooc import WALS
from wals_ooc.kernels import assemble, loss, rank, solve, subspace, text, tile, topk
from wals_ooc.kernels.warm import warm_serving_kernels, warm_training_kernels

kernels = [k for m in (assemble, loss, rank, solve, subspace, text, tile, topk) for k in vars(m).values()
           if isinstance(k, numba.core.registry.CPUDispatcher)]
warm_training_kernels("float32"); warm_serving_kernels()
before = {{k.__name__: len(k.signatures) for k in kernels}}
model = WALS(factors=4, iterations=2, random_state=0).fit({small_store!r}, {str(tmp_path / 'm.zarr')!r}, progress=False)
model.recommend(model.interactions.ids("user", 0, 3), N=3)
model.similar_items(model.interactions.ids("item", 0, 2), N=3)
model.recalculate_user(list(model.interactions.ids("item")[:3]))
WALS(factors=4, iterations=1, solver="cholesky", random_state=0).fit({small_store!r}, {str(tmp_path / 'c.zarr')!r}, progress=False)
WALS(factors=4, iterations=1, solver="ialspp", random_state=0).fit({small_store!r}, {str(tmp_path / 'p.zarr')!r}, progress=False)
from wals_ooc.train import train
from wals_ooc import WALSConfig, open_store
train(open_store({small_store!r}), {str(tmp_path / 'b.zarr')!r}, WALSConfig(factors=4, iterations=1), progress=False, max_block_rows=50)
after = {{k.__name__: len(k.signatures) for k in kernels}}
print(json.dumps({{"before": before, "after": after}}))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    grown = {name: (counts["before"][name], n) for name, n in counts["after"].items() if n != counts["before"][name]}
    assert not grown, grown


@pytest.mark.parametrize("through", ["zarr", "chunk files"])
def test_a_write_failing_behind_the_tasks_fails_the_half_sweep_and_commits_nothing(small_store, tmp_path, monkeypatch, through):
    """A local fit writes its solved rows on a writer thread while the tasks go on: a write that
    fails there (the disk full at the third write of the next half-sweep) fails that half-sweep
    with the error, and the model keeps its last checkpoint, factors and all; a resume trains on.
    The rows go to Zarr's chunk files directly (``store.chunk_files``) unless the array is wrapped."""
    import errno

    import wals_ooc.train.half_sweep as half_sweep
    from wals_ooc.store.chunk_files import ChunkFiles
    from wals_ooc.errors import StorageError

    store = open_store(small_store)
    model = _fit(store, tmp_path / "m.zarr", iterations=1)
    before, factors_before = model.checkpoint, _factors(model)
    real, writers = half_sweep._factor_array, []

    class DiskFillsUp:  # the real Zarr array, whose third write fails as a full disk does
        def __init__(self, array):
            self.array = array

        def __getattr__(self, name):
            return getattr(self.array, name)

        def __getitem__(self, key):
            return self.array[key]

        def __setitem__(self, key, value):
            writers.append(threading.current_thread().name)
            if len(writers) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.array[key] = value

    real_chunk = ChunkFiles._write_chunk

    def chunk_fills_up(self, key, data):  # the direct path: its third chunk write fails
        writers.append(threading.current_thread().name)
        if len(writers) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_chunk(self, key, data)

    if through == "zarr":
        monkeypatch.setattr(half_sweep, "_factor_array", lambda *args: DiskFillsUp(real(*args)))
    else:
        monkeypatch.setattr(ChunkFiles, "_write_chunk", chunk_fills_up)
    with pytest.raises(StorageError, match="No space left on device"):
        _fit(store, tmp_path / "m.zarr", iterations=2, resume=True, threads=2)
    assert len(writers) >= 3 and all(name.startswith("wals-ooc-write") for name in writers), writers
    kept = FactorStore.open(str(tmp_path / "m.zarr"))
    assert kept.checkpoint.to_dict() == before.to_dict()
    for now, then in zip(_factors(kept), factors_before):
        np.testing.assert_array_equal(now, then)
    monkeypatch.setattr(half_sweep, "_factor_array", real)
    monkeypatch.setattr(ChunkFiles, "_write_chunk", real_chunk)
    resumed = _fit(store, tmp_path / "m.zarr", iterations=2, resume=True)
    assert resumed.checkpoint.iteration == 2 and all(np.isfinite(part).all() for part in _factors(resumed))


def test_a_nan_in_one_shard_solve_raises_and_keeps_the_previous_slot(small_store, tmp_path, monkeypatch):
    """Non-finite factors are never committed: the half-sweep raises NumericalError and the
    model stays at its last completed half-sweep, factors and all; a resume then trains on."""
    import wals_ooc.train.half_sweep as half_sweep
    from wals_ooc.errors import NumericalError

    store = open_store(small_store)
    model = _fit(store, tmp_path / "m.zarr", iterations=1)
    before, factors_before = model.checkpoint, _factors(model)
    real, calls = half_sweep.cg_solve_rows, []

    def one_nan(indptr, indices, values, Y, gram, X, *rest):
        observed = real(indptr, indices, values, Y, gram, X, *rest)
        calls.append(len(X))
        if len(calls) == 2:  # the second shard of the next user half-sweep
            X[len(X) // 2, 3] = np.nan
        return observed

    monkeypatch.setattr(half_sweep, "cg_solve_rows", one_nan)
    with pytest.raises(NumericalError, match=r"user half-sweep of iteration 2 produced non-finite factors .* keeps its last"):
        _fit(store, tmp_path / "m.zarr", iterations=2, resume=True, threads=1)
    kept = FactorStore.open(str(tmp_path / "m.zarr"))
    assert kept.checkpoint.to_dict() == before.to_dict()
    for now, then in zip(_factors(kept), factors_before):
        np.testing.assert_array_equal(now, then)
    monkeypatch.setattr(half_sweep, "cg_solve_rows", real)
    resumed = _fit(store, tmp_path / "m.zarr", iterations=2, resume=True)
    assert resumed.checkpoint.iteration == 2 and all(np.isfinite(part).all() for part in _factors(resumed))


def test_a_local_half_sweep_hands_out_its_tasks_largest_first_and_each_once():
    """``LargestFirst`` gives each task once, heaviest (entries plus f/2 a row) first, from any
    number of threads at once; a local half-sweep's results still come back in plan order (the
    seed test above: one thread and two give equal factors)."""
    from wals_ooc.train.half_sweep import LargestFirst
    from wals_ooc.train.plan import SolveTask

    tasks = [SolveTask(shard=i, part=0, row_start=100 * i, row_stop=100 * i + rows, nnz=nnz)
             for i, (rows, nnz) in enumerate([(10, 500), (100, 100), (1, 900), (50, 600), (20, 20)])]
    queue = LargestFirst(tasks, factors=16)  # weights 580, 900, 908, 1000, 180
    taken: list[SolveTask] = []
    threads = [threading.Thread(target=lambda: taken.extend(queue.take() for _ in range(len(tasks) // 5)))
               for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(t.shard for t in taken) == [0, 1, 2, 3, 4]
    assert [t.shard for t in queue.tasks] == [3, 2, 1, 0, 4]


def test_the_entry_cache_gives_back_the_rows_read_from_the_store_and_falls_back_when_the_disk_refuses(small_store, tmp_path):
    """A blocked task's rows, read from Zarr once, come back from the local raw copy the next time
    (same row pointers, indices and values); when a write to the copy fails, it is dropped and
    rows are read from the store."""
    from wals_ooc.train.entry_cache import EntryCache

    store = open_store(small_store)
    for side in ("user", "item"):
        n = store.n_rows(side)
        ranges = [(0, n // 3), (n // 3, n // 2), (n - 5, n)]
        cache = EntryCache(n, store.nnz, directory=str(tmp_path))
        for start, stop in ranges:
            cache.rows(store, side, start, stop)
        assert set(cache.filled) == set(ranges)
        for start, stop in ranges:
            want, got = store.rows(side, start, stop), cache._read(start, stop, cache.filled[(start, stop)])
            for name in ("indptr", "indices", "values"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
            np.testing.assert_array_equal(cache.rows(store, side, start, stop).indices, want.indices)
        cache.close()
    broken = EntryCache(store.n_rows("user"), store.nnz, directory=str(tmp_path))
    broken._file.close()
    broken._file = open(os.devnull, "rb")  # writes now fail (EBADF): the copy is dropped, rows still come from the store
    shard = broken.rows(store, "user", 0, 4)
    assert broken.broken and not broken.filled
    np.testing.assert_array_equal(shard.indices, store.rows("user", 0, 4).indices)
    np.testing.assert_array_equal(broken.rows(store, "user", 0, 4).values, store.rows("user", 0, 4).values)
    broken.close()
    # A disk without room for the copy (it may take at most half the free space and must leave
    # 4 GiB): no file is made, rows come from the store.
    full = EntryCache(store.n_rows("user"), store.nnz, directory=str(tmp_path), free_bytes=3 << 30)
    assert full.broken and not full.filled
    np.testing.assert_array_equal(full.rows(store, "user", 0, 4).indices, store.rows("user", 0, 4).indices)
    assert not full.filled
    full.close()
    from wals_ooc.train.entry_cache import has_room
    assert has_room(1 << 30, 8 << 30) and not has_room(5 << 30, 8 << 30) and not has_room(1 << 30, 4 << 30)


def test_cg_training_gathers_from_a_half_copy_of_the_fixed_side(small_store, tmp_path, monkeypatch):
    """A resident CG fit whose rows fuse (f = one wide vector of float32) hands every kernel call
    the fixed side's float16 copy (``solve.gathers_half``); with ``half_gathers=False``, none, and
    the two fits' losses agree to float16's rounding."""
    import wals_ooc.train.half_sweep as half_sweep
    from wals_ooc.kernels.tile import WIDE_BYTES

    store = open_store(small_store)
    f = WIDE_BYTES // 4
    real, halves = half_sweep.cg_solve_rows, []

    def spy(*args):
        halves.append(args[15])
        return real(*args)

    monkeypatch.setattr(half_sweep, "cg_solve_rows", spy)
    copied = _fit(store, tmp_path / "h.zarr", factors=f, iterations=3, threads=2)
    assert halves and all(h is not None and h.dtype == np.uint16 and h.shape[1] == f for h in halves)
    halves.clear()
    plain = _fit(store, tmp_path / "p.zarr", factors=f, iterations=3, threads=2, half_gathers=False)
    assert halves and all(h is None for h in halves)
    ours, theirs = copied.loss_history[-1]["loss"], plain.loss_history[-1]["loss"]
    assert abs(ours - theirs) <= 1e-3 * theirs, (ours, theirs)


def test_cg_preconditioner_reaches_every_kernel_call_and_the_loss_never_rises(small_store, tmp_path, monkeypatch):
    """``cg_preconditioner`` is handed to every resident CG kernel call ("jacobi", the default:
    True; "none": False); with either the training loss never rises, and the two take other steps."""
    import wals_ooc.train.half_sweep as half_sweep

    store = open_store(small_store)
    real, asked = half_sweep.cg_solve_rows, []

    def spy(*args):
        asked.append(args[16])
        return real(*args)

    monkeypatch.setattr(half_sweep, "cg_solve_rows", spy)
    fits = {}
    for name, flag in (("jacobi", True), ("none", False)):
        asked.clear()
        fits[name] = _fit(store, tmp_path / f"{name}.zarr", iterations=4, dtype="float64", cg_preconditioner=name)
        assert asked and all(a is flag for a in asked)
        losses = [e["loss"] for e in fits[name].loss_history]
        assert all(later <= earlier for earlier, later in zip(losses, losses[1:])), losses
    assert WALSConfig().cg_preconditioner == "jacobi"
    assert not np.allclose(_factors(fits["jacobi"])[0], _factors(fits["none"])[0])
