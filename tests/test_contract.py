"""The model contract: one set of checks that every back end passes (in the spirit of implicit's
shared recommender test base and zarr's ``StoreTests``).

A back end is a scheduler (threads, or a ``distributed.LocalCluster`` of processes), a plan
(resident, or blocked: the fixed side streamed in windows), where the stores live (a local path,
a ``file://`` URL, a ``memory://`` URL, S3 served by moto on 127.0.0.1) and a solver (CG,
Cholesky, iALS++). Every axis value appears in ``BACKENDS``, each with the full set of checks; the
axes are not multiplied out (each back end trains one model, once per module).

The data: a checkerboard (even users play even items, odd users odd items), with one item
withheld from users 0 and 1 that the model must then recommend.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
import pytest

import wals_ooc
from wals_ooc import WALS, WALSConfig, open_store
from wals_ooc.errors import PathError
from wals_ooc.train import train

from .conftest import assert_close_rel, moto_s3, store_to_scipy
from .reference import dense_objective, dense_solve

N_USERS, N_ITEMS, FIRST_ITEM = 40, 20, 100  # item ids 100..119, so a user id is never an item id
WITHHELD = {0: 100, 1: 101}  # user -> the item of its own parity it never played


def _plays() -> dict[int, dict[int, float]]:
    """user -> {item: plays} of the checkerboard, without the withheld pairs."""
    plays = {}
    for user in range(N_USERS):
        liked = [FIRST_ITEM + i for i in range(N_ITEMS) if i % 2 == user % 2]
        plays[user] = {item: float(1 + (user + item) % 3) for item in liked if WITHHELD.get(user) != item}
    return plays


@dataclass(frozen=True)
class Backend:
    scheduler: str  # "threads" or "cluster"
    plan: str  # "resident" or "blocked"
    location: str  # "path", "file", "memory" or "s3"
    solver: str  # "cg", "cholesky" or "ialspp"

    def __str__(self) -> str:
        return f"{self.scheduler}-{self.plan}-{self.location}-{self.solver}"


BACKENDS = [
    Backend("threads", "resident", "path", "cholesky"),
    Backend("threads", "blocked", "memory", "cg"),
    Backend("threads", "resident", "s3", "cholesky"),  # moto is slow per object: threads keep it short
    Backend("cluster", "blocked", "file", "cholesky"),
    Backend("cluster", "resident", "path", "cg"),
    Backend("threads", "resident", "path", "ialspp"),  # blocks of 2 of the 3 coordinates, swept to convergence
]
TOLERANCE = {"cholesky": 1e-9, "cg": 1e-6, "ialspp": 1e-6}


@dataclass
class Trained:
    backend: Backend
    model: WALS
    store: str
    location: str
    options: dict | None
    config: WALSConfig
    calls: list = field(default_factory=list)


@pytest.fixture(scope="module")
def checkerboard_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("contract") / "plays.csv"
    lines = [f"{user},{item},{value:g}" for user, items in _plays().items() for item, value in items.items()]
    path.write_text("user,item,plays\n" + "\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def s3_options():
    """A moto S3 server on 127.0.0.1 with a bucket, and the storage options that reach it."""
    with moto_s3("contract") as options:
        yield options


def _places(backend: Backend, tmp_path, request) -> tuple[str, str, dict | None]:
    """(store URL, model URL, storage options) for a back end's kind of location."""
    tag = uuid.uuid4().hex[:8]
    if backend.location == "path":
        return str(tmp_path / "plays.zarr"), str(tmp_path / "model.zarr"), None
    if backend.location == "file":
        return f"file://{tmp_path}/plays.zarr", f"file://{tmp_path}/model.zarr", None
    if backend.location == "memory":
        return f"memory://contract-{tag}/plays.zarr", f"memory://contract-{tag}/model.zarr", None
    options = request.getfixturevalue("s3_options")
    return f"s3://contract/{tag}/plays.zarr", f"s3://contract/{tag}/model.zarr", options


@pytest.fixture(scope="module", params=BACKENDS, ids=str)
def trained(request, tmp_path_factory, checkerboard_csv) -> Trained:
    """One model per back end, trained once for the whole contract."""
    backend = request.param
    client = request.getfixturevalue("cluster") if backend.scheduler == "cluster" else None
    store, location, options = _places(backend, tmp_path_factory.mktemp(str(backend)), request)
    wals_ooc.convert(checkerboard_csv, store, row_block=8, shard_nnz=60, progress=False, storage_options=options)
    settings = dict(factors=3, iterations=5, regularization=1.0, alpha=2.0, random_state=3, solver=backend.solver,
                    cg_steps=8, dtype="float64")
    if backend.solver == "ialspp":
        settings.update(block_size=2, block_sweeps=60)
    calls: list = []
    callback = lambda iteration, seconds, loss: calls.append((iteration, seconds, loss))  # noqa: E731
    if backend.plan == "resident":
        model = WALS(**settings, threads=2).fit(store, location, client=client, callback=callback, progress=False,
                                                storage_options=options)
        assert all(plan.mode == "resident" for plan in model.plan(store, client=client, factors_store=location,
                                                                  storage_options=options).sides.values())
    else:  # the fixed side streamed in windows of 7 rows, as a budget too small for it would make it
        factors = train(open_store(store, options), location, WALSConfig(**settings), client=client, threads=2,
                        max_block_rows=7, callback=callback, progress=False, storage_options=options)
        model = wals_ooc.load(factors.location, storage_options=options)
    return Trained(backend, model, store, location, options, model.config, calls)


