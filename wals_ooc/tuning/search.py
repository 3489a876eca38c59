"""The search: Optuna's TPE sampler proposes settings, each trial trains a model on the training
store and scores it on the validation store, and weak trials stop early.

Every few iterations the trial's partly trained model (its last committed checkpoint) is scored
on the validation store and reported to a median pruner, which stops a trial scoring below the
median of earlier trials at the same iteration. Training and scoring are the ordinary stages
(``train.train`` and ``evaluate.evaluate``) on one ``Executor``, so each trial stays within the
memory budget and runs on a distributed Client as well as on local threads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import WALSConfig
from ..errors import DataMismatchError, PathError, SettingError, StoreError
from ..evaluate.metrics import METRICS, evaluate
from ..evaluate.split import METHODS, split
from ..execute import Executor
from ..memory import MemoryBudget
from ..store.format import INTERACTIONS_KIND
from ..store.lifecycle import TargetState, enclosing_store, inspect_target, remove_store
from ..store.merge import merge
from ..store.reader import InteractionStore
from ..train.factors import MODEL_KIND, FactorStore, default_model_location, interactions_identity
from ..train.trainer import train
from .space import SEARCHED, DataSummary, SearchSpace, data_summary, trial_config
from .study import (
    StudyPlace,
    TrialRecord,
    carved_names,
    check_places,
    format_table,
    locked_workdir,
    open_storage,
    remove_trial_stores,
    trial_store_complete,
    trial_records,
)

log = logging.getLogger("wals_ooc")


@dataclass
class TuneResult:
    """The outcome of a search.

    best_params: the best trial's WALS settings (``WALS(**best_params)`` trains it again).
    best_value: its validation score (``metric``, e.g. "ndcg@10"). trials: every trial so far.
    best_model: the best trial's model store (trained on the training store only), if kept.
    final_model: the model trained with the best settings on all the data, if asked for.
    """

    best_params: dict
    best_value: float
    best_trial: int
    metric: str
    trials: list[TrialRecord]
    study: str
    study_name: str
    workdir: str
    best_model: str | None = None
    final_model: str | None = None
    final_store: str | None = None
    seconds: float = 0.0
    data: dict = field(default_factory=dict)
    folds: list[tuple[str, str]] = field(default_factory=list)  # (train, validation) store of each fold

    def table(self) -> str:
        """Every trial in a fixed-width table, the best marked with ``*``."""
        return format_table(self.trials, self.metric, self.best_trial)

    def counts(self) -> dict:
        out: dict[str, int] = {}
        for record in self.trials:
            out[record.state] = out.get(record.state, 0) + 1
        return out


def _open_store(store, storage_options) -> InteractionStore:
    return store if isinstance(store, InteractionStore) else InteractionStore(store, storage_options)


def _metric_key(metric: str, k: int) -> str:
    if metric not in METRICS:
        raise SettingError(f"metric must be one of {METRICS}, got {metric!r}")
    return "auc" if metric == "auc" else f"{metric}@{k}"


def _base_config(base: WALSConfig | dict | None, seed: int) -> WALSConfig:
    if isinstance(base, WALSConfig):
        config = base
    else:
        unknown = set(base or {}) - set(WALSConfig.__dataclass_fields__)
        if unknown:
            raise SettingError(f"unknown WALS settings {sorted(unknown)}")
        config = WALSConfig(**(base or {}))
    if config.random_state is None:  # every trial starts from the same factors: a fair comparison
        config = WALSConfig.from_dict({**config.to_dict(), "random_state": int(seed)})
    return config


def _merged_target(merged_store, train: InteractionStore, validation: InteractionStore) -> str:
    return os.fspath(merged_store) if merged_store is not None else _merged_location(train, validation)


def _merged_location(train: InteractionStore, validation: InteractionStore) -> str:
    def stem(location: str) -> str:
        base = os.path.basename(location.rstrip("/"))
        return base[: -len(".zarr")] if base.endswith(".zarr") else base

    parent = os.path.dirname(train.location.rstrip("/"))
    return os.path.join(parent, f"{stem(train.location)}+{stem(validation.location)}.zarr")


def _refuse_target(location: str, kind: str, what: str, storage_options) -> TargetState:
    """Before the search: refuse an output path that cannot be written (checked again by the door
    when written), so a long search does not end in a refusal."""
    outer = enclosing_store(location, storage_options)
    if outer is not None:
        raise PathError(f"the {what} {location} is inside the store {outer}: refusing to write into it "
                        "(nothing was changed); give a path outside it")
    state = inspect_target(location, storage_options)
    if state.what == "file":
        raise PathError(f"the {what} {location} is a file, not a wals-ooc store: refusing to write over it "
                        "(nothing was changed); give another path")
    if state.what == "other":
        raise PathError(f"the {what} {location} is a directory that is not a wals-ooc store: refusing to write "
                        "into it (nothing was changed); give another path")
    if state.what == "store" and state.kind != kind:
        raise PathError(f"the {what} {location} is a {state.kind} store, not a {kind} store: refusing to replace "
                        "it (nothing was changed); give another path")
    return state


def _check_merged_target(location: str, train: InteractionStore, validation: InteractionStore, storage_options) -> None:
    """The merged store's path: free, or an earlier merge of these two stores (reused)."""
    state = _refuse_target(location, INTERACTIONS_KIND, "merged store", storage_options)
    if state.what == "store" and not _is_merge_of(state.attrs, train, validation):
        raise PathError(f"{location} exists and is not the merge of {train.location} and {validation.location}; "
                        "give another path for the merged store (merged_store= / --merged-store)")


