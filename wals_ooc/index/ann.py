"""An approximate-nearest-neighbour index over one side's factors (faiss), built out of core.

Two metrics, searched as faiss inner-product indexes (``METRIC_INNER_PRODUCT``) unless ``mips`` is
``l2``:

- ``inner_product`` (recommend: users' vectors against item factors), searched one of two ways
  (``IndexSettings.mips``): ``native``, the factors as they are in an inner-product graph; or
  ``l2``, the reduction of maximum-inner-product search to a Euclidean one (Bachrach et al.
  2014): each row is stored as ``[x, sqrt(M^2 - |x|^2)]`` with ``M`` the largest row norm, a
  query as ``[q, 0]``, so ``|q' - x'|^2 = |q|^2 + M^2 - 2 q.x`` and the nearest rows are the
  best-scored ones, exactly; HNSW's graph is built for a metric, and searches this one better
  when norms are not extreme (with a few huge-norm rows the small-norm tail collapses to
  almost one point: recall@10 0.12 on a catalogue whose largest norm was 600x the median);
- ``cosine`` (similar items or users): rows normalized, then inner product.

A returned score is the exact float32 product of the query with the stored row; only which rows
are candidates is approximate. Candidates are re-scored from the stored rows (``rescore``) for
``l2`` (distances would lose the products to cancellation) and whenever the index fetches
``candidates`` per query: the products are then formed as the exact scan forms them (one fused
multiply-add per factor, ``kernels.topk.candidate_scores``, over rows normalized by the same
``kernels.topk.unit_rows``), so near-ties, which crowd cosine neighbourhoods of a large
catalogue, are ranked as the exact answer ranks them when the candidates hold them.

The index is built by streaming the factor store block by block (one pass for the norms and, for
IVF, a sample to train the coarse quantizer; one pass to add), so only the index itself and one
block are ever in memory; its size is estimated first and checked against the budget. It is
saved as a directory (``index.faiss`` and ``index.json``) through the lifecycle door (built
beside, swapped in when complete), by default beside the model, and records the model checkpoint it was built from: opening it for another checkpoint (or another
model at the same path) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..kernels.topk import candidate_scores, unit_rows
from ..errors import CorruptStoreError, DataMismatchError, MemoryBudgetError, PathError, SettingError, StoreError
from ..memory import MemoryBudget, format_bytes
from ..store.format import is_local, local_path
from ..store.lifecycle import inspect_target, output_store

if TYPE_CHECKING:
    from ..train.factors import FactorStore

INDEX_KIND = "wals-ooc/ann-index"
INDEX_FORMAT_VERSION = 3  # 2: native inner-product indexes; 3: also the MIPS-to-L2 reduction (mips="l2")
READS_VERSIONS = (2, 3)
INDEX_FILE = "index.faiss"
META_FILE = "index.json"  # settings, metric and the model checkpoint the index was built from
METRICS = ("inner_product", "cosine")
MIPS = ("native", "l2")
KINDS = ("hnsw", "ivf")
SIDES = ("user", "item")
BUILD_BLOCK = 1 << 16  # factor rows read and added at once
DEFAULT_CANDIDATES = {"cosine": 64, "inner_product": 0}  # re-scored per query (IndexSettings.candidates)


@dataclass
class IndexSettings:
    """How the index is built and searched.

    kind: "hnsw" (graph; best recall per query time, slower to build) or "ivf" (inverted lists
    over k-means cells; fast to build). hnsw_m: graph neighbours per node; ef_construction:
    candidate list while building; ef_search: candidate list while searching (recall vs speed).
    nlist: IVF cells (default 4 sqrt(n)); nprobe: cells searched per query.
    mips: how an inner-product index searches: "native" (faiss's inner-product metric) or "l2"
    (the rows augmented to make it a Euclidean search; see the module's docstring).
    max_fetch: most candidates fetched per query to make up for filtered (already liked) items;
    a query left with fewer than N after filtering is answered exactly.
    candidates: fewest candidates fetched per query, re-scored exactly before the top N is
    chosen (None: ``DEFAULT_CANDIDATES`` for cosine, none beyond N for inner product; 0: none).
    Saved beside the settings (``index.json``'s "candidates"), so indexes saved before it stay
    readable and readable by earlier versions.
    """

    kind: str = "hnsw"
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    nlist: int | None = None
    nprobe: int = 32
    max_fetch: int = 1024
    mips: str = "native"
    candidates: int | None = None

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise SettingError(f"index kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.mips not in MIPS:
            raise SettingError(f"index setting mips must be one of {', '.join(MIPS)}, got {self.mips!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nprobe", "max_fetch"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise SettingError(f"index setting {name} must be a positive integer, got {value!r}")
        if self.candidates is not None and (not isinstance(self.candidates, (int, np.integer)) or self.candidates < 0):
            raise SettingError(f"index setting candidates must be a non-negative integer, got {self.candidates!r}")
        if self.nlist is not None and (not isinstance(self.nlist, (int, np.integer)) or self.nlist < 1):
            raise SettingError(f"index setting nlist must be a positive integer, got {self.nlist!r}")

    def cells(self, n_rows: int) -> int:
        return int(self.nlist or max(1, min(n_rows // 39, int(4 * np.sqrt(n_rows)))))


def default_index_location(model_location: str, side: str, metric: str) -> str:
    """``model.zarr`` -> ``model-item-inner_product.ann`` beside it."""
    if not is_local(model_location):
        raise PathError(f"the model {model_location} is not on a local disk: give the index a local path (output=/--output)")
    base = model_location.removeprefix("file://").rstrip("/")
    base = base[: -len(".zarr")] if base.endswith(".zarr") else base
    return f"{base}-{side}-{metric}.ann"


def default_metric(side: str) -> str:
    """Items are indexed for recommendation (inner product), users for similarity (cosine)."""
    return "inner_product" if side == "item" else "cosine"


def model_binding(model, side: str) -> dict[str, Any]:
    """What identifies the factors an index is built from: the model's location and identity,
    its checkpoint, and a fingerprint of some of the side's current factor rows."""
    checkpoint = model.checkpoint
    if checkpoint is None:
        raise StoreError(f"{model.location} has no trained factors yet")
    array = model.current(side)
    attrs = model.group.attrs
    return {
        "model": os.path.abspath(model.location) if is_local(model.location) else model.location,
        "model_id": attrs.get("model_id") or attrs.get("store_id"),
        "step": checkpoint.step,
        "slot": checkpoint.slots[side],
        "shape": [int(s) for s in array.shape],
        "fingerprint": factor_fingerprint(array),
    }


def factor_fingerprint(array) -> str:
    """SHA-1 of four factor rows (first, last, two between): differs between trainings."""
    n = int(array.shape[0])
    rows = np.unique(np.array([0, n // 3, (2 * n) // 3, n - 1], np.int64).clip(0, max(0, n - 1)))
    sample = np.ascontiguousarray(np.asarray(array.get_orthogonal_selection((rows, slice(None)))))
    return hashlib.sha1(sample.tobytes() + str(array.shape).encode()).hexdigest()


def estimated_bytes(kind: str, n_rows: int, dims: int, settings: IndexSettings) -> int:
    """Memory an index of this shape holds (vectors, graph links or list ids, with overheads)."""
    vectors = 4 * n_rows * dims
    if kind == "hnsw":
        links = n_rows * (2 * settings.hnsw_m * 4) * 1.1 + 24 * n_rows  # level 0 + upper levels, offsets
        return int(1.05 * (vectors + links))
    cells = settings.cells(n_rows)
    return int(1.05 * (vectors + 16 * n_rows + 4 * cells * dims))  # + ids and the direct map


class AnnIndex:
    """A saved ANN index over one side's factors, bound to the model checkpoint it was built from."""

    def __init__(self, location: str, meta: dict, faiss_index):
        self.location = location
        self.meta = meta
        self.index = faiss_index
        self.settings = IndexSettings(**meta["settings"], candidates=meta.get("candidates"))

    # -- properties ------------------------------------------------------------------------------
    @property
    def side(self) -> str:
        return self.meta["side"]

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    @property
    def n_rows(self) -> int:
        return int(self.meta["binding"]["shape"][0])

    @property
    def factors(self) -> int:
        return int(self.meta["binding"]["shape"][1])

    @property
    def nbytes(self) -> int:
        return int(self.meta["bytes"])

    @property
    def candidates(self) -> int:
        """Fewest candidates fetched per query and re-scored exactly (0: N-based fetch, faiss's scores)."""
        chosen = self.settings.candidates
        return int(DEFAULT_CANDIDATES[self.metric] if chosen is None else chosen)

    @property
    def l2(self) -> bool:
        """True when the index searches inner products as L2 distances over augmented rows."""
        return self.metric == "inner_product" and self.settings.mips == "l2"

    def describe(self) -> str:
        s = self.settings
        how = (f"hnsw M={s.hnsw_m} ef_construction={s.ef_construction} ef_search={s.ef_search}" if s.kind == "hnsw"
               else f"ivf nlist={self.meta['nlist']} nprobe={s.nprobe}")
        metric = f"{self.metric} (as L2, max norm {self.meta['max_norm']:.4g})" if self.l2 else self.metric
        if self.candidates:
            how += f", {self.candidates} candidates re-scored"
        return (f"{self.location}: {self.side} factors ({self.n_rows} x {self.factors}), {metric}, {how}, "
                f"{format_bytes(self.nbytes)}, model step {self.meta['binding']['step']}")

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model,
        location: str | None = None,
        side: str = "item",
        metric: str | None = None,
        settings: IndexSettings | None = None,
        memory_budget=None,
        threads: int | None = None,
        overwrite: bool = False,
        progress=None,
    ) -> AnnIndex:
        """Build the index of ``model``'s current ``side`` factors and save it at ``location``
        (default: beside the model)."""
        faiss = _faiss()
        if side not in SIDES:
            raise SettingError(f"side must be user or item, got {side!r}")
        metric = metric or default_metric(side)
        if metric not in METRICS:
            raise SettingError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        settings = settings or IndexSettings()
        settings.validate()
        location = os.fspath(location) if location is not None else default_index_location(model.location, side, metric)
        if not is_local(location):
            raise PathError(f"an index is saved on a local disk; {location} is not local")
        budget = MemoryBudget.start(memory_budget)
        binding = model_binding(model, side)
        array = model.current(side)
        n, f = int(array.shape[0]), int(array.shape[1])
        l2 = metric == "inner_product" and settings.mips == "l2"
        dims = f + 1 if l2 else f
        needed = estimated_bytes(settings.kind, n, dims, settings) + 2 * BUILD_BLOCK * dims * 4
        if settings.kind == "ivf":
            needed += _sample_size(n, settings.cells(n)) * dims * 4
        if needed > budget.allowance:
            raise MemoryBudgetError(
                f"an {settings.kind} index of {n} x {dims} needs about {format_bytes(needed)}, over the "
                f"{format_bytes(budget.allowance)} the memory budget leaves: raise memory_budget"
                + (" or lower hnsw_m" if settings.kind == "hnsw" else "")
            )
        threads = threads or os.cpu_count() or 1
        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads)
        try:
            max_norm = _max_norm(array, n) if l2 else None
            sample = _first_pass(array, metric, settings, n, max_norm)
            index = _new_index(faiss, settings, dims, n, l2)
            if settings.kind == "ivf":
                index.train(sample)
            del sample
            for lo in range(0, n, BUILD_BLOCK):
                index.add(_transform_rows(np.asarray(array[lo : lo + BUILD_BLOCK]), metric, max_norm))
                if progress is not None:
                    progress(min(n, lo + BUILD_BLOCK), n)
            if settings.kind == "ivf":
                index.make_direct_map()
        finally:
            faiss.omp_set_num_threads(previous)
        version = INDEX_FORMAT_VERSION if l2 else 2  # a native index stays readable by format-2 readers
        saved = asdict(settings)
        candidates = saved.pop("candidates")  # beside the settings: format-2 readers take no such setting
        meta = {
            "format_version": version, "side": side, "max_norm": max_norm, "metric": metric, "settings": saved,
            "candidates": candidates,
            "binding": binding, "dims": dims, "bytes": estimated_bytes(settings.kind, n, dims, settings),
            "nlist": settings.cells(n) if settings.kind == "ivf" else None,
        }
        with output_store(location, INDEX_KIND, version=version, overwrite=overwrite,
                          inputs=[model.location], layout="files") as out:
            faiss.write_index(index, os.path.join(out.location, INDEX_FILE))
            with open(os.path.join(out.location, META_FILE), "w") as handle:
                json.dump(meta, handle, indent=1)
        return cls(location, meta, index)

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, location: str, model=None, ef_search: int | None = None, nprobe: int | None = None,
             memory_budget=None, candidates: int | None = None) -> AnnIndex:
        """Open a saved index; with ``model``, refuse it unless it was built from the model's
        current checkpoint. ``ef_search``/``nprobe`` override the saved search settings."""
        faiss = _faiss()
        location = os.fspath(location)
        meta = read_meta(location)
        if meta.get("format_version") not in READS_VERSIONS:
            raise StoreError(f"{location} has index format version {meta.get('format_version')}, this wals-ooc reads "
                             f"{' and '.join(map(str, READS_VERSIONS))}")
        if model is not None:
            check_binding(location, meta, model)
        if memory_budget is not None:
            budget = MemoryBudget.start(memory_budget)
            if meta["bytes"] > budget.allowance:
                raise MemoryBudgetError(f"the index {location} takes about {format_bytes(meta['bytes'])}, over the "
                                        f"{format_bytes(budget.allowance)} the memory budget leaves")
        index = faiss.read_index(os.path.join(location, INDEX_FILE))
        if meta["settings"]["kind"] == "ivf":
            index.make_direct_map()
        opened = cls(location, meta, index)
        if ef_search is not None:
            opened.settings.ef_search = int(ef_search)
        if nprobe is not None:
            opened.settings.nprobe = int(nprobe)
        if candidates is not None:
            opened.settings.candidates = int(candidates)
        opened.settings.validate()
        return opened

    # -- searching -------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, threads: int = 1,
               stored: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-``k`` candidate rows of each query: (ids (n, k) int64, -1 when fewer
        were found; their exact scores (n, k) float32, -inf for -1), in the index's order (rank
        them with ``kernels.topk.select_candidates``). Scores are inner products for
        ``inner_product`` and cosines for ``cosine``: both index kinds store the vectors
        uncompressed (``IndexHNSWFlat``, ``IndexIVFFlat``), so the distances faiss returns are
        float32 products of the query with the stored rows, summed in faiss's order; with
        ``candidates`` (and for ``l2``, which returns distances) they are recomputed from the
        stored rows as the exact scan forms them (``rescore``). All queries go to faiss in one
        call, searched in ``threads`` OpenMP threads. stored: the queries are rows of this index
        (``vectors``), already as it stores them (normalized for cosine)."""
        faiss = _faiss()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = int(min(k, self.n_rows))
        if self.metric == "cosine" and not stored:
            queries = _unit(queries)
        if self.settings.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.settings.ef_search, k))
        else:
            params = faiss.SearchParametersIVF(nprobe=min(self.settings.nprobe, int(self.meta["nlist"])))
        searched = queries
        if self.l2:
            searched = np.zeros((len(queries), queries.shape[1] + 1), np.float32)
            searched[:, :-1] = queries
        with _omp_threads(faiss, threads):
            scores, ids = self.index.search(searched, k, params=params)
        ids = ids.astype(np.int64, copy=False)
        if self.l2 or self.candidates:
            return ids, self.rescore(queries, ids, stored=True)
        scores = np.where(ids >= 0, scores, np.float32(-np.inf)).astype(np.float32, copy=False)
        return ids, scores

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of ``rows`` (n, factors) float32, as the index searches them
        (normalized for cosine): queries for similar items or users, with no factor read."""
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise SettingError(f"rows outside the index {self.location} ({self.n_rows} rows)")
        if not len(rows):
            return np.zeros((0, self.factors), np.float32)
        flat = self._flat_rows()
        vectors = flat[rows] if flat is not None else self.index.reconstruct_batch(rows)
        return np.ascontiguousarray(vectors[:, : self.factors], dtype=np.float32)

    def rescore(self, queries: np.ndarray, ids: np.ndarray, stored: bool = False) -> np.ndarray:
        """Scores (float32) of (query, id) pairs recomputed from the vectors the index stores, in
        the exact scan's arithmetic (``kernels.topk.candidate_scores``; the query normalized for
        cosine unless ``stored``); -inf where the id is -1. An HNSW index's vectors are read in
        place (faiss's flat storage, no copy); an IVF index's are gathered by id first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.metric == "cosine" and not stored:
            queries = _unit(queries)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        scores = np.empty(ids.shape, np.float32)
        flat = self._flat_rows()
        if flat is not None:
            if flat.shape[1] > queries.shape[1]:  # l2: the rows' extra coordinate meets a 0 (adds exactly 0)
                queries = np.hstack([queries, np.zeros((len(queries), flat.shape[1] - queries.shape[1]), np.float32)])
            candidate_scores(queries, flat, ids, scores)
            return scores
        valid = ids >= 0
        unique, inverse = np.unique(ids[valid], return_inverse=True)
        rows = np.ascontiguousarray(self.index.reconstruct_batch(unique)[:, : queries.shape[1]], dtype=np.float32) \
            if len(unique) else np.zeros((0, queries.shape[1]), np.float32)
        local = np.full(ids.shape, -1, np.int64)
        local[valid] = inverse.ravel()
        candidate_scores(queries, rows, local, scores)
        return scores

    def _flat_rows(self) -> np.ndarray | None:
        """The stored vectors (n, dims) as a read-only view of an HNSW index's flat storage, or
        None (IVF keeps them per cell)."""
        if self.settings.kind != "hnsw":
            return None
        view = getattr(self, "_flat_view", None)
        if view is None:
            faiss = _faiss()
            storage = faiss.downcast_index(self.index.storage)
            if not isinstance(storage, faiss.IndexFlat) or storage.ntotal != self.n_rows:
                return None
            view = faiss.rev_swig_ptr(storage.get_xb(), self.n_rows * storage.d).reshape(self.n_rows, storage.d)
            view.flags.writeable = False
            self._flat_view = view
        return view


def check_binding(location: str, meta: dict, model) -> None:
    """Refuse an index that was not built from ``model``'s current factors of its side."""
    side = meta["side"]
    built = meta["binding"]
    checkpoint = model.checkpoint
    if checkpoint is None:
        raise StoreError(f"{model.location} has no trained factors yet")
    where = os.path.abspath(model.location) if is_local(model.location) else model.location
    attrs = model.group.attrs
    now = {"model": where, "model_id": attrs.get("model_id") or attrs.get("store_id"), "step": checkpoint.step,
           "slot": checkpoint.slots[side], "shape": [int(s) for s in model.current(side).shape]}
    for key, value in now.items():
        if built.get(key) != value:
            raise DataMismatchError(
                f"the index {location} was built from {built.get('model')} at step {built.get('step')} "
                f"({key}: {built.get(key)} vs {value} now): rebuild it with `wals-ooc index {model.location}`"
            )
    fingerprint = factor_fingerprint(model.current(side))
    if built.get("fingerprint") != fingerprint:
        raise DataMismatchError(
            f"the index {location} was built from other {side} factors than {model.location} holds now "
            f"(the model was retrained): rebuild it with `wals-ooc index {model.location}`"
        )


def _faiss():
    """The faiss module, or a one-line error saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise SettingError("approximate retrieval needs faiss: pip install 'wals-ooc[ann]' (faiss-cpu)") from None
    return faiss


class _omp_threads:
    """faiss's OpenMP thread count for a block (restored after)."""

    def __init__(self, faiss, threads: int):
        self.faiss, self.threads = faiss, max(1, int(threads))

    def __enter__(self):
        self.previous = self.faiss.omp_get_max_threads()
        if self.previous != self.threads:
            self.faiss.omp_set_num_threads(self.threads)

    def __exit__(self, *exc):
        if self.previous != self.threads:
            self.faiss.omp_set_num_threads(self.previous)


def _sample_size(n: int, cells: int) -> int:
    return int(min(n, max(50 * cells, 10_000), 256 * cells))


def _max_norm(array, n: int) -> float:
    """The largest row norm of a factor array, streamed block by block."""
    largest = 0.0
    for lo in range(0, n, BUILD_BLOCK):
        block = np.asarray(array[lo : lo + BUILD_BLOCK], dtype=np.float32)
        if len(block):
            largest = max(largest, float(np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64).max())))
    if not np.isfinite(largest):
        raise CorruptStoreError("the factors hold a NaN or infinite value: retrain the model")
    return largest


