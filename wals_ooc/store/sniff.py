"""What a path that is not a wals-ooc store looks like, to say how to get a store from it.

``wals-ooc train plays.csv`` should not answer with zarr's "No group found": it should say the
path is a CSV file and how to convert it. Only the first bytes of a file are read.
"""

from __future__ import annotations

import os

from ..errors import StoreNotFoundError

_SNIFF_BYTES = 4096
_DELIMITERS = {"\t": "tab-separated", ",": "CSV", ";": "semicolon-separated", "|": "pipe-separated"}


def describe_file(path: str) -> tuple[str, str | None]:
    """(what the file looks like, e.g. "a CSV file"; its field delimiter if it is delimited text)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError:
        return "a file", None
    if head.startswith(b"PAR1"):
        return "a Parquet file", None
    compressed = head.startswith(b"\x1f\x8b")
    if compressed:
        import gzip

        try:
            with gzip.open(path, "rb") as handle:
                head = handle.read(_SNIFF_BYTES)
        except (OSError, EOFError):
            return "a gzip-compressed file", None
    text: str | None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = head.decode("latin-1") if b"\x00" not in head else None
        except UnicodeDecodeError:
            text = None
    if not text:
        return ("a gzip-compressed file" if compressed else "a binary file"), None
    first = text.splitlines()[0] if text.splitlines() else ""
    counts = {d: first.count(d) for d in _DELIMITERS}
    delimiter = max(counts, key=lambda d: counts[d])
    if counts[delimiter] == 0:
        return ("a gzip-compressed text file" if compressed else "a text file"), None
    kind = _DELIMITERS[delimiter]
    return f"a {'gzip-compressed ' if compressed else ''}{kind} file", delimiter


def not_a_store(location: str) -> StoreNotFoundError:
    """The error for a location that holds no wals-ooc store: says what is there instead (a CSV
    or Parquet file: how to convert it; a directory; nothing)."""
    from .format import is_local, local_path

    text = os.fspath(location)
    path = local_path(text) if is_local(text) else None
    if path is None or not os.path.exists(path):
        return StoreNotFoundError(f"{text}: no such store")
    if os.path.isdir(path):
        return StoreNotFoundError(f"{text} is not a wals-ooc store (it is a directory without one)")
    what, delimiter = describe_file(path)
    if delimiter is None and what != "a Parquet file":
        return StoreNotFoundError(f"{text} is not a wals-ooc store (it is {what})")
    api_extra = "" if delimiter in (None, ",") else f", delimiter={delimiter!r}"
    cli_extra = "" if delimiter in (None, ",") else f" --delimiter {delimiter!r}"
    api = f"wals_ooc.convert({text!r}, STORE{api_extra})"
    cli = f"`wals-ooc convert {text} STORE{cli_extra}`"
    return StoreNotFoundError(f"{text} is not a wals-ooc store (it looks like {what}: convert it first with {api})",
                              flags={api: cli})