def _is_merge_of(attrs: dict, train: InteractionStore, validation: InteractionStore) -> bool:
    wanted = [train.attrs().get("store_id"), validation.attrs().get("store_id")]
    return attrs.get("complete") is True and (attrs.get("sources") or {}).get("merged_store_ids") == wanted


def _merged_store(train: InteractionStore, validation: InteractionStore, location: str, memory_budget,
                  storage_options, progress) -> InteractionStore:
    """train + validation as one store, written through the door; an earlier merge of the same
    two stores is reused."""
    _check_merged_target(location, train, validation, storage_options)
    state = inspect_target(location, storage_options)
    if state.what == "store":
        return InteractionStore(location, storage_options)
    merge([train, validation], location, storage_options=storage_options, memory_budget=memory_budget,
          progress=progress)
    return InteractionStore(location, storage_options)


def tune(
    train_store: InteractionStore | str | os.PathLike,
    validation: InteractionStore | str | os.PathLike | None = None,
    *,
    n_trials: int = 40,
    metric: str = "ndcg",
    k: int = 10,
    space: SearchSpace | dict | None = None,
    base: WALSConfig | dict | None = None,
    model: str | os.PathLike | None = None,
    study: str | os.PathLike | None = None,
    study_name: str | None = None,
    workdir: str | os.PathLike | None = None,
    validation_fraction: float = 0.2,
    validation_method: str = "random",
    validation_folds: int | None = None,
    final: bool | str | os.PathLike = False,
    merged_store: str | os.PathLike | None = None,
    keep_best: bool = True,
    prune: bool = True,
    eval_every: int = 3,
    try_base: bool = True,
    startup_trials: int | None = None,
    user_fraction: float | None = None,
    seed: int = 0,
    timeout: float | None = None,
    resume: bool = True,
    client: Any = None,
    threads: int | None = None,
    memory_budget: int | str | None = None,
    storage_options: dict | None = None,
    progress: bool | None = None,
    callback: Callable[[TrialRecord], None] | None = None,
) -> TuneResult:
    """Search WALS settings that maximise ``metric``@``k`` on a validation store.

    train_store, validation: interaction stores (paths, URLs or opened). Without ``validation``
    the search carves one out of ``train_store`` with ``wals_ooc.split`` (``validation_method``,
    ``validation_fraction``, ``seed``) into its work directory.
    validation_folds: with a carved validation, score each trial on the mean of this many folds
    (fold 0 is the single carve; ``leave_last_out`` carves fold j from fold j-1's training part,
    so fold j holds out each user's (j+1)-th latest entry and trains on the entries before it;
    ``random`` and ``leave_one_out`` carve fold j from the training store with seed ``seed + j``).
    A trial trains once per fold, but its pruning is judged on fold 0 alone, so a pruned trial
    costs what it did with one fold. Default (None): 3 for ``leave_last_out`` and
    ``leave_one_out``, whose validation holds one entry per user (the best of many trials scored
    on it is largely picked by noise), and 1 otherwise. Not with a given ``validation``.
    n_trials: the search's total budget; a resumed study runs only what is left of it (an
    interrupted trial is run again). space: what is searched (``SearchSpace``, or a dict of its
    fields). base: the settings not searched (factors, iterations, solver...; ``WALSConfig``
    fields; default: the defaults).
    model: the final model's path, and where the study goes by default: ``<model>.tune.db``
    and the work directory ``<model>.tune/`` beside it (``study``, ``workdir`` to place them
    elsewhere; default model: ``<train>-model.zarr``).
    final: train a model with the best settings on all the data: True for train + validation
    (merged out of core into ``merged_store``, default ``<train>+<validation>.zarr`` beside the
    training store; with a carved validation, ``train_store`` itself), or the path of a store
    that holds all the data.
    prune, eval_every: score every ``eval_every`` iterations and stop trials below the median.
    try_base: the first trial trains the base settings, so the search never returns worse.
    startup_trials: trials drawn at random before TPE models the scores (the base trial counts
    as one); default ``default_startup_trials(n_trials)``.
    user_fraction: score a seeded share of the validation users (faster on large stores).
    timeout: stop starting trials after this many seconds. resume: continue the study if it
    exists (else start it over, removing its earlier trials).
    client, threads, memory_budget, storage_options: as for ``WALS.fit``; every trial's training
    and scoring stays under ``memory_budget``.
    callback(record): called after each trial.
    """
    import optuna

    started = time.perf_counter()
    key = _metric_key(metric, k)
    if n_trials < 1:
        raise SettingError(f"n_trials must be >= 1, got {n_trials}")
    if eval_every < 1:
        raise SettingError(f"eval_every must be >= 1, got {eval_every}")
    startup = default_startup_trials(n_trials) if startup_trials is None else startup_trials
    if isinstance(startup, bool) or not isinstance(startup, int) or startup < 0:
        raise SettingError(f"startup_trials must be an integer >= 0, got {startup_trials!r}")
    if validation is None and validation_method not in METHODS:
        raise SettingError(f"validation_method must be one of {METHODS}, got {validation_method!r}")
    folds = _fold_count(validation_folds, validation is not None, validation_method)
    space = SearchSpace.of(space)
    base = _base_config(base, seed)
    MemoryBudget.start(memory_budget)  # a budget too small for any trial fails before anything is written
    train_full = _open_store(train_store, storage_options)
    model_location = os.fspath(model) if model is not None else default_model_location(train_full.location)
    place = StudyPlace.beside(model_location, study, study_name, workdir)
    check_places(place)
    validation_store = _open_store(validation, storage_options) if validation is not None else None
    identity = {
        "train": interactions_identity(train_full)["store_id"],
        "validation": (interactions_identity(validation_store)["store_id"] if validation_store is not None else
                       {"carved": validation_method, "fraction": validation_fraction, "seed": seed,
                        **({"folds": folds} if folds > 1 else {})}),
        "metric": key,
        "search": {"space": space.to_dict(), "base": {k: v for k, v in base.to_dict().items() if k != "compute_loss"}},
    }
    if final:  # the outputs of the end, checked now rather than after the search
        _check_final_model(model_location, None, None, storage_options)
        if final is True and validation_store is not None:
            _check_merged_target(_merged_target(merged_store, train_full, validation_store), train_full,
                                 validation_store, storage_options)
    executor = Executor.of(None, client, threads)
    executor.check_reachable(train_full.location, model_location, place.workdir,
                             None if validation_store is None else validation_store.location)
    with locked_workdir(place, identity, resume), _quiet_optuna():
        storage = open_storage(place)
        if not resume:
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=place.name, storage=storage)
        tuning_train, validation_store = _tuning_stores(
            train_full, validation_store, place, validation_method, validation_fraction, seed, memory_budget,
            storage_options, progress)
        fold_stores = [(tuning_train, validation_store)] + [
            _carved_fold(train_full, place, validation_method, validation_fraction, seed, j, memory_budget, progress)
            for j in range(1, folds)]
        data = data_summary(tuning_train, base.eps)
        space = space.for_data(data)
        sampler = sampler_of(seed, startup)
        # a trial is judged from its second score on (the first, after a few iterations, says too little)
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, n_trials // 8)), n_warmup_steps=eval_every + 1) if prune
                  else optuna.pruners.NopPruner())
        study_obj = optuna.create_study(storage=storage, study_name=place.name, direction="maximize", sampler=sampler,
                                        pruner=pruner, load_if_exists=True)
        study_obj.set_user_attr("metric", key)
        study_obj.set_user_attr("data", data.to_dict())
        remaining = _prepare_resume(study_obj, storage, n_trials, space, data, base, try_base)
        remove_trial_stores(place, keep=_best_numbers(study_obj) if keep_best else set())
        objective = _Objective(
            fold_stores, space, data, base, place, key, k, prune, eval_every, user_fraction, seed,
            keep_best, executor, memory_budget, storage_options,
        )
        if remaining > 0:
            study_obj.optimize(objective, n_trials=remaining, timeout=timeout, catch=(),
                               callbacks=[_report(callback)] if callback is not None else None)
        remove_trial_stores(place, keep=_best_numbers(study_obj) if keep_best else set())
        best = _best(study_obj)
        if best is None:
            raise SettingError(f"no trial of the study {place.name!r} in {place.db} completed; see its table")
        result = TuneResult(
            best_params=dict(best.user_attrs["settings"]), best_value=float(best.value), best_trial=best.number,
            metric=key, trials=trial_records(study_obj), study=place.db, study_name=place.name,
            workdir=place.workdir, data=data.to_dict(),
            folds=[(t.location, v.location) for t, v in fold_stores],
        )
        best_store = place.trial_store(best.number)
        if keep_best and trial_store_complete(best_store):
            result.best_model = best_store
        if final:
            full = _final_store(final, train_full, validation, validation_store, merged_store, memory_budget,
                                storage_options, progress)
            result.final_store = full.location
            config = trial_config(base, result.best_params)
            config = WALSConfig.from_dict({**config.to_dict(), "compute_loss": True})
            _check_final_model(model_location, config, full, storage_options)
            train(full, model_location, config, executor=executor, progress=progress, memory_budget=memory_budget,
                  storage_options=storage_options, resume=True)
            result.final_model = model_location
    result.seconds = time.perf_counter() - started
    return result


