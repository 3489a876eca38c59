"""Display names: names files read out of core, stored beside the id maps, served by name."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

import wals_ooc
from wals_ooc.cli import main
from wals_ooc.errors import InputError, UnknownIdError
from wals_ooc.store.names import AmbiguousNameError, add_names

PLAYS = "user,artist,plays\n" + "".join(
    f"u{u},{a},{1 + (u * 7 + a) % 5}\n" for u in range(12) for a in range(10) if (u + a) % 3 != 0 or a == 9
) + "u99,1,1\nu99,2,1\nu99,3,1\nu99,4,1\nu99,5,1\nu99,6,1\nu99,7,1\nu99,8,1\nu99,0,1\n"
# tab-separated like Last.fm's artists.dat: a quote inside a name, non-ASCII, an id not in the store
ARTISTS = ("id\tname\turl\n0\tJay-Z\thttp://a\n1\t\"Weird Al\" Yankovic\thttp://b\n2\tBjörk\thttp://c\n"
           "3\tjay-z\thttp://d\n4\tNas\thttp://e\n5\tDrake\thttp://f\n6\tTwin\thttp://g\n7\tTWIN\thttp://h\n"
           "8\ttwin\thttp://i\n9\tLast\thttp://j\n1000\tNot played\thttp://k\n")


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    plays, artists = root / "plays.csv", root / "artists.dat"
    plays.write_text(PLAYS)
    artists.write_text(ARTISTS)
    store = str(root / "plays.zarr")
    report = wals_ooc.convert(str(plays), store, item_names=str(artists), progress=False)
    model = wals_ooc.WALS(factors=4, iterations=2, random_state=0).fit(store, progress=False)
    return root, store, report, model


def test_names_round_trip_and_lookup_by_name(named):
    root, store_path, report, _ = named
    summary = report.names[0]
    assert (summary.named, summary.rows, summary.unknown, summary.unknown_examples) == (10, 10, 1, ["1000"])
    assert "1 names for ids not in the store ignored" in report.summary()
    store = wals_ooc.open_store(store_path)
    rows = store.index_of("item", [1, 2, 9])
    assert store.names_of("item", rows).tolist() == ['"Weird Al" Yankovic', "Björk", "Last"]
    assert store.names_of("item", np.array([[-1, rows[0]]])).tolist() == [[None, '"Weird Al" Yankovic']]
    assert store.names_of("user", [0]) is None
    # exact first (two names differ only by case), then ignoring case
    assert store.ids_of("item", [store.row_of_name("item", "Jay-Z"), store.row_of_name("item", "jay-z")]).tolist() == [0, 3]
    assert store.ids_of("item", [store.row_of_name("item", "nas"), store.row_of_name("item", "BJÖRK")]).tolist() == [4, 2]
    assert store.ids_of("item", [store.row_of_name("item", "TWIN")]).tolist() == [7]
    with pytest.raises(AmbiguousNameError, match=r"item name 'tWiN' matches 3 items \(case-insensitive\): 6 \('Twin'\)"):
        store.row_of_name("item", "tWiN")
    with pytest.raises(UnknownIdError, match="unknown item name 'Jay'"):
        store.row_of_name("item", "Jay")


def test_model_serves_names_and_looks_items_up_by_name(named, capsys):
    root, store_path, _, model = named
    ids, scores, names = model.similar_items([0], N=3, names=True)
    assert names[0, 0] == "Jay-Z" and names.tolist()[0] == model.names_of(ids[0]).tolist()
    assert model.id_of_name("DRAKE") == 5
    user = "u99"  # liked 9 of the 10 items: one candidate left
    ids, scores, names = model.recommend(user, N=5, names=True)
    assert ids.tolist() == [9] and names.tolist() == ["Last"] and np.isfinite(scores).all()
    ids, scores, names = model.recommend([user, "u1"], N=5, names=True)  # a batch: masked, never padded
    width = ids.shape[1]  # the most results any user has (u1: all its candidates), not N
    assert isinstance(ids, np.ma.MaskedArray) and width == len(model.recommend("u1", N=5)[0]) > 1
    assert ids[0].compressed().tolist() == [9] and ids.mask[0].tolist() == [False] + [True] * (width - 1)
    assert not ids.mask[1].any() and np.isfinite(scores[1]).all() and names[0].compressed().tolist() == ["Last"]
    assert main(["similar", model.factors_store.location, "--item-name", "jay-z", "-n", "2", "-q"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["item"] == 3 and line["name"] == "jay-z" and all("name" in s for s in line["similar"])
    assert main(["similar", model.factors_store.location, "--item-name", "tWiN"]) == 2
    assert "matches 3 items" in capsys.readouterr().err
    assert main(["recommend", model.factors_store.location, "--users", user, "-n", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == {"user": "u99", "items": [{"item": 9, "score": pytest.approx(
        float(model.recommend(user, N=1)[1][0]), abs=1e-5), "name": "Last"}]}
    assert main(["info", store_path]) == 0
    out = capsys.readouterr().out
    assert "item names  10 of 10 items named" in out and "'" in out.split("top items")[1]


def test_recommend_all_and_export_carry_names(named):
    root, _, _, model = named
    out = model.recommend_all(N=3, output=str(root / "top"), format="parquet")
    table = pq.read_table(out).to_pandas()
    assert "name" in table and (table["item"] != "").all() and np.isfinite(table["score"]).all()
    assert "user_name" not in table  # no user names in the store: no column
    assert len(table[table["user"] == "u99"]) == 1  # one candidate left: one row, no padding
    names = dict(zip(table["item"], table["name"]))
    assert names[9] == "Last" and names[2] == "Björk"
    from wals_ooc.serve.recommend import open_recommendations

    group = open_recommendations(model.recommend_all(N=3, output=str(root / "top.zarr")))  # ragged, no padding
    indptr, users = group["indptr"][:], group["user_ids"][:].tolist()
    k = users.index("u99")
    assert indptr[k + 1] - indptr[k] == 1 and group["item_ids"][indptr[k]:indptr[k + 1]].tolist() == [9]
    assert np.isfinite(group["scores"][:]).all() and len(group["item_names"][:]) == indptr[-1] == len(table)
    assert set(group.keys()) == {"user_ids", "indptr", "item_ids", "scores", "item_names"}
    out = model.export(str(root / "factors"))
    items = pq.read_table(os.path.join(out, "items.parquet")).to_pandas()
    assert dict(zip(items["id"], items["name"]))[1] == '"Weird Al" Yankovic'


def test_recommend_all_carries_user_names(named, tmp_path):
    """User names beside user ids in both formats ("" / null for a user without one), read from the
    model's copy of the id maps or, when it has none, from its interaction store."""
    import pyarrow.parquet as pq

    from wals_ooc.serve.recommend import open_recommendations

    root = named[0]
    (tmp_path / "users.csv").write_text("id,name\n" + "".join(f"u{u},Ü {u}\n" for u in range(0, 12, 2)) + "u99,Nine\n")
    store = str(tmp_path / "s.zarr")
    wals_ooc.convert(str(root / "plays.csv"), store, progress=False)
    model = wals_ooc.WALS(factors=3, iterations=1, random_state=0).fit(store, progress=False)
    for names_in in ("store", "model"):
        if names_in == "store":  # added after training: the model's copy has none, its store has
            add_names(store, users=str(tmp_path / "users.csv"))
        else:
            model = wals_ooc.WALS(factors=3, iterations=1, random_state=0).fit(store, str(tmp_path / "m2.zarr"),
                                                                               progress=False)
        expected = {f"u{u}": (f"Ü {u}" if u % 2 == 0 else None) for u in range(12)} | {"u99": "Nine"}
        group = open_recommendations(model.recommend_all(N=2, output=str(tmp_path / f"{names_in}.zarr")))
        assert dict(zip(group["user_ids"][:].tolist(), group["user_names"][:].tolist())) == \
            {user: name or "" for user, name in expected.items()}
        table = pq.read_table(model.recommend_all(N=2, output=str(tmp_path / names_in), format="parquet"))
        assert table.column_names == ["user", "rank", "item", "score", "user_name"]  # null: no name
        assert dict(zip(table["user"].to_pylist(), table["user_name"].to_pylist())) == expected
    from wals_ooc.report.collect import user_part
    from wals_ooc.report.page import users_section

    shown = user_part(model, wals_ooc.open_store(store), None, wals_ooc.open_store(store).index_of("user", ["u99", "u1"]), 2)
    assert [(u["user"], u["name"]) for u in shown] == [("u99", "Nine"), ("u1", None)]
    assert "<h3>user Nine <span class='note'>(u99)</span>" in users_section(shown, False)


