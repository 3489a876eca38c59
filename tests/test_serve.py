"""Serving from a trained factor store: top-K against argsort of dense scores, cosine similarity,
fold-in against the closed-form row, recommend_all outputs, load and export."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

import wals_ooc
from wals_ooc import WALS, open_store
from wals_ooc.serve.recommend import open_recommendations

from .conftest import assert_close_rel, store_to_scipy
from .reference import dense_solve


@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory):
    location = str(tmp_path_factory.mktemp("models") / "model.zarr")
    model = WALS(factors=8, iterations=6, alpha=2.0, alpha0=0.5, regularization=0.01, nu=1.0, solver="cholesky",
                 dtype="float64", random_state=2)
    model.fit(small_store, location, progress=False)
    return model


def _dense(model):
    users, items = model.to_numpy()
    return users, items, store_to_scipy(open_store(model.interactions.location))


def _check_top_k(got_ids, got_scores, scores_row, allowed, n):
    """Our top-n equals the dense argsort over allowed items (order checked where scores differ)."""
    candidates = np.flatnonzero(allowed)
    order = candidates[np.argsort(-scores_row[candidates], kind="stable")][:n]
    expected = scores_row[order]
    valid = got_ids >= 0
    assert valid.sum() == len(order)
    np.testing.assert_allclose(got_scores[valid], expected, rtol=1e-6, atol=1e-9)
    assert set(got_ids[valid]) == set(order) or np.allclose(np.sort(scores_row[got_ids[valid]]), np.sort(expected))
    assert np.all(np.diff(got_scores[valid]) <= 1e-12)


def test_recommend_equals_argsort_of_dense_scores(trained):
    users, items, R = _dense(trained)
    store = trained.interactions
    user_rows = np.arange(0, store.n_users, 37)
    user_ids = store.ids("user")[user_rows]
    for filter_liked in (True, False):
        ids, scores = trained.recommend(user_ids, N=12, filter_already_liked=filter_liked)
        assert ids.shape == (len(user_rows), 12)
        rows_of_ids = store.index_of("item", ids.ravel()).reshape(ids.shape)
        for k, u in enumerate(user_rows):
            allowed = np.ones(store.n_items, bool)
            if filter_liked:
                allowed[R.indices[R.indptr[u]: R.indptr[u + 1]]] = False
            _check_top_k(rows_of_ids[k], scores[k], users[u] @ items.T, allowed, 12)


def test_recommend_restricted_to_items_and_fewer_candidates_than_n(trained):
    users, items, R = _dense(trained)
    store = trained.interactions
    item_ids = store.ids("item")[[3, 5, 8, 13, 21, 34]]
    user = 7
    ids, scores = trained.recommend(store.ids("user")[[user]], N=10, items=item_ids, filter_already_liked=True)
    liked = set(R.indices[R.indptr[user]: R.indptr[user + 1]])
    allowed_rows = [r for r in (3, 5, 8, 13, 21, 34) if r not in liked]
    got = store.index_of("item", ids[0][scores[0] > -np.inf])
    assert sorted(got) == sorted(allowed_rows)
    assert np.all(scores[0][len(allowed_rows):] == -np.inf)
    assert np.all(ids[0][len(allowed_rows):] == -1)


def test_unknown_user_is_a_clear_error(trained):
    with pytest.raises(KeyError, match="unknown"):
        trained.recommend([10**9], N=5)


def test_similar_items_and_users_equal_dense_cosine(trained):
    users, items, _ = _dense(trained)
    store = trained.interactions
    for side, factors, method in (("item", items, trained.similar_items), ("user", users, trained.similar_users)):
        unit = factors / np.linalg.norm(factors, axis=1, keepdims=True)
        rows = np.array([0, 4, 9])
        ids, scores = method(store.ids(side)[rows], N=6)
        got_rows = store.index_of(side, ids.ravel()).reshape(ids.shape)
        for k, r in enumerate(rows):
            cosine = unit @ unit[r]
            _check_top_k(got_rows[k], scores[k], cosine, np.ones(len(cosine), bool), 6)
            assert got_rows[k][0] == r
        ids, _ = method(store.ids(side)[rows], N=6, filter_self=True)
        got_rows = store.index_of(side, ids.ravel()).reshape(ids.shape)
        assert all(r not in got_rows[k] for k, r in enumerate(rows))


def test_fold_in_equals_the_row_the_trainer_would_compute(trained):
    users, items, R = _dense(trained)
    store = trained.interactions
    cfg = trained.config
    kwargs = dict(kind=cfg.confidence, alpha=cfg.alpha, alpha0=cfg.alpha0, eps=cfg.eps, lam=cfg.regularization, nu=cfg.nu)
    expected_users = dense_solve(R[:5], items, **kwargs)
    for u in range(5):
        cols = R.indices[R.indptr[u]: R.indptr[u + 1]]
        vals = R.data[R.indptr[u]: R.indptr[u + 1]]
        mapping = dict(zip(store.ids("item")[cols].tolist(), vals.tolist()))
        assert_close_rel(trained.recalculate_user(mapping), expected_users[u], 1e-9)
    # the item side, with one entry split in two that must be summed back
    Rt = R.T.tocsr()
    cols = Rt.indices[Rt.indptr[2]: Rt.indptr[3]]
    vals = Rt.data[Rt.indptr[2]: Rt.indptr[3]].astype(np.float64)
    ids = np.append(store.ids("user")[cols], store.ids("user")[cols[0]])
    values = np.append(vals - np.eye(len(vals))[0] * 0.5 * vals[0], 0.5 * vals[0])
    expected_item = dense_solve(Rt[2:3], users, **kwargs)[0]
    assert_close_rel(trained.recalculate_item((ids, values)), expected_item, 1e-9)
    with pytest.raises(KeyError, match="unknown"):
        trained.recalculate_user({10**9: 1.0})


def test_recommend_for_folded_in_vector_of_a_new_user(trained):
    users, items, _ = _dense(trained)
    store = trained.interactions
    liked = store.ids("item")[[1, 2, 3]]
    vector = trained.recalculate_user(list(liked))
    ids, scores = trained.recommend(None, N=5, user_vectors=vector, filter_already_liked=False)
    expected = np.argsort(-(items @ vector), kind="stable")[:5]
    np.testing.assert_allclose(scores[0], (items @ vector)[expected], rtol=1e-6)


@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
def test_recommend_all_equals_per_user_recommend(trained, tmp_path, fmt):
    store = trained.interactions
    output = trained.recommend_all(N=7, output=str(tmp_path / f"top.{fmt}"), format=fmt)
    expected_ids, expected_scores = trained.recommend(store.ids("user"), N=7)
    if fmt == "zarr":
        group = open_recommendations(output)  # ragged: user k's results at indptr[k]:indptr[k + 1]
        np.testing.assert_array_equal(group["user_ids"][:], store.ids("user"))
        np.testing.assert_array_equal(np.diff(group["indptr"][:]), (~np.ma.getmaskarray(expected_ids)).sum(axis=1))
        got_ids, got_scores = group["item_ids"][:], group["scores"][:]
        expected_ids, expected_scores = expected_ids.compressed(), expected_scores.compressed()
    else:
        table = pq.read_table(output).to_pandas().sort_values(["user", "rank"])
        order = np.argsort(store.index_of("user", table["user"].to_numpy()), kind="stable")
        table = table.iloc[order]
        got_ids = table["item"].to_numpy().reshape(store.n_users, -1)
        got_scores = table["score"].to_numpy().reshape(store.n_users, -1)
        expected_ids, expected_scores = expected_ids[:, : got_ids.shape[1]], expected_scores[:, : got_ids.shape[1]]
    np.testing.assert_allclose(got_scores, expected_scores.astype(np.float32), rtol=1e-6)
    same = np.isclose(got_scores, expected_scores, rtol=1e-6)
    assert (got_ids[same] == expected_ids[same]).mean() > 0.99


def test_recommend_all_holds_the_item_factors_once_per_process_not_once_per_task(trained, tmp_path, monkeypatch):
    """The norm-ordered copy of the item factors is shared by a process's tasks: it is weighed
    against the process's allowance (a quarter at most), not each task's share, and left out of
    the tasks' shares. A copy of a fifth of the allowance is held with 2 task threads (an eighth
    of it was the limit when it was weighed per task), and the answers are the exact ones."""
    from wals_ooc.memory import MemoryBudget
    from wals_ooc.serve import recommend as serve_recommend
    from wals_ooc.serve.scoring import NormOrder

    model = wals_ooc.load(trained.factors_store.location, memory_budget="2GB", threads=2)
    allowance = MemoryBudget.start(model.memory_budget).allowance
    fifth = allowance // 5
    monkeypatch.setattr(NormOrder, "nbytes_for", staticmethod(lambda n_rows, factors: fifth))
    assert serve_recommend.item_cache_plan(allowance, 2, (10, 4)) == ((allowance - fifth) // 2, allowance)
    monkeypatch.setattr(NormOrder, "nbytes_for", staticmethod(lambda n_rows, factors: allowance // 3))
    assert serve_recommend.item_cache_plan(allowance, 2, (10, 4)) == (allowance // 2, allowance)  # not held
    monkeypatch.setattr(NormOrder, "nbytes_for", staticmethod(lambda n_rows, factors: fifth))
    built = []
    of = NormOrder.of.__func__
    monkeypatch.setattr(NormOrder, "of", classmethod(lambda cls, array, block_rows=1 << 16:
                                                     built.append(array.shape) or of(cls, array, block_rows)))
    serve_recommend.release_items()
    output = model.recommend_all(N=5, output=str(tmp_path / "top.parquet"), format="parquet")
    assert built == [tuple(model.factors_store.current("item").shape)]  # once: shared by both threads
    store = model.interactions
    table = pq.read_table(output).to_pandas().sort_values(["user", "rank"])
    users = store.ids("user")[:40]
    expected_ids, expected_scores = model.recommend(users, N=5)
    for user, ids, scores in zip(users, expected_ids, expected_scores):
        got = table[table["user"] == user]
        np.testing.assert_allclose(got["score"].to_numpy(), scores.compressed(), rtol=1e-6)


def test_recommend_all_refuses_to_overwrite_unless_asked(trained, tmp_path):
    out = str(tmp_path / "top.zarr")
    trained.recommend_all(N=3, output=out)
    with pytest.raises(Exception):
        trained.recommend_all(N=3, output=out)
    trained.recommend_all(N=3, output=out, overwrite=True)


def test_load_serves_the_same_and_exports_to_numpy_and_implicit(trained):
    loaded = wals_ooc.load(trained.factors_store.location)
    store = trained.interactions
    user_ids = store.ids("user")[:20]
    a = trained.recommend(user_ids, N=5)
    b = loaded.recommend(user_ids, N=5)
    np.testing.assert_array_equal(a[0], b[0])
    users, items = loaded.to_numpy()
    assert users.shape == (store.n_users, 8) and items.shape == (store.n_items, 8)
    assert loaded.loss_history == trained.loss_history

    implicit_model = loaded.to_implicit()
    R = store_to_scipy(store).tocsr()
    rows = np.arange(20)
    got_ids, got_scores = implicit_model.recommend(rows, R[rows], N=5, filter_already_liked_items=True)
    ours_rows = store.index_of("item", a[0].ravel()).reshape(a[0].shape)
    np.testing.assert_allclose(got_scores, a[1], rtol=1e-5)
    same = np.isclose(got_scores, a[1], rtol=1e-6)
    assert (got_ids[same] == ours_rows[same]).mean() > 0.99


def test_unfitted_model_says_so():
    with pytest.raises(RuntimeError, match="fit"):
        WALS().recommend([1])


def test_export_round_trips_through_parquet_npz_and_implicit(trained, tmp_path):
    from implicit.cpu.als import AlternatingLeastSquares

    users, items = trained.to_numpy()
    store = trained.interactions
    out = trained.export(str(tmp_path / "factors.parquet"))
    for side, expected in (("user", users), ("item", items)):
        path = f"{out}/{side}s.parquet"
        table = pq.read_table(path)
        np.testing.assert_array_equal(table["id"].to_numpy(), store.ids(side))
        np.testing.assert_array_equal(np.stack(table["factors"].to_numpy(zero_copy_only=False)), expected.astype(np.float32))
        assert pq.ParquetFile(path).num_row_groups == -(-len(expected) // trained.factors_store.current(side).chunks[0])
    npz = np.load(trained.export(str(tmp_path / "f.npz"), format="npz"))
    np.testing.assert_array_equal(npz["item_factors"], items)
    np.testing.assert_array_equal(npz["user_ids"], store.ids("user"))
    peer = AlternatingLeastSquares.load(trained.export(str(tmp_path / "peer.npz"), format="implicit"))
    assert peer.factors == 8 and peer.regularization == trained.config.regularization
    row = 5
    ids, scores = peer.recommend(row, None, N=4, filter_already_liked_items=False)
    ours_ids, ours_scores = trained.recommend([store.ids("user")[row]], N=4, filter_already_liked=False)
    np.testing.assert_array_equal(peer.item_ids[ids], ours_ids[0])
    np.testing.assert_allclose(scores, ours_scores[0], rtol=1e-6)
    with pytest.raises(wals_ooc.errors.PathError, match="overwrite"):
        trained.export(str(tmp_path / "f.npz"), format="npz")


def test_implicit_names_are_accepted_with_implicits_meanings(trained):
    """recommend(..., filter_already_liked_items=, filter_items=, user_items=, recalculate_user=,
    items=) answers as implicit's own recommend does on the same factors."""
    from wals_ooc.errors import SettingError, UnknownIdError

    store = trained.interactions
    R = store_to_scipy(open_store(store.location))
    user_rows = np.array([0, 5, 17, 40])
    user_ids = store.ids("user")[user_rows]
    banned_rows = np.array([3, 9, 30])
    banned = list(store.ids("item")[banned_rows])
    ours = trained.recommend(user_ids, N=6, filter_already_liked_items=True, filter_items=banned,
                             user_items=R[user_rows])
    reference = trained.to_implicit().recommend(user_rows, R[user_rows], N=6, filter_already_liked_items=True,
                                                filter_items=banned_rows)
    np.testing.assert_array_equal(store.index_of("item", ours[0].ravel()).reshape(ours[0].shape), reference[0])
    np.testing.assert_allclose(ours[1], reference[1], rtol=1e-5)
    same = trained.recommend(user_ids, N=6, filter_already_liked=True, exclude_items=banned)  # our names, the store
    np.testing.assert_array_equal(same[0], ours[0])
    unfiltered = trained.recommend(user_ids, N=6, filter_already_liked_items=False)
    np.testing.assert_array_equal(unfiltered[0], trained.recommend(user_ids, N=6, filter_already_liked=False)[0])
    # recalculate_user: the users folded in afresh from user_items, as recalculate_user() does for one
    one = R[user_rows[1]: user_rows[1] + 1]
    liked = {store.ids("item")[c]: v for c, v in zip(one.indices, one.data)}
    vector = trained.recalculate_user(liked)
    ids, scores = trained.recommend(user_ids[1], N=5, user_items=one, recalculate_user=True)
    expected = trained.recommend(None, N=5, user_vectors=vector, exclude_items=list(liked))
    assert ids.ndim == 1  # one id: 1-D, as in implicit
    np.testing.assert_array_equal(ids, expected[0][0])
    np.testing.assert_allclose(scores, expected[1][0], rtol=1e-6)
    # items: only these are ranked (implicit's meaning, with our original ids)
    subset = list(store.ids("item")[[1, 2, 4, 8]])
    ids, _ = trained.recommend(user_ids[0], N=10, items=subset, filter_already_liked_items=False)
    assert sorted(ids.tolist()) == sorted(subset)
    # a name given twice, differently: refused; the same value twice is fine
    with pytest.raises(SettingError, match="filter_already_liked= and filter_already_liked_items="):
        trained.recommend(user_ids, N=3, filter_already_liked=True, filter_already_liked_items=False)
    with pytest.raises(SettingError, match="exclude_items= and filter_items="):
        trained.recommend(user_ids, N=3, exclude_items=banned[:1], filter_items=banned[1:])
    trained.recommend(user_ids, N=3, filter_already_liked=False, filter_already_liked_items=False)
    with pytest.raises(SettingError, match="recalculate_user=True needs user_items"):
        trained.recommend(user_ids, N=3, recalculate_user=True)
    with pytest.raises(SettingError, match="user_items has shape"):
        trained.recommend(user_ids, N=3, user_items=R[:2])
    with pytest.raises(SettingError, match="user_items= .by keyword"):
        trained.recommend(user_ids, R[user_rows])  # implicit's positional user_items
    with pytest.raises(UnknownIdError):
        trained.recommend(user_ids, N=3, filter_items=["no such item"])


