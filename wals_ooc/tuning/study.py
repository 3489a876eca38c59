"""Where a search lives, and how it is resumed and shown.

A search is an Optuna study in an SQLite file, plus one work directory that holds the trials'
model stores (and a validation split carved from the training store, if the search made one)::

    plays-model.tune.db        the study: every trial's point, settings, state and scores
    plays-model.tune/          tune.json (what the study searches, on which data), .lock,
                               trial-00012.zarr (the best trial's model; the others are removed)

One search runs on a study at a time (a lock file in the work directory); so when a search
starts, a trial still marked running was cut off by a kill, and is marked failed and tried again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import sqlite3
from dataclasses import dataclass, field
from typing import AbstractSet, Iterator

from ..errors import DataMismatchError, PathError, SettingError, StoreLockedError

KIND = "wals-ooc/tune"
MARKER = "tune.json"
TRIAL_STORE = re.compile(r"^trial-(\d{5,})(?:-fold\d+)?\.zarr$")
TRIAL_LEFTOVER = re.compile(r"^\.(trial-(\d{5,})(?:-fold\d+)?\.zarr)\.wals-ooc-")  # a killed trial's build or lock file
CARVED = ("train.zarr", "validation.zarr")  # a validation split carved by the search (fold 0)
CARVED_FOLD = re.compile(r"^(train|validation)-\d+\.zarr$")  # the further folds' splits


def carved_names(fold: int) -> tuple[str, str]:
    """The carved (train, validation) store names of a fold: fold 0 keeps the single split's names."""
    return CARVED if fold == 0 else (f"train-{fold}.zarr", f"validation-{fold}.zarr")


@dataclass(frozen=True)
class StudyPlace:
    """The study's SQLite file, its name inside it, and its work directory (all local paths)."""

    db: str
    name: str
    workdir: str

    @classmethod
    def beside(cls, model: str, study: str | os.PathLike | None = None, name: str | None = None,
               workdir: str | os.PathLike | None = None) -> StudyPlace:
        """Defaults: ``<model>.tune.db`` and ``<model>.tune/`` beside the model's path."""
        base = model.rstrip("/")
        base = base[: -len(".zarr")] if base.endswith(".zarr") else base
        db = os.fspath(study) if study is not None else base + ".tune.db"
        if "://" in db:
            raise PathError(f"the study {db} must be a local file (it is an SQLite database)")
        stem = db[: -len(".db")] if db.endswith(".db") else db
        work = os.fspath(workdir) if workdir is not None else stem + ("" if stem.endswith(".tune") else ".tune")
        if "://" in work:
            raise PathError(f"the tuning work directory {work} must be a local directory")
        return cls(os.path.abspath(db), name or "wals-ooc", os.path.abspath(work))

    @property
    def url(self) -> str:
        return "sqlite:///" + self.db

    def trial_store(self, number: int, fold: int = 0) -> str:
        """A trial's model store; trials scored on several folds train fold ``j >= 1`` beside it."""
        return os.path.join(self.workdir, f"trial-{number:05d}" + (f"-fold{fold}" if fold else "") + ".zarr")


