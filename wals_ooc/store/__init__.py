"""Interaction store: the on-disk CSR matrix in both orientations, and how it is written and read.

Names are imported on first use (see ``wals_ooc._lazy``): reading a store does not load the
writer's pyarrow and dask."""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "BadRowReport": ".sources",
    "CSRShard": ".reader",
    "ConvertReport": ".writer",
    "InputError": ".sources",
    "InputSpec": ".sources",
    "InteractionStore": ".reader",
    "StoreError": ".format",
    "convert": ".writer",
    "open_store": ".reader",
    "write_store": ".writer",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs
    from .format import StoreError
    from .reader import CSRShard, InteractionStore, open_store
    from .sources import BadRowReport, InputError, InputSpec
    from .writer import ConvertReport, convert, write_store
