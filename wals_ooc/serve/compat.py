"""implicit's serving names, mapped onto wals-ooc's: ``filter_already_liked_items``,
``filter_items``, ``recalculate_user`` with ``user_items``, and ``items`` (recommend); ``itemid``,
``recalculate_item`` with ``item_users``, ``filter_items`` and ``items`` (similar_items);
``userid``, ``filter_users`` and ``users`` (similar_users).

wals-ooc keeps its own names (``filter_already_liked``, ``exclude_items``, ``user_vectors``);
implicit's are accepted with implicit's meanings so that code written for
``implicit.als.AlternatingLeastSquares.recommend`` runs unchanged where it can (see the README,
"Coming from implicit"). Ids are the original ids of the model, as everywhere in wals-ooc; a
``user_items`` matrix is indexed by the model's rows, as implicit's is by its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import SettingError


def pick(ours_name: str, ours: Any, alias_name: str, alias: Any, default: Any = None) -> Any:
    """The value given under our name or under implicit's; both given and different: an error."""
    if alias is None:
        return default if ours is None else ours
    if ours is not None and not _same(ours, alias):
        raise SettingError(f"{ours_name}= and {alias_name}= (implicit's name for it) were both given, with different "
                           f"values: pass one of them")
    return alias


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    try:
        return bool(np.array_equal(np.asarray(list(a), dtype=object), np.asarray(list(b), dtype=object)))
    except TypeError:
        return a == b


def user_items_csr(user_items: Any, n_queries: int, n_items: int, side: str = "user") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """implicit's ``user_items`` (a scipy sparse matrix, one row per requested user, one column
    per item row of the model) as CSR (indptr, sorted unique columns, summed values).

    side="item": implicit's ``item_users`` instead (one row per requested item, one column per
    user row of the model)."""
    import scipy.sparse as sp

    other = "item" if side == "user" else "user"
    name = f"{side}_{other}s"
    if not sp.issparse(user_items):
        raise SettingError(f"{name} must be a scipy sparse matrix (one row per {side}, one column per {other} row of "
                           f"the model, as in implicit), got {type(user_items).__name__}")
    matrix = sp.csr_matrix(user_items)
    if matrix.shape != (n_queries, n_items):
        raise SettingError(f"{name} has shape {matrix.shape}; it needs one row per requested {side} and one "
                           f"column per {other} of the model: ({n_queries}, {n_items})")
    matrix.sum_duplicates()
    matrix.sort_indices()
    return matrix.indptr.astype(np.int64), matrix.indices.astype(np.int64), matrix.data.astype(np.float64)


def with_excluded(exclude: tuple[np.ndarray, np.ndarray] | None, extra: np.ndarray | None,
                  n_queries: int) -> tuple[np.ndarray, np.ndarray] | None:
    """CSR (indptr, sorted ids) of each query's exclusions with ``extra`` (sorted unique ids)
    excluded for every query too."""
    if extra is None or len(extra) == 0:
        return exclude
    if exclude is None:
        indptr = np.arange(n_queries + 1, dtype=np.int64) * len(extra)
        return indptr, np.tile(extra.astype(np.int64), n_queries)
    indptr, ids = exclude
    rows = [np.union1d(ids[indptr[q] : indptr[q + 1]], extra) for q in range(n_queries)]
    out = np.zeros(n_queries + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=out[1:])
    return out, (np.concatenate(rows).astype(np.int64) if rows else np.empty(0, np.int64))


__all__ = ["pick", "user_items_csr", "with_excluded"]
