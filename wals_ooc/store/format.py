"""Layout of the interaction store, and the one way the package opens Zarr groups.

An interaction store is a Zarr v3 group::

    STORE/                      attrs: kind, format_version, n_users, n_items, nnz, complete, ...
      by_user/                  CSR of the users x items matrix, attrs: shard_bounds, row_block
        indptr   int64 (n_users + 1,)   global row pointers
        indices  int32 (nnz,)           item index of each entry, sorted within a row
        values   float32 (nnz,)         summed interaction value (counts, plays, ...)
      by_item/                  CSR of the transpose (items x users), same arrays
      user_ids/                 id map of the users: row <-> original id (see ``ids``: int64 ids
                                sorted by value, or text ids as UTF-8 bytes + offsets ordered by
                                their XXH64 hash, with the sorted keys searched chunk by chunk)
      item_ids/                 id map of the items

Shards are contiguous row ranges ``[shard_bounds[k], shard_bounds[k+1])``; every bound is a
multiple of ``row_block``, the row-chunk size of the factor arrays, so two shard tasks never
write the same factor chunk. ``complete`` is set True only after everything else is written:
a store without it is an interrupted conversion and is refused.
"""

from __future__ import annotations

import os
from typing import Any

import zarr

from ..errors import StoreError

FORMAT_VERSION = 2  # 2: id maps are groups (ids.py), not whole-array string maps
INTERACTIONS_KIND = "wals-ooc/interactions"
ORIENTATIONS = ("by_user", "by_item")
SIDES = {"user": "by_user", "item": "by_item"}
ID_ARRAYS = {"user": "user_ids", "item": "item_ids"}
CSR_CHUNK = 1 << 18


def is_local(location: str | os.PathLike) -> bool:
    """True for a plain path or file:// URL, False for an fsspec URL such as s3://."""
    text = os.fspath(location)
    return "://" not in text or text.startswith("file://")


def open_group(
    location: str | os.PathLike,
    mode: str = "r",
    storage_options: dict[str, Any] | None = None,
) -> zarr.Group:
    """Open a Zarr v3 group at a local path or an fsspec URL (s3://, gs://, memory://...)."""
    text = os.fspath(location)
    if is_local(text):
        text = text.removeprefix("file://")
        return zarr.open_group(text, mode=mode, zarr_format=3)
    return zarr.open_group(text, mode=mode, zarr_format=3, storage_options=storage_options or {})


def check_complete(group: zarr.Group, kind: str, location: str, version: int = FORMAT_VERSION) -> None:
    """Refuse a group that is not a finished store of ``kind`` and ``version``."""
    attrs = group.attrs
    if attrs.get("kind") != kind:
        raise StoreError(f"{location} is not a {kind} store (kind={attrs.get('kind')!r})")
    if attrs.get("format_version") != version:
        raise StoreError(
            f"{location} has format version {attrs.get('format_version')}, this wals-ooc reads {version}"
        )
    if not attrs.get("complete", False):
        raise StoreError(
            f"{location} is incomplete: it was interrupted while being written; write it again "
            "(convert with --overwrite)"
        )


def shard_ranges(bounds: list[int]) -> list[tuple[int, int]]:
    """Row ranges ``(start, stop)`` of the shards given their bounds."""
    return [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]
