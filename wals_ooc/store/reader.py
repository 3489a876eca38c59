"""Read access to an interaction store: metadata, one shard of CSR rows at a time, and id maps."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..errors import CorruptStoreError, StoreError
from .format import (
    ID_ARRAYS,
    INTERACTIONS_KIND,
    SIDES,
    array,
    as_int,
    as_int_list,
    check_complete,
    open_group,
    read,
    shard_ranges,
    subgroup,
)
from .ids import IdIndex

if TYPE_CHECKING:
    import zarr

    from .names import NameIndex


@dataclass
class CSRShard:
    """Rows ``[row_start, row_stop)`` of one orientation, as CSR with a local ``indptr``.

    indptr: int64 (rows + 1,), starting at 0.
    indices: int32 (nnz,), column index in the other side's numbering, sorted within a row.
    values: float32 (nnz,), interaction values.
    order: float64 (nnz,), each entry's place in time, when asked for and the store has it.
    entry_start: the global position of the first entry (in the orientation's entry arrays).
    """

    row_start: int
    row_stop: int
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    order: np.ndarray | None = None
    entry_start: int = 0

    @property
    def n_rows(self) -> int:
        return self.row_stop - self.row_start

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def nbytes(self) -> int:
        return self.indptr.nbytes + self.indices.nbytes + self.values.nbytes


class InteractionStore:
    """A finished interaction store (see ``format``), opened read-only.

    Nothing but metadata is read on open; shards and id maps are read on demand, so opening a
    store of any size costs the same.
    """

    def __init__(self, location: str | os.PathLike, storage_options: dict[str, Any] | None = None, group: Any = None):
        self.location = os.fspath(location)
        self.storage_options = storage_options
        # group: the store's root already opened (``peek.open_group``: `info` reads without zarr)
        self.group = open_group(self.location, "r", storage_options) if group is None else group
        check_complete(self.group, INTERACTIONS_KIND, self.location)
        attrs = self.group.attrs
        self.n_users = as_int(attrs["n_users"])
        self.n_items = as_int(attrs["n_items"])
        self.nnz = as_int(attrs["nnz"])
        self._shard_bounds = {
            side: as_int_list(subgroup(self.group, orientation).attrs["shard_bounds"])
            for side, orientation in SIDES.items()
        }
        self.row_block = as_int(subgroup(self.group, "by_user").attrs["row_block"])

    # -- metadata -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_users, self.n_items)

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.n_users * self.n_items)

    def n_rows(self, side: str) -> int:
        """Rows of a side's orientation: users for ``"user"``, items for ``"item"``."""
        return self.n_users if side == "user" else self.n_items

    def shard_bounds(self, side: str) -> list[int]:
        return list(self._shard_bounds[side])

    def shard_ranges(self, side: str) -> list[tuple[int, int]]:
        return shard_ranges(self._shard_bounds[side])

    def n_shards(self, side: str) -> int:
        return len(self._shard_bounds[side]) - 1

    def attrs(self) -> dict:
        return dict(self.group.attrs)

    # -- CSR access -----------------------------------------------------------------------------
    def _csr(self, side: str) -> zarr.Group:
        # opened once per store object: each lookup is a metadata read (a round trip on S3)
        groups = self.__dict__.setdefault("_csr_groups", {})
        if side not in groups:
            groups[side] = subgroup(self.group, SIDES[side])
        return groups[side]

    def indptr(self, side: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Global row pointers of rows ``[start, stop)`` (``stop - start + 1`` values)."""
        stop = self.n_rows(side) if stop is None else stop
        return read(array(self._csr(side), "indptr"), slice(start, stop + 1))

    @property
    def has_order(self) -> bool:
        """Whether entries carry an order (converted with an order column)."""
        return bool(self.group.attrs.get("has_order", False))

    def rows(self, side: str, start: int, stop: int, with_order: bool = False) -> CSRShard:
        """CSR rows ``[start, stop)`` of a side's orientation (and their order, if asked).

        The rows are validated (row pointers non-decreasing and within the entries, every index
        inside the other side's range) before they are returned, so no kernel reads out of
        bounds: a damaged store raises ``CorruptStoreError``.
        """
        if not 0 <= start <= stop <= self.n_rows(side):
            raise IndexError(f"rows [{start}, {stop}) outside the {self.n_rows(side)} rows of {self.location} {SIDES[side]}")
        group = self._csr(side)
        indptr = read(array(group, "indptr"), slice(start, stop + 1)).astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        orientation = SIDES[side]
        if len(indptr) != stop - start + 1 or not 0 <= lo <= hi <= self.nnz:
            raise CorruptStoreError(f"{self.location}: {orientation}/indptr of rows [{start}, {stop}) points outside the "
                                    f"{self.nnz} entries: the store is damaged; write it again")
        indices = read(array(group, "indices"), slice(lo, hi))
        values = read(array(group, "values"), slice(lo, hi))
        local = indptr - lo
        from ..kernels.csr import csr_problem  # numba: loaded by the first read of rows, not by opening

        code, at = csr_problem(local, indices, int(self.n_rows("item" if side == "user" else "user")))
        if code == 1 or len(values) != len(indices):
            raise CorruptStoreError(f"{self.location}: {orientation}/indptr is damaged at row {start + max(at, 0)} "
                                    "(decreasing, or beyond the entries): write the store again")
        if code == 2:
            raise CorruptStoreError(f"{self.location}: {orientation}/indices[{lo + at}] = {int(indices[at])} is outside "
                                    f"[0, {self.n_rows('item' if side == 'user' else 'user')}): the store is damaged; "
                                    "write it again")
        order = None
        if with_order:
            if not self.has_order:
                raise StoreError(f"{self.location} has no entry order: convert with an order column (--order-col)")
            order = read(array(group, "order"), slice(lo, hi))
        return CSRShard(start, stop, local, indices, values, order, lo)

    def shard(self, side: str, k: int) -> CSRShard:
        start, stop = self.shard_ranges(side)[k]
        return self.rows(side, start, stop)

    def iter_shards(self, side: str) -> Iterator[CSRShard]:
        for k in range(self.n_shards(side)):
            yield self.shard(side, k)

    def shard_nnz(self, side: str) -> list[int]:
        """Entries in each shard, from the row pointers at the shard bounds only."""
        indptr = array(self._csr(side), "indptr")
        bounds = self._shard_bounds[side]
        at_bounds = np.asarray(indptr.get_coordinate_selection(np.asarray(bounds)))
        return [int(v) for v in np.diff(at_bounds)]

    def row_counts(self, side: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Entries per row for rows ``[start, stop)``."""
        return np.diff(self.indptr(side, start, stop))

    # -- id maps --------------------------------------------------------------------------------
    @cached_property
    def _id_maps(self) -> dict[str, IdIndex]:
        return {}

    def id_map(self, side: str) -> IdIndex:
        """The id map of a side (row <-> original id), opened on first use."""
        if side not in SIDES:
            raise ValueError(f"side must be 'user' or 'item', not {side!r}")
        if side not in self._id_maps:
            self._id_maps[side] = IdIndex(subgroup(self.group, ID_ARRAYS[side]), self.location)
        return self._id_maps[side]

    @property
    def id_kinds(self) -> dict[str, str]:
        """Kind of each side's ids: "int" (int64) or "str" (text)."""
        return {side: self.id_map(side).kind for side in SIDES}

    @property
    def id_kind(self) -> str:
        """"int" or "str" when both sides have that kind, else "mixed" (see ``id_kinds``)."""
        kinds = set(self.id_kinds.values())
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def index_of(self, side: str, original_ids: Any, missing: str = "raise") -> np.ndarray:
        """Row index (int64, flat) of each original id, looked up chunk by chunk in the id map.

        missing: "raise" raises UnknownIdError naming the unknown ids; "mark" returns -1 for them.
        Integer ids may be given as ints or as their text; string ids as str (or bytes, UTF-8).
        """
        return self.id_map(side).index_of(original_ids, missing, side)

    def ids_of(self, side: str, rows: Any, missing: Any = None, as_arrow: bool = False):
        """Original ids of rows of any shape and order (int64, or str objects for string ids);
        rows < 0 give ``missing`` (default -1 or ""). Reads only the chunks those rows are in.
        as_arrow: a flat Arrow array instead (int64 or large_string), for rows >= 0."""
        return self.id_map(side).ids_of(rows, missing, as_arrow)

    def ids(self, side: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Original ids of rows ``[start, stop)`` in row order. Without bounds this loads the
        whole map: use it on small stores only, and ``iter_ids`` or ``ids_of`` otherwise."""
        index = self.id_map(side)
        stop = index.n if stop is None else min(stop, index.n)
        return index.ids_of(np.arange(start, max(start, stop), dtype=np.int64))

    def iter_ids(self, side: str, start: int = 0, stop: int | None = None, rows: int = 1 << 16) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, ids) for consecutive blocks of ``rows`` rows, in row order."""
        return self.id_map(side).iter_ids(start, stop, rows)

    # -- display names (optional; see ``names``) ------------------------------------------------
    def name_map(self, side: str) -> NameIndex | None:
        """The display names of a side (a ``names.NameIndex``), or None when it has none."""
        if side not in SIDES:
            raise ValueError(f"side must be 'user' or 'item', not {side!r}")
        from .names import NameIndex

        return NameIndex.of(subgroup(self.group, ID_ARRAYS[side]), self.location, side)

    def has_names(self, side: str) -> bool:
        return bool(self.group[ID_ARRAYS[side]].attrs.get("names"))

    def names_of(self, side: str, rows: Any) -> np.ndarray | None:
        """Display name of each row (any shape; None where a row has no name), read chunk by
        chunk; None when the side has no names."""
        names = self.name_map(side)
        return None if names is None else names.names_of(rows)

    def row_of_name(self, side: str, name: str) -> int:
        """The row of the one user or item called ``name``: an exact match, else one ignoring
        case. Unknown: ``UnknownIdError``; several: ``AmbiguousNameError`` listing them."""
        from .names import row_of_name

        return row_of_name(self.name_map(side), self.id_map(side), name, side)


class IdMaps(InteractionStore):
    """The id maps of a store without its interactions: ``ids`` and ``index_of`` only.

    A model store keeps a copy of its interaction store's id maps (``ID_NODES``) in a group;
    this reads them with the same code as ``InteractionStore``, so serving what needs no
    interactions works when the interaction store is gone.
    """

    def __init__(self, group: zarr.Group, location: str, n_users: int, n_items: int):
        self.location = location
        self.storage_options = None
        self.group = group
        self.n_users, self.n_items, self.nnz = int(n_users), int(n_items), 0
        self._shard_bounds = {"user": [0, self.n_users], "item": [0, self.n_items]}
        self.row_block = max(1, self.n_users, self.n_items)

    def rows(self, side: str, start: int, stop: int, with_order: bool = False) -> CSRShard:
        raise StoreError(f"{self.location} holds id maps only, no interactions")


def open_store(location: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> InteractionStore:
    """Open a finished interaction store; raises ``StoreError`` if it is incomplete."""
    return InteractionStore(location, storage_options)
