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
from .tuning import SearchSpace, TuneResult, tune

__version__ = "0.1.0"
__all__ = ["InputError", "SearchSpace", "StoreError", "SyntheticSpec", "TuneResult", "WALS", "WALSConfig", "convert", "load",
           "merge", "open_store", "split", "tune"]
