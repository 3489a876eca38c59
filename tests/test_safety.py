"""Never lose or corrupt a user's data (issue 9): one test per case of the issue, each checking
that existing stores are byte-identical afterwards, that non-store directories keep their files,
and that the error is one line naming the path; then the swap schemes (local rename, object
store pointer on moto S3), locks, leftovers of killed runs, and a fault-injection run where
writes fail with ENOSPC at random points.

The CLI runs in-process (``wals_ooc.cli.main``) except where a real process matters (kill -9,
permissions, warnings as printed)."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

import wals_ooc
from wals_ooc import WALS
from wals_ooc.cli import main
from wals_ooc.errors import (
    CorruptStoreError,
    DataMismatchError,
    IncompleteModelWarning,
    PathError,
    StaleLockWarning,
    StorageError,
    StoreError,
    StoreLockedError,
)
from wals_ooc.store import lifecycle
from wals_ooc.store.format import FORMAT_VERSION, INTERACTIONS_KIND, create_array, open_group
from wals_ooc.store.reader import open_store
from wals_ooc.train import FactorStore

from .conftest import moto_s3

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


class FaultyFileSystem(LocalFileSystem):
    """The local file system behind ``faulty://``, whose writes fail once a budget is spent.

    ``writes_left``: writes allowed before every further one raises ``OSError(fail_errno)``
    (None: no faults). ``writes`` counts them all. Class attributes: fsspec caches instances.
    """

    protocol = ("faulty",)
    writes_left: int | None = None
    writes = 0
    fail_errno = errno.ENOSPC

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("auto_mkdir", True)
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return LocalFileSystem._strip_protocol(path[len("faulty://"):] if path.startswith("faulty://") else path)

    @classmethod
    def arm(cls, writes_left: int | None, fail_errno: int = errno.ENOSPC) -> None:
        cls.writes_left, cls.writes, cls.fail_errno = writes_left, 0, fail_errno

    def _write(self, path) -> None:
        cls = type(self)
        cls.writes += 1
        if cls.writes_left is not None:
            if cls.writes_left <= 0:
                raise OSError(cls.fail_errno, os.strerror(cls.fail_errno), str(path))
            cls.writes_left -= 1

    def _open(self, path, mode="rb", **kwargs):
        if any(c in mode for c in "wax+"):
            self._write(path)
        return super()._open(path, mode, **kwargs)

    def makedirs(self, path, exist_ok=False):
        if self.writes_left is not None and self.writes_left <= 0 and not os.path.isdir(self._strip_protocol(path)):
            self._write(path)
        return super().makedirs(path, exist_ok=exist_ok)


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


@pytest.fixture(autouse=True)
def _no_faults():
    FaultyFileSystem.arm(None)
    yield
    FaultyFileSystem.arm(None)
    lifecycle.USE_RENAME_EXCHANGE = True


def snapshot(path) -> dict[str, str]:
    """sha256 of every file under a path (or of the file): arrays, attributes, everything."""
    path = Path(path)
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, command: str, *names) -> str:
    """The run failed with exactly one ``wals-ooc CMD: error:`` line naming each of ``names``."""
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"wals-ooc {command}: error: ")]
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def write_log(path, n_users=40, n_items=25, rows=400, seed=0, prefix="u") -> Path:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, rows)
    items = (users * 7 + rng.integers(0, 5, rows)) % n_items  # some structure to learn
    lines = [f"{prefix}{u:03d},i{i:03d},{c}" for u, i, c in zip(users, items, rng.integers(1, 4, rows))]
    Path(path).write_text("user,item,value\n" + "\n".join(lines) + "\n")
    return Path(path)


CONVERT = dict(progress=False, row_block=8, shard_nnz=100)


def fit(store, location, iterations=3, resume=True, seed=1, callback=None) -> WALS:
    model = WALS(factors=4, iterations=iterations, random_state=seed, threads=1)
    return model.fit(str(store), str(location), resume=resume, progress=False, callback=callback)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A CSV, its store, a train/test split and a model trained on the train side."""
    d = tmp_path_factory.mktemp("base")
    csv = write_log(d / "plays.csv")
    other = write_log(d / "other.csv", n_users=30, n_items=20, seed=5, prefix="x")
    wals_ooc.convert(str(csv), str(d / "data.zarr"), **CONVERT)
    wals_ooc.split(str(d / "data.zarr"), str(d / "train.zarr"), str(d / "test.zarr"), seed=1, shard_nnz=100)
    fit(d / "train.zarr", d / "model.zarr")
    return SimpleNamespace(dir=d, csv=csv, other=other, data=d / "data.zarr", train=d / "train.zarr",
                           test=d / "test.zarr", model=d / "model.zarr")


def copy(source, target) -> Path:
    shutil.copytree(source, target)
    return Path(target)


def project_dir(path) -> Path:
    """A directory that is not a store: a project with a .git folder and a notes file."""
    path = Path(path)
    (path / ".git" / "objects").mkdir(parents=True)
    (path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (path / "notes.txt").write_text("my notes\n")
    return path


def leftovers(directory) -> list[str]:
    """Temporary things of wals-ooc in a directory (builds, workspaces, locks)."""
    return sorted(n for n in os.listdir(directory) if ".wals-ooc-" in n)


# ---------------------------------------------------------------------------------------------
# Case 1: a directory that is not a store, a file, a store of another kind: refused, untouched
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "convert-overwrite", "generate-store", "generate-csv", "split-train",
                                     "split-test", "train", "recommend-zarr", "recommend-parquet"])
