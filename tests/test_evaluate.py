"""Out-of-core split and streamed ranking metrics, against brute force on dense NumPy."""

from __future__ import annotations

import numpy as np
import pytest

import wals_ooc
from wals_ooc import WALS, open_store

from .conftest import store_to_scipy


def _entries(store) -> set[tuple[int, int, float]]:
    R = store_to_scipy(store).tocoo()
    users, items = store.ids("user"), store.ids("item")
    return {(int(users[r]), int(items[c]), float(v)) for r, c, v in zip(R.row, R.col, R.data)}


@pytest.mark.parametrize("method", ["random", "leave_one_out"])
def test_split_partitions_the_entries_and_is_seeded(small_store, tmp_path, method):
    store = open_store(small_store)
    wals_ooc.split(store, tmp_path / "tr.zarr", tmp_path / "te.zarr", method=method, test_fraction=0.25, seed=3, progress=False)
    train, test = open_store(tmp_path / "tr.zarr"), open_store(tmp_path / "te.zarr")
    all_entries, train_entries, test_entries = _entries(store), _entries(train), _entries(test)
    assert train_entries | test_entries == all_entries
    assert not train_entries & test_entries
    counts = np.diff(store_to_scipy(store).indptr)
    test_counts = {}
    for user, _, _ in test_entries:
        test_counts[user] = test_counts.get(user, 0) + 1
    train_users = {user for user, _, _ in train_entries}
    for row, user in enumerate(store.ids("user")):
        held = test_counts.get(int(user), 0)
        if method == "leave_one_out":
            assert held == (1 if counts[row] >= 2 else 0)
        else:
            assert held == min(int(np.rint(0.25 * counts[row])), counts[row] - 1)
        assert int(user) in train_users  # min_train = 1: every user keeps an entry
    wals_ooc.split(store, tmp_path / "tr2.zarr", tmp_path / "te2.zarr", method=method, test_fraction=0.25, seed=3, progress=False)
    assert _entries(open_store(tmp_path / "te2.zarr")) == test_entries
    wals_ooc.split(store, tmp_path / "tr3.zarr", tmp_path / "te3.zarr", method=method, test_fraction=0.25, seed=4, progress=False)
    assert _entries(open_store(tmp_path / "te3.zarr")) != test_entries


def brute_force_metrics(scores, train_R, test_pairs, k):
    """The metrics of evaluate/metrics.py from the dense score matrix."""
    totals = {"precision": 0.0, "recall": 0.0, "ndcg": 0.0, "map": 0.0, "auc": 0.0}
    users = 0
    for u, truth in test_pairs.items():
        truth = np.array(sorted(truth))
        row = scores[u].astype(np.float64).copy()
        liked = train_R.indices[train_R.indptr[u]: train_R.indptr[u + 1]]
        row[liked] = -np.inf
        top = np.argsort(-row, kind="stable")[:k]
        relevant = np.isin(top, truth)
        users += 1
        totals["precision"] += relevant.sum() / k
        totals["recall"] += relevant.sum() / len(truth)
        discounts = 1 / np.log2(np.arange(2, k + 2))
        totals["ndcg"] += (relevant * discounts).sum() / discounts[: min(k, len(truth))].sum()
        totals["map"] += sum(relevant[: r + 1].mean() for r in range(k) if relevant[r]) / min(k, len(truth))
        negatives = np.setdiff1d(np.arange(len(row)), np.concatenate([liked, truth]))
        totals["auc"] += 1 - np.mean([(scores[u][negatives] > scores[u][t]).sum() / len(negatives) for t in truth])
    return {name: value / users for name, value in totals.items()}, users


def test_metrics_equal_brute_force(small_store, tmp_path):
    wals_ooc.split(small_store, tmp_path / "tr.zarr", tmp_path / "te.zarr", test_fraction=0.3, seed=1, progress=False)
    train, test = open_store(tmp_path / "tr.zarr"), open_store(tmp_path / "te.zarr")
    model = WALS(factors=8, iterations=5, random_state=0, alpha=3.0, regularization=0.05)
    model.fit(train, tmp_path / "m.zarr", progress=False)
    k = 5
    got = model.evaluate(test, k=k)

    users, items = model.to_numpy()
    scores = users @ items.T
    train_R = store_to_scipy(train)
    test_R = store_to_scipy(test).tocoo()
    test_pairs: dict[int, set] = {}
    for r, c in zip(test_R.row, test_R.col):
        u = int(train.index_of("user", test.ids("user")[[r]], missing="mark")[0])
        i = int(train.index_of("item", test.ids("item")[[c]], missing="mark")[0])
        if u >= 0 and i >= 0:
            test_pairs.setdefault(u, set()).add(i)
    expected, n_users = brute_force_metrics(scores, train_R, test_pairs, k)
    assert got["users"] == n_users > 50
    for name in ("precision", "recall", "ndcg", "map"):
        assert got[f"{name}@{k}"] == pytest.approx(expected[name], abs=1e-9), name
    assert got["auc"] == pytest.approx(expected["auc"], abs=1e-6)
    assert got["auc"] > 0.6  # the model learned something beyond chance


