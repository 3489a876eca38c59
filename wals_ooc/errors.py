"""The failures a user can cause, one type per kind, each carrying what a person needs to fix it.

The API raises them; the command line prints ``wals-ooc CMD: error: <message>`` on one line and
exits non-zero. Anything else that escapes is a bug in wals-ooc (and shows a traceback).

Messages name API arguments (``overwrite=True``); ``cli_message()`` names the command-line flag
instead (``--overwrite``) where the error knows it.
"""

from __future__ import annotations


class WalsError(Exception):
    """Base of every user-caused failure."""

    #: API argument name -> command-line flag, for ``cli_message``
    flags: dict[str, str] = {}

    def __init__(self, message: str, *, flags: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if flags:
            self.flags = dict(flags)

    def __str__(self) -> str:
        return self.message

    def cli_message(self) -> str:
        """The message with API argument spellings replaced by their command-line flags."""
        text = self.message
        for api, flag in self.flags.items():
            text = text.replace(api, flag)
        return text


class InputError(WalsError, ValueError):
    """Bad input, located: which file, which line (or Parquet row), which field."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str) -> None:
        self.path, self.line, self.field, self.reason = path, line, field, message
        where = path if line is None else f"{path}:{line}"
        what = f" field {field!r}:" if field is not None else ""
        super().__init__(f"{where}:{what} {message}")


class SettingError(WalsError, ValueError):
    """A setting or argument out of its domain (NaN, negative, unknown choice)."""


class MemoryBudgetError(SettingError):
    """The budget cannot hold even the smallest unit of work."""


class PathError(WalsError, ValueError):
    """A path that may not be written or read: not a store, a file, an input used as output."""


class StoreError(WalsError, RuntimeError):
    """A store is missing, incomplete, of another kind or of an unknown format version."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store at a path (nothing there, or nothing wals-ooc can open)."""


class StoreLockedError(StoreError):
    """Another live writer holds the store's lock."""


class CorruptStoreError(StoreError):
    """A store's bytes are damaged (checksum mismatch, indices out of range)."""


class DataMismatchError(StoreError):
    """A model and an interaction store that do not belong together."""


class UnknownIdError(WalsError, KeyError):
    """Ids that the store does not know."""


class NumericalError(WalsError, ArithmeticError):
    """A computation produced non-finite numbers (NaN or inf): settings or data that make the
    problem ill-posed (e.g. huge alpha or values, a regularization of zero). Nothing is committed."""


class StorageError(WalsError, OSError):
    """The storage under a path failed: disk full, I/O error, permission denied, read-only.

    ``path`` is what the user named (the store or file being written or read); ``errno`` and
    ``filename`` are those of the underlying ``OSError`` when there is one.
    """

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None,
                 filename: str | None = None, flags: dict[str, str] | None = None):
        WalsError.__init__(self, message, flags=flags)
        self.path, self.errno, self.filename = path, errno, filename
        self.strerror = message

    def __str__(self) -> str:
        return self.message


class WalsWarning(UserWarning):
    """Something a user should know that does not stop the run (printed as one line by the CLI)."""


class IncompleteModelWarning(WalsWarning):
    """A model whose training stopped before its last iteration is being served."""


class BudgetWarning(WalsWarning):
    """A plan's expected peak is over its memory allowance: the run may exceed ``memory_budget``
    (``warnings.simplefilter("error", BudgetWarning)`` makes it an error)."""


class StaleLockWarning(WalsWarning):
    """A lock left by a writer that is no longer running was broken."""


__all__ = [
    "BudgetWarning",
    "CorruptStoreError",
    "DataMismatchError",
    "IncompleteModelWarning",
    "InputError",
    "MemoryBudgetError",
    "NumericalError",
    "PathError",
    "SettingError",
    "StaleLockWarning",
    "StorageError",
    "StoreError",
    "StoreLockedError",
    "StoreNotFoundError",
    "UnknownIdError",
    "WalsError",
    "WalsWarning",
]