def test_a_directory_that_is_not_a_store_is_refused_and_keeps_its_files(base, tmp_path, capsys, command):
    target = project_dir(tmp_path / ("mydir.zarr" if command == "generate-store" else "mydir"))
    before, listing = snapshot(target), os.listdir(tmp_path)
    args = {
        "convert": ["convert", base.csv, target, "-q"],
        "convert-overwrite": ["convert", base.csv, target, "--overwrite", "-q"],
        "generate-store": ["generate", target, "--users", "20", "--items", "10", "--rows", "100", "--overwrite", "-q"],
        "generate-csv": ["generate", target, "--users", "20", "--items", "10", "--rows", "100", "--overwrite", "-q"],
        "split-train": ["split", base.data, target, tmp_path / "test.zarr", "--overwrite", "-q"],
        "split-test": ["split", base.data, tmp_path / "train.zarr", target, "--overwrite", "-q"],
        "train": ["train", base.train, "--model", target, "--no-resume", "--factors", "4", "--iterations", "1", "-q"],
        "recommend-zarr": ["recommend", base.model, "--all", "--output", target, "--overwrite"],
        "recommend-parquet": ["recommend", base.model, "--all", "--output", target, "--format", "parquet", "--overwrite"],
    }[command]
    code, _, err = run(capsys, *args)
    one_line_error(code, err, args[0], target)
    assert snapshot(target) == before
    assert os.listdir(tmp_path) == listing  # no other output of the failed run was left either


def test_convert_into_the_current_directory_of_a_project_keeps_its_git(base, tmp_path, capsys, monkeypatch):
    project = project_dir(tmp_path / "project")
    before = snapshot(project)
    monkeypatch.chdir(project)
    code, _, err = run(capsys, "convert", base.csv, ".", "--overwrite", "-q")
    assert "is a directory that is not a wals-ooc store" in one_line_error(code, err, "convert", ".")
    assert snapshot(project) == before


def test_a_file_or_a_store_of_another_kind_is_refused_even_with_overwrite(base, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    model = copy(base.model, tmp_path / "model.zarr")
    before = snapshot(notes), snapshot(model)
    code, _, err = run(capsys, "convert", base.csv, notes, "--overwrite", "-q")
    assert "is a file" in one_line_error(code, err, "convert", notes)
    code, _, err = run(capsys, "convert", base.csv, model, "--overwrite", "-q")
    assert "is a wals-ooc/model store, not a wals-ooc/interactions store" in one_line_error(code, err, "convert", model)
    code, _, err = run(capsys, "train", base.train, "--model", base.data, "--no-resume", "-q")  # data as a model
    one_line_error(code, err, "train", base.data)
    code, _, err = run(capsys, "convert", base.csv, model / "user" / "new.zarr", "-q")  # inside a store
    assert f"is inside the wals-ooc store {model / 'user'}" in one_line_error(code, err, "convert", model)
    assert (snapshot(notes), snapshot(model)) == before


def test_an_existing_store_needs_overwrite_and_the_message_names_the_flag(base, tmp_path, capsys):
    store = copy(base.data, tmp_path / "data.zarr")
    before = snapshot(store)
    code, _, err = run(capsys, "convert", base.csv, store, "-q")
    assert "pass --overwrite to replace it" in one_line_error(code, err, "convert", store)
    with pytest.raises(PathError, match="pass overwrite=True"):
        wals_ooc.convert(str(base.csv), str(store), **CONVERT)
    assert snapshot(store) == before


# ---------------------------------------------------------------------------------------------
# Case 2: a failed --overwrite (mistyped input, one bad row, bad argument) keeps the old store
# ---------------------------------------------------------------------------------------------


def test_failed_overwrite_keeps_the_old_store_and_its_models_serving(base, tmp_path, capsys):
    store = copy(base.data, tmp_path / "good.zarr")
    model_path = tmp_path / "model.zarr"
    fit(store, model_path, iterations=2)
    before = snapshot(store)
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,value\nu1,i1,3\nu2,i2,x\n")
    typo = tmp_path / "plyas.csv"
    for args, names in (
        (["convert", typo, store, "--overwrite", "-q"], [typo, "no such file"]),
        (["convert", bad, store, "--overwrite", "-q"], [f"{bad}:3", "value"]),
        (["convert", base.csv, store, "--overwrite", "--row-block", "0", "-q"], ["--row-block"]),
        (["convert", base.csv, store, "--overwrite", "--user-col", "nope", "-q"], [base.csv, "nope"]),
    ):
        code, _, err = run(capsys, *args)
        one_line_error(code, err, "convert", *names)
        assert snapshot(store) == before
        assert leftovers(tmp_path) == []
    ids, _ = wals_ooc.load(str(model_path)).recommend(["u001"], N=3)  # still serving, no mismatch
    assert ids.shape == (1, 3)


def test_failed_conversion_to_a_new_path_leaves_nothing_and_the_rerun_is_not_refused(base, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,value\nu1,i1,3\nu2,i2\n")
    code, _, err = run(capsys, "convert", bad, tmp_path / "new" / "s.zarr", "-q")
    one_line_error(code, err, "convert", f"{bad}:3")
    assert sorted(os.listdir(tmp_path)) == ["bad.csv"]  # not even the parent it would have made
    code, _, err = run(capsys, "convert", base.csv, tmp_path / "new" / "s.zarr", "-q")
    assert code == 0, err
    assert open_store(tmp_path / "new" / "s.zarr").nnz == open_store(base.data).nnz


# ---------------------------------------------------------------------------------------------
# Case 3: an output that is an input
# ---------------------------------------------------------------------------------------------


def test_an_output_that_is_an_input_is_refused(base, tmp_path, capsys):
    data = copy(base.data, tmp_path / "a.zarr")
    other = copy(base.data, tmp_path / "b.zarr")
    before = snapshot(data), snapshot(other)
    code, _, err = run(capsys, "train", data, "--model", data, "-q")
    assert "would overwrite the input" in one_line_error(code, err, "train", data)
    code, _, err = run(capsys, "train", data, "--model", data, "--no-resume", "-q")
    one_line_error(code, err, "train", data)
    code, _, err = run(capsys, "split", data, data, other, "--overwrite", "-q")
    assert "would overwrite the input" in one_line_error(code, err, "split", data)
    code, _, err = run(capsys, "split", data, other, other, "--overwrite", "-q")
    assert "given as two outputs" in one_line_error(code, err, "split", other)
    code, _, err = run(capsys, "convert", base.csv, base.csv, "--overwrite", "-q")
    one_line_error(code, err, "convert", base.csv)
    assert (snapshot(data), snapshot(other)) == before


# ---------------------------------------------------------------------------------------------
# Case 4: two writers of one store; locks of dead writers
# ---------------------------------------------------------------------------------------------


def test_a_second_trainer_gets_a_clear_error_and_the_model_stays_readable(base, tmp_path, capsys):
    model_path = tmp_path / "model.zarr"
    in_training, release = threading.Event(), threading.Event()
    failures = []

    def pause(iteration, seconds, loss):
        in_training.set()
        release.wait(60)

    def first():
        try:
            fit(base.train, model_path, iterations=2, callback=pause)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    assert in_training.wait(60)
    code, _, err = run(capsys, "train", base.train, "--model", model_path, "--no-resume", "--factors", "4", "-q")
    line = one_line_error(code, err, "train", model_path)
    assert f"process {os.getpid()} on {socket.gethostname()}" in line
    with pytest.raises(StoreLockedError):
        fit(base.train, model_path, iterations=2, resume=True)
    release.set()
    thread.join(60)
    assert not failures, failures
    assert wals_ooc.load(str(model_path)).recommend(["u001"], N=2)[0].shape == (1, 2)
    assert leftovers(tmp_path) == []


def test_the_lock_of_a_dead_writer_is_broken_with_a_warning(base, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    lock = tmp_path / ".s.zarr.wals-ooc-lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": 12345, "since": "earlier",
                                "command": "wals-ooc convert"}))
    with pytest.warns(StaleLockWarning, match=f"breaking the lock of process {pid}"):
        wals_ooc.convert(str(base.csv), str(tmp_path / "s.zarr"), **CONVERT)
    assert open_store(tmp_path / "s.zarr").nnz > 0 and not lock.exists()
    # a holder on another host is never presumed dead
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 1, "since": "earlier", "command": "x"}))
    with pytest.raises(StoreLockedError, match=f"process 1 on elsewhere.*delete {lock}"):
        wals_ooc.convert(str(base.csv), str(tmp_path / "s.zarr"), overwrite=True, **CONVERT)