class TestModelContract:
    """The checks every back end passes."""

    def test_recommends_the_withheld_item(self, trained):
        for user, item in WITHHELD.items():
            ids, scores = trained.model.recommend(user, N=3)
            assert ids[0] == item, (ids, scores)

    def test_a_batch_equals_its_users_one_by_one(self, trained):
        users = [0, 1, 5, 8, 13]
        ids, scores = trained.model.recommend(users, N=4)
        assert ids.shape == scores.shape == (len(users), 4)
        for row, user in enumerate(users):
            one_ids, one_scores = trained.model.recommend(user, N=4)
            assert one_ids.ndim == 1  # one id: 1-D results
            np.testing.assert_array_equal(one_ids, ids[row])
            np.testing.assert_allclose(one_scores, scores[row], rtol=1e-6)

    def test_filters_liked_items_and_restricts_to_items(self, trained):
        user = 3
        liked = set(_plays()[user])
        kept, _ = trained.model.recommend(user, N=N_ITEMS, filter_already_liked=True)
        assert not liked & set(kept.tolist()) and len(kept) == N_ITEMS - len(liked)
        everything, all_scores = trained.model.recommend(user, N=N_ITEMS, filter_already_liked=False)
        assert set(everything[: len(liked)].tolist()) == liked  # what it played ranks first
        subset = [FIRST_ITEM + 2, FIRST_ITEM + 3, FIRST_ITEM + 8, FIRST_ITEM + 11]
        some, some_scores = trained.model.recommend(user, N=10, filter_already_liked=False, items=subset)
        assert sorted(some.tolist()) == sorted(subset)
        expected = {int(i): s for i, s in zip(everything, all_scores)}
        np.testing.assert_allclose(some_scores, [expected[int(i)] for i in some], rtol=1e-6)
        assert list(some_scores) == sorted(some_scores, reverse=True)

    def test_load_round_trip(self, trained):
        loaded = wals_ooc.load(trained.location, storage_options=trained.options)
        np.testing.assert_array_equal(loaded.user_factors[:], trained.model.user_factors[:])
        np.testing.assert_array_equal(loaded.item_factors[:], trained.model.item_factors[:])
        assert loaded.loss_history == trained.model.loss_history
        assert loaded.config.objective_dict() == trained.config.objective_dict()
        for user in (0, 7):
            a, b = loaded.recommend(user, N=5), trained.model.recommend(user, N=5)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_allclose(a[1], b[1], rtol=1e-6)

    def test_callback_reports_every_iteration(self, trained):
        assert [c[0] for c in trained.calls] == list(range(1, trained.config.iterations + 1))
        assert all(seconds > 0 for _, seconds, _ in trained.calls)
        assert [c[2] for c in trained.calls] == pytest.approx([e["loss"] for e in trained.model.loss_history])

    def test_loss_never_rises(self, trained):
        losses = [entry["loss"] for entry in trained.model.loss_history]
        assert len(losses) == trained.config.iterations
        assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(losses, losses[1:])), losses
        assert losses[-1] < losses[0]

    def test_equals_the_dense_reference(self, trained):
        """The last item half-sweep is the closed-form solve against the final user factors, and
        the reported loss is the dense objective of the final factors."""
        cfg = trained.config
        R = store_to_scipy(open_store(trained.store, trained.options))
        X, Y = trained.model.user_factors[:], trained.model.item_factors[:]
        kwargs = dict(kind=cfg.confidence, alpha=cfg.alpha, alpha0=cfg.alpha0, eps=cfg.eps, lam=cfg.regularization,
                      nu=cfg.nu)
        assert_close_rel(Y, dense_solve(R.T.tocsr(), X, **kwargs), TOLERANCE[cfg.solver])
        assert trained.model.loss_history[-1]["loss"] == pytest.approx(dense_objective(R, X, Y, **kwargs), rel=1e-9)


def test_a_memory_url_with_a_cluster_is_refused_before_anything_is_written(checkerboard_csv, cluster):
    """A memory:// store lives in this process: worker processes cannot reach it."""
    import fsspec

    store, location = "memory://contract-refused/plays.zarr", "memory://contract-refused/model.zarr"
    wals_ooc.convert(checkerboard_csv, store, row_block=8, progress=False)
    model = WALS(factors=4, iterations=1, random_state=0)
    with pytest.raises(PathError, match="memory://contract-refused/plays.zarr lives in this process's memory"):
        model.fit(store, location, client=cluster, progress=False)
    assert not fsspec.filesystem("memory").exists("/contract-refused/model.zarr")
