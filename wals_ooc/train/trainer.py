"""The training loop: initialise or resume a factor store, then alternate planned half-sweeps,
committing a checkpoint after each one."""

from __future__ import annotations

import functools
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import dask
import numpy as np
from tqdm.auto import tqdm

from ..config import WALSConfig
from ..errors import BudgetWarning, DataMismatchError, NumericalError, SettingError, WalsError
from ..execute import Executor
from ..kernels.subspace import kernel_scratch_bytes
from ..kernels.warm import warm_training_kernels
from ..memory import MemoryBudget
from ..store.format import array, open_group, subgroup
from ..store.lifecycle import Output, output_store
from ..store.reader import InteractionStore
from .factors import MODEL_FORMAT_VERSION, MODEL_KIND, Checkpoint, FactorStore, check_interactions_match
from .fixed_side import ROTATED_ROWS, held_array
from .half_sweep import HalfSweepJob, LocalState, init_task, release_caches, run_half_sweep
from .plan import HalfSweepPlan, TrainingPlan, plan_half_sweep
from .sums import exact_sum, tree_sum

log = logging.getLogger("wals_ooc")

SIDES = ("user", "item")


@dataclass
class IterationReport:
    """One finished iteration: its objective and where its time went."""

    iteration: int  # counting from 1, as in the callback and the command line
    loss: float | None
    seconds: float
    user_seconds: float
    item_seconds: float
    user_fixed_bytes: int = 0  # bytes of item factors the user half-sweep's tasks read
    item_fixed_bytes: int = 0  # bytes of user factors the item half-sweep's tasks read

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _block_nnz(store: InteractionStore, side: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each shard: first row of each row block and the entries in it (read at block bounds only)."""
    n_rows = store.n_rows(side)
    starts = np.arange(0, n_rows, store.row_block, dtype=np.int64)
    at = np.asarray(array(subgroup(store.group, {"user": "by_user", "item": "by_item"}[side]), "indptr")
                    .get_coordinate_selection(np.append(starts, n_rows)))
    per_block = np.diff(at)
    out = []
    for lo, hi in store.shard_ranges(side):
        mask = (starts >= lo) & (starts < hi)
        out.append((starts[mask], per_block[mask]))
    return out


def make_plans(store: InteractionStore, config: WALSConfig, allowance: int, concurrency: int,
               local: bool = True, max_block_rows: int | None = None, processes: int = 1,
               blocked_method: str | None = None, blocked_task_bytes: int | None = None) -> dict[str, HalfSweepPlan]:
    """The plan of each side's half-sweep (the same every iteration). A blocked plan reads the
    entry counts of the rows of its heaviest row blocks (``plan.row_pieces``)."""
    itemsize = config.np_dtype.itemsize
    kernel_bytes = 0
    if config.solver == "ialspp":  # the block factors a kernel call keeps across its sweeps, and its panel
        kernel_bytes = kernel_scratch_bytes(config.factors, config.block_size, max(config.sweeps_at(0), config.sweeps_at(2)), itemsize)
        if config.eigenbasis:  # a row block rotated into the eigenbasis (``half_sweep._subspace_solve``)
            kernel_bytes += max(store.row_block, ROTATED_ROWS) * config.factors * itemsize
    return {
        side: plan_half_sweep(
            side,
            store.shard_ranges(side),
            _block_nnz(store, side),
            store.n_rows("item" if side == "user" else "user"),
            config.factors,
            itemsize,
            config.solver,
            allowance,
            concurrency,
            local,
            max_block_rows,
            config.cg_steps,
            processes,
            blocked_method,
            row_counts=functools.partial(store.row_counts, side),
            blocked_task_bytes=blocked_task_bytes,
            kernel_bytes=kernel_bytes,
            half_gathers=config.half_gathers,
            eigenbasis=config.solver == "ialspp" and config.eigenbasis,
            jacobi=config.cg_preconditioner == "jacobi",
        )
        for side in SIDES
    }


def executor_plans(store: InteractionStore, config: WALSConfig, executor: Executor, budget: MemoryBudget,
                   max_block_rows: int | None = None, blocked_method: str | None = None,
                   blocked_task_bytes: int | None = None) -> dict[str, HalfSweepPlan]:
    """The half-sweep plans for this executor and budget; a ``BudgetWarning`` for each plan whose
    expected peak is over its allowance (training would run, but may exceed the budget)."""
    local = executor.is_local
    processes = 1 if local else max(1, executor.total_threads // executor.threads_per_process)
    plans = make_plans(store, config, budget.allowance, executor.threads_per_process, local, max_block_rows, processes,
                       blocked_method, blocked_task_bytes)
    for plan in plans.values():
        log.info(plan.describe())
        problem = plan.budget_problem()
        if problem is not None:
            warnings.warn(BudgetWarning(problem), stacklevel=3)
    return plans


def plan_training(store: InteractionStore, config: WALSConfig, *, client=None, threads: int | None = None,
                  memory_budget: int | str | None = None, model_location: str | None = None, resume: bool = True,
                  max_block_rows: int | None = None, executor: Executor | None = None,
                  blocked_method: str | None = None, blocked_task_bytes: int | None = None) -> TrainingPlan:
    """What ``train`` would do with these arguments, without running or writing anything: the
    plans are made exactly as ``train`` makes them (kernels loaded first, then the budget measured)."""
    from ..store.lifecycle import inspect_target

    executor = Executor.of(executor, client, threads)
    executor.check_reachable(store.location, model_location)
    warm_training_kernels(config.dtype)
    budget = MemoryBudget.start(memory_budget)
    plans = executor_plans(store, config, executor, budget, max_block_rows, blocked_method, blocked_task_bytes)
    state = "new"
    if model_location is not None:
        target = inspect_target(model_location, store.storage_options)
        if target.what == "store" and target.kind == MODEL_KIND:
            done = len(target.attrs.get("loss_history") or [])
            state = (f"exists with {done} iterations done: resumed" if resume
                     else f"exists with {done} iterations done: replaced once the new one is complete")
        elif target.what != "absent":
            state = f"holds {target.kind or target.what}: train would refuse it"
    return TrainingPlan(store.location, model_location, state, executor.describe(), budget.total, budget.baseline,
                        config.iterations, plans["user"], plans["item"])


def _open_or_create(out: Output, store: InteractionStore, config: WALSConfig, storage_options) -> FactorStore:
    """The model to train: the existing one (resumed in place), or a new one laid out in the
    door's build location (published at once when new, so a killed run can be resumed; swapped
    in at the end when it replaces another model)."""
    if out.mode == "update":
        model = FactorStore.open(out.location, "r+", storage_options)
        check_interactions_match(model, store)
        recorded = model.config
        wanted = config.objective_dict()
        have = recorded.objective_dict()
        if config.random_state is None:
            wanted["random_state"] = have["random_state"]
        if wanted != have:
            diff = {k: (have[k], wanted[k]) for k in wanted if have[k] != wanted[k]}
            raise SettingError(f"model {out.target} was trained with other settings {diff}; pass resume=False to "
                               "start over", flags={"resume=False": "--no-resume"})
        if model.iterations_done < config.iterations:  # more to do: say so until it is done
            kept = dict(config.to_dict(), random_state=have["random_state"])
            model.group.attrs.update({"config": kept, "complete": False})
        return model
    if config.random_state is not None:
        seed = config.random_state
    else:
        entropy = np.random.SeedSequence().entropy  # an int when drawn from the OS (no argument given)
        assert isinstance(entropy, int)
        seed = entropy % 2**31
    model = FactorStore.create(out.group, out.location, config, store, seed, storage_options)
    if out.mode == "create":  # visible at once (a killed run resumes), removed if this run fails first
        model = FactorStore.open(out.publish(provisional=True), "r+", storage_options)
    return model


def _check_data_unchanged(store: InteractionStore, identity: str | None) -> None:
    """Refuse to commit a half-sweep when the interaction store was replaced under the run."""
    try:
        now = open_group(store.location, "r", store.storage_options).attrs.get("store_id")
    except WalsError:
        now = None
    if now != identity:
        raise DataMismatchError(f"{store.location} was replaced or removed while training on it: the model keeps its "
                                "last checkpoint; train again on the data you mean")


def _initialise(model: FactorStore, store: InteractionStore, config: WALSConfig, executor: Executor,
                state: LocalState | None = None) -> dict[str, np.ndarray]:
    """Write each side's initial factors (slot 0) and their Grams, then commit step 0; return the
    Grams. With ``state`` (a local resident fit) the rows are also kept whole in it, as that
    slot: the first half-sweep reads neither side back from Zarr (0.5-1.2 s at f = 512, 130k rows)."""
    held = {}
    if state is not None:
        for side in SIDES:
            held[side] = held_array((store.n_rows(side), config.factors), config.np_dtype)
    tasks = []
    span = store.row_block * 64
    for side in SIDES:
        n = store.n_rows(side)
        into = dask.delayed(held[side], name=f"held-{side}", traverse=False) if side in held else None
        for lo in range(0, n, span):
            tasks.append(
                dask.delayed(init_task, pure=False)(
                    model.location, model.storage_options, side, 0, lo, min(n, lo + span), model.seed,
                    store.row_block, config.init_scale, config.dtype, into, dask_key_name=f"init-{side}-{lo}",
                )
            )
    grams = executor.run(tasks)
    sides = [side for side in SIDES for _ in range(0, store.n_rows(side), span)]
    totals = {}
    for side in SIDES:
        totals[side] = _sum_in_order(g for g, s in zip(grams, sides) if s == side)
        model.set_gram(side, 0, totals[side])
    model.commit(Checkpoint(step=0, slots={"user": 0, "item": 0}))
    if state is not None:
        for side in SIDES:
            state.factors[side] = (held[side], 0)
    return totals


def _finite(result) -> bool:
    """A task's factors are finite iff their Gram is (a NaN or inf in a row reaches it), and so
    must be its pieces of the objective."""
    pieces = [*result.quadratic, *result.observed, *result.regularization]
    return result.gram is not None and result.gram.finite() and bool(np.isfinite(pieces).all())


def _sum_in_order(parts) -> np.ndarray:
    """Sum f x f partials in the given order (fixed order: the same result on any scheduler)."""
    total = None
    for part in parts:
        total = part.copy() if total is None else total + part
    if total is None:
        raise ValueError("no partial sums to add: a half-sweep ran no task")
    return total


def train(
    store: InteractionStore,
    model_location: str,
    config: WALSConfig,
    *,
    client=None,
    threads: int | None = None,
    resume: bool = True,
    callback: Callable[[int, float, float | None], None] | None = None,
    progress: bool | None = None,
    memory_budget: int | str | None = None,
    storage_options: dict | None = None,
    max_block_rows: int | None = None,
    executor: Executor | None = None,
    blocked_method: str | None = None,
    blocked_task_bytes: int | None = None,
) -> FactorStore:
    """Fit factors into ``model_location``, resuming from its last completed half-sweep.

    callback(iteration, seconds, loss) is called after each iteration, like implicit's; iterations
    count from 1 (the number of iterations done), as in ``loss_history`` and the command line.
    max_block_rows: always stream the fixed side in blocks of at most this many rows, even when
    it would fit in memory; blocked_method: how blocked tasks solve (see ``plan``), and
    blocked_task_bytes: what a blocked task may take (see ``plan_half_sweep``), for tests.
    executor: where tasks run (default: ``Executor(client, threads)``).
    """
    executor = Executor.of(executor, client, threads)
    executor.check_reachable(store.location, model_location)  # before anything is written
    warm_training_kernels(config.dtype)  # fixed per-process cost: part of the baseline
    budget = MemoryBudget.start(memory_budget)
    with output_store(model_location, MODEL_KIND, version=MODEL_FORMAT_VERSION, overwrite=not resume, resume=resume,
                      inputs=[store.location], storage_options=storage_options) as out:
        model = _open_or_create(out, store, config, storage_options)
        _train_model(out, model, store, config, executor, budget, callback, progress, storage_options, max_block_rows,
                     blocked_method, blocked_task_bytes)
    return FactorStore.open(out.target, "r", storage_options)


def _train_model(out: Output, model: FactorStore, store: InteractionStore, config: WALSConfig, executor: Executor,
                 budget: MemoryBudget, callback, progress, storage_options, max_block_rows,
                 blocked_method, blocked_task_bytes=None) -> None:
    """The training loop proper, on an opened model (the door holds its lock)."""
    data_id = store.attrs().get("store_id")
    local = executor.is_local
    plans = executor_plans(store, config, executor, budget, max_block_rows, blocked_method, blocked_task_bytes)
    state = None
    # what both half-sweeps leave unused caches CSR shards between iterations (per process)
    all_resident = all(p.mode == "resident" and (p.holds_own or not local) for p in plans.values())
    cache_bytes = max(0, min(p.spare_bytes for p in plans.values())) if all_resident else 0
    if local and all_resident:
        state = LocalState(cache_bytes=cache_bytes)
    grams: dict[str, tuple[int, np.ndarray]] = {}  # side -> (slot, Gram) of the slots this run wrote: not read back
    if model.checkpoint is None:
        grams = {side: (0, gram) for side, gram in _initialise(model, store, config, executor, state).items()}

    checkpoint = model.trained()  # set by _initialise on a new model
    history = model.loss_history[: checkpoint.iteration]
    total_steps = 2 * config.iterations
    remaining_tasks = sum(len(plans[SIDES[s % 2]].tasks) for s in range(checkpoint.step, total_steps))
    side_seconds = {"user": 0.0, "item": 0.0}
    side_fixed_bytes = {"user": 0, "item": 0}
    try:
        with executor.single_threaded_blas(), tqdm(total=remaining_tasks, desc="train", unit="shard", disable=None if progress is None else not progress) as bar:
            if history and history[-1].get("loss") is not None:
                bar.set_postfix(loss=f"{history[-1]['loss']:.6g}", it=checkpoint.iteration)
            while checkpoint.step < total_steps:
                started = time.perf_counter()
                side = SIDES[checkpoint.step % 2]
                fixed = SIDES[1 - checkpoint.step % 2]
                plan = plans[side]
                if state is not None:
                    state.ensure(model.location, storage_options, fixed, checkpoint.slots[fixed])
                    state.ensure(model.location, storage_options, side, checkpoint.slots[side])
                held_gram = grams.get(fixed)
                if held_gram is None or held_gram[0] != checkpoint.slots[fixed]:
                    held_gram = (checkpoint.slots[fixed], model.gram(fixed, checkpoint.slots[fixed]))
                gram = config.alpha0 * held_gram[1]
                job = HalfSweepJob(
                    interactions=store.location, model=model.location, storage_options=storage_options,
                    side=side, fixed_side=fixed, step=checkpoint.step, fixed_slot=checkpoint.slots[fixed],
                    warm_slot=checkpoint.slots[side], out_slot=1 - checkpoint.slots[side], config=config,
                    mode=plan.mode, solver=plan.solver, block_rows=plan.block_rows, row_batch=plan.row_batch,
                    n_fixed=plan.n_fixed, gram=gram.astype(config.np_dtype), loss=config.compute_loss and side == "item",
                    shard_cache_bytes=0 if local else cache_bytes, task_threads=plan.task_threads,
                    entry_cache=local and plan.mode == "blocked",
                    forward=local and plans[fixed].mode == "blocked" and checkpoint.step + 1 < total_steps,
                    row_block=store.row_block,
                )
                label = f"{side}s-it{checkpoint.iteration:03d}"
                try:
                    results = run_half_sweep(job, plan.tasks, state, executor, bar, label)
                except BaseException:
                    state = None  # its arrays may hold a half-solved side: never reuse them
                    raise
                broken = [task for task, r in zip(plan.tasks, results) if not _finite(r)]
                if broken:
                    state = None  # in-memory factors of this side hold the bad rows: never reuse them
                    where = ", ".join(f"[{t.row_start}, {t.row_stop})" for t in broken[:5]) + (" ..." if len(broken) > 5 else "")
                    raise NumericalError(
                        f"the {side} half-sweep of iteration {checkpoint.iteration + 1} produced non-finite factors (NaN or inf) "
                        f"in {side} rows {where}; nothing was committed: {model.location} keeps its last completed "
                        f"half-sweep (step {checkpoint.step}). Check the settings (alpha, regularization, eps) and the input values"
                    )
                if state is not None:
                    state.factors[side] = (state.factors[side][0], job.out_slot)
                failures = sum(r.failures for r in results)
                if failures:
                    log.warning("%d %s rows had a singular system and kept their previous factors", failures, side)
                solved_gram = tree_sum((r.gram for r in results if r.gram is not None), store.n_rows(side), store.row_block)
                model.set_gram(side, job.out_slot, solved_gram)
                grams[side] = (job.out_slot, solved_gram)
                side_seconds[side] = time.perf_counter() - started
                side_fixed_bytes[side] = sum(r.fixed_bytes_read for r in results)
                slots = dict(checkpoint.slots)
                slots[side] = job.out_slot
                regularization = exact_sum(x for r in results for x in r.regularization)
                _check_data_unchanged(store, data_id)
                if side == "user":
                    checkpoint = Checkpoint(checkpoint.step + 1, slots, pending_user_reg=regularization)
                    model.commit(checkpoint)
                    out.keep()  # a trained half-sweep: kept (resumable) whatever happens next
                    continue
                loss = None
                if config.compute_loss:
                    loss = exact_sum([*(x for r in results for x in (*r.quadratic, *r.observed)), regularization,
                                      checkpoint.pending_user_reg])
                report = IterationReport(
                    checkpoint.iteration + 1, loss, side_seconds["user"] + side_seconds["item"],
                    side_seconds["user"], side_seconds["item"], side_fixed_bytes["user"], side_fixed_bytes["item"],
                )
                history.append(report.to_dict())
                checkpoint = Checkpoint(checkpoint.step + 1, slots)
                model.commit(checkpoint, history)
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.6g}", it=report.iteration)
                if callback is not None:
                    callback(report.iteration, report.seconds, loss)
        if checkpoint.iteration >= model.config.iterations:
            model.group.attrs.update({"complete": True, "iterations_done": checkpoint.iteration})
    finally:
        executor.run_everywhere(release_caches)
