"""Approximate retrieval (faiss index over factors) against the exact answers on small data:
recall, exact filtering of liked items, exact scores, reload, stale indexes refused, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import wals_ooc
from wals_ooc import WALS
from wals_ooc.cli import main as cli_main
from wals_ooc.errors import DataMismatchError, PathError, SettingError
from wals_ooc.index import AnnIndex, approximate_top_k, forget_indexes, retrieve

from .conftest import store_to_scipy

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory):
    location = str(tmp_path_factory.mktemp("ann") / "model.zarr")
    model = WALS(factors=8, iterations=3, regularization=0.05, random_state=3, threads=2)
    return model.fit(small_store, location, progress=False)


def _recall(exact_ids, approx_ids) -> float:
    return float(np.mean([len(set(a[a != -1]) & set(b[b != -1])) / max(1, (a != -1).sum())
                          for a, b in zip(exact_ids, approx_ids)]))


def test_recommend_from_an_index_filters_exactly_scores_exactly_and_recalls(trained):
    forget_indexes()
    built = trained.build_index(side="item", ef_search=64)
    assert built.side == "item" and built.metric == "inner_product"
    store = trained.interactions
    users, items = trained.to_numpy()
    liked = store_to_scipy(store)
    user_ids = store.ids("user")
    exact_ids, _ = trained.recommend(user_ids, N=10)
    approx_ids, approx_scores = trained.recommend(user_ids, N=10, index=True)
    assert _recall(exact_ids, approx_ids) >= 0.95
    rows = store.index_of("item", approx_ids.ravel()).reshape(approx_ids.shape)
    for u in range(store.n_users):
        mine = set(liked.indices[liked.indptr[u]: liked.indptr[u + 1]])
        assert not mine & set(rows[u]), u  # never a liked item
        assert len(set(rows[u])) == 10  # full and without repeats
        np.testing.assert_allclose(approx_scores[u], items[rows[u]] @ users[u], rtol=1e-5, atol=1e-6)
        assert np.all(np.diff(approx_scores[u]) <= 0)


def test_queries_the_fetch_cannot_fill_are_answered_exactly(trained, tmp_path):
    # max_fetch 8: a user fetches only N=10 candidates, so one whose candidates include liked
    # items is left short and must be answered by the exact scan
    location = str(tmp_path / "small-fetch.ann")
    ann = trained.build_index(location=location, max_fetch=8, ef_search=16)
    users, items = trained.to_numpy()
    liked = store_to_scipy(trained.interactions)
    exclude = (liked.indptr.astype(np.int64), liked.indices.astype(np.int64))
    asked = []

    def exact(positions):
        asked.extend(positions.tolist())
        scores = users[positions] @ items.T
        for k, u in enumerate(positions):
            scores[k, liked.indices[liked.indptr[u]: liked.indptr[u + 1]]] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        return order.astype(np.int64), np.take_along_axis(scores, order, 1).astype(np.float32)

    ids, scores, n_exact = approximate_top_k(ann, users.astype(np.float32), 10, exclude, exact)
    assert 0 < n_exact == len(asked) < len(users)
    fallen = list(asked)
    reference = exact(np.arange(len(users)))
    np.testing.assert_array_equal(ids[fallen], reference[0][fallen])
    for u in range(len(users)):
        assert len(set(ids[u])) == 10 and -1 not in ids[u]
        assert not set(ids[u]) & set(liked.indices[liked.indptr[u]: liked.indptr[u + 1]])
    np.testing.assert_allclose(scores, np.take_along_axis(users @ items.T, ids, 1), rtol=1e-5, atol=1e-6)


def test_heavy_users_are_searched_again_and_answers_equal_exact_when_the_index_is_exhaustive(trained, tmp_path,
                                                                                           monkeypatch):
    # an IVF index probing every cell finds the true top candidates, so the two-round fetch
    # (N + min(liked, N) first here, N + liked for the users that came up short) must give
    # exactly the brute-force answer, and faiss's distances must be the stored vectors' exact products
    monkeypatch.setattr(retrieve, "FIRST_ROUND_EXTRA", 1)
    ann = trained.build_index(location=str(tmp_path / "full.ann"), kind="ivf", nlist=4, nprobe=4)
    users, items = trained.to_numpy()
    queries = users.astype(np.float32)
    liked = store_to_scipy(trained.interactions)
    exclude = (liked.indptr.astype(np.int64), liked.indices.astype(np.int64))
    stats: dict = {}
    ids, scores, n_exact = approximate_top_k(ann, queries, 10, exclude, stats=stats)
    assert n_exact == 0 and stats["first_round"] == len(users) and 0 < stats["second_round"] < len(users)
    brute = queries @ items.astype(np.float32).T
    for u in range(len(users)):
        brute[u, liked.indices[liked.indptr[u]: liked.indptr[u + 1]]] = -np.inf
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected, 1), rtol=1e-5, atol=1e-6)
    same = (ids == expected) | np.isclose(np.take_along_axis(brute, ids, 1), scores, rtol=1e-6)
    assert same.all()
    candidates, found = ann.search(queries[:50], 16)
    np.testing.assert_allclose(found, ann.rescore(queries[:50], candidates), rtol=1e-6, atol=1e-7)


def test_similar_from_cosine_indexes_equals_exact_when_searched_fully(trained):
    n_items = trained.interactions.n_items
    trained.build_index(side="item", metric="cosine", kind="ivf", nlist=4, nprobe=4)  # every cell: exhaustive
    item_ids = trained.interactions.ids("item")[::11]
    for filter_self in (False, True):
        exact_ids, exact_scores = trained.similar_items(item_ids, N=6, filter_self=filter_self)
        approx_ids, approx_scores = trained.similar_items(item_ids, N=6, filter_self=filter_self, index=True)
        np.testing.assert_allclose(approx_scores, exact_scores, rtol=1e-5, atol=1e-6)
        assert _recall(exact_ids, approx_ids) > 0.99
        if filter_self:
            assert not (approx_ids == item_ids[:, None]).any()
    assert n_items > 6
    trained.build_index(side="user")  # cosine by default for users, hnsw
    user_ids = trained.interactions.ids("user")[::13]
    exact_ids, _ = trained.similar_users(user_ids, N=5)
    approx_ids, approx_scores = trained.similar_users(user_ids, N=5, index=True)
    assert _recall(exact_ids, approx_ids) >= 0.95
    np.testing.assert_allclose(approx_scores[:, 0], 1.0, rtol=1e-5)  # itself first


def test_recommend_all_from_the_index_equals_per_user_answers(trained, tmp_path):
    trained.build_index(side="item", overwrite=True)
    out = trained.recommend_all(N=5, output=str(tmp_path / "top.parquet"), format="parquet", index=True)
    table = pq.read_table(out).to_pandas().sort_values(["user", "rank"])
    user_ids = trained.interactions.ids("user")
    expected_ids, expected_scores = trained.recommend(user_ids, N=5, index=True)
    got = table.groupby("user")["item"].apply(list).to_dict()
    for user, ids in zip(user_ids, expected_ids):
        assert got[user] == ids.tolist()
    np.testing.assert_allclose(table.groupby("user")["score"].apply(list).loc[list(user_ids)].explode().to_numpy(float),
                               expected_scores.ravel(), rtol=1e-6)


def test_saved_index_reloads_and_a_stale_or_mismatched_one_is_refused(small_store, tmp_path):
    location = str(tmp_path / "m.zarr")
    model = WALS(factors=6, iterations=2, random_state=5).fit(small_store, location, progress=False)
    built = model.build_index()
    user_ids = model.interactions.ids("user")[:20]
    first = model.recommend(user_ids, N=5, index=built)
    forget_indexes()
    reloaded = wals_ooc.load(location)
    again = reloaded.recommend(user_ids, N=5, index=True)
    np.testing.assert_array_equal(first[0], again[0])
    opened = AnnIndex.open(built.location, model=reloaded.factors_store)
    assert opened.n_rows == model.interactions.n_items and opened.meta["binding"]["step"] == built.meta["binding"]["step"]
    with pytest.raises(PathError, match="overwrite"):
        model.build_index()
    with pytest.raises(SettingError, match="cosine"):
        model.similar_items([model.interactions.ids("item")[0]], index=built.location)
    WALS(factors=6, iterations=3, random_state=5).fit(small_store, location, progress=False)  # trains further
    retrained = wals_ooc.load(location)
    with pytest.raises(DataMismatchError, match="rebuild"):
        retrained.recommend(user_ids, N=5, index=True)
    assert retrained.recommend(user_ids, N=5)[0].shape == (20, 5)  # exact still serves
    # trained again from scratch with the same settings: the same step, but another model (its id)
    rebuilt = retrained.build_index(overwrite=True)
    WALS(factors=6, iterations=3, random_state=5).fit(small_store, location, progress=False, resume=False)
    with pytest.raises(DataMismatchError, match="model_id"):
        AnnIndex.open(rebuilt.location, model=wals_ooc.load(location).factors_store)


def test_index_command_and_approximate_recommend_from_the_command_line(trained, tmp_path, capsys):
    model = trained.factors_store.location
    location = str(tmp_path / "cli.ann")
    assert cli_main(["index", model, "--output", location, "--hnsw-m", "16"]) == 0
    assert "built" in capsys.readouterr().out
    user = str(trained.interactions.ids("user")[3])
    assert cli_main(["recommend", model, "--users", user, "-n", "4", "--index", location, "--ef-search", "32"]) == 0
    answer = json.loads(capsys.readouterr().out.splitlines()[0])
    exact, _ = trained.recommend([int(user)], N=4)
    assert len(answer["items"]) == 4 and _recall(exact, np.array([[i["item"] for i in answer["items"]]])) >= 0.75
    assert cli_main(["recommend", model, "--users", user, "--index", location, "--ef-search", "0"]) == 2
    assert "ef_search must be a positive integer" in capsys.readouterr().err
    assert cli_main(["recommend", model, "--users", user, "--index", str(tmp_path / "none.ann")]) == 2
    assert "no index at" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_mips_as_l2_filters_exactly_scores_exactly_recalls_and_reloads(trained, tmp_path, kind):
    # the MIPS-to-L2 reduction: rows [x, sqrt(M^2 - |x|^2)], queries [q, 0]; an IVF index
    # probing every cell is exhaustive, so its answers are the exact ones
    forget_indexes()
    location = str(tmp_path / f"l2-{kind}.ann")
    built = trained.build_index(location=location, kind=kind, mips="l2", ef_search=64, nlist=4, nprobe=4)
    assert built.l2 and built.meta["format_version"] == 3 and built.index.d == built.factors + 1
    users, items = trained.to_numpy()
    assert built.meta["max_norm"] == pytest.approx(float(np.linalg.norm(items, axis=1).max()), rel=1e-5)
    assert "as L2" in built.describe()
    store = trained.interactions
    liked = store_to_scipy(store)
    user_ids = store.ids("user")
    exact_ids, exact_scores = trained.recommend(user_ids, N=10)
    approx_ids, approx_scores = trained.recommend(user_ids, N=10, index=location)
    assert _recall(exact_ids, approx_ids) >= (0.999 if kind == "ivf" else 0.9)
    if kind == "ivf":
        np.testing.assert_allclose(approx_scores, exact_scores, rtol=1e-5, atol=1e-6)
    rows = store.index_of("item", approx_ids.ravel()).reshape(approx_ids.shape)
    for u in range(store.n_users):
        assert not set(liked.indices[liked.indptr[u]: liked.indptr[u + 1]]) & set(rows[u]), u
        assert len(set(rows[u])) == 10
        np.testing.assert_allclose(approx_scores[u], items[rows[u]] @ users[u], rtol=1e-5, atol=1e-6)
    forget_indexes()
    reopened = AnnIndex.open(location, model=trained.factors_store)
    assert reopened.l2 and reopened.settings.mips == "l2"
    np.testing.assert_array_equal(trained.recommend(user_ids[:30], N=10, index=reopened)[0], approx_ids[:30])


def test_mips_setting_is_checked(trained, tmp_path):
    with pytest.raises(SettingError, match="mips"):
        trained.build_index(location=str(tmp_path / "bad.ann"), mips="euclid")
    assert cli_main(["index", trained.factors_store.location, "--output", str(tmp_path / "c.ann"), "--mips", "l2",
                     "--hnsw-m", "8"]) == 0
    assert AnnIndex.open(str(tmp_path / "c.ann")).l2


def test_cosine_queries_come_from_the_index_and_candidates_are_rescored_as_the_exact_scan_scores(trained, tmp_path):
    from wals_ooc.kernels.topk import candidate_scores
    from wals_ooc.serve.scoring import FactorSource

    forget_indexes()
    array = trained.factors_store.current("item")
    n_items = int(array.shape[0])
    hnsw = trained.build_index(side="item", metric="cosine", location=str(tmp_path / "cos-hnsw.ann"), hnsw_m=8,
                               ef_construction=32, ef_search=16)
    ivf = trained.build_index(side="item", metric="cosine", location=str(tmp_path / "cos-ivf.ann"), kind="ivf",
                              nlist=4, nprobe=4, candidates=0)
    # the index stores each row exactly as the exact scan normalizes it (one kernel, to the last bit)
    rows = np.arange(0, n_items, 3)
    exact_rows = FactorSource(array, 64, normalized=True).rows(rows)
    assert np.array_equal(hnsw.vectors(rows), exact_rows) and np.array_equal(ivf.vectors(rows), exact_rows)
    # re-scoring: HNSW reads its flat storage in place, IVF gathers by id; the same kernel, the same bits
    queries = exact_rows[:20]
    ids = np.tile(np.arange(12, dtype=np.int64), (20, 1))
    ids[3, 5] = -1
    via_hnsw, via_ivf = hnsw.rescore(queries, ids, stored=True), ivf.rescore(queries, ids, stored=True)
    assert np.array_equal(via_hnsw, via_ivf) and via_hnsw[3, 5] == -np.inf
    first_rows = FactorSource(array, 64, normalized=True).rows(np.arange(12))
    reference = queries.astype(np.float64) @ first_rows.astype(np.float64).T
    reference[3, 5] = -np.inf
    np.testing.assert_allclose(via_hnsw, reference, rtol=1e-5, atol=1e-6)
    out = np.empty((1, 2), np.float32)
    candidate_scores(np.ones((1, 3), np.float32), np.array([[1, 2, 3], [0.5, 0, 0]], np.float32),
                     np.array([[1, 0]], np.int64), out)
    assert out.tolist() == [[0.5, 6.0]]
    # settings: cosine re-scores 64 candidates by default, candidates=0 none; saved beside the
    # settings (format-2 readers take no such setting) and reloaded
    assert hnsw.candidates == 64 and ivf.candidates == 0
    meta = json.load(open(tmp_path / "cos-ivf.ann" / "index.json"))
    assert meta["candidates"] == 0 and "candidates" not in meta["settings"] and meta["format_version"] == 2
    assert AnnIndex.open(str(tmp_path / "cos-ivf.ann"), model=trained.factors_store).candidates == 0
    assert AnnIndex.open(str(tmp_path / "cos-ivf.ann"), candidates=32).candidates == 32
    with pytest.raises(SettingError, match="candidates"):
        trained.build_index(side="item", metric="cosine", location=str(tmp_path / "bad.ann"), candidates=-1)
    # similar items from the index: queries from its stored rows, self filtered exactly, scores
    # equal to exact ones; exhaustive IVF with candidates re-scored equals the exact lists
    item_ids = trained.interactions.ids("item")[::7]
    exact_ids, exact_scores = trained.similar_items(item_ids, N=8, filter_self=True)
    for index, floor in ((ivf, 0.99), (str(tmp_path / "cos-ivf.ann"), 0.99), (hnsw, 0.9)):
        tuned = AnnIndex.open(index, model=trained.factors_store, candidates=32) if isinstance(index, str) else index
        approx_ids, approx_scores = trained.similar_items(item_ids, N=8, filter_self=True, index=tuned)
        assert not (approx_ids == item_ids[:, None]).any()
        assert _recall(exact_ids, approx_ids) >= floor
        same = approx_ids == exact_ids
        np.testing.assert_allclose(approx_scores[same], exact_scores[same], rtol=1e-6, atol=1e-7)
    stats: dict = {}
    approximate_top_k(hnsw, exact_rows[:5], 4, stats=stats, stored=True)
    assert stats["first_round"] == 5 and stats["exact"] == 0
