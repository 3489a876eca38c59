"""Out-of-core train/test split of an interaction store, per user, seeded.

Each user shard is split independently with a generator seeded by (seed, shard), so the split
does not depend on the scheduler or the budget. The two outputs are ordinary interaction stores
keyed by the original ids, written by the same out-of-core writer as ``convert``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..errors import InputError, SettingError
from ..memory import MemoryBudget
from ..store.format import FORMAT_VERSION, INTERACTIONS_KIND
from ..store.lifecycle import Transaction
from ..store.reader import CSRShard, InteractionStore
from ..store.sources import RowBatch
from ..store.writer import ConvertReport, build_store

METHODS = ("random", "leave_one_out", "leave_last_out", "last_fraction")
BY_ORDER = ("leave_last_out", "last_fraction")  # need a store converted with an order column


def held_out_mask(shard: CSRShard, method: str, test_fraction: float, min_train: int, rng: np.random.Generator) -> np.ndarray:
    """Which entries of a shard go to the test side (bool per entry).

    random: round(test_fraction * n_u) random entries of each user; leave_one_out: one random
    entry; leave_last_out: the user's latest entry (by the store's order; ties at random);
    last_fraction: the user's latest round(test_fraction * n_u) entries. Either way a user keeps
    at least ``min_train`` entries in training.
    """
    counts = np.diff(shard.indptr)
    if method in ("random", "last_fraction"):
        wanted = np.rint(test_fraction * counts).astype(np.int64)
    elif method in ("leave_one_out", "leave_last_out"):
        wanted = np.ones_like(counts)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    wanted = np.clip(wanted, 0, np.maximum(0, counts - min_train))
    rows = np.repeat(np.arange(len(counts)), counts)
    keys = rng.random(len(rows))
    if method in BY_ORDER:  # latest first within each row, random among equal times
        if shard.order is None:
            raise ValueError(f"method {method!r} needs the entries' order: read the shard with_order=True")
        order = np.lexsort((keys, -shard.order, rows))
    else:
        order = np.lexsort((keys, rows))  # by row, then random key
    position = np.empty(len(rows), np.int64)
    position[order] = np.arange(len(rows)) - shard.indptr[rows[order]]
    return position < wanted[rows]


def _batch_ids(store: InteractionStore, side: str, rows: np.ndarray):
    """Original ids of rows as a RowBatch carries them: int64 NumPy, or Arrow text."""
    if store.id_map(side).kind == "int":
        return store.ids_of(side, rows)
    return store.ids_of(side, rows, as_arrow=True)


def _id_types_of(store: InteractionStore) -> dict[str, str]:
    """The id types that give the outputs the source's kinds, whichever ids each side keeps."""
    maps = {side: store.id_map(side) for side in ("user", "item")}
    return {side: "str" if index.kind == "str" else index.id_type for side, index in maps.items()}


def _shard_batches(store: InteractionStore, method, test_fraction, min_train, seed, want_test: bool) -> Iterator[RowBatch]:
    for k, (lo, hi) in enumerate(store.shard_ranges("user")):
        shard = store.rows("user", lo, hi, with_order=store.has_order)
        held = held_out_mask(shard, method, test_fraction, min_train, np.random.default_rng([seed, k]))
        keep = held if want_test else ~held
        if not keep.any():
            continue
        rows = np.repeat(np.arange(lo, hi), np.diff(shard.indptr))[keep]
        users, items = _batch_ids(store, "user", rows), _batch_ids(store, "item", shard.indices[keep])
        yield RowBatch(users, items, shard.values[keep], shard.order[keep] if shard.order is not None else None)


@dataclass
class SplitReport:
    train: ConvertReport
    test: ConvertReport


def split(
    store: InteractionStore | str,
    train_out: str | os.PathLike,
    test_out: str | os.PathLike,
    method: str = "random",
    test_fraction: float = 0.2,
    min_train: int = 1,
    seed: int = 0,
    *,
    overwrite: bool = False,
    storage_options: dict | None = None,
    tmp_dir: str | None = None,
    **build_options: Any,
) -> SplitReport:
    """Write the train and test stores; each entry lands in exactly one of them.

    Both are built beside their targets and swapped in together once both are complete
    (``store.lifecycle``): a failure leaves existing stores as they were. Neither output may
    be the input store or the other output.
    """
    if isinstance(store, (str, os.PathLike)):
        store = InteractionStore(store, storage_options)
    if method not in METHODS:
        raise SettingError(f"method must be one of {METHODS}, got {method!r}", flags={"method": "--method"})
    # leave_one_out and leave_last_out hold out one entry a user whatever the fraction; the others need one above 0
    if not (0 <= test_fraction < 1) or (test_fraction == 0 and method in ("random", "last_fraction")):
        raise SettingError(f"test_fraction must be in (0, 1), got {test_fraction}", flags={"test_fraction": "--test-fraction"})
    if min_train < 0:
        raise SettingError(f"min_train must be >= 0, got {min_train}", flags={"min_train": "--min-train"})
    if method in BY_ORDER and not store.has_order:
        raise SettingError(f"method {method!r} splits by time, but {store.location} has no entry order: "
                           "convert it with an order column (--order-col)")
    split_id = uuid.uuid4().hex
    reports = []
    build_options["memory_budget"] = MemoryBudget.start(build_options.get("memory_budget"))
    with Transaction() as tx:
        outputs = [
            tx.output(out, INTERACTIONS_KIND, version=FORMAT_VERSION, overwrite=overwrite,
                      inputs=[store.location], storage_options=storage_options, tmp_dir=tmp_dir)
            for out in (train_out, test_out)
        ]
        for out, want_test in zip(outputs, (False, True)):
            try:
                built = build_store(
                    _shard_batches(store, method, test_fraction, min_train, seed, want_test),
                    out,
                    row_block=store.row_block,
                    id_type=_id_types_of(store),
                    stage="split test" if want_test else "split train",
                    source_attrs={"split_of": store.location, "split_of_store_id": store.attrs().get("store_id"),
                                  "split_id": split_id, "method": method, "test_fraction": test_fraction,
                                  "seed": seed, "side": "test" if want_test else "train"},
                    **build_options,
                )
            except InputError as exc:
                if not exc.reason.startswith("empty input"):
                    raise
                raise SettingError(f"the split would leave {out.target} empty: no entry of {store.location} goes to "
                                   f"its {'test' if want_test else 'train'} side with test_fraction={test_fraction}, "
                                   f"min_train={min_train} ({method}); nothing was written",
                                   flags={"test_fraction": "--test-fraction", "min_train": "--min-train"}) from None
            reports.append(built)
    return SplitReport(*reports)
