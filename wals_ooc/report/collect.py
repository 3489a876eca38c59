"""What a model report shows, gathered from the stores without loading any whole matrix.

Four parts, each a plain dict (what the page and its plots are drawn from, and what tests check):

- ``training``: per iteration (1-based, as in ``loss_history``) the loss and the seconds of the
  user and item half-sweeps.
- ``metrics``: precision, recall, ndcg and map at every k in 1..k_max and AUC on a test store
  (``evaluate_curves``: one streamed top-k_max pass over the test store's shards).
- ``popularity``: how popular the recommended items are against the catalogue, from the top-N
  lists of a seeded sample of users: catalogue coverage, the share of recommendations that go
  to the head (the most popular items holding 20% of the interactions) and to the long tail,
  per popularity bin (powers of two of the users per item) and cumulatively.
- ``users``: a few users' history (their strongest interactions) beside their recommendations.

Item popularity is streamed over the item shards' row pointers; the catalogue is summarised by
how many items have each distinct popularity (a few thousand values at most in practice).
"""

from __future__ import annotations

from typing import Any

import numpy as np

HEAD_SHARE = 0.2  # the head: the most popular items that together hold this share of interactions


def training_part(history: list[dict]) -> dict:
    """Loss and seconds per iteration from a model's ``loss_history``."""
    return {
        "iteration": [int(h["iteration"]) for h in history],
        "loss": [h.get("loss") for h in history],
        "seconds": [float(h.get("seconds", 0.0)) for h in history],
        "user_seconds": [float(h.get("user_seconds", 0.0)) for h in history],
        "item_seconds": [float(h.get("item_seconds", 0.0)) for h in history],
    }


def sample_user_rows(n_users: int, size: int, seed: int) -> np.ndarray:
    """A seeded sample of ``size`` user rows (all of them when there are fewer), sorted."""
    if n_users <= size:
        return np.arange(n_users, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_users, size=size, replace=False)).astype(np.int64)


def item_popularity(store, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream the item shards once: (distinct popularity values, items having each, and the
    popularity (users per item) of each of the given sorted unique item rows)."""
    values = np.zeros(0, np.int64)
    items_with = np.zeros(0, np.int64)
    of_items = np.zeros(len(items), np.int64)
    for lo, hi in store.shard_ranges("item"):
        if hi <= lo:
            continue
        counts = store.row_counts("item", lo, hi).astype(np.int64)
        shard_values, shard_items = np.unique(counts, return_counts=True)
        merged = np.concatenate([values, shard_values])
        weights = np.concatenate([items_with, shard_items])
        values, inverse = np.unique(merged, return_inverse=True)
        items_with = np.bincount(inverse, weights=weights, minlength=len(values)).astype(np.int64)
        inside = (items >= lo) & (items < hi)
        of_items[inside] = counts[items[inside] - lo]
    return values, items_with, of_items


def popularity_part(store, rec_rows: np.ndarray) -> dict:
    """Popularity of recommended items (rows of the item side, -1 for an empty slot) against
    the catalogue of ``store``."""
    shown = rec_rows[rec_rows >= 0]
    rec_items, rec_times = np.unique(shown, return_counts=True)
    values, items_with, rec_popularity = item_popularity(store, rec_items)
    interactions = values * items_with
    total_interactions = max(1, int(interactions.sum()))
    # head: most popular first, until HEAD_SHARE of the interactions is reached
    order = np.argsort(-values, kind="stable")
    cumulative = np.cumsum(interactions[order])
    head_groups = int(np.searchsorted(cumulative, HEAD_SHARE * total_interactions)) + 1
    head_min = int(values[order][min(head_groups, len(order)) - 1]) if len(order) else 0
    head_items = int(items_with[order][:head_groups].sum())
    in_head = rec_popularity >= head_min
    n_recs = max(1, int(rec_times.sum()))
    # bins of popularity: [1], [2, 3], [4, 7], ... (0 for items nobody interacted with)
    top_bin = int(np.log2(max(1, int(values.max()) if len(values) else 1))) + 1
    edges = [0] + [2**b for b in range(top_bin + 1)]

    def bin_of(popularity: np.ndarray) -> np.ndarray:
        return np.where(popularity > 0, np.floor(np.log2(np.maximum(popularity, 1))).astype(np.int64) + 1, 0)

    n_bins = top_bin + 1
    catalogue_items = np.bincount(bin_of(values), weights=items_with, minlength=n_bins)
    catalogue_interactions = np.bincount(bin_of(values), weights=interactions, minlength=n_bins)
    recommended = np.bincount(bin_of(rec_popularity), weights=rec_times, minlength=n_bins)
    labels = ["0"] + [f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(edges[1:], edges[2:])]
    # cumulative shares over items ranked by popularity, most popular first (exact at group ends)
    rec_by_value = np.bincount(np.searchsorted(values, rec_popularity), weights=rec_times, minlength=len(values))
    n_items = max(1, int(items_with.sum()))
    return {
        "n_items": int(items_with.sum()),
        "users_sampled": int(rec_rows.shape[0]),
        "recommendations": int(rec_times.sum()),
        "items_recommended": int(len(rec_items)),
        "coverage": len(rec_items) / n_items,
        "head_min_popularity": head_min,
        "head_items": head_items,
        "head_item_share": head_items / n_items,
        "head_interaction_share": float(cumulative[min(head_groups, len(order)) - 1] / total_interactions) if len(order) else 0.0,
        "head_recommendation_share": float(rec_times[in_head].sum() / n_recs),
        "tail_recommendation_share": float(rec_times[~in_head].sum() / n_recs),
        "mean_popularity_recommended": float((rec_popularity * rec_times).sum() / n_recs),
        "mean_popularity_interactions": float((values * interactions).sum() / total_interactions),
        "bins": {
            "label": labels,
            "item_share": (catalogue_items / n_items).tolist(),
            "interaction_share": (catalogue_interactions / total_interactions).tolist(),
            "recommendation_share": (recommended / n_recs).tolist(),
        },
        "cumulative": {
            "item_share": np.concatenate([[0.0], np.cumsum(items_with[order]) / n_items]).tolist(),
            "interaction_share": np.concatenate([[0.0], cumulative / total_interactions]).tolist(),
            "recommendation_share": np.concatenate([[0.0], np.cumsum(rec_by_value[order]) / n_recs]).tolist(),
        },
    }


def ids_of(store, side: str, rows: np.ndarray) -> list:
    """Original ids of some rows of a side, as plain Python values."""
    rows = np.asarray(rows, np.int64)
    values = store.ids_of(side, rows)
    return [v.item() if hasattr(v, "item") else v for v in values]


def example_users(store, sample: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` user rows from the sample with typical activity (the middle half by entries)."""
    if not len(sample) or count <= 0:
        return np.zeros(0, np.int64)
    entries = np.array([int(store.row_counts("user", int(r), int(r) + 1)[0]) for r in sample])
    lo, hi = np.quantile(entries, [0.25, 0.75])
    typical = sample[(entries >= lo) & (entries <= hi)]
    pool = typical if len(typical) >= count else sample
    rng = np.random.default_rng(seed + 1)
    return np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))


