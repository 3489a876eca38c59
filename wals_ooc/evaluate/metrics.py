"""Ranking metrics at K, computed streaming over the test store's user shards.

For each test user known to the model: recommend the top K items, excluding the user's training
items, and compare them with the held-out items T_u:

    precision@K = hits / K                 recall@K = hits / |T_u|
    ndcg@K      = DCG / ideal DCG (binary relevance, ideal over min(K, |T_u|) hits)
    map@K       = sum_r P@r * rel_r / min(K, |T_u|)
    auc         = 1 - mean over t in T_u of (# non-training, non-test items scored above t) / # such items

Metrics are averaged over users with at least one held-out item the model knows; AUC over
those of them it was computed for (``auc_users``: all of them, or a seeded share with
``auc_fraction``; each user's AUC is exact either way).

Scoring: when the item factors fit a quarter of the budget they are held once per process in
norm order, and each user is scored only as far as the Cauchy-Schwarz bound lets its top K or
its held-out items' ranks still change (``serve/scoring.py``); else every item is scored, block
by block. The figures are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np

from ..errors import DataMismatchError, SettingError
from ..execute import Executor, single_threaded_blas_in_worker
from ..kernels.warm import warm_serving_kernels
from ..memory import MemoryBudget
from ..serve.recommend import item_cache_plan, item_source, release_items, score_block_rows
from ..serve.scoring import top_k
from ..store.reader import InteractionStore
from ..train.factors import FactorStore

METRICS = ("precision", "recall", "ndcg", "map", "auc")


@dataclass
class MetricSums:
    """Per-metric sums over users, and the counts they are divided by."""

    users: int = 0
    skipped_users: int = 0
    skipped_items: int = 0
    auc_users: int = 0
    sums: dict = field(default_factory=lambda: {m: 0.0 for m in METRICS})
    known_users: int = 0  # test users (with entries) that the training data has, sampled or not

    def add(self, other: MetricSums) -> None:
        self.users += other.users
        self.auc_users += other.auc_users
        self.skipped_users += other.skipped_users
        self.skipped_items += other.skipped_items
        self.known_users += other.known_users
        for m in METRICS:
            self.sums[m] += other.sums[m]

    def means(self, k: int) -> dict:
        out = {f"{m}@{k}": (self.sums[m] / self.users if self.users else float("nan")) for m in METRICS if m != "auc"}
        out["auc"] = self.sums["auc"] / self.auc_users if self.auc_users else float("nan")
        out.update(users=self.users, skipped_users=self.skipped_users, skipped_test_items=self.skipped_items,
                   auc_users=self.auc_users)
        return out


def ranking_metrics(rec_ids: np.ndarray, test_indptr: np.ndarray, test_ids: np.ndarray, outranked: np.ndarray | None,
                    n_candidates: np.ndarray | None, k: int, auc_mask: np.ndarray | None = None) -> MetricSums:
    """Metric sums for a batch of users from their top-K lists and held-out ids (CSR, sorted).

    auc_mask: (n,) bool, the users whose ``outranked`` counts were gathered (default all).

    Vectorised over the batch: each (user, id) pair becomes one integer key, and a top-K entry
    is a hit when its key is among the held-out keys (binary search in the sorted keys).
    """
    sums = MetricSums()
    lengths = np.diff(test_indptr)
    n = len(lengths)
    active = lengths > 0
    if not active.any():
        return sums
    top = np.asarray(rec_ids[:n, :k], np.int64)
    width = int(max(test_ids.max(initial=-1), top.max(initial=-1))) + 2  # -1 padding never matches a key
    test_keys = np.repeat(np.arange(n, dtype=np.int64), lengths) * width + test_ids
    top_keys = np.arange(n, dtype=np.int64)[:, None] * width + top
    at = np.minimum(np.searchsorted(test_keys, top_keys), len(test_keys) - 1)
    relevant = (test_keys[at] == top_keys) & (top >= 0)
    hits = relevant.sum(axis=1)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    if relevant.shape[1] < k:  # fewer than K candidates: the missing places are misses
        relevant = np.pad(relevant, ((0, 0), (0, k - relevant.shape[1])))
    ideal = np.cumsum(discounts)[np.minimum(k, np.maximum(lengths, 1)) - 1]
    depth = np.minimum(k, np.maximum(lengths, 1))
    precision_at = np.cumsum(relevant, axis=1) / np.arange(1, k + 1)
    per_user = {
        "precision": hits / k,
        "recall": hits / np.maximum(lengths, 1),
        "ndcg": (relevant * discounts).sum(axis=1) / ideal,
        "map": (precision_at * relevant).sum(axis=1) / depth,
    }
    sums.users = int(active.sum())
    for name, values in per_user.items():
        sums.sums[name] = float(values[active].sum())
    if outranked is not None:
        owner = np.repeat(np.arange(n), lengths)
        negatives = np.asarray(n_candidates, np.float64)
        ratio = np.asarray(outranked, np.float64) / np.maximum(negatives[owner], 1)
        mean_ratio = np.bincount(owner, ratio, minlength=n) / np.maximum(lengths, 1)
        auc = np.where(negatives > 0, 1.0 - mean_ratio, 1.0)
        counted = active if auc_mask is None else active & auc_mask
        sums.auc_users = int(counted.sum())
        sums.sums["auc"] = float(auc[counted].sum())
    return sums


def gather_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR (indptr, indices) of the given rows of a CSR, in that order, without a Python loop."""
    starts = indptr[rows].astype(np.int64)
    counts = (indptr[np.asarray(rows) + 1] - starts).astype(np.int64)
    out_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    take = np.repeat(starts - out_indptr[:-1], counts) + np.arange(out_indptr[-1], dtype=np.int64)
    return out_indptr, indices[take]


