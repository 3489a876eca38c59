"""The one door for writing: every command that writes a store or a file goes through here.

A writer says what it writes, and this module makes it safe::

    with output_store("top10.zarr", RECOMMENDATIONS_KIND, version=2, overwrite=overwrite,
                      inputs=[model_location]) as out:
        create_array(out.group, "scores", ...)      # out.group: an empty Zarr group, built beside
        ...                                         # spill files, if any, go in out.workspace()
    # here the new store is verified, marked complete and swapped in; the lock is released

The life of an output:

1. check the target: absent, an empty directory, or a wals-ooc store of the expected kind
   (with ``overwrite``, or ``resume`` to update it in place). A file, a non-empty directory that
   is not a store, a store of another kind, or one of the command's inputs is refused, whatever
   the flags; nothing has been written yet;
2. lock it: ``.NAME.wals-ooc-lock`` beside the target names the writer (host, pid, start time,
   command). A second writer gets ``StoreLockedError`` naming the holder; the lock of a writer
   that died on this host is broken with a ``StaleLockWarning``. Holding the lock, leftovers of
   killed writers of this target are removed (and a swap cut short is completed or undone);
3. build: into ``.NAME.wals-ooc-build-TOKEN`` beside the target on a local disk, or into the
   generation ``NAME/gen-TOKEN`` on an object store. Spill files go in one workspace per run,
   ``.wals-ooc-tmp-TOKEN`` (TOKEN names host, pid and start time, so a later run removes the
   workspace of a killed one);
4. verify (the kind is right and every array's chunks carry a crc32c checksum), set
   ``complete``, and swap in:

   - local disk: ``renameat2(RENAME_EXCHANGE)`` swaps the new directory and the old one in one
     atomic step, then the old one is deleted (without it: the old one is renamed aside, the new
     one renamed in, and a run killed between the two renames is repaired by the next writer);
   - object store (S3, GCS, memory://): the target's root ``zarr.json`` is a pointer naming the
     current generation (``wals_ooc_generation``). Readers follow it (``format.open_group``).
     A new generation is written beside the current one, which stays readable all along; one
     PUT of the root ``zarr.json`` then switches readers to the new generation, and only after
     that is the old generation deleted. A run that dies before the switch leaves the old store
     as it was (its unfinished generation is deleted by the next writer); one that dies after
     it leaves the new store complete (its old generation is deleted by the next writer);
5. on any failure (an exception, KeyboardInterrupt, a full disk) the build and the workspace are
   removed, the old store is untouched, and ``OSError`` becomes ``StorageError`` naming the
   target. After kill -9 the next writer cleans up (step 2).

A model being trained is the one store updated in place (``resume=True``; its checkpoints make
that safe), and a new model becomes visible as soon as its skeleton is built (``publish``) so a
killed training run can be resumed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import zarr

from ..errors import PathError, StaleLockWarning, StorageError, StoreLockedError, WalsError
from .format import GENERATION_ATTR, KIND_PREFIX, as_int, credentials_problem, has_checksum, is_local, local_path, open_group, subgroup

OVERWRITE_FLAG = {"overwrite=True": "--overwrite"}
MARKER = "_wals_ooc.json"  # the kind and completeness of a directory of files (Parquet output)
LOCK_SUFFIX = ".wals-ooc-lock"
BUILD_TAG = ".wals-ooc-build-"
OLD_TAG = ".wals-ooc-old-"
TMP_PREFIX = ".wals-ooc-tmp-"
GENERATION_PREFIX = "gen-"


# ---------------------------------------------------------------------------------------------
# Who is writing: host, pid and process start time, in lock files and in temporary names
# ---------------------------------------------------------------------------------------------


def _host_tag(host: str | None = None) -> str:
    return hashlib.sha1((host or socket.gethostname()).encode()).hexdigest()[:8]


def _started(pid: int) -> int | None:
    import psutil  # only writers need it: reading commands start without it

    try:
        return int(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def owner_token() -> str:
    """``HOSTTAG-PID-STARTED-RANDOM``: names a temporary location after the process making it."""
    pid = os.getpid()
    return f"{_host_tag()}-{pid}-{_started(pid)}-{secrets.token_hex(3)}"


def _owner_dead(token: str) -> bool:
    """True when the token names a process of this host that is no longer running."""
    parts = token.split("-")
    if len(parts) < 3 or parts[0] != _host_tag():
        return False  # another host (or not ours): we cannot tell, so keep it
    try:
        pid, started = int(parts[1]), int(parts[2])
    except ValueError:
        return False
    return _started(pid) != started


def _holder_record(target: str) -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(), "pid": pid, "started": _started(pid),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300], "target": target,
    }


def _holder_alive(record: dict) -> bool | None:
    """True/False for a holder on this host; None when it ran elsewhere (cannot be checked)."""
    if record.get("host") != socket.gethostname():
        return None
    try:
        return _started(int(record["pid"])) == record.get("started")
    except (KeyError, TypeError, ValueError):
        return None


def _describe_holder(record: dict) -> str:
    if not record:
        return "another process (starting up)"
    return (f"process {record.get('pid')} on {record.get('host')} since {record.get('since')} "
            f"({record.get('command') or 'unknown command'})")


# ---------------------------------------------------------------------------------------------
# Where a target lives: a local directory tree (os calls) or an fsspec file system
# ---------------------------------------------------------------------------------------------


class _Place:
    """A target location: its text as given, its path, its parent, and the file operations the
    door needs, on a local disk (``local``: swaps by rename) or an object store (pointer swaps)."""

    def __init__(self, text: str, storage_options: dict | None):
        self.text = text
        self.storage_options = storage_options
        self.protocol = None if is_local(text) else text.split("://", 1)[0]
        self.fs: Any = None  # an fsspec file system, None for a plain local path (os calls)
        if self.protocol is None:
            path = local_path(text)
            self.path = os.path.realpath(path) if os.path.islink(path) else path
            self.local = True
        else:
            import fsspec
            from fsspec.implementations.local import LocalFileSystem

            self.fs, self.path = fsspec.core.url_to_fs(text, **(storage_options or {}))
            self.path = self.path.rstrip("/") or self.path
            self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            self.parent, self.name = os.path.split(self.path)
        else:
            self.parent, self.name = self.remote()._parent(self.path), self.path.rsplit("/", 1)[-1]
        if not self.name:
            raise PathError(f"{text!r} is not a path a store can be written to")

    def remote(self) -> Any:
        """The fsspec file system of a place that is not local (object stores: pointer swaps)."""
        assert self.fs is not None, f"{self.text} is a local path: it has no fsspec file system"
        return self.fs

    # -- naming ---------------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        return os.path.join(*parts) if self.local else "/".join(p.rstrip("/") for p in parts)

    def url(self, path: str) -> str:
        """The location string (for ``open_group``) of a path in this place's file system."""
        return path if self.protocol is None else f"{self.protocol}://{path}"

    def key(self) -> str:
        """A normalized identity, to compare targets with inputs."""
        if self.local:
            return os.path.realpath(self.path)
        protocol = self.remote().protocol
        return f"{protocol if isinstance(protocol, str) else protocol[0]}://{self.path}"

    # -- file operations ------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        if self.fs is None:
            return os.path.lexists(path)
        self.fs.invalidate_cache(path)  # object store listings are cached: ask afresh
        return self.fs.exists(path)

    def isdir(self, path: str) -> bool:
        if self.fs is None:
            return os.path.isdir(path)
        self.fs.invalidate_cache(path)
        return self.fs.isdir(path)

    def isfile(self, path: str) -> bool:
        if self.fs is None:
            return os.path.lexists(path) and not os.path.isdir(path)
        self.fs.invalidate_cache(path)
        return self.fs.isfile(path)

    def listdir(self, path: str) -> list[str]:
        if self.fs is None:
            try:
                return os.listdir(path)
            except (FileNotFoundError, NotADirectoryError):
                return []
        self.fs.invalidate_cache(path)
        try:
            return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(path, detail=False)
                    if entry.rstrip("/") != path.rstrip("/")]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read_json(self, path: str) -> dict | None:
        try:
            if self.fs is None:
                with open(path, "rb") as handle:
                    raw = handle.read()
            else:
                raw = self.fs.cat_file(path)
            data = json.loads(raw)
            return data if isinstance(data, dict) else None
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
            return None

    def write_json(self, path: str, data: dict) -> None:
        """Write a small JSON file in one step (local: temp file + rename; object store: one PUT)."""
        raw = json.dumps(data, indent=2).encode()
        if self.fs is None:
            temp = f"{path}.{secrets.token_hex(4)}.partial"
            with open(temp, "wb") as handle:
                handle.write(raw)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        else:
            self.fs.pipe_file(path, raw)

    def remove(self, path: str) -> None:
        """Delete a file or a directory tree; missing is fine."""
        if self.fs is None:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=False, onerror=_ignore_missing)
            elif os.path.lexists(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            return
        self.fs.invalidate_cache(path)
        with contextlib.suppress(FileNotFoundError):
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
            elif self.fs.exists(path):
                self.fs.rm(path)
        self.fs.invalidate_cache(path)

    def rename(self, source: str, dest: str) -> None:
        if self.fs is None:
            os.rename(source, dest)
        else:
            self.fs.mv(source, dest, recursive=True)

    def exchange(self, a: str, b: str) -> bool:
        """Swap two local directories in one atomic step; False where the system cannot."""
        if self.fs is None or self.local:
            return _rename_exchange(a, b)
        return False


def _ignore_missing(function, path, exc_info):
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: set False to use the two-rename swap (tests exercise both)
USE_RENAME_EXCHANGE = True


def _rename_exchange(a: str, b: str) -> bool:
    if not USE_RENAME_EXCHANGE or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP if hasattr(errno, "ENOTSUP") else errno.EINVAL):
        return False
    raise OSError(code, os.strerror(code), b)


