"""Hyperparameters of a WALS model: one dataclass, validated once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .kernels.solve import CONFIDENCE_KINDS

SOLVERS = ("cg", "cholesky")


@dataclass(frozen=True)
class WALSConfig:
    """What is being fitted and how.

    factors: embedding size f.
    regularization: lambda; the penalty on row u is lambda * (n_u + alpha0 * n_other) ** nu.
    alpha: weight of an observed value: confidence c = alpha0 + alpha * g(value), with
        g(v) = v ("linear"), log(1 + v / eps) ("log") or 1 ("constant").
    alpha0: weight of every unobserved pair (1 in Hu et al. 2008; Rendle et al. 2022 tune it).
    nu: frequency scaling exponent of the regularization (0: plain lambda; 1: Rendle et al.).
    solver: "cg" (conjugate gradient, warm started, cg_steps steps) or "cholesky" (exact).
    dtype: float32 (default) or float64 for factors and solves.
    random_state: seed of the initial factors; None draws one and records it in the model.
    init_scale: initial factors are uniform in [0, init_scale).
    compute_loss: compute the training objective each iteration (one extra pass of dot products).
    """

    # defaults chosen by measurement (tools/defaults_grid.py, tools/RESULTS.md): the log form with
    # alpha = 1 and a firm penalty does well on play counts, clicks and the synthetic logs alike,
    # where the linear form with alpha = 1 collapses on heavy counts (Last.fm: 0.60 of the best)
    factors: int = 64
    regularization: float = 10.0
    alpha: float = 1.0
    alpha0: float = 1.0
    confidence: str = "log"
    eps: float = 1.0
    nu: float = 0.0
    iterations: int = 15
    solver: str = "cg"
    cg_steps: int = 3
    dtype: str = "float32"
    random_state: int | None = None
    init_scale: float = 0.01
    compute_loss: bool = True

    def __post_init__(self) -> None:
        if self.factors < 1:
            raise ValueError(f"factors must be >= 1, got {self.factors}")
        if self.regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {self.regularization}")
        if self.alpha < 0 or self.alpha0 < 0:
            raise ValueError("alpha and alpha0 must be >= 0")
        if self.alpha0 == 0 and self.regularization == 0:
            raise ValueError("alpha0 = 0 needs regularization > 0, or rows without entries are singular")
        if self.confidence not in CONFIDENCE_KINDS:
            raise ValueError(f"confidence must be one of {sorted(CONFIDENCE_KINDS)}, got {self.confidence!r}")
        if self.eps <= 0:
            raise ValueError("eps must be > 0")
        if self.iterations < 0:
            raise ValueError("iterations must be >= 0")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.cg_steps < 1:
            raise ValueError("cg_steps must be >= 1")
        if np.dtype(self.dtype) not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        if self.init_scale <= 0:
            raise ValueError("init_scale must be > 0")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WALSConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def objective_dict(self) -> dict:
        """The settings that define the objective and the factor shapes (what a resume must match)."""
        keep = ("factors", "regularization", "alpha", "alpha0", "confidence", "eps", "nu", "dtype", "random_state", "init_scale")
        return {k: getattr(self, k) for k in keep}
