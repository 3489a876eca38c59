"""wals-ooc: implicit-feedback ALS on interaction matrices larger than memory.

Data flow: CSV/Parquet --convert--> interaction store --WALS.fit--> factor store
--> recommend / similar / fold-in / evaluate; ``tune`` searches the settings.

The names below are imported on first use, so that ``import wals_ooc`` and the ``wals-ooc``
command start without loading numba, dask or zarr until a command needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "InputError": ".errors",
    "SearchSpace": ".tuning",
    "TuneResult": ".tuning",
    "merge": ".store.merge",
    "tune": ".tuning",
    "StoreError": ".errors",
    "SyntheticSpec": ".synthetic",
    "WALS": ".model",
    "WALSConfig": ".config",
    "add_names": ".store.names",
    "convert": ".store.writer",
    "load": ".model",
    "open_store": ".store.reader",
    "split": ".evaluate.split",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from .config import WALSConfig
    from .errors import InputError, StoreError
    from .evaluate.split import split
    from .model import WALS, load
    from .store.merge import merge
    from .store.names import add_names
    from .store.reader import open_store
    from .store.writer import convert
    from .synthetic import SyntheticSpec
    from .tuning import SearchSpace, TuneResult, tune