def test_evaluate_user_fraction_is_seeded_and_a_subset(small_store, tmp_path):
    wals_ooc.split(small_store, tmp_path / "tr.zarr", tmp_path / "te.zarr", test_fraction=0.3, seed=1, progress=False)
    model = WALS(factors=4, iterations=2, random_state=0).fit(str(tmp_path / "tr.zarr"), tmp_path / "m.zarr", progress=False)
    whole = model.evaluate(str(tmp_path / "te.zarr"), k=5)
    part = model.evaluate(str(tmp_path / "te.zarr"), k=5, user_fraction=0.5, seed=9)
    again = model.evaluate(str(tmp_path / "te.zarr"), k=5, user_fraction=0.5, seed=9)
    assert part == again
    assert 0.3 * whole["users"] < part["users"] < 0.7 * whole["users"]


def test_splits_by_order_hold_out_each_users_latest_entries(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(9)
    n = 4000
    frame = pd.DataFrame({"u": rng.integers(0, 120, n), "i": rng.integers(0, 300, n), "t": rng.permutation(n)})
    frame = frame.drop_duplicates(["u", "i"])
    frame.to_csv(tmp_path / "log.csv", index=False)
    wals_ooc.convert(str(tmp_path / "log.csv"), str(tmp_path / "s.zarr"), user_col="u", item_col="i", value_col=None,
                     order_col="t", row_block=16, shard_nnz=400, progress=False)
    latest = frame.sort_values("t").groupby("u").tail(1)
    wals_ooc.split(tmp_path / "s.zarr", tmp_path / "tr.zarr", tmp_path / "te.zarr", method="leave_last_out", progress=False)
    test_entries = {(u, i) for u, i, _ in _entries(open_store(tmp_path / "te.zarr"))}
    counts = frame.groupby("u").size()
    assert test_entries == {(u, i) for u, i in zip(latest["u"], latest["i"]) if counts[u] >= 2}

    wals_ooc.split(tmp_path / "s.zarr", tmp_path / "tr2.zarr", tmp_path / "te2.zarr", method="last_fraction",
                   test_fraction=0.3, progress=False)
    train, test = open_store(tmp_path / "tr2.zarr"), open_store(tmp_path / "te2.zarr")
    assert train.has_order and test.has_order  # the splits keep the order for further splitting
    times = {(u, i): t for u, i, t in zip(frame["u"], frame["i"], frame["t"])}
    test_by_user: dict = {}
    for u, i, _ in _entries(test):
        test_by_user.setdefault(u, []).append(times[(u, i)])
    for u, i, _ in _entries(train):
        if u in test_by_user:
            assert times[(u, i)] < min(test_by_user[u])  # everything held out is later than all training

    with pytest.raises(ValueError, match="order"):
        wals_ooc.split(_plain_store(tmp_path), tmp_path / "a.zarr",
                       tmp_path / "b.zarr", method="leave_last_out", progress=False)


def _plain_store(tmp_path):
    path = tmp_path / "plain.zarr"
    wals_ooc.convert(str(tmp_path / "log.csv"), str(path), user_col="u", item_col="i", value_col=None, progress=False)
    return str(path)


def test_bounded_scan_gives_the_figures_of_scoring_every_item(small_store, tmp_path, monkeypatch):
    """Items held in norm order, each user scanned only as far as its top K and its held-out
    items' ranks can still change: every metric equals scoring every item (unpruned, and block
    by block from Zarr as when the items do not fit the budget); a sampled AUC is each sampled
    user's exact AUC."""
    from wals_ooc.serve import scoring

    wals_ooc.split(small_store, tmp_path / "tr.zarr", tmp_path / "te.zarr", test_fraction=0.3, seed=1, progress=False)
    model = WALS(factors=8, iterations=5, random_state=0, alpha=3.0, regularization=0.05)
    model.fit(str(tmp_path / "tr.zarr"), tmp_path / "m.zarr", progress=False)
    test = str(tmp_path / "te.zarr")
    bounded = model.evaluate(test, k=5)
    sampled = model.evaluate(test, k=5, auc_fraction=0.5, seed=2)
    with monkeypatch.context() as patch:
        patch.setattr(scoring, "PRUNE", False)
        unpruned = model.evaluate(test, k=5)
    with monkeypatch.context() as patch:  # item factors "too large": scored block by block from Zarr
        patch.setattr(scoring.NormOrder, "nbytes_for", staticmethod(lambda n_rows, factors: 1 << 62))
        blockwise = model.evaluate(test, k=5)
        blockwise_sampled = model.evaluate(test, k=5, auc_fraction=0.5, seed=2)
    assert bounded["users"] == bounded["auc_users"] > 50
    for other in (unpruned, blockwise):
        assert other.keys() == bounded.keys()
        for name, value in bounded.items():
            assert other[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    for name, value in sampled.items():
        assert blockwise_sampled[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
        if name not in ("auc", "auc_users"):
            assert value == bounded[name], name  # top-K metrics are still those of every user
    assert 0.3 * bounded["users"] < sampled["auc_users"] < 0.7 * bounded["users"]
    assert sampled["auc"] != bounded["auc"]
    assert "auc" not in model.evaluate(test, k=5, auc=False)
    with pytest.raises(wals_ooc.errors.SettingError, match="auc_fraction"):
        model.evaluate(test, k=5, auc_fraction=0.0)


def test_norm_ordered_rank_counts_equal_scoring_every_item():
    """The candidates above each held-out item, counted by the bounded norm-ordered scan, equal
    the count over every item: scores of both signs (held-out items below minus the bound are
    outranked by every remaining candidate at once), items of zero norm, users without held-out
    items, excluded items masked."""
    from wals_ooc.serve.scoring import FactorSource, NormOrder, top_k

    rng = np.random.default_rng(5)
    n_items, n_users = 1500, 300
    items = (rng.standard_normal((n_items, 6)) * (rng.pareto(1.5, n_items)[:, None] + 0.1)).astype(np.float32)
    items[rng.choice(n_items, 40, replace=False)] = 0
    queries = rng.standard_normal((n_users, 6)).astype(np.float32)
    chosen = [np.sort(rng.choice(n_items, rng.integers(0, 30), replace=False)) for _ in range(n_users)]
    split_at = [rng.integers(0, len(c) + 1) for c in chosen]
    exclude = [np.sort(c[:s]) for c, s in zip(chosen, split_at)]
    held = [np.sort(c[s:][:5]) for c, s in zip(chosen, split_at)]

    def csr(rows):
        return np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64), np.concatenate(rows).astype(np.int64)

    ex, test = csr(exclude), csr(held)
    ids, scores, outranked = top_k(queries, FactorSource(NormOrder.of(items), 256), 7, exclude=ex, test=test)
    all_scores = queries @ items.T
    expected = []
    for u in range(n_users):
        negatives = np.setdiff1d(np.arange(n_items), np.concatenate([exclude[u], held[u]]))
        expected += [int((all_scores[u, negatives] > all_scores[u, t]).sum()) for t in held[u]]
    assert len(expected) > 500 and min(expected) == 0 and max(expected) > n_items // 2
    np.testing.assert_array_equal(outranked, expected)
    reference = top_k(queries, FactorSource(items, 256), 7, exclude=ex, test=test)
    np.testing.assert_array_equal(ids, reference[0])
    np.testing.assert_array_equal(outranked, reference[2])



def test_evaluate_peak_rss_stays_under_a_small_budget(tmp_path):
    """Test shards of ~16k users under the smallest allowance: each task scores a piece of its
    shard sized to the allowance (a score tile over every user of a shard would not fit)."""
    import json

    from wals_ooc.synthetic import SyntheticSpec, write_synthetic_store

    from .conftest import run_python

    write_synthetic_store(SyntheticSpec(n_users=60_000, n_items=20_000, rows=900_000, seed=5), str(tmp_path / "g.zarr"),
                          progress=False)
    wals_ooc.split(str(tmp_path / "g.zarr"), str(tmp_path / "tr.zarr"), str(tmp_path / "te.zarr"), seed=1, progress=False)
    WALS(factors=16, iterations=1, random_state=0).fit(str(tmp_path / "tr.zarr"), str(tmp_path / "m.zarr"), progress=False)
    code = f"""
import json, wals_ooc
from wals_ooc.memory import current_rss, peak_rss, warm_libraries
from wals_ooc.kernels.warm import warm_serving_kernels
warm_libraries(); warm_serving_kernels()
budget = current_rss() + 72 * 2**20
model = wals_ooc.load({str(tmp_path / 'm.zarr')!r}, {str(tmp_path / 'tr.zarr')!r}, memory_budget=budget, threads=2)
metrics = model.evaluate({str(tmp_path / 'te.zarr')!r}, k=10)
print(json.dumps({{"budget": budget, "peak": peak_rss(), "auc_users": metrics["auc_users"]}}))
"""
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["auc_users"] > 10_000
    assert figures["peak"] <= figures["budget"], figures
