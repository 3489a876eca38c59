"""Id maps of any size: row -> original id and original id -> row, read chunk by chunk.

Each side of an interaction store has an id map, a Zarr group (``user_ids/``, ``item_ids/``)::

    key       (n,)  sorted keys, one per row: the id itself (int64) for integer ids, the XXH64
                    hash of the UTF-8 bytes (uint64) for string ids
    fence     (c,)  the first key of each chunk of ``key`` (small: read whole on open)
    offsets   (n + 1,) int64   string ids only: row r's id is bytes[offsets[r]:offsets[r + 1]]
    bytes     (total,) uint8   string ids only: the UTF-8 bytes of every id, in row order
    attrs: kind ("int" or "str"), n, id_type (what was asked: "auto", "int" or "str"), and for
           string ids collisions: [hash, first row, rows] of each hash that more than one id
           has (almost always empty)

Rows are numbered in key order: integer ids by value, string ids by (hash, bytes). So
``key`` is both the row -> key map and a sorted search index, and looking up a batch of ids
is a merge: sort the queries' keys, read only the chunks of ``key`` they fall in (found with
the in-memory fence), then (string ids) read the candidate rows' bytes and compare them, so a
hash collision can never return a wrong row. Memory: the queries and one read window
(``READ_BYTES``), whatever the size of the map.

``DistinctIds`` builds a map from ids seen batch by batch (sorted runs spilled to disk and
merged when they exceed their memory share) and ``IdIndexWriter`` writes it front to back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal

import numpy as np

from .._lazy import LazyModule, lazy_function
from ..errors import UnknownIdError

# pyarrow and the numba text kernels load on first use: reading integer ids (`wals-ooc info`)
# needs neither
if TYPE_CHECKING:  # annotations only: pyarrow itself loads on first use
    import pyarrow as pa
else:
    pa = LazyModule("pyarrow")
chunk_runs = lazy_function("wals_ooc.kernels.text", "chunk_runs")
distinct_by_hash = lazy_function("wals_ooc.kernels.text", "distinct_by_hash")
equal_pairs = lazy_function("wals_ooc.kernels.text", "equal_pairs")
gather_ranges = lazy_function("wals_ooc.kernels.text", "gather_ranges")
hash_strings = lazy_function("wals_ooc.kernels.text", "hash_strings")
parse_ints_each = lazy_function("wals_ooc.kernels.text", "parse_ints_each")
from .appender import ChunkAppender
from .format import array as node_array
from .format import as_int, create_array, read

if TYPE_CHECKING:
    import zarr

KINDS = ("int", "str")
KEY_CHUNK = 1 << 16  # rows per chunk of key and offsets
BYTES_CHUNK = 1 << 20  # bytes per chunk of the id text
READ_BYTES = 16 << 20  # bytes of one array read at once (a run of consecutive chunks)
RUN_BATCH = 1 << 14  # rows per record batch of a spilled run
_EMPTY_BYTES = np.zeros(0, np.uint8)
FEW_ROWS = 64  # rows read and decoded in Python (no numba, no Arrow): what `info` and one answer show


def _compressor(typesize: int) -> zarr.codecs.BloscCodec:
    import zarr.codecs

    shuffle: Literal["shuffle", "noshuffle"] = "shuffle" if typesize > 1 else "noshuffle"
    return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle=shuffle)


# ---------------------------------------------------------------------------------------------
# Ids as Arrow text
# ---------------------------------------------------------------------------------------------


def text_buffers(text: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 (n + 1,), data uint8) of a large_string array, zero-copy: string k is
    ``data[offsets[k]:offsets[k + 1]]`` (offsets are absolute, the array may be a slice)."""
    buffers = text.buffers()
    offsets = np.frombuffer(buffers[1], np.int64)[text.offset : text.offset + len(text) + 1]
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None and buffers[2].size else _EMPTY_BYTES
    return offsets, data


def text_from_buffers(offsets: np.ndarray, data: np.ndarray) -> pa.Array:
    """A large_string array over ``offsets`` (int64, starting anywhere) and ``data``."""
    offsets = np.ascontiguousarray(offsets, np.int64)
    return pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(data)))


def _as_list(ids: Any) -> list:
    """Query ids as a list of Python objects: one id, or any iterable of them."""
    if isinstance(ids, (str, bytes)) or np.isscalar(ids):
        return [ids]
    if isinstance(ids, np.ndarray):
        return ids.ravel().tolist()
    return list(ids)


