"""What a search varies, and how a point of the search becomes ``WALSConfig`` settings.

Two settings are searched on scales made from the training data, so one range suits data of
binary clicks and data of play counts in the hundreds of thousands alike:

- ``weight``: how much more an average observed entry weighs than an unobserved pair,
  ``alpha * mean(g(r)) / alpha0`` (g of the chosen confidence form, mean over the stored
  entries). ``alpha`` follows from it: with play counts averaging 745, weight 7.5 is
  alpha = 0.01 in the linear form and alpha = 1.4 in the log form.
- ``reg``: the penalty of a typical row relative to the unobserved weight,
  ``regularization * (n + alpha0 * n_other) ** nu / alpha0`` (n the mean entries per row, the
  geometric mean over users and items), so changing ``nu`` does not move the penalty by
  orders of magnitude. With ``nu = 0`` and ``alpha0 = 1`` it is ``regularization`` itself.

``alpha0``, ``nu``, the confidence form, and optionally ``factors`` and ``iterations`` are
searched as they are. Pure functions of the data summary, apart from ``data_summary``, which
streams the stored values once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ..config import WALSConfig
from ..errors import SettingError
from ..store.format import CSR_CHUNK, array, read, subgroup
from ..store.reader import InteractionStore

if TYPE_CHECKING:
    import optuna

#: the settings a trial's point maps to (the rest come from the base config)
SEARCHED = ("confidence", "alpha", "alpha0", "regularization", "nu", "factors", "iterations")


@dataclass(frozen=True)
class DataSummary:
    """What the search scales need from the training store (a few numbers, whatever its size)."""

    n_users: int
    n_items: int
    nnz: int
    mean_value: float  # mean stored value (g of the linear form)
    mean_log_value: float  # mean log(1 + value / eps) (g of the log form)
    eps: float
    min_value: float = 0.0
    max_value: float = 0.0

    def mean_g(self, confidence: str) -> float:
        """Mean of g(r) over the stored entries for a confidence form."""
        if confidence == "linear":
            return self.mean_value
        if confidence == "log":
            return self.mean_log_value
        return 1.0

    def penalty_scale(self, alpha0: float, nu: float) -> float:
        """(n + alpha0 * n_other) ** nu of a typical row: geometric mean over the two sides."""
        if nu == 0:
            return 1.0
        user_side = self.nnz / max(1, self.n_users) + alpha0 * self.n_items
        item_side = self.nnz / max(1, self.n_items) + alpha0 * self.n_users
        return math.sqrt(user_side * item_side) ** nu

    def to_dict(self) -> dict:
        return asdict(self)


def data_summary(store: InteractionStore, eps: float = 1.0) -> DataSummary:
    """Mean value and mean log value of a store's entries, read a chunk at a time."""
    values = array(subgroup(store.group, "by_user"), "values")
    total = total_log = 0.0
    low, high = math.inf, -math.inf
    for lo in range(0, store.nnz, CSR_CHUNK):
        chunk = read(values, slice(lo, min(store.nnz, lo + CSR_CHUNK))).astype(np.float64)
        total += float(chunk.sum())
        total_log += float(np.log1p(chunk / eps).sum())
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    n = max(1, store.nnz)
    return DataSummary(store.n_users, store.n_items, store.nnz, total / n, total_log / n, float(eps),
                       low if store.nnz else 0.0, high if store.nnz else 0.0)


