"""wals-ooc: implicit-feedback ALS on interaction matrices larger than memory."""

from .store import InputError, StoreError, convert, open_store

__version__ = "0.1.0"
__all__ = ["InputError", "StoreError", "convert", "open_store"]
