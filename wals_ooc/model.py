"""The user-facing model: ``WALS`` (fit, recommend, similar, fold-in, evaluate) and ``load``.

In the spirit of ``implicit.als.AlternatingLeastSquares``, but the data and the factors stay on
disk: ``fit`` takes an interaction store and writes a factor store; the serving methods take and
return original ids.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import zarr

from .config import WALSConfig
from .errors import DataMismatchError, IncompleteModelWarning, SettingError, StoreError
from .evaluate.metrics import evaluate as evaluate_model
from .execute import checked_threads
from .index import AnnIndex, IndexSettings, approximate_top_k, resolve_index, subset_csr
from .kernels.warm import warm_serving_kernels
from .memory import MemoryBudget, to_bytes
from .serve.compat import pick, user_items_csr, with_excluded
from .serve.fold_in import fold_in, merge_entries
from .serve.ids import model_ids, original_ids
from .serve.liked import liked_csr
from .serve.recommend import item_source, recommend_all as recommend_all_shards, score_block_rows
from .serve.scoring import FactorSource, top_k
from .store.format import read
from .store.reader import IdMaps, InteractionStore
from .train.factors import FactorStore, check_interactions_match
from .train.plan import TrainingPlan
from .train.trainer import train

if TYPE_CHECKING:
    from .store.names import NameIndex


def _as_store(store: InteractionStore | str | os.PathLike, storage_options: dict | None) -> InteractionStore:
    return store if isinstance(store, InteractionStore) else InteractionStore(store, storage_options)


_D = WALSConfig()  # the defaults live in WALSConfig only


class WALS:
    """Implicit-feedback ALS (Hu, Koren & Volinsky 2008; Rendle et al. 2022 options) out of core.

    Parameters are those of ``WALSConfig``; ``memory_budget`` caps each stage's peak RSS (bytes
    or "8GB"; default half the RAM) and ``threads`` the local task threads (default all cores).
    """

    def __init__(
        self,
        factors: int = _D.factors,
        regularization: float = _D.regularization,
        alpha: float = _D.alpha,
        alpha0: float = _D.alpha0,
        confidence: str = _D.confidence,
        eps: float = _D.eps,
        nu: float = _D.nu,
        iterations: int = _D.iterations,
        solver: str = _D.solver,
        cg_steps: int = _D.cg_steps,
        block_size: int = _D.block_size,
        block_sweeps: int | None = _D.block_sweeps,
        first_sweeps: int | None = _D.first_sweeps,
        dtype: str = _D.dtype,
        random_state: int | None = _D.random_state,
        init_scale: float = _D.init_scale,
        compute_loss: bool = _D.compute_loss,
        half_gathers: bool = _D.half_gathers,
        eigenbasis: bool = _D.eigenbasis,
        cg_preconditioner: str = _D.cg_preconditioner,
        memory_budget: int | str | None = None,
        threads: int | None = None,
    ) -> None:
        self.config = WALSConfig(
            factors=factors, regularization=regularization, alpha=alpha, alpha0=alpha0, confidence=confidence,
            eps=eps, nu=nu, iterations=iterations, solver=solver, cg_steps=cg_steps, block_size=block_size,
            block_sweeps=block_sweeps, first_sweeps=first_sweeps, dtype=dtype,
            random_state=random_state, init_scale=init_scale, compute_loss=compute_loss, half_gathers=half_gathers,
            eigenbasis=eigenbasis,
            cg_preconditioner=cg_preconditioner,
        )
        to_bytes(memory_budget)  # refused here (NaN, "lots", -1GB), before anything is read or written
        self.memory_budget = memory_budget
        self.threads = checked_threads(threads)
        self.interactions: InteractionStore | None = None
        self.factors_store: FactorStore | None = None
        self.storage_options: dict | None = None
        self.interactions_problem: str | None = None  # why ``interactions`` is None for a loaded model

    # -- training -------------------------------------------------------------------------------
    def fit(
        self,
        store: InteractionStore | str | os.PathLike,
        factors_store: str | os.PathLike | None = None,
        client: Any = None,
        resume: bool = True,
        callback: Callable[[int, float, float | None], None] | None = None,
        progress: bool | None = None,
        storage_options: dict | None = None,
    ) -> WALS:
        """Train on an interaction store, writing factors to ``factors_store``.

        Default ``factors_store``: ``<store>-model.zarr`` beside the store, or, when that holds a
        model of other settings or data, ``<store>-model-<factors>f-<tag>.zarr`` named after the
        settings (see ``train.naming``): fitting other settings never collides. With ``resume`` an
        existing factor store of the same data and settings continues from its last completed
        half-sweep (also to train further after raising ``iterations``). ``client``: a
        distributed Client to run the shard solves on its workers.
        """
        self.storage_options = storage_options
        self.interactions = _as_store(store, storage_options)
        if factors_store is None:  # one model per data and settings (``train.naming``)
            from .train.naming import model_location_for

            location = model_location_for(self.interactions, self.config, resume)
        else:
            location = os.fspath(factors_store)
        self.factors_store = train(
            self.interactions, location, self.config, client=client, threads=self.threads, resume=resume,
            callback=callback, progress=progress, memory_budget=self.memory_budget, storage_options=storage_options,
        )
        self.interactions_problem = None
        return self

    def plan(self, store: InteractionStore | str | os.PathLike, client: Any = None,
             factors_store: str | os.PathLike | None = None, resume: bool = True,
             storage_options: dict | None = None) -> TrainingPlan:
        """What ``fit`` would do, without running or writing anything: both half-sweep plans
        (tasks, rows, resident or blocked, expected peak against the allowance), the budget and
        where the model would go. ``print`` it to read it. A plan over its allowance also warns
        (``BudgetWarning``), as ``fit`` does before it starts."""
        from .train.trainer import plan_training

        interactions = _as_store(store, storage_options)
        if factors_store is None:
            from .train.naming import model_location_for

            location = model_location_for(interactions, self.config, resume)
        else:
            location = os.fspath(factors_store)
        return plan_training(interactions, self.config, client=client, threads=self.threads,
                             memory_budget=self.memory_budget, model_location=location, resume=resume)

    def _trained(self) -> tuple[InteractionStore | None, FactorStore]:
        """(the interaction store, or None when it is not available; the factor store)."""
        if self.factors_store is None:
            raise StoreError("the model has no factors: fit it or wals_ooc.load() a trained one")
        return self.interactions, self.factors_store

    def id_maps(self) -> IdMaps:
        """The model's own copy of its id maps (``index_of``, ``ids_of``, ``id_kinds``): original
        ids <-> rows, looked up chunk by chunk; no interaction store needed."""
        return self._ids()

    def _ids(self) -> IdMaps:
        """The model's own copy of its id maps (serving ids needs no interaction store)."""
        return model_ids(self._trained()[1])

    def _data(self, need: str, no_filter_hint: bool = False) -> InteractionStore:
        """The interaction store the model was trained on, or a clear error saying why not."""
        store, model = self._trained()
        if store is not None:
            return store
        alternative = ", or pass filter_already_liked=False" if no_filter_hint else ""
        raise DataMismatchError(
            f"{self.interactions_problem or 'the model has no interaction store'}: {need} needs the interaction store "
            f"it was trained on; pass interactions=PATH{alternative}",
            flags={"interactions=PATH": "--interactions PATH", "filter_already_liked=False": "--no-filter"},
        )

    # -- factors --------------------------------------------------------------------------------
    @property
    def user_factors(self) -> zarr.Array:
        """Current user factors (n_users x f) as a Zarr array: slice it, nothing is loaded."""
        return self._trained()[1].current("user")

    @property
    def item_factors(self) -> zarr.Array:
        return self._trained()[1].current("item")

    @property
    def loss_history(self) -> list[dict]:
        """One dict per finished iteration: iteration (from 1, as in the fit callback), loss,
        seconds, user_seconds, item_seconds."""
        return self._trained()[1].loss_history

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(user_factors, item_factors) as NumPy arrays: loads both whole, so check they fit."""
        model = self._trained()[1]
        needed = model.current("user").nbytes + model.current("item").nbytes
        if needed > to_bytes(self.memory_budget):
            raise MemoryError(f"factors take {needed} bytes, over the memory budget; slice user_factors instead")
        return read(model.current("user"), ...), read(model.current("item"), ...)

    def to_implicit(self) -> Any:
        """An ``implicit.cpu.als.AlternatingLeastSquares`` holding these factors (loads them)."""
        from implicit.cpu.als import AlternatingLeastSquares

        users, items = self.to_numpy()
        cfg = self.config
        model = AlternatingLeastSquares(factors=cfg.factors, regularization=cfg.regularization, alpha=cfg.alpha,
                                        iterations=cfg.iterations, dtype=cfg.np_dtype)
        model.user_factors, model.item_factors = users, items
        return model

    # -- serving --------------------------------------------------------------------------------
    def _allowance(self) -> int:
        warm_serving_kernels()
        return MemoryBudget.start(self.memory_budget).allowance

    def _liked(self, side: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CSR (indptr, sorted ids) of the stored entries of the given rows."""
        return liked_csr(self._data("filtering already-liked items", no_filter_hint=True), side, rows)

    def recommend(
        self,
        user_ids: Any,
        N: int = 10,
        filter_already_liked: bool | None = None,
        items: Iterable | None = None,
        user_vectors: np.ndarray | None = None,
        index: AnnIndex | str | os.PathLike | bool | None = None,
        *,
        names: bool = False,
        exclude_items: Iterable | None = None,
        user_items: Any = None,
        recalculate_user: bool = False,
        filter_already_liked_items: bool | None = None,
        filter_items: Iterable | None = None,
    ) -> tuple[np.ndarray, ...]:
        """Top-N (original item ids, scores) for each user, best first; with ``names=True`` also
        the items' display names (None where an item has none; see ``wals_ooc.add_names``).

        filter_already_liked (default True): leave out the items each user has in the interaction
        store (or in ``user_items`` when given). items: restrict candidates to these original item
        ids (only they are returned). exclude_items: original item ids never to return.
        user_vectors: score these vectors (e.g. from ``recalculate_user``) instead of the stored
        users' factors. index: answer from an approximate index over the item factors
        (``build_index``): True for the one beside the model, a path, or an ``AnnIndex``;
        already-liked items are still filtered exactly, and scores are exact (``items`` is always
        answered exactly).

        No result is ever padding. One user id (not a list) gives 1-D arrays of exactly its
        results (fewer than N when fewer candidates are left). A batch gives 2-D arrays
        (n_users, K) as ``implicit`` does, K <= N the most results any user has; they are
        ``numpy.ma.MaskedArray`` s, and a user with fewer results than K (most items already
        liked) has its trailing slots masked: ``ids[k].compressed()`` is exactly user k's
        results, and ``ids.mask`` is all False when every user has K.

        implicit's names are accepted with implicit's meanings (see ``serve/compat.py``):
        ``filter_already_liked_items`` (= filter_already_liked), ``filter_items`` (=
        exclude_items), and ``user_items``: a scipy sparse matrix, one row per requested user and
        one column per item row of the model (``id_maps().ids_of("item", rows)``), used to filter
        instead of the store and, with ``recalculate_user=True``, to fold the users in afresh.
        A name given twice with different values raises ``SettingError``.
        """
        _check_n(N)
        filter_already_liked = pick("filter_already_liked", filter_already_liked, "filter_already_liked_items",
                                    filter_already_liked_items, True)
        exclude_items = pick("exclude_items", exclude_items, "filter_items", filter_items)
        model = self._trained()[1]
        store = self._ids()
        single = user_ids is not None and np.ndim(user_ids) == 0
        given = None
        if user_items is not None:
            if single:
                n_queries = 1
            elif user_ids is not None:
                n_queries = len(user_ids)
            elif user_vectors is not None:
                n_queries = len(np.atleast_2d(user_vectors))
            else:
                raise SettingError("give user_ids (the users user_items holds the rows of)")
            given = user_items_csr(user_items, n_queries, store.n_items)
        if recalculate_user:
            if given is None:
                raise SettingError("recalculate_user=True needs user_items: the users' interactions to fold in")
            if user_vectors is not None:
                raise SettingError("recalculate_user=True computes the user vectors from user_items: pass it or "
                                   "user_vectors, not both")
            indptr, columns, values = given
            user_vectors = np.stack([self._fold_in("user", columns[a:b], values[a:b])
                                     for a, b in zip(indptr[:-1], indptr[1:])])
        if user_vectors is None:
            rows = store.index_of("user", user_ids)
            queries = _rows_of(model.current("user"), rows)
        else:  # new users may be unknown to the store: they have nothing to filter
            queries = _checked_vectors(user_vectors, model.config.factors, "user_vectors")
            if user_ids is not None and not single and len(user_ids) != len(queries):
                raise SettingError(f"user_vectors has {len(queries)} rows but {len(user_ids)} user_ids were given")
            rows = store.index_of("user", user_ids, missing="mark") if user_ids is not None else np.full(len(queries), -1)
        candidates = None if items is None else np.unique(store.index_of("item", list(items)))
        excluded = None if exclude_items is None else np.unique(store.index_of("item", list(exclude_items)))
        exclude = None
        if filter_already_liked:
            exclude = (given[0], given[1]) if given is not None else self._liked("user", rows)
        exclude = with_excluded(exclude, excluded, len(queries))
        allowance = self._allowance()
        source = item_source(model, allowance, score_block_rows(len(queries), queries.shape[1], allowance))
        ann = resolve_index(index, model, "item", "inner_product", self.memory_budget) if candidates is None else None
        width = N if candidates is None else min(N, len(candidates))
        if ann is not None:
            ids, scores = _approximate(ann, queries, source, width, exclude, self.threads)
        else:
            ids, scores, _ = top_k(queries, source, width, exclude=exclude, candidates=candidates)
        return self._answer("item", ids, scores, names, single)

    def _answer(self, side: str, rows: np.ndarray, scores: np.ndarray, names: bool, one: bool) -> tuple[np.ndarray, ...]:
        """Rows of results (-1: no result) as original ids and scores without padding (see
        ``recommend``), and their names when asked."""
        store = self._ids()
        found = (rows >= 0).sum(axis=1)
        width = int(found.max()) if len(found) else 0
        rows, scores = rows[:, :width], scores[:, :width]
        if one:  # one query: exactly its results
            rows, scores = rows[0, : found[0]], scores[0, : found[0]]
            one_out = [original_ids(store, side, rows), scores]
            if names:
                one_out.append(self._names_of_rows(side, rows))
            return tuple(one_out)
        mask = np.arange(width)[None, :] >= found[:, None]
        out: list[np.ndarray] = [np.ma.MaskedArray(original_ids(store, side, rows), mask=mask),
               np.ma.MaskedArray(scores, mask=mask.copy())]
        if names:
            out.append(np.ma.MaskedArray(self._names_of_rows(side, rows), mask=mask.copy()))
        return tuple(out)

    # -- display names --------------------------------------------------------------------------
    def _name_map(self, side: str) -> NameIndex | None:
        """The names of a side: the model's own copy, else (a model trained before names were
        added) those of the interaction store it is bound to; None when neither has any."""
        names = self._ids().name_map(side)
        if names is None and self.interactions is not None:
            names = self.interactions.name_map(side)
        return names

    def _names_of_rows(self, side: str, rows: np.ndarray) -> np.ndarray:
        names = self._name_map(side)
        rows = np.asarray(rows, np.int64)
        if names is None:
            out = np.empty(rows.shape, dtype=object)
            out[...] = None
            return out
        return names.names_of(rows)

    def names_of(self, ids: Any, side: str = "item") -> np.ndarray:
        """Display names of original ids (None where one has no name); unknown ids raise."""
        return self._names_of_rows(side, self._ids().index_of(side, ids))

    def id_of_name(self, name: str, side: str = "item") -> Any:
        """The original id of the one item (or user) called ``name``: an exact match first, else
        one ignoring case. Unknown: ``UnknownIdError``; several: ``AmbiguousNameError`` (both
        list what they can). Reads the name index chunk by chunk, never all names."""
        from .store.names import row_of_name

        ids = self._ids()
        row = row_of_name(self._name_map(side), ids.id_map(side), name, side)
        return ids.ids_of(side, np.array([row]))[0]
    def recommend_all(self, N: int = 10, output: str | os.PathLike | None = None, filter_already_liked: bool | None = None,
                      format: str = "zarr", client: Any = None, overwrite: bool = False,
                      index: str | os.PathLike | bool | None = None, *,
                      filter_already_liked_items: bool | None = None) -> str:
        """Write top-N for every user to ``output`` (Zarr group or Parquet directory), streaming shards.

        Written through ``store.lifecycle``: an existing output is replaced only with ``overwrite``
        and only once the new one is complete. index: answer from an approximate index over the
        item factors (True: the one beside the model, or its path; see ``recommend``).
        filter_already_liked_items: implicit's name for filter_already_liked (default True)."""
        _check_n(N)
        filter_already_liked = pick("filter_already_liked", filter_already_liked, "filter_already_liked_items",
                                    filter_already_liked_items, True)
        store, model = self._trained()
        if filter_already_liked:
            store = self._data("filtering already-liked items", no_filter_hint=True)
        output = os.fspath(output) if output is not None else model.location.rstrip("/") + f"-top{N}" + (".zarr" if format == "zarr" else "")
        ann = resolve_index(index, model, "item", "inner_product", self.memory_budget)
        return recommend_all_shards(model, store, output, N, filter_already_liked, format, client, self.threads,
                                    self.memory_budget, self.storage_options, overwrite,
                                    index=None if ann is None else (ann.location, ann.settings.ef_search, ann.settings.nprobe,
                                                                     ann.settings.candidates))

    def _similar(self, side: str, ids: Any, N: int, filter_self: bool, index: Any = None, names: bool = False, *,
                 recalculate: bool = False, interactions: Any = None, exclude_ids: Iterable | None = None,
                 candidate_ids: Iterable | None = None) -> tuple[np.ndarray, ...]:
        _check_n(N)
        other = "item" if side == "user" else "user"
        if ids is None:
            raise SettingError(f"give the {side} ids to find similar {side}s for")
        model = self._trained()[1]
        store = self._ids()
        single = np.ndim(ids) == 0
        array = model.current(side)
        allowance = self._allowance()
        if recalculate:  # implicit's recalculate_item: fold the rows in afresh from their interactions
            if interactions is None:
                raise SettingError(f"recalculate_{side}=True needs {side}_{other}s: the {side}s' interactions to "
                                   "fold in")
            rows = store.index_of(side, ids, missing="mark")  # new ids may be unknown to the model
            indptr, columns, values = user_items_csr(interactions, len(rows), store.n_rows(other), side=side)
            vectors = np.stack([self._fold_in(side, columns[a:b], values[a:b])
                                for a, b in zip(indptr[:-1], indptr[1:])])
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            queries = (vectors / np.where(norms == 0, 1, norms)).astype(array.dtype)
        else:
            if interactions is not None:
                raise SettingError(f"{side}_{other}s is read with recalculate_{side}=True only")
            rows = store.index_of(side, ids)
        source = FactorSource(array, score_block_rows(len(rows), array.shape[1], allowance), normalized=True)
        candidates = None if candidate_ids is None else np.unique(store.index_of(side, list(candidate_ids)))
        ann = resolve_index(index, model, side, "cosine", self.memory_budget) if candidates is None else None
        stored = ann is not None and not recalculate
        if ann is not None and stored:  # the index holds the rows as the exact scan normalizes them: no factor read
            queries = ann.vectors(rows)
        elif not recalculate:
            queries = source.rows(rows)
        exclude = None
        if filter_self:  # each query's own row (a new, unknown one has none)
            own = rows >= 0
            self_indptr = np.zeros(len(rows) + 1, np.int64)
            np.cumsum(own, out=self_indptr[1:])
            exclude = (self_indptr, rows[own].astype(np.int64))
        excluded = None if exclude_ids is None else np.unique(store.index_of(side, list(exclude_ids)))
        exclude = with_excluded(exclude, excluded, len(queries))
        width = N if candidates is None else min(N, len(candidates))
        if ann is not None:
            ids_out, scores = _approximate(ann, queries, source, width, exclude, self.threads, stored=stored)
        else:
            ids_out, scores, _ = top_k(queries, source, width, exclude=exclude, candidates=candidates)
        return self._answer(side, ids_out, scores, names, single)

    def similar_items(
        self,
        item_ids: Any = None,
        N: int = 10,
        filter_self: bool = False,
        index: AnnIndex | str | os.PathLike | bool | None = None,
        names: bool = False,
        *,
        itemid: Any = None,
        recalculate_item: bool = False,
        item_users: Any = None,
        filter_items: Iterable | None = None,
        items: Iterable | None = None,
    ) -> tuple[np.ndarray, ...]:
        """The N items most similar (cosine of factors) to each given item; itself first unless
        filtered. Returns (ids, scores), and with ``names=True`` the items' display names too.
        One item id (not a list) gives 1-D arrays of exactly its results; a batch gives 2-D
        masked arrays without padding (see ``recommend``: fewer than N columns when the
        catalogue is smaller).

        index: answer from an approximate cosine index over the item factors (``build_index(side=
        "item", metric="cosine")``; True: the one beside the model). To start from a name, look
        its id up with ``id_of_name``.

        implicit's names are accepted with implicit's meanings (see ``serve/compat.py``):
        ``itemid`` (= item_ids), ``filter_items`` (original item ids never to return),
        ``items`` (only these original item ids are candidates; answered exactly), and
        ``recalculate_item=True`` with ``item_users``: a scipy sparse matrix, one row per
        requested item and one column per user row of the model, whose rows are folded in
        afresh (new items welcome) instead of reading the stored factors.
        """
        item_ids = pick("item_ids", item_ids, "itemid", itemid)
        return self._similar("item", item_ids, N, filter_self, index, names, recalculate=recalculate_item,
                             interactions=item_users, exclude_ids=filter_items, candidate_ids=items)

    def similar_users(
        self,
        user_ids: Any = None,
        N: int = 10,
        filter_self: bool = False,
        index: AnnIndex | str | os.PathLike | bool | None = None,
        names: bool = False,
        *,
        userid: Any = None,
        filter_users: Iterable | None = None,
        users: Iterable | None = None,
    ) -> tuple[np.ndarray, ...]:
        """The N users most similar (cosine of factors) to each given user (see ``similar_items``).

        implicit's names: ``userid`` (= user_ids), ``filter_users`` (original user ids never to
        return) and ``users`` (only these are candidates)."""
        user_ids = pick("user_ids", user_ids, "userid", userid)
        return self._similar("user", user_ids, N, filter_self, index, names, exclude_ids=filter_users,
                             candidate_ids=users)

    def export(self, output: str | os.PathLike, format: str = "parquet", overwrite: bool = False) -> str:
        """Write the factors with their original ids for other systems (see ``serve/export.py``):
        "parquet" (a directory: users.parquet and items.parquet, columns id and factors, a row
        group per row block), "npz", or "implicit" (a .npz ``implicit``'s ``load`` reads)."""
        from .serve.export import export_factors

        return export_factors(self._trained()[1], os.fspath(output), format, overwrite)

    def build_index(self, side: str = "item", metric: str | None = None, location: str | os.PathLike | None = None,
                    kind: str = "hnsw", hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 128,
                    nlist: int | None = None, nprobe: int = 32, max_fetch: int = 1024, mips: str = "native",
                    overwrite: bool = False, progress: Any = None, candidates: int | None = None) -> AnnIndex:
        """Build an approximate-nearest-neighbour index (faiss) over the current ``side`` factors,
        streamed from the factor store, and save it (default: beside the model).

        metric: "inner_product" (recommend; the default for items) or "cosine" (similar_*; the
        default for users). kind: "hnsw" (graph) or "ivf" (k-means cells); mips: how an
        inner-product index searches, "native" or "l2" (the MIPS-to-L2 reduction: one extra
        coordinate per row, searched as a Euclidean index; better recall when norms are not
        extreme); candidates: fewest candidates per query re-scored exactly (None: 64 for cosine,
        none for inner product); the other settings trade recall for speed (``IndexSettings``). Written through the lifecycle door: an
        existing index is replaced only with ``overwrite``. Retraining the model makes the index
        stale: serving with it is then refused until it is rebuilt."""
        model = self._trained()[1]
        settings = IndexSettings(kind=kind, hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search,
                                 nlist=nlist, nprobe=nprobe, max_fetch=max_fetch, mips=mips, candidates=candidates)
        return AnnIndex.build(model, None if location is None else os.fspath(location), side=side, metric=metric, settings=settings,
                              memory_budget=self.memory_budget, threads=self.threads, overwrite=overwrite,
                              progress=progress)

    def _recalculate(self, side: str, interactions: Any) -> np.ndarray:
        other = "item" if side == "user" else "user"
        ids, values = _pairs(interactions)
        columns = self._ids().index_of(other, ids)  # unknown ids: UnknownIdError naming them
        return self._fold_in(side, columns, values)

    def _fold_in(self, side: str, columns: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Factors of one ``side`` row with entries at rows ``columns`` of the other side."""
        model = self._trained()[1]
        other = "item" if side == "user" else "user"
        columns, values = merge_entries(columns, values)
        fixed = model.current(other)
        rows = _rows_of(fixed, columns)
        gram = model.gram(other, model.trained().slots[other])
        return fold_in(columns, values, rows, gram, fixed.shape[0], model.config)

    def recalculate_user(self, interactions: Any) -> np.ndarray:
        """Factors of a new or changed user from its interactions, without retraining.

        interactions: {item_id: value}, or (item_ids, values), or a list of item ids (value 1).
        Solved exactly against the frozen item factors with the model's settings.
        """
        return self._recalculate("user", interactions)

    def recalculate_item(self, interactions: Any) -> np.ndarray:
        """Factors of a new or changed item from {user_id: value} (see ``recalculate_user``)."""
        return self._recalculate("item", interactions)

    def evaluate(self, test: InteractionStore | str, k: int = 10, user_fraction: float | None = None, seed: int = 0,
                 client: Any = None, auc: bool = True, auc_fraction: float | None = None) -> dict:
        """Ranking metrics at k on a held-out store made by ``wals_ooc.split`` (see ``evaluate``;
        ``auc=False`` leaves AUC out, ``auc_fraction`` computes it for a seeded share of the users)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise SettingError(f"k must be an integer >= 1, got {k!r}", flags={"k must": "-k must"})
        if user_fraction is not None and not 0 < user_fraction <= 1:
            raise SettingError(f"user_fraction must be in (0, 1], got {user_fraction}",
                               flags={"user_fraction": "--user-fraction"})
        model = self._trained()[1]
        store = self._data("evaluate (it leaves out each user's training items)")
        test_store = _as_store(test, self.storage_options)
        _check_test_store(store, test_store)
        return evaluate_model(model, store, test_store, k, user_fraction, seed, client,
                              self.threads, self.memory_budget, self.storage_options, auc=auc, auc_fraction=auc_fraction)

    def report(self, output: str | os.PathLike, test: InteractionStore | str | None = None, *, overwrite: bool = False,
               **options: Any) -> str:
        """Write an HTML page to look at this model (see ``wals_ooc.report``): loss and seconds per
        iteration, metrics at k = 1..k_max on ``test`` (when given), popularity of recommended
        items against the catalogue, and a few users' history beside their recommendations.
        Returns the path written; ``options``: those of ``wals_ooc.report.collect_report``."""
        from .report import write_report

        return write_report(self, output, test, overwrite=overwrite, **options)


def _approximate(ann: AnnIndex, queries: np.ndarray, source: FactorSource, n: int,
                 exclude: tuple[np.ndarray, np.ndarray] | None, threads: int | None,
                 stored: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-n from the index, excluded ids dropped exactly; queries it cannot fill answered exactly."""
    def exact(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sub = None if exclude is None else subset_csr(exclude[0], exclude[1], positions)
        ids, scores, _ = top_k(queries[positions], source, n, exclude=sub)
        return ids, scores

    ids, scores, _ = approximate_top_k(ann, queries, n, exclude, exact, threads=threads or os.cpu_count() or 1,
                                       stored=stored)
    return ids, scores


def _check_n(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        if hasattr(n, "tocsr"):  # implicit's recommend(userid, user_items, N): ours has no user_items there
            raise SettingError(f"N must be an integer >= 1, got a {type(n).__name__}: implicit's user_items matrix "
                               "goes in user_items= (by keyword) here; see the README, 'Coming from implicit'")
        raise SettingError(f"N must be an integer >= 1, got {n!r}", flags={"N must": "-n must"})


def _checked_vectors(vectors: Any, factors: int, name: str) -> np.ndarray:
    """``vectors`` as a 2-D array of rows of ``factors`` finite numbers, else SettingError (a NaN
    row scored nothing and answered an empty list; a wrong width failed inside NumPy)."""
    try:
        queries = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    except (TypeError, ValueError):
        raise SettingError(f"{name} must be numbers, one row of {factors} per query") from None
    if queries.ndim != 2 or queries.shape[1] != factors:
        raise SettingError(f"{name} must have {factors} columns (the model's factors), got shape {queries.shape}")
    bad = ~np.isfinite(queries).all(axis=1)
    if bad.any():
        raise SettingError(f"{name} must be finite: row {int(np.flatnonzero(bad)[0])} holds NaN or inf "
                           f"({int(bad.sum())} of {len(queries)} rows)")
    return np.atleast_2d(np.asarray(vectors))


def _check_test_store(train: InteractionStore, test: InteractionStore) -> None:
    """Refuse a test store that cannot measure this model: the training data itself, the store
    the training data was split from, or the test side of another split."""
    train_sources = train.attrs().get("sources") or {}
    test_sources = test.attrs().get("sources") or {}
    train_id, test_id = train.attrs().get("store_id"), test.attrs().get("store_id")
    if train_id is not None and train_id == test_id:
        raise DataMismatchError(f"{test.location} is the model's training data, not a held-out test store")
    if train_sources.get("split_of_store_id") is not None and train_sources.get("split_of_store_id") == test_id:
        raise DataMismatchError(f"{test.location} is the store {train.location} (the model's training data) was split "
                                "from: it holds every training entry; evaluate on the split's test store")
    if test_sources.get("split_of_store_id") is not None and test_sources.get("split_of_store_id") == train_id:
        raise DataMismatchError(f"{test.location} was split from {train.location}, the model's training data: every "
                                "test entry is in the training data; train on the split's train store")
    if train_sources.get("split_id") and test_sources.get("split_id") and \
            train_sources.get("split_id") != test_sources.get("split_id"):
        raise DataMismatchError(f"{test.location} is the test side of another split than {train.location}, the "
                                "model's training data: its entries may be in the training data")


def _rows_of(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    unique, inverse = np.unique(rows, return_inverse=True)
    return np.asarray(array.get_orthogonal_selection((unique, slice(None))))[inverse]


def _pairs(interactions: Any) -> tuple[list, np.ndarray]:
    """(ids, values) of fold-in interactions; ids kept as given (any mix of types or lengths)."""
    if isinstance(interactions, dict):
        return list(interactions.keys()), np.asarray(list(interactions.values()), np.float64)
    if isinstance(interactions, tuple) and len(interactions) == 2:
        return list(interactions[0]), np.asarray(interactions[1], np.float64)
    ids = list(interactions)
    return ids, np.ones(len(ids))


def load(
    path: str | os.PathLike,
    interactions: InteractionStore | str | None = None,
    memory_budget: int | str | None = None,
    threads: int | None = None,
    storage_options: dict | None = None,
) -> WALS:
    """Open a trained model from its factor store.

    The model knows its interaction store by identity (``store_id``) and absolute location.
    ``interactions``: the store it was trained on, when it has moved (another store raises
    ``DataMismatchError``). Without it the recorded location is tried; if the store is gone or
    holds other data, what needs no interactions (recommend without filtering, similar,
    fold-in) still works and the rest says why it cannot. A model whose training stopped early
    loads with an ``IncompleteModelWarning`` ("trained N of M iterations").
    """
    path = os.fspath(path)
    model_store = FactorStore.open(path, "r", storage_options)
    if model_store.checkpoint is None:
        raise StoreError(f"{path} has no trained factors yet: its training stopped before the first iteration; "
                         "run train again")
    if not model_store.complete:
        warnings.warn(IncompleteModelWarning(f"{path} is {model_store.status()}"), stacklevel=2)
    cfg = model_store.config
    model = WALS(**{k: v for k, v in cfg.to_dict().items()}, memory_budget=memory_budget, threads=threads)
    model.factors_store = model_store
    model.storage_options = storage_options
    if interactions is not None:
        store = _as_store(interactions, storage_options)
        check_interactions_match(model_store, store, resuming=False)
        model.interactions = store
        return model
    location = model_store.binding.get("location")
    if not location:
        model.interactions_problem = f"{path} records no interaction store"
        return model
    try:
        store = InteractionStore(location, storage_options)
    except (StoreError, FileNotFoundError, NotADirectoryError) as exc:
        model.interactions_problem = f"the interaction store {path} was trained on is not at {location} ({exc})"
        return model
    try:
        check_interactions_match(model_store, store, resuming=False)
    except DataMismatchError:
        model.interactions_problem = (f"{location} now holds other data than model {path} was trained on "
                                      f"(store_id {store.attrs().get('store_id')}, the model's: "
                                      f"{model_store.binding.get('store_id')})")
        return model
    model.interactions = store
    return model