def _range(value, name: str, kind: type, positive: bool) -> tuple | None:
    if value is None:
        return None
    try:
        lo, hi = (kind(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise SettingError(f"search range {name} must be two numbers (low, high), got {value!r}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi or (positive and lo <= 0) or lo < 0:
        raise SettingError(f"search range {name} must be finite with {'0 < ' if positive else '0 <= '}low <= high, got {value!r}")
    return (lo, hi)


@dataclass(frozen=True)
class SearchSpace:
    """Which settings a search varies, and over what range; ``None`` keeps the base setting.

    confidence: the confidence forms to try. weight, reg: the data-scaled alpha and
    regularization (module docstring), log-uniform. alpha0: log-uniform. nu: uniform.
    factors, iterations: integer ranges (log-uniform for factors), off unless given.
    """

    confidence: tuple[str, ...] | None = ("linear", "log")
    weight: tuple[float, float] | None = (0.1, 300.0)
    reg: tuple[float, float] | None = (1e-3, 1e3)
    alpha0: tuple[float, float] | None = (1e-3, 1.0)
    nu: tuple[float, float] | None = (0.0, 1.0)
    factors: tuple[int, int] | None = None
    iterations: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.confidence is not None:
            forms = tuple(self.confidence)
            unknown = [c for c in forms if c not in ("linear", "log", "constant")]
            if not forms or unknown:
                raise SettingError(f"confidence forms must be among linear, log, constant; got {self.confidence!r}")
            object.__setattr__(self, "confidence", forms)
        for name, kind, positive in (("weight", float, True), ("reg", float, True), ("alpha0", float, True),
                                     ("nu", float, False), ("factors", int, True), ("iterations", int, True)):
            object.__setattr__(self, name, _range(getattr(self, name), name, kind, positive))

    @classmethod
    def of(cls, space: SearchSpace | dict | None) -> SearchSpace:
        if space is None:
            return cls()
        if isinstance(space, SearchSpace):
            return space
        unknown = set(space) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise SettingError(f"unknown search settings {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**space)

    def to_dict(self) -> dict:
        return {k: (list(v) if v is not None else None) for k, v in asdict(self).items()}

    def for_data(self, data: DataSummary) -> SearchSpace:
        """The space without what cannot matter on this data: when every stored value is the same
        (clicks, ratings counted as 1), the confidence forms differ only by a scale of alpha, which
        ``weight`` already covers, so the form is not searched."""
        if self.confidence is not None and len(self.confidence) > 1 and data.min_value == data.max_value:
            return replace(self, confidence=None)
        return self

    # -- points and settings ---------------------------------------------------------------------
    def suggest(self, trial: optuna.trial.BaseTrial) -> dict:
        """Draw a point from an Optuna trial (its params, in the search's own names)."""
        params: dict = {}
        if self.confidence is not None:
            params["confidence"] = trial.suggest_categorical("confidence", list(self.confidence))
        for name in ("weight", "reg", "alpha0"):
            bounds = getattr(self, name)
            if bounds is not None:
                params[name] = trial.suggest_float(name, *bounds, log=True)
        if self.nu is not None:
            params["nu"] = trial.suggest_float("nu", *self.nu)
        if self.factors is not None:
            params["factors"] = trial.suggest_int("factors", *self.factors, log=True)
        if self.iterations is not None:
            params["iterations"] = trial.suggest_int("iterations", *self.iterations)
        return params

    def settings(self, params: dict, data: DataSummary, base: WALSConfig) -> dict:
        """The WALS settings of a point; what the point does not vary comes from ``base``."""
        confidence = params.get("confidence", base.confidence)
        alpha0 = float(params.get("alpha0", base.alpha0))
        nu = float(params.get("nu", base.nu))
        alpha = base.alpha
        if "weight" in params:
            alpha = float(params["weight"]) * alpha0 / max(data.mean_g(confidence), 1e-12)
        regularization = base.regularization
        if "reg" in params:
            regularization = float(params["reg"]) * alpha0 / data.penalty_scale(alpha0, nu)
        return {
            "confidence": confidence, "alpha": alpha, "alpha0": alpha0, "regularization": regularization, "nu": nu,
            "factors": int(params.get("factors", base.factors)), "iterations": int(params.get("iterations", base.iterations)),
        }

    def point(self, settings: dict, data: DataSummary) -> dict:
        """The point whose settings are ``settings`` (clipped into the ranges): to enqueue a known setting."""
        def clip(name, value):
            lo, hi = getattr(self, name)
            return float(min(max(value, lo), hi))

        params: dict = {}
        confidence, alpha0, nu = settings["confidence"], float(settings["alpha0"]), float(settings["nu"])
        if self.confidence is not None and confidence in self.confidence:
            params["confidence"] = confidence
        if self.alpha0 is not None:
            params["alpha0"] = alpha0 = clip("alpha0", alpha0)
        if self.nu is not None:
            params["nu"] = nu = clip("nu", nu)
        if self.weight is not None:
            params["weight"] = clip("weight", settings["alpha"] * data.mean_g(confidence) / alpha0)
        if self.reg is not None:
            params["reg"] = clip("reg", settings["regularization"] * data.penalty_scale(alpha0, nu) / alpha0)
        for name in ("factors", "iterations"):
            bounds = getattr(self, name)
            if bounds is not None:
                params[name] = int(min(max(int(settings[name]), bounds[0]), bounds[1]))
        return params


def trial_config(base: WALSConfig, settings: dict) -> WALSConfig:
    """The base config with a point's settings applied."""
    data = base.to_dict()
    data.update(settings)
    return WALSConfig.from_dict(data)
