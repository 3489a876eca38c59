"""A model report: one self-contained HTML page to look at a trained model.

Panels: loss and seconds per iteration; precision/recall/ndcg/map at k = 1..k_max on a test
store (when given); the popularity of recommended items against the catalogue (coverage, head
and long tail); a few users' history beside their recommendations. ``collect`` gathers the
numbers (streamed, never a whole matrix), ``plots`` draws them (matplotlib, imported only here),
``page`` lays them out; the file is written through ``store.lifecycle.output_file``.

    wals-ooc report MODEL --test TEST -o report.html
    wals_ooc.load(MODEL).report("report.html", test=TEST)
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SettingError


@dataclass
class ReportData:
    """The numbers behind a report (see ``collect``): what the page shows, for tests and reuse."""

    model: str
    interactions: str
    test: str | None
    shape: tuple[int, int]
    nnz: int
    settings: dict
    status: str
    training: dict
    metrics: dict | None
    popularity: dict
    users: list[dict] = field(default_factory=list)


def collect_report(model, test=None, *, k_max: int = 50, sample_users: int = 1000, show_users: int = 4, n: int = 10,
                   user_fraction: float | None = None, seed: int = 0, client=None) -> ReportData:
    """Gather a report's numbers for a fitted or loaded ``WALS`` model.

    test: a held-out store (path or InteractionStore) for metrics at k = 1..k_max. sample_users:
    users whose top-``n`` lists measure popularity and coverage. show_users: users shown with
    their history. user_fraction: evaluate a seeded share of the test users (default all).
    """
    from ..evaluate.metrics import evaluate_curves
    from ..model import _as_store, _check_test_store
    from . import collect

    for name, value, low in (("k_max", k_max, 1), ("sample_users", sample_users, 1), ("show_users", show_users, 0),
                             ("n", n, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise SettingError(f"{name} must be an integer >= {low}, got {value!r}", flags=_FLAGS)
    store = model._data("a report (it shows the training data's popularity and users' history)")
    factors = model.factors_store
    test_store = None
    metrics = None
    if test is not None:
        test_store = _as_store(test, model.storage_options)
        _check_test_store(store, test_store)
        metrics = evaluate_curves(factors, store, test_store, k_max, user_fraction, seed, client, model.threads,
                                  model.memory_budget, model.storage_options)
    sample = collect.sample_user_rows(store.n_users, sample_users, seed)
    rec_rows = np.full((len(sample), n), -1, np.int64)
    batch = 256
    for start in range(0, len(sample), batch):
        rows = sample[start : start + batch]
        ids, scores = model.recommend(collect.ids_of(store, "user", rows), N=n)
        for r, (row_ids, row_scores) in enumerate(zip(ids, scores)):
            shown = [i for i, s in zip(row_ids, row_scores) if s > -np.inf]
            if shown:
                found = store.index_of("item", shown, missing="mark")
                rec_rows[start + r, : len(found)] = found
    examples = collect.example_users(store, sample, show_users, seed)
    attrs = factors.group.attrs
    return ReportData(
        model=factors.location, interactions=store.location, test=None if test_store is None else test_store.location,
        shape=(int(attrs["n_users"]), int(attrs["n_items"])), nnz=int(store.nnz), settings=factors.config.to_dict(),
        status=factors.status(), training=collect.training_part(factors.loss_history), metrics=metrics,
        popularity=collect.popularity_part(store, rec_rows),
        users=collect.user_part(model, store, test_store, examples, n),
    )


_FLAGS = {"k_max": "--k-max", "sample_users": "--sample-users", "show_users": "--show-users", "n must": "-n must"}


def render_report(data: ReportData) -> str:
    """The HTML page of a report's numbers."""
    from . import page, plots

    settings = data.settings
    k_max = max(data.metrics["k"]) if data.metrics else 50
    sections = [
        page.training_section(data.training, plots.training_png(data.training)),
        page.metrics_section(data.metrics, plots.metrics_png(data.metrics) if data.metrics else None, k_max),
        page.popularity_section(data.popularity, plots.popularity_png(data.popularity)),
        page.users_section(data.users, data.test is not None),
    ]
    subtitle = [
        f"{data.shape[0]:,} users x {data.shape[1]:,} items, {data.nnz:,} interactions ({data.interactions})",
        f"{settings['factors']} factors, regularization {settings['regularization']:g}, alpha {settings['alpha']:g}, "
        f"alpha0 {settings['alpha0']:g}, {settings['confidence']} confidence, nu {settings['nu']:g}, "
        f"{settings['solver']} solver; {data.status}",
        (f"test store {data.test}; " if data.test else "") +
        f"made {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
    ]
    return page.page(f"wals-ooc model {os.path.basename(data.model.rstrip('/'))}", subtitle, sections)


def _is_report(path: str) -> bool:
    """Whether ``path`` begins as a page of ``render_report`` does (what ``overwrite`` may replace)."""
    with open(path, "rb") as handle:
        return b"<title>wals-ooc model " in handle.read(512)


def write_report(model, output: str | os.PathLike, test=None, *, overwrite: bool = False, **options: Any) -> str:
    """Collect, render and write a model's report to ``output`` (an .html file), safely: an
    existing file is replaced only with ``overwrite`` and only once the new page is complete.
    Returns the path written. ``options``: those of ``collect_report``."""
    from ..store.lifecycle import output_file

    output = os.fspath(output)
    data = collect_report(model, test, **options)
    text = render_report(data)
    inputs = [data.model, data.interactions] + ([data.test] if data.test else [])
    with output_file(output, overwrite=overwrite, inputs=inputs, owned=_is_report,
                     what="a report written by wals-ooc report") as temp:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
    return output


__all__ = ["ReportData", "collect_report", "render_report", "write_report"]