# ---------------------------------------------------------------------------------------------
# What is at a target
# ---------------------------------------------------------------------------------------------


@dataclass
class TargetState:
    """What a path holds: ``absent``, ``empty`` (an empty directory), ``file``, ``other`` (a
    non-empty directory that is not a wals-ooc store), or ``store`` (with its kind and attrs)."""

    what: str
    kind: str | None = None
    attrs: dict = field(default_factory=dict)
    generation: str | None = None  # a pointer store's current generation


def _inspect(place: _Place, path: str | None = None) -> TargetState:
    path = path or place.path
    if not place.exists(path) and not place.listdir(path):
        return TargetState("absent")
    if place.isfile(path):
        return TargetState("file")
    entries = place.listdir(path)
    if not entries:
        return TargetState("empty")
    for name in ("zarr.json", MARKER):
        if name in entries:
            meta = place.read_json(place.join(path, name)) or {}
            attrs = meta.get("attributes", meta) if name == "zarr.json" else meta
            kind = attrs.get("kind") if isinstance(attrs, dict) else None
            if isinstance(kind, str) and kind.startswith(KIND_PREFIX):
                return TargetState("store", kind, dict(attrs), attrs.get(GENERATION_ATTR))
            return TargetState("other")
    if not place.local and all(e.startswith(GENERATION_PREFIX) for e in entries):
        return TargetState("absent")  # only unfinished generations of killed writers: garbage
    return TargetState("other")


