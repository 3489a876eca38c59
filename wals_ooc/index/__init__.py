"""Approximate nearest-neighbour retrieval: an index over one side's factors (faiss), saved beside
the model and bound to its checkpoint, and top-N from it with exact filtering."""

from .ann import AnnIndex, IndexSettings, default_index_location, default_metric, forget_indexes, resolve_index
from .retrieve import approximate_top_k, subset_csr

__all__ = ["AnnIndex", "IndexSettings", "approximate_top_k", "default_index_location", "default_metric",
           "forget_indexes", "resolve_index", "subset_csr"]
