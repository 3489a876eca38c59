"""Input readers: CSV (plain or gzip) and Parquet files, streamed in batches and validated.

Each reader yields ``RowBatch`` objects of bounded size. Validation follows one rule: a row is
either turned into (user, item, value) or reported with its file, line and field; with
``on_bad_lines="skip"`` reported rows are counted and dropped instead of raising.
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
import os
import re
from bisect import bisect_right
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import InputError, SettingError
from ..kernels.text import csv_record_end, csv_record_lines, parse_ints_each, parse_plain_csv, scan_chunk
from .ids import as_text, text_buffers

log = logging.getLogger("wals_ooc")


@dataclass
class InputSpec:
    """How to read the input files.

    user_col, item_col, value_col: column names (with a header) or 0-based positions.
    value_col None means every row counts 1.
    order_col: optional numeric column giving each row's place in time (a timestamp, a sequence
    number); kept per entry (the latest of summed duplicates) for splits by order.
    id_kind: "auto" (ids stay text here; the writer makes a side integer when every id of the
    whole input is a canonical integer), "int" (parse as integers, so "007" and "7" are one
    id) or "str" (text, always); or a dict of them for "user" and "item".
    on_bad_lines: "error" raises InputError at the first bad row; "skip" counts and drops it.
    """

    user_col: str | int = 0
    item_col: str | int = 1
    value_col: str | int | None = 2
    order_col: str | int | None = None
    delimiter: str = ","
    header: bool = True
    id_kind: str | dict = "auto"
    on_bad_lines: str = "error"

    def __post_init__(self) -> None:
        kinds = self.id_kind.values() if isinstance(self.id_kind, dict) else [self.id_kind]
        if isinstance(self.id_kind, dict) and set(self.id_kind) != {"user", "item"} or any(
                k not in ("auto", "int", "str") for k in kinds):
            raise SettingError(f"id_type must be auto, int or str (or a dict of them for user and item), "
                               f"not {self.id_kind!r}", flags={"id_type": "--id-type"})
        if self.on_bad_lines not in ("error", "skip"):
            raise SettingError(f"on_bad_lines must be error or skip, not {self.on_bad_lines!r}",
                               flags={"on_bad_lines": "--on-bad-lines"})
        if len(self.delimiter) != 1 or self.delimiter in ('"', "\n", "\r"):
            raise SettingError(f"delimiter must be one character other than a quote or a newline, not {self.delimiter!r}",
                               flags={"delimiter": "--delimiter"})


def _kind_of(spec: InputSpec, side: str) -> str:
    return spec.id_kind[side] if isinstance(spec.id_kind, dict) else spec.id_kind


@dataclass
class BadRowReport:
    """What was skipped, by reason, with the first few locations for the user to look at."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    zeros_dropped: int = 0
    blank_lines: int = 0
    max_examples: int = 10

    def add(self, error: InputError) -> None:
        self.counts[error.reason.split(":")[0]] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.skipped:
            return "no bad rows"
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        return f"skipped {self.skipped} bad rows ({reasons}); first: " + "; ".join(self.examples[:3])


@dataclass
class RowBatch:
    """Validated rows: ids as int64 NumPy arrays (integer ids: their text is ``str(value)``) or
    Arrow string arrays (text ids; the writer decides the side's kind), values float32 (finite,
    >= 0), order float64 (None without an order column)."""

    users: np.ndarray | pa.Array
    items: np.ndarray | pa.Array
    values: np.ndarray
    order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.values)


# ---------------------------------------------------------------------------------------------
# Conversions of one column, fast path in Arrow, careful path in Python on failure only.
# ---------------------------------------------------------------------------------------------


def _python_number(text: str | None, kind: str) -> float | int | None:
    """Parse one field; None if it is not a number of that kind."""
    if text is None:
        return None
    try:
        return int(text) if kind == "int" else float(text)
    except ValueError:
        return None