def as_text(ids: Any) -> pa.Array:
    """Ids as an Arrow large_string array: str as is, bytes decoded as UTF-8, others (integers)
    as ``str(value)``. Lists are converted element by element (never to a fixed-width array)."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if isinstance(ids, pa.Array):
        if pa.types.is_integer(ids.type):
            ids = ids.cast(pa.int64())
        return ids.cast(pa.large_string())
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        return pa.array(ids.ravel().astype(np.int64)).cast(pa.large_string())
    values = [v if type(v) is str else v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in _as_list(ids)]
    return pa.array(values, type=pa.large_string())


def hash_text(text: pa.Array) -> np.ndarray:
    """XXH64 of each id's UTF-8 bytes (uint64)."""
    offsets, data = text_buffers(text)
    return hash_strings(offsets, data)


def _unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, index of each value in them), by sorting: NumPy 2's hash-based
    ``np.unique`` is many times slower on row numbers."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.empty(len(ordered), bool)
    if len(ordered):
        new[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    inverse = np.empty(len(values), np.int64)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], inverse


def _sorted_distinct(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (NumPy 2's hash-based unique is several times slower on ids)."""
    ordered = np.sort(values)
    if not len(ordered):
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


# ---------------------------------------------------------------------------------------------
# Building a map: distinct ids in bounded memory
# ---------------------------------------------------------------------------------------------


@dataclass
class _Block:
    """Distinct ids sorted by key: keys (int64 ids or uint64 hashes) and, for text, the ids."""

    keys: np.ndarray
    text: pa.Array | None = None

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + (self.text.nbytes if self.text is not None else 0)

    def __len__(self) -> int:
        return len(self.keys)

    def slice(self, start: int, stop: int) -> _Block:
        return _Block(self.keys[start:stop], self.text.slice(start, stop - start) if self.text is not None else None)


def _merge_blocks(blocks: list[_Block]) -> _Block:
    """Sorted distinct union of blocks (each may hold repeats and be in any order)."""
    blocks = [b for b in blocks if len(b)]
    if not blocks:
        raise ValueError("nothing to merge")
    keys = np.concatenate([b.keys for b in blocks]) if len(blocks) > 1 else blocks[0].keys
    if blocks[0].text is None:
        return _Block(_sorted_distinct(keys))
    text = pa.concat_arrays([b.text for b in blocks]) if len(blocks) > 1 else blocks[0].text
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    offsets, data = text_buffers(text)
    keep, mixed = distinct_by_hash(sorted_keys, order, offsets, data)
    starts = np.flatnonzero(keep)
    chosen = order[starts]
    if mixed.any():  # true hash collisions: order the group's distinct ids by their bytes
        ends = np.append(starts[1:], len(order))
        pieces, previous = [], 0
        for group in np.flatnonzero(mixed[starts]).tolist():
            pieces.append(chosen[previous:group])
            members = order[starts[group] : ends[group]]
            first_of: dict[bytes, int] = {}
            for member, value in zip(members.tolist(), text.take(pa.array(members)).to_pylist()):
                first_of.setdefault(value.encode("utf-8"), member)
            pieces.append(np.array([first_of[b] for b in sorted(first_of)], np.int64))
            previous = group + 1
        pieces.append(chosen[previous:])
        chosen = np.concatenate(pieces)
    return _Block(keys[chosen], text.take(pa.array(chosen)))


class DistinctIds:
    """The distinct ids of one side, gathered batch by batch in at most about ``memory_bytes``.

    kind "int": int64 ids; kind "str": text ids (Arrow strings), keyed by their hash. Blocks
    are merged in memory; once the merged ids pass a third of the memory share they are spilled
    to ``workdir`` as a sorted run, and ``blocks()`` merges the runs at the end.
    """

    def __init__(self, kind: str, workdir: str, memory_bytes: int, name: str = "ids"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self.kind = kind
        self.workdir = workdir
        self.memory_bytes = max(1 << 12, int(memory_bytes))
        self.name = name
        self.merged: _Block | None = None
        self.pending: list[_Block] = []
        self.pending_bytes = 0
        self.runs: list[str] = []
        self._files = 0  # spill files made so far: each gets a new name

    # -- adding ---------------------------------------------------------------------------------
    def add(self, ids: np.ndarray | pa.Array) -> None:
        """Add a batch: int64 ids (kind "int"), or ids as text (kind "str"; integers become text)."""
        if self.kind == "int":
            block = _Block(_sorted_distinct(np.asarray(ids, np.int64)))
        else:
            text = as_text(ids)
            block = _merge_blocks([_Block(hash_text(text), text)])
        if not len(block):
            return
        self.pending.append(block)
        self.pending_bytes += block.nbytes
        if self.pending_bytes > self.memory_bytes // 8:
            self._merge_pending()

    def _merge_pending(self) -> None:
        parts = self.pending + ([self.merged] if self.merged is not None else [])
        self.pending, self.pending_bytes = [], 0
        if not parts:
            return
        self.merged = _merge_blocks(parts)
        if self.merged.nbytes > self.memory_bytes // 3:
            self.runs.append(self._spill(self.merged))
            self.merged = None

    def to_text(self) -> None:
        """Switch an integer side to text ids (an id that is not a canonical integer turned up):
        each integer becomes its decimal text, which is exactly how it was written."""
        if self.kind == "str":
            return
        self.kind = "str"
        blocks = self.pending + ([self.merged] if self.merged is not None else [])
        self.pending, self.pending_bytes, self.merged = [], 0, None
        runs, self.runs = self.runs, []
        for block in blocks:
            self.add(block.keys)
        for path in runs:
            for block in _read_run(path, "int"):
                self.add(block.keys)
            os.remove(path)

    # -- spilled runs ---------------------------------------------------------------------------
    def _spill(self, block: _Block) -> str:
        self._files += 1
        path = os.path.join(self.workdir, f"{self.name}-run{self._files:05d}.arrow")
        _write_run(path, block)
        return path

    def blocks(self) -> Iterator[_Block]:
        """Every distinct id once, in key order (ties of hash by bytes), in blocks."""
        self._merge_pending()
        if not self.runs:
            if self.merged is not None:
                yield self.merged
            return
        if self.merged is not None:
            self.runs.append(self._spill(self.merged))
            self.merged = None
        runs = self.runs
        # a merge holds one record batch per run: merge in rounds of at most `fan_in` runs
        batch_bytes = max(1, max(os.path.getsize(p) for p in runs) // max(1, _run_batches(runs[0])))
        fan_in = max(2, self.memory_bytes // (4 * batch_bytes))
        level = 0
        while len(runs) > fan_in:
            merged_runs = []
            for k in range(0, len(runs), fan_in):
                group = runs[k : k + fan_in]
                self._files += 1
                path = os.path.join(self.workdir, f"{self.name}-merge{self._files:05d}.arrow")
                _write_run(path, _merge_runs(group, self.kind))
                for old in group:
                    os.remove(old)
                merged_runs.append(path)
            runs, level = merged_runs, level + 1
        self.runs = runs
        yield from _merge_runs(runs, self.kind)


def _run_schema(kind: str) -> pa.Schema:
    if kind == "int":
        return pa.schema([("key", pa.int64())])
    return pa.schema([("key", pa.uint64()), ("text", pa.large_string())])


def _write_run(path: str, blocks: _Block | Iterable[_Block]) -> None:
    """Write sorted distinct blocks as an Arrow IPC file of record batches of about RUN_BATCH
    rows; a batch never ends inside a run of equal keys (so a merge may cut at any key)."""
    if isinstance(blocks, _Block):
        blocks = [blocks]
    writer = None
    carry: _Block | None = None
    for block in blocks:
        if carry is not None and len(carry):
            block = _Block(np.concatenate([carry.keys, block.keys]),
                           pa.concat_arrays([carry.text, block.text]) if block.text is not None else None)
        if writer is None:
            schema = _run_schema("int" if block.text is None else "str")
            writer = pa.ipc.new_file(path, schema)
        start = 0
        n = len(block)
        while n - start > RUN_BATCH:
            cut = start + RUN_BATCH
            while cut < n and block.keys[cut] == block.keys[cut - 1]:
                cut += 1
            if cut >= n:
                break
            _write_batch(writer, schema, block.slice(start, cut))
            start = cut
        carry = block.slice(start, n)
    if writer is None:
        return
    if carry is not None and len(carry):
        _write_batch(writer, schema, carry)
    writer.close()


def _write_batch(writer, schema: pa.Schema, block: _Block) -> None:
    columns = [pa.array(block.keys)] + ([block.text] if block.text is not None else [])
    writer.write_batch(pa.record_batch(columns, schema=schema))


def _run_batches(path: str) -> int:
    with pa.OSFile(path, "rb") as source:
        return pa.ipc.open_file(source).num_record_batches


def _read_run(path: str, kind: str) -> Iterator[_Block]:
    with pa.OSFile(path, "rb") as source:
        reader = pa.ipc.open_file(source)
        for k in range(reader.num_record_batches):
            batch = reader.get_batch(k)
            keys = batch.column(0).to_numpy()
            yield _Block(keys, batch.column(1) if kind == "str" else None)


def _merge_runs(paths: list[str], kind: str) -> Iterator[_Block]:
    """K-way merge of sorted distinct runs into sorted distinct blocks, one batch per run in memory."""
    readers = [_read_run(path, kind) for path in paths]
    current: list[_Block | None] = [next(r, None) for r in readers]
    while True:
        live = [(k, block) for k, block in enumerate(current) if block is not None]
        if not live:
            return
        # everything up to the smallest last key of the live batches can be emitted now: no run
        # holds a smaller key further on (and equal keys never straddle two batches of a run)
        bound = min(block.keys[-1] for _, block in live)
        parts = []
        for k, block in live:
            cut = int(np.searchsorted(block.keys, bound, side="right"))
            if cut:
                parts.append(block.slice(0, cut))
            rest = block.slice(cut, len(block))
            current[k] = rest if len(rest) else next(readers[k], None)
        yield _merge_blocks(parts)


class IdIndexWriter:
    """Writes one side's id map (see the module docstring) from sorted distinct blocks.

    A map of up to ``BUFFER_BYTES`` is held and written in one go at ``close`` (few Zarr
    calls for small stores); a larger one streams through chunk appenders.
    """

    BUFFER_BYTES = 16 << 20

    def __init__(self, group: zarr.Group, name: str, kind: str, id_type: str = "auto"):
        self.parent, self.name = group, name
        self.kind, self.id_type = kind, id_type
        self.key_dtype = np.dtype(np.int64 if kind == "int" else np.uint64)
        self.group: zarr.Group | None = None  # created once the map outgrows the buffer, or at close
        self.appenders: dict[str, ChunkAppender] = {}
        self.buffered: dict[str, list[np.ndarray]] = {"key": [], "offsets": [np.zeros(1, np.int64)], "bytes": []}
        self.buffered_bytes = 0
        self.n = 0
        self.byte_total = 0
        self.fence: list[np.ndarray] = []
        self.repeats: list[int] = []  # rows whose key equals the previous row's (hash collisions)
        self.last_key = None

    def _names(self) -> tuple[str, ...]:
        return ("key", "offsets", "bytes") if self.kind == "str" else ("key",)

    def _spec(self, name: str) -> tuple[np.dtype, int]:
        specs: dict[str, tuple[np.dtype, int]] = {
            "key": (self.key_dtype, KEY_CHUNK), "offsets": (np.dtype(np.int64), KEY_CHUNK),
            "bytes": (np.dtype(np.uint8), BYTES_CHUNK)}
        return specs[name]

    def _array(self, name: str, dtype, chunk: int, data: np.ndarray | None = None) -> zarr.Array:
        """A 1-d array: empty (to append to), or created holding ``data`` (one Zarr call)."""
        compressors = _compressor(np.dtype(dtype).itemsize)
        if data is not None and len(data):
            assert self.group is not None, "the group is created before its arrays"
            return create_array(self.group, name, data=np.asarray(data, dtype), chunks=(chunk,),
                                compressors=compressors, fill_value=0, dense=True)
        assert self.group is not None, "the group is created before its arrays"
        return create_array(self.group, name, shape=(0,), dtype=dtype, chunks=(chunk,), compressors=compressors,
                            fill_value=0, dense=True)

    def _add(self, name: str, values: np.ndarray) -> None:
        if name in self.appenders:
            self.appenders[name].append(values)
        else:
            self.buffered[name].append(values)
            self.buffered_bytes += values.nbytes

    def append(self, block: _Block) -> None:
        keys = block.keys
        m = len(keys)
        if not m:
            return
        first = (-self.n) % KEY_CHUNK
        self.fence.append(keys[first::KEY_CHUNK])
        if self.kind == "str":
            same = np.flatnonzero(keys[1:] == keys[:-1]) + 1
            if self.last_key is not None and keys[0] == self.last_key:
                same = np.concatenate([[0], same])
            self.repeats.extend((self.n + same).tolist())
            offsets, data = text_buffers(block.text)
            self._add("offsets", self.byte_total + (offsets[1:] - offsets[0]))
            self._add("bytes", np.array(data[offsets[0] : offsets[-1]]))
            self.byte_total += int(offsets[-1] - offsets[0])
        self._add("key", np.array(keys))
        self.last_key = keys[-1]
        self.n += m
        if not self.appenders and self.buffered_bytes > self.BUFFER_BYTES:
            self.group = self.parent.create_group(self.name)
            for name in self._names():
                dtype, chunk = self._spec(name)
                self.appenders[name] = ChunkAppender(self._array(name, dtype, chunk))
                for values in self.buffered[name]:
                    self.appenders[name].append(values)
            self.buffered = {}

    def _collisions(self) -> list[list[int]]:
        """[hash, first row, rows] of each run of rows sharing a hash."""
        groups: list[list[int]] = []
        if not self.repeats:
            return groups
        keys = np.concatenate(self.buffered["key"]) if not self.appenders else None
        for row in self.repeats:
            if groups and groups[-1][1] + groups[-1][2] == row:
                groups[-1][2] += 1
            else:
                if keys is not None:
                    key = keys[row]
                else:
                    assert self.group is not None  # appenders exist: the group was created
                    key = read(node_array(self.group, "key"), row)
                groups.append([int(key), row - 1, 2])
        return groups

    def close(self) -> int:
        """Finish the arrays and write the fence and attributes; returns the number of ids."""
        fence = np.concatenate(self.fence) if self.fence else np.zeros(0, self.key_dtype)
        attrs: dict[str, Any] = {"kind": self.kind, "n": int(self.n), "id_type": self.id_type}
        if self.kind == "str":
            attrs["collisions"] = self._collisions()
        if self.appenders:
            for appender in self.appenders.values():
                appender.close()
            assert self.group is not None  # created with the appenders
            self.group.attrs.update(attrs)
        else:  # small: every array created at its final size and written once
            self.group = self.parent.create_group(self.name, attributes=attrs)
            for name in self._names():
                dtype, chunk = self._spec(name)
                values = np.concatenate(self.buffered[name]) if self.buffered[name] else np.zeros(0, dtype)
                self._array(name, dtype, chunk, values)
        self._array("fence", self.key_dtype, max(1, len(fence)), fence)
        return self.n


def write_id_map(group: zarr.Group, name: str, distinct: DistinctIds, id_type: str = "auto") -> int:
    """Write the distinct ids gathered in ``distinct`` as id map ``name`` of ``group``; returns n."""
    writer = IdIndexWriter(group, name, distinct.kind, id_type)
    for block in distinct.blocks():
        for start in range(0, len(block), 1 << 20):
            writer.append(block.slice(start, min(len(block), start + (1 << 20))))
    for path in distinct.runs:
        if os.path.exists(path):
            os.remove(path)
    return writer.close()


# ---------------------------------------------------------------------------------------------
# Reading a map
# ---------------------------------------------------------------------------------------------


def _runs_of_chunks(first: np.ndarray, last: np.ndarray, chunk_bytes: int):
    """Reads of consecutive needed chunks (see ``chunk_runs``), at most READ_BYTES each."""
    return chunk_runs(np.asarray(first, np.int64), np.asarray(last, np.int64), max(1, READ_BYTES // chunk_bytes))


def _fixed_at(array: zarr.Array, positions: np.ndarray) -> np.ndarray:
    """array[positions] for sorted positions of a 1-d array, reading only the chunks they fall in."""
    out = np.empty(len(positions), array.dtype)
    if not len(positions):
        return out
    if len(positions) <= FEW_ROWS:  # a few ids (info, a report's users): no run planning, no numba to load
        return np.asarray(array.get_coordinate_selection(positions), array.dtype)
    chunk = array.chunks[0]
    which = positions // chunk
    run_first, run_last, item_start = _runs_of_chunks(which, which, chunk * array.dtype.itemsize)
    size = array.shape[0]
    for first, last, lo, hi in zip(run_first.tolist(), run_last.tolist(), item_start[:-1].tolist(), item_start[1:].tolist()):
        window = read(array, slice(first * chunk, min(size, (last + 1) * chunk)))
        out[lo:hi] = window[positions[lo:hi] - first * chunk]
    return out


class IdIndex:
    """One side's id map of a store (see the module docstring), opened read-only.

    Opening reads the attributes, the fence and the collision table only.
    """

    def __init__(self, group: zarr.Group, where: str = ""):
        attrs = group.attrs
        self.where = where
        self.kind = str(attrs["kind"])
        self.n = as_int(attrs["n"])
        self.id_type = str(attrs.get("id_type", "auto"))
        self._key = node_array(group, "key")
        self._fence = read(node_array(group, "fence"), ...)
        if self.kind == "str":
            self._offsets = node_array(group, "offsets")
            self._bytes = node_array(group, "bytes")
            self._collisions = np.array(attrs.get("collisions", []), np.uint64).reshape(-1, 3)
        else:
            self._collisions = np.zeros((0, 3), np.uint64)

    # -- keys -----------------------------------------------------------------------------------
    def keys(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The sorted keys of rows [start, stop): int64 ids, or uint64 hashes for string ids."""
        return read(self._key, slice(start, self.n if stop is None else stop))

    def query_keys(self, ids: Any) -> tuple[np.ndarray, np.ndarray, pa.Array | None]:
        """Keys of query ids: (keys, valid mask, text or None). Invalid: cannot be an id here
        (e.g. text that is not an integer, for a map of integer ids)."""
        if self.kind == "str":
            text = as_text(ids)
            return hash_text(text), ~np.asarray(text.is_null().to_numpy(zero_copy_only=False), bool), text
        keys, valid = self._int_queries(ids)
        return keys, valid, None

    def _int_queries(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        canonical = self.id_type != "int"  # only ids converted with id_type="int" merge "007" and "7"
        if isinstance(ids, (pa.Array, pa.ChunkedArray)):
            ids = ids.to_numpy(zero_copy_only=False)
        if isinstance(ids, np.ndarray):
            array = ids.ravel()
        else:  # keep each id's own type: a list of mixed ids must not become strings
            values = _as_list(ids)
            array = np.empty(len(values), dtype=object)
            array[:] = values
        if array.dtype.kind == "i":
            return array.astype(np.int64), np.ones(len(array), bool)
        if array.dtype.kind == "u":
            valid = array <= np.iinfo(np.int64).max
            return np.where(valid, array, 0).astype(np.int64), valid
        if array.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                valid = np.isfinite(array) & (array == np.round(array)) & (np.abs(array) < 2.0**63)
            return np.where(valid, array, 0).astype(np.int64), valid
        keys = np.zeros(len(array), np.int64)
        valid = np.zeros(len(array), bool)
        texts: list[tuple[int, str]] = []
        for k, value in enumerate(array.tolist()):
            if isinstance(value, (bool, np.bool_)):
                continue
            if isinstance(value, (int, np.integer)):
                if -(2**63) <= int(value) < 2**63:
                    keys[k], valid[k] = int(value), True
            elif isinstance(value, float):
                if value == value and value == int(value) and abs(value) < 2.0**63:
                    keys[k], valid[k] = int(value), True
            elif isinstance(value, (str, bytes)):
                texts.append((k, value.decode("utf-8") if isinstance(value, bytes) else value))
        if texts:
            where = np.array([k for k, _ in texts], np.int64)
            offsets, data = text_buffers(pa.array([t for _, t in texts], type=pa.large_string()))
            values, ok = parse_ints_each(offsets, data, canonical)
            keys[where], valid[where] = values, ok
        return keys, valid

    def positions(self, sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, found) of each key of a sorted array: the first row holding that key when found.

        Reads only the chunks of ``key`` the queries fall in, a run of chunks at a time.
        """
        rows = np.full(len(sorted_keys), -1, np.int64)
        found = np.zeros(len(sorted_keys), bool)
        if not self.n or not len(sorted_keys):
            return rows, found
        chunk = self._key.chunks[0]
        which = np.searchsorted(self._fence, sorted_keys, side="right") - 1
        inside = np.flatnonzero(which >= 0)
        which = which[inside]
        run_first, run_last, item_start = _runs_of_chunks(which, which, chunk * self._key.dtype.itemsize)
        for first, last, lo, hi in zip(run_first.tolist(), run_last.tolist(), item_start[:-1].tolist(), item_start[1:].tolist()):
            window = read(self._key, slice(first * chunk, min(self.n, (last + 1) * chunk)))
            items = inside[lo:hi]
            local = np.searchsorted(window, sorted_keys[items], side="left")
            hit = local < len(window)
            hit[hit] = window[local[hit]] == sorted_keys[items][hit]
            rows[items] = np.where(hit, first * chunk + local, -1)
            found[items] = hit
        return rows, found

    # -- id -> row ------------------------------------------------------------------------------
    def index_of(self, ids: Any, missing: str = "raise", side: str = "") -> np.ndarray:
        """Row of each id (int64, flat); an unknown id raises UnknownIdError (missing="raise")
        or gets -1 (missing="mark")."""
        if missing not in ("raise", "mark"):
            raise ValueError(f"missing must be raise or mark, not {missing!r}")
        keys, valid, text = self.query_keys(ids)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        rows_sorted, found = self.positions(sorted_keys)
        found &= valid[order]
        rows_sorted[~found] = -1
        if self.kind == "str":
            rows_sorted = self._verify(text, order, sorted_keys, rows_sorted, found)
        rows = np.empty(len(keys), np.int64)
        rows[order] = rows_sorted
        if missing == "raise" and (rows < 0).any():
            raise self.unknown(ids, rows, side)
        return rows

    def unknown(self, ids: Any, rows: np.ndarray, side: str = "") -> UnknownIdError:
        """The error naming the ids whose row is -1."""
        bad = np.flatnonzero(rows < 0)
        if self.kind == "str":
            shown = as_text(ids).take(pa.array(bad[:5])).to_pylist()
        else:
            values = ids.to_pylist() if isinstance(ids, (pa.Array, pa.ChunkedArray)) else np.asarray(ids, dtype=object).ravel()
            shown = [values[k] for k in bad[:5].tolist()]
        listed = ", ".join(repr(v.item() if isinstance(v, np.generic) else v) for v in shown)
        listed += ", ..." if len(bad) > 5 else ""
        noun = (f"{side} " if side else "") + ("ids" if len(bad) > 1 else "id")
        where = f" in {self.where}" if self.where else ""
        hint = f"; this store's {side + ' ' if side else ''}ids are integers" if self.kind == "int" else ""
        return UnknownIdError(f"unknown {noun}{where}: {listed} ({len(bad)} of {len(rows)} not found{hint})")

    def _verify(self, text: pa.Array, order: np.ndarray, sorted_keys: np.ndarray, rows: np.ndarray,
                found: np.ndarray) -> np.ndarray:
        """Compare the bytes of each query with those of its candidate row(s): exact lookups."""
        query_offsets, query_data = text_buffers(text)
        colliding = np.zeros(len(rows), bool)
        if len(self._collisions):
            colliding = found & np.isin(sorted_keys, self._collisions[:, 0])
        check = np.flatnonzero(found & ~colliding)
        if len(check):
            unique_rows, inverse = _unique_inverse(rows[check])
            row_offsets, row_data = self.text_of_rows(unique_rows)
            same = equal_pairs(query_offsets, query_data, order[check], row_offsets, row_data, inverse)
            rows[check[~same]] = -1
        for k in np.flatnonzero(colliding):  # a hash several ids share: compare with each of them
            entry = self._collisions[np.searchsorted(self._collisions[:, 0], sorted_keys[k])]
            candidates = np.arange(int(entry[1]), int(entry[1]) + int(entry[2]), dtype=np.int64)
            row_offsets, row_data = self.text_of_rows(candidates)
            same = equal_pairs(query_offsets, query_data, np.full(len(candidates), order[k], np.int64),
                               row_offsets, row_data, np.arange(len(candidates), dtype=np.int64))
            rows[k] = candidates[same][0] if same.any() else -1
        return rows

    # -- row -> id ------------------------------------------------------------------------------
    def text_of_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, data) of the ids of sorted unique rows, reading only the chunks they need."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return np.zeros(1, np.int64), _EMPTY_BYTES
        if len(rows) <= FEW_ROWS:
            return self._text_of_few(rows)
        if rows[-1] - rows[0] + 1 == len(rows):  # a contiguous range: two slices
            offsets = read(self._offsets, slice(int(rows[0]), int(rows[-1]) + 2))
            data = read(self._bytes, slice(int(offsets[0]), int(offsets[-1])))
            return offsets - offsets[0], data
        positions = _sorted_distinct(np.concatenate([rows, rows + 1]))
        bounds = _fixed_at(self._offsets, positions)
        starts = bounds[np.searchsorted(positions, rows)]
        stops = bounds[np.searchsorted(positions, rows + 1)]
        chunk = self._bytes.chunks[0]
        first = starts // chunk
        last = np.maximum(stops - 1, starts) // chunk
        run_first, run_last, item_start = _runs_of_chunks(first, last, chunk)
        total = self._bytes.shape[0]
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(stops - starts, out=offsets[1:])
        data = np.empty(int(offsets[-1]), np.uint8)
        for a, b, lo, hi in zip(run_first.tolist(), run_last.tolist(), item_start[:-1].tolist(), item_start[1:].tolist()):
            window = read(self._bytes, slice(a * chunk, min(total, (b + 1) * chunk)))
            gather_ranges(window, a * chunk, starts[lo:hi], stops[lo:hi], data, offsets[lo:hi])
        return offsets, data

    def _text_of_few(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``text_of_rows`` of a few rows (``info``, one query's results), read chunk by chunk in
        Python, so showing them loads no numba."""
        positions = _sorted_distinct(np.concatenate([rows, rows + 1]))  # np.unique would import numpy.ma
        bounds = np.asarray(self._offsets.get_coordinate_selection(positions), np.int64)
        starts = bounds[np.searchsorted(positions, rows)]
        stops = bounds[np.searchsorted(positions, rows + 1)]
        chunk = self._bytes.chunks[0]
        windows: dict[int, np.ndarray] = {}
        pieces = []
        for start, stop in zip(starts.tolist(), stops.tolist()):
            piece = []
            for k in range(start // chunk, (max(stop, start + 1) - 1) // chunk + 1):
                if k not in windows:
                    windows[k] = read(self._bytes, slice(k * chunk, (k + 1) * chunk))
                lo, hi = max(start, k * chunk) - k * chunk, min(stop, (k + 1) * chunk) - k * chunk
                piece.append(windows[k][lo:max(lo, hi)])
            pieces.append(np.concatenate(piece) if piece else np.zeros(0, np.uint8))
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum([len(p) for p in pieces], out=offsets[1:])
        return offsets, (np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)).astype(np.uint8)

    def decoded(self, rows: np.ndarray) -> np.ndarray:
        """The text of a few rows >= 0 (any order) as str objects, decoded in Python: Arrow's
        conversions would load pandas, and a few rows need no numba."""
        unique, inverse = _unique_inverse(np.asarray(rows, np.int64).ravel())
        offsets, data = self.text_of_rows(unique)
        raw = data.tobytes()
        decoded = np.empty(len(unique), dtype=object)
        decoded[:] = [raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        return decoded[inverse]

    def text_of(self, rows: np.ndarray) -> pa.Array:
        """Ids of any rows (any order, repeats allowed) as Arrow large_string (string ids)."""
        rows = np.asarray(rows, np.int64).ravel()
        if len(rows) and rows[0] >= 0 and np.all(np.diff(rows) == 1):
            return text_from_buffers(*self.text_of_rows(rows))
        unique, inverse = _unique_inverse(rows)
        offsets, data = self.text_of_rows(unique)
        return text_from_buffers(offsets, data).take(pa.array(inverse))

    def ids_of(self, rows: Any, missing: Any = None, as_arrow: bool = False) -> np.ndarray | pa.Array:
        """Original ids of rows (any shape and order): int64, or str objects for string ids.

        Rows < 0 get ``missing`` (default -1 for integer ids, "" for string ids). as_arrow: a
        flat Arrow array (int64 or large_string; no Python objects), all rows >= 0."""
        rows = np.asarray(rows, np.int64)
        shape = rows.shape
        flat = rows.ravel()
        if len(flat) and (flat.max() >= self.n):
            raise IndexError(f"row {int(flat.max())} out of range: the map{' of ' + self.where if self.where else ''} has {self.n} ids")
        if as_arrow:
            if len(flat) and flat.min() < 0:
                raise IndexError("as_arrow takes rows >= 0 only")
            return pa.array(self._int_ids(flat)) if self.kind == "int" else self.text_of(flat)
        negative = flat < 0
        safe = np.where(negative, 0, flat) if negative.any() else flat
        if self.kind == "int":
            out = self._int_ids(safe)
            if negative.any():
                out = np.where(negative, -1 if missing is None else missing, out)
            return out.reshape(shape)
        out = np.empty(len(flat), dtype=object)
        if len(flat) and self.n:
            out[:] = self.decoded(safe) if len(flat) <= FEW_ROWS else self.text_of(safe).to_numpy(zero_copy_only=False)
        if negative.any():
            out[negative] = "" if missing is None else missing
        return out.reshape(shape)

    def _int_ids(self, rows: np.ndarray) -> np.ndarray:
        if not len(rows):
            return np.zeros(0, np.int64)
        if rows[0] >= 0 and np.all(np.diff(rows) == 1):
            return read(self._key, slice(int(rows[0]), int(rows[-1]) + 1))
        unique, inverse = _unique_inverse(rows)
        return _fixed_at(self._key, unique)[inverse]

    def arrow_ids(self, start: int, stop: int) -> pa.Array:
        """Ids of rows [start, stop) as an Arrow array (int64 or large_string), for writers."""
        if self.kind == "int":
            return pa.array(read(self._key, slice(start, stop)))
        return text_from_buffers(*self.text_of_rows(np.arange(start, stop, dtype=np.int64)))

    def iter_ids(self, start: int = 0, stop: int | None = None, rows: int = KEY_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, ids) of consecutive blocks of ``rows`` rows, in row order."""
        stop = self.n if stop is None else min(stop, self.n)
        for lo in range(start, stop, rows):
            hi = min(stop, lo + rows)
            yield lo, self.ids_of(np.arange(lo, hi, dtype=np.int64))
