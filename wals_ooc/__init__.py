"""wals-ooc: implicit-feedback ALS on interaction matrices larger than memory.

Data flow: CSV/Parquet --convert--> interaction store --WALS.fit--> factor store
--> recommend / similar / fold-in / evaluate; ``tune`` searches the settings.
"""

from .config import WALSConfig
from .evaluate import split
from .model import WALS, load
from .store import InputError, StoreError, convert, open_store
from .store.merge import merge
from .synthetic import SyntheticSpec

__version__ = "0.1.0"

_LAZY = {"tune": "tuning", "SearchSpace": "tuning", "TuneResult": "tuning"}


def __getattr__(name: str):
    """The search loads on first use (``wals_ooc.tune``): a process that never tunes does not pay for it."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
__all__ = ["InputError", "SearchSpace", "StoreError", "SyntheticSpec", "TuneResult", "WALS", "WALSConfig", "convert", "load",
           "merge", "open_store", "split", "tune"]
