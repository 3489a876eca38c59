"""Input readers: CSV (plain or gzip) and Parquet files, streamed in batches and validated.

Each reader yields ``RowBatch`` objects of bounded size. Validation follows one rule: a row is
either turned into (user, item, value) or reported with its file, line and field; with
``on_bad_lines="skip"`` reported rows are counted and dropped instead of raising.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import math
import os
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import InputError


@dataclass
class InputSpec:
    """How to read the input files.

    user_col, item_col, value_col: column names (with a header) or 0-based positions.
    value_col None means every row counts 1.
    order_col: optional numeric column giving each row's place in time (a timestamp, a sequence
    number); kept per entry (the latest of summed duplicates) for splits by order.
    id_kind: "int", "str", or "auto" (int if the first batch's ids all parse as integers).
    on_bad_lines: "error" raises InputError at the first bad row; "skip" counts and drops it.
    """

    user_col: str | int = 0
    item_col: str | int = 1
    value_col: str | int | None = 2
    order_col: str | int | None = None
    delimiter: str = ","
    header: bool = True
    id_kind: str = "auto"
    on_bad_lines: str = "error"

    def __post_init__(self) -> None:
        if self.id_kind not in ("auto", "int", "str"):
            raise ValueError(f"id_kind must be auto, int or str, not {self.id_kind!r}")
        if self.on_bad_lines not in ("error", "skip"):
            raise ValueError(f"on_bad_lines must be error or skip, not {self.on_bad_lines!r}")
        if len(self.delimiter) != 1:
            raise ValueError(f"delimiter must be one character, not {self.delimiter!r}")


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
    """Validated rows: ids as int64 NumPy arrays or Arrow string arrays, values float32,
    order float64 (None without an order column)."""

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
    return None


def _convert_numbers(column: pa.Array, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Column of strings -> (numbers, ok mask). Arrow cast when clean; Python per field otherwise."""
    target = pa.int64() if kind == "int" else pa.float64()
    try:
        numbers = pc.cast(column, target).to_numpy(zero_copy_only=False)
        ok = np.ones(len(numbers), dtype=bool)
        if column.null_count:
            ok &= ~column.is_null().to_numpy(zero_copy_only=False)
        return numbers, ok
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        parsed = [_python_number(text, kind) for text in column.to_pylist()]
        ok = np.array([p is not None for p in parsed], dtype=bool)
        numbers = np.array([0 if p is None else p for p in parsed], dtype=np.int64 if kind == "int" else np.float64)
        return numbers, ok


def _guess_id_kind(column: pa.Array) -> str:
    try:
        pc.cast(column, pa.int64())
        return "int"
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return "str"


class _BatchValidator:
    """Turns string columns into a RowBatch, raising or skipping located errors."""

    def __init__(self, path: str, spec: InputSpec, names: tuple[str, str, str | None, str | None], report: BadRowReport):
        self.path, self.spec, self.names, self.report = path, spec, names, report
        self.id_kind = spec.id_kind

    def validate(self, users: pa.Array, items: pa.Array, values: pa.Array | None, line_of,
                 order: pa.Array | None = None) -> RowBatch | None:
        n = len(users)
        if self.id_kind == "auto":
            self.id_kind = _guess_id_kind(users) if n else "auto"
            if self.id_kind == "int" and _guess_id_kind(items) == "str":
                self.id_kind = "str"
        keep = np.ones(n, dtype=bool)
        problems: list[tuple[int, str, str]] = []  # (row, field, reason)
        user_name, item_name, value_name, order_name = self.names

        if self.id_kind == "int":
            user_num, user_ok = _convert_numbers(users, "int")
            item_num, item_ok = _convert_numbers(items, "int")
            for row in np.flatnonzero(~user_ok):
                problems.append((row, user_name, f"non-integer id: {users[row].as_py()!r} (use --id-type str)"))
            for row in np.flatnonzero(~item_ok):
                problems.append((row, item_name, f"non-integer id: {items[row].as_py()!r} (use --id-type str)"))
            keep &= user_ok & item_ok
        else:
            for column, name in ((users, user_name), (items, item_name)):
                empty = pc.fill_null(pc.equal(pc.utf8_length(column), 0), True).to_numpy(zero_copy_only=False)
                for row in np.flatnonzero(empty):
                    problems.append((row, name, "empty id"))
                keep &= ~empty

        if values is None:
            vals = np.ones(n, dtype=np.float64)
        else:
            vals, value_ok = _convert_numbers(values, "float")
            for row in np.flatnonzero(~value_ok):
                problems.append((row, value_name, f"non-numeric value: {values[row].as_py()!r}"))
            bad_value = value_ok & ~(np.isfinite(vals) & (vals >= 0))
            for row in np.flatnonzero(bad_value):
                problems.append((row, value_name, f"{_value_problem(float(vals[row]))}: {values[row].as_py()!r}"))
            keep &= value_ok & ~bad_value

        times = None
        if order is not None:
            times, order_ok = _convert_numbers(order, "float")
            for row in np.flatnonzero(~order_ok):
                problems.append((row, order_name, f"non-numeric order: {order[row].as_py()!r}"))
            not_finite = order_ok & ~np.isfinite(times)
            for row in np.flatnonzero(not_finite):
                problems.append((row, order_name, f"order is not finite: {order[row].as_py()!r}"))
            keep &= order_ok & ~not_finite

        if problems:
            problems.sort()
            if self.spec.on_bad_lines == "error":
                row, name, reason = problems[0]
                raise InputError(self.path, line_of(row), name, reason)
            for row, name, reason in problems:
                self.report.add(InputError(self.path, line_of(row), name, reason))

        zero = keep & (vals == 0)
        self.report.zeros_dropped += int(zero.sum())
        keep &= ~zero
        if not keep.all():
            idx = np.flatnonzero(keep)
            users, items, vals = users.take(pa.array(idx)), items.take(pa.array(idx)), vals[idx]
            times = times[idx] if times is not None else None
            if self.id_kind == "int":
                user_num, item_num = user_num[idx], item_num[idx]
        if not len(vals):
            return None
        if self.id_kind == "int":
            return RowBatch(user_num.astype(np.int64), item_num.astype(np.int64), vals.astype(np.float32), times)
        return RowBatch(users.cast(pa.string()), items.cast(pa.string()), vals.astype(np.float32), times)


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------


def _open_text_head(path: str) -> str:
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rt", newline="") as handle:
        return handle.readline()


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _resolve_column(path: str, spec_col: str | int | None, names: list[str], role: str) -> str | None:
    if spec_col is None:
        return None
    if isinstance(spec_col, int) or (isinstance(spec_col, str) and spec_col.isdigit() and spec_col not in names):
        position = int(spec_col)
        if position >= len(names):
            raise InputError(path, 1, str(spec_col), f"{role} column {position} does not exist: the file has {len(names)} columns")
        return names[position]
    if spec_col not in names:
        raise InputError(path, 1, spec_col, f"unknown {role} column; the header has {names}")
    return spec_col


def _text_chunks(path: str, chunk_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Whole lines of a (possibly gzip) text file, about ``chunk_bytes`` at a time, with the
    1-based line number each chunk starts at. Memory: one chunk (a longer line grows it)."""
    stream = pa.input_stream(path, compression="gzip" if _is_gzip(path) else None)
    leftover = b""
    line = 1
    with stream:
        while True:
            data = stream.read(chunk_bytes)
            if not data:
                break
            data = leftover + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                leftover = data
                continue
            chunk, leftover = data[:cut], data[cut:]
            yield chunk, line
            line += chunk.count(b"\n")
    if leftover:
        yield leftover + b"\n", line


def _csv_batches(path: str, spec: InputSpec, report: BadRowReport, block_bytes: int) -> Iterator[RowBatch]:
    """Parse line-aligned chunks with Arrow one at a time (Arrow's own streaming reader reads
    many blocks ahead, which would break the memory budget)."""
    head = _open_text_head(path)
    if not head.strip():
        raise InputError(path, 1, None, "empty input: no rows")
    first = next(csv.reader(io.StringIO(head), delimiter=spec.delimiter))
    names = first if spec.header else [f"f{k}" for k in range(len(first))]
    if spec.header and len(set(names)) != len(names):
        raise InputError(path, 1, None, f"duplicate column names in header {names}")
    wanted = [
        _resolve_column(path, spec.user_col, names, "user"),
        _resolve_column(path, spec.item_col, names, "item"),
        _resolve_column(path, spec.value_col, names, "value"),
        _resolve_column(path, spec.order_col, names, "order"),
    ]
    used = [name for name in wanted if name is not None]
    if len(set(used)) != len(used):
        raise InputError(path, 1, None, f"user, item, value and order columns must differ, got {used}")
    validator = _BatchValidator(path, spec, (wanted[0], wanted[1], wanted[2], wanted[3]), report)
    convert_options = pacsv.ConvertOptions(
        include_columns=used,
        column_types={name: pa.string() for name in used},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    rows_seen = 0
    for chunk, first_line in _text_chunks(path, block_bytes):
        if first_line == 1 and spec.header:  # drop the header line
            newline = chunk.index(b"\n") + 1
            chunk, first_line = chunk[newline:], 2
            if not chunk:
                continue
        malformed: list[int] = []  # line numbers, within this chunk, that were skipped
        first_error: list[InputError] = []

        def on_invalid_row(row, first_line=first_line, malformed=malformed, first_error=first_error) -> str:
            error = InputError(
                path, first_line + row.number - 1, None,
                f"malformed row: expected {row.expected_columns} fields, got {row.actual_columns}: {row.text[:80]!r}",
            )
            if spec.on_bad_lines == "error":
                first_error.append(error)  # Arrow stops with ArrowInvalid; we raise this instead
                return "error"
            report.add(error)
            malformed.append(row.number)
            return "skip"

        try:
            table = pacsv.read_csv(
                pa.BufferReader(chunk),
                read_options=pacsv.ReadOptions(column_names=names, use_threads=False, block_size=len(chunk) + 1),
                parse_options=pacsv.ParseOptions(
                    delimiter=spec.delimiter, invalid_row_handler=on_invalid_row, ignore_empty_lines=False
                ),
                convert_options=convert_options,
            )
        except pa.ArrowInvalid as exc:
            if first_error:
                raise first_error[0] from None
            raise InputError(path, first_line, None, f"unreadable CSV: {exc}") from exc

        def line_of(record: int, first_line=first_line, malformed=malformed) -> int:
            """Line of the record-th (0-based) row Arrow returned: skipped lines shift it down."""
            local = record + 1
            while True:
                shifted = record + 1 + bisect_right(malformed, local)
                if shifted == local:
                    return first_line + local - 1
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


def _parquet_batches(path: str, spec: InputSpec, report: BadRowReport, batch_rows: int) -> Iterator[RowBatch]:
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowInvalid as exc:
        raise InputError(path, None, None, f"unreadable Parquet: {exc}") from exc
    names = parquet.schema_arrow.names
    wanted = [
        _resolve_column(path, spec.user_col, names, "user"),
        _resolve_column(path, spec.item_col, names, "item"),
        _resolve_column(path, spec.value_col, names, "value"),
        _resolve_column(path, spec.order_col, names, "order"),
    ]
    if parquet.metadata.num_rows == 0:
        raise InputError(path, None, None, "empty input: no rows")
    used = [name for name in wanted if name is not None]
    validator = _BatchValidator(path, spec, (wanted[0], wanted[1], wanted[2], wanted[3]), report)
    start = 0
    for record_batch in parquet.iter_batches(batch_size=batch_rows, columns=used):
        columns = [record_batch.column(name).cast(pa.string()) for name in wanted[:2]]
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
    """Validated batches from every input file in turn.

    block_bytes bounds the text parsed at once (CSV) and sets rows per batch (Parquet).
    on_file(path) is called as each file starts (progress reporting).
    """
    if not paths:
        raise ValueError("no input files given")
    kinds: set[str] = set()
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
        for batch in source:
            kind = "int" if isinstance(batch.users, np.ndarray) else "str"
            kinds.add(kind)
            if len(kinds) > 1:
                raise InputError(path, None, None, "ids are integers in one file and strings in another: pass --id-type str")
            if spec.id_kind == "auto":
                spec = dataclasses.replace(spec, id_kind=kind)  # later files use the same kind
            yield batch