def test_implicit_similar_names_are_accepted_with_implicits_meanings(trained):
    """similar_items(itemid=, filter_items=, items=, recalculate_item= with item_users=) and
    similar_users(userid=, filter_users=, users=) answer as implicit's own calls do on the same
    factors: one id gives 1-D results, a batch 2-D ones without padding."""
    from wals_ooc.errors import SettingError

    store = trained.interactions
    R = store_to_scipy(open_store(store.location)).tocsr()
    peer = trained.to_implicit()
    item_ids, user_ids = store.ids("item"), store.ids("user")
    rows, banned_rows = np.array([2, 11, 60]), np.array([4, 7, 19])
    ours = trained.similar_items(itemid=item_ids[rows], N=5, filter_items=list(item_ids[banned_rows]))
    reference = peer.similar_items(rows, N=5, filter_items=banned_rows)
    assert ours[0].shape == (3, 5)
    np.testing.assert_array_equal(store.index_of("item", ours[0].ravel()).reshape(3, 5), reference[0])
    np.testing.assert_allclose(ours[1], reference[1], rtol=1e-5)
    ids, scores = trained.similar_items(item_ids[rows[0]], N=5)  # one id: 1-D, as in implicit
    expected_rows, expected_scores = peer.similar_items(int(rows[0]), N=5)
    assert ids.ndim == 1
    np.testing.assert_array_equal(store.index_of("item", ids), expected_rows)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)
    # items: only these are ranked; fewer than N of them: fewer columns, none masked
    subset_rows = np.array([1, 2, 4, 8])
    ids, scores = trained.similar_items(item_ids[[2, 60]], N=10, items=list(item_ids[subset_rows]))
    assert ids.shape == (2, 4) and not np.ma.getmaskarray(ids).any()
    np.testing.assert_array_equal(store.index_of("item", ids.ravel()).reshape(2, 4),
                                  peer.similar_items(np.array([2, 60]), N=10, items=subset_rows)[0][:, :4])  # implicit pads
    # recalculate_item with item_users: the item folded in afresh, then cosine against the items
    one = R.T.tocsr()[rows[1]: rows[1] + 1]
    vector = trained.recalculate_item({user_ids[c]: v for c, v in zip(one.indices, one.data)})
    ids, scores = trained.similar_items(item_ids[rows[1]], N=6, recalculate_item=True, item_users=one)
    _, items, _ = _dense(trained)
    unit = items / np.linalg.norm(items, axis=1, keepdims=True)
    _check_top_k(store.index_of("item", ids), scores, unit @ (vector / np.linalg.norm(vector)),
                 np.ones(store.n_items, bool), 6)
    # similar_users: userid, filter_users, users
    ours = trained.similar_users(userid=user_ids[[0, 5]], N=4, filter_users=[user_ids[1]])
    reference = peer.similar_users(np.array([0, 5]), N=4, filter_users=np.array([1]))
    np.testing.assert_array_equal(store.index_of("user", ours[0].ravel()).reshape(2, 4), reference[0])
    np.testing.assert_allclose(ours[1], reference[1], rtol=1e-5)
    ids, _ = trained.similar_users(user_ids[0], N=3, users=list(user_ids[[0, 3, 9, 12]]))
    np.testing.assert_array_equal(store.index_of("user", ids), peer.similar_users(0, N=3, users=np.array([0, 3, 9, 12]))[0])
    with pytest.raises(SettingError, match="item_ids= and itemid="):
        trained.similar_items(item_ids[:1], itemid=item_ids[1:2])
    with pytest.raises(SettingError, match="recalculate_item=True needs item_users"):
        trained.similar_items(item_ids[:2], recalculate_item=True)
    with pytest.raises(SettingError, match="item_users has shape"):
        trained.similar_items(item_ids[:2], recalculate_item=True, item_users=one)