@dataclass
class MetricCurves:
    """Per-metric sums over users at every cutoff 1..k_max (arrays of shape (k_max,)), and AUC."""

    k_max: int
    users: int = 0
    skipped_users: int = 0
    skipped_items: int = 0
    auc_users: int = 0
    sums: dict = field(default_factory=dict)
    known_users: int = 0  # test users (with entries) that the training data has, sampled or not

    def __post_init__(self):
        for m in METRICS:
            self.sums.setdefault(m, np.zeros(self.k_max) if m != "auc" else 0.0)

    def add(self, other: MetricCurves) -> None:
        self.users += other.users
        self.auc_users += other.auc_users
        self.skipped_users += other.skipped_users
        self.skipped_items += other.skipped_items
        self.known_users += other.known_users
        for m in METRICS:
            self.sums[m] = self.sums[m] + other.sums[m]

    def means(self) -> dict:
        """{"k": [1..k_max], "precision": [...], ..., "auc": float, "users": ...}."""
        users = self.users or float("nan")
        out: dict[str, Any] = {"k": list(range(1, self.k_max + 1))}
        for m in METRICS:
            out[m] = float(self.sums[m] / (self.auc_users or float("nan"))) if m == "auc" else (self.sums[m] / users).tolist()
        out.update(users=self.users, skipped_users=self.skipped_users, skipped_test_items=self.skipped_items,
                   auc_users=self.auc_users)
        return out


def ranking_curves(rec_ids: np.ndarray, test_indptr: np.ndarray, test_ids: np.ndarray, outranked: np.ndarray | None,
                   n_candidates: np.ndarray | None, k_max: int, auc_mask: np.ndarray | None = None) -> MetricCurves:
    """Metric sums at every cutoff 1..k_max from one top-k_max list per user (the same
    definitions as ``ranking_metrics``, all cutoffs in one pass)."""
    curves = MetricCurves(k_max)
    cutoffs = np.arange(1, k_max + 1)
    discounts = 1.0 / np.log2(np.arange(2, k_max + 2))
    ideal_at = np.cumsum(discounts)
    for u in range(len(test_indptr) - 1):
        truth = test_ids[test_indptr[u] : test_indptr[u + 1]]
        if not len(truth):
            continue
        relevant = np.isin(rec_ids[u, :k_max], truth).astype(np.float64)
        hits = np.cumsum(relevant)
        shown = np.minimum(cutoffs, len(truth))
        curves.users += 1
        curves.sums["precision"] += hits / cutoffs
        curves.sums["recall"] += hits / len(truth)
        curves.sums["ndcg"] += np.cumsum(relevant * discounts) / ideal_at[shown - 1]
        curves.sums["map"] += np.cumsum(hits / cutoffs * relevant) / shown
        if outranked is not None and (auc_mask is None or auc_mask[u]):
            assert n_candidates is not None, "outranked comes with n_candidates"
            curves.auc_users += 1
            negatives = n_candidates[u]
            ranks = outranked[test_indptr[u] : test_indptr[u + 1]]
            curves.sums["auc"] += float(1.0 - (ranks / negatives).mean()) if negatives > 0 else 1.0
    return curves