def user_part(model, store, test, rows: np.ndarray, n: int, history_shown: int = 10) -> list[dict[str, Any]]:
    """For each user row: the strongest ``history_shown`` interactions and the top-``n``
    recommendations (marked when they are held out in ``test``), each with its popularity and its
    display name (None where the store has none; see ``wals_ooc.add_names``); the user's too."""
    users = ids_of(store, "user", rows)
    user_names = model.names_of(users, "user") if len(users) else []
    out = []
    for row, user, user_name in zip(rows, users, user_names):
        shard = store.rows("user", int(row), int(row) + 1)
        values = shard.values
        strongest = np.argsort(-values, kind="stable")[:history_shown]
        history_rows = shard.indices[strongest].astype(np.int64)
        rec_ids, rec_scores = model.recommend([user], N=n)
        rec_ids, rec_scores = list(rec_ids[0]), list(rec_scores[0])
        shown = [i for i, s in enumerate(rec_scores) if s > -np.inf]
        rec_ids = [rec_ids[i] for i in shown]
        rec_scores = [float(rec_scores[i]) for i in shown]
        rec_rows = store.index_of("item", rec_ids, missing="mark") if rec_ids else np.zeros(0, np.int64)
        held_out: set = set()
        if test is not None:
            test_row = test.index_of("user", [user], missing="mark")[0]
            if test_row >= 0:
                got = test.rows("user", int(test_row), int(test_row) + 1)
                held_out = set(ids_of(test, "item", got.indices.astype(np.int64)))
        history_ids = ids_of(store, "item", history_rows)
        history_names = model.names_of(history_ids, "item") if len(history_ids) else []
        rec_names = model.names_of(rec_ids, "item") if rec_ids else []
        out.append({
            "user": user,
            "name": user_name,
            "entries": int(shard.nnz),
            "history": [
                {"item": item, "name": name, "value": float(v), "popularity": _popularity(store, r)}
                for item, name, v, r in zip(history_ids, history_names, values[strongest], history_rows)
            ],
            "recommendations": [
                {"item": _plain(item), "name": name, "score": s,
                 "popularity": _popularity(store, r) if r >= 0 else None, "held_out": _plain(item) in held_out}
                for item, name, s, r in zip(rec_ids, rec_names, rec_scores, rec_rows)
            ],
            "held_out": len(held_out),
        })
    return out


def _popularity(store, row: int) -> int:
    return int(store.row_counts("item", int(row), int(row) + 1)[0])


def _plain(value):
    return value.item() if hasattr(value, "item") else value