# ---------------------------------------------------------------------------------------------
# Case 5: corrupt bytes, indices out of range
# ---------------------------------------------------------------------------------------------


def _flip_a_byte(path: Path, at: int = 7) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("array", ["by_user/indices", "by_user/values", "by_item/indptr", "user_ids/bytes"])
def test_a_flipped_byte_in_any_chunk_is_an_error_naming_store_array_and_chunk(base, tmp_path, capsys, array):
    store = copy(base.data, tmp_path / "data.zarr")
    _flip_a_byte(store / array / "c" / "0")
    with pytest.raises(CorruptStoreError, match=rf"{store}: chunk \(0,\) of array {array} is corrupt"):
        s = open_store(store)
        s.rows("user", 0, s.n_users)
        s.rows("item", 0, s.n_items)
        s.ids("user")
    code, _, err = run(capsys, "train", store, "--model", tmp_path / "m.zarr", "--factors", "4", "--iterations", "1",
                       "--threads", "1", "-q")
    assert "checksum mismatch" in one_line_error(code, err, "train", store, array, "(0,)")
    assert leftovers(tmp_path) == []


def test_a_missing_chunk_is_an_error_not_zeros(base, tmp_path):
    store = copy(base.data, tmp_path / "data.zarr")
    (store / "by_user" / "values" / "c" / "0").unlink()
    with pytest.raises(CorruptStoreError, match=rf"{store}: chunk \(0,\) of array by_user/values is missing"):
        open_store(store).rows("user", 0, 3)


def test_a_flipped_byte_in_a_factor_chunk_is_an_error_when_serving(base, tmp_path, capsys):
    model = copy(base.model, tmp_path / "model.zarr")
    slot = FactorStore.open(model).checkpoint.slots["user"]
    first_user = FactorStore.open(model).id_maps().ids("user", 0, 1)[0]  # its factors are in chunk (0, 0)
    _flip_a_byte(model / "user" / str(slot) / "c" / "0" / "0")
    code, _, err = run(capsys, "recommend", model, "--users", first_user)
    one_line_error(code, err, "recommend", model, f"user/{slot}", "(0, 0)")


