"""The command line, end to end on the bundled example and on bad input, in real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import wals_ooc

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "plays.csv")


def cli(*args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "wals_ooc.cli", *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_whole_job_from_the_command_line(tmp_path):
    store, train, test, model = (tmp_path / n for n in ("plays.zarr", "train.zarr", "test.zarr", "model.zarr"))
    before = os.stat(EXAMPLE).st_mtime_ns, open(EXAMPLE, "rb").read()
    done = cli("convert", EXAMPLE, store, "--user-col", "user", "--item-col", "artist", "--value-col", "plays", "-q")
    assert (os.stat(EXAMPLE).st_mtime_ns, open(EXAMPLE, "rb").read()) == before  # input untouched
    info = cli("info", store).stdout
    assert "nnz         4546" in info and "listener_0052 (90)" in info

    cli("split", store, train, test, "--seed", "1", "-q")
    done = cli("train", train, "--model", model, "--factors", "8", "--iterations", "4", "--seed", "0", "-q")
    summary = json_lines(done.stdout)[-1]
    assert summary["iterations"] == 4 and summary["final_loss"] > 0
    # running it again resumes a finished model: nothing to do, same loss
    again = json_lines(cli("train", train, "--model", model, "--factors", "8", "--iterations", "4", "--seed", "0", "-q").stdout)[-1]
    assert again["final_loss"] == summary["final_loss"]

    metrics = json_lines(cli("evaluate", model, test, "-k", "5").stdout)[-1]
    assert metrics["users"] > 100 and 0 <= metrics["precision@5"] <= 1 and metrics["auc"] > 0.5

    recs = json_lines(cli("recommend", model, "--users", "listener_0000", "listener_0001", "-n", "3").stdout)
    assert [r["user"] for r in recs] == ["listener_0000", "listener_0001"]
    assert all(len(r["items"]) == 3 and r["items"][0]["item"].startswith("artist_") for r in recs)

    similar = json_lines(cli("similar", model, "--items", "artist_000", "-n", "4", "--filter-self").stdout)
    assert len(similar[0]["similar"]) == 4 and all(s["item"] != "artist_000" for s in similar[0]["similar"])

    out = tmp_path / "top.parquet"
    cli("recommend", model, "--all", "--output", out, "--format", "parquet", "-n", "5")
    table = pq.read_table(out)
    assert table.num_rows >= 5 * 500 and set(table.column_names) >= {"user", "item", "score"}


def test_bad_input_names_file_line_and_field_and_skip_counts(tmp_path):
    columns = ("--user-col", "user", "--item-col", "item", "--value-col", "value")
    not_a_number = tmp_path / "nan.csv"
    not_a_number.write_text("user,item,value\nu1,i1,3\nu2,i2,oops\n")
    done = cli("convert", not_a_number, tmp_path / "n.zarr", *columns, check=False)
    assert done.returncode != 0
    assert f"{not_a_number}:3" in done.stderr and "value" in done.stderr and "Traceback" not in done.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,value\nu1,i1,3\nu2,i2,oops\nu3,i3\nu4,i4,2\n")
    done = cli("convert", bad, tmp_path / "s.zarr", *columns, check=False)
    assert done.returncode != 0 and f"{bad}:4" in done.stderr and "Traceback" not in done.stderr
    done = cli("convert", bad, tmp_path / "skipped.zarr", *columns, "--on-bad-lines", "skip")
    assert "skipped 2 bad rows (1 malformed row, 1 non-numeric value)" in done.stdout + done.stderr
    with pytest.raises(Exception, match="no such store"):  # the failed run left nothing behind
        wals_ooc.open_store(tmp_path / "s.zarr")
    info = cli("info", tmp_path / "skipped.zarr").stdout
    assert "nnz         2" in info

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    done = cli("convert", empty, tmp_path / "e.zarr", check=False)
    assert done.returncode != 0 and "empty" in done.stderr and str(empty) in done.stderr
    with pytest.raises(Exception):
        wals_ooc.open_store(tmp_path / "e.zarr")

    done = cli("convert", bad, tmp_path / "u.zarr", "--user-col", "nope", check=False)
    assert done.returncode != 0 and "nope" in done.stderr


def test_generate_then_train_with_a_local_cluster_of_processes(tmp_path):
    store = tmp_path / "gen.zarr"
    cli("generate", store, "--users", "300", "--items", "120", "--rows", "4000", "--seed", "2", "-q")
    done = cli("train", store, "--factors", "4", "--iterations", "2", "--seed", "1", "--workers", "2", "-q")
    summary = json_lines(done.stdout)[-1]
    assert summary["iterations"] == 2
    assert os.path.isdir(tmp_path / "gen-model.zarr")


def test_train_with_the_ialspp_solver_and_a_bad_block_size(small_store, tmp_path):
    model = tmp_path / "model.zarr"
    done = cli("train", small_store, "--model", model, "--factors", "8", "--iterations", "3", "--seed", "0",
               "--solver", "ialspp", "--block-size", "3", "--block-sweeps", "2", "-q")
    summary = json_lines(done.stdout)[-1]
    assert summary["iterations"] == 3 and summary["final_loss"] > 0
    from wals_ooc.train import FactorStore

    config = FactorStore.open(str(model)).config
    assert (config.solver, config.block_size, config.block_sweeps) == ("ialspp", 3, 2)
    bad = cli("train", small_store, "--model", tmp_path / "bad.zarr", "--solver", "ialspp", "--block-size", "0", check=False)
    assert bad.returncode != 0 and "--block-size must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.zarr").exists()
