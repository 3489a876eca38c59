"""Ids of any kind and size (issue 10): the id map's lookups at scale, the id-type rule, stores
that do not depend on the budget, a round trip of every id through serving, and each bad input
with its exact error."""

from __future__ import annotations

import csv
import logging
import uuid
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wals_ooc
from wals_ooc import WALS, open_store
from wals_ooc.errors import InputError, SettingError, UnknownIdError
from wals_ooc.memory import current_rss, warm_libraries
from wals_ooc.store import ids as id_maps
from wals_ooc.store.ids import DistinctIds, IdIndex, as_text, write_id_map
from wals_ooc.store.sources import InputSpec, read_batches
from wals_ooc.store.writer import ConvertReport, write_store

from .conftest import store_to_scipy

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _write_rows(path, rows, header=("user", "item", "value")):
    """CSV as a user's tool writes it: fields with commas, quotes or newlines are quoted."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def _store_bytes(location) -> tuple[dict, dict]:
    """Every array of a store (dtype, shape, bytes) and its attributes but the random store id."""
    group = zarr.open_group(str(location), mode="r")
    arrays = {}

    def walk(node, prefix):
        for name, member in node.members():
            if isinstance(member, zarr.Array):
                arrays[prefix + name] = (member.dtype.str, member.shape, np.asarray(member[...]).tobytes())
            else:
                arrays[prefix + name + "/attrs"] = dict(member.attrs)
                walk(member, prefix + name + "/")

    walk(group, "")
    attrs = {k: v for k, v in group.attrs.items() if k != "store_id"}
    return arrays, attrs


def _entries(store) -> dict:
    """{(user id, item id): value} of a small store, ids as Python str or int."""
    matrix = store_to_scipy(store).tocoo()
    users, items = store.ids("user").tolist(), store.ids("item").tolist()
    return {(users[r], items[c]): float(v) for r, c, v in zip(matrix.row, matrix.col, matrix.data)}


def _expected(rows, kinds) -> dict:
    """The entries the rows should give: duplicates summed, ids typed as the store's kinds."""
    as_kind = {side: (int if kinds[side] == "int" else str) for side in kinds}
    out: dict = {}
    for user, item, value in rows:
        key = (as_kind["user"](user), as_kind["item"](item))
        out[key] = out.get(key, 0.0) + float(value)
    return {k: v for k, v in out.items() if v}


def _budgets():
    """The smallest budget convert accepts (baseline + 64 MiB, with a little slack), a medium and a large one."""
    warm_libraries()
    base = current_rss()
    return [base + 72 * 2**20, base + 1024 * 2**20, base + 8 * 2**30]


def _convert_with_blocks(path, out, budget, block_bytes, **spec):
    """convert() with an explicit CSV block size (convert derives it from the budget: >= 1 MiB)."""
    spec = InputSpec(**spec)
    report = ConvertReport(store=out)
    batches = read_batches([str(path)], spec, report.bad_rows, block_bytes=block_bytes)
    return write_store(batches, out, memory_budget=budget, progress=False, id_type=spec.id_kind, report=report,
                       source_name=str(path), source_attrs={"input": str(path)})


# ---------------------------------------------------------------------------------------------
# property tests: random logs with long Unicode and numeric-looking ids
# ---------------------------------------------------------------------------------------------

_ids = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x00"), min_size=1, max_size=30),
    st.from_regex(r"0{0,3}[0-9]{1,4}", fullmatch=True),  # numeric-looking, leading zeros
    st.integers(0, 40).map(str),
    st.integers(900, 1100).map(lambda n: "https://example.com/" + "p" * n),  # ~1 KB URLs
    st.sampled_from(["🙂", "👩‍💻", "ω", "李", '"quoted"', "a,b", "x\ny", " lead", "trail ", "007", "7", "0007"]),
)
_rows = st.lists(st.tuples(_ids, _ids, st.integers(1, 4)), min_size=1, max_size=40)
_int_rows = st.lists(st.tuples(st.integers(-50, 50).map(str), st.integers(0, 9).map(str), st.integers(1, 4)),
                     min_size=1, max_size=30)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.one_of(_rows, _int_rows))
