"""The zarr store under every node ``format.open_group`` opens: checks each chunk's crc32c as it
is read, naming the store, the array and the chunk on a mismatch (zarr's own codec cannot), and
refuses a chunk missing from an array written whole (``format.DENSE_ATTR``).

Kept apart from ``format`` so that the layout's names load without zarr (see ``peek``).
"""

from __future__ import annotations

import json
import re
from typing import Any

import google_crc32c
import numpy as np
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from ..errors import CorruptStoreError
from .format import DENSE_ATTR, is_local, local_path


_CHUNK_KEY = re.compile(r"^(?:(.*)/)?c((?:/\d+)*)$")


class ChecksumStore(WrapperStore):
    """A Zarr store that checks each chunk's crc32c as it is read (arrays with a crc32c codec).

    Zarr's codec checks it too, but cannot say which store, array and chunk failed; this can.
    """

    def __init__(self, store, location: str = "", finished: bool = False):
        super().__init__(store)
        self._location = location
        self._finished = finished  # opened read-only: arrays marked dense must have every chunk
        self._checked: dict[str, tuple[bool, bool]] = {}  # array path -> (crc32c last, dense)

    def _with_store(self, store):
        return type(self)(store, self._location, self._finished)

    async def _kind_of(self, array_path: str, prototype) -> tuple[bool, bool]:
        if array_path not in self._checked:
            key = f"{array_path}/zarr.json" if array_path else "zarr.json"
            raw = await self._store.get(key, prototype)
            meta = {}
            if raw is not None:
                try:
                    meta = json.loads(raw.to_bytes())
                except (ValueError, AttributeError):
                    meta = {}
            codecs = meta.get("codecs") or []
            last = codecs[-1] if codecs else None
            dense = bool((meta.get("attributes") or {}).get(DENSE_ATTR))
            self._checked[array_path] = (isinstance(last, dict) and last.get("name") == "crc32c", dense)
        return self._checked[array_path]

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if byte_range is not None or key.endswith("zarr.json"):
            return value
        match = _CHUNK_KEY.match(key)
        if match is None:
            return value
        array_path = match.group(1) or ""
        checksum, dense = await self._kind_of(array_path, prototype)
        if value is None:
            if dense and self._finished:
                coords = tuple(int(c) for c in match.group(2).split("/") if c)
                raise CorruptStoreError(f"{self._location}: chunk {coords} of array {array_path or '/'} is missing: "
                                        "the store is incomplete or damaged; write it again from its source")
            return value
        if checksum:
            data = value.as_numpy_array()
            stored = bytes(data[-4:]) if len(data) >= 4 else b""
            if len(data) < 4 or np.uint32(google_crc32c.value(bytes(data[:-4]))).tobytes() != stored:
                coords = tuple(int(c) for c in match.group(2).split("/") if c)
                raise CorruptStoreError(
                    f"{self._location}: chunk {coords} of array {array_path or '/'} is corrupt (checksum "
                    "mismatch): the store is damaged; write it again from its source"
                )
        return value


def zarr_store(location: str, read_only: bool, storage_options: dict[str, Any] | None):
    if is_local(location):
        return LocalStore(local_path(location), read_only=read_only)
    return FsspecStore.from_url(location, storage_options=storage_options or {}, read_only=read_only)


