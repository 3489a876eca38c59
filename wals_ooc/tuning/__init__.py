"""Hyperparameter search: Optuna's TPE over WALS settings, scored on a validation store, with
trials pruned from the training callback; the study lives in SQLite and resumes after a kill."""

from .search import TuneResult, tune
from .space import DataSummary, SearchSpace, data_summary
from .study import TrialRecord

__all__ = ["DataSummary", "SearchSpace", "TrialRecord", "TuneResult", "data_summary", "tune"]