def test_same_input_same_store_at_every_budget_and_block_size(tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("budgets")
    _write_rows(tmp / "log.csv", rows)
    stores = []
    for k, (budget, block) in enumerate(zip(_budgets(), (97, 4096, 1 << 20))):
        _convert_with_blocks(tmp / "log.csv", str(tmp / f"s{k}.zarr"), budget, block)
        stores.append(_store_bytes(tmp / f"s{k}.zarr"))
    assert stores[0] == stores[1] == stores[2]
    store = open_store(tmp / "s0.zarr")
    assert _entries(store) == _expected(rows, store.id_kinds)
    for side, column in (("user", 0), ("item", 1)):
        texts = {row[column] for row in rows}
        canonical = all(t == str(int(t)) for t in texts if t.lstrip("-").isdigit()) and all(
            t.lstrip("-").isdigit() and t.isascii() for t in texts)
        assert store.id_kinds[side] == ("int" if canonical else "str"), texts
        ids = store.ids(side)
        np.testing.assert_array_equal(store.index_of(side, ids), np.arange(len(ids)))
        if store.id_kinds[side] == "str":  # rows in (XXH64, bytes) order: the store format
            assert ids.tolist() == sorted(ids.tolist(), key=lambda s: (xxhash.xxh64_intdigest(s.encode()), s.encode()))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(users=st.lists(_ids, min_size=2, max_size=8, unique=True), items=st.lists(_ids, min_size=3, max_size=10, unique=True),
       values=st.lists(st.integers(1, 4), min_size=3, max_size=3))
def test_every_id_round_trips_through_recommend_similar_fold_in_and_evaluate(tmp_path_factory, users, items, values):
    tmp = tmp_path_factory.mktemp("roundtrip")
    # each user has three items, so the split holds one of them out
    rows = [(user, items[(j + d) % len(items)], values[d]) for j, user in enumerate(users) for d in range(3)]
    _write_rows(tmp / "log.csv", rows)
    wals_ooc.convert(str(tmp / "log.csv"), str(tmp / "all.zarr"), progress=False)
    wals_ooc.split(str(tmp / "all.zarr"), tmp / "train.zarr", tmp / "test.zarr", test_fraction=0.3, seed=1, progress=False)
    _round_trip(tmp, open_store(tmp / "train.zarr"), open_store(tmp / "test.zarr"))


def _round_trip(tmp, train, test, n=3):
    """Every user gets recommendations; every id comes back as itself; evaluate counts every test entry."""
    model = WALS(factors=2, iterations=1, random_state=0).fit(train, str(tmp / "model.zarr"), progress=False)
    users, items = train.ids("user"), train.ids("item")
    item_set = set(items.tolist())
    rec_ids, scores = model.recommend(users, N=n, filter_already_liked=False)
    # everyone gets min(n, items) items, and no slot is padding (fewer items than n: fewer columns)
    assert rec_ids.shape == scores.shape == (len(users), min(n, len(items)))
    assert not np.ma.getmaskarray(rec_ids).any() and np.isfinite(scores).all()
    assert all(i in item_set for i in rec_ids.ravel().tolist())
    similar, _ = model.similar_items(items, N=1)
    np.testing.assert_array_equal(train.index_of("item", similar[:, 0]), train.index_of("item", similar[:, 0]))
    assert set(similar.ravel().tolist()) <= item_set
    np.testing.assert_array_equal(train.ids_of("item", train.index_of("item", items)), items)
    np.testing.assert_array_equal(train.ids_of("user", train.index_of("user", users)), users)
    vector = model.recalculate_user({items[0]: 2.0, items[-1]: 1.0})
    assert np.isfinite(vector).all()
    # evaluate: every test user is known (min_train=1); a test item the training side lacks is
    # counted as skipped, and every other test entry is scored
    test_entries = _entries(test)
    unknown_items = sum(1 for (_, item) in test_entries if item not in item_set)
    metrics = model.evaluate(test, k=n)
    assert metrics["skipped_users"] == 0
    assert metrics["skipped_test_items"] == unknown_items
    users_with_known = {u for (u, i) in test_entries if i in item_set}
    assert metrics["users"] == len(users_with_known)
    out = model.recommend_all(N=n, output=str(tmp / "top.parquet"), format="parquet", filter_already_liked=False)
    table = pq.read_table(out)
    assert set(table.column("user").to_pylist()) == set(users.tolist())
    assert set(table.column("item").to_pylist()) <= item_set
    return model, metrics


def test_200_uuid_users_and_items_every_user_recommended_every_test_entry_counted(tmp_path):
    rng = np.random.default_rng(10)
    users = [str(uuid.UUID(int=int(x))) for x in rng.integers(0, 2**62, 200)]
    items = [str(uuid.UUID(int=int(x))) for x in rng.integers(0, 2**62, 200)]
    rows = [(users[u], items[i], 1 + int(rng.integers(0, 3))) for u in range(200) for i in rng.choice(200, 8, replace=False)]
    rows += [(users[u], items[u], 1) for u in range(200)]  # every item appears
    _write_rows(tmp_path / "uuid.csv", rows)
    wals_ooc.convert(str(tmp_path / "uuid.csv"), str(tmp_path / "all.zarr"), progress=False)
    wals_ooc.split(str(tmp_path / "all.zarr"), tmp_path / "train.zarr", tmp_path / "test.zarr", test_fraction=0.2,
                   seed=3, progress=False)
    train, test = open_store(tmp_path / "train.zarr"), open_store(tmp_path / "test.zarr")
    assert train.n_users == 200 and train.id_kinds == {"user": "str", "item": "str"}
    model, metrics = _round_trip(tmp_path, train, test, n=5)
    ids, scores = model.recommend(users, N=5)  # filtering what each user has: 5 left for everyone
    assert (scores > -np.inf).all() and set(ids.ravel().tolist()) <= set(items)
    test_entries = _entries(test)
    assert metrics["skipped_test_items"] == sum(1 for (_, i) in test_entries if i not in set(train.ids("item").tolist()))
    assert metrics["users"] == len({u for (u, _) in test_entries}) == test.n_users
    with pytest.raises(UnknownIdError, match=r"unknown user id in .*model.zarr: '/an/absolute/path' \(1 of 1 not found\)"):
        model.recommend(["/an/absolute/path"])
    from wals_ooc.serve.recommend import open_recommendations

    top = open_recommendations(model.recommend_all(N=5, output=str(tmp_path / "top.zarr")))
    np.testing.assert_array_equal(top["user_ids"][:], train.ids("user"))
    assert set(np.asarray(top["item_ids"][:]).ravel().tolist()) <= set(items)


# ---------------------------------------------------------------------------------------------
# the id map itself: many chunks, repeats, unknown ids, hash collisions, spilled runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of 8 keys and 64 bytes, reads of 2 chunks: small maps span hundreds of chunks."""
    monkeypatch.setattr(id_maps, "KEY_CHUNK", 8)
    monkeypatch.setattr(id_maps, "BYTES_CHUNK", 64)
    monkeypatch.setattr(id_maps, "READ_BYTES", 128)
    monkeypatch.setattr(id_maps, "RUN_BATCH", 16)


def _build_map(tmp_path, ids, kind="str", memory=1 << 12, id_type="auto"):
    group = zarr.open_group(str(tmp_path / "map.zarr"), mode="w")
    distinct = DistinctIds(kind, str(tmp_path), memory, "t")
    for start in range(0, len(ids), 97):
        distinct.add(ids[start : start + 97] if kind == "str" else np.asarray(ids[start : start + 97], np.int64))
    write_id_map(group, "ids", distinct, id_type)
    return IdIndex(zarr.open_group(str(tmp_path / "map.zarr"), mode="r")["ids"], "map.zarr")


def test_string_map_across_many_chunks_is_exact(tmp_path, tiny_chunks):
    rng = np.random.default_rng(0)
    ids = [str(uuid.UUID(int=int(x))) for x in rng.integers(0, 2**62, 900)]
    ids += ["u" * 300, "🙂" * 20, "007", "7", "0007", "a,b", "x\ny", "\u00e9", "e\u0301"]  # é two ways: two ids
    expected = sorted(set(ids), key=lambda s: (xxhash.xxh64_intdigest(s.encode()), s.encode()))
    index = _build_map(tmp_path, ids + ids[::3])  # repeats
    assert index.n == len(expected) and index.kind == "str"
    np.testing.assert_array_equal(index.ids_of(np.arange(index.n)), np.array(expected, dtype=object))
    queries = [ids[k] for k in rng.integers(0, len(ids), 3000)]  # any order, repeats
    np.testing.assert_array_equal(index.index_of(queries), [expected.index(q) for q in queries])
    rows = rng.integers(-1, index.n, (40, 7))
    got = index.ids_of(rows)
    assert got.shape == (40, 7)
    assert all(got[r, c] == (expected[rows[r, c]] if rows[r, c] >= 0 else "") for r in range(40) for c in range(7))
    absent = [str(uuid.uuid4()) for _ in range(50)] + ["", "07", expected[0] + " "]
    assert (index.index_of(absent + queries[:5], missing="mark")[: len(absent)] == -1).all()
    with pytest.raises(UnknownIdError, match=r"unknown ids in map.zarr: '.*', '.*', '.*', '.*', '.*', \.\.\. \(53 of 58 not found\)"):
        index.index_of(absent + queries[:5])
    blocks = list(index.iter_ids(rows=50))
    assert [start for start, _ in blocks] == list(range(0, index.n, 50))
    assert np.concatenate([ids for _, ids in blocks]).tolist() == expected


def test_integer_map_lookups_and_the_text_of_integers(tmp_path, tiny_chunks):
    values = np.random.default_rng(1).integers(-(2**62), 2**62, 500)
    values = np.concatenate([values, [0, 7, -7, 2**63 - 1, -(2**63)]])
    index = _build_map(tmp_path, values, kind="int")
    expected = np.unique(values)
    np.testing.assert_array_equal(index.ids_of(np.arange(index.n)), expected)
    np.testing.assert_array_equal(index.index_of(values[::-1]), np.searchsorted(expected, values[::-1]))
    # canonical text finds the integer; other spellings are other ids under id_type="auto"
    assert index.index_of(["7", 7, np.int32(7), 7.0, str(2**63 - 1)], missing="mark").tolist() == \
        [int(np.searchsorted(expected, 7))] * 4 + [len(expected) - 1]
    assert index.index_of(["007", "+7", " 7", "7.0", "seven", 7.5, True, 2**64], missing="mark").tolist() == [-1] * 8
    with pytest.raises(UnknownIdError, match=r"unknown id in map.zarr: '007' \(1 of 1 not found; this store's ids are integers\)"):
        index.index_of(["007"])


def test_lenient_integers_when_int_was_asked_for(tmp_path):
    index = _build_map(tmp_path, np.array([5, 7]), kind="int", id_type="int")
    assert index.index_of(["007", "+5", "7"]).tolist() == [1, 0, 1]


def test_hash_collisions_are_resolved_by_the_bytes(tmp_path, tiny_chunks, monkeypatch):
    """With a hash that collides all the time, the map still finds every id exactly, orders each
    group of equal hashes by bytes, and a converted store holds every entry under its own ids."""
    def weak_hash(offsets, data):
        return (np.diff(offsets) % 3).astype(np.uint64)

    monkeypatch.setattr(id_maps, "hash_strings", weak_hash)
    ids = [f"id-{k}-" + "x" * (k % 5) for k in range(60)]
    index = _build_map(tmp_path, ids + ids[::2])
    expected = sorted(set(ids), key=lambda s: (len(s.encode()) % 3, s.encode()))
    assert index.ids_of(np.arange(index.n)).tolist() == expected
    assert len(index._collisions) == 3
    np.testing.assert_array_equal(index.index_of(ids), [expected.index(i) for i in ids])
    assert index.index_of(["id-999-"], missing="mark").tolist() == [-1]
    rows = [(ids[k], ids[(7 * k) % 60], 1 + k % 3) for k in range(60)]
    _write_rows(tmp_path / "c.csv", rows)
    wals_ooc.convert(str(tmp_path / "c.csv"), str(tmp_path / "c.zarr"), progress=False)
    assert _entries(open_store(tmp_path / "c.zarr")) == _expected(rows, {"user": "str", "item": "str"})


def test_distinct_ids_spill_merge_and_switch_to_text(tmp_path, tiny_chunks):
    """Tiny memory: many sorted runs, merged in rounds; a switch from integers to text mid-way
    converts what was gathered; the result equals the in-memory one."""
    rng = np.random.default_rng(2)
    numbers = rng.integers(0, 3000, 4000)
    spilled = DistinctIds("int", str(tmp_path), 1 << 12, "s")
    for start in range(0, 2000, 100):
        spilled.add(numbers[start : start + 100])
    assert spilled.runs, "the tiny memory share should have spilled runs"
    spilled.to_text()
    texts = [str(uuid.UUID(int=int(x))) for x in rng.integers(0, 2**62, 600)]
    for start in range(0, 600, 50):
        spilled.add(as_text(texts[start : start + 50]))
    for start in range(2000, 4000, 100):
        spilled.add(numbers[start : start + 100])  # integers after the switch: their text
    merged = [t for block in spilled.blocks() for t in block.text.to_pylist()]
    every = {str(n) for n in numbers} | set(texts)
    assert merged == sorted(every, key=lambda s: (xxhash.xxh64_intdigest(s.encode()), s.encode()))


def test_conversion_with_the_map_searched_chunk_by_chunk_gives_the_same_store(tmp_path, tiny_chunks, monkeypatch):
    """Pass 2 holds the keys in memory when they fit; when not, it searches the map chunk by chunk.
    Both give the same rows (tiny chunks, so the map spans many)."""
    from wals_ooc.store import writer

    rng = np.random.default_rng(5)
    users = [str(uuid.UUID(int=int(x))) for x in rng.integers(0, 2**62, 300)]
    rows = [(users[int(u)], str(int(i)), 1 + int(i) % 3) for u, i in zip(rng.integers(0, 300, 2000), rng.integers(0, 150, 2000))]
    _write_rows(tmp_path / "log.csv", rows)
    wals_ooc.convert(str(tmp_path / "log.csv"), str(tmp_path / "held.zarr"), progress=False)
    monkeypatch.setattr(writer._RowMapper, "hold_keys", False)
    wals_ooc.convert(str(tmp_path / "log.csv"), str(tmp_path / "chunked.zarr"), progress=False)
    assert _store_bytes(tmp_path / "held.zarr") == _store_bytes(tmp_path / "chunked.zarr")
    assert _entries(open_store(tmp_path / "chunked.zarr")) == _expected(rows, {"user": "str", "item": "int"})


# ---------------------------------------------------------------------------------------------
# the id type rule
# ---------------------------------------------------------------------------------------------


def test_ids_that_differ_as_text_are_never_merged_unless_int_is_asked(tmp_path):
    _write_rows(tmp_path / "z.csv", [("007", "a", 1), ("7", "a", 2), ("0007", "b", 3), ("-0", "b", 1), ("0", "a", 1)])
    wals_ooc.convert(str(tmp_path / "z.csv"), str(tmp_path / "auto.zarr"), progress=False)
    store = open_store(tmp_path / "auto.zarr")
    assert store.id_kinds == {"user": "str", "item": "str"}
    assert _entries(store) == {("007", "a"): 1.0, ("7", "a"): 2.0, ("0007", "b"): 3.0, ("-0", "b"): 1.0, ("0", "a"): 1.0}
    wals_ooc.convert(str(tmp_path / "z.csv"), str(tmp_path / "int.zarr"), id_type={"user": "int", "item": "str"},
                     progress=False)
    merged = open_store(tmp_path / "int.zarr")
    assert merged.id_kinds == {"user": "int", "item": "str"}
    assert _entries(merged) == {(7, "a"): 3.0, (7, "b"): 3.0, (0, "b"): 1.0, (0, "a"): 1.0}


def test_split_keeps_the_source_kinds_whichever_ids_each_side_gets(tmp_path):
    """The only non-integer item lands on one side of the split: both sides stay text ids."""
    rows = [("1", "1", 1), ("1", "2", 1), ("1", "x", 1), ("2", "1", 1), ("2", "2", 1), ("2", "3", 1)]
    _write_rows(tmp_path / "s.csv", rows)
    wals_ooc.convert(str(tmp_path / "s.csv"), str(tmp_path / "all.zarr"), progress=False)
    wals_ooc.split(str(tmp_path / "all.zarr"), tmp_path / "tr.zarr", tmp_path / "te.zarr", method="leave_one_out", progress=False)
    kinds = [open_store(tmp_path / name).id_kinds for name in ("all.zarr", "tr.zarr", "te.zarr")]
    assert kinds == [{"user": "int", "item": "str"}] * 3


def test_a_late_non_integer_id_gives_text_ids_at_every_budget(tmp_path):
    """The issue's case: a column of integers with an "abc" far down; the kind is decided by the
    whole input, so every budget gives the same store, and the integers keep their text."""
    rows = [(str(k % 5000), str(k % 300), 1) for k in range(150_000)] + [("abc", "1", 1)]  # 1.9 MB: several
    # blocks at the smallest budget (blocks of allowance / 48), one at the others
    _write_rows(tmp_path / "late.csv", rows)
    stores = []
    for k, budget in enumerate(_budgets()):
        wals_ooc.convert(str(tmp_path / "late.csv"), str(tmp_path / f"s{k}.zarr"), memory_budget=budget, progress=False)
        stores.append(_store_bytes(tmp_path / f"s{k}.zarr"))
    assert stores[0] == stores[1] == stores[2]
    store = open_store(tmp_path / "s0.zarr")
    assert store.id_kinds == {"user": "str", "item": "int"}
    assert store.index_of("user", ["abc", "4999", 17]).tolist() == store.index_of("user", ["abc", "4999", "17"]).tolist()


# ---------------------------------------------------------------------------------------------
# parsing that does not depend on the budget: quoted newlines, real line numbers
# ---------------------------------------------------------------------------------------------


def _quoted_log(path, n=3000, bad_at=None):
    lines = ["user,item,value"]
    for k in range(n):
        lines.append(f'u{k % 97},"item\n{k % 31}, with ""quotes""",{1 + k % 3}' if k % 4 == 0 else f"u{k % 97},i{k % 13},1")
        if bad_at is not None and k == bad_at:
            lines.append(f"u{k},i,notanumber")
    path.write_text("\n".join(lines) + "\n")


def test_quoted_newlines_parse_the_same_at_every_block_size(tmp_path):
    _quoted_log(tmp_path / "q.csv")
    stores = []
    for k, (budget, block) in enumerate(zip(_budgets(), (61, 1000, 1 << 20))):
        _convert_with_blocks(tmp_path / "q.csv", str(tmp_path / f"q{k}.zarr"), budget, block)
        stores.append(_store_bytes(tmp_path / f"q{k}.zarr"))
    assert stores[0] == stores[1] == stores[2]
    store = open_store(tmp_path / "q0.zarr")
    assert store.attrs()["rows_read"] == 3000
    assert "item\n4, with \"quotes\"" in store.ids("item").tolist()


@pytest.mark.parametrize("block", [53, 4096, 1 << 20])
def test_errors_name_the_real_line_after_quoted_newlines(tmp_path, block):
    _quoted_log(tmp_path / "q.csv", n=400, bad_at=250)
    # header: line 1; rows 0..250: 251 rows, of which 63 (k % 4 == 0) take two lines
    line = 1 + 251 + 63 + 1
    with pytest.raises(InputError) as caught:
        _convert_with_blocks(tmp_path / "q.csv", str(tmp_path / "e.zarr"), None, block)
    assert str(caught.value) == f"{tmp_path / 'q.csv'}:{line}: field 'value': non-numeric value: 'notanumber'"
    report = _convert_with_blocks(tmp_path / "q.csv", str(tmp_path / "s.zarr"), None, block, on_bad_lines="skip")
    assert report.rows_read == 400 and report.bad_rows.skipped == 1
    assert report.bad_rows.examples == [f"{tmp_path / 'q.csv'}:{line}: field 'value': non-numeric value: 'notanumber'"]


def test_a_malformed_row_after_quoted_newlines_names_its_line(tmp_path):
    (tmp_path / "m.csv").write_text('user,item,value\nu1,"a\nb\nc",1\nu2,x\nu3,y,1\n')
    with pytest.raises(InputError, match=r"m.csv:5: malformed row: expected 3 fields, got 2: 'u2,x'"):
        wals_ooc.convert(str(tmp_path / "m.csv"), str(tmp_path / "m.zarr"), progress=False)


def test_an_unclosed_quote_is_an_error_not_a_whole_file_in_memory(tmp_path, monkeypatch):
    from wals_ooc.store import sources

    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 4096)
    (tmp_path / "u.csv").write_text('user,item,value\nu1,"never closed,1\n' + "u2,i2,1\n" * 2000)
    with pytest.raises(InputError, match=r"u.csv:2: no record ends within \d+ bytes from this line: a quoted field that is never closed\?"):
        _convert_with_blocks(tmp_path / "u.csv", str(tmp_path / "u.zarr"), None, 512)


