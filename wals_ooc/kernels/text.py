"""Kernels on ids as text: many strings held as one UTF-8 byte buffer and int64 offsets.

String ``k`` is ``data[offsets[k]:offsets[k + 1]]`` (Arrow's large_string layout, which is how
ids come from the readers and how the store keeps them). The hash is XXH64 (seed 0) of the
bytes, computed the same way on every platform: it orders the rows of a string id map, so it is
part of the store format.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

_JIT: dict[str, Any] = dict(cache=True, nogil=True)

_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)
_INT64_MAX = 9223372036854775807
_MIN_DIV10 = -922337203685477580  # -2**63 // 10, rounded toward zero


@njit(**_JIT)
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@njit(**_JIT)
def _read_le(data, p, n):
    """The n bytes at p as a little-endian unsigned integer (n = 4 or 8)."""
    v = np.uint64(0)
    for k in range(n):
        v |= np.uint64(data[p + k]) << np.uint64(8 * k)
    return v


@njit(**_JIT)
def _round(acc, lane):
    acc = acc + lane * _P2
    acc = _rotl(acc, 31)
    return acc * _P1


@njit(**_JIT)
def _merge_round(acc, val):
    acc ^= _round(np.uint64(0), val)
    return acc * _P1 + _P4


@njit(**_JIT)
def _xxh64(data, start, stop):
    length = stop - start
    p = start
    if length >= 32:
        v1 = _P1 + _P2
        v2 = _P2
        v3 = np.uint64(0)
        v4 = np.uint64(0) - _P1
        limit = stop - 32
        while p <= limit:
            v1 = _round(v1, _read_le(data, p, 8))
            v2 = _round(v2, _read_le(data, p + 8, 8))
            v3 = _round(v3, _read_le(data, p + 16, 8))
            v4 = _round(v4, _read_le(data, p + 24, 8))
            p += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge_round(h, v1)
        h = _merge_round(h, v2)
        h = _merge_round(h, v3)
        h = _merge_round(h, v4)
    else:
        h = _P5
    h += np.uint64(length)
    while p + 8 <= stop:
        h ^= _round(np.uint64(0), _read_le(data, p, 8))
        h = _rotl(h, 27) * _P1 + _P4
        p += 8
    if p + 4 <= stop:
        h ^= _read_le(data, p, 4) * _P1
        h = _rotl(h, 23) * _P2 + _P3
        p += 4
    while p < stop:
        h ^= np.uint64(data[p]) * _P5
        h = _rotl(h, 11) * _P1
        p += 1
    h ^= h >> np.uint64(33)
    h *= _P2
    h ^= h >> np.uint64(29)
    h *= _P3
    h ^= h >> np.uint64(32)
    return h


@njit(**_JIT)
def hash_strings(offsets, data):
    """XXH64 (seed 0) of each string: uint64 (n,)."""
    n = len(offsets) - 1
    out = np.empty(n, np.uint64)
    for k in range(n):
        out[k] = _xxh64(data, offsets[k], offsets[k + 1])
    return out


@njit(**_JIT)
def _parse_int(data, start, stop, canonical):
    """(ok, value) of one string read as an int64; see ``parse_ints``."""
    p = start
    negative = False
    if p < stop and (data[p] == 45 or (data[p] == 43 and not canonical)):  # '-' or '+'
        negative = data[p] == 45
        p += 1
    if p >= stop:
        return False, 0
    if canonical and data[p] == 48 and (stop - p > 1 or negative):  # a leading zero, or "-0"
        return False, 0
    acc = 0  # accumulated as a negative number, so that -2**63 fits
    for q in range(p, stop):
        c = data[q]
        if c < 48 or c > 57:
            return False, 0
        d = c - 48
        if acc < _MIN_DIV10 or (acc == _MIN_DIV10 and d > 8):  # acc * 10 - d < -2**63
            return False, 0
        acc = acc * 10 - d
    if not negative:
        if acc == -_INT64_MAX - 1:
            return False, 0
        acc = -acc
    return True, acc


@njit(**_JIT)
def parse_ints(offsets, data, canonical):
    """Each string as an int64: (values (n,), index of the first string that is not one, or -1).

    canonical: only the text ``str(int(text))`` would give (``0`` or ``-?[1-9][0-9]*``) counts;
    otherwise an optional sign and leading zeros are allowed. Out of the int64 range fails.
    Stops at the first failure (the values from there on are not filled).
    """
    n = len(offsets) - 1
    values = np.empty(n, np.int64)
    for k in range(n):
        ok, value = _parse_int(data, offsets[k], offsets[k + 1], canonical)
        if not ok:
            return values, k
        values[k] = value
    return values, -1


@njit(**_JIT)
def parse_ints_each(offsets, data, canonical):
    """Like ``parse_ints`` but for every string: (values (n,), ok (n,) bool)."""
    n = len(offsets) - 1
    values = np.zeros(n, np.int64)
    ok = np.zeros(n, np.bool_)
    for k in range(n):
        ok[k], values[k] = _parse_int(data, offsets[k], offsets[k + 1], canonical)
    return values, ok


@njit(**_JIT)
def _same(a_off, a_data, i, b_off, b_data, j):
    la = a_off[i + 1] - a_off[i]
    if la != b_off[j + 1] - b_off[j]:
        return False
    pa_ = a_off[i]
    pb = b_off[j]
    for k in range(la):
        if a_data[pa_ + k] != b_data[pb + k]:
            return False
    return True


@njit(**_JIT)
def equal_pairs(a_off, a_data, a_idx, b_off, b_data, b_idx):
    """Whether string a_idx[k] of A equals string b_idx[k] of B, for each k: bool (len(a_idx),)."""
    n = len(a_idx)
    out = np.empty(n, np.bool_)
    for k in range(n):
        i = a_idx[k]
        j = b_idx[k]
        s = a_off[i]
        length = a_off[i + 1] - s
        t = b_off[j]
        same = length == b_off[j + 1] - t
        if same:
            for m in range(length):
                if a_data[s + m] != b_data[t + m]:
                    same = False
                    break
        out[k] = same
    return out


@njit(**_JIT)
def distinct_by_hash(sorted_hashes, order, offsets, data):
    """Distinct strings among ones ordered by hash (``order`` sorts them; ``sorted_hashes`` are
    their hashes in that order).

    Returns (keep, mixed): keep marks the first entry of each run of equal hashes; mixed marks a
    run's first entry when the run holds different strings (a true hash collision, which the
    caller resolves by comparing the bytes).
    """
    n = len(order)
    keep = np.zeros(n, np.bool_)
    mixed = np.zeros(n, np.bool_)
    i = 0
    while i < n:
        j = i + 1
        while j < n and sorted_hashes[j] == sorted_hashes[i]:
            j += 1
        keep[i] = True
        for k in range(i + 1, j):
            if not _same(offsets, data, order[i], offsets, data, order[k]):
                mixed[i] = True
                break
        i = j
    return keep, mixed


@njit(**_JIT)
def gather_ranges(source, source_start, starts, stops, out, out_offsets):
    """Copy ``source[starts[k] - source_start : stops[k] - source_start]`` to
    ``out[out_offsets[k]:out_offsets[k + 1]]`` for each k (the caller sized ``out``)."""
    for k in range(len(starts)):
        p = starts[k] - source_start
        q = out_offsets[k]
        for m in range(stops[k] - starts[k]):
            out[q + m] = source[p + m]


@njit(**_JIT)
def chunk_runs(first_chunk, last_chunk, max_chunks):
    """Group items, sorted by position, into reads of consecutive chunks.

    Item k needs chunks ``[first_chunk[k], last_chunk[k]]``. A read covers a run of chunks that
    are all needed, at most ``max_chunks`` long unless one item alone needs more; an item is
    never split between reads. Returns (run_first, run_last, item_start) with item_start of
    length runs + 1: run r serves items ``item_start[r]:item_start[r + 1]``.
    """
    n = len(first_chunk)
    run_first = np.empty(n, np.int64)
    run_last = np.empty(n, np.int64)
    item_start = np.empty(n + 1, np.int64)
    runs = 0
    for k in range(n):
        a = first_chunk[k]
        b = last_chunk[k]
        shares = runs > 0 and a <= run_last[runs - 1]
        follows = runs > 0 and a == run_last[runs - 1] + 1 and b - run_first[runs - 1] < max_chunks
        if shares or follows:
            if b > run_last[runs - 1]:
                run_last[runs - 1] = b
        else:
            run_first[runs] = a
            run_last[runs] = b
            item_start[runs] = k
            runs += 1
    item_start[runs] = n
    return run_first[:runs], run_last[:runs], item_start[: runs + 1]


@njit(**_JIT)
def scan_chunk(data):
    """One pass over a chunk of CSV bytes: (whether it holds a double quote, its newlines, the
    position just after its last newline or 0)."""
    quoted = False
    newlines = 0
    last = 0
    for p in range(len(data)):
        c = data[p]
        if c == 10:
            newlines += 1
            last = p + 1
        elif c == 34:
            quoted = True
    return quoted, newlines, last


@njit(**_JIT)
def csv_record_end(data, start, delimiter, quote):
    """Position just after the last record-ending newline in ``data[start:]``, or -1 if none.

    Follows the CSV quoting rules of Arrow's parser: a field that starts with the quote
    character runs to the closing quote (a doubled quote inside is a literal quote), and a
    newline inside it does not end the record. ``data[start]`` must begin a record.
    """
    n = len(data)
    last = -1
    field_start = True
    quoted = False
    p = start
    while p < n:
        c = data[p]
        if quoted:
            if c == quote:
                if p + 1 < n and data[p + 1] == quote:
                    p += 1
                else:
                    quoted = False
            field_start = False
        elif c == 10:  # '\n'
            last = p + 1
            field_start = True
        elif field_start and c == quote:
            quoted = True
            field_start = False
        else:
            field_start = c == delimiter
        p += 1
    return last


@njit(**_JIT)
def csv_record_lines(data, delimiter, quote):
    """0-based line (count of newlines before it) on which each record of ``data`` starts,
    following the same quoting rules as ``csv_record_end``; ``data`` holds whole records."""
    n = len(data)
    count = 0
    for p in range(n):
        if data[p] == 10:
            count += 1
    lines = np.empty(count + 1, np.int64)
    records = 0
    line = 0
    field_start = True
    quoted = False
    record_open = False
    p = 0
    while p < n:
        c = data[p]
        if not record_open:
            lines[records] = line
            records += 1
            record_open = True
        if quoted:
            if c == quote:
                if p + 1 < n and data[p + 1] == quote:
                    p += 1
                else:
                    quoted = False
            elif c == 10:
                line += 1
            field_start = False
        elif c == 10:
            line += 1
            record_open = False
            field_start = True
        elif field_start and c == quote:
            quoted = True
            field_start = False
        else:
            field_start = c == delimiter
        p += 1
    return lines[:records]


@njit(**_JIT)
def parse_plain_csv(data, n_fields, user_field, item_field, value_field, delimiter):
    """A chunk of whole records read straight from its bytes, when it is plain: no quote or
    carriage return anywhere, every record ``n_fields`` fields, ids canonical integers of at
    most 18 digits, values (``value_field`` >= 0) digits only (at most 15, so exact in float64).
    Returns (users, items, values float64, ok); not ok means the chunk is not plain (the caller
    parses it the careful way, which names any problem; a longer id also goes that way) and the
    arrays are not to be used. Each field's digits are read as it is scanned: one pass."""
    n = 0
    for p in range(len(data)):
        if data[p] == 10:
            n += 1
    users = np.empty(n, np.int64)
    items = np.empty(n, np.int64)
    values = np.ones(n, np.float64)
    p = 0
    end = len(data)
    last = n_fields - 1
    for r in range(n):
        for field in range(n_fields):
            if field == user_field or field == item_field:
                negative = False
                if p < end and data[p] == 45:  # '-'
                    negative = True
                    p += 1
                first = p
                acc = 0
                while p < end:
                    d = np.int64(data[p]) - 48
                    if d < 0 or d > 9:
                        break
                    acc = acc * 10 + d
                    p += 1
                digits = p - first
                if digits == 0 or digits > 18 or (data[first] == 48 and (digits > 1 or negative)):
                    return users, items, values, False
                if field == user_field:
                    users[r] = -acc if negative else acc
                else:
                    items[r] = -acc if negative else acc
            elif field == value_field:
                first = p
                acc = 0
                while p < end:
                    d = np.int64(data[p]) - 48
                    if d < 0 or d > 9:
                        break
                    acc = acc * 10 + d
                    p += 1
                if p == first or p - first > 15:
                    return users, items, values, False
                values[r] = np.float64(acc)
            else:  # a field not read: anything but a quote or a carriage return
                while p < end:
                    c = data[p]
                    if c == delimiter or c == 10:
                        break
                    if c == 34 or c == 13:
                        return users, items, values, False
                    p += 1
            c = data[p] if p < end else 10
            if c != (10 if field == last else delimiter):
                return users, items, values, False
            p += 1
    return users, items, values, p >= end