@pytest.mark.parametrize("bad_index", [2**30, "n_items", -1])
def test_an_index_out_of_range_with_a_valid_checksum_is_refused_before_any_kernel(base, tmp_path, capsys, bad_index):
    store = copy(base.data, tmp_path / "data.zarr")
    n_items = open_store(store).n_items
    value = n_items if bad_index == "n_items" else bad_index
    indices = open_group(str(store), "r+")["by_user/indices"]
    indices[5] = value  # rewritten through Zarr: the chunk's checksum is valid
    with pytest.raises(CorruptStoreError, match=rf"by_user/indices\[5\] = {value} is outside \[0, {n_items}\)"):
        open_store(store).rows("user", 0, 10)
    code, _, err = run(capsys, "train", store, "--model", tmp_path / "m.zarr", "--factors", "4", "--iterations", "1",
                       "--threads", "1", "-q")
    one_line_error(code, err, "train", store, "by_user/indices")


def test_decreasing_row_pointers_are_refused(base, tmp_path):
    store = copy(base.data, tmp_path / "data.zarr")
    indptr = open_group(str(store), "r+")["by_item/indptr"]
    indptr[3] = int(indptr[5]) + 1
    with pytest.raises(CorruptStoreError, match="by_item/indptr is damaged at row"):
        open_store(store).rows("item", 0, 6)


@pytest.mark.parametrize("damage", ["index", "pointers"])
def test_liked_items_of_a_damaged_store_are_refused(base, tmp_path, damage):
    import wals_ooc.serve.liked as liked_module

    store = copy(base.data, tmp_path / "data.zarr")
    group = open_group(str(store), "r+")["by_user"]
    if damage == "index":
        group["indices"][int(group["indptr"][3])] = open_store(store).n_items  # checksum valid, id out of range
        match = r"by_user/indices holds \d+, outside \[0, \d+\)"
    else:
        group["indptr"][4] = int(group["indptr"][6]) + 1
        match = "by_user/indptr is damaged at row"
    for ratio in (1 << 30, 0):  # read as slices, and by coordinates
        previous, liked_module.SPARSE_RATIO = liked_module.SPARSE_RATIO, ratio
        try:
            with pytest.raises(CorruptStoreError, match=match):
                liked_module.liked_csr(open_store(store), "user", np.array([3, 4, 5, 9]))
        finally:
            liked_module.SPARSE_RATIO = previous


def test_stores_of_an_older_format_are_refused_with_a_clear_message(base, tmp_path, capsys):
    store = copy(base.data, tmp_path / "data.zarr")
    open_group(str(store), "r+").attrs["format_version"] = 1
    code, _, err = run(capsys, "info", store)
    assert f"format version 1, this wals-ooc reads version {FORMAT_VERSION}" in one_line_error(code, err, "info", store)
    model = copy(base.model, tmp_path / "model.zarr")
    open_group(str(model), "r+").attrs["format_version"] = 1
    code, _, err = run(capsys, "recommend", model, "--users", "u001")
    assert "train it again" in one_line_error(code, err, "recommend", model)


# ---------------------------------------------------------------------------------------------
# Case 6: a model is bound to its data by identity
# ---------------------------------------------------------------------------------------------


def test_a_model_refuses_other_data_at_its_path_and_serves_what_needs_none(base, tmp_path, capsys):
    data = copy(base.data, tmp_path / "data.zarr")
    model = tmp_path / "model.zarr"
    fit(data, model, iterations=2)
    expected = wals_ooc.load(str(model)).recommend(["u001", "u002"], N=3)
    similar = wals_ooc.load(str(model)).similar_items(["i001"], N=3)
    shutil.move(data, tmp_path / "moved.zarr")
    wals_ooc.convert(str(base.other), str(data), **CONVERT)  # other data, other shape, same path
    code, _, err = run(capsys, "recommend", model, "--users", "u001")
    assert "now holds other data" in one_line_error(code, err, "recommend", data, "--interactions", "--no-filter")
    code, _, err = run(capsys, "evaluate", model, base.test)
    one_line_error(code, err, "evaluate", data, "--interactions")
    code, out, err = run(capsys, "recommend", model, "--users", "u001", "--no-filter")  # needs no interactions
    assert code == 0, err
    code, out, err = run(capsys, "similar", model, "--items", "i001", "-n", "3")
    assert code == 0 and [s["item"] for s in json.loads(out)["similar"]] == similar[0][0].tolist()
    code, out, err = run(capsys, "recommend", model, "--users", "u001", "u002", "-n", "3", "--interactions",
                         tmp_path / "moved.zarr")
    assert code == 0, err
    assert [[i["item"] for i in json.loads(line)["items"]] for line in out.splitlines()] == expected[0].tolist()
    with pytest.raises(DataMismatchError, match="is not the interaction store model"):
        wals_ooc.load(str(model), interactions=str(data))  # given explicitly: refused at once