def default_startup_trials(n_trials: int) -> int:
    """Start-up trials of a search of ``n_trials`` before TPE models the scores: the first trial
    (the base settings, by default the defaults chosen by measurement across data sets) and one
    drawn at random. TPE then draws near the better of them from the third trial on, instead of
    spending a quarter of a 40-trial budget on random points (tools/RESULTS.md, "Issue 13 (round 23)")."""
    return min(2, n_trials)


def sampler_of(seed: int, startup_trials: int):
    """The search's sampler: Optuna's multivariate TPE (one joint model of all the settings)."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup_trials)


def _tuning_stores(train_full, validation_store, place, method, fraction, seed, memory_budget, storage_options, progress):
    """The stores trials train on and are scored on: as given, or a split carved from ``train_full``."""
    if validation_store is not None:
        if train_full.id_kind != validation_store.id_kind:
            raise DataMismatchError(f"{train_full.location} and {validation_store.location} have different id kinds")
        return train_full, validation_store
    carved_train = os.path.join(place.workdir, "train.zarr")
    carved_validation = os.path.join(place.workdir, "validation.zarr")
    try:
        return InteractionStore(carved_train), InteractionStore(carved_validation)
    except StoreError:  # absent, interrupted or damaged: (re)carve; it is seeded, so the same split comes out
        pass
    if method in ("leave_last_out", "last_fraction") and not train_full.has_order:
        raise SettingError(f"validation method {method!r} splits by time, but {train_full.location} has no entry order")
    split(train_full, carved_train, carved_validation, method=method,
          test_fraction=fraction, seed=seed, overwrite=True, memory_budget=memory_budget, progress=progress)
    return InteractionStore(carved_train), InteractionStore(carved_validation)


def _fold_count(folds: int | None, given: bool, method: str) -> int:
    if folds is None:
        return 3 if not given and method in ("leave_last_out", "leave_one_out") else 1
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise SettingError(f"validation_folds must be an integer >= 1, got {folds!r}")
    if folds > 1 and given:
        raise SettingError("validation_folds > 1 needs a validation carved from the training store: "
                           "pass no validation store", flags={"validation": "--validation"})
    if folds > 1 and method == "last_fraction":
        raise SettingError("validation_folds > 1 is not offered for the last_fraction carve (each fold would "
                           "drop a further fraction of every user's entries); use leave_last_out or random")
    return folds


def _carved_fold(train_full, place, method, fraction, seed, fold, memory_budget, progress):
    """Fold ``fold`` (>= 1) of a carved validation: ``leave_last_out`` from the previous fold's
    training part (rolling back one entry per user), else from the training store with seed
    ``seed + fold``. Carved once; an interrupted carve is made again (it is seeded)."""
    previous, _ = carved_names(fold - 1)
    names = carved_names(fold)
    part, validation = (os.path.join(place.workdir, n) for n in names)
    try:
        return InteractionStore(part), InteractionStore(validation)
    except StoreError:  # absent, interrupted or damaged: (re)carve this fold; it is seeded, so the same one comes out
        pass
    source = InteractionStore(os.path.join(place.workdir, previous)) if method == "leave_last_out" else train_full
    split(source, part, validation, method=method, test_fraction=fraction, seed=seed + fold, overwrite=True,
          memory_budget=memory_budget, progress=progress)
    return InteractionStore(part), InteractionStore(validation)


def _final_store(final, train_full, validation, validation_store, merged_store, memory_budget, storage_options,
                 progress) -> InteractionStore:
    if final is True:
        if validation is None:  # carved from train_full: it holds everything
            return train_full
        location = _merged_target(merged_store, train_full, validation_store)
        return _merged_store(train_full, validation_store, location, memory_budget, storage_options, progress)
    return _open_store(final, storage_options)


def _check_final_model(location: str, config: WALSConfig | None, store: InteractionStore | None,
                       storage_options) -> None:
    """The final model's path: free, or a model of the same data and settings (resumed). Before
    the search only the path is checked (config, store None); after it, the model there too."""
    state = _refuse_target(location, MODEL_KIND, "model", storage_options)
    if state.what != "store" or config is None or store is None:
        return
    existing = FactorStore.open(location, "r", storage_options)
    same_data = existing.binding.get("store_id") == store.attrs().get("store_id")
    if existing.config.objective_dict() != config.objective_dict() or not same_data:
        raise PathError(f"{location} holds a model of other settings or data; give another model path "
                        "(model= / --model) or remove it")


def _best(study):
    try:
        return study.best_trial
    except ValueError:
        return None


def _best_numbers(study) -> set[int]:
    best = _best(study)
    return set() if best is None else {best.number}


def _prepare_resume(study, storage, n_trials: int, space: SearchSpace, data: DataSummary, base: WALSConfig,
                    try_base: bool) -> int:
    """Mark trials cut off by a kill as failed and queue them again; return the trials left to run."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in trials:
        if trial.state == TrialState.RUNNING:  # the lock says no other search runs: this one was killed
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        if trial.state in (TrialState.RUNNING, TrialState.FAIL) and trial.number not in retried and trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    if not trials and try_base:
        study.enqueue_trial(space.point(space.settings({}, data, base), data), user_attrs={"base": True})
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    return n_trials - finished


