"""Interaction store: the on-disk CSR matrix in both orientations, and how it is written and read."""

from .format import StoreError
from .reader import CSRShard, InteractionStore, open_store
from .sources import BadRowReport, InputError, InputSpec
from .writer import ConvertReport, convert, write_store

__all__ = [
    "BadRowReport",
    "CSRShard",
    "ConvertReport",
    "InputError",
    "InputSpec",
    "InteractionStore",
    "StoreError",
    "convert",
    "open_store",
    "write_store",
]
