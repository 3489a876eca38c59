"""Synthetic interaction logs of any size, generated in bounded memory.

User activity and item popularity follow power laws (a few heavy users and hit items, long
tails); values are counts >= 1. Users and items belong to latent taste clusters, and a user
picks most items from its own cluster, so there is structure for a model to learn and for
ranking metrics to reward. The same seed gives the same rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from .errors import SettingError
from .store.lifecycle import output_file
from .store.sources import RowBatch
from .store.writer import ConvertReport, write_store


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and character of a synthetic log.

    rows: interaction rows to emit (duplicate pairs among them are summed on conversion).
    user_exponent, item_exponent: power-law exponents of activity and popularity by rank.
    clusters: latent taste groups; affinity: share of a user's rows drawn from its own group.
    """

    n_users: int = 10_000
    n_items: int = 5_000
    rows: int = 200_000
    user_exponent: float = 0.8
    item_exponent: float = 0.9
    clusters: int = 20
    affinity: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.n_users, self.n_items, self.rows) < 1:
            raise SettingError("n_users, n_items and rows must be >= 1",
                               flags={"n_users": "--users", "n_items": "--items", "rows": "--rows"})
        if not 0 <= self.affinity <= 1:
            raise SettingError("affinity must be in [0, 1]")


def _power_law_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights[rng.permutation(n)]


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def synthetic_batches(spec: SyntheticSpec, batch_rows: int = 1 << 20) -> Iterator[RowBatch]:
    """Rows of the log in batches of about ``batch_rows``; memory ~ (n_users + n_items) * 24 bytes."""
    rng = np.random.default_rng(spec.seed)
    activity = _power_law_weights(spec.n_users, spec.user_exponent, rng)
    rows_per_user = activity * (spec.rows / activity.sum())
    popularity = _power_law_weights(spec.n_items, spec.item_exponent, rng)
    item_cluster = rng.integers(0, spec.clusters, spec.n_items)
    user_cluster = rng.integers(0, spec.clusters, spec.n_users)
    global_cdf = _cdf(popularity)
    members = [np.flatnonzero(item_cluster == c) for c in range(spec.clusters)]
    cluster_cdfs = [_cdf(popularity[m]) if len(m) else None for m in members]

    expected_before = np.concatenate([[0.0], np.cumsum(rows_per_user)])
    emitted = 0
    user = 0
    while user < spec.n_users and emitted < spec.rows:
        stop = int(np.searchsorted(expected_before, expected_before[user] + batch_rows))
        stop = min(spec.n_users, max(stop, user + 1))
        counts = np.maximum(1, rng.poisson(rows_per_user[user:stop]))
        users = np.repeat(np.arange(user, stop, dtype=np.int64), counts)[: spec.rows - emitted]
        n = len(users)
        items = np.searchsorted(global_cdf, rng.random(n)).astype(np.int64)
        own = rng.random(n) < spec.affinity
        clusters = user_cluster[users]
        for c in np.unique(clusters[own]):
            if cluster_cdfs[c] is None:
                continue
            pick = own & (clusters == c)
            items[pick] = members[c][np.searchsorted(cluster_cdfs[c], rng.random(int(pick.sum())))]
        values = rng.geometric(0.35, n).astype(np.float32)
        emitted += n
        user = stop
        yield RowBatch(users, np.minimum(items, spec.n_items - 1), values)


def write_csv(spec: SyntheticSpec, path: str | os.PathLike, compress: bool = False, batch_rows: int = 1 << 20,
              overwrite: bool = False) -> int:
    """Write the log as CSV with header ``user,item,count`` (gzip if ``compress``); returns rows.

    Written beside ``path`` and renamed onto it when complete; an existing file is replaced
    only with ``overwrite`` (``store.lifecycle.output_file``)."""
    schema = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("count", pa.int64())])
    rows = 0
    with output_file(path, overwrite=overwrite) as temp:
        sink = pa.CompressedOutputStream(temp, "gzip") if compress else pa.OSFile(temp, "wb")
        with sink, pacsv.CSVWriter(sink, schema) as writer:
            for batch in synthetic_batches(spec, batch_rows):
                writer.write_batch(
                    pa.record_batch([pa.array(batch.users), pa.array(batch.items), pa.array(batch.values.astype(np.int64))],
                                    schema=schema)
                )
                rows += len(batch)
    return rows


def write_synthetic_store(spec: SyntheticSpec, store: str | os.PathLike, **store_options) -> ConvertReport:
    """Generate the log straight into an interaction store (no CSV in between)."""
    report = ConvertReport(store=os.fspath(store))
    return write_store(
        synthetic_batches(spec),
        store,
        report=report,
        source_attrs={"synthetic": {k: getattr(spec, k) for k in spec.__dataclass_fields__}},
        **store_options,
    )