def _enclosing_store(place: _Place) -> str | None:
    """The nearest directory above the target that is a Zarr store or group, if any."""
    parent = place.parent
    for _ in range(64):
        if not parent or (place.local and parent == os.path.dirname(parent)):
            return None
        if place.exists(place.join(parent, "zarr.json")):
            return place.url(parent)
        up = os.path.dirname(parent) if place.local else place.remote()._parent(parent)
        if up == parent:
            return None
        parent = up
    return None


def inspect_target(location: str | os.PathLike, storage_options: dict | None = None) -> TargetState:
    """What is at a location (see ``TargetState``), without writing anything."""
    return _inspect(_Place(os.fspath(location), storage_options))


# ---------------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------------


class _Lock:
    """``.NAME.wals-ooc-lock`` beside a target, naming its writer.

    Local disks: the file is held with ``flock`` (the kernel lets go when the holder dies, even
    by kill -9); a file left by a dead holder of this host is broken with a warning. Object
    stores: created with a conditional PUT (``If-None-Match``) where the store has it; a lock
    of a dead holder of this host is broken with a warning; a holder on another host is never
    presumed dead.
    """

    def __init__(self, place: _Place):
        self.place = place
        self.path = place.join(place.parent, f".{place.name}{LOCK_SUFFIX}")
        self.shown = place.url(self.path)  # as the user would name it
        self.fd: int | None = None
        self.held = False

    def _locked(self, record: dict, manual: bool) -> StoreLockedError:
        hint = f"; if it is gone, delete {self.shown}" if manual else ""
        return StoreLockedError(f"{self.place.text} is being written by {_describe_holder(record)}: wait for it "
                                f"to finish{hint}")

    def _warn_stale(self, record: dict) -> None:
        warnings.warn(StaleLockWarning(
            f"{self.place.text}: breaking the lock of {_describe_holder(record)}, which is no longer running"
        ), stacklevel=4)

    def acquire(self) -> None:
        if self.place.fs is None:
            self._acquire_local()
        else:
            self._acquire_fs()
        self.held = True

    def _acquire_local(self) -> None:
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _parse(os.pread(fd, 1 << 16, 0))
                os.close(fd)
                raise self._locked(record, manual=False) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released (unlinked) between our open and our flock: try again
                os.close(fd)
                continue
            record = _parse(os.pread(fd, 1 << 16, 0))
            if record:  # left by a holder that died: the kernel released its flock
                if _holder_alive(record) is None:  # written on another host (a shared disk)
                    os.close(fd)
                    raise self._locked(record, manual=True)
                self._warn_stale(record)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder_record(self.place.text)).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return
        raise StoreLockedError(f"{self.place.text}: could not take the lock {self.shown}")

    def _acquire_fs(self) -> None:
        fs = self.place.remote()
        mine = _holder_record(self.place.text)
        mine["token"] = secrets.token_hex(8)
        raw = json.dumps(mine).encode()
        for _ in range(20):
            fs.invalidate_cache(self.path)
            try:
                fs.pipe_file(self.path, raw, mode="create")
            except (FileExistsError, OSError) as exc:
                record = self.place.read_json(self.path)
                if record is None and not isinstance(exc, FileExistsError) and not fs.exists(self.path):
                    raise
                record = record or {}
                if _holder_alive(record) is False:
                    self._warn_stale(record)
                    self.place.remove(self.path)
                    continue
                raise self._locked(record, manual=True) from None
            if self.place.read_json(self.path) == mine:
                return
            raise self._locked(self.place.read_json(self.path) or {}, manual=True)
        raise StoreLockedError(f"{self.place.text}: could not take the lock {self.shown}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)  # drops the flock
            self.fd = None
        else:
            with contextlib.suppress(Exception):
                self.place.remove(self.path)


def _parse(raw: bytes) -> dict:
    try:
        data = json.loads(raw.decode() or "{}")
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


# ---------------------------------------------------------------------------------------------
# Leftovers of killed runs
# ---------------------------------------------------------------------------------------------


_TOKEN = re.compile(r"^[0-9a-f]{8}-\d+-(?:\d+|None)-[0-9a-f]{6}$")


def _split_leftover(name: str) -> tuple[str, str, str] | None:
    """``.TARGET<tag>TOKEN`` -> (TARGET, tag, TOKEN) for a build or an old store set aside."""
    if not name.startswith("."):
        return None
    for tag in (BUILD_TAG, OLD_TAG):
        at = name.rfind(tag)
        if at > 1 and _TOKEN.match(name[at + len(tag):]):
            return name[1:at], tag, name[at + len(tag):]
    return None


def sweep_workspaces(directory: str) -> int:
    """Remove the spill workspaces (``.wals-ooc-tmp-TOKEN``) of dead processes of this host."""
    removed = 0
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if name.startswith(TMP_PREFIX) and _owner_dead(name[len(TMP_PREFIX):]):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
                removed += 1
    return removed


def _recover(place: _Place) -> None:
    """With the target's lock held: remove what killed writers of it left, and finish or undo a
    swap that was cut short. No other writer of it is alive, so all of it is garbage."""
    if place.local:
        for name in place.listdir(place.parent):
            leftover = _split_leftover(name)
            if leftover is None or leftover[0] != place.name:
                continue
            path = place.join(place.parent, name)
            if leftover[1] == OLD_TAG and not place.exists(place.path):
                place.rename(path, place.path)  # killed between the two renames of a swap: undo
                warnings.warn(StaleLockWarning(f"{place.text}: restored the store an interrupted run had moved aside"),
                              stacklevel=4)
            else:
                place.remove(path)
        return
    state = _inspect(place)
    for name in place.listdir(place.path):
        if name.startswith(GENERATION_PREFIX) and name != state.generation:
            place.remove(place.join(place.path, name))


def _sweep_other_targets(place: _Place) -> None:
    """Leftovers of killed writers of *other* targets in the same local directory: each is
    cleaned under that target's lock (skipped while a live writer holds it)."""
    if not place.local:
        return
    names = set()
    for name in place.listdir(place.parent):
        leftover = _split_leftover(name)
        if leftover is not None and _owner_dead(leftover[2]):
            names.add(leftover[0])
    names.discard(place.name)
    for other in sorted(names):
        other_place = _Place(place.url(place.join(place.parent, other)), place.storage_options)
        lock = _Lock(other_place)
        try:
            lock.acquire()
        except (StoreLockedError, OSError):
            continue
        try:
            _recover(other_place)
        except OSError:  # best effort on a store that is not this run's target: it is tried again next time
            continue
        finally:
            lock.release()


# ---------------------------------------------------------------------------------------------
# Outputs and the transaction that writes them
# ---------------------------------------------------------------------------------------------


class Output:
    """One store (or directory of files) being written: where to write now, and its state.

    location: where the writer writes (a fresh build location beside the target; the target
    itself when updating in place or after ``publish``). group: the Zarr group there.
    existing: the target held a store of this kind before (``mode`` "update" or "replace").
    """

    def __init__(self, tx: Transaction, place: _Place, kind: str, version: int, *, overwrite: bool, resume: bool,
                 layout: str, verify: Callable[[Output], None] | None, tmp_dir: str | None):
        self.tx, self.place, self.kind, self.version = tx, place, kind, version
        self.target = place.text
        self.layout = layout
        self.overwrite, self.resume = overwrite, resume
        self.verify_hook = verify
        self.tmp_dir = tmp_dir
        self.storage_options = place.storage_options
        self.lock = _Lock(place)
        self.mode = "create"
        self.existing: TargetState | None = None
        self.build_path: str | None = None
        self.location = place.text
        self.published = False
        self.provisional = False  # published, but removed again if the run fails (see publish)
        self._was_empty_dir = False
        self._group: zarr.Group | None = None
        self._created_dirs: list[str] = []

    # -- for writers ----------------------------------------------------------------------------
    @property
    def group(self) -> zarr.Group:
        """The Zarr group being written (created empty, with kind and format_version set)."""
        if self.layout != "zarr":
            raise TypeError(f"{self.target} is a directory of files, not a Zarr group")
        if self._group is None:
            self._group = open_group(self.location, "r+", self.storage_options)
        return self._group

    def workspace(self) -> str:
        """A local directory for this run's temporary files, removed however the run ends."""
        return self.tx.workspace(self)

    def publish(self, provisional: bool = False) -> str:
        """Make a new store visible at the target now (it must open as a store of its kind in
        an unfinished state); the rest of the block then updates it in place. For a new model
        store, so that a killed training run can be resumed. Returns the new ``location``.

        provisional: until ``keep()`` is called, a failure of the run (an exception: a setting,
        damaged input, a full disk) removes the store again, as if it had never been made; only a
        run killed outright leaves it, to be resumed."""
        if self.mode != "create" or self.published:
            raise RuntimeError(f"publish() is for a new store, and once ({self.target} is in mode {self.mode})")
        self._check_checksums()
        self._was_empty_dir = self.place.local and self.place.isdir(self.place.path)
        self._swap_in()
        self.published = True
        self.provisional = provisional
        self.location = self.place.text
        self._group = None
        return self.location

    def keep(self) -> None:
        """A provisionally published store now holds work worth keeping if the run fails."""
        self.provisional = False

    # -- the life cycle ---------------------------------------------------------------------------
    def _refuse(self, state: TargetState) -> None:
        text = self.target
        if state.what == "file":
            raise PathError(f"{text} is a file, not a wals-ooc store: refusing to write over it (nothing was changed)")
        if state.what == "other":
            raise PathError(f"{text} is a directory that is not a wals-ooc store and is not empty: refusing to "
                            "write into it (nothing was changed); choose a new path")
        if state.what == "store" and state.kind != self.kind:
            raise PathError(f"{text} is a {state.kind} store, not a {self.kind} store: refusing to replace it "
                            "(nothing was changed)")
        if state.what == "store" and not (self.overwrite or self.resume):
            raise PathError(f"{text} already exists (a {self.kind} store); pass overwrite=True to replace it",
                            flags=OVERWRITE_FLAG)

    def _check(self) -> TargetState:
        if self.layout == "files" and not self.place.local:
            raise PathError(f"{self.target}: a directory of files can only be written to a local disk; "
                            "write a Zarr store to an object store")
        outer = _enclosing_store(self.place)
        if outer is not None:
            raise PathError(f"{self.target} is inside the wals-ooc store {outer}: refusing to write into it "
                            "(nothing was changed); choose a path outside it")
        state = _inspect(self.place)
        self._refuse(state)
        return state

    def _prepare(self) -> None:
        self._check()
        if self.place.local and not os.path.isdir(self.place.parent):
            self._make_parents(self.place.parent)
        self.lock.acquire()
        _recover(self.place)
        state = self._check()  # again, under the lock
        if state.what == "store":
            self.existing = state
            self.mode = "update" if self.resume else "replace"
        if self.mode == "update":
            self.location = self.place.text
            return
        token = owner_token()
        if self.place.local:
            self.build_path = self.place.join(self.place.parent, f".{self.place.name}{BUILD_TAG}{token}")
        else:
            self.build_path = self.place.join(self.place.path, f"{GENERATION_PREFIX}{token}")
        self.location = self.place.url(self.build_path)
        if self.layout == "zarr":
            self._group = open_group(self.location, "w", self.storage_options)
            self._group.attrs.update({"kind": self.kind, "format_version": self.version, "complete": False})
        else:
            os.makedirs(self.build_path)

    def _make_parents(self, directory: str) -> None:
        missing = []
        while directory and not os.path.isdir(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        for path in reversed(missing):
            os.mkdir(path)
            self._created_dirs.append(path)

    def _check_checksums(self) -> None:
        if self.layout != "zarr":
            return
        group = open_group(self.location, "r", self.storage_options)
        if group.attrs.get("kind") != self.kind:
            raise RuntimeError(f"{self.location}: built as {group.attrs.get('kind')!r}, expected {self.kind!r}")
        for name, node in group.members(max_depth=None):
            if isinstance(node, zarr.Array) and not has_checksum(node):
                raise RuntimeError(f"{self.target}: array {name} was created without a checksum "
                                   "(use wals_ooc.store.format.create_array)")

    def _finish(self) -> None:
        """Verify and mark complete (before any output of the transaction is swapped in)."""
        if self.mode == "update" or self.published:
            return
        self._check_checksums()
        if self.verify_hook is not None:
            self.verify_hook(self)
        if self.layout == "zarr":
            open_group(self.location, "r+", self.storage_options).attrs["complete"] = True
        else:
            self.place.write_json(self.place.join(self._build(), MARKER),
                                  {"kind": self.kind, "format_version": self.version, "complete": True})

    def _build(self) -> str:
        """Where a new store is built (set when the output is opened in a mode that builds one)."""
        assert self.build_path is not None, f"{self.target}: no store is being built (updated in place, or swapped in)"
        return self.build_path

    def _swap_in(self) -> None:
        place, build, target = self.place, self._build(), self.place.path
        if not place.local:  # object store: switch the root pointer, then drop the old generation
            generation = build.rsplit("/", 1)[-1]
            place.write_json(place.join(target, "zarr.json"), {
                "zarr_format": 3, "node_type": "group",
                "attributes": {"kind": self.kind, GENERATION_ATTR: generation},
            })
            for name in place.listdir(target):
                if name not in ("zarr.json", generation):
                    place.remove(place.join(target, name))
            return
        if not place.exists(target) or (place.isdir(target) and not place.listdir(target)):
            if place.exists(target):
                os.rmdir(target)
            place.rename(build, target)
        elif place.exchange(build, target):
            place.remove(build)  # now the old store
        else:
            aside = place.join(place.parent, f".{place.name}{OLD_TAG}{owner_token()}")
            place.rename(target, aside)
            place.rename(build, target)
            place.remove(aside)
        self.build_path = None

    def _abort(self, discard: bool = True) -> None:
        if self.published and self.provisional and discard:  # made by this run, nothing in it worth keeping
            with contextlib.suppress(Exception):
                self.place.remove(self.place.path)
                if self._was_empty_dir:
                    os.mkdir(self.place.path)
            self.published = self.provisional = False
            return
        if self.build_path is not None and not self.published:
            with contextlib.suppress(Exception):
                self.place.remove(self.build_path)
        if self.build_path is not None and not self.place.local and self.existing is None and not self.published:
            with contextlib.suppress(Exception):
                if not self.place.listdir(self.place.path):
                    self.place.remove(self.place.path)

    def _remove_created_dirs(self) -> None:
        """After a failure, once the lock and workspace are gone: the parents this run made."""
        for path in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                os.rmdir(path)


class Transaction:
    """Several outputs written together: all are built, then all verified, then all swapped in;
    if anything fails, none is. ``output_store`` is a transaction of one."""

    def __init__(self):
        self.outputs: list[Output] = []
        self.workspaces: list[str] = []

    def output(self, target: str | os.PathLike, kind: str, *, version: int, overwrite: bool = False,
               resume: bool = False, inputs: Sequence[str | os.PathLike] = (), storage_options: dict | None = None,
               layout: str = "zarr", verify: Callable[[Output], None] | None = None,
               tmp_dir: str | None = None) -> Output:
        """Check, lock and start building ``target``; see ``output_store`` for the arguments."""
        place = _Place(os.fspath(target), storage_options)
        _check_inputs(place, inputs, storage_options, [o.place for o in self.outputs])
        out = Output(self, place, kind, version, overwrite=overwrite, resume=resume, layout=layout, verify=verify,
                     tmp_dir=tmp_dir)
        self.outputs.append(out)
        out._prepare()
        if place.local:
            _sweep_other_targets(place)
        return out

    def workspace(self, out: Output) -> str:
        parent = out.tmp_dir or (out.place.parent if out.place.local else tempfile.gettempdir())
        os.makedirs(parent, exist_ok=True)
        sweep_workspaces(parent)
        path = os.path.join(parent, f"{TMP_PREFIX}{owner_token()}")
        os.mkdir(path)
        self.workspaces.append(path)
        return path

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        failed = True
        try:
            if exc is None:
                try:
                    for out in self.outputs:
                        out._finish()
                    for out in self.outputs:
                        if out.mode != "update" and not out.published:
                            out._swap_in()
                except BaseException as failure:
                    self._abort(failure)
                    _raise_as_wals(failure, self.outputs)
                failed = False
                return False
            self._abort(exc)
            _raise_as_wals(exc, self.outputs)
            return False
        finally:
            for path in self.workspaces:
                shutil.rmtree(path, ignore_errors=True)
            for out in self.outputs:
                with contextlib.suppress(Exception):
                    out.lock.release()
                if failed:
                    out._remove_created_dirs()

    def _abort(self, exc: BaseException) -> None:
        for out in self.outputs:  # an interrupted run (Ctrl-C) keeps what it published, as a killed one
            out._abort(discard=isinstance(exc, Exception))


def _raise_as_wals(exc: BaseException, outputs: list[Output]):
    """Re-raise ``exc``; an OSError becomes a StorageError naming the target(s), missing
    credentials of an object store a PathError naming it."""
    if isinstance(exc, Exception) and outputs:
        problem = credentials_problem(exc, outputs[0].target)
        if problem is not None:
            raise problem from exc
    if isinstance(exc, WalsError) or not isinstance(exc, OSError):
        raise exc
    filename = exc.filename if isinstance(exc.filename, str) else None
    names = [o.target for o in outputs] or ["the output"]
    for out in outputs:  # name the output whose build failed, if the error says
        if filename and out.build_path and filename.startswith(str(out.build_path)):
            names = [out.target]
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({filename})" if filename and not any(o.build_path and filename.startswith(str(o.build_path))
                                                       for o in outputs) else ""
    kept = all(o.mode != "update" and not o.published for o in outputs)
    after = "nothing was changed" if kept else "its last checkpoint is kept"
    raise StorageError(f"{' and '.join(names)} {'was' if len(names) == 1 else 'were'} not written: {reason}{where}; {after}", path=names[0],
                       errno=exc.errno, filename=filename) from exc


def _check_inputs(place: _Place, inputs: Sequence, storage_options: dict | None, others: list[_Place]) -> None:
    """Refuse an output that is (or contains, or lies inside) an input or another output."""
    mine = place.key()
    for raw in inputs:
        if raw is None:
            continue
        theirs = _Place(os.fspath(raw), storage_options).key()
        if mine == theirs or theirs.startswith(mine.rstrip("/") + "/") or mine.startswith(theirs.rstrip("/") + "/"):
            raise PathError(f"{place.text} would overwrite the input {os.fspath(raw)}: write the output to another "
                            "path (nothing was changed)")
    for other in others:
        if other.key() == mine:
            raise PathError(f"{place.text} is given as two outputs: give each output its own path")


@contextlib.contextmanager
def output_store(
    target: str | os.PathLike,
    kind: str,
    *,
    version: int,
    overwrite: bool = False,
    resume: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    storage_options: dict | None = None,
    layout: str = "zarr",
    verify: Callable[[Output], None] | None = None,
    tmp_dir: str | None = None,
) -> Iterator[Output]:
    """Write one store safely (see the module docstring); yields an ``Output``.

    kind, version: the ``kind`` and ``format_version`` attributes of the store. overwrite:
    replace an existing store of this kind (built beside, swapped in when complete). resume:
    update an existing store of this kind in place (the writer keeps it consistent), or create
    it. inputs: locations the command reads, which the output may not be. layout: "zarr" (a
    Zarr group, ``out.group``) or "files" (a local directory of files at ``out.location``, with
    a ``_wals_ooc.json`` marker written at the end). verify(out): extra checks before the swap.
    tmp_dir: where ``out.workspace()`` goes (default: beside the target, or the system's).
    """
    with Transaction() as tx:
        yield tx.output(target, kind, version=version, overwrite=overwrite, resume=resume, inputs=inputs,
                        storage_options=storage_options, layout=layout, verify=verify, tmp_dir=tmp_dir)


@contextlib.contextmanager
def output_file(target: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = (),
                owned: Callable[[str], bool] | None = None, what: str = "a wals-ooc output") -> Iterator[str]:
    """Write one local file safely: yields a temporary path beside ``target``, renamed onto it
    when the block succeeds (removed if it fails). An existing file is replaced only with
    ``overwrite``, and, when ``owned`` is given, only if ``owned(path)`` says it is ``what`` this
    writer makes (a file of the user's is never replaced, whatever the flags); a directory never is."""
    text = os.fspath(target)
    if not is_local(text):
        raise PathError(f"{text}: files are written to a local disk only")
    place = _Place(text, None)
    _check_inputs(place, inputs, None, [])
    state = "absent" if not os.path.lexists(place.path) else ("dir" if os.path.isdir(place.path) else "file")
    if state == "dir":
        raise PathError(f"{text} is a directory: refusing to write a file over it (nothing was changed)")
    if state == "file" and not overwrite:
        raise PathError(f"{text} already exists; pass overwrite=True to replace it", flags=OVERWRITE_FLAG)
    if state == "file" and owned is not None and not _owned_file(place.path, owned):
        raise PathError(f"{text} is not {what}: refusing to replace it, even with overwrite=True (nothing was "
                        "changed); choose another path", flags=OVERWRITE_FLAG)
    created: list[str] = []
    parent = place.parent
    while parent and not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    lock = _Lock(place)
    temp = None
    try:
        for path in reversed(created):
            os.mkdir(path)
        lock.acquire()
        _recover(place)
        temp = os.path.join(place.parent, f".{place.name}{BUILD_TAG}{owner_token()}")
        yield temp
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, place.path)
        temp = None
    except BaseException as exc:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        for path in created:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        if isinstance(exc, OSError) and not isinstance(exc, WalsError):
            raise StorageError(f"{text} was not written: {exc.strerror or exc}; nothing was changed", path=text,
                               errno=exc.errno, filename=exc.filename) from exc
        raise
    finally:
        lock.release()