def test_a_model_finds_its_store_from_any_working_directory(base, tmp_path, capsys, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    wals_ooc.convert(str(base.csv), "data.zarr", **CONVERT)
    fit("data.zarr", "model.zarr", iterations=2)
    expected = wals_ooc.load("model.zarr").recommend(["u001"], N=3)[0]
    monkeypatch.chdir(tmp_path / "b")
    wals_ooc.convert(str(base.other), "data.zarr", **CONVERT)  # a store of the same name here
    got = wals_ooc.load(str(tmp_path / "a" / "model.zarr")).recommend(["u001"], N=3)[0]
    np.testing.assert_array_equal(got, expected)


def test_a_model_whose_store_is_gone_still_serves_similar_and_unfiltered(base, tmp_path, capsys):
    data = copy(base.data, tmp_path / "data.zarr")
    model = tmp_path / "model.zarr"
    fit(data, model, iterations=2)
    shutil.rmtree(data)
    loaded = wals_ooc.load(str(model))
    assert loaded.recommend(["u001"], N=2, filter_already_liked=False)[0].shape == (1, 2)
    assert loaded.similar_items(["i001"], N=2)[0].shape == (1, 2)
    assert loaded.recalculate_user({"i001": 2}).shape == (4,)
    with pytest.raises(DataMismatchError, match="is not at .*pass interactions=PATH, or pass filter_already_liked=False"):
        loaded.recommend(["u001"], N=2)
    out = tmp_path / "top.zarr"
    loaded.recommend_all(N=2, output=str(out), filter_already_liked=False)
    top = open_group(str(out))  # ragged: every user has its 2 (nothing filtered)
    assert top["item_ids"].shape == (open_store(base.data).n_users * 2,) and top["indptr"][-1] == top["item_ids"].shape[0]


# ---------------------------------------------------------------------------------------------
# Case 7: a model whose training did not complete says so
# ---------------------------------------------------------------------------------------------


def test_an_interrupted_training_is_reported_and_warned_about(base, tmp_path, capsys):
    model = tmp_path / "model.zarr"

    def stop_after_two(iteration, seconds, loss):
        if iteration == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(base.train, model, iterations=5, callback=stop_after_two)
    assert FactorStore.open(model).status().startswith("trained 2 of 5 iterations (incomplete")
    with pytest.warns(IncompleteModelWarning, match="trained 2 of 5 iterations"):
        loaded = wals_ooc.load(str(model))
    assert loaded.recommend(["u001"], N=2)[0].shape == (1, 2)
    code, out, _ = run(capsys, "info", model)
    assert code == 0 and "trained 2 of 5 iterations (incomplete" in out and "found, same store" in out
    fit(base.train, model, iterations=5)  # resumes and completes
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteModelWarning)
        wals_ooc.load(str(model))
    code, out, _ = run(capsys, "info", model)
    assert "trained 5 of 5 iterations (complete)" in out and "factors=4" in out


# ---------------------------------------------------------------------------------------------
# Case 8: killed runs: nothing that opens as a store, and their leftovers go with the next run
# ---------------------------------------------------------------------------------------------

KILLED_CONVERT = """
import os, signal, sys
import wals_ooc
import wals_ooc.store.writer as writer
real = writer._assemble
def die(*args, **kwargs):  # after the spill files and the first orientation are written
    if args[1] == "by_item":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
writer._assemble = die
wals_ooc.convert(sys.argv[1], sys.argv[2], overwrite=True, progress=False, row_block=8, shard_nnz=100)
"""


