"""What a demanding user runs into, each a failure found by trying the tool (round 24, trust5):
a full disk and damaged bytes under an index, settings out of their domain in the API, a test
store of other data, a failed first run of training. Each must end in one clear error of its
kind (never a traceback, never a silent wrong answer) and leave no store of its own behind."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import wals_ooc
from wals_ooc import WALS
from wals_ooc.cli import main as cli_main
from wals_ooc.errors import CorruptStoreError, DataMismatchError, SettingError, StorageError, WalsError

from .conftest import run_python


@pytest.fixture(scope="module")
def model(small_store, tmp_path_factory):
    location = str(tmp_path_factory.mktemp("faults") / "model.zarr")
    return WALS(factors=8, iterations=2, random_state=3, threads=2).fit(small_store, location, progress=False)


def _flip(path: str, offset: int) -> None:
    data = bytearray(open(path, "rb").read())
    data[offset % len(data)] ^= 0x10
    with open(path, "wb") as handle:
        handle.write(data)


# --- the index: a full disk, damaged bytes --------------------------------------------------


def test_an_index_that_does_not_fit_on_the_disk_is_a_one_line_storage_error(model, tmp_path):
    """faiss's own writer turned a full disk into an internal RuntimeError; the file limit of a
    child process (EFBIG, as a full disk gives ENOSPC) must end as StorageError, nothing left."""
    pytest.importorskip("faiss")
    target = tmp_path / "small.ann"
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
from wals_ooc.cli import main
sys.exit(main(["index", {model.factors_store.location!r}, "--output", {str(target)!r}, "-q"]))
"""
    done = run_python(code)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wals-ooc index: error:"), done.stderr
    assert f"{target} was not written: File too large; nothing was changed" in lines[0]
    assert sorted(os.listdir(tmp_path)) == []  # no build, no lock, no index


