"""Display names of users and items: read from a names file, kept beside the id maps, out of core.

A side's names live in a child group of its id map (``item_ids/names-TOKEN/``, named by the id
map's ``names`` attribute, so replacing them is one atomic attribute write: see
``lifecycle.replace_node``); a model's copy of the id maps carries them along::

    offsets     (n + 1,) int64   row r's name is bytes[offsets[r]:offsets[r + 1]] ("" = no name)
    bytes       (total,) uint8   the UTF-8 bytes of every name, in row order
    exact_key   (m,) uint64      XXH64 of each of the m names, sorted; exact_row: its row
    fold_key    (m,) uint64      XXH64 of each name lower-cased, sorted; fold_row: its row
    exact_fence, fold_fence      the first key of each chunk (small: read whole on open)
    attrs: n, named (m), unknown (names for ids not in the store), source, encoding

Reading names of rows reads only the chunks those rows fall in (as the id lookup does); looking
a name up reads the key chunk(s) holding its hash and then the candidate rows' names, so neither
loads all names. Writing streams the names file once, spilling (row, line, name) records into
buckets of row ranges (and the names' hashes into buckets of hash ranges), each bucket sorted in
memory on its own: memory is one bucket, whatever the size of the file.
"""

from __future__ import annotations

import codecs
import csv
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .._lazy import LazyModule, lazy_function
from ..errors import InputError, SettingError, UnknownIdError
from .appender import ChunkAppender
from .format import array, as_int, create_array, read, subgroup
from .ids import BYTES_CHUNK, KEY_CHUNK, IdIndex, _compressor, as_text, hash_text, text_buffers

if TYPE_CHECKING:
    import zarr

# pyarrow loads on first use: `wals-ooc info` of a named store reads a few names without it
if TYPE_CHECKING:  # annotations only: pyarrow itself loads on first use
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
else:
    pa = LazyModule("pyarrow")
    pc = LazyModule("pyarrow.compute")
    pacsv = LazyModule("pyarrow.csv")
csv_record_lines = lazy_function("wals_ooc.kernels.text", "csv_record_lines")

NAMES_ATTR = "names"
_DELIMITERS = ("\t", ",", ";", "|")


def _spill_schema():
    return pa.schema([("row", pa.int64()), ("line", pa.int64()), ("text", pa.large_string())])


class AmbiguousNameError(UnknownIdError):
    """A name that several users or items have: the error lists them (give an id instead)."""


@dataclass
class NamesSpec:
    """How to read a names file: one row per id, with an id column and a name column.

    id_col, name_col: column names (with a header) or 0-based positions. delimiter: one
    character, or "auto" (sniffed from the first line: tab, comma, semicolon or pipe).
    encoding: the file's text encoding (any Python codec; default utf-8). quote: the quote
    character, or "none" to read quotes as text; "auto": none for tab-separated files (Last.fm's
    artists.dat has names such as ``"Weird Al" Yankovic``), '"' otherwise.
    """

    id_col: str | int = 0
    name_col: str | int = 1
    delimiter: str = "auto"
    encoding: str = "utf-8"
    quote: str = "auto"
    header: bool = True

    def __post_init__(self) -> None:
        if self.delimiter != "auto" and (len(self.delimiter) != 1 or self.delimiter in ('"', "\n", "\r")):
            raise SettingError(f"names delimiter must be auto or one character, not {self.delimiter!r}",
                               flags={"names delimiter": "--names-delimiter"})
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise SettingError(f"unknown names encoding {self.encoding!r} (e.g. utf-8, latin-1, cp1252)",
                               flags={"names encoding": "--names-encoding"}) from None
        if self.quote not in ("auto", "none") and len(self.quote) != 1:
            raise SettingError(f"names quote must be auto, none or one character, not {self.quote!r}",
                               flags={"names quote": "--names-quote"})


