"""Interaction store: round trips against scipy.sparse, the bad-input catalogue, interruption."""

from __future__ import annotations

import gzip
import json
import hashlib
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wals_ooc
from wals_ooc.store import InputError, StoreError, open_store, write_store
from wals_ooc.store.sources import RowBatch

from .conftest import store_to_scipy


def _write_csv(path, rows, header="user,item,value"):
    with open(path, "w") as handle:
        if header:
            handle.write(header + "\n")
        for u, i, v in rows:
            handle.write(f"{u},{i},{v}\n")


def _expected(rows):
    """scipy CSR built in memory from the rows: duplicates summed, zeros dropped, ids sorted."""
    users = sorted({u for u, i, v in rows if v != 0} | set())
    items = sorted({i for u, i, v in rows if v != 0})
    # ids that only ever have zero values vanish; ids with a nonzero sum stay
    frame = pd.DataFrame(rows, columns=["u", "i", "v"])
    frame = frame[frame.v != 0]
    users = np.array(sorted(frame.u.unique()))
    items = np.array(sorted(frame.i.unique()))
    r = np.searchsorted(users, frame.u.to_numpy())
    c = np.searchsorted(items, frame.i.to_numpy())
    matrix = sp.coo_matrix((frame.v.to_numpy(np.float64), (r, c)), shape=(len(users), len(items))).tocsr()
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    return users, items, matrix


def _entries_by_id(store) -> dict:
    """{(user id, item id): value} of a small store."""
    got = store_to_scipy(store).tocoo()
    users, items = store.ids("user"), store.ids("item")
    return {(users[r].item() if hasattr(users[r], "item") else users[r], items[c].item() if hasattr(items[c], "item") else items[c]):
            float(v) for r, c, v in zip(got.row, got.col, got.data)}


def _assert_store_equals(store, users, items, matrix):
    assert store.shape == matrix.shape
    assert store.nnz == matrix.nnz
    np.testing.assert_array_equal(store.ids("user"), users)
    np.testing.assert_array_equal(store.ids("item"), items)
    for side, expected in (("user", matrix), ("item", matrix.T.tocsr())):
        got = store_to_scipy(store, side)
        expected = expected.copy()
        expected.sort_indices()
        np.testing.assert_array_equal(got.indptr, expected.indptr)
        np.testing.assert_array_equal(got.indices, expected.indices)
        np.testing.assert_allclose(got.data, expected.data, rtol=1e-6)
        bounds = store.shard_bounds(side)
        assert bounds[0] == 0 and bounds[-1] == store.n_rows(side)
        assert all(b % store.row_block == 0 for b in bounds[:-1])
        assert sum(store.shard_nnz(side)) == store.nnz


rows_strategy = st.lists(
    st.tuples(st.integers(0, 40), st.integers(0, 25), st.sampled_from([0, 1, 2, 3, 0.5, 7.25])),
    min_size=1, max_size=300,
).filter(lambda rows: any(v != 0 for _, _, v in rows))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows_strategy, row_block=st.sampled_from([1, 3, 8]), shard_nnz=st.sampled_from([5, 40, 10_000]))
def test_round_trip_equals_scipy_both_orientations(tmp_path_factory, rows, row_block, shard_nnz):
    tmp = tmp_path_factory.mktemp("rt")
    _write_csv(tmp / "in.csv", rows)
    wals_ooc.convert(str(tmp / "in.csv"), str(tmp / "s.zarr"), row_block=row_block, shard_nnz=shard_nnz, progress=False)
    _assert_store_equals(open_store(str(tmp / "s.zarr")), *_expected(rows))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.sampled_from(["ann", "bob", "zoë", "李", "a b"]), st.sampled_from(["x", "y", "ω", "q-1"]),
                               st.integers(0, 4)), min_size=1, max_size=60).filter(lambda r: any(v for _, _, v in r)))