def test_liked_rows_in_any_order_with_repeats_and_unknown_rows_match_the_store(small_store):
    from wals_ooc.serve import liked as liked_module
    from wals_ooc.store.reader import InteractionStore

    store = InteractionStore(small_store)
    R = store_to_scipy(store)
    rng = np.random.default_rng(4)
    rows = np.concatenate([rng.integers(0, store.n_users, 60), [-1, 7, 7, store.n_users - 1, 0, -1]])
    # slices of the span, coordinate selections, and both with windows of a few entries
    for ratio, window in ((1 << 30, liked_module.RUN_ENTRIES), (0, liked_module.RUN_ENTRIES), (1 << 30, 7), (0, 7)):
        previous = liked_module.SPARSE_RATIO, liked_module.RUN_ENTRIES
        liked_module.SPARSE_RATIO, liked_module.RUN_ENTRIES = ratio, window
        try:
            indptr, ids = liked_module.liked_csr(store, "user", rows)
        finally:
            liked_module.SPARSE_RATIO, liked_module.RUN_ENTRIES = previous
        assert len(indptr) == len(rows) + 1
        for k, row in enumerate(rows):
            expected = [] if row < 0 else sorted(R.indices[R.indptr[row]: R.indptr[row + 1]])
            assert ids[indptr[k]: indptr[k + 1]].tolist() == expected, (ratio, window, k, row)


@pytest.mark.parametrize("in_norm_order", [False, True])
def test_a_query_scores_the_same_alone_as_in_a_batch(in_norm_order):
    """One query's scores, bit for bit, and so its near-tie order, do not depend on which queries
    are asked with it (numpy/OpenBLAS form a one-row product in another order than a tile)."""
    from wals_ooc.serve.scoring import FactorSource, NormOrder, top_k

    rng = np.random.default_rng(7)
    items = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = rng.standard_normal((9, 32)).astype(np.float32)
    source = FactorSource(NormOrder.of(items) if in_norm_order else items, 700)
    ids, scores, _ = top_k(queries, source, 50)
    for q in range(len(queries)):
        alone_ids, alone_scores, _ = top_k(queries[q : q + 1], source, 50)
        np.testing.assert_array_equal(alone_scores[0], scores[q])
        np.testing.assert_array_equal(alone_ids[0], ids[q])
