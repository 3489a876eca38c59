"""Synthetic interaction logs of any size, generated in bounded memory.

User activity and item popularity follow power laws (a few heavy users and hit items, long
tails); values are counts >= 1. Users and items belong to latent taste clusters, and a user
picks most items from its own cluster, so there is structure for a model to learn and for
ranking metrics to reward. With ``latent_dims`` > 0 the clusters are points in a continuous
taste space instead: each user has its own point there and draws its in-taste rows from every
cluster, weighted by closeness (a softmax of ``sharpness`` times the cosine), so tastes overlap
and neighbouring clusters share users, as in real logs, rather than splitting the catalogue into
disjoint blocks. The same seed gives the same rows.
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
    clusters: latent taste groups; affinity: share of a user's rows drawn from its own group
    (with latent_dims > 0: from the groups near its taste).
    latent_dims: 0 (each user in one group) or the dimension of a continuous taste space in
    which users and groups are random unit vectors; sharpness: how strongly a user prefers the
    groups nearest its taste (softmax temperature 1 / sharpness over cosines).
    """

    n_users: int = 10_000
    n_items: int = 5_000
    rows: int = 200_000
    user_exponent: float = 0.8
    item_exponent: float = 0.9
    clusters: int = 20
    affinity: float = 0.8
    seed: int = 0
    latent_dims: int = 0
    sharpness: float = 10.0

    def __post_init__(self) -> None:
        if min(self.n_users, self.n_items, self.rows) < 1:
            raise SettingError("n_users, n_items and rows must be >= 1",
                               flags={"n_users": "--users", "n_items": "--items", "rows": "--rows"})
        if not 0 <= self.affinity <= 1:
            raise SettingError("affinity must be in [0, 1]")
        if self.clusters < 1:
            raise SettingError("clusters must be >= 1", flags={"clusters": "--clusters"})
        if not (np.isfinite(self.user_exponent) and np.isfinite(self.item_exponent)):
            raise SettingError("user_exponent and item_exponent must be finite numbers")
        if self.latent_dims < 0 or not np.isfinite(self.sharpness) or self.sharpness < 0:
            raise SettingError("latent_dims must be >= 0 and sharpness a finite number >= 0")


def _power_law_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights[rng.permutation(n)]


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _unit_rows(rng: np.random.Generator, n: int, dims: int) -> np.ndarray:
    rows = rng.standard_normal((n, dims)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _taste_clusters(spec: SyntheticSpec, centres: np.ndarray, positions: np.ndarray, users: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """A cluster for each row of ``users`` (sorted), drawn from its user's softmax over clusters
    of ``sharpness`` x cosine; the users' distributions are built a few thousand at a time
    (each as a CDF row offset by its position, so one searchsorted draws for all of them)."""
    out = np.empty(len(users), np.int64)
    k = len(centres)
    step = max(1, (1 << 22) // k)
    distinct, starts = np.unique(users, return_index=True)
    bounds = np.append(starts, len(users))
    for lo in range(0, len(distinct), step):
        chunk = distinct[lo : lo + step]
        logits = spec.sharpness * (positions[chunk] @ centres.T).astype(np.float64)
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        cdf = np.cumsum(weights, axis=1)
        cdf /= cdf[:, -1:]
        cdf[:, -1] = 1.0
        cdf += np.arange(len(chunk))[:, None]
        first, last = bounds[lo], bounds[min(lo + step, len(distinct))]
        owner = np.repeat(np.arange(len(chunk)), np.diff(bounds[lo : lo + len(chunk) + 1]))
        flat = np.searchsorted(cdf.ravel(), owner + rng.random(last - first) * (1 - 1e-12), side="right")
        out[first:last] = np.minimum(flat - owner * k, k - 1)
    return out


def synthetic_batches(spec: SyntheticSpec, batch_rows: int = 1 << 20) -> Iterator[RowBatch]:
    """Rows of the log in batches of about ``batch_rows``; memory ~ (n_users + n_items) * 24
    bytes (plus n_users * latent_dims * 4 for a taste space)."""
    rng = np.random.default_rng(spec.seed)
    activity = _power_law_weights(spec.n_users, spec.user_exponent, rng)
    rows_per_user = activity * (spec.rows / activity.sum())
    popularity = _power_law_weights(spec.n_items, spec.item_exponent, rng)
    item_cluster = rng.integers(0, spec.clusters, spec.n_items)
    user_cluster = rng.integers(0, spec.clusters, spec.n_users)
    global_cdf = _cdf(popularity)
    members = [] if spec.latent_dims else [np.flatnonzero(item_cluster == c) for c in range(spec.clusters)]
    cluster_cdfs = [_cdf(popularity[m]) if len(m) else None for m in members]
    if spec.latent_dims:
        centres = _unit_rows(rng, spec.clusters, spec.latent_dims)
        positions = _unit_rows(rng, spec.n_users, spec.latent_dims)
        # every cluster's members and popularity CDF end to end, cluster c's CDF offset by c, so
        # one searchsorted draws the rows of all clusters (the loop below is per cluster)
        by_cluster = np.argsort(item_cluster, kind="stable")
        sizes = np.bincount(item_cluster, minlength=spec.clusters)
        ends = np.cumsum(sizes)
        running = np.concatenate([[0.0], np.cumsum(popularity[by_cluster])])
        before, total = running[ends - sizes], running[ends] - running[ends - sizes]
        all_cdfs = ((running[1:] - np.repeat(before, sizes)) / np.repeat(np.maximum(total, 1e-300), sizes)
                    + np.repeat(np.arange(spec.clusters), sizes))

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
        if spec.latent_dims:
            rows = np.flatnonzero(own)
            chosen = _taste_clusters(spec, centres, positions, users[rows], rng)
            filled = sizes[chosen] > 0  # (an empty cluster's rows keep their global draw)
            rows, chosen = rows[filled], chosen[filled]
            picks = np.searchsorted(all_cdfs, chosen + rng.random(len(chosen)), side="left")
            items[rows] = by_cluster[np.clip(picks, ends[chosen] - sizes[chosen], ends[chosen] - 1)]
            clusters = np.full(n, -1, np.int64)
            own = np.zeros(n, bool)
        else:
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


CSV_HEADER = b'"user","item","count"'


def _is_generated_csv(path: str) -> bool:
    """Whether ``path`` starts as ``write_csv`` writes (its header, plain or gzip): what
    ``overwrite`` may replace. Any other file (the user's own data) never is."""
    import gzip

    with open(path, "rb") as raw:
        magic = raw.read(2)
    with (gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")) as handle:
        return handle.readline().rstrip(b"\r\n") == CSV_HEADER


def write_csv(spec: SyntheticSpec, path: str | os.PathLike, compress: bool = False, batch_rows: int = 1 << 20,
              overwrite: bool = False) -> int:
    """Write the log as CSV with header ``user,item,count`` (gzip if ``compress``); returns rows.

    Written beside ``path`` and renamed onto it when complete; an existing file is replaced
    only with ``overwrite`` (``store.lifecycle.output_file``)."""
    schema = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("count", pa.int64())])
    rows = 0
    with output_file(path, overwrite=overwrite, owned=_is_generated_csv, what="a log written by wals-ooc generate") as temp:
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