@dataclass
class NamesSummary:
    """What writing one side's names did."""

    side: str
    path: str
    named: int = 0
    rows: int = 0
    unknown: int = 0
    unknown_examples: list = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.side} names: {self.named} of {self.rows} {self.side}s named from {self.path}"
        if self.unknown:
            shown = ", ".join(repr(v) for v in self.unknown_examples)
            text += f"; {self.unknown} names for ids not in the store ignored (e.g. {shown})"
        return text


# ---------------------------------------------------------------------------------------------
# Reading a names file
# ---------------------------------------------------------------------------------------------


def _decoded_blocks(path: str, encoding: str, block_bytes: int) -> Iterator[tuple[str, int]]:
    """(text of whole lines, 1-based line it starts at), decoded from ``encoding``."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    line, leftover, first = 1, "", True
    with pa.input_stream(path, compression="detect") as stream:
        while True:
            raw = stream.read(block_bytes)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                at = line + leftover.count("\n") + raw[: exc.start].count(b"\n")
                raise InputError(path, at, None, f"not {encoding} text ({exc.reason} at byte "
                                 f"{raw[exc.start:exc.start + 1]!r}): give the file's encoding "
                                 "(encoding='latin-1', --names-encoding latin-1)") from None
            if first:
                text, first = text.removeprefix("\ufeff"), False
            text = leftover + text
            if not raw:
                if text:
                    yield (text if text.endswith("\n") else text + "\n"), line
                return
            cut = text.rfind("\n") + 1
            if cut:
                yield text[:cut], line
                line += text.count("\n", 0, cut)
            leftover = text[cut:]


def _sniff(path: str, first_line: str) -> str:
    counts = {d: first_line.count(d) for d in _DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    if counts[best] == 0:
        raise InputError(path, 1, None, "cannot tell the delimiter (no tab, comma, semicolon or pipe in the first "
                         "line): give it (delimiter=..., --names-delimiter)")
    return best


def _column(path: str, spec_col, names: list[str], role: str) -> int:
    if isinstance(spec_col, int) or (isinstance(spec_col, str) and spec_col.isdigit() and spec_col not in names):
        position = int(spec_col)
        if position >= len(names):
            raise InputError(path, 1, str(spec_col), f"{role} column {position} does not exist: the file has "
                             f"{len(names)} columns")
        return position
    if spec_col not in names:
        raise InputError(path, 1, str(spec_col), f"unknown {role} column; the header has {names}")
    return names.index(spec_col)


def read_names(path: str, spec: NamesSpec, block_bytes: int = 8 << 20
               ) -> Iterator[tuple[pa.Array, pa.Array, np.ndarray, str]]:
    """(ids as text, names, line of each, the id column's label) of a names file, a block at a time; a malformed row,
    an empty id or an empty name raises ``InputError`` naming file:line:field."""
    if not os.path.isfile(path):
        raise InputError(path, None, None, "no such file" if not os.path.exists(path) else "not a file")
    blocks = _decoded_blocks(path, spec.encoding, block_bytes)
    try:
        text, line = next(blocks)
    except StopIteration:
        raise InputError(path, None, None, "empty names file") from None
    first_line = text.split("\n", 1)[0].rstrip("\r")
    delimiter = _sniff(path, first_line) if spec.delimiter == "auto" else spec.delimiter
    quote = spec.quote if spec.quote not in ("auto", "none") else ('"' if spec.quote == "auto" and delimiter != "\t" else None)
    header = next(csv.reader([first_line], delimiter=delimiter, quotechar=quote or '"',
                             quoting=csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE))
    columns = header if spec.header else [str(k) for k in range(len(header))]
    if spec.header and len(set(columns)) != len(columns):
        raise InputError(path, 1, None, f"duplicate column names in header {columns}")
    id_at = _column(path, spec.id_col, columns, "id")
    name_at = _column(path, spec.name_col, columns, "name")
    if id_at == name_at:
        raise InputError(path, 1, None, "the id and name columns must differ")
    id_field, name_field = (columns[id_at], columns[name_at]) if spec.header else (str(id_at), str(name_at))
    labels = [f"c{k}" for k in range(len(columns))]
    skip_header = spec.header

    def chunks():
        yield text, line
        yield from blocks

    for chunk, first in chunks():
        if skip_header:
            cut = chunk.index("\n") + 1
            chunk, first, skip_header = chunk[cut:], first + 1, False
        if not chunk:
            continue
        data = chunk.encode("utf-8")
        blank: list[int] = []
        problem: list[InputError] = []

        def on_invalid(row, first=first, blank=blank, problem=problem) -> str:
            if not row.text.strip():
                blank.append(row.number)
                return "skip"
            problem.append(InputError(path, first + (row.number or 1) - 1, None,
                                      f"malformed row: expected {row.expected_columns} fields, got "
                                      f"{row.actual_columns}: {row.text[:80]!r}"))
            return "error"

        try:
            table = pacsv.read_csv(
                pa.BufferReader(data),
                read_options=pacsv.ReadOptions(column_names=labels, use_threads=False, block_size=len(data) + 1),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=quote or False,
                                                 newlines_in_values=quote is not None, ignore_empty_lines=False,
                                                 invalid_row_handler=on_invalid),
                convert_options=pacsv.ConvertOptions(include_columns=[labels[id_at], labels[name_at]],
                                                     column_types={labels[id_at]: pa.large_string(),
                                                                   labels[name_at]: pa.large_string()},
                                                     strings_can_be_null=False, quoted_strings_can_be_null=False),
            )
        except pa.ArrowInvalid as exc:
            if problem:
                raise problem[0] from None
            raise InputError(path, first, None, f"unreadable names file: {exc}") from None
        n = table.num_rows
        records = np.arange(1, n + 1, dtype=np.int64)  # record number within the chunk (1-based)
        for skipped in sorted(blank):
            records[records >= skipped] += 1
        if quote is None:
            lines = first + records - 1
        else:  # a quoted name may span lines: count the newlines before each record
            lines = first + csv_record_lines(np.frombuffer(data, np.uint8), ord(delimiter), ord(quote))[records - 1]
        ids = table.column(labels[id_at]).combine_chunks()
        names = table.column(labels[name_at]).combine_chunks()
        for values, label, what in ((ids, id_field, "id"), (names, name_field, "name")):
            empty = np.diff(text_buffers(values)[0]) == 0 if len(values) else np.zeros(0, bool)
            if empty.any():
                raise InputError(path, int(lines[np.flatnonzero(empty)[0]]), label, f"empty {what}")
        yield ids, names, lines, id_field


# ---------------------------------------------------------------------------------------------
# Writing a side's names
# ---------------------------------------------------------------------------------------------


class _Buckets:
    """Record batches spilled into ``count`` Arrow files by bucket number."""

    def __init__(self, workspace: str, name: str, count: int):
        self.paths = [os.path.join(workspace, f"{name}-{k:05d}.arrow") for k in range(count)]
        self.writers: dict = {}  # bucket -> Arrow IPC file writer

    def add(self, bucket: np.ndarray, rows: np.ndarray, lines: np.ndarray, text: pa.Array) -> None:
        order = np.argsort(bucket, kind="stable")
        bucket = bucket[order]
        bounds = np.flatnonzero(np.diff(bucket)) + 1
        for lo, hi in zip(np.concatenate([[0], bounds]).tolist(), np.concatenate([bounds, [len(bucket)]]).tolist()):
            if hi <= lo:
                continue
            k = int(bucket[lo])
            take = order[lo:hi]
            batch = pa.record_batch([pa.array(rows[take]), pa.array(lines[take]), text.take(pa.array(take))],
                                    schema=_spill_schema())
            if k not in self.writers:
                self.writers[k] = pa.ipc.new_file(self.paths[k], _spill_schema())
            self.writers[k].write_batch(batch)

    def read(self, k: int) -> dict[str, pa.Array] | None:
        """Bucket k's records (its file is removed once read), or None when it is empty."""
        writer = self.writers.pop(k, None)
        if writer is None:
            return None
        writer.close()
        with pa.OSFile(self.paths[k], "rb") as source:
            table = pa.ipc.open_file(source).read_all()
        columns = {name: table.column(name).combine_chunks() for name in table.column_names}
        del table
        os.remove(self.paths[k])
        return columns

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def _duplicate(path: str, field_name: str, lines: np.ndarray, a: int, b: int, value) -> InputError:
    first, second = sorted((int(lines[a]), int(lines[b])))
    value = value.item() if isinstance(value, np.generic) else value
    return InputError(path, second, field_name, f"duplicate id {value!r} (also on line {first}): give each id one name")


def write_names(group: zarr.Group, index: IdIndex, path: str, spec: NamesSpec, workspace: str, memory_bytes: int,
                side: str = "item") -> NamesSummary:
    """Write the names of ``path`` for the ids of ``index`` into the empty group ``group``."""
    summary = NamesSummary(side=side, path=path, rows=index.n)
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    # a bucket's records, sorted and copied a few times (names, lower-cased names, hashes), stay
    # within about a quarter of the allowance; the text read at once (decoded, re-encoded and
    # parsed: several copies) within a sixteenth
    count = int(max(1, min(4096, -(-16 * size // max(1, memory_bytes)))))
    n = index.n
    row_buckets = _Buckets(workspace, f"{side}-names-rows", count)
    unknown_buckets = _Buckets(workspace, f"{side}-names-unknown", count)
    id_field = str(spec.id_col)
    block = int(max(1 << 16, min(16 << 20, memory_bytes // 64)))
    try:
        for ids, names, lines, id_field in read_names(path, spec, block):
            rows = index.index_of(ids, missing="mark")
            known = rows >= 0
            if known.any():
                at = np.flatnonzero(known)
                row_buckets.add(rows[at] * count // max(1, n), rows[at], lines[at], names.take(pa.array(at)))
            if not known.all():
                at = np.flatnonzero(~known)
                text = as_text(ids).take(pa.array(at))
                keys = hash_text(text)
                summary.unknown += len(at)
                if len(summary.unknown_examples) < 3:
                    summary.unknown_examples += text.slice(0, 3 - len(summary.unknown_examples)).to_pylist()
                unknown_buckets.add((keys >> np.uint64(52)).astype(np.int64) * count >> 12,
                                    keys.view(np.int64), lines[at], text)
        for k in range(count):  # an id not in the store given twice is a duplicate too
            table = unknown_buckets.read(k)
            if table is None:
                continue
            keys = table["row"].to_numpy()
            order = np.lexsort((table["line"].to_numpy(), keys))
            same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
            text = table["text"]
            for j in same.tolist():
                a, b = int(order[j]), int(order[j + 1])
                if text[a].as_py() == text[b].as_py():
                    raise _duplicate(path, id_field, table["line"].to_numpy(), a, b, text[a].as_py())
        summary.named = _write_rows(group, index, row_buckets, count, workspace, path, id_field)
    finally:
        row_buckets.close()
        unknown_buckets.close()
    group.attrs.update({"n": int(n), "named": int(summary.named), "unknown": int(summary.unknown),
                        "source": os.path.abspath(path), "encoding": spec.encoding})
    return summary


def _write_rows(group: zarr.Group, index: IdIndex, buckets: _Buckets, count: int, workspace: str, path: str,
                id_field: str) -> int:
    """offsets/bytes in row order, bucket by bucket; the names' hashes go to hash buckets."""
    n = index.n
    offsets = ChunkAppender(create_array(group, "offsets", shape=(0,), dtype=np.int64, chunks=(KEY_CHUNK,),
                                         compressors=_compressor(8), fill_value=0, dense=True))
    data = ChunkAppender(create_array(group, "bytes", shape=(0,), dtype=np.uint8, chunks=(BYTES_CHUNK,),
                                      compressors=_compressor(1), fill_value=0, dense=True))
    offsets.append(np.zeros(1, np.int64))
    key_buckets = {kind: _Buckets(workspace, f"names-{kind}", count) for kind in ("exact", "fold")}
    total, named = 0, 0
    try:
        for k in range(count):
            lo, hi = -(-k * n // count), -(-(k + 1) * n // count)
            table = buckets.read(k)
            lengths = np.zeros(hi - lo, np.int64)
            if table is not None:
                rows = table["row"].to_numpy()
                order = np.argsort(rows, kind="stable")
                rows = rows[order]
                same = np.flatnonzero(rows[1:] == rows[:-1])
                if len(same):
                    lines = table["line"].to_numpy()[order]
                    j = int(same[0])
                    raise _duplicate(path, id_field, lines, j, j + 1, index.ids_of(rows[j : j + 1])[0])
                names = table["text"].take(pa.array(order))
                name_offsets, name_data = text_buffers(names)
                lengths[rows - lo] = np.diff(name_offsets)
                data.append(np.array(name_data[name_offsets[0] : name_offsets[-1]]))
                for kind, text in (("exact", names), ("fold", pc.utf8_lower(names))):
                    keys = hash_text(text)
                    key_buckets[kind].add((keys >> np.uint64(52)).astype(np.int64) * count >> 12, rows,
                                          keys.view(np.int64), pa.nulls(len(rows), pa.large_string()))
                named += len(rows)
            offsets.append(total + np.cumsum(lengths))
            total += int(lengths.sum())
        offsets.close()
        data.close()
        for kind, spilled in key_buckets.items():
            _write_keys(group, kind, spilled, count)
    finally:
        for spilled in key_buckets.values():
            spilled.close()
    return named


def _write_keys(group: zarr.Group, kind: str, buckets: _Buckets, count: int) -> None:
    """``KIND_key`` (sorted hashes), ``KIND_row`` and ``KIND_fence``, bucket by bucket."""
    keys_out = ChunkAppender(create_array(group, f"{kind}_key", shape=(0,), dtype=np.uint64, chunks=(KEY_CHUNK,),
                                          compressors=_compressor(8), fill_value=0, dense=True))
    rows_out = ChunkAppender(create_array(group, f"{kind}_row", shape=(0,), dtype=np.int64, chunks=(KEY_CHUNK,),
                                          compressors=_compressor(8), fill_value=0, dense=True))
    fence, written = [], 0
    for k in range(count):
        table = buckets.read(k)
        if table is None:
            continue
        keys = table["line"].to_numpy().view(np.uint64)  # the hash rode in the line column
        rows = table["row"].to_numpy()
        order = np.lexsort((rows, keys))
        keys, rows = keys[order], rows[order]
        fence.append(keys[(-written) % KEY_CHUNK :: KEY_CHUNK])
        keys_out.append(keys)
        rows_out.append(rows)
        written += len(keys)
    keys_out.close()
    rows_out.close()
    fence_keys = np.concatenate(fence) if fence else np.zeros(0, np.uint64)
    create_array(group, f"{kind}_fence", data=fence_keys, chunks=(max(1, len(fence_keys)),), fill_value=0, dense=True)


# ---------------------------------------------------------------------------------------------
# Reading names
# ---------------------------------------------------------------------------------------------


class _NameText(IdIndex):
    """Row -> name reads of a names group: the id map's chunked text reads (``text_of``) over
    the names' offsets and bytes."""

    def __init__(self, group: zarr.Group):  # only what text_of_rows / text_of use
        self.where = ""
        self.n = as_int(group.attrs["n"])
        self.kind = "str"
        self._offsets = array(group, "offsets")
        self._bytes = array(group, "bytes")


class NameIndex:
    """One side's display names (see the module docstring), opened read-only."""

    def __init__(self, group: zarr.Group, where: str, side: str):
        self.group, self.where, self.side = group, where, side
        self.n = as_int(group.attrs["n"])
        self.named = as_int(group.attrs.get("named", 0))
        self._text = _NameText(group)
        self._fences: dict[str, np.ndarray] = {}  # read on the first lookup by name (showing needs none)

    @classmethod
    def of(cls, id_group: zarr.Group, where: str, side: str) -> NameIndex | None:
        """The names of an id map group, or None when it has none."""
        name = id_group.attrs.get(NAMES_ATTR)
        if not name:
            return None
        return cls(subgroup(id_group, str(name)), where, side)

    def names_of(self, rows) -> np.ndarray:
        """Name of each row (any shape; str objects), None for rows without a name or < 0."""
        rows = np.asarray(rows, np.int64)
        flat = rows.ravel()
        out = np.empty(len(flat), dtype=object)
        valid = flat >= 0
        if valid.any():
            values = self._text.decoded(flat[valid])  # in Python: Arrow's conversions would load pandas
            values[values == ""] = None
            out[valid] = values
        out[~valid] = None
        return out.reshape(rows.shape)

    def names_arrow(self, rows: np.ndarray) -> pa.Array:
        """Names of rows (>= 0) as Arrow large_string, null where there is none (for Parquet)."""
        text = self._text.text_of(np.asarray(rows, np.int64).ravel())
        empty = pc.equal(pc.binary_length(text), 0)
        return pc.if_else(empty, pa.scalar(None, pa.large_string()), text)

    def _candidates(self, kind: str, key: np.uint64) -> np.ndarray:
        if kind not in self._fences:
            self._fences[kind] = read(array(self.group, f"{kind}_fence"), ...)
        fence = self._fences[kind]
        if not len(fence):
            return np.zeros(0, np.int64)
        first = max(0, int(np.searchsorted(fence, key, side="left")) - 1)
        last = int(np.searchsorted(fence, key, side="right")) - 1
        if last < 0:
            return np.zeros(0, np.int64)
        keys = array(self.group, f"{kind}_key")
        start, stop = first * KEY_CHUNK, min(keys.shape[0], (last + 1) * KEY_CHUNK)
        window = read(keys, slice(start, stop))
        a, b = int(np.searchsorted(window, key, side="left")), int(np.searchsorted(window, key, side="right"))
        return np.sort(read(array(self.group, f"{kind}_row"), slice(start + a, start + b))) if b > a else np.zeros(0, np.int64)

    def rows_named(self, name: str) -> tuple[np.ndarray, str]:
        """(rows whose name is ``name``, "exact") or, when none is, (rows whose name equals it
        ignoring case, "case-insensitive"); empty rows when no name matches."""
        query = pa.array([name], pa.large_string())
        rows = self._candidates("exact", hash_text(query)[0])
        if len(rows):
            rows = rows[np.asarray(self.names_of(rows) == name, bool)]
            if len(rows):
                return rows, "exact"
        lowered = pc.utf8_lower(query)
        rows = self._candidates("fold", hash_text(lowered)[0])
        if len(rows):
            names = pc.utf8_lower(self._text.text_of(rows)).to_pylist()
            rows = rows[np.array([n == lowered[0].as_py() for n in names], bool)]
        return rows, "case-insensitive"


def row_of_name(names: NameIndex | None, ids: IdIndex, name: str, side: str = "item") -> int:
    """The one row named ``name`` (exact match first, then ignoring case); an unknown name raises
    ``UnknownIdError``, one several rows share ``AmbiguousNameError`` listing them."""
    if names is None:
        raise UnknownIdError(f"{ids.where or 'the store'} has no {side} names: add them with "
                             f"`wals-ooc names STORE --{side}s FILE` (or convert with --{side}-names FILE)")
    rows, how = names.rows_named(name)
    if len(rows) == 1:
        return int(rows[0])
    if not len(rows):
        raise UnknownIdError(f"unknown {side} name {name!r} in {ids.where or 'the store'} (no {side} has it, "
                             "not even ignoring case)")
    shown = ", ".join(f"{ident!r} ({label!r})" for ident, label in
                      zip(ids.ids_of(rows[:8]).tolist(), names.names_of(rows[:8]).tolist()))
    more = f", and {len(rows) - 8} more" if len(rows) > 8 else ""
    raise AmbiguousNameError(f"{side} name {name!r} matches {len(rows)} {side}s ({how}): {shown}{more}; "
                             f"give the {side} id instead")


# ---------------------------------------------------------------------------------------------
# Adding names to a store
# ---------------------------------------------------------------------------------------------

#: where each kind of store keeps its id maps (a model keeps a copy of its data's, under ids/)
_ID_PARENTS = {"wals-ooc/interactions": "", "wals-ooc/model": "ids/"}


def write_side_names(holder: zarr.Group, index: IdIndex, side: str, path: str, spec: NamesSpec, workspace: str,
                     memory_bytes: int, child: str) -> NamesSummary:
    """Names of one side into a new child ``child`` of its id map group ``holder``, switched to
    by the id map's ``names`` attribute (for a store being built, inside its door)."""
    summary = write_names(holder.create_group(child), index, path, spec, workspace, memory_bytes, side)
    holder.attrs[NAMES_ATTR] = child
    return summary


def add_names(store: str | os.PathLike, items: str | os.PathLike | None = None,
              users: str | os.PathLike | None = None, *, id_col: str | int = 0, name_col: str | int = 1,
              delimiter: str = "auto", encoding: str = "utf-8", quote: str = "auto", header: bool = True,
              memory_budget: int | str | None = None, storage_options: dict | None = None) -> list[NamesSummary]:
    """Store a display name per id in an interaction store (or a model) already written.

    items, users: names files, one row per id (see ``NamesSpec`` for the column, delimiter,
    encoding and quote options). Names replace the side's earlier names in one atomic step
    (``lifecycle.replace_node``); a bad file leaves the store as it was. The data and the
    store's identity do not change: models trained on it stay bound to it, and serve its names
    when they carry none of their own. Names for ids not in the store are counted and reported;
    an id named twice is an ``InputError`` naming file:line.
    """
    import shutil
    import tempfile

    from ..memory import MemoryBudget
    from .format import ID_ARRAYS, is_local, local_path, open_group
    from .lifecycle import TMP_PREFIX, inspect_target, owner_token, replace_node, sweep_workspaces

    if items is None and users is None:
        raise SettingError("give a names file: items=FILE or users=FILE", flags={"items=FILE": "--items FILE",
                                                                                   "users=FILE": "--users FILE"})
    spec = NamesSpec(id_col=id_col, name_col=name_col, delimiter=delimiter, encoding=encoding, quote=quote,
                     header=header)
    location = os.fspath(store)
    allowance = MemoryBudget.start(memory_budget).allowance
    files = [(side, os.fspath(path)) for side, path in (("item", items), ("user", users)) if path is not None]
    for _, path in files:
        if not os.path.isfile(path):
            raise InputError(path, None, None, "no such file" if not os.path.exists(path) else "not a file")
    kind = inspect_target(location, storage_options).kind
    parent = _ID_PARENTS.get(kind or "", "")
    summaries = []
    base = os.path.dirname(local_path(location)) if is_local(location) else tempfile.gettempdir()
    parents = [f"{parent}{ID_ARRAYS[side]}" for side, _ in files]
    with replace_node(location, tuple(_ID_PARENTS), parents, NAMES_ATTR, storage_options=storage_options,
                      inputs=[path for _, path in files]) as groups:
        sweep_workspaces(base)
        workspace = os.path.join(base, f"{TMP_PREFIX}{owner_token()}")
        os.mkdir(workspace)
        try:
            opened = open_group(location, "r", storage_options)
            for (side, path), group, holder in zip(files, groups, parents):
                index = IdIndex(subgroup(opened, holder), location)
                summaries.append(write_names(group, index, path, spec, workspace, allowance, side))
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
    return summaries
