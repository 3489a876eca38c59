"""Evaluation: out-of-core train/test splits and streamed ranking metrics."""

from .metrics import evaluate, ranking_metrics
from .split import split

__all__ = ["evaluate", "ranking_metrics", "split"]