def test_add_names_replaces_atomically_and_bad_files_change_nothing(named, tmp_path):
    root, store_path, _, model = named
    store = str(tmp_path / "copy.zarr")
    wals_ooc.convert(str(root / "plays.csv"), store, progress=False)
    before = wals_ooc.WALS(factors=4, iterations=1, random_state=0).fit(store, progress=False)
    assert before.names_of([2]).tolist() == [None]
    users = tmp_path / "users.csv"
    users.write_text("id,name\nu1,Ann\nu2,Bob\n")  # comma-separated, quotes allowed: sniffed
    summaries = add_names(store, items=str(root / "artists.dat"), users=str(users), id_col="id", name_col="name")
    assert [s.named for s in summaries] == [10, 2]
    # the model trained before names were added serves them from the store it is bound to
    assert wals_ooc.load(before.factors_store.location).names_of([2]).tolist() == ["Björk"]
    listing = sorted(os.listdir(os.path.join(store, "item_ids")))
    bad = {
        "dup.tsv": ("id\tname\n1\tA\n2\tB\n1\tC\n", r"dup.tsv:4: field 'id': duplicate id 1 \(also on line 2\)"),
        "dup_unknown.tsv": ("id\tname\n77\tA\n2\tB\n77\tC\n", r"dup_unknown.tsv:4: field 'id': duplicate id '77'"),
        "empty.tsv": ("id\tname\n1\tA\n2\t\n", r"empty.tsv:3: field 'name': empty name"),
        "short.tsv": ("id\tname\n1\tA\n2\n", r"short.tsv:3: malformed row: expected 2 fields, got 1"),
        "latin.tsv": ("id\tname\n1\tBj\xf6rk\n".encode("latin-1"), r"latin.tsv:2: not utf-8 text"),
    }
    for name, (text, message) in bad.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(InputError, match=message):
            add_names(store, items=str(path))
    assert sorted(os.listdir(os.path.join(store, "item_ids"))) == listing  # nothing left behind
    assert wals_ooc.open_store(store).names_of("item", wals_ooc.open_store(store).index_of("item", [2])).tolist() == ["Björk"]
    add_names(store, items=str(tmp_path / "latin.tsv"), encoding="latin-1")  # the encoding, stated
    opened = wals_ooc.open_store(store)
    assert opened.names_of("item", opened.index_of("item", [1, 2])).tolist() == ["Björk", None]
    assert len(os.listdir(os.path.join(store, "item_ids"))) == len(listing)  # the old names were removed
    # quoted names may hold the delimiter and newlines; lines stay right after them
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('id,name\n1,"Crosby, Stills\nand Nash"\n2,Plain\n3,\n')
    with pytest.raises(InputError, match=r"quoted.csv:5: field 'name': empty name"):
        add_names(store, items=str(quoted))
    quoted.write_text('id,name\n1,"Crosby, Stills\nand Nash"\n2,Plain\n')
    add_names(before.factors_store.location, items=str(quoted))  # a model: its own copy of the ids
    assert wals_ooc.load(before.factors_store.location).names_of([1, 2, 3]).tolist() == ["Crosby, Stills\nand Nash",
                                                                                          "Plain", None]