def _value_problem(value: float) -> str | None:
    if math.isnan(value):
        return "value is NaN"
    if math.isinf(value):
        return "value is infinite"
    if value < 0:
        return "value is negative"
    if value > FLOAT32_MAX:
        return f"value is beyond float32's range ({FLOAT32_MAX:.4g})"
    return None


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _convert_numbers(column: pa.Array, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Column of strings -> (numbers, ok mask). Arrow cast when clean; Python per field otherwise."""
    target = pa.int64() if kind == "int" else pa.float64()
    try:
        numbers = pc.cast(column, target).to_numpy(zero_copy_only=False)
        ok = np.ones(len(numbers), dtype=bool)
        if column.null_count:
            ok &= ~column.is_null().to_numpy(zero_copy_only=False)
            numbers = np.where(ok, numbers, 0)
        return numbers, ok
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        parsed = [_python_number(text, kind) for text in column.to_pylist()]
        ok = np.array([p is not None for p in parsed], dtype=bool)
        numbers = np.array([0 if p is None else p for p in parsed], dtype=np.int64 if kind == "int" else np.float64)
        return numbers, ok


class _BatchValidator:
    """Turns columns into a RowBatch, raising or skipping located errors."""

    def __init__(self, path: str, spec: InputSpec, names: tuple[str, str, str | None, str | None], report: BadRowReport):
        self.path, self.spec, self.names, self.report = path, spec, names, report

    def _ids(self, column: pa.Array, name: str, side: str, problems: list, keep: np.ndarray) -> np.ndarray | pa.Array:
        """One id column: int64 (integer columns, or text parsed with id_kind "int") or text."""
        kind = _kind_of(self.spec, side)
        missing = column.is_null().to_numpy(zero_copy_only=False) if column.null_count else None
        if missing is not None:
            for row in np.flatnonzero(missing):
                problems.append((row, name, "missing id"))
            keep &= ~missing
        if pa.types.is_integer(column.type):
            if kind == "str":
                return as_text(column)
            return column.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        text = as_text(column)
        if kind == "int":
            offsets, data = text_buffers(text)
            values, ok = parse_ints_each(offsets, data, False)
            if missing is not None:
                ok |= missing
            for row in np.flatnonzero(~ok):
                problems.append((row, name, f"non-integer id: {text[row].as_py()!r} (use --id-type str)"))
            keep &= ok
            return values
        empty = (np.diff(text_buffers(text)[0]) == 0) if len(text) else np.zeros(0, bool)
        if missing is not None:
            empty &= ~missing
        for row in np.flatnonzero(empty):
            problems.append((row, name, "empty id"))
        keep &= ~empty
        return text

    def validate(self, users: pa.Array, items: pa.Array, values: pa.Array | None, line_of,
                 order: pa.Array | None = None) -> RowBatch | None:
        n = len(users)
        keep = np.ones(n, dtype=bool)
        problems: list[tuple[int, str | None, str]] = []  # (row, field, reason)
        user_name, item_name, value_name, order_name = self.names
        user_ids = self._ids(users, user_name, "user", problems, keep)
        item_ids = self._ids(items, item_name, "item", problems, keep)

        if values is None:
            vals = np.ones(n, dtype=np.float32)
        else:
            numbers, value_ok = _convert_numbers(values, "float")
            for row in np.flatnonzero(~value_ok):
                problems.append((int(row), value_name, f"non-numeric value: {values[row].as_py()!r}"))
            bad_value = value_ok & ~(np.isfinite(numbers) & (numbers >= 0) & (numbers <= FLOAT32_MAX))
            for row in np.flatnonzero(bad_value):
                problems.append((int(row), value_name, f"{_value_problem(float(numbers[row]))}: {values[row].as_py()!r}"))
            keep &= value_ok & ~bad_value
            with np.errstate(over="ignore"):
                vals = np.where(keep, numbers, 0).astype(np.float32)

        times = None
        if order is not None:
            times, order_ok = _convert_numbers(order, "float")
            for row in np.flatnonzero(~order_ok):
                problems.append((int(row), order_name, f"non-numeric order: {order[row].as_py()!r}"))
            not_finite = order_ok & ~np.isfinite(times)
            for row in np.flatnonzero(not_finite):
                problems.append((int(row), order_name, f"order is not finite: {order[row].as_py()!r}"))
            keep &= order_ok & ~not_finite

        if problems:
            problems.sort()
            if self.spec.on_bad_lines == "error":
                line, name, reason = problems[0]
                raise InputError(self.path, line_of(line), name, reason)
            for line, name, reason in problems:
                self.report.add(InputError(self.path, line_of(line), name, reason))

        zero = keep & (vals == 0)
        self.report.zeros_dropped += int(zero.sum())
        keep &= ~zero
        if not keep.all():
            idx = np.flatnonzero(keep)
            user_ids, item_ids = _take(user_ids, idx), _take(item_ids, idx)
            vals = vals[idx]
            times = times[idx] if times is not None else None
        if not len(vals):
            return None
        return RowBatch(user_ids, item_ids, vals, times)


def _take(ids: np.ndarray | pa.Array, idx: np.ndarray):
    return ids[idx] if isinstance(ids, np.ndarray) else ids.take(pa.array(idx))


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"
QUOTE = ord('"')
MAX_RECORD_BYTES = 256 << 20  # a record (one row, quoted newlines included) longer than this is refused


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _read_header(path: str, delimiter: str) -> tuple[list[str], int]:
    """The first record's fields (a leading UTF-8 BOM dropped) and how many lines it takes."""
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rt", encoding="utf-8-sig", newline="", errors="replace") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            first = next(reader)
        except StopIteration:
            return [], 0
        except csv.Error as exc:
            raise InputError(path, 1, None, f"unreadable header: {exc}") from exc
        return first, reader.line_num


_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def _looks_numeric(field: str) -> bool:
    return bool(_NUMBER.fullmatch(field))


def _delimiter_hint(names: list[str], delimiter: str) -> str:
    """A hint when the header is one field holding another likely delimiter."""
    if len(names) != 1:
        return ""
    for candidate, spelled, described in (("\t", "\\t", "tabs"), (";", ";", "';'"), ("|", "|", "'|'"), (",", ",", "','")):
        if candidate != delimiter and candidate in names[0]:
            return (f"; the header is one field {names[0]!r}, with {described} in it: "
                    f"pass delimiter='{spelled}' (--delimiter '{spelled}')")
    return ""


def _header_hint(names: list[str]) -> str:
    """A hint when the header line looks like a row of data."""
    if any(_looks_numeric(name) for name in names):
        return ("; the first line looks like data, not a header: if the file has no header, pass header=False "
                "(--no-header) and name the columns by position")
    return ""


@overload
def _resolve_column(path: str, spec_col: str | int, names: list[str], role: str, hint: str = "") -> str: ...


@overload
def _resolve_column(path: str, spec_col: str | int | None, names: list[str], role: str, hint: str = "") -> str | None: ...


def _resolve_column(path: str, spec_col: str | int | None, names: list[str], role: str, hint: str = "") -> str | None:
    if spec_col is None:
        return None
    if isinstance(spec_col, int) or (isinstance(spec_col, str) and spec_col.isdigit() and spec_col not in names):
        position = int(spec_col)
        if position >= len(names):
            raise InputError(path, 1, str(spec_col),
                             f"{role} column {position} does not exist: the file has {len(names)} columns{hint}")
        return names[position]
    if spec_col not in names:
        raise InputError(path, 1, spec_col, f"unknown {role} column; the header has {names}{hint}")
    return spec_col


def _text_chunks(path: str, chunk_bytes: int, delimiter: str = ",",
                 buffers: int = 1) -> Iterator[tuple[np.ndarray, int]]:
    """Whole records of a (possibly gzip) text file, about ``chunk_bytes`` at a time, with the
    1-based line number each chunk starts at. A chunk ends with a newline that ends a record,
    never one inside a quoted field, so the rows do not depend on the chunk size. A leading
    UTF-8 BOM is dropped. Memory: one chunk (a longer record grows it, up to MAX_RECORD_BYTES).

    Each chunk is a uint8 view of one buffer the file is read into, valid until the next chunk
    is asked for (the caller copies what it keeps): fresh memory per chunk would fault in every
    page anew, and slicing bytes copies them. With ``buffers=2`` the chunks alternate between two
    buffers, so each stays valid until the one after the next is asked for (the caller works on
    one chunk while the next is read)."""
    stream = pa.input_stream(path, compression="gzip" if _is_gzip(path) else None)
    separator = ord(delimiter)
    buffer = np.empty(chunk_bytes + (1 << 16), np.uint8)
    spare = np.empty(chunk_bytes + (1 << 16), np.uint8) if buffers == 2 else None
    held = 0  # bytes at the front of the buffer: the start of a record the last read cut
    line = 1
    first = True
    with stream:
        while True:
            if len(buffer) - held < chunk_bytes:  # a long record: room for it and the next read
                grown = np.empty(held + chunk_bytes + (1 << 16), np.uint8)
                grown[:held] = buffer[:held]
                buffer = grown
            got = stream.readinto(buffer[held : held + chunk_bytes].data)
            if first:
                first = False
                if got >= len(BOM) and buffer[: len(BOM)].tobytes() == BOM:
                    buffer[: got - len(BOM)] = buffer[len(BOM) : got].copy()
                    got -= len(BOM)
            if not got:
                break
            end = held + got
            quoted, newlines, cut = scan_chunk(buffer[:end])
            if quoted:
                cut = max(0, int(csv_record_end(buffer[:end], 0, separator, QUOTE)))
                newlines = scan_chunk(buffer[:cut])[1]
            if cut == 0:
                held = end
                if held > MAX_RECORD_BYTES:
                    raise InputError(path, line, None, f"no record ends within {held} bytes from this line: "
                                     "a quoted field that is never closed?")
                continue
            yield buffer[:cut], line
            line += int(newlines)
            held = end - cut
            if spare is not None:  # the next chunk goes to the other buffer, with the record cut here
                if len(spare) < max(held, len(buffer)):
                    spare = np.empty(len(buffer), np.uint8)
                spare[:held] = buffer[cut:end]
                buffer, spare = spare, buffer
            elif held:
                buffer[:held] = buffer[cut:end]  # numpy copies overlapping ranges safely
    if held:
        tail = np.empty(held + 1, np.uint8)
        tail[:held] = buffer[:held]
        tail[held] = 10
        yield tail, line


class _ChunkLines:
    """Physical line of each record of a chunk, for error messages (computed on first use:
    a record spans several lines when a quoted field holds newlines)."""

    def __init__(self, chunk: bytes, first_line: int, delimiter: str):
        self.chunk, self.first_line, self.delimiter = chunk, first_line, delimiter
        self._starts: np.ndarray | None = None  # line of each record, found on the first need

    def of_record(self, record: int) -> int:
        """Line of the record-th (1-based) record of the chunk."""
        if b'"' not in self.chunk:
            return self.first_line + record - 1
        if self._starts is None:
            self._starts = csv_record_lines(np.frombuffer(self.chunk, np.uint8), ord(self.delimiter), QUOTE)
        return self.first_line + int(self._starts[record - 1])


THREADED_PARSE_BYTES = 2 << 20  # chunks from this size are parsed by Arrow's thread pool


def _csv_batches(path: str, spec: InputSpec, report: BadRowReport, block_bytes: int) -> Iterator[RowBatch]:
    """Parse record-aligned chunks with Arrow one at a time (Arrow's own streaming reader reads
    many blocks ahead, which would break the memory budget)."""
    first, header_lines = _read_header(path, spec.delimiter)
    if not first or not any(field.strip() for field in first):
        raise InputError(path, 1, None, "empty input: no rows")
    names = first if spec.header else [f"f{k}" for k in range(len(first))]
    if spec.header and len(set(names)) != len(names):
        raise InputError(path, 1, None, f"duplicate column names in header {names}"
                         f"{_delimiter_hint(names, spec.delimiter) or _header_hint(names)}")
    columns = (spec.user_col, spec.item_col, spec.value_col, spec.order_col)
    hint = _delimiter_hint(names, spec.delimiter)
    if spec.header and not hint:
        named = [c for c in columns if isinstance(c, str) and not (c.isdigit() and c not in names)]
        if named and not any(c in names for c in named):
            hint = _header_hint(names)
    user_name = _resolve_column(path, spec.user_col, names, "user", hint)
    item_name = _resolve_column(path, spec.item_col, names, "item", hint)
    wanted = [
        user_name,
        item_name,
        _resolve_column(path, spec.value_col, names, "value", hint),
        _resolve_column(path, spec.order_col, names, "order", hint),
    ]
    used = [name for name in wanted if name is not None]
    if len(set(used)) != len(used):
        raise InputError(path, 1, None, f"user, item, value and order columns must differ, got {used}{hint}")
    if spec.header and any(_looks_numeric(name) for name in used):
        log.warning("%s: the header line %s looks like data but is read as column names (its row is not "
                    "converted): if the file has no header, pass header=False (--no-header)", path, first)
    validator = _BatchValidator(path, spec, (user_name, item_name, wanted[2], wanted[3]), report)
    convert_options = pacsv.ConvertOptions(
        include_columns=used,
        column_types={name: pa.string() for name in used},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    # plain chunks (integer ids and counts, no quotes) are read straight from their bytes; any
    # other chunk, or one with a problem to name, goes through Arrow and the validator below
    plain = (wanted[3] is None and _kind_of(spec, "user") != "str" and _kind_of(spec, "item") != "str"
             and len(spec.delimiter.encode()) == 1 and spec.delimiter != '"')
    plain_fields = (names.index(user_name), names.index(item_name),
                    names.index(wanted[2]) if wanted[2] is not None else -1) if plain else None
    helper = ThreadPoolExecutor(max_workers=2, thread_name_prefix="wals-ooc-parse") if plain_fields is not None else None
    try:
        yield from _csv_chunk_batches(path, spec, report, block_bytes, names, header_lines, wanted, convert_options,
                                      plain_fields, validator, helper)
    finally:
        if helper is not None:
            helper.shutdown()


def _parse_plain(view: np.ndarray, n_fields: int, fields: tuple[int, int, int], delimiter: int,
                 helper: ThreadPoolExecutor) -> list:
    """``parse_plain_csv`` of a chunk, started in ``helper``'s threads (the kernel releases the
    GIL): a chunk of PARALLEL_PARSE_BYTES or more is cut at a newline near its middle and its
    halves parsed at once, so two cores parse. The futures of the halves' rows, in order."""
    halves = [view]
    if len(view) >= PARALLEL_PARSE_BYTES:
        middle = len(view) // 2
        newline = np.flatnonzero(view[middle : middle + (1 << 16)] == 10)
        if len(newline):
            cut = middle + int(newline[0]) + 1
            halves = [view[:cut], view[cut:]]
    user_field, item_field, value_field = fields
    return [helper.submit(parse_plain_csv, half, n_fields, user_field, item_field, value_field, delimiter)
            for half in halves]


PARALLEL_PARSE_BYTES = 1 << 20


def _csv_chunk_batches(path, spec, report, block_bytes, names, header_lines, wanted, convert_options, plain_fields,
                       validator, helper) -> Iterator[RowBatch]:
    """The batches of ``_csv_batches``, chunk by chunk (see there)."""
    rows_seen = 0

    def chunks() -> Iterator[tuple[np.ndarray, int, list | None]]:
        """(chunk, first line, its plain parse or None), the header dropped; the plain parse of
        each chunk runs in ``helper`` while the next chunk is read (two buffers in turn)."""
        pending = None
        for view, first_line in _text_chunks(path, block_bytes, spec.delimiter, 2 if plain_fields is not None else 1):
            if first_line == 1 and spec.header:  # drop the header record (it may span several lines)
                cut = 0
                for _ in range(header_lines):
                    cut = int(np.flatnonzero(view[cut:] == 10)[0]) + cut + 1
                view, first_line = view[cut:], 1 + header_lines
                if not len(view):
                    continue
            if plain_fields is None:
                yield view, first_line, None
                continue
            started = (view, first_line, _parse_plain(view, len(names), plain_fields, ord(spec.delimiter), helper))
            if pending is not None:
                yield pending[0], pending[1], [future.result() for future in pending[2]]
            pending = started
        if pending is not None:
            yield pending[0], pending[1], [future.result() for future in pending[2]]

    for view, first_line, parsed in chunks():
        if parsed is not None:  # plain
            if all(ok for _, _, _, ok in parsed):
                for users, items, numbers, _ in parsed:
                    rows_seen += len(users)
                    vals = numbers  # float32
                    zero = vals == 0
                    if zero.any():
                        report.zeros_dropped += int(zero.sum())
                        keep = np.flatnonzero(~zero)
                        users, items, vals = users[keep], items[keep], vals[keep]
                    if len(vals):
                        yield RowBatch(users, items, vals, None)
                continue
        chunk = view.tobytes()  # the careful way holds its bytes (the view's buffer is reused)
        lines = _ChunkLines(chunk, first_line, spec.delimiter)
        malformed: list[int] = []  # records, within this chunk, that were skipped
        first_error: list[InputError] = []

        def on_invalid_row(row, lines=lines, malformed=malformed, first_error=first_error) -> str:
            error = InputError(
                path, lines.of_record(row.number), None,
                f"malformed row: expected {row.expected_columns} fields, got {row.actual_columns}: {row.text[:80]!r}",
            )
            if spec.on_bad_lines == "error":
                first_error.append(error)  # Arrow stops with ArrowInvalid; we raise this instead
                return "error"
            report.add(error)
            malformed.append(row.number)
            return "skip"

        def parse(threads: bool, handler):
            return pacsv.read_csv(
                pa.BufferReader(chunk),
                read_options=pacsv.ReadOptions(column_names=names, use_threads=threads,
                                               block_size=max(1 << 20, len(chunk) // 2 + 1) if threads else len(chunk) + 1),
                parse_options=pacsv.ParseOptions(
                    delimiter=spec.delimiter, invalid_row_handler=handler, ignore_empty_lines=False,
                    newlines_in_values=True,
                ),
                convert_options=convert_options,
            )

        table = None
        if len(chunk) >= THREADED_PARSE_BYTES:
            # both cores parse halves of the chunk; a malformed row (whose line Arrow's threaded
            # parser does not know) sends the chunk to the serial parse below, which names it
            try:
                table = parse(True, lambda row: "error")
            except pa.ArrowInvalid:
                table = None
        if table is None:
            try:
                table = parse(False, on_invalid_row)
            except pa.ArrowInvalid as exc:
                if first_error:
                    raise first_error[0] from None
                raise InputError(path, first_line, None, f"unreadable CSV: {exc}") from exc

        def line_of(record: int, lines=lines, malformed=malformed) -> int:
            """Line of the record-th (0-based) row Arrow returned: skipped records shift it down."""
            local = record + 1
            while True:
                shifted = record + 1 + bisect_right(malformed, local)
                if shifted == local:
                    return lines.of_record(local)
                local = shifted

        users = table.column(wanted[0]).combine_chunks()
        items = table.column(wanted[1]).combine_chunks()
        values = table.column(wanted[2]).combine_chunks() if wanted[2] is not None else None
        order = table.column(wanted[3]).combine_chunks() if wanted[3] is not None else None
        rows_seen += len(users)
        blank = _blank_rows(users, items, values)
        kept_rows = None
        if blank is not None:
            report.blank_lines += int(blank.sum())
            kept_rows = np.flatnonzero(~blank)
            take = pa.array(kept_rows)
            users, items = users.take(take), items.take(take)
            values = values.take(take) if values is not None else None
            order = order.take(take) if order is not None else None
        batch = validator.validate(
            users, items, values,
            lambda row, kept_rows=kept_rows, line_of=line_of: line_of(int(kept_rows[row]) if kept_rows is not None else int(row)),
            order,
        )
        if batch is not None:
            yield batch
    if rows_seen == 0 and report.skipped == 0:
        raise InputError(path, None, None, "empty input: a header but no rows")


def _blank_rows(users: pa.Array, items: pa.Array, values: pa.Array | None) -> np.ndarray | None:
    """Mask of rows whose fields are all empty (blank lines), or None when there are none."""
    empty = pc.equal(pc.binary_length(users), 0)
    if not pc.any(empty).as_py():
        return None
    empty = pc.and_(empty, pc.equal(pc.binary_length(items), 0))
    if values is not None:
        empty = pc.and_(empty, pc.equal(pc.binary_length(values), 0))
    mask = empty.to_numpy(zero_copy_only=False)
    return mask if mask.any() else None


# ---------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------


def _parquet_ids(path: str, column: pa.Array, name: str, start: int) -> pa.Array:
    """A Parquet id column as integers or text: integer and string columns as they are, a float
    column whose values are all integral as integers; anything else is an InputError."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.dictionary_decode()
        kind = column.type
    if pa.types.is_integer(kind):
        if pa.types.is_unsigned_integer(kind) and kind.bit_width == 64 and pc.max(column).as_py() is not None \
                and pc.max(column).as_py() > np.iinfo(np.int64).max:
            return column.cast(pa.string())  # beyond int64: kept exactly as text
        return column.cast(pa.int64())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column
    if pa.types.is_floating(kind):
        numbers = column.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
        with np.errstate(invalid="ignore"):
            integral = np.isfinite(numbers) & (numbers == np.round(numbers)) & (np.abs(numbers) < 2.0**63)
        if not integral.all():
            row = int(np.flatnonzero(~integral)[0])
            raise InputError(path, start + row + 1, name,
                             f"id {float(numbers[row])!r} in a float column is not an integer: ids must be integers or strings")
        return pa.array(numbers.astype(np.int64), mask=column.is_null().to_numpy(zero_copy_only=False) if column.null_count else None)
    raise InputError(path, None, name, f"id column of type {kind}: ids must be integers or strings "
                     "(a float column is read as integers when every value is integral)")


def _parquet_batches(path: str, spec: InputSpec, report: BadRowReport, batch_rows: int) -> Iterator[RowBatch]:
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowInvalid as exc:
        raise InputError(path, None, None, f"unreadable Parquet: {exc}") from exc
    names = parquet.schema_arrow.names
    user_name = _resolve_column(path, spec.user_col, names, "user")
    item_name = _resolve_column(path, spec.item_col, names, "item")
    wanted = [
        user_name,
        item_name,
        _resolve_column(path, spec.value_col, names, "value"),
        _resolve_column(path, spec.order_col, names, "order"),
    ]
    if parquet.metadata.num_rows == 0:
        raise InputError(path, None, None, "empty input: no rows")
    used = [name for name in wanted if name is not None]
    if len(set(used)) != len(used):
        raise InputError(path, None, None, f"user, item, value and order columns must differ, got {used}")
    validator = _BatchValidator(path, spec, (user_name, item_name, wanted[2], wanted[3]), report)
    start = 0
    for record_batch in parquet.iter_batches(batch_size=batch_rows, columns=used):
        columns = [_parquet_ids(path, record_batch.column(name), name, start) for name in (user_name, item_name)]
        values = record_batch.column(wanted[2]).cast(pa.string()) if wanted[2] is not None else None
        order = record_batch.column(wanted[3]).cast(pa.string()) if wanted[3] is not None else None
        batch = validator.validate(columns[0], columns[1], values, lambda row, start=start: start + int(row) + 1, order)
        start += record_batch.num_rows
        if batch is not None:
            yield batch


# ---------------------------------------------------------------------------------------------


def is_parquet(path: str) -> bool:
    if path.endswith((".parquet", ".pq")):
        return True
    with open(path, "rb") as handle:
        return handle.read(4) == b"PAR1"


def read_batches(
    paths: Sequence[str | os.PathLike],
    spec: InputSpec,
    report: BadRowReport,
    block_bytes: int = 16 << 20,
    on_file=None,
) -> Iterator[RowBatch]:
    """Validated batches from every input file in turn (ids as the readers found them: see
    ``RowBatch``; which kind each side gets is decided by the writer over the whole input).

    block_bytes bounds the text parsed at once (CSV) and sets rows per batch (Parquet).
    on_file(path) is called as each file starts (progress reporting).
    """
    if not paths:
        raise ValueError("no input files given")
    for raw in paths:
        path = os.fspath(raw)
        if not os.path.exists(path):
            raise InputError(path, None, None, "no such file")
        if os.path.getsize(path) == 0:
            raise InputError(path, None, None, "empty input: the file has no bytes")
        if on_file is not None:
            on_file(path)
        source = (
            _parquet_batches(path, spec, report, max(1024, block_bytes // 32))
            if is_parquet(path)
            else _csv_batches(path, spec, report, block_bytes)
        )
        yield from source
