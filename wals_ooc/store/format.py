"""Layout of the interaction store, and the one way the package opens and creates Zarr nodes.

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
write the same factor chunk. ``complete`` is set True only after everything else is written.

Integrity: every chunk of every array ends with a crc32c checksum (the Zarr v3 ``crc32c``
codec, created by ``create_array``); ``open_group`` checks it on every chunk read and raises
``CorruptStoreError`` naming the store, the array and the chunk.

On an object store a store may be a *pointer*: its root group's attributes name the generation
(a child group) that holds the data (see ``wals_ooc.store.lifecycle``); ``open_group`` follows
it, so readers never see the difference.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from ..errors import CorruptStoreError, PathError, StoreError, StoreNotFoundError

if TYPE_CHECKING:
    import zarr

# zarr is imported by the functions that open or create nodes (``checked`` holds the zarr store
# that verifies checksums), so that the layout's names load without it: `wals-ooc info` of a local
# store reads it with ``peek``, without zarr

# 2: every chunk carries a crc32c checksum; 3: id maps are groups of keys (int64 ids or XXH64 of
# the UTF-8 bytes) + offsets/bytes, looked up chunk by chunk (``ids``), with per-side id kinds
FORMAT_VERSION = 3
INTERACTIONS_KIND = "wals-ooc/interactions"
KIND_PREFIX = "wals-ooc/"
ORIENTATIONS = ("by_user", "by_item")
SIDES = {"user": "by_user", "item": "by_item"}
ID_ARRAYS = {"user": "user_ids", "item": "item_ids"}
#: the nodes of an interaction store that map rows to original ids (copied into a model)
ID_NODES = ("user_ids", "item_ids")
CSR_CHUNK = 1 << 18
#: how ``open_group`` opens a group (Zarr's modes)
Mode = Literal["r", "r+", "a", "w", "w-"]
#: root attribute of a pointer store: the child group holding the current generation
GENERATION_ATTR = "wals_ooc_generation"
#: array attribute: every chunk was written, so a missing one is damage (see ``create_array``)
DENSE_ATTR = "wals_ooc_dense"


def is_local(location: str | os.PathLike) -> bool:
    """True for a plain path or file:// URL, False for an fsspec URL such as s3://."""
    text = os.fspath(location)
    return "://" not in text or text.startswith("file://")


def local_path(location: str | os.PathLike) -> str:
    """The absolute file-system path of a local location (plain path or file:// URL)."""
    return os.path.abspath(os.fspath(location).removeprefix("file://"))


# what object-store clients raise when they find no credentials (botocore, google-auth), by
# class name: neither library need be installed for local paths
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "DefaultCredentialsError", "RefreshError"}


def credentials_problem(exc: BaseException, location: str | os.PathLike) -> PathError | None:
    """The error to raise when ``exc`` says an object store found no credentials to reach
    ``location`` (a one-line PathError naming it); None for any other failure."""
    if not any(cls.__name__ in _NO_CREDENTIALS for cls in type(exc).__mro__):
        return None
    text = os.fspath(location)
    how = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)" if text.startswith(("s3://", "s3a://"))
           else "set up the object store's credentials")
    return PathError(f"{text}: no credentials to reach it ({exc}): {how}, or pass them in storage_options")


def open_group(
    location: str | os.PathLike,
    mode: Mode = "r",
    storage_options: dict[str, Any] | None = None,
) -> zarr.Group:
    """Open a Zarr v3 group at a local path or an fsspec URL (s3://, gs://, memory://...).

    Every chunk read through it is checked against its checksum. In "r" and "r+" modes a
    pointer store is followed to its current generation; a missing group raises
    ``StoreNotFoundError``. Only ``wals_ooc.store.lifecycle`` creates groups ("w").
    """
    import zarr

    from .checked import ChecksumStore, zarr_store

    text = os.fspath(location)
    store = ChecksumStore(zarr_store(text, mode == "r", storage_options), text, finished=mode == "r")
    if mode not in ("r", "r+"):
        return zarr.open_group(store=store, mode=mode, zarr_format=3)
    try:
        group = zarr.open_group(store=store, mode=mode, zarr_format=3)
        generation = group.attrs.get(GENERATION_ATTR)
        if generation:
            group = zarr.open_group(store=store, mode=mode, zarr_format=3, path=str(generation))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, NotADirectoryError) as exc:
        from .sniff import not_a_store  # says what is there instead (a CSV file: how to convert it)

        raise not_a_store(text) from exc
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, StoreError):
            raise
        raise StoreNotFoundError(f"{text}: not a wals-ooc store ({exc})") from exc
    except Exception as exc:
        problem = credentials_problem(exc, text)
        if problem is None:
            raise
        raise problem from exc
    return group


def checksummed(compressors: Any = None) -> tuple:
    """The bytes-to-bytes codecs of a wals-ooc array: ``compressors`` followed by crc32c."""
    from zarr.codecs import Crc32cCodec

    if compressors is None:
        compressors = ()
    elif not isinstance(compressors, (list, tuple)):
        compressors = (compressors,)
    return (*compressors, Crc32cCodec())