def _owned_file(path: str, owned: Callable[[str], bool]) -> bool:
    """``owned(path)``, a file that cannot be read counting as not ours."""
    try:
        return bool(owned(path))
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def replace_node(target: str | os.PathLike, kinds: Sequence[str], parents: Sequence[str], attr: str, *,
                 storage_options: dict | None = None, inputs: Sequence[str | os.PathLike] = ()
                 ) -> Iterator[list[zarr.Group]]:
    """Add or replace optional parts of an existing, finished store, switching to them at the end.

    For what is added to a store after it was written (display names). Yields, for each group
    path in ``parents`` inside ``target`` (a store of one of ``kinds``), a new empty child group
    ``ATTR-TOKEN``, all under the target's lock. When the block succeeds the new children's arrays
    are checked for checksums, and then each parent's attribute ``attr`` is set to its new child's
    name: one write of the parent's ``zarr.json`` each (atomic on a local disk and on an object
    store), so a reader sees a part old or new, never half written. The old children are deleted
    after the switch. On any failure before it the new children are removed and the store is
    exactly as it was; children left by killed runs are removed by the next writer. The store's
    data and identity (``store_id``) do not change, so models bound to it stay bound.
    """
    from .format import check_complete

    place = _Place(os.fspath(target), storage_options)
    _check_inputs(place, inputs, storage_options, [])
    state = _inspect(place)
    if state.what != "store":
        from .sniff import not_a_store

        raise not_a_store(place.text)
    if state.kind not in kinds:
        raise PathError(f"{place.text} is a {state.kind} store, not a {' or '.join(kinds)} store (nothing was changed)")
    lock = _Lock(place)
    lock.acquire()
    made: list[tuple[zarr.Group, str, str | None]] = []  # (parent group, new child, old child)
    switched = False
    try:
        _recover(place)
        root = open_group(place.text, "r+", storage_options)
        check_complete(root, str(root.attrs.get("kind")), place.text, as_int(root.attrs.get("format_version", -1)))
        groups = []
        for parent in parents:
            holder = subgroup(root, parent)
            found = holder.attrs.get(attr)
            current = None if found is None else str(found)
            for name in list(holder.group_keys()):  # parts of killed runs: never switched to
                if name.startswith(f"{attr}-") and name != current:
                    del holder[name]
            child = f"{attr}-{secrets.token_hex(6)}"
            groups.append(holder.create_group(child))
            made.append((holder, child, current))
        yield groups
        for group in groups:
            for name, node in group.members(max_depth=None):
                if isinstance(node, zarr.Array) and not has_checksum(node):
                    raise RuntimeError(f"{place.text}: array {name} was created without a checksum")
        for holder, child, _ in made:
            holder.attrs[attr] = child  # the switch
        switched = True
        for holder, _, current in made:
            if current and current in holder:
                with contextlib.suppress(Exception):  # else removed by the next writer
                    del holder[current]
    except BaseException as exc:
        if not switched:
            for holder, child, _ in made:
                with contextlib.suppress(Exception):
                    if holder.attrs.get(attr) != child:
                        del holder[child]
        if isinstance(exc, OSError) and not isinstance(exc, WalsError):
            raise StorageError(f"{place.text} was not changed: {exc.strerror or exc}", path=place.text,
                               errno=exc.errno, filename=exc.filename if isinstance(exc.filename, str) else None) from exc
        raise
    finally:
        lock.release()