def open_storage(place: StudyPlace):
    """Optuna's SQLite storage of the study, in write-ahead-log mode.

    WAL with ``synchronous=NORMAL`` commits without waiting for the disk on every one of the
    search's many small writes (a trial makes a dozen), yet a killed process loses nothing that
    was committed: only a power cut can drop the last commits, never corrupt the file.
    """
    import optuna
    from sqlalchemy import event

    with contextlib.closing(sqlite3.connect(place.db)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")  # recorded in the file: every later connection uses it
    storage = optuna.storages.RDBStorage(place.url, engine_kwargs={"connect_args": {"timeout": 60}})

    def on_connect(connection, _record) -> None:
        connection.execute("PRAGMA synchronous=NORMAL")

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened before the listener reconnect with it
    return storage


def check_places(place: StudyPlace) -> None:
    """Refuse a study file or work directory inside a store (never write into what is not ours)."""
    from ..store.lifecycle import enclosing_store

    for what, path in (("study", place.db), ("tuning work directory", place.workdir)):
        outer = enclosing_store(path)
        if outer is not None:
            raise PathError(f"the {what} {path} is inside the store {outer}: refusing to write into it (nothing "
                            "was changed); give a path outside it")
    check_database(place.db)


def check_database(db: str) -> None:
    """Refuse a file that exists and is not an Optuna database: never write into others' data."""
    if not os.path.exists(db):
        parent = os.path.dirname(db) or "."
        if not os.path.isdir(parent):
            raise PathError(f"cannot create the study {db}: {parent} is not a directory")
        return
    if os.path.isdir(db):
        raise PathError(f"the study {db} is a directory; give a file path for the SQLite study")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise PathError(f"{db} exists and is not an SQLite database ({exc}); choose another study path") from exc
    if tables and not {"studies", "trials", "version_info"} <= tables:
        raise PathError(f"{db} is an SQLite database of something else (tables {sorted(tables)[:5]}); "
                        "choose another study path")


@contextlib.contextmanager
def locked_workdir(place: StudyPlace, identity: dict, resume: bool = True) -> Iterator[None]:
    """Create or reopen the work directory, hold its lock, and check it belongs to this study.

    Without ``resume`` the study's earlier trial stores, carved split and marker are removed first.
    """
    marker = os.path.join(place.workdir, MARKER)
    if os.path.exists(place.workdir):
        if not os.path.isdir(place.workdir):
            raise PathError(f"the tuning work directory {place.workdir} exists and is not a directory")
        if not os.path.exists(marker) and os.listdir(place.workdir):
            raise PathError(f"{place.workdir} exists and is not a wals-ooc tuning directory; choose another "
                            "work directory (or study path)")
    os.makedirs(place.workdir, exist_ok=True)
    with open(os.path.join(place.workdir, ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StoreLockedError(f"another search is running on the study in {place.workdir}; wait for it "
                                   "or give another study path") from exc
        try:
            recorded = _read_marker(marker)
            if recorded is not None and (recorded.get("db") != place.db or recorded.get("study") != place.name):
                raise PathError(f"{place.workdir} belongs to the study {recorded.get('study')!r} in "
                                f"{recorded.get('db')}; give another work directory")
            if not resume:
                _start_over(place)
                recorded = None
            wanted = {"kind": KIND, "db": place.db, "study": place.name, **identity}
            if recorded is None:
                _write_json(marker, wanted)
            else:
                _check_same(recorded, wanted, place)
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _read_marker(marker: str) -> dict | None:
    if not os.path.exists(marker):
        return None
    try:
        with open(marker) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as exc:
        raise PathError(f"{marker} is not a readable wals-ooc tuning marker ({exc})") from exc
    if not isinstance(recorded, dict) or recorded.get("kind") != KIND:
        raise PathError(f"{marker} is not a wals-ooc tuning marker")
    return recorded


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _check_same(recorded: dict, wanted: dict, place: StudyPlace) -> None:
    for key in ("train", "validation"):
        if recorded.get(key) != wanted.get(key):
            raise DataMismatchError(
                f"the study {place.name!r} in {place.db} was searched on other {key} data "
                f"({recorded.get(key)} vs {wanted.get(key)}); start over with resume=False / --no-resume "
                "or give another study path")
    for key in ("search", "metric"):
        if recorded.get(key) != wanted.get(key):
            raise SettingError(
                f"the study {place.name!r} in {place.db} searched with other settings ({key}: {recorded.get(key)} "
                f"vs {wanted.get(key)}); start over with resume=False / --no-resume or give another study path")


def remove_trial_stores(place: StudyPlace, keep: AbstractSet[int] = frozenset()) -> None:
    """Remove every trial store in the work directory except those of trials ``keep``, with what
    killed trials left beside them (unfinished builds, lock files), through the door."""
    from ..store.lifecycle import remove_store
    from ..train.factors import MODEL_KIND

    if not os.path.isdir(place.workdir):
        return
    stores: dict[str, int] = {}
    for name in os.listdir(place.workdir):
        found = TRIAL_STORE.match(name)
        if found:
            stores[name] = int(found.group(1))
            continue
        leftover = TRIAL_LEFTOVER.match(name)
        if leftover:
            stores[leftover.group(1)] = int(leftover.group(2))
    for name, number in sorted(stores.items()):
        if number in keep and TRIAL_STORE.match(name) and "-fold" not in name:
            continue  # a kept trial keeps its (fold 0) model; the other folds' models are scratch
        with contextlib.suppress(StoreLockedError):  # a live writer (never, under the study's lock)
            remove_store(os.path.join(place.workdir, name), MODEL_KIND)


def trial_store_complete(location: str) -> bool:
    """A trial's model that finished training (a killed or pruned trial's store is never trusted)."""
    from ..train.factors import FactorStore

    try:
        model = FactorStore.open(location, "r")
    except Exception:  # absent, unfinished or not a model: not one to hand out
        return False
    return bool(model.group.attrs.get("complete")) and model.iterations_done >= model.config.iterations


def _start_over(place: StudyPlace) -> None:
    """Remove the study's trial stores, carved split and marker (through the door)."""
    from ..store.lifecycle import remove_store
    from ..store.format import INTERACTIONS_KIND

    remove_trial_stores(place)
    for name in [*CARVED, *(n for n in sorted(os.listdir(place.workdir)) if CARVED_FOLD.match(n))]:
        remove_store(os.path.join(place.workdir, name), INTERACTIONS_KIND)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(place.workdir, MARKER))


# ---------------------------------------------------------------------------------------------
# The trials, as a table
# ---------------------------------------------------------------------------------------------


@dataclass
class TrialRecord:
    """One trial as shown: state, score, the WALS settings it trained, where its time went."""

    number: int
    state: str  # complete, pruned, failed, running, waiting
    value: float | None
    settings: dict = field(default_factory=dict)
    iterations_done: int | None = None
    seconds: float | None = None
    retry_of: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def trial_records(study) -> list[TrialRecord]:
    records = []
    for trial in study.get_trials(deepcopy=False):
        value = trial.value if trial.value is not None else None
        if value is None and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        records.append(TrialRecord(
            number=trial.number,
            state={"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
                   "WAITING": "waiting"}.get(trial.state.name, trial.state.name.lower()),
            value=value,
            settings=dict(trial.user_attrs.get("settings", {})),
            iterations_done=trial.user_attrs.get("iterations_done"),
            seconds=trial.user_attrs.get("seconds"),
            retry_of=trial.user_attrs.get("retry_of"),
        ))
    return records


def _fmt(value, width: int, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    if isinstance(value, float):
        text = f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
        return text.rjust(width)
    return str(value).rjust(width)


def format_table(records: list[TrialRecord], metric: str, best: int | None) -> str:
    """A fixed-width table of trials, best marked with ``*``."""
    columns = ["trial", "state", metric, "iters", "seconds", "confidence", "alpha", "alpha0", "regularization", "nu",
               "factors", "iterations"]
    widths = [6, 9, max(9, len(metric)), 6, 8, 10, 10, 9, 14, 6, 7, 10]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    for r in records:
        s = r.settings
        cells = [
            f"{r.number}{'*' if r.number == best else ' '}".rjust(widths[0]), r.state.rjust(widths[1]),
            _fmt(r.value, widths[2]), _fmt(r.iterations_done, widths[3]),
            _fmt(None if r.seconds is None else round(r.seconds, 1), widths[4], 3),
            _fmt(s.get("confidence"), widths[5]), _fmt(s.get("alpha"), widths[6], 3), _fmt(s.get("alpha0"), widths[7], 3),
            _fmt(s.get("regularization"), widths[8], 3), _fmt(s.get("nu"), widths[9], 2),
            _fmt(s.get("factors"), widths[10]), _fmt(s.get("iterations"), widths[11]),
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)
