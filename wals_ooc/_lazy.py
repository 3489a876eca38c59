"""Lazy package exports (PEP 562): a package names what it offers and where each name lives, and
the defining module is imported on first access, so that importing a package (and starting the
``wals-ooc`` command) does not load numba, dask, zarr or pyarrow until something needs them."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable


def lazy_exports(package: str, namespace: dict, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """(``__getattr__``, ``__dir__``) for ``package`` whose public ``exports`` map name -> relative
    module (e.g. ``{"convert": ".writer"}``); a resolved name is cached in ``namespace``."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


class LazyModule:
    """A module imported on first attribute access (``pa = LazyModule("pyarrow")``), for modules
    on the path of fast commands that need a heavy library only in some of their functions."""

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


def lazy_function(module: str, name: str) -> Callable:
    """A function of ``module`` imported on its first call (e.g. a numba kernel: numba loads then)."""
    resolved: list = []

    def call(*args, **kwargs):
        if not resolved:
            resolved.append(getattr(importlib.import_module(module), name))
        return resolved[0](*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{module}.{name}, imported on first call."
    return call
