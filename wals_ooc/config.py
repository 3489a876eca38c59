"""Hyperparameters of a WALS model: one dataclass, validated once."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import SettingError

#: the confidence kinds (``kernels.solve.CONFIDENCE_KINDS`` maps them to the kernels' codes; named
#: here so that `wals-ooc train --help` and settings checks do not load numba)
CONFIDENCES = ("constant", "linear", "log")

SOLVERS = ("cg", "cholesky", "ialspp")
#: CG's preconditioners: "jacobi" (z = r / diag(A)) or "none" (plain CG, as implicit's)
PRECONDITIONERS = ("jacobi", "none")
#: the command-line flag of each setting, for error messages
FLAGS = {"factors": "--factors", "regularization": "--regularization", "alpha": "--alpha", "alpha0": "--alpha0",
         "confidence": "--confidence", "eps": "--eps", "nu": "--nu", "iterations": "--iterations", "solver": "--solver",
         "cg_steps": "--cg-steps", "block_size": "--block-size",
         "block_sweeps": "--block-sweeps", "first_sweeps": "--first-sweeps", "dtype": "--dtype", "random_state": "--seed", "init_scale": "--init-scale",
         "half_gathers": "--half-gathers", "eigenbasis": "--eigenbasis", "cg_preconditioner": "--cg-preconditioner"}


def default_block_sweeps(factors: int, eigenbasis: bool = True) -> int:
    """ialspp's passes over the blocks per half-sweep when block_sweeps is None. In the eigenbasis
    of the fixed side's Gram (``eigenbasis``, the default): 2 below f = 512, 1 from 512 on
    (tools/RESULTS.md, round 28, ialspp9: with first_sweeps 2 these reach implicit CG's 5-iteration
    loss in 2 iterations on the 0.25-scale bench). In the factors' own basis: 3 below f = 512, 2
    from 512 on (issue 11 round 26: at f = 256, 3 passes reach it in 2 iterations, 2 in 3; at
    f = 512, 2 do, and a pass costs more there against the loss it gains)."""
    if eigenbasis:
        return 2 if factors < 512 else 1
    return 3 if factors < 512 else 2


def default_first_sweeps(factors: int, eigenbasis: bool = True) -> int:
    """ialspp's passes over the blocks in the first iteration's half-sweeps when first_sweeps is
    None (at least the later ones'): in the eigenbasis 1 from f = 512 on (one pass a half-sweep
    reached implicit CG's 5-iteration loss in 2 iterations there, tools/RESULTS.md, round 28,
    ialspp9), 2 otherwise (issue 11 round 25)."""
    return 1 if eigenbasis and factors >= 512 else 2


def _setting(name: str, message: str) -> SettingError:
    return SettingError(message, flags={name: FLAGS[name]})


@dataclass(frozen=True)
class WALSConfig:
    """What is being fitted and how.

    factors: embedding size f.
    regularization: lambda; the penalty on row u is lambda * (n_u + alpha0 * n_other) ** nu.
    alpha: weight of an observed value: confidence c = alpha0 + alpha * g(value), with
        g(v) = v ("linear"), log(1 + v / eps) ("log") or 1 ("constant").
    alpha0: weight of every unobserved pair (1 in Hu et al. 2008; Rendle et al. 2022 tune it).
    nu: frequency scaling exponent of the regularization (0: plain lambda; 1: Rendle et al.).
    solver: "cg" (conjugate gradient, warm started, cg_steps steps), "cholesky" (exact) or
        "ialspp" (iALS++: block coordinate descent over block_size coordinates at a time, warm
        started, block_sweeps passes over the blocks per half-sweep; see kernels/subspace.py).
    block_sweeps: ialspp's passes over the blocks per half-sweep; None (default) chooses by
        factors (``default_block_sweeps``: in the eigenbasis 2 below f = 512, 1 from 512 on; else
        3 below f = 512, 2 from 512 on). Only the first pass
        builds and factors each block's system; a later one costs about a third of it, and
        2-3 passes reached implicit CG's 5-iteration loss in 2 iterations at f = 256 and 512
        where one needed 3-4 (tools/RESULTS.md, issue 11 round 26).
    first_sweeps: ialspp's passes over the blocks in the half-sweeps of the first iteration (at
        least block_sweeps), whose warm start is the random initial factors; None (default) chooses
        by factors (``default_first_sweeps``: 1 from f = 512 on in the eigenbasis, else 2): a second pass there
        reached implicit CG's 5-iteration loss an iteration sooner at f = 256 with block_sweeps 1
        (tools/RESULTS.md, issue 11 round 25).
    dtype: float32 (default) or float64 for factors and solves.
    half_gathers: CG's warm start gathers each row's fixed rows from a float16 copy of the fixed
        side (widened to float32 as read; arithmetic stays float32) where the rows fit the vector
        registers (float32, f a multiple of 16 up to 128 with AVX-512): half the bytes of its random
        reads, 0.77x the iteration at f = 128, 0.88x at f = 64, with losses within float32's own
        rounding band (tools/RESULTS.md, issue 11 round 27). The copy is counted in the plan and not
        used when float16 cannot carry the side (a value beyond 65504, mostly subnormal values).
        False: float32 gathers.
    eigenbasis: ialspp solves each half-sweep in the eigenbasis of the fixed side's Gram G = Q
        diag(lam) Q^T (the fixed side rotated once into a copy beside it, Y Q, each row block's
        rows in as X Q and out as X Q^T): the Gram part of a block step is then diagonal (b a row
        where it was f b), and the blocks, leading eigen-directions first, are less coupled, so
        fewer passes reach the same loss (tools/RESULTS.md, round 28, ialspp9). The objective and
        the stored factors are the same as without it (a rotation keeps every score and norm).
        False: solved in the factors' own basis.
    cg_preconditioner: "jacobi" (default): CG's steps are preconditioned by the inverse of each
        row's diagonal, diag(alpha0 Y^T Y) + reg + sum (c - alpha0) y * y, accumulated by the warm
        start's pass as it reads the rows (about no time); with play counts as confidences that
        diagonal spans orders of magnitude, and 3 preconditioned steps reach a clearly lower loss
        than 3 plain ones (0.5-0.6% after 5 iterations at f = 64-128 on the Last.fm-shaped bench;
        tools/RESULTS.md, round 28). "none": plain CG, implicit's arithmetic.
    random_state: seed of the initial factors; None draws one and records it in the model.
    init_scale: initial factors are uniform in [0, init_scale).
    iterations: at least 1 (0 would store the random initial factors as if trained).

    Every number must be finite: NaN or infinite settings raise SettingError.
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
    block_size: int = 8
    block_sweeps: int | None = None
    first_sweeps: int | None = None
    dtype: str = "float32"
    random_state: int | None = None
    init_scale: float = 0.01
    compute_loss: bool = True
    half_gathers: bool = True
    eigenbasis: bool = True
    cg_preconditioner: str = "jacobi"

    def __post_init__(self) -> None:
        for name in ("factors", "iterations", "cg_steps", "block_size", "block_sweeps", "first_sweeps"):
            value = getattr(self, name)
            if name in ("block_sweeps", "first_sweeps") and value is None:  # chosen by factors (``sweeps_at``)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise _setting(name, f"{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("regularization", "alpha", "alpha0", "eps", "nu", "init_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise _setting(name, f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise _setting(name, f"{name} must be finite, got {value}")
            object.__setattr__(self, name, float(value))
        for name in ("half_gathers", "eigenbasis"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise _setting(name, f"{name} must be True or False, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.factors < 1:
            raise _setting("factors", f"factors must be >= 1, got {self.factors}")
        if self.regularization < 0:
            raise _setting("regularization", f"regularization must be >= 0, got {self.regularization}")
        if self.alpha < 0:
            raise _setting("alpha", f"alpha must be >= 0, got {self.alpha}")
        if self.alpha0 < 0:
            raise _setting("alpha0", f"alpha0 must be >= 0, got {self.alpha0}")
        if self.alpha0 == 0 and self.regularization == 0:
            raise _setting("alpha0", "alpha0 = 0 needs regularization > 0, or rows without entries are singular")
        if self.nu < 0:
            raise _setting("nu", f"nu must be >= 0, got {self.nu}")
        if self.confidence not in CONFIDENCES:
            raise _setting("confidence", f"confidence must be one of {list(CONFIDENCES)}, got {self.confidence!r}")
        if self.eps <= 0:
            raise _setting("eps", f"eps must be > 0, got {self.eps}")
        if self.iterations < 1:  # 0 would record the random initial factors as a trained model
            raise _setting("iterations", f"iterations must be >= 1, got {self.iterations}")
        if self.cg_preconditioner not in PRECONDITIONERS:
            raise _setting("cg_preconditioner",
                           f"cg_preconditioner must be one of {list(PRECONDITIONERS)}, got {self.cg_preconditioner!r}")
        if self.solver not in SOLVERS:
            raise _setting("solver", f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.cg_steps < 1:
            raise _setting("cg_steps", f"cg_steps must be >= 1, got {self.cg_steps}")
        if self.block_size < 1:
            raise _setting("block_size", f"block_size must be >= 1, got {self.block_size}")
        if self.block_sweeps is not None and self.block_sweeps < 1:
            raise _setting("block_sweeps", f"block_sweeps must be >= 1, got {self.block_sweeps}")
        if self.first_sweeps is not None and self.first_sweeps < 1:
            raise _setting("first_sweeps", f"first_sweeps must be >= 1, got {self.first_sweeps}")
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            dtype = None
        if dtype not in (np.float32, np.float64):
            raise _setting("dtype", f"dtype must be float32 or float64, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype.name)
        if self.init_scale <= 0:
            raise _setting("init_scale", f"init_scale must be > 0, got {self.init_scale}")
        if self.random_state is not None and (isinstance(self.random_state, bool)
                                              or not isinstance(self.random_state, (int, np.integer))):
            raise _setting("random_state", f"random_state must be an integer or None, got {self.random_state!r}")
        if self.random_state is not None and self.random_state < 0:  # numpy's generators take none below 0
            raise _setting("random_state", f"random_state must be >= 0, got {self.random_state}")

    def sweeps_at(self, step: int) -> int:
        """ialspp's passes over the blocks in half-sweep ``step`` (0 and 1: the first iteration)."""
        later = default_block_sweeps(self.factors, self.eigenbasis) if self.block_sweeps is None else self.block_sweeps
        first = default_first_sweeps(self.factors, self.eigenbasis) if self.first_sweeps is None else self.first_sweeps
        return max(later, first) if step < 2 else later

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
