"""Read-only access to a local store without zarr: what `wals-ooc info` needs, and starts fast.

Importing zarr costs about 0.3 s (its codec and entry-point registries), more than everything
else `info` does. The nodes wals-ooc writes are simple Zarr v3: a ``zarr.json`` document per
group and array, 1-d arrays of numbers on a regular chunk grid, chunks ``c/K`` encoded by the
``bytes`` codec, then Blosc (``numcodecs``), then a crc32c checksum. ``open_group`` reads exactly
that with the json module, numcodecs' Blosc and google_crc32c, and checks every chunk as
``format.open_group`` does (the same errors: a corrupt or missing chunk names the store, the
array and the chunk). ``PeekGroup`` and ``PeekArray`` offer the part of zarr's ``Group`` and
``Array`` the readers use (``attrs``, ``group[name]``, ``shape``, ``dtype``, ``chunks``,
slices and ``get_coordinate_selection``), so ``InteractionStore``, ``IdIndex`` and
``NameIndex`` read through them unchanged.

Anything else (another codec, a chunk grid or key encoding zarr allows but wals-ooc does not
write, a node that is not Zarr v3) raises ``Unsupported``: the caller opens the store with zarr
instead, which reads it or says what is wrong. Remote stores are always read with zarr.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ..errors import CorruptStoreError, StoreNotFoundError
from .format import DENSE_ATTR, GENERATION_ATTR, is_local, local_path


class Unsupported(Exception):
    """A node this reader does not read: open the store with zarr (``format.open_group``)."""


_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32", "float64"}
_SHUFFLES = {"noshuffle", "shuffle", "bitshuffle"}


def _metadata(path: str, where: str, node: str) -> dict | None:
    """The ``zarr.json`` document of the node at ``path`` (None when there is none)."""
    try:
        with open(os.path.join(path, "zarr.json"), "rb") as handle:
            raw = handle.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CorruptStoreError(f"{where}: the metadata of {node} ({node}/zarr.json) is corrupt ({exc}): the store "
                                "is damaged; write it again from its source") from exc
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") not in ("group", "array"):
        raise Unsupported(f"{path} is not a Zarr v3 node")
    return meta


def open_group(location: str | os.PathLike) -> PeekGroup:
    """The root group of the local store at ``location`` (a pointer store followed to its
    current generation), read-only, without zarr. A location that holds no store raises the
    same ``StoreNotFoundError`` as ``format.open_group`` (it says what is there instead);
    ``Unsupported`` when this reader cannot tell (a remote URL, a root that is an array, ...)."""
    text = os.fspath(location)
    if not is_local(text):
        raise Unsupported(f"{text} is not a local path")
    root = local_path(text)
    try:
        meta = _metadata(root, text, "/")
    except CorruptStoreError as exc:  # as format.open_group says it
        raise StoreNotFoundError(f"{text}: not a wals-ooc store ({exc.__cause__})") from exc
    if meta is None:
        from .sniff import not_a_store

        raise not_a_store(text)
    if meta["node_type"] != "group":
        raise Unsupported(f"{text} is a Zarr array")
    group = PeekGroup(root, "", text, meta)
    generation = group.attrs.get(GENERATION_ATTR)
    if generation:
        node = group[str(generation)]
        if not isinstance(node, PeekGroup):
            raise Unsupported(f"{text}: generation {generation} is not a group")
        return node
    return group


class PeekGroup:
    """A Zarr v3 group read without zarr (see the module docstring)."""

    def __init__(self, root: str, path: str, where: str, meta: dict):
        self._root, self.path, self._where = root, path, where
        self.attrs: dict[str, Any] = dict(meta.get("attributes") or {})

    @property
    def store_path(self) -> str:  # named as zarr's, for the messages that name a group
        return self._where

    def _child(self, name: str) -> str:
        return f"{self.path}/{name}" if self.path else name

    def __getitem__(self, name: str) -> PeekGroup | PeekArray:
        path = self._child(name.strip("/"))
        meta = _metadata(os.path.join(self._root, *path.split("/")), self._where, path)
        if meta is None:
            raise KeyError(name)
        if meta["node_type"] == "group":
            return PeekGroup(self._root, path, self._where, meta)
        return PeekArray(self._root, path, self._where, meta)

    def __contains__(self, name: str) -> bool:
        try:
            self[name]
        except KeyError:
            return False
        return True


class PeekArray:
    """A 1-d Zarr v3 array of numbers read without zarr, every chunk's checksum verified."""

    def __init__(self, root: str, path: str, where: str, meta: dict):
        self.path, self._where = path, where
        self._dir = os.path.join(root, *path.split("/"))
        self.attrs: dict[str, Any] = dict(meta.get("attributes") or {})
        shape = meta.get("shape")
        grid = meta.get("chunk_grid") or {}
        keys = meta.get("chunk_key_encoding") or {}
        data_type = meta.get("data_type")
        if (not isinstance(shape, list) or len(shape) != 1 or data_type not in _DTYPES
                or grid.get("name") != "regular" or keys.get("name") != "default"
                or meta.get("storage_transformers")):
            raise Unsupported(f"{path}: not a plain 1-d array of numbers")
        self.shape = (int(shape[0]),)
        self.chunks = tuple(int(c) for c in (grid.get("configuration") or {}).get("chunk_shape", ()))
        if len(self.chunks) != 1 or self.chunks[0] < 1:
            raise Unsupported(f"{path}: chunk shape {self.chunks}")
        self._separator = (keys.get("configuration") or {}).get("separator", "/")
        if self._separator not in ("/", "."):
            raise Unsupported(f"{path}: chunk key separator {self._separator!r}")
        self._dense = bool(self.attrs.get(DENSE_ATTR))
        self._blosc, self._checksum, endian = self._codecs(meta.get("codecs") or [])
        self.dtype = np.dtype(data_type)
        self._stored = self.dtype.newbyteorder("<" if endian == "little" else ">") if self.dtype.itemsize > 1 else self.dtype
        fill = meta.get("fill_value", 0)
        try:
            self.fill_value = self.dtype.type(float(fill) if isinstance(fill, str) else fill)
        except (TypeError, ValueError) as exc:
            raise Unsupported(f"{path}: fill value {fill!r}") from exc
        self._cache: tuple[int, np.ndarray] | None = None  # the last chunk read

    def _codecs(self, codecs: list) -> tuple[bool, bool, str]:
        """(Blosc-compressed, crc32c last, endianness) from the codec chain, or Unsupported."""
        names = [c.get("name") if isinstance(c, dict) else None for c in codecs]
        if not names or names[0] != "bytes":
            raise Unsupported(f"{self.path}: codecs {names}")
        endian = ((codecs[0].get("configuration") or {}).get("endian")) or "little"
        rest = names[1:]
        checksum = bool(rest) and rest[-1] == "crc32c"
        if checksum:
            rest = rest[:-1]
        if rest not in ([], ["blosc"]) or endian not in ("little", "big"):
            raise Unsupported(f"{self.path}: codecs {names}")
        if rest and (codecs[1].get("configuration") or {}).get("shuffle", "noshuffle") not in _SHUFFLES:
            raise Unsupported(f"{self.path}: blosc settings")
        return bool(rest), checksum, endian

    @property
    def ndim(self) -> int:
        return 1

    @property
    def size(self) -> int:
        return self.shape[0]

    def __len__(self) -> int:
        return self.shape[0]

    def _damaged(self, k: int, what: str) -> CorruptStoreError:
        return CorruptStoreError(f"{self._where}: chunk {(k,)} of array {self.path} is {what}")

    def chunk(self, k: int) -> np.ndarray:
        """Chunk ``k``, decoded and checked (read-only; its full chunk length)."""
        if self._cache is not None and self._cache[0] == k:
            return self._cache[1]
        length = self.chunks[0]
        key = f"c{self._separator}{k}"
        try:
            with open(os.path.join(self._dir, *key.split("/")), "rb") as handle:
                raw = handle.read()
        except (FileNotFoundError, NotADirectoryError):
            if self._dense:
                raise self._damaged(k, "missing: the store is incomplete or damaged; write it again from its source") from None
            values = np.full(length, self.fill_value, self.dtype)
            self._cache = (k, values)
            return values
        if self._checksum:
            import google_crc32c

            if len(raw) < 4 or int(google_crc32c.value(raw[:-4])).to_bytes(4, "little") != raw[-4:]:
                raise self._damaged(k, "corrupt (checksum mismatch): the store is damaged; write it again from its source")
            raw = raw[:-4]
        if self._blosc:
            from numcodecs import blosc

            try:
                raw = blosc.decompress(raw)
            except Exception as exc:  # numcodecs raises RuntimeError or ValueError
                raise self._damaged(k, f"corrupt ({exc}): the store is damaged; write it again from its source") from exc
        if len(raw) != length * self.dtype.itemsize:
            raise self._damaged(k, f"corrupt ({len(raw)} bytes, not {length * self.dtype.itemsize}): the store is "
                                   "damaged; write it again from its source")
        values = np.frombuffer(raw, self._stored).astype(self.dtype, copy=False)
        values.flags.writeable = False
        self._cache = (k, values)
        return values

    def __getitem__(self, key: Any) -> np.ndarray:
        if key is Ellipsis or (isinstance(key, tuple) and key in ((Ellipsis,), ())):
            key = slice(None)
        if isinstance(key, (int, np.integer)):
            index = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= index < self.shape[0]:
                raise IndexError(f"index {int(key)} out of bounds for {self.path} of {self.shape[0]} elements")
            return self.chunk(index // self.chunks[0])[index % self.chunks[0]].copy()
        if not isinstance(key, slice):
            raise TypeError(f"{self.path}: index {key!r} (a slice, an int or ... only)")
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            raise IndexError(f"{self.path}: slices with a step are not read")
        out = np.empty(max(0, stop - start), self.dtype)
        length = self.chunks[0]
        at = start
        while at < stop:
            k = at // length
            hi = min(stop, (k + 1) * length)
            out[at - start : hi - start] = self.chunk(k)[at - k * length : hi - k * length]
            at = hi
        return out

    def get_coordinate_selection(self, positions: Any) -> np.ndarray:
        """Elements at ``positions`` (any order), reading each chunk they fall in once."""
        positions = np.asarray(positions, np.int64).ravel()
        if len(positions) and (positions.min() < 0 or positions.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: coordinates outside [0, {self.shape[0]})")
        out = np.empty(len(positions), self.dtype)
        length = self.chunks[0]
        which = positions // length
        ordered = np.sort(which)  # not np.unique: it imports numpy.ma (25 ms)
        for k in ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))].tolist():
            at = which == k
            out[at] = self.chunk(k)[positions[at] - k * length]
        return out