def enclosing_store(location: str | os.PathLike, storage_options: dict | None = None) -> str | None:
    """The nearest wals-ooc (or any Zarr) store above ``location``, if any: a path inside a store is
    no place to write (the door refuses it; callers that make directories check it first)."""
    return _enclosing_store(_Place(os.fspath(location), storage_options))


def remove_store(target: str | os.PathLike, kind: str, *, storage_options: dict | None = None) -> bool:
    """Delete a wals-ooc store of ``kind`` that is ours to drop (a search's trial model), through
    the door: under its lock (a live writer of it makes this fail with ``StoreLockedError``), with
    the leftovers of killed writers of it, and the lock file gone afterwards. Absent is fine
    (returns False); anything else at ``target`` is refused with ``PathError``."""
    place = _Place(os.fspath(target), storage_options)
    lock = _Lock(place)
    with warnings.catch_warnings():  # a dead writer's lock: expected, the store is going anyway
        warnings.simplefilter("ignore", StaleLockWarning)
        lock.acquire()
    try:
        _recover(place)
        state = _inspect(place)
        if state.what == "absent":
            return False
        if state.what == "empty" or (state.what == "store" and state.kind == kind):
            place.remove(place.path)
            return True
        raise PathError(f"{place.text} is not a {kind} store: refusing to delete it (nothing was changed)")
    finally:
        lock.release()


def check_writable_error(exc: OSError, target: str) -> StorageError:
    """An OSError met while writing ``target`` as the StorageError the user sees."""
    return StorageError(f"{target} was not written: {exc.strerror or exc}", path=target, errno=exc.errno,
                        filename=exc.filename if isinstance(exc.filename, str) else None)


__all__ = ["Output", "TargetState", "Transaction", "enclosing_store", "inspect_target", "output_file", "output_store",
           "owner_token", "remove_store", "replace_node", "sweep_workspaces"]
