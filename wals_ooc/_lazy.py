"""Lazy package exports (PEP 562): a package names what it offers and where each name lives, and
the defining module is imported on first access, so that importing a package (and starting the
``wals-ooc`` command) does not load numba, dask, zarr or pyarrow until something needs them."""

from __future__ import annotations

import importlib
from typing import Callable


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