def test_names_on_real_lastfm(tmp_path):
    data = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hetrec2011-lastfm-2k")
    if not os.path.exists(os.path.join(data, "artists.dat")):
        pytest.skip("Last.fm HetRec data not present")
    store = str(tmp_path / "lfm.zarr")
    report = wals_ooc.convert(os.path.join(data, "user_artists.dat"), store, delimiter="\t",
                              item_names=os.path.join(data, "artists.dat"), progress=False)
    assert report.names[0].named == report.n_items == 17632
    opened = wals_ooc.open_store(store)
    assert opened.ids_of("item", [opened.row_of_name("item", "jay-z")]).tolist() == [1613]


def test_report_shows_names_beside_ids(named):
    pytest.importorskip("matplotlib")
    from wals_ooc.report import collect_report

    root, store_path, _, model = named
    data = collect_report(model, None, k_max=5, sample_users=10, show_users=2)
    expected = dict(zip(range(10), ["Jay-Z", '"Weird Al" Yankovic', "Björk", "jay-z", "Nas", "Drake", "Twin", "TWIN",
                                    "twin", "Last"]))
    shown = [entry for user in data.users for entry in user["history"] + user["recommendations"]]
    assert shown and all(entry["name"] == expected[int(entry["item"])] for entry in shown)
    page = model.report(str(root / "report.html"), sample_users=10, show_users=2)
    text = open(page, encoding="utf-8").read()
    import html

    users_panel = text[text.index('id="users"'):]
    again = collect_report(model, None, k_max=5, sample_users=10, show_users=2).users  # the page's own sample
    for entry in [e for user in again for e in user["history"] + user["recommendations"]]:
        assert f"{html.escape(entry['name'])} <span class='note'>({entry['item']})</span>" in users_panel
