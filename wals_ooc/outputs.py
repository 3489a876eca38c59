"""Writing an output (recommendations, an index, an export) so that a failed run leaves nothing
behind and an existing output is replaced only by a complete one.

Stand-in for the store lifecycle door (issue 9, ``wals_ooc/store/lifecycle.py``): every output
of ``serve/``, ``index/`` and ``export`` is made through ``building`` below, so switching to that
door is a change here only.

A target must be absent, an empty directory, or an output of the same kind (with
``overwrite``); anything else (a file, another directory, an input of the command) is refused.
The output is built in a hidden sibling directory, marked complete, and renamed into place; on
any failure the sibling is removed and the old output is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from typing import Iterable, Iterator

from .errors import PathError

MARKER = "_wals_ooc.json"  # kind and completeness of a directory of files
OVERWRITE = {"overwrite=True": "--overwrite"}


def is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def output_kind(path: str) -> str | None:
    """The wals-ooc kind of an output directory (a marked directory or a Zarr group), or None."""
    for name in (MARKER, "zarr.json"):
        try:
            with open(os.path.join(path, name)) as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            continue
        kind = data.get("kind") if name == MARKER else data.get("attributes", {}).get("kind")
        if kind:
            return str(kind)
    return None


def check_target(target: str, kind: str, overwrite: bool, inputs: Iterable[str] = ()) -> None:
    """Refuse a target that is not absent, empty, or (with ``overwrite``) an output of ``kind``."""
    real = os.path.realpath(target)
    for source in inputs:
        if source and is_local(str(source)) and os.path.realpath(str(source).removeprefix("file://")) == real:
            raise PathError(f"{target} is an input of this command; write the output elsewhere")
    if not os.path.lexists(target):
        return
    if not os.path.isdir(target):
        raise PathError(f"{target} exists and is a file, not a {kind} output; choose another path")
    if not os.listdir(target):
        return
    found = output_kind(target)
    if found != kind:
        what = f"a {found} store" if found else "a directory that is not a wals-ooc output"
        raise PathError(f"{target} is {what}; refusing to replace it with a {kind} output (choose another path)")
    if not overwrite:
        raise PathError(f"{target} exists; pass overwrite=True to replace it", flags=OVERWRITE)


@contextlib.contextmanager
def building(target: str, kind: str, overwrite: bool = False, inputs: Iterable[str] = (),
             marker: dict | None = None) -> Iterator[str]:
    """Yield a fresh directory to build the output in; on success mark it (``marker`` adds
    fields to its ``_wals_ooc.json``) and swap it in for ``target``.

    Remote targets (s3://...) are written in place (the lifecycle door brings their safe swap).
    """
    target = os.fspath(target)
    if not is_local(target):
        yield target
        return
    target = target.removeprefix("file://").rstrip("/") or target
    check_target(target, kind, overwrite, inputs)
    parent, name = os.path.split(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    build = os.path.join(parent, f".{name}.wals-ooc-build-{os.getpid()}-{secrets.token_hex(3)}")
    os.mkdir(build)
    try:
        yield build
        with open(os.path.join(build, MARKER), "w") as handle:
            json.dump({"kind": kind, "complete": True, **(marker or {})}, handle)
        old = None
        if os.path.lexists(target):
            check_target(target, kind, overwrite, inputs)  # unchanged while we built
            old = os.path.join(parent, f".{name}.wals-ooc-old-{os.getpid()}-{secrets.token_hex(3)}")
            os.rename(target, old)
        os.rename(build, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def read_marker(path: str) -> dict:
    """The ``_wals_ooc.json`` of a finished output directory ({} when absent)."""
    try:
        with open(os.path.join(path, MARKER)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}
