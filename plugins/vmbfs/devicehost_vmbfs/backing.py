"""The vmbfs backing-store contract (facts §8.7) and the one mapping of its errors to wire status.

A backing answers two questions about a path already decoded from the wire (``/`` separators,
no NUL, valid Unicode): what is it (:meth:`Backing.file_info`), and what are ``len(buf)`` bytes
of it at ``offset`` (:meth:`Backing.read_file`, which fills the whole buffer or fails, never
returning part of the range). Failures are :class:`FileError` (or an ``OSError`` the backing did
not classify); :func:`status_for_error` is the single place where they become a wire
:class:`~devicehost_vmbfs.protocol.Status`.
"""

from __future__ import annotations

import enum
import errno
from typing import Protocol

import attrs

from devicehost_vmbfs.protocol import Status

__all__ = [
    "Backing",
    "FileError",
    "FileErrorKind",
    "FileInfo",
    "file_error_from_os",
    "status_for_error",
]


@attrs.frozen
class FileInfo:
    """What GET_FILE_INFO reports: whether the path is a directory, and the file's length."""

    directory: bool
    file_size: int


class FileErrorKind(enum.Enum):
    NOT_FOUND = "not found"
    END_OF_FILE = "end of file"
    ERROR = "error"


class FileError(Exception):
    """Raised by a backing when a path cannot be described or read; the guest sees only the kind.

    ``str()`` is ``"<kind>: <detail>"``; ``detail`` alone is the message without its kind.
    """

    def __init__(self, kind: FileErrorKind, message: str) -> None:
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.detail = message


class Backing(Protocol):
    """What the device serves files from. Calls are synchronous and short (local files)."""

    def file_info(self, path: str) -> FileInfo:
        """Describe ``path``; raise :class:`FileError` (an ``OSError`` is accepted too: the
        request is answered by :func:`status_for_error` all the same)."""

    def read_file(self, path: str, offset: int, buf: bytearray | memoryview) -> None:
        """Fill all of ``buf`` from ``path`` at ``offset``; raise :class:`FileError`
        (END_OF_FILE if the range passes the end of the file, even partly) or ``OSError``."""

    def describe(self) -> dict[str, object]:
        """A JSON-able description for ``inspect`` and logs."""


# ENOTDIR: a path through a regular file names nothing, as far as the guest is concerned.
_NOT_FOUND_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})


def file_error_from_os(exc: OSError, what: str) -> FileError:
    """Classify an OS error: "no such file" -> NOT_FOUND, everything else -> ERROR."""
    kind = FileErrorKind.NOT_FOUND if exc.errno in _NOT_FOUND_ERRNOS else FileErrorKind.ERROR
    return FileError(kind, f"{what}: {exc.strerror or exc}")


_STATUS = {
    FileErrorKind.NOT_FOUND: Status.NOT_FOUND,
    FileErrorKind.END_OF_FILE: Status.END_OF_FILE,
    FileErrorKind.ERROR: Status.ERROR,
}


def status_for_error(error: FileError | OSError) -> Status:
    """The wire status for a backing error: NotFound -> 1, EndOfFile -> 2, Error -> 3.

    The one mapping from backing errors to the wire: an ``OSError`` a backing let through (EMFILE
    from a ``dup``, EIO from a disk, EACCES, a file removed while served) is classified as
    :func:`file_error_from_os` does, so the guest gets NOT_FOUND or ERROR and the device goes on.
    """
    if isinstance(error, OSError):
        error = file_error_from_os(error, "backing")
    return _STATUS[error.kind]