def _first_pass(array, metric: str, settings: IndexSettings, n: int, max_norm: float | None = None) -> np.ndarray | None:
    """(IVF) an evenly spaced training sample of the rows as the index stores them."""
    take = _sample_size(n, settings.cells(n)) if settings.kind == "ivf" else 0
    if not take:
        return None
    picks = np.unique(np.linspace(0, n - 1, take).astype(np.int64))
    raw_sample = []
    for lo in range(0, n, BUILD_BLOCK):
        chosen = picks[(picks >= lo) & (picks < lo + BUILD_BLOCK)]
        if len(chosen):
            raw_sample.append(np.asarray(array.get_orthogonal_selection((chosen, slice(None))), dtype=np.float32))
    return _transform_rows(np.concatenate(raw_sample), metric, max_norm)


def _unit(rows: np.ndarray) -> np.ndarray:
    """Rows divided by their norms, as the exact cosine scan normalizes them (``unit_rows``)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.empty_like(rows)
    unit_rows(rows, out)
    return out


def _transform_rows(block: np.ndarray, metric: str, max_norm: float | None = None) -> np.ndarray:
    """Rows as the index stores them: normalized for cosine; for inner product as they are, or
    with ``max_norm`` augmented by ``sqrt(max_norm^2 - |x|^2)`` (the MIPS-to-L2 reduction)."""
    block = np.asarray(block, dtype=np.float32)
    if max_norm is not None:
        squares = np.einsum("ij,ij->i", block, block, dtype=np.float64)
        extra = np.sqrt(np.maximum(max_norm * max_norm - squares, 0.0)).astype(np.float32)
        return np.ascontiguousarray(np.hstack([block, extra[:, None]]), dtype=np.float32)
    if metric == "cosine":
        return _unit(block)
    return np.ascontiguousarray(block, dtype=np.float32)


def _new_index(faiss, settings: IndexSettings, dims: int, n: int, l2: bool = False):
    faiss_metric = faiss.METRIC_L2 if l2 else faiss.METRIC_INNER_PRODUCT
    if settings.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dims, settings.hnsw_m, faiss_metric)
        index.hnsw.efConstruction = settings.ef_construction
        index.hnsw.efSearch = settings.ef_search
        return index
    quantizer = faiss.IndexFlatL2(dims) if l2 else faiss.IndexFlatIP(dims)
    index = faiss.IndexIVFFlat(quantizer, dims, settings.cells(n), faiss_metric)
    index.nprobe = settings.nprobe  # (faiss's Python wrapper keeps the quantizer alive with the index)
    return index


def read_meta(location: str) -> dict:
    """The metadata of the finished index at ``location``; StoreError when there is none."""
    state = inspect_target(location)
    if state.what == "absent":
        raise StoreError(f"no index at {location}: build one with `wals-ooc index MODEL` (model.build_index())")
    if state.what != "store" or state.kind != INDEX_KIND or not state.attrs.get("complete"):
        what = f"a {state.kind} store" if state.kind and state.kind != INDEX_KIND else "not a finished wals-ooc index"
        raise StoreError(f"{location} is {what}")
    try:
        with open(os.path.join(local_path(location), META_FILE)) as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(f"{location}: its {META_FILE} cannot be read ({exc})") from None


def index_exists(location: str) -> bool:
    """True when a finished index is at ``location``."""
    state = inspect_target(location)
    return state.what == "store" and state.kind == INDEX_KIND and bool(state.attrs.get("complete"))




_opened_lock = threading.Lock()
_opened: dict[tuple, AnnIndex] = {}


def resolve_index(index: AnnIndex | str | os.PathLike | bool | None, model: FactorStore, side: str, metric: str,
                  memory_budget: int | str | None = None, ef_search: int | None = None,
                  nprobe: int | None = None, candidates: int | None = None) -> AnnIndex | None:
    """The index a serving call asked for: None/False (exact), True (the default location beside
    the model), a path, or an ``AnnIndex``. It must cover ``side`` with ``metric`` and have been
    built from ``model``'s current factors; opened indexes are kept once per process."""
    if index is None or index is False:
        return None
    if isinstance(index, AnnIndex):
        check_binding(index.location, index.meta, model)
        opened = index
    else:
        location = default_index_location(model.location, side, metric) if index is True else os.fspath(index)
        key = (os.path.abspath(location), model.checkpoint.step if model.checkpoint else None)
        with _opened_lock:
            cached = _opened.get(key)
        if cached is None:
            opened = AnnIndex.open(location, model=model, memory_budget=memory_budget)
            with _opened_lock:
                _opened.clear()  # one index per process at a time: bounded memory
                _opened[key] = opened
        else:
            opened = cached
            check_binding(location, opened.meta, model)
    if opened.side != side or opened.metric != metric:
        raise SettingError(f"the index {opened.location} is over {opened.side} factors by {opened.metric}; this needs "
                           f"one over {side} factors by {metric}: build it with `wals-ooc index {model.location} "
                           f"--side {side} --metric {metric}`")
    if ef_search is not None or nprobe is not None or candidates is not None:
        tuned = AnnIndex(opened.location, opened.meta, opened.index)
        changes = {name: value for name, value in (("ef_search", ef_search), ("nprobe", nprobe),
                                                   ("candidates", candidates)) if value is not None}
        tuned.settings = IndexSettings(**{**asdict(opened.settings), **changes})
        tuned.settings.validate()
        return tuned
    return opened


def forget_indexes() -> None:
    """Drop the indexes this process keeps open."""
    with _opened_lock:
        _opened.clear()


__all__ = ["AnnIndex", "IndexSettings", "default_index_location", "default_metric", "forget_indexes", "resolve_index"]
