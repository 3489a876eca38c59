"""wals-ooc: implicit-feedback ALS on interaction matrices larger than memory.

Data flow: CSV/Parquet --convert--> interaction store --WALS.fit--> factor store
--> recommend / similar / fold-in / evaluate.
"""

from .config import WALSConfig
from .evaluate import split
from .model import WALS, load
from .store import InputError, StoreError, convert, open_store
from .synthetic import SyntheticSpec

__version__ = "0.1.0"
__all__ = ["InputError", "StoreError", "SyntheticSpec", "WALS", "WALSConfig", "convert", "load", "open_store", "split"]
