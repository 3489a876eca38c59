"""Training: the half-sweep plan, the Dask tasks that run it, checkpoints and resume."""

from .factors import FactorStore, default_model_location
from .plan import HalfSweepPlan, plan_half_sweep
from .trainer import IterationReport, make_plans, train

__all__ = ["FactorStore", "HalfSweepPlan", "IterationReport", "default_model_location", "make_plans", "plan_half_sweep", "train"]