def _evaluate_shard(model_location, train_location, test_location, storage_options, lo, hi, k, allowance, max_users_seed,
                    with_auc=True, curves: bool = False, items_allowance=None, auc_fraction=None, shard_range=None):
    """Metric sums of the test users ``[lo, hi)``, a piece of the test shard whose users are
    ``shard_range`` (the seeded samples are drawn per shard, so they do not depend on the cut)."""
    single_threaded_blas_in_worker()
    model = FactorStore.open(model_location, "r", storage_options)
    train = InteractionStore(train_location, storage_options)
    test = InteractionStore(test_location, storage_options)
    shard = test.rows("user", lo, hi)
    has_rows = np.diff(shard.indptr) > 0
    users = train.index_of("user", test.ids_of("user", np.arange(lo, hi), as_arrow=True), missing="mark")
    sums = MetricCurves(k) if curves else MetricSums()
    known = (users >= 0) & has_rows
    sums.skipped_users = int(((users < 0) & has_rows).sum())
    sums.known_users = int(known.sum())
    shard_lo, shard_hi = shard_range if shard_range is not None else (lo, hi)
    if max_users_seed is not None:
        fraction, seed = max_users_seed
        known &= _shard_draws(seed, shard_lo, shard_hi, lo, hi) < fraction
    rows = np.flatnonzero(known)
    if not len(rows):
        return sums
    # held-out items in the model's item numbering (matched by original id), sorted per user;
    # unknown items are dropped and counted
    indptr, entries = gather_rows(shard.indptr, shard.indices, rows)
    test_items = np.unique(entries)
    in_train = train.index_of("item", test.ids_of("item", test_items, as_arrow=True), missing="mark")
    items = in_train[np.searchsorted(test_items, entries)]
    owner = np.repeat(np.arange(len(rows)), np.diff(indptr))
    sums.skipped_items = int((items < 0).sum())
    owner, items = owner[items >= 0], items[items >= 0]
    order = np.lexsort((items, owner))
    test_indptr = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=len(rows)))]).astype(np.int64)
    test_csr = (test_indptr, items[order].astype(np.int64))
    # training items to exclude: the train store's rows of these users (CSR rows: ascending)
    user_rows = users[rows]
    span = train.rows("user", int(user_rows.min()), int(user_rows.max()) + 1)
    exclude_indptr, exclude_ids = gather_rows(span.indptr, span.indices, user_rows - span.row_start)
    exclude = (exclude_indptr, exclude_ids.astype(np.int64))
    queries = np.asarray(model.current("user").get_orthogonal_selection((user_rows, slice(None))))
    block_rows = score_block_rows(len(rows), queries.shape[1], allowance)
    auc_mask = None  # AUC of every user, or (auc_fraction) of a seeded share of them: the others rank nothing
    ranked = test_csr
    if with_auc and auc_fraction is not None:
        fraction, seed = auc_fraction
        auc_mask = _shard_draws(seed, shard_lo, shard_hi, lo, hi, 1)[rows] < fraction
        ranked = gather_rows(test_csr[0], test_csr[1], np.flatnonzero(auc_mask))
        ranked = (_spread(ranked[0], auc_mask), ranked[1])
    source = item_source(model, items_allowance or allowance, block_rows)
    rec_ids, _, outranked = top_k(queries, source, k, exclude=exclude, test=ranked if with_auc else None)
    if auc_mask is not None and outranked is not None:  # back to the CSR of every user (zeros: not ranked)
        full = np.zeros(len(test_csr[1]), np.int64)
        full[_segment_positions(test_csr[0], auc_mask)] = outranked
        outranked = full
    n_candidates = train.n_items - np.diff(exclude[0]) - np.diff(test_csr[0])
    measure = ranking_curves if curves else ranking_metrics
    batch = measure(rec_ids, test_csr[0], test_csr[1], outranked, n_candidates, k, auc_mask)
    batch.skipped_users, batch.skipped_items = sums.skipped_users, sums.skipped_items
    return batch


def _shard_draws(seed: int, shard_lo: int, shard_hi: int, lo: int, hi: int, stream: int = 0) -> np.ndarray:
    """Uniform draws of the users ``[lo, hi)``, seeded by their shard: the same users are drawn
    however the shard is cut into pieces."""
    key = [seed, shard_lo] if stream == 0 else [seed, shard_lo, stream]
    return np.random.default_rng(key).random(shard_hi - shard_lo)[lo - shard_lo: hi - shard_lo]