# ---------------------------------------------------------------------------------------------
# values, settings, BOM, Parquet, header: each bad case with its error
# ---------------------------------------------------------------------------------------------


def test_values_beyond_float32_are_errors_without_numpy_warnings(tmp_path):
    (tmp_path / "big.csv").write_text("user,item,value\n1,2,3\n1,3,1e39\n")
    (tmp_path / "sum.csv").write_text("user,item,value\nu1,i1,3e38\nu2,i1,1\nu1,i1,3e38\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning may leak
        with pytest.raises(InputError) as caught:
            wals_ooc.convert(str(tmp_path / "big.csv"), str(tmp_path / "a.zarr"), progress=False)
        assert str(caught.value) == f"{tmp_path / 'big.csv'}:3: field 'value': value is beyond float32's range (3.403e+38): '1e39'"
        with pytest.raises(InputError) as caught:
            wals_ooc.convert(str(tmp_path / "sum.csv"), str(tmp_path / "b.zarr"), progress=False)
        assert str(caught.value) == (f"{tmp_path / 'sum.csv'}: the values of user 'u1' and item 'i1' sum to more than "
                                     "float32 holds (3.403e+38); scale the values down")
        report = wals_ooc.convert(str(tmp_path / "big.csv"), str(tmp_path / "c.zarr"), on_bad_lines="skip", progress=False)
        assert report.nnz == 1 and report.bad_rows.skipped == 1


@pytest.mark.parametrize("setting, message", [
    (dict(regularization=float("nan")), "regularization must be finite, got nan"),
    (dict(nu=float("nan")), "nu must be finite, got nan"),
    (dict(alpha=float("inf")), "alpha must be finite, got inf"),
    (dict(alpha0=float("-inf")), "alpha0 must be finite, got -inf"),
    (dict(eps=float("nan")), "eps must be finite, got nan"),
    (dict(init_scale=float("inf")), "init_scale must be finite, got inf"),
    (dict(iterations=0), "iterations must be >= 1, got 0"),
    (dict(factors=0), "factors must be >= 1, got 0"),
    (dict(factors=2.5), "factors must be an integer, got 2.5"),
    (dict(alpha="2"), "alpha must be a number, got '2'"),
    (dict(half_gathers="no"), "half_gathers must be True or False, got 'no'"),
    (dict(cg_preconditioner="ilu"), "cg_preconditioner must be one of ['jacobi', 'none'], got 'ilu'"),
])
def test_settings_that_are_not_finite_or_out_of_range_are_refused(setting, message):
    with pytest.raises(SettingError) as caught:
        WALS(**setting)
    assert str(caught.value) == message


def test_serving_and_split_arguments_are_checked(small_store, tmp_path):
    model = WALS(factors=2, iterations=1, random_state=0).fit(small_store, str(tmp_path / "m.zarr"), progress=False)
    some_user = model.interactions.ids("user", 0, 1)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(SettingError, match=f"N must be an integer >= 1, got {bad!r}"):
            model.recommend(some_user, N=bad)
    with pytest.raises(SettingError, match="N must be an integer >= 1, got 0"):
        model.similar_items(model.interactions.ids("item", 0, 1), N=0)
    with pytest.raises(SettingError, match="k must be an integer >= 1, got 0"):
        model.evaluate(small_store, k=0)
    with pytest.raises(SettingError, match=r"user_fraction must be in \(0, 1\], got nan"):
        model.evaluate(small_store, user_fraction=float("nan"))
    with pytest.raises(SettingError, match=r"test_fraction must be in \(0, 1\), got nan"):
        wals_ooc.split(small_store, tmp_path / "a.zarr", tmp_path / "b.zarr", test_fraction=float("nan"))
    with pytest.raises(UnknownIdError, match="unknown item id"):
        model.recalculate_user({"no such item": 1.0})


def test_a_leading_bom_is_stripped(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffuser,item,value\nu1,i1,3\n".encode())
    wals_ooc.convert(str(tmp_path / "bom.csv"), str(tmp_path / "s.zarr"), user_col="user", item_col="item",
                     value_col="value", progress=False)
    assert _entries(open_store(tmp_path / "s.zarr")) == {("u1", "i1"): 3.0}


def test_parquet_id_columns_must_be_integers_or_strings(tmp_path):
    def table(users, name):
        pq.write_table(pa.table({"user": users, "item": ["a", "b"], "value": [1.0, 2.0]}), tmp_path / name)
        return str(tmp_path / name)

    with pytest.raises(InputError) as caught:
        wals_ooc.convert(table([1.5, 2.0], "f.parquet"), str(tmp_path / "f.zarr"), progress=False)
    assert str(caught.value) == (f"{tmp_path / 'f.parquet'}:1: field 'user': id 1.5 in a float column is not an "
                                 "integer: ids must be integers or strings")
    with pytest.raises(InputError) as caught:
        wals_ooc.convert(table([True, False], "b.parquet"), str(tmp_path / "b.zarr"), progress=False)
    assert str(caught.value) == (f"{tmp_path / 'b.parquet'}: field 'user': id column of type bool: ids must be "
                                 "integers or strings (a float column is read as integers when every value is integral)")
    wals_ooc.convert(table([1.0, 2.0], "i.parquet"), str(tmp_path / "i.zarr"), progress=False)
    store = open_store(tmp_path / "i.zarr")
    assert store.id_kinds == {"user": "int", "item": "str"} and _entries(store) == {(1, "a"): 1.0, (2, "b"): 2.0}
    # an integer column and a CSV of text ids: one side of text, integers written as their text
    (tmp_path / "t.csv").write_text("user,item,value\nx7,a,1\n")
    wals_ooc.convert([table([7, 8], "n.parquet"), str(tmp_path / "t.csv")], str(tmp_path / "m.zarr"), progress=False)
    assert _entries(open_store(tmp_path / "m.zarr")) == {("7", "a"): 1.0, ("8", "b"): 2.0, ("x7", "a"): 1.0}


def test_a_headerless_file_read_with_a_header_is_flagged(tmp_path, caplog):
    (tmp_path / "nohead.csv").write_text("5,7,2\n5,8,1\n6,7,1\n")
    with caplog.at_level(logging.WARNING, logger="wals_ooc"):
        report = wals_ooc.convert(str(tmp_path / "nohead.csv"), str(tmp_path / "a.zarr"), progress=False)
    assert report.rows_read == 2
    assert (f"{tmp_path / 'nohead.csv'}: the header line ['5', '7', '2'] looks like data but is read as column names "
            "(its row is not converted): if the file has no header, pass header=False (--no-header)") in caplog.messages
    with pytest.raises(InputError) as caught:
        wals_ooc.convert(str(tmp_path / "nohead.csv"), str(tmp_path / "b.zarr"), user_col="user", item_col="item",
                         value_col="plays", progress=False)
    assert str(caught.value) == (f"{tmp_path / 'nohead.csv'}:1: field 'user': unknown user column; the header has "
                                 "['5', '7', '2']; the first line looks like data, not a header: if the file has no "
                                 "header, pass header=False (--no-header) and name the columns by position")
    assert wals_ooc.convert(str(tmp_path / "nohead.csv"), str(tmp_path / "c.zarr"), header=False, progress=False).rows_read == 3


def test_the_command_line_reads_default_columns_by_position_even_under_a_numeric_header(tmp_path, capsys, caplog):
    from wals_ooc.cli import main

    (tmp_path / "nohead.csv").write_text("1,10,2\n2,20,1\n3,30,2\n")  # header '1' must not be column "1"
    with caplog.at_level(logging.WARNING, logger="wals_ooc"):
        assert main(["convert", str(tmp_path / "nohead.csv"), str(tmp_path / "a.zarr"), "-q"]) == 0
    assert any("looks like data but is read as column names" in m and "--no-header" in m for m in caplog.messages)
    capsys.readouterr()
    assert _entries(open_store(tmp_path / "a.zarr")) == {(2, 20): 1.0, (3, 30): 2.0}
    (tmp_path / "dup.csv").write_text("1,10,1\n2,20,1\n")
    assert main(["convert", str(tmp_path / "dup.csv"), str(tmp_path / "b.zarr"), "-q"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"wals-ooc convert: error: {tmp_path / 'dup.csv'}:1: duplicate column names in header ['1', '10', '1']; the "
        "first line looks like data, not a header: if the file has no header, pass header=False (--no-header) and "
        "name the columns by position")


def test_a_one_field_header_with_a_tab_suggests_the_delimiter(tmp_path):
    (tmp_path / "tab.csv").write_text("user\titem\tvalue\n5\t7\t2\n")
    with pytest.raises(InputError) as caught:
        wals_ooc.convert(str(tmp_path / "tab.csv"), str(tmp_path / "a.zarr"), user_col="user", item_col="item", progress=False)
    assert str(caught.value) == (f"{tmp_path / 'tab.csv'}:1: field 'user': unknown user column; the header has "
                                 "['user\\titem\\tvalue']; the header is one field 'user\\titem\\tvalue', with tabs in "
                                 "it: pass delimiter='\\t' (--delimiter '\\t')")
    (tmp_path / "semi.csv").write_text("user;item;value\n5;7;2\n")
    with pytest.raises(InputError, match=r"with ';' in it: pass delimiter=';' \(--delimiter ';'\)"):
        wals_ooc.convert(str(tmp_path / "semi.csv"), str(tmp_path / "b.zarr"), progress=False)
