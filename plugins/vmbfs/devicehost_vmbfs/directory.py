"""The read-only directory backing: serves a directory tree, and nothing outside it.

Path rules (the path comes decoded from the wire: ``/`` separators, no NUL, valid UTF-16):

- The path is relative to the root whether or not it starts with ``/``; ``/`` and ``""`` name
  the root itself (a directory). Empty components and ``.`` are skipped.
- A ``..`` component in the guest's path answers NOT_FOUND: the guest cannot climb, not even
  back into the root (``a/../b``).
- Each component is looked up *inside the directory opened for the previous one* (``dir_fd``
  walking with ``O_NOFOLLOW``); no absolute host path is ever built, so a path cannot leave the
  root by any spelling, and a directory swapped for a symlink mid-walk fails (ERROR) instead of
  being followed.
- Symlinks inside the root are followed **only within the root**: a relative target is resolved
  against the directory holding the link, with its ``..`` allowed to climb back up to, but never
  past, the root; an absolute target, or a target that would climb past the root, answers
  NOT_FOUND (as if the link were absent); more than 40 links in one lookup answers ERROR.
- Only directories and regular files are served; anything else (FIFO, socket, device) answers
  NOT_FOUND. A directory reports ``directory=True`` and size 0; reading it answers ERROR.
- A path through a regular file (``file.txt/x``) answers NOT_FOUND.
"""

from __future__ import annotations

import collections
import os
import stat
from typing import Final

from devicehost.excerpt import excerpt
from devicehost_vmbfs.backing import FileError, FileErrorKind, FileInfo, file_error_from_os
from devicehost_vmbfs.single_file import read_exact_at

__all__ = ["DirectoryBacking"]

_MAX_SYMLINKS: Final = 40
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c not in ("", ".")]


def _not_found(path: str, why: str) -> FileError:
    return FileError(FileErrorKind.NOT_FOUND, f"{excerpt(path)}: {why}")


class DirectoryBacking:
    """Serves the tree under the directory ``root_fd`` (owned by the backing; see :meth:`close`)."""

    def __init__(self, root_fd: int, label: str = "") -> None:
        if not stat.S_ISDIR(os.fstat(root_fd).st_mode):
            raise NotADirectoryError(f"vmbfs root {label!r} is not a directory")
        self._root_fd = root_fd
        self.label = label

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> DirectoryBacking:
        """Serve the directory ``root`` (opened once, now; later renames do not matter)."""
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return cls(fd, os.fspath(root))
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def describe(self) -> dict[str, object]:
        return {"kind": "directory", "root": self.label}

    # -- lookup ----------------------------------------------------------------------------------

    def _open(self, path: str) -> tuple[int, os.stat_result]:
        """Open what ``path`` names inside the root; the caller closes the returned fd."""
        parts = collections.deque(_components(path))
        for part in parts:
            if part == "..":
                raise _not_found(path, "'..' is not allowed")
            if "\0" in part:
                raise _not_found(path, "NUL in a component")
        stack: list[int] = []  # stack[-1]: the directory being looked into
        links = 0
        try:
            stack.append(os.dup(self._root_fd))  # EMFILE here is an OS error like any other
            while parts:
                name = parts.popleft()
                if name == "..":  # only from a symlink target: climb, never past the root
                    if len(stack) == 1:
                        raise _not_found(path, "a symlink leads outside the root")
                    os.close(stack.pop())
                    continue
                st = os.stat(name, dir_fd=stack[-1], follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise FileError(FileErrorKind.ERROR, f"{path!r}: too many symlinks")
                    target = os.readlink(name, dir_fd=stack[-1])
                    if target.startswith("/"):
                        raise _not_found(path, "a symlink has an absolute target")
                    parts.extendleft(reversed(_components(target)))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(os.open(name, _OPEN_FLAGS | os.O_DIRECTORY, dir_fd=stack[-1]))
                    continue
                if parts:
                    raise _not_found(path, f"{name!r} is not a directory")
                if not stat.S_ISREG(st.st_mode):
                    raise _not_found(path, "not a regular file or directory")
                fd = os.open(name, _OPEN_FLAGS, dir_fd=stack[-1])
                opened = os.fstat(fd)
                if not stat.S_ISREG(opened.st_mode):  # swapped between stat and open
                    os.close(fd)
                    raise _not_found(path, "not a regular file")
                return fd, opened
            st = os.fstat(stack[-1])
            return stack.pop(), st
        except OSError as exc:
            raise file_error_from_os(exc, repr(path)) from exc
        finally:
            for fd in stack:
                os.close(fd)

    # -- Backing ---------------------------------------------------------------------------------

    def file_info(self, path: str) -> FileInfo:
        fd, st = self._open(path)
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            return FileInfo(directory=True, file_size=0)
        return FileInfo(directory=False, file_size=st.st_size)

    def read_file(self, path: str, offset: int, buf: bytearray | memoryview) -> None:
        fd, st = self._open(path)
        try:
            if stat.S_ISDIR(st.st_mode):
                raise FileError(FileErrorKind.ERROR, f"{path!r} is a directory")
            read_exact_at(fd, offset, buf, repr(path))
        finally:
            os.close(fd)