def _pieces(lo: int, hi: int, allowance: int) -> list[tuple[int, int]]:
    """A test shard's users cut so that a score tile of the smallest height (256 item rows, 4
    bytes a score) over a piece's users takes at most an eighth of a task's allowance."""
    users = max(1, allowance // (8 * 4 * 256))
    return [(a, min(a + users, hi)) for a in range(lo, hi, users)]


def _spread(indptr: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """The indptr over all users of a CSR that holds rows only for the ``chosen`` (bool) users."""
    lengths = np.zeros(len(chosen), np.int64)
    lengths[chosen] = np.diff(indptr)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _segment_positions(indptr: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Positions, in a CSR's entries, of the entries of the ``chosen`` (bool) rows, in order."""
    lengths = np.diff(indptr)
    return np.flatnonzero(np.repeat(chosen, lengths))


def evaluate(
    model: FactorStore,
    train: InteractionStore,
    test: InteractionStore,
    k: int = 10,
    user_fraction: float | None = None,
    seed: int = 0,
    client=None,
    threads: int | None = None,
    memory_budget=None,
    storage_options: dict | None = None,
    executor: Executor | None = None,
    auc: bool = True,
    auc_fraction: float | None = None,
) -> dict:
    """precision@k, recall@k, ndcg@k, map@k and AUC of a model on a held-out store.

    user_fraction: evaluate a seeded random share of the test users (None: all of them).
    auc: also compute AUC (it ranks every held-out item among all candidates: the costliest
    metric, as a user is scored down the catalogue until no remaining item can outrank a
    held-out one; a search that does not score by it leaves it out).
    auc_fraction: compute AUC for a seeded random share of the evaluated users only (each one
    exactly; None: all of them). The result's ``auc_users`` says how many users AUC averages.
    Test users and items are matched to the model's by their original ids.
    """
    _check_cutoff_and_fraction("k", "-k", k, user_fraction)
    if auc_fraction is not None and not 0 < auc_fraction <= 1:  # also refuses NaN
        raise SettingError(f"auc_fraction must be in (0, 1], got {auc_fraction}", flags={"auc_fraction": "--auc-fraction"})
    total = _run(model, train, test, k, user_fraction, seed, client, threads, memory_budget, storage_options, executor,
                 auc=auc, curves=False, auc_fraction=auc_fraction)
    means = total.means(k)
    if not auc:
        del means["auc"]
    return means


def evaluate_curves(
    model: FactorStore,
    train: InteractionStore,
    test: InteractionStore,
    k_max: int = 50,
    user_fraction: float | None = None,
    seed: int = 0,
    client=None,
    threads: int | None = None,
    memory_budget=None,
    storage_options: dict | None = None,
    executor: Executor | None = None,
) -> dict:
    """precision, recall, ndcg and map at every k in 1..k_max (lists) and AUC, from one top-k_max
    pass over the test store (streamed shard by shard, as ``evaluate``)."""
    _check_cutoff_and_fraction("k_max", "--k-max", k_max, user_fraction)
    total = _run(model, train, test, k_max, user_fraction, seed, client, threads, memory_budget, storage_options,
                 executor, auc=True, curves=True)
    return total.means()


def _check_cutoff_and_fraction(name: str, flag: str, k, user_fraction) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SettingError(f"{name} must be an integer >= 1, got {k!r}", flags={name: flag})
    if user_fraction is not None and not 0 < user_fraction <= 1:  # also refuses NaN
        raise SettingError(f"user_fraction must be in (0, 1], got {user_fraction}", flags={"user_fraction": "--user-fraction"})


def _run(model, train, test, k, user_fraction, seed, client, threads, memory_budget, storage_options, executor,
         auc: bool, curves: bool, auc_fraction: float | None = None):
    warm_serving_kernels()  # fixed per-process cost: part of the baseline
    budget = MemoryBudget.start(memory_budget)
    executor = Executor.of(executor, client, threads)
    executor.check_reachable(model.location, train.location, test.location)
    items = model.current("item")
    # the norm-ordered item factors are held once per process (see serve.recommend.item_cache_plan)
    allowance, items_allowance = item_cache_plan(budget.allowance, executor.threads_per_process,
                                                 (int(items.shape[0]), int(items.shape[1])))
    sample = None if user_fraction is None else (float(user_fraction), seed)
    auc_sample = None if auc_fraction is None else (float(auc_fraction), seed)
    tasks = [
        dask.delayed(_evaluate_shard, pure=False)(
            model.location, train.location, test.location, storage_options, lo, hi, k, allowance, sample, auc, curves,
            items_allowance, auc_sample, (shard_lo, shard_hi), dask_key_name=f"evaluate-shard{n:05d}-{lo}",
        )
        for n, (shard_lo, shard_hi) in enumerate(test.shard_ranges("user"))
        for lo, hi in _pieces(shard_lo, shard_hi, allowance)
        if hi > lo
    ]
    total = MetricCurves(k) if curves else MetricSums()
    try:
        with executor.single_threaded_blas():
            for part in executor.run(tasks):
                total.add(part)
    finally:
        executor.run_everywhere(release_items)
    if total.known_users == 0 and total.skipped_users > 0:  # metrics of nobody: NaN, and no error said why
        raise DataMismatchError(f"{test.location}: none of its {total.skipped_users:,} test users is a user of "
                                f"{train.location}, the model's training data: it is not a held-out part of that data")
    return total
