"""Serving trained factors: streamed top-K recommendation, similarity, fold-in."""

from .fold_in import fold_in
from .recommend import open_recommendations, recommend_all
from .scoring import FactorSource, top_k

__all__ = ["FactorSource", "fold_in", "open_recommendations", "recommend_all", "top_k"]