def test_a_killed_conversion_keeps_the_old_store_and_the_next_run_removes_its_leftovers(base, tmp_path):
    store = copy(base.data, tmp_path / "data.zarr")
    before = snapshot(store)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_CONVERT)
    done = subprocess.run([sys.executable, str(script), str(base.other), str(store)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert snapshot(store) == before
    left = leftovers(tmp_path)
    assert any(".data.zarr.wals-ooc-build-" in n for n in left) and any(n.startswith(".wals-ooc-tmp-") for n in left)
    with pytest.warns(StaleLockWarning):  # the next run, even to another target, cleans up
        wals_ooc.convert(str(base.csv), str(tmp_path / "other.zarr"), **CONVERT)
    assert leftovers(tmp_path) == []
    assert snapshot(store) == before


KILLED_TRAINING = """
import os, signal, sys
import wals_ooc
def die(iteration, seconds, loss):
    if iteration == 2:
        os.kill(os.getpid(), signal.SIGKILL)
wals_ooc.WALS(factors=4, iterations=4, random_state=9, threads=1).fit(sys.argv[1], sys.argv[2], resume=False,
                                                                       progress=False, callback=die)
"""


def test_a_killed_no_resume_training_leaves_the_old_model_servable(base, tmp_path):
    model = copy(base.model, tmp_path / "model.zarr")
    before = snapshot(model)
    expected = wals_ooc.load(str(model)).recommend(["u001"], N=3)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_TRAINING)
    done = subprocess.run([sys.executable, str(script), str(base.train), str(model)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert snapshot(model) == before
    got = wals_ooc.load(str(model)).recommend(["u001"], N=3)
    np.testing.assert_array_equal(got[0], expected[0])
    assert leftovers(tmp_path)  # the killed run's build and lock
    with pytest.warns(StaleLockWarning):
        fit(base.train, model, iterations=2, resume=False, seed=9)
    assert leftovers(tmp_path) == [] and FactorStore.open(model).status() == "trained 2 of 2 iterations (complete)"


def test_a_swap_cut_short_between_its_two_renames_is_undone_by_the_next_writer(base, tmp_path):
    store = copy(base.data, tmp_path / "data.zarr")
    before = snapshot(store)
    dead = subprocess.run([sys.executable, "-c", "import os, psutil; p = psutil.Process(); "
                           "print(os.getpid(), int(p.create_time()))"], capture_output=True, text=True).stdout.split()
    token = f"{lifecycle._host_tag()}-{dead[0]}-{dead[1]}-abcdef"
    os.rename(store, tmp_path / f".data.zarr{lifecycle.OLD_TAG}{token}")  # killed after the first rename
    with pytest.warns(StaleLockWarning, match="restored"):
        with pytest.raises(PathError, match="already exists"):  # the store is back, and not overwritten
            wals_ooc.convert(str(base.csv), str(store), **CONVERT)
    assert snapshot(store) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_swaps_by_rename_exchange_or_two_renames(base, tmp_path, exchange):
    lifecycle.USE_RENAME_EXCHANGE = exchange
    store = copy(base.data, tmp_path / "data.zarr")
    old_id = open_store(store).attrs()["store_id"]
    wals_ooc.convert(str(base.other), str(store), overwrite=True, **CONVERT)
    new = open_store(store)
    assert new.attrs()["store_id"] != old_id and "x000" in new.ids("user").tolist()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Case 9: errors a user can cause are one line naming the path, never a traceback
# ---------------------------------------------------------------------------------------------


def test_unreadable_inputs_are_one_line_errors(base, tmp_path, capsys):
    truncated = tmp_path / "plays.csv.gz"
    truncated.write_bytes(gzip.compress(base.csv.read_bytes() * 20)[:600])
    code, _, err = run(capsys, "convert", truncated, tmp_path / "s.zarr", "-q")
    assert "truncated or corrupt compressed data" in one_line_error(code, err, "convert", truncated)
    code, _, err = run(capsys, "convert", tmp_path, tmp_path / "s.zarr", "-q")
    assert "is a directory" in one_line_error(code, err, "convert", tmp_path)
    code, _, err = run(capsys, "info", tmp_path / "nothing.zarr")
    assert "no such store" in one_line_error(code, err, "info", tmp_path / "nothing.zarr")
    code, _, err = run(capsys, "evaluate", base.model, base.test, "-k", "0")
    assert "-k must be an integer >= 1" in one_line_error(code, err, "evaluate")
    code, _, err = run(capsys, "recommend", base.model, "--users", "u001", "-n", "0")
    assert "-n must be an integer >= 1" in one_line_error(code, err, "recommend")
    code, _, err = run(capsys, "evaluate", base.model, base.train)
    assert "training data" in one_line_error(code, err, "evaluate", base.train)
    assert leftovers(tmp_path) == [] and not (tmp_path / "s.zarr").exists()


def _unprivileged() -> list[str]:
    """A command prefix under which file permissions apply (root ignores them: drop its override)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv"):
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    raise RuntimeError("running as root without setpriv (util-linux): cannot make a permission error")


PERMISSION_CASES = """
import contextlib, io, json, sys
from wals_ooc.cli import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_permission_denied_and_a_read_only_target_are_one_line_errors(base, tmp_path):
    locked_input = tmp_path / "secret.csv"
    shutil.copy(base.csv, locked_input)
    locked_input.chmod(0)
    read_only = tmp_path / "readonly"
    read_only.mkdir()
    store = copy(base.data, read_only / "data.zarr")
    before = snapshot(store)
    read_only.chmod(0o555)
    cases = [
        (["convert", str(locked_input), str(tmp_path / "s.zarr"), "-q"], [locked_input, "permission denied"]),
        (["convert", str(base.csv), str(store), "--overwrite", "-q"], [store, "Permission denied"]),
        (["convert", str(base.csv), str(read_only / "new.zarr"), "-q"], [read_only / "new.zarr", "Permission denied"]),
    ]
    try:  # one process, without root's permission override when run as root
        done = subprocess.run(_unprivileged() + [sys.executable, "-c", PERMISSION_CASES,
                                                 json.dumps([args for args, _ in cases])],
                              capture_output=True, text=True, timeout=120)
    finally:
        read_only.chmod(0o755)
        locked_input.chmod(0o644)
    assert done.returncode == 0, done.stderr
    for (code, err), (args, names) in zip(json.loads(done.stdout.splitlines()[-1]), cases):
        one_line_error(code, err, "convert", *names)
    assert snapshot(store) == before and leftovers(read_only) == [] and not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EIO])
def test_disk_full_read_only_file_system_and_io_errors_keep_the_old_store(base, tmp_path, capsys, code):
    store = copy(base.data, tmp_path / "data.zarr")
    before = snapshot(store)
    FaultyFileSystem.arm(5, code)
    status, _, err = run(capsys, "convert", base.other, f"faulty://{store}", "--overwrite", "-q",
                         "--row-block", "8", "--shard-nnz", "100")
    line = one_line_error(status, err, "convert", f"faulty://{store}", "nothing was changed")
    assert os.strerror(code) in line and status == 1  # a failure of the system, not of the user (README)
    assert snapshot(store) == before and leftovers(tmp_path) == []


def test_the_cli_prints_warnings_as_one_line_and_tracebacks_only_with_v(base, tmp_path, capsys):
    model = tmp_path / "model.zarr"
    with pytest.raises(KeyboardInterrupt):
        fit(base.train, model, iterations=3, callback=lambda it, s, l: (_ for _ in ()).throw(KeyboardInterrupt))
    code, out, err = run(capsys, "recommend", model, "--users", "u001", "-n", "2")
    assert code == 0 and json.loads(out)["user"] == "u001"
    assert f"wals-ooc recommend: warning: {model} is trained 1 of 3 iterations (incomplete" in err
    with pytest.raises(StoreError, match="no such store"):  # -v (after the command too): the exception itself
        main(["info", str(tmp_path / "none.zarr"), "-v"])


# ---------------------------------------------------------------------------------------------
# Other writers through the door: generate (CSV), recommend --all, integrity of every array
# ---------------------------------------------------------------------------------------------


def test_generate_does_not_clobber_a_file_without_overwrite(tmp_path, capsys):
    target = tmp_path / "plays.csv"
    target.write_text("precious\n")
    code, _, err = run(capsys, "generate", target, "--users", "20", "--items", "10", "--rows", "50", "-q")
    assert "pass --overwrite" in one_line_error(code, err, "generate", target)
    assert target.read_text() == "precious\n"
    code, _, err = run(capsys, "generate", target, "--users", "20", "--items", "10", "--rows", "50", "--overwrite", "-q")
    assert "refusing to replace it, even with --overwrite" in one_line_error(code, err, "generate", target)
    assert target.read_text() == "precious\n"  # not a log generate wrote: never replaced (trust6)
    ours = tmp_path / "log.csv"
    for _ in range(2):  # a log generate wrote is replaced with --overwrite
        code, _, err = run(capsys, "generate", ours, "--users", "20", "--items", "10", "--rows", "50", "--overwrite", "-q")
        assert code == 0 and ours.read_text().startswith('"user","item","count"') and leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
def test_recommend_all_replaces_its_output_only_when_the_new_one_is_complete(base, tmp_path, fmt):
    out = tmp_path / f"top.{fmt}"
    loaded = wals_ooc.load(str(base.model))
    loaded.recommend_all(N=2, output=str(out), format=fmt)
    before = snapshot(out)
    with pytest.raises(PathError, match="already exists"):
        loaded.recommend_all(N=3, output=str(out), format=fmt)
    import wals_ooc.serve.recommend as recommend

    real = recommend._recommend_shard
    calls = [0]

    def fail_on_second(*args, **kwargs):  # the first shard is written, the second fails
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    recommend._recommend_shard = fail_on_second
    try:
        with pytest.raises(StorageError, match=f"{out} was not written: No space left on device"):
            loaded.recommend_all(N=3, output=str(out), format=fmt, overwrite=True)
    finally:
        recommend._recommend_shard = real
    assert snapshot(out) == before and leftovers(tmp_path) == []
    loaded.recommend_all(N=3, output=str(out), format=fmt, overwrite=True)
    assert snapshot(out) != before


def test_every_array_of_every_store_carries_a_checksum_and_the_door_enforces_it(base, tmp_path):
    from wals_ooc.store.format import has_checksum

    loaded = wals_ooc.load(str(base.model))
    loaded.recommend_all(N=2, output=str(tmp_path / "top.zarr"))
    for location in (base.data, base.train, base.model, tmp_path / "top.zarr"):
        arrays = [a for _, a in open_group(str(location)).members(max_depth=None) if hasattr(a, "dtype")]
        assert arrays and all(has_checksum(a) for a in arrays), location
    with pytest.raises(RuntimeError, match="created without a checksum"):
        with lifecycle.output_store(tmp_path / "x.zarr", INTERACTIONS_KIND, version=FORMAT_VERSION) as out:
            out.group.create_array("plain", shape=(4,), dtype="int32")
    assert not (tmp_path / "x.zarr").exists() and leftovers(tmp_path) == []
    with lifecycle.output_store(tmp_path / "x.zarr", INTERACTIONS_KIND, version=FORMAT_VERSION) as out:
        create_array(out.group, "checked", shape=(4,), dtype="int32")[:] = np.arange(4)
    assert open_group(str(tmp_path / "x.zarr")).attrs["complete"] is True


# ---------------------------------------------------------------------------------------------
# Object stores: the pointer scheme on a real S3 server (moto on loopback)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    import s3fs

    with moto_s3("safety") as options:
        yield SimpleNamespace(options=options, fs=s3fs.S3FileSystem(**options))


def test_object_store_overwrite_keeps_the_old_store_readable_until_the_new_one_is_complete(base, s3):
    import wals_ooc.store.writer as writer

    url, fs, opts = "s3://safety/data.zarr", s3.fs, s3.options
    wals_ooc.convert(str(base.csv), url, storage_options=opts, **CONVERT)
    old = open_store(url, opts)
    old_id, old_rows = old.attrs()["store_id"], old.rows("user", 0, 5).indices
    seen = []
    real = writer._assemble

    def look(*args, **kwargs):  # mid-way through writing the new store: readers see the old one
        during = open_store(url, opts)
        seen.append((during.attrs()["store_id"], during.rows("user", 0, 5).indices.tolist()))
        return real(*args, **kwargs)

    writer._assemble = look
    try:
        wals_ooc.convert(str(base.other), url, overwrite=True, storage_options=opts, **CONVERT)
        assert seen and all(s == (old_id, old_rows.tolist()) for s in seen)
        seen.clear()
        fail = [True]

        def look_then_fail(*args, **kwargs):
            if fail[0] and args[1] == "by_item":
                raise OSError(errno.EIO, "connection reset")
            return real(*args, **kwargs)

        writer._assemble = look_then_fail
        new_id = open_store(url, opts).attrs()["store_id"]
        fs.invalidate_cache()
        before = sorted(fs.find("safety/data.zarr"))
        open_group(f"{url}/gen-deadbeef-1-1-abcdef", "w", opts)  # a dead writer's unfinished generation
        with pytest.raises(StorageError, match=f"{url} was not written"):
            wals_ooc.convert(str(base.csv), url, overwrite=True, storage_options=opts, **CONVERT)
    finally:
        writer._assemble = real
    fs.invalidate_cache()
    # the failed generation and the dead writer's were removed; the current one is untouched
    assert sorted(fs.find("safety/data.zarr")) == before
    assert open_store(url, opts).attrs()["store_id"] == new_id != old_id
    assert len([p for p in fs.ls("safety/data.zarr") if "/gen-" in p]) == 1  # the old generation went at the switch
    # a lock held on another host is respected
    fs.pipe_file("safety/.data.zarr.wals-ooc-lock", json.dumps({"host": "elsewhere", "pid": 7, "started": 1,
                                                                 "since": "now", "command": "x"}).encode())
    with pytest.raises(StoreLockedError, match="process 7 on elsewhere.*delete s3://safety/.data.zarr.wals-ooc-lock"):
        wals_ooc.convert(str(base.csv), url, overwrite=True, storage_options=opts, **CONVERT)
    fs.rm("safety/.data.zarr.wals-ooc-lock")


def test_a_model_on_an_object_store_is_replaced_by_the_pointer_scheme(base):
    url = "memory://safety/model.zarr"  # the same code path as s3:// (fsspec), without a server
    fit(base.train, url, iterations=2)
    first = wals_ooc.load(url).recommend(["u001"], N=3)
    memory = fsspec.filesystem("memory")
    generation = json.loads(memory.cat_file("/safety/model.zarr/zarr.json"))["attributes"]["wals_ooc_generation"]
    fit(base.train, url, iterations=2, resume=False, seed=2)
    now = json.loads(memory.cat_file("/safety/model.zarr/zarr.json"))["attributes"]["wals_ooc_generation"]
    assert now != generation and [p.rsplit("/", 1)[-1] for p in memory.ls("/safety/model.zarr", detail=False)
                                  if "/gen-" in p] == [now]
    again = wals_ooc.load(url).recommend(["u001"], N=3)
    assert again[0].shape == first[0].shape and not np.array_equal(again[1], first[1])
    memory.rm("/safety", recursive=True)


# ---------------------------------------------------------------------------------------------
# Fault injection: writes fail with ENOSPC at a random point; the old store stays, a rerun equals
# an undisturbed run
# ---------------------------------------------------------------------------------------------


def _arrays(location) -> dict:
    """Every array (values) and the attributes that do not vary between equal runs."""
    group = open_group(str(location))
    out = {}
    for name, node in group.members(max_depth=None):
        if hasattr(node, "dtype"):
            out[name] = np.asarray(node[...]).tolist()
        else:
            out[name + "/.attrs"] = dict(node.attrs)
    varying = ("store_id", "split_id", "split_of", "split_of_store_id", "interactions", "seconds",
               "model_id")
    attrs = {k: v for k, v in group.attrs.items() if k not in varying}
    attrs["sources"] = {k: v for k, v in (attrs.get("sources") or {}).items() if k not in varying}
    attrs["loss_history"] = [{k: v for k, v in e.items() if "seconds" not in k} for e in attrs.get("loss_history", [])]
    out[".attrs"] = attrs
    return out


def test_writes_failing_at_random_points_never_hurt_the_old_store(base, tmp_path):
    root = tmp_path / "faulty"
    root.mkdir()
    data, train, test, model = (root / n for n in ("data.zarr", "train.zarr", "test.zarr", "model.zarr"))
    url = lambda p: f"faulty://{p}"  # noqa: E731

    def convert(seed_csv):
        wals_ooc.convert(str(seed_csv), url(data), overwrite=True, **CONVERT)

    def split(seed):
        wals_ooc.split(str(base.data), url(train), url(test), seed=seed, overwrite=True)

    def train_model(seed):
        WALS(factors=4, iterations=2, random_state=seed, threads=1).fit(str(base.train), url(model), resume=False,
                                                                        progress=False)

    jobs = {  # (make the previous store, the job that is disturbed, the stores it writes)
        "convert": (lambda: convert(base.csv), lambda: convert(base.other), [data]),
        "split": (lambda: split(1), lambda: split(2), [train, test]),
        "train": (lambda: train_model(1), lambda: train_model(2), [model]),
    }
    undisturbed, total_writes = {}, {}
    for name, (make_old, job, outputs) in jobs.items():
        make_old()
        FaultyFileSystem.arm(None)
        job()  # over an existing store, as in the disturbed runs
        total_writes[name] = FaultyFileSystem.writes
        undisturbed[name] = [_arrays(o) for o in outputs]
    rng = random.Random(9)
    failures = 0
    for run_number in range(20):  # the store left by the previous rerun is the old store of the next run
        name = rng.choice(sorted(jobs))
        _, job, outputs = jobs[name]
        before = [snapshot(o) for o in outputs]
        FaultyFileSystem.arm(rng.randrange(total_writes[name]))
        try:
            job()
        except StorageError as exc:
            failures += 1
            assert "No space left on device" in str(exc)
            assert [snapshot(o) for o in outputs] == before, (name, run_number)
            assert leftovers(root) == [], (name, run_number)
        FaultyFileSystem.arm(None)
        job()  # the rerun completes to the undisturbed result
        assert [_arrays(o) for o in outputs] == undisturbed[name], (name, run_number)
    assert failures >= 15  # nearly every drawn point lands inside the run