def _report(callback):
    def after_trial(study, frozen) -> None:
        records = [r for r in trial_records(study) if r.number == frozen.number]
        if records:
            callback(records[0])

    return after_trial


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna's per-trial info lines and experimental-feature warnings off while we search."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


class _Objective:
    """One trial: train the proposed settings into the trial's store, scoring as it goes."""

    def __init__(self, folds, space, data, base, place, key, k, prune, eval_every, user_fraction,
                 seed, keep_best, executor, memory_budget, storage_options):
        self.folds = folds  # (train, validation) stores; fold 0 is what pruning judges
        self.train_store, self.validation = folds[0]
        self.space, self.data, self.base = space, data, base
        self.place, self.key, self.k, self.prune, self.eval_every = place, key, k, prune, eval_every
        self.user_fraction, self.seed, self.keep_best = user_fraction, seed, keep_best
        self.executor, self.memory_budget, self.storage_options = executor, memory_budget, storage_options

    def score(self, location: str, fold: int = 0) -> float:
        train_store, validation = self.folds[fold]
        model = FactorStore.open(location, "r")
        metrics = evaluate(model, train_store, validation, self.k, self.user_fraction, self.seed,
                           executor=self.executor, memory_budget=self.memory_budget,
                           storage_options=self.storage_options, auc=self.key == "auc")
        if not metrics["users"]:
            raise DataMismatchError(f"no user of the validation store {validation.location} is in the training "
                                    f"store {train_store.location} with a held-out item it knows: nothing to score")
        return float(metrics[self.key])

    def __call__(self, trial) -> float:
        import optuna

        settings = self.space.settings(self.space.suggest(trial), self.data, self.base)
        trial.set_user_attr("settings", settings)
        config = trial_config(self.base, {**settings, "compute_loss": False})
        location = self.place.trial_store(trial.number)
        started = time.perf_counter()
        done = 0
        keep = False

        def after_iteration(iteration: int, seconds: float, loss) -> None:
            nonlocal done
            done = iteration  # iterations done (train's callback counts from 1); its checkpoint is committed
            if self.prune and done % self.eval_every == 0 and done < config.iterations:
                trial.report(self.score(location), done)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        try:
            train(self.train_store, location, config, executor=self.executor, callback=after_iteration,
                  progress=False, memory_budget=self.memory_budget, resume=False, storage_options=self.storage_options)
            scores = [self.score(location)]
            for fold in range(1, len(self.folds)):  # the further folds: trained to the end, then dropped
                fold_location = self.place.trial_store(trial.number, fold)
                train(self.folds[fold][0], fold_location, config, executor=self.executor, progress=False,
                      memory_budget=self.memory_budget, resume=False, storage_options=self.storage_options)
                scores.append(self.score(fold_location, fold))
                remove_store(fold_location, MODEL_KIND)
            if len(scores) > 1:
                trial.set_user_attr("fold_scores", scores)
            value = float(sum(scores) / len(scores))
            if not math.isfinite(value):
                raise FloatingPointError(f"trial {trial.number} scored {value}")
            best = _best(trial.study)
            keep = self.keep_best and (best is None or value > best.value)
            if keep:  # the new best: the previous best's store goes
                remove_trial_stores(self.place, keep={trial.number})
            return value
        finally:
            trial.set_user_attr("iterations_done", done)
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 3))
            if not keep:
                remove_trial_stores(self.place, keep=_best_numbers(trial.study))


__all__ = ["SEARCHED", "TuneResult", "default_startup_trials", "sampler_of", "tune"]