def create_array(group: zarr.Group, name: str, *, compressors: Any = None, dense: bool = False, **kwargs) -> zarr.Array:
    """Create an array of a wals-ooc store: every chunk carries a crc32c checksum.

    Arguments are those of ``zarr.Group.create_array``; ``compressors`` (None: none) come
    before the checksum. dense: every chunk is written (even one equal to the fill value), so
    a chunk missing from a finished store is an error instead of reading as the fill value
    (for arrays written whole, such as CSR arrays and id maps). ``wals_ooc.store.lifecycle``
    refuses to finish a store holding an array made without the checksum.
    """
    if dense:
        kwargs["config"] = {**(kwargs.get("config") or {}), "write_empty_chunks": True}
        kwargs["attributes"] = {**(kwargs.get("attributes") or {}), DENSE_ATTR: True}
    return group.create_array(name, compressors=checksummed(compressors), **kwargs)


def writing_every_chunk(node: zarr.Array) -> zarr.Array:
    """``node`` whose writes store every chunk, also one equal to the fill value (Zarr otherwise
    compares each chunk with it, byte by byte, to delete it instead). Reads are unchanged."""
    from zarr.core.array_spec import ArrayConfig

    return node.with_config(ArrayConfig(order=node.order, write_empty_chunks=True))


def has_checksum(array: zarr.Array) -> bool:
    """Whether the chunks of ``array`` end with a crc32c checksum."""
    from zarr.codecs import Crc32cCodec

    codecs = array.metadata.codecs if hasattr(array.metadata, "codecs") else ()
    return bool(codecs) and isinstance(codecs[-1], Crc32cCodec)


def check_complete(group: zarr.Group, kind: str, location: str, version: int = FORMAT_VERSION) -> None:
    """Refuse a group that is not a finished store of ``kind`` and ``version``."""
    attrs = group.attrs
    found = attrs.get("kind")
    if found != kind:
        what = f"a {found} store" if isinstance(found, str) and found.startswith(KIND_PREFIX) else "not a wals-ooc store"
        raise StoreError(f"{location} is {what}, not a {kind} store")
    if attrs.get("format_version") != version:
        raise StoreError(
            f"{location} has format version {attrs.get('format_version')}, this wals-ooc reads version {version}: "
            "write it again with this version (convert, split or train it anew)"
        )
    if not attrs.get("complete", False):
        raise StoreError(
            f"{location} is incomplete: it was interrupted while being written; write it again "
            "(convert with --overwrite)"
        )


# ---------------------------------------------------------------------------------------------
# Typed access: Zarr types a node lookup as "array or group", a read as any of a dozen things and
# an attribute as any JSON value; these say what a wals-ooc store holds
# ---------------------------------------------------------------------------------------------


def array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of ``group``; a group found there is damage (``CorruptStoreError``)."""
    node = group[name]
    if not _is_array(node):
        raise CorruptStoreError(f"{_where(group)}: {name} is a group where an array belongs: the store is damaged; "
                                "write it again")
    return cast("zarr.Array", node)


def subgroup(group: zarr.Group, name: str) -> zarr.Group:
    """The group ``name`` of ``group``; an array found there is damage (``CorruptStoreError``)."""
    node = group[name]
    if _is_array(node):
        raise CorruptStoreError(f"{_where(group)}: {name} is an array where a group belongs: the store is damaged; "
                                "write it again")
    return cast("zarr.Group", node)


def _is_array(node: object) -> bool:
    # by what a node has rather than its class: zarr's nodes and ``peek``'s (read without zarr)
    return hasattr(node, "dtype") and hasattr(node, "shape")


def _where(group: object) -> str:
    return str(getattr(group, "store_path", group))


def read(source: zarr.Array, selection: Any) -> np.ndarray:
    """``source[selection]`` as a NumPy array (a scalar selection gives a 0-d array).

    Callers select a bounded part (a shard, a chunk, a block of rows), never a whole matrix.
    """
    return np.asarray(source[selection])


def as_int(value: object) -> int:
    """An integer read from Zarr JSON attributes or a scalar read (``int()`` of it, typed)."""
    if isinstance(value, (int, float, str, np.integer, np.floating, np.ndarray)):
        return int(value)
    raise TypeError(f"expected an integer, found {value!r}")


def as_int_list(value: object) -> list[int]:
    """A list of integers read from Zarr JSON attributes (e.g. ``shard_bounds``)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [as_int(v) for v in value]
    raise TypeError(f"expected a list of integers, found {value!r}")


def as_dict(value: object) -> dict[str, Any]:
    """A mapping read from Zarr JSON attributes (e.g. a model's config or checkpoint)."""
    if isinstance(value, dict):
        return value
    raise TypeError(f"expected a mapping, found {value!r}")


def as_list(value: object) -> list[Any]:
    """A list read from Zarr JSON attributes (e.g. a model's loss history)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(f"expected a list, found {value!r}")


def shard_ranges(bounds: list[int]) -> list[tuple[int, int]]:
    """Row ranges ``(start, stop)`` of the shards given their bounds."""
    return [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]