def test_a_damaged_index_file_is_refused_naming_it_and_a_sound_one_answers(model, tmp_path):
    """index.faiss had no checksum: a flipped byte crashed faiss's reader (an internal error) or,
    in a stored row, changed answers silently. Its crc32 is recorded and checked on opening."""
    pytest.importorskip("faiss")
    from wals_ooc.index import forget_indexes

    location = str(tmp_path / "cos.ann")
    model.build_index(location=location, metric="cosine")
    item = model.interactions.ids("item")[:1]
    sound = model.similar_items(item, N=5, index=location)
    data = os.path.join(location, "index.faiss")
    original = open(data, "rb").read()
    for offset in (20, len(original) // 2, len(original) - 40):  # header, graph, stored rows
        forget_indexes()
        _flip(data, offset)
        with pytest.raises(CorruptStoreError, match=f"{location}: index.faiss is corrupt"):
            model.similar_items(item, N=5, index=location)
        with open(data, "wb") as handle:
            handle.write(original)
    forget_indexes()
    with open(data, "wb") as handle:
        handle.write(original[: len(original) // 3])  # truncated
    with pytest.raises(CorruptStoreError, match="index.faiss is corrupt"):
        model.similar_items(item, N=5, index=location)
    with open(data, "wb") as handle:
        handle.write(original)
    forget_indexes()
    again = model.similar_items(item, N=5, index=location)
    np.testing.assert_array_equal(sound[0], again[0])
    np.testing.assert_array_equal(sound[1], again[1])


def test_an_index_saved_without_a_checksum_still_opens_and_a_damaged_one_is_still_an_error(model, tmp_path):
    """Indexes written before the checksum have none in index.json: they open as before, and
    faiss's own complaint about damaged bytes becomes CorruptStoreError, not an internal error."""
    pytest.importorskip("faiss")
    from wals_ooc.index import forget_indexes

    location = str(tmp_path / "old.ann")
    model.build_index(location=location)
    meta_path = os.path.join(location, "index.json")
    meta = json.load(open(meta_path))
    meta.pop("checksum")
    json.dump(meta, open(meta_path, "w"))
    user = model.interactions.ids("user")[:1]
    forget_indexes()
    assert model.recommend(user, N=3, index=location)[0].shape == (1, 3)
    data = os.path.join(location, "index.faiss")
    original = open(data, "rb").read()
    with open(data, "wb") as handle:
        handle.write(original[: len(original) // 3])
    forget_indexes()
    with pytest.raises(CorruptStoreError, match="index.faiss is corrupt"):
        model.recommend(user, N=3, index=location)


# --- a test store of other data ---------------------------------------------------------------


def test_evaluating_on_a_store_of_other_data_is_refused_not_answered_with_nan(model, tmp_path, capsys):
    """A test store none of whose users the model knows gave NaN metrics and exit 0."""
    csv = tmp_path / "other.csv"
    items = model.interactions.ids("item")[:5]
    csv.write_text("user,item\n" + "".join(f"visitor-{u},{items[u % 5]}\n" for u in range(30)))
    other = str(tmp_path / "other.zarr")
    wals_ooc.convert([str(csv)], other, user_col="user", item_col="item", value_col=None, progress=False)
    with pytest.raises(DataMismatchError, match=f"{other}: none of its 30 test users is a user of"):
        model.evaluate(other, k=5)
    assert cli_main(["evaluate", model.factors_store.location, other, "-k", "5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "wals-ooc evaluate: error:" in err and other in err
    # a held-out part of the training data still evaluates (the check counts users, not the sample)
    test = str(tmp_path / "test.zarr")
    wals_ooc.split(model.interactions.location, str(tmp_path / "train.zarr"), test, test_fraction=0.2, seed=1)
    trained = WALS(factors=4, iterations=1, random_state=1).fit(str(tmp_path / "train.zarr"), str(tmp_path / "m.zarr"),
                                                              progress=False)
    result = trained.evaluate(test, k=5, user_fraction=0.01, auc=False)
    assert result["skipped_users"] == 0 and 0 <= result["users"] <= 10


# --- settings out of their domain in the API ----------------------------------------------------


def test_bad_vectors_and_fold_in_values_are_setting_errors_not_empty_answers(model):
    """NaN user vectors answered an empty list in silence; a wrong width and NaN fold-in values
    raised bare ValueErrors."""
    factors = model.config.factors
    with pytest.raises(SettingError, match="user_vectors must be finite: row 1"):
        model.recommend(None, N=3, user_vectors=np.vstack([np.ones(factors), np.full(factors, np.nan)]))
    with pytest.raises(SettingError, match="user_vectors must be finite"):
        model.recommend(None, N=3, user_vectors=np.full(factors, np.inf, np.float32))
    with pytest.raises(SettingError, match=f"user_vectors must have {factors} columns"):
        model.recommend(None, N=3, user_vectors=np.ones((1, factors - 1), np.float32))
    with pytest.raises(SettingError, match="user_vectors has 1 rows but 2 user_ids"):
        model.recommend(list(model.interactions.ids("user")[:2]), N=3, user_vectors=np.ones((1, factors)))
    item = model.interactions.ids("item")[0]
    for value in (float("nan"), float("inf"), -1.0):
        with pytest.raises(SettingError, match="fold-in values must be finite and >= 0"):
            model.recalculate_user({item: value})
    vector = model.recalculate_user({item: 2.0})
    ids, scores = model.recommend(None, N=3, user_vectors=vector)
    assert ids.shape == (1, 3) and np.isfinite(scores).all()


@pytest.mark.parametrize("budget", ["nanGB", "lots", float("nan"), float("inf"), "-1GB", -5, True, "1e400", "1e400GB", 0.5])
def test_a_memory_budget_that_is_no_size_is_refused_when_the_model_is_made(budget):
    with pytest.raises(SettingError, match="memory budget must be a"):
        WALS(memory_budget=budget)


@pytest.mark.parametrize("settings", [{"threads": -2}, {"threads": 1.5}, {"random_state": -1}])
def test_bad_threads_or_seed_fail_before_a_model_is_written(small_store, tmp_path, settings):
    """threads=-2 and random_state=-1 failed inside the run, after the new model's skeleton was
    published: a store 'trained 0 of N iterations' was left behind."""
    with pytest.raises(SettingError, match="threads must be|random_state must be"):
        WALS(factors=4, iterations=1, **settings).fit(small_store, str(tmp_path / "m.zarr"), progress=False)
    assert os.listdir(tmp_path) == []
    value = next(iter(settings.values()))
    if isinstance(value, int):  # argparse itself refuses --threads 1.5
        name = "--threads" if "threads" in settings else "--seed"
        assert cli_main(["train", small_store, "--model", str(tmp_path / "m.zarr"), name, str(value)]) == 2
        assert os.listdir(tmp_path) == []


def test_a_split_with_nothing_to_hold_out_says_so(small_store, tmp_path):
    """test_fraction=0 passed the check ([0, 1)) and failed as 'TEST: empty input: no valid rows
    to convert'."""
    with pytest.raises(SettingError, match=r"test_fraction must be in \(0, 1\), got 0"):
        wals_ooc.split(small_store, str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), test_fraction=0.0)
    with pytest.raises(SettingError, match="would leave .*b.zarr empty"):  # too small a fraction to hold out any
        wals_ooc.split(small_store, str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), test_fraction=1e-6)
    assert os.listdir(tmp_path) == []


# --- a first training run that fails leaves no model ---------------------------------------------


def test_a_new_model_whose_first_run_fails_is_removed_and_one_with_a_half_sweep_kept(small_store, tmp_path):
    """Training on damaged data failed in the first half-sweep but left the new model's skeleton
    ('trained 0 of N', refused by every server). The door publishes it provisionally: a failure
    before the first committed half-sweep removes it (an empty directory given as the target is
    left empty); a run killed outright still leaves it to resume, and one that failed later keeps
    its checkpoint."""
    import shutil

    damaged = str(tmp_path / "damaged.zarr")
    shutil.copytree(small_store, damaged)
    chunk = os.path.join(damaged, "by_user", "indices", "c", "0")
    _flip(chunk, 30)
    new = tmp_path / "new.zarr"
    with pytest.raises(CorruptStoreError, match="by_user/indices"):
        WALS(factors=4, iterations=2, random_state=0).fit(damaged, str(new), progress=False)
    assert not new.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptStoreError):
        WALS(factors=4, iterations=2, random_state=0).fit(damaged, str(tmp_path / "empty"), progress=False)
    assert os.listdir(tmp_path / "empty") == []
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []  # no lock, no build left
    # a failure after a committed half-sweep keeps the model, resumable
    calls = []

    def stop(iteration, seconds, loss):
        calls.append(iteration)
        raise RuntimeError("stopped by the callback")

    kept = str(tmp_path / "kept.zarr")
    with pytest.raises(RuntimeError, match="stopped"):
        WALS(factors=4, iterations=3, random_state=0).fit(small_store, kept, progress=False, callback=stop)
    assert wals_ooc.load(kept).factors_store.iterations_done == 1
    WALS(factors=4, iterations=3, random_state=0).fit(small_store, kept, progress=False)
    assert wals_ooc.load(kept).factors_store.iterations_done == 3


# --- input that reads as something else ----------------------------------------------------------


def test_ids_with_spaces_around_them_are_kept_but_said_once_with_file_line_and_field(tmp_path, capsys):
    """'1, 2, 3' made the item column text ' 2' in silence (the README keeps ids as written)."""
    csv = tmp_path / "spaced.csv"
    csv.write_text("user,item,value\n1,2,1\n3, 4,2\n5, 6 ,1\n7,8,1\n")
    with pytest.warns(wals_ooc.errors.WalsWarning, match=r"2 ids have spaces around them \(2 in field 'item'; first: "
                      rf"{csv}:3: field 'item': ' 4'\)"):
        wals_ooc.convert([str(csv)], str(tmp_path / "a.zarr"), user_col="user", item_col="item", value_col="value",
                         progress=False)
    store = wals_ooc.store.reader.InteractionStore(str(tmp_path / "a.zarr"))
    assert sorted(store.ids("item")) == [" 4", " 6 ", "2", "8"]  # kept as written
    clean = tmp_path / "clean.csv"
    clean.write_text("user,item\nu 1,a b\nu2,c\n")  # spaces inside ids are part of them
    assert cli_main(["convert", str(clean), str(tmp_path / "b.zarr"), "--no-value", "-q"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert cli_main(["convert", str(csv), str(tmp_path / "c.zarr"), "--user-col", "user", "--item-col", "item",
                     "--value-col", "value", "-q"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wals-ooc convert: warning: 2 ids have spaces")


def test_lines_ended_by_a_carriage_return_alone_are_named_not_read_as_an_empty_file(tmp_path):
    """A CR-only file (classic Mac line endings) was 'empty input: a header but no rows'."""
    for name, opener in (("mac.csv", open), ("mac.csv.gz", __import__("gzip").open)):
        path = tmp_path / name
        with opener(path, "wb") as handle:
            handle.write(b"user,item\ru1,i1\ru2,i2\r")
        with pytest.raises(wals_ooc.errors.InputError, match=f"{path}:1: its lines end in a carriage return alone"):
            wals_ooc.convert([str(path)], str(tmp_path / "m.zarr"), user_col="user", item_col="item", value_col=None,
                             progress=False)
    mixed = tmp_path / "mixed.csv"  # CRLF, LF and a CR inside a quoted field: read as written
    mixed.write_bytes(b"user,item\r\nu1,i1\nu2,\"a\rb\"\r\n")
    wals_ooc.convert([str(mixed)], str(tmp_path / "x.zarr"), user_col="user", item_col="item", value_col=None,
                     progress=False)
    assert sorted(wals_ooc.store.reader.InteractionStore(str(tmp_path / "x.zarr")).ids("item")) == ["a\rb", "i1"]
    assert not (tmp_path / "m.zarr").exists()


# --- a search whose trial fails ---------------------------------------------------------------------


def test_a_search_on_damaged_data_fails_in_one_line_without_optunas_warning(small_store, tmp_path):
    """A trial that failed (a damaged chunk here, a full disk on the try) printed optuna's own
    '[W ...] Trial 0 failed with value None.' before wals-ooc's one-line error."""
    import shutil

    damaged = str(tmp_path / "damaged.zarr")
    shutil.copytree(small_store, damaged)
    _flip(os.path.join(damaged, "by_item", "indices", "c", "0"), 50)
    code = f"""
import sys
from wals_ooc.cli import main
sys.exit(main(["tune", {damaged!r}, "--validation", {small_store!r}, "--trials", "2", "--factors", "4",
               "--iterations", "1", "--model", {str(tmp_path / "t.zarr")!r}, "--threads", "2", "-q"]))
"""
    done = run_python(code)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("wals-ooc tune: error: "), done.stderr
    assert "by_item/indices is corrupt" in done.stderr


# --- round 25 (trust6): object stores without credentials -----------------------------------


def test_s3_without_credentials_or_bucket_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    """Missing AWS credentials were an 'internal error: NoCredentialsError' (exit 1) from every
    command that touched s3:// (reading: info, train...; writing: convert...); they are a
    PathError naming the path and what to set. A bucket that does not exist is one line too."""
    import s3fs

    from wals_ooc.errors import PathError

    from .conftest import moto_s3

    csv = tmp_path / "plays.csv"
    csv.write_text("user,item,plays\na,x,1\nb,y,2\n")
    with moto_s3("trust6") as options:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
            monkeypatch.setenv(name, str(tmp_path / "absent"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("AWS_ENDPOINT_URL", options["client_kwargs"]["endpoint_url"])
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3fs.S3FileSystem.clear_instance_cache()
        for argv in (["info", "s3://trust6/plays.zarr"], ["convert", str(csv), "s3://trust6/plays.zarr", "-q"]):
            assert cli_main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "error: s3://trust6/plays.zarr: no credentials to reach it" in err, err
            assert "AWS_ACCESS_KEY_ID" in err and "internal error" not in err
        with pytest.raises(PathError, match="no credentials"):
            wals_ooc.open_store("s3://trust6/plays.zarr", storage_options={"client_kwargs": options["client_kwargs"]})
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        s3fs.S3FileSystem.clear_instance_cache()
        assert cli_main(["info", "s3://no-such-bucket/plays.zarr"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "s3://no-such-bucket/plays.zarr: no such store" in err, err
        s3fs.S3FileSystem.clear_instance_cache()


def test_overwrite_replaces_only_files_wals_ooc_wrote(model, tmp_path, capsys):
    """`export --format npz --overwrite` onto the user's own .npz, or `generate --overwrite` onto
    their CSV, replaced it: --overwrite replaces only a file of the kind the command writes."""
    mine = tmp_path / "mine.npz"
    np.savez(mine, ratings=np.arange(5))
    data = tmp_path / "plays.csv"
    data.write_text("user,item,count\n1,2,3\n")
    before = {path: path.read_bytes() for path in (mine, data)}
    for argv in (["export", model.factors_store.location, str(mine), "--format", "npz", "--overwrite"],
                 ["export", model.factors_store.location, str(mine), "--format", "implicit", "--overwrite"],
                 ["generate", str(data), "--users", "20", "--items", "10", "--rows", "50", "--overwrite", "-q"]):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "refusing to replace it, even with --overwrite" in err and err.count("\n") == 1, err
    assert {path: path.read_bytes() for path in (mine, data)} == before
    assert sorted(os.listdir(tmp_path)) == ["mine.npz", "plays.csv"]  # nothing of ours left beside them
    ours = tmp_path / "ours.npz"  # what the command wrote itself is replaced as before
    for fmt in ("npz", "implicit"):
        assert cli_main(["export", model.factors_store.location, str(ours), "--format", fmt, "--overwrite"]) == 0
    with np.load(ours) as loaded:
        assert loaded["item_factors"].shape == model.to_numpy()[1].shape
    generated = tmp_path / "log.csv.gz"
    for _ in range(2):
        assert cli_main(["generate", str(generated), "--users", "20", "--items", "10", "--rows", "50", "--overwrite",
                         "-q"]) == 0
