"""The single-file backing: one file served under one name, as the IMC hive is (facts §8.7).

The file is visible at exactly ``"/" + name``: the lookup is a case-sensitive string compare, so
``name`` without the slash, another case, or ``/`` answer NOT_FOUND; there are no directories.
Reads fill the whole buffer or fail: a range that passes the end of the file, even partly,
answers END_OF_FILE and no data.
"""

from __future__ import annotations

import os
import stat
from typing import Final

from devicehost.excerpt import excerpt
from devicehost.files import open_regular_file
from devicehost_vmbfs.backing import FileError, FileErrorKind, FileInfo, file_error_from_os

__all__ = ["InvalidFileName", "SingleFileBacking", "read_exact_at"]

#: Offsets the OS can seek to; upstream seeks with a signed 64-bit position.
_MAX_OFFSET: Final = (1 << 63) - 1


class InvalidFileName(ValueError):
    """Raised when the served name contains a path separator; the configuration is to blame."""


def read_exact_at(fd: int, offset: int, buf: bytearray | memoryview, what: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` with pread, or raise :class:`FileError`.

    An offset the OS cannot seek to is ERROR; hitting the end of the file before ``buf`` is full
    is END_OF_FILE (whatever was read is discarded by the caller, which never sends it).
    """
    if offset > _MAX_OFFSET:
        raise FileError(FileErrorKind.ERROR, f"{what}: offset {offset} cannot be seeked to")
    view = memoryview(buf).cast("B")
    size = len(view)
    done = 0
    while done < size:
        try:
            n = os.preadv(fd, [view[done:] if done else view], offset + done)
        except OverflowError:
            raise FileError(FileErrorKind.ERROR, f"{what}: offset out of range") from None
        except OSError as exc:
            raise file_error_from_os(exc, what) from exc
        if n == 0:
            raise FileError(
                FileErrorKind.END_OF_FILE,
                f"{what}: {size} bytes at {offset} pass the end of the file",
            )
        done += n


class SingleFileBacking:
    """Serves the open file ``fd`` as ``/<name>``. The backing owns ``fd`` (see :meth:`close`)."""

    def __init__(self, name: str, fd: int) -> None:
        if "/" in name or "\\" in name:
            raise InvalidFileName(f"vmbfs file name {name!r} must not contain '/' or '\\'")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidFileName(f"vmbfs serves regular files only, {name!r} is not one")
        self.name = name
        self._path = "/" + name
        self._fd = fd

    @classmethod
    def open(cls, name: str, file: str | os.PathLike[str]) -> SingleFileBacking:
        """Open ``file`` read-only and serve it as ``/<name>``. Anything but a regular file (a
        FIFO, a device) is refused with :class:`devicehost.files.FileRefusedError` (an OSError)
        without being opened for reading, so it cannot block the host."""
        fd = open_regular_file(file)
        try:
            return cls(name, fd)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _check(self, path: str) -> None:
        if path != self._path:
            raise FileError(FileErrorKind.NOT_FOUND, f"{excerpt(path)} is not {self._path!r}")

    def file_info(self, path: str) -> FileInfo:
        self._check(path)
        try:
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise file_error_from_os(exc, self._path) from exc
        return FileInfo(directory=False, file_size=size)

    def read_file(self, path: str, offset: int, buf: bytearray | memoryview) -> None:
        if path != self._path:
            self._check(path)  # raises NOT_FOUND
        read_exact_at(self._fd, offset, buf, self._path)

    def describe(self) -> dict[str, object]:
        return {"kind": "file", "name": self.name}
