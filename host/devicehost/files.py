"""Opening files whose path an operator or a peer chose, without letting the path stall the host.

A path in a config file, a ``--state`` argument or a device's settings (vmbfs ``file``) may name
something that is not a file at all. Opening a FIFO for reading blocks until a writer appears
(forever, and inside the event loop for a device); reading a character device such as
``/dev/zero`` never ends; a block device or a huge file is read for minutes. So every path the
host opens on someone else's say goes through this module:

- :func:`open_regular_file` checks the kind with ``stat`` *before* opening (a FIFO is never
  opened), opens with ``O_NONBLOCK | O_NOCTTY`` so that something swapped in between the check
  and the open cannot block the open either, checks the opened fd with ``fstat`` again, and only
  then clears ``O_NONBLOCK``. Symlinks are followed (an operator may link a config file); what
  they lead to must be a regular file.
- :func:`read_regular_file` does that and reads at most ``max_bytes`` (refusing a larger file from
  its size before reading, and a file that grows while read after ``max_bytes + 1`` bytes).

Both raise :class:`FileRefusedError` (an :class:`OSError`, so callers that already turn OS errors
into their own error type need nothing new) whose ``strerror`` says what the path is instead,
e.g. ``not a regular file (a FIFO)``.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Final

__all__ = ["FileRefusedError", "file_kind", "open_regular_file", "read_regular_file"]

_OPEN_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class FileRefusedError(OSError):
    """Raised when a path names something other than a regular file, or a file over the size
    limit; whoever chose the path (the operator, the peer) is to blame."""


def file_kind(mode: int) -> str:
    """What a ``st_mode`` names, for error messages: ``a FIFO``, ``a directory``, ..."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return f"of unknown kind {stat.S_IFMT(mode):#o}"


def _refuse(path: str | os.PathLike[str], mode: int) -> FileRefusedError:
    return FileRefusedError(
        errno.EINVAL, f"not a regular file ({file_kind(mode)})", os.fspath(path)
    )


def open_regular_file(path: str | os.PathLike[str]) -> int:
    """Open ``path`` read-only if it is a regular file and return the fd (blocking mode,
    close-on-exec; the caller closes it). Raises :class:`FileRefusedError` for anything else,
    :class:`OSError` if it cannot be opened; never blocks on what the path names."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _refuse(path, mode)
    fd = os.open(path, _OPEN_FLAGS)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped between the stat and the open
            raise _refuse(path, mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The contents of regular file ``path``, at most ``max_bytes`` of them.

    Raises :class:`FileRefusedError` if ``path`` is not a regular file or holds more than
    ``max_bytes`` bytes (seen from its size, or while reading a file that grows), and
    :class:`OSError` if it cannot be read.
    """
    fd = open_regular_file(path)
    with os.fdopen(fd, "rb") as file:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise _too_large(path, max_bytes, f"{size} bytes")
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(path, max_bytes, "it grew while read")
    return data


def _too_large(path: str | os.PathLike[str], max_bytes: int, found: str) -> FileRefusedError:
    return FileRefusedError(
        errno.EFBIG, f"larger than {max_bytes} bytes ({found})", os.fspath(path)
    )