def test_round_trip_string_ids(tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("rts")
    _write_csv(tmp / "in.csv", rows)
    wals_ooc.convert(str(tmp / "in.csv"), str(tmp / "s.zarr"), row_block=2, shard_nnz=3, progress=False)
    store = open_store(str(tmp / "s.zarr"))
    users, items, matrix = _expected(rows)
    # the store orders string ids by the XXH64 hash of their UTF-8 bytes (then by the bytes)
    by_hash = sorted(users.tolist(), key=lambda s: (xxhash.xxh64_intdigest(s.encode()), s.encode()))
    assert store.ids("user").tolist() == by_hash
    assert store.id_kind == "str"
    frame = pd.DataFrame(rows, columns=["u", "i", "v"]).groupby(["u", "i"]).v.sum()
    frame = frame[frame != 0]
    got = store_to_scipy(store).tocoo()
    pairs = {(str(store.ids("user")[r]), str(store.ids("item")[c])): v for r, c, v in zip(got.row, got.col, got.data)}
    assert pairs == {k: float(v) for k, v in frame.items()}
    np.testing.assert_array_equal(store.index_of("user", [str(store.ids("user")[0])]), [0])


def test_many_files_gzip_and_parquet_equal_one_csv(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(int(u), int(i), int(v)) for u, i, v in zip(rng.integers(0, 50, 900), rng.integers(0, 30, 900), rng.integers(0, 4, 900))]
    _write_csv(tmp_path / "all.csv", rows)
    _write_csv(tmp_path / "a.csv", rows[:300])
    with gzip.open(tmp_path / "b.csv.gz", "wt") as handle:
        handle.write("user,item,value\n" + "".join(f"{u},{i},{v}\n" for u, i, v in rows[300:600]))
    pq.write_table(pa.table({"user": [r[0] for r in rows[600:]], "item": [r[1] for r in rows[600:]],
                             "value": [float(r[2]) for r in rows[600:]]}), tmp_path / "c.parquet")
    wals_ooc.convert(str(tmp_path / "all.csv"), str(tmp_path / "one.zarr"), row_block=4, progress=False)
    wals_ooc.convert([str(tmp_path / n) for n in ("a.csv", "b.csv.gz", "c.parquet")], str(tmp_path / "three.zarr"),
                     row_block=4, progress=False)
    one, three = open_store(str(tmp_path / "one.zarr")), open_store(str(tmp_path / "three.zarr"))
    for side in ("user", "item"):
        a, b = store_to_scipy(one, side), store_to_scipy(three, side)
        assert (a != b).nnz == 0
    _assert_store_equals(one, *_expected(rows))


def test_no_value_column_counts_ones_and_named_columns(tmp_path):
    (tmp_path / "in.tsv").write_text("ts\tartist\tlistener\n1\ta\tx\n2\ta\tx\n3\tb\ty\n")
    wals_ooc.convert(str(tmp_path / "in.tsv"), str(tmp_path / "s.zarr"), user_col="listener", item_col="artist",
                     value_col=None, delimiter="\t", progress=False)
    store = open_store(str(tmp_path / "s.zarr"))
    assert _entries_by_id(store) == {("x", "a"): 2.0, ("y", "b"): 1.0}


def test_no_header_positions(tmp_path):
    (tmp_path / "in.csv").write_text("5,7,2\n5,8,1\n")
    wals_ooc.convert(str(tmp_path / "in.csv"), str(tmp_path / "s.zarr"), header=False, progress=False)
    assert open_store(str(tmp_path / "s.zarr")).ids("item").tolist() == [7, 8]


BAD_INPUTS = [
    ("user,item,value\n1,2,3\n4,5\n", "in.csv:3", None, "malformed row: expected 3 fields, got 2"),
    ("user,item,value\n1,2,3\n4,5,6,7\n", "in.csv:3", None, "malformed row: expected 3 fields, got 4"),
    ("user,item,value\n1,2,3\n4,5,abc\n", "in.csv:3", "value", "non-numeric value: 'abc'"),
    ("user,item,value\n1,2,3\n\n4,5,NaN\n", "in.csv:4", "value", "value is NaN"),
    ("user,item,value\n1,2,inf\n", "in.csv:2", "value", "value is infinite"),
    ("user,item,value\n1,2,3\n1,2,-1\n", "in.csv:3", "value", "value is negative"),
    ("user,item,value\n1,2,3\n4,5,\n", "in.csv:3", "value", "non-numeric value: ''"),
    ("user,item,value\n1,2,3\n1.5,2,3\n", "in.csv:3", "user", "non-integer id: '1.5'"),
]


@pytest.mark.parametrize("text,where,field,reason", BAD_INPUTS)
def test_bad_input_is_located(tmp_path, text, where, field, reason):
    path = tmp_path / "in.csv"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        wals_ooc.convert(str(path), str(tmp_path / "s.zarr"), id_type="int", progress=False)
    message = str(info.value)
    assert where in message and reason in message, message
    if field:
        assert f"field {field!r}" in message
    assert info.value.line == int(where.split(":")[1])


def test_skip_bad_lines_counts_and_keeps_the_good_ones(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("user,item,value\n1,2,3\n4,5\n4,5,abc\n6,7,-2\n\n8,9,nan\n10,11,1\n12,13,0\n")
    report = wals_ooc.convert(str(path), str(tmp_path / "s.zarr"), on_bad_lines="skip", progress=False)
    assert report.bad_rows.skipped == 4
    assert report.bad_rows.zeros_dropped == 1
    assert report.bad_rows.blank_lines == 1
    assert any("in.csv:3" in e for e in report.bad_rows.examples)
    assert any("in.csv:7" in e and "NaN" in e for e in report.bad_rows.examples)
    store = open_store(str(tmp_path / "s.zarr"))
    assert store.ids("user").tolist() == [1, 10]
    assert store.nnz == 2


def test_unknown_column_and_empty_inputs(tmp_path):
    (tmp_path / "h.csv").write_text("user,item,value\n1,2,3\n")
    with pytest.raises(InputError, match=r"h.csv:1: field 'plays': unknown value column"):
        wals_ooc.convert(str(tmp_path / "h.csv"), str(tmp_path / "a.zarr"), value_col="plays", progress=False)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="empty.csv: empty input"):
        wals_ooc.convert(str(tmp_path / "empty.csv"), str(tmp_path / "b.zarr"), progress=False)
    (tmp_path / "header_only.csv").write_text("user,item,value\n")
    with pytest.raises(InputError, match="header_only.csv: empty input"):
        wals_ooc.convert(str(tmp_path / "header_only.csv"), str(tmp_path / "c.zarr"), progress=False)
    with pytest.raises(InputError, match="no such file"):
        wals_ooc.convert(str(tmp_path / "missing.csv"), str(tmp_path / "d.zarr"), progress=False)
    (tmp_path / "zeros.csv").write_text("user,item,value\n1,2,0\n")
    with pytest.raises(InputError, match="no valid rows"):
        wals_ooc.convert(str(tmp_path / "zeros.csv"), str(tmp_path / "e.zarr"), progress=False)


def test_inputs_are_never_modified_and_never_overwritten(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("user,item,value\n1,2,3\n4,5,6\n")
    before = hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns
    wals_ooc.convert(str(path), str(tmp_path / "s.zarr"), progress=False)
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns) == before
    with pytest.raises(ValueError, match="would overwrite the input"):
        wals_ooc.convert(str(path), str(path), overwrite=True, progress=False)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before[0]


def test_interrupted_conversion_leaves_nothing_behind(tmp_path):
    def batches():
        yield RowBatch(np.array([1, 2], np.int64), np.array([3, 4], np.int64), np.array([1, 1], np.float32))
        raise KeyboardInterrupt("simulated interruption")

    target = str(tmp_path / "s.zarr")
    with pytest.raises(KeyboardInterrupt):
        write_store(batches(), target, progress=False)
    assert os.listdir(tmp_path) == [], "an interrupted conversion left something behind"
    with pytest.raises(StoreError, match="no such store"):
        open_store(target)
    write_store(iter([RowBatch(np.array([1], np.int64), np.array([3], np.int64), np.array([1], np.float32))]), target,
                progress=False)  # the rerun is not refused
    assert open_store(target).nnz == 1


def test_existing_store_needs_overwrite(tmp_path):
    (tmp_path / "in.csv").write_text("user,item,value\n1,2,3\n")
    wals_ooc.convert(str(tmp_path / "in.csv"), str(tmp_path / "s.zarr"), progress=False)
    with pytest.raises(ValueError, match="already exists"):
        wals_ooc.convert(str(tmp_path / "in.csv"), str(tmp_path / "s.zarr"), progress=False)
    wals_ooc.convert(str(tmp_path / "in.csv"), str(tmp_path / "s.zarr"), overwrite=True, progress=False)


def test_conversion_peak_rss_stays_under_budget_for_input_several_times_the_allowance(tmp_path):
    from wals_ooc.synthetic import SyntheticSpec, write_csv

    from .conftest import run_python

    csv_path = tmp_path / "big.csv"
    write_csv(SyntheticSpec(n_users=300_000, n_items=60_000, rows=7_000_000, seed=3), csv_path)
    size = os.path.getsize(csv_path)
    allowance = 64 * 2**20  # the smallest a stage accepts (MIN_ALLOWANCE)
    assert size > 1.5 * allowance
    code = f"""
import json, wals_ooc
from wals_ooc.memory import current_rss, peak_rss, warm_libraries
warm_libraries()
budget = current_rss() + {allowance} + 2**20  # 1 MiB for the pages allocated before convert measures its own start
report = wals_ooc.convert({str(csv_path)!r}, {str(tmp_path / 's.zarr')!r}, memory_budget=budget, progress=False)
print(report.summary())
print(json.dumps({{"budget": budget, "peak": peak_rss(), "nnz": report.nnz}}))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["nnz"] > 4_000_000
    assert figures["peak"] <= figures["budget"], done.stdout


def test_order_column_keeps_the_latest_of_summed_duplicates_in_both_orientations(tmp_path):
    rng = np.random.default_rng(4)
    n = 3000
    frame = pd.DataFrame({"u": rng.integers(0, 80, n), "i": rng.integers(0, 50, n), "v": rng.integers(1, 4, n),
                          "t": rng.permutation(n) * 10.0})
    frame.to_csv(tmp_path / "log.csv", index=False)
    wals_ooc.convert(str(tmp_path / "log.csv"), str(tmp_path / "s.zarr"), user_col="u", item_col="i", value_col="v",
                     order_col="t", row_block=8, shard_nnz=300, progress=False)
    store = open_store(tmp_path / "s.zarr")
    assert store.has_order
    expected = frame.groupby(["u", "i"]).agg(v=("v", "sum"), t=("t", "max")).reset_index()
    for side, row_col, col_col in (("user", "u", "i"), ("item", "i", "u")):
        shard = store.rows(side, 0, store.n_rows(side), with_order=True)
        rows = store.ids(side)[np.repeat(np.arange(store.n_rows(side)), np.diff(shard.indptr))]
        other = "item" if side == "user" else "user"
        got = pd.DataFrame({row_col: rows, col_col: store.ids(other)[shard.indices], "v": shard.values, "t": shard.order})
        merged = expected.merge(got, on=["u", "i"], suffixes=("", "_got"))
        assert len(merged) == len(expected) == len(got)
        np.testing.assert_array_equal(merged["t"], merged["t_got"])
        np.testing.assert_allclose(merged["v"], merged["v_got"])
    wals_ooc.convert(str(tmp_path / "log.csv"), str(tmp_path / "plain.zarr"), user_col="u", item_col="i",
                     value_col="v", progress=False)
    with pytest.raises(StoreError, match="order"):
        open_store(tmp_path / "plain.zarr").rows("user", 0, 1, with_order=True)


@pytest.mark.parametrize("cell, reason", [("soon", "non-numeric order"), ("nan", "order is not finite")])
def test_bad_order_value_is_located(tmp_path, cell, reason):
    path = tmp_path / "log.csv"
    path.write_text(f"u,i,v,t\n1,2,3,10\n1,3,1,{cell}\n")
    with pytest.raises(InputError) as caught:
        wals_ooc.convert(str(path), str(tmp_path / "s.zarr"), user_col="u", item_col="i", value_col="v", order_col="t",
                         progress=False)
    assert f"{path}:3" in str(caught.value) and "'t'" in str(caught.value) and reason in str(caught.value)


def test_a_row_longer_than_an_assembly_unit_is_summed_in_chunks(tmp_path):
    """One item holds 500k entries, more than an assembly unit under an 80 MiB allowance: it is
    summed through the dense per-column path and equals the in-memory groupby."""
    from wals_ooc.memory import current_rss, warm_libraries

    rng = np.random.default_rng(12)
    n = 600_000
    items = np.where(np.arange(n) < 500_000, 7, rng.integers(0, 1000, n))
    frame = pd.DataFrame({"u": rng.integers(0, 300_000, n), "i": items, "v": rng.integers(1, 5, n), "t": rng.permutation(n)})
    frame.to_csv(tmp_path / "log.csv", index=False)
    warm_libraries()
    wals_ooc.convert(str(tmp_path / "log.csv"), str(tmp_path / "s.zarr"), user_col="u", item_col="i", value_col="v",
                     order_col="t", memory_budget=current_rss() + 80 * 2**20, progress=False)
    store = open_store(tmp_path / "s.zarr")
    row = int(store.index_of("item", [7])[0])
    shard = store.rows("item", row, row + 1, with_order=True)
    assert shard.nnz == len(frame[frame["i"] == 7].groupby("u")) > 200_000  # from 500k raw entries
    expected = frame[frame["i"] == 7].groupby("u").agg(v=("v", "sum"), t=("t", "max"))
    np.testing.assert_array_equal(store.ids("user")[shard.indices], expected.index.to_numpy())
    np.testing.assert_array_equal(shard.values, expected["v"].to_numpy(np.float32))
    np.testing.assert_array_equal(shard.order, expected["t"].to_numpy(np.float64))
    assert store.nnz == len(frame.groupby(["u", "i"]))


def test_large_chunks_parse_in_threads_and_still_name_the_malformed_line(tmp_path):
    """A chunk past THREADED_PARSE_BYTES that is not plain (a quoted field) is parsed by Arrow's
    threads, with the same rows; a malformed row in it is still reported with its line (the
    chunk is parsed again serially)."""
    from wals_ooc.store.sources import THREADED_PARSE_BYTES

    n = THREADED_PARSE_BYTES // 7  # 7-10 bytes a line: one chunk past the threshold
    lines = [f"{k % 997},{k % 89},1" for k in range(n)]
    bad = n - 1234
    lines[bad] = '"5",6,1'  # quoted: the chunk is not plain
    path = tmp_path / "big.csv"
    path.write_text("user,item,value\n" + "\n".join(lines) + "\n")
    assert path.stat().st_size > THREADED_PARSE_BYTES
    wals_ooc.convert(str(path), str(tmp_path / "s.zarr"), progress=False, memory_budget="2GB")
    rows = [(k % 997, k % 89, 1) for k in range(n) if k != bad] + [(5, 6, 1)]
    _assert_store_equals(open_store(str(tmp_path / "s.zarr")), *_expected(rows))
    lines[bad] = "5,6"
    path.write_text("user,item,value\n" + "\n".join(lines) + "\n")
    with pytest.raises(InputError) as info:
        wals_ooc.convert(str(path), str(tmp_path / "t.zarr"), progress=False, memory_budget="2GB")
    assert info.value.line == bad + 2 and "malformed row" in str(info.value)


def test_spread_integer_ids_map_like_dense_ones(tmp_path):
    """Ids over a range too wide for a lookup table take the search path: same matrix."""
    rows = [(k % 13, k % 7, 1 + k % 3) for k in range(200)]
    spread = [(u * 10**15 + 3, i * 10**14, v) for u, i, v in rows]
    for name, data in (("dense", rows), ("spread", spread)):
        _write_csv(tmp_path / f"{name}.csv", data)
        wals_ooc.convert(str(tmp_path / f"{name}.csv"), str(tmp_path / f"{name}.zarr"), shard_nnz=10, progress=False)
    dense, spread_store = open_store(str(tmp_path / "dense.zarr")), open_store(str(tmp_path / "spread.zarr"))
    for side in ("user", "item"):
        a, b = store_to_scipy(dense, side), store_to_scipy(spread_store, side)
        np.testing.assert_array_equal(a.indptr, b.indptr)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.data, b.data)
    _assert_store_equals(spread_store, *_expected(spread))


def test_plain_chunks_read_from_bytes_equal_the_careful_path(tmp_path):
    """Integer ids and counts without quotes are parsed straight from the bytes; the same rows
    with one quoted field (so Arrow and the validator read them) give the same store."""
    rows = [(k % 17, (k * 7) % 11, k % 4) for k in range(300)]  # zeros dropped on both paths
    _write_csv(tmp_path / "plain.csv", rows)
    text = (tmp_path / "plain.csv").read_text().replace("\n3,", '\n"3",', 1)
    (tmp_path / "quoted.csv").write_text(text)
    reports = {name: wals_ooc.convert(str(tmp_path / f"{name}.csv"), str(tmp_path / f"{name}.zarr"), progress=False)
               for name in ("plain", "quoted")}
    assert reports["plain"].bad_rows.zeros_dropped == reports["quoted"].bad_rows.zeros_dropped > 0
    assert reports["plain"].rows_read == reports["quoted"].rows_read
    for name in ("plain", "quoted"):
        _assert_store_equals(open_store(str(tmp_path / f"{name}.zarr")), *_expected(rows))


def test_chunk_appender_writes_whole_chunks_and_keeps_no_reference_to_the_caller_s_array(tmp_path):
    """Pieces of every size (empty, short of a chunk, past several chunks, ending on a boundary),
    from an array offset (indptr's start 1): the array holds their concatenation, each chunk was
    written whole, and overwriting a piece after appending it changes nothing."""
    import zarr

    from wals_ooc.store.appender import ChunkAppender
    from wals_ooc.store.format import create_array

    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    rng = np.random.default_rng(3)
    for start in (0, 1):
        array = create_array(group, f"a{start}", shape=(start,), dtype=np.int64, chunks=(8,), dense=True)
        appender = ChunkAppender(array, start=start)
        expected, scratch = [np.zeros(start, np.int64)], np.empty(40, np.int64)
        for size in (0, 3, 5, 8 - start, 17, 1, 0, 24, 7, 2, 40, 1):
            piece = scratch[:size]
            piece[:] = rng.integers(0, 1000, size)
            expected.append(piece.copy())
            appender.append(piece)
            assert (appender.written == start or appender.written % 8 == 0) and appender.pending_len < 8  # whole chunks
            scratch[:] = -1  # the caller reuses its memory
        assert appender.close() == sum(len(e) for e in expected)
        np.testing.assert_array_equal(array[:], np.concatenate(expected))


def test_synthetic_taste_space_is_reproducible_and_users_draw_near_their_taste(tmp_path):
    # latent_dims > 0: users and clusters are points in a taste space; a user's in-taste rows
    # come from clusters near its point (softmax of sharpness x cosine), not from one cluster
    import numpy as np

    from wals_ooc.errors import SettingError
    from wals_ooc.synthetic import SyntheticSpec, _unit_rows, synthetic_batches

    spec = SyntheticSpec(n_users=300, n_items=3000, rows=30_000, clusters=40, latent_dims=8, sharpness=12,
                         affinity=1.0, seed=4)
    first = list(synthetic_batches(spec, batch_rows=4096))
    again = list(synthetic_batches(spec, batch_rows=4096))
    users = np.concatenate([b.users for b in first])
    items = np.concatenate([b.items for b in first])
    np.testing.assert_array_equal(items, np.concatenate([b.items for b in again]))
    assert len(users) == spec.rows and np.all(np.diff(users) >= 0) and items.min() >= 0 and items.max() < spec.n_items
    # the generator's own draws, replayed: which cluster each item is in, where users and clusters are
    rng = np.random.default_rng(spec.seed)
    rng.permutation(spec.n_users), rng.permutation(spec.n_items)
    item_cluster = rng.integers(0, spec.clusters, spec.n_items)
    rng.integers(0, spec.clusters, spec.n_users)
    centres = _unit_rows(rng, spec.clusters, spec.latent_dims)
    positions = _unit_rows(rng, spec.n_users, spec.latent_dims)
    cosine = np.einsum("ij,ij->i", positions[users], centres[item_cluster[items]])
    random_pairs = positions[users] @ centres.T  # the cosine to a cluster picked blindly
    assert cosine.mean() > 0.45 > random_pairs.mean() + 0.4
    per_user = [len(np.unique(item_cluster[items[users == u]])) for u in np.unique(users)[:50]]
    assert np.median(per_user) > 1  # tastes span several clusters
    with pytest.raises(SettingError):
        SyntheticSpec(latent_dims=-1)
    with pytest.raises(SettingError, match="clusters"):
        SyntheticSpec(clusters=0)
    # the command line passes the taste space through, and records it with the store
    from wals_ooc.cli import main as cli_main
    from wals_ooc.store import open_store as open_interactions

    out = str(tmp_path / "gen.zarr")
    assert cli_main(["generate", out, "--users", "60", "--items", "300", "--rows", "900", "--clusters", "12",
                     "--latent-dims", "4", "--sharpness", "8", "--affinity", "1", "-q"]) == 0
    recorded = open_interactions(out).group.attrs["sources"]["synthetic"]
    assert (recorded["latent_dims"], recorded["sharpness"], recorded["clusters"], recorded["affinity"]) == (4, 8.0, 12, 1.0)

def test_integer_ids_leaving_the_dense_count_midway(tmp_path):
    """Pass 1 counts integer ids in a dense table while their range fits its share: an id far
    out of range, or one that is not an integer, arriving after the first batches hands the
    ids counted so far to the sorted path. The matrix is the same either way."""
    rows = [(k % 1009, k % 97, 1 + k % 3) for k in range(3000)]

    def batches(data, text_users=False):
        for start in range(0, len(data), 1000):
            part = data[start : start + 1000]
            users = [u for u, _, _ in part]
            yield RowBatch(pa.array([str(u) for u in users]) if text_users else np.array(users, np.int64),
                           np.array([i for _, i, _ in part], np.int64), np.array([v for _, _, v in part], np.float32))

    far = rows + [(10**15, 5, 2), (3, 10**14, 1)]
    write_store(batches(far), str(tmp_path / "far.zarr"), shard_nnz=500, progress=False)
    _assert_store_equals(open_store(str(tmp_path / "far.zarr")), *_expected(far))
    text = rows + [("u7", 5, 2)]
    write_store(batches(text, text_users=True), str(tmp_path / "text.zarr"), shard_nnz=500, progress=False)
    store = open_store(str(tmp_path / "text.zarr"))
    assert store.id_kinds == {"user": "str", "item": "int"}
    expected: dict = {}
    for u, i, v in text:
        expected[(str(u), i)] = expected.get((str(u), i), 0.0) + v
    assert _entries_by_id(store) == expected


def test_plain_chunk_parsed_in_two_halves_keeps_rows_and_names_bad_lines(tmp_path):
    """A plain chunk of 1 MiB or more is parsed as two halves at once: the rows come out in file
    order, and a bad value in either half is still named by its line."""
    from wals_ooc.store.sources import PARALLEL_PARSE_BYTES

    n = PARALLEL_PARSE_BYTES // 9 + 1000  # 9-12 bytes a line: one chunk past the threshold
    rows = [(k % 1013, k % 211, 1 + k % 4) for k in range(n)]
    path = tmp_path / "plain.csv"
    _write_csv(path, rows)
    assert path.stat().st_size > PARALLEL_PARSE_BYTES
    wals_ooc.convert(str(path), str(tmp_path / "s.zarr"), progress=False, memory_budget="2GB")
    _assert_store_equals(open_store(str(tmp_path / "s.zarr")), *_expected(rows))
    for bad in (100, n - 100):  # in the first half, then in the second
        lines = path.read_text().splitlines()
        lines[bad + 1] = lines[bad + 1] + "x"
        (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
        with pytest.raises(InputError) as info:
            wals_ooc.convert(str(tmp_path / "bad.csv"), str(tmp_path / "t.zarr"), progress=False, memory_budget="2GB")
        assert info.value.line == bad + 2 and info.value.field == "value"


def test_csr_by_columns_equals_the_row_sort_bit_for_bit():
    """The two counting sorts (by column, then row) give csr_into's rows, columns and float64 sums
    exactly: duplicates summed in input order, empty rows, a unit starting past row 0."""
    from wals_ooc.kernels.assemble import csr_by_columns_into, csr_into

    rng = np.random.default_rng(3)
    for trial in range(60):
        n_rows, n_cols, n = int(rng.integers(1, 40)), int(rng.integers(1, 30)), int(rng.integers(0, 300))
        start = int(rng.integers(0, 5))
        rows = (rng.zipf(1.5, n) % n_rows + start).astype(np.int32)
        cols = (rng.zipf(1.3, n) % n_cols).astype(np.int32)
        values = (rng.random(n) * 1e3).astype(np.float32)
        results = []
        for radix in (False, True):
            indptr, indices, sums = np.zeros(n_rows + 1, np.int64), np.zeros(n, np.int32), np.zeros(n, np.float64)
            common = (np.zeros(n_rows + 1, np.int64), np.zeros(n, np.int32), np.zeros(n, np.float32), indptr, indices, sums)
            if radix:
                out = csr_by_columns_into(rows, cols, values, start, n_rows, n_cols, np.zeros(n_cols + 1, np.int64),
                                          np.zeros(n, np.int32), np.zeros(n, np.float32), *common)
            else:
                out = csr_into(rows, cols, values, start, n_rows, n_cols, *common)
            results.append((indptr, indices[:out], sums[:out]))
        for ours, theirs in zip(*results):
            assert ours.tobytes() == theirs.tobytes(), trial
        dense = np.zeros((n_rows, n_cols))
        np.add.at(dense, (rows - start, cols), values.astype(np.float64))
        indptr, indices, sums = results[1]
        assert np.allclose(sp.csr_matrix((sums, indices, indptr), shape=(n_rows, n_cols)).toarray(), dense)


def test_plain_parse_kernel_reads_fields_as_it_scans_them():
    """parse_plain_csv: canonical (negative) ids, extra fields, any field order; anything else
    (a leading zero, '+', a 19-digit id, a quote or '\\r', a missing or extra field, no final
    newline) is not plain, so the chunk goes the careful way."""
    from wals_ooc.kernels.text import parse_plain_csv

    def parse(text: bytes, fields=(0, 1, 2), n_fields=3):
        return parse_plain_csv(np.frombuffer(text, np.uint8), n_fields, *fields, 44)

    users, items, values, ok = parse(b"5,-7,3\n0,123456789012345678,0012\n")
    assert ok and users.tolist() == [5, 0] and items.tolist() == [-7, 123456789012345678]
    assert values.tolist() == [3.0, 12.0]
    users, items, values, ok = parse(b"x,9,,4\n\"q\",-2,ab,1\n", fields=(3, 1, -1), n_fields=4)
    assert not ok  # a quote in a field not read
    users, items, values, ok = parse(b"x,9,,4\ny,-2,ab,1\n", fields=(3, 1, -1), n_fields=4)
    assert ok and users.tolist() == [4, 1] and items.tolist() == [9, -2] and values.tolist() == [1.0, 1.0]
    for text in (b"05,1,1\n", b"+5,1,1\n", b"-0,1,1\n", b"1234567890123456789,1,1\n", b"1,2,3\r\n", b"1,2\n",
                 b"1,2,3,4\n", b"1,2,3", b"1,2,-3\n", b"1,2,1234567890123456\n", b"1,,3\n", b"\n"):
        assert not parse(text)[3], text


def test_bucket_scatter_by_table_equals_the_search_among_bounds():
    """Records grouped by a table of each row's unit come out as the search among the bounds
    puts them: same order within each unit, same cut points (empty units too)."""
    from wals_ooc.kernels.assemble import bucket_scatter, bucket_scatter_by_table

    rng = np.random.default_rng(5)
    bounds = np.array([0, 3, 3, 10, 11, 40], np.int64)
    table = np.repeat(np.arange(len(bounds) - 1, dtype=np.int32), np.diff(bounds))
    keys = rng.integers(0, 40, 500).astype(np.int32)
    others, values = rng.integers(0, 9, 500).astype(np.int32), rng.random(500).astype(np.float32)
    outs = [tuple(np.zeros(500, dtype) for dtype in (np.int32, np.int32, np.float32)) for _ in range(2)]
    cuts = bucket_scatter(keys, others, values, bounds, *outs[0])
    assert np.array_equal(bucket_scatter_by_table(keys, others, values, table, len(bounds) - 1, *outs[1]), cuts)
    for ours, theirs in zip(*outs):
        assert ours.tobytes() == theirs.tobytes()
    assert np.array_equal(np.diff(cuts), np.bincount(table[keys], minlength=len(bounds) - 1))


def test_spill_raw_and_arrow_segments_in_turn_give_the_same_store(tmp_path):
    """Pass 1 spills integer batches as uint32 offsets from each batch's smallest id (raw) and
    any batch spanning 2**32 or more through Arrow; batches of both kinds in turn, more raw
    batches than the ring of read buffers, and ids too spread for pass 2's lookup table (the
    offsets turned back into ids) still give the matrix of the rows."""
    rng = np.random.default_rng(11)
    parts = []
    for k in range(9):
        users = rng.integers(0, 40, 50)
        if k == 3:
            users[7] = 2**40  # this batch spans more than 2**32: Arrow
        if k in (5, 6):
            users = users + 3 * 10**9 + (users % 2) * 4 * 10**9  # spans < 2**32 once offset, far from 0
        parts.append([(int(u), int(i), float(v)) for u, i, v in zip(users, rng.integers(-5, 9, 50), rng.integers(1, 4, 50))])

    def batches():
        for part in parts:
            yield RowBatch(np.array([u for u, _, _ in part], np.int64), np.array([i for _, i, _ in part], np.int64),
                           np.array([v for _, _, v in part], np.float32))

    write_store(batches(), str(tmp_path / "s.zarr"), shard_nnz=60, progress=False)
    _assert_store_equals(open_store(str(tmp_path / "s.zarr")), *_expected([row for part in parts for row in part]))


def test_scan_chunk_counts_newlines_finds_the_last_and_sees_quotes():
    """scan_chunk against NumPy on random bytes: quotes anywhere, newline count, end of the last."""
    from wals_ooc.kernels.text import scan_chunk

    rng = np.random.default_rng(2)
    for size in (0, 1, 7, 1000):
        for alphabet in (b"0123,\n", b'0,\n"', b"123,"):
            data = np.frombuffer(bytes(rng.choice(list(alphabet), size).astype(np.uint8)), np.uint8)
            newlines = np.flatnonzero(data == 10)
            expected = (bool((data == 34).any()), len(newlines), int(newlines[-1]) + 1 if len(newlines) else 0)
            assert tuple(scan_chunk(data)) == expected, (size, alphabet)


def test_heap_guard_gives_back_free_heap_once_the_rss_passes_its_mark():
    """Buffers under the raised mmap threshold come from malloc's heap and, freed, stay resident:
    the guard releases them when the RSS is over its mark (here: at once)."""
    from .conftest import run_python

    code = """
import json, time
import numpy as np
from wals_ooc.memory import HeapGuard, current_rss, reused_large_buffers, warm_libraries
warm_libraries()
with reused_large_buffers(1 << 30):  # 4 MiB threshold: the 3 MiB buffers below come from the heap
    buffers = [np.ones(3 << 17) for _ in range(32)]  # 32 float64 buffers of 3 MiB, touched
    for k in range(0, 32, 2):
        buffers[k] = None  # every other one freed: holes below live buffers, not trimmed by free()
    held = current_rss()
    with HeapGuard(mark=0, period=0.002) as guard:
        deadline = time.monotonic() + 5
        while current_rss() > held - (32 << 20) and time.monotonic() < deadline:
            time.sleep(0.01)
    print(json.dumps({"held": held, "after": current_rss(), "trims": guard.trims, "highest": guard.highest}))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["trims"] >= 1 and figures["highest"] >= figures["after"]
    assert figures["held"] - figures["after"] >= 32 << 20, figures  # ~48 MiB of holes given back


def test_conversion_stays_under_a_small_budget_with_the_largest_heap_reuse(tmp_path):
    """A small input at a small allowance, with buffers of up to 4 MiB kept in malloc's heap (as
    at the largest allowances): the peak stays under the budget, and no BudgetWarning."""
    from wals_ooc.synthetic import SyntheticSpec, write_csv

    from .conftest import run_python

    csv_path = tmp_path / "in.csv"
    write_csv(SyntheticSpec(n_users=60_000, n_items=20_000, rows=1_500_000, seed=4), csv_path)
    allowance = 64 * 2**20
    code = f"""
import json, warnings, wals_ooc
import wals_ooc.memory as memory
from wals_ooc.memory import current_rss, peak_rss, warm_libraries
memory.reuse_threshold = lambda allowance: memory.REUSE_THRESHOLD_MAX
warm_libraries()
budget = current_rss() + {allowance} + 2**20  # 1 MiB for the pages allocated before convert measures its own start
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    report = wals_ooc.convert({str(csv_path)!r}, {str(tmp_path / 's.zarr')!r}, memory_budget=budget,
                              shard_nnz=50_000, progress=False)
print(json.dumps({{"budget": budget, "peak": peak_rss(), "nnz": report.nnz, "warnings": [str(w.message) for w in caught]}}))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["nnz"] > 800_000
    assert figures["peak"] <= figures["budget"], figures
    assert not [w for w in figures["warnings"] if "memory budget" in w], figures


def test_a_build_over_its_budget_warns(tmp_path):
    """A peak over the budget is never silent: BudgetWarning names the store and both figures."""
    from wals_ooc.errors import BudgetWarning
    from wals_ooc.memory import MemoryBudget
    from wals_ooc.store.sources import RowBatch
    from wals_ooc.store.writer import write_store

    batch = RowBatch(np.arange(1000, dtype=np.int64) % 37, np.arange(1000, dtype=np.int64) % 11,
                     np.ones(1000, np.float32), None)
    tight = MemoryBudget(total=1 << 20, baseline=0)  # far under what the process already holds
    with pytest.warns(BudgetWarning, match=r"s\.zarr: peak RSS .* went over the memory budget of 1\.00 MiB"):
        report = write_store(iter([batch]), tmp_path / "s.zarr", memory_budget=tight, progress=False)
    assert report.nnz == 37 * 11
