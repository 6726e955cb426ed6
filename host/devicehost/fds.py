"""What a file descriptor from a peer is, checked before it is used.

Every transport that takes fds from an untrusted peer (a vhost-user front-end, a VMBus socket
guest, a process on the other side of a handoff) checks each one's kind here first. Using an fd
of the wrong kind is how a peer freezes or kills the host: a "kick eventfd" that is ``/dev/zero``
reads forever without blocking, a regular file stalls the loop for its size, and guest memory
that the peer can shrink turns the backend's next access into SIGBUS.

The kinds are read from the kernel, never from what the peer says:

- :func:`fd_kind` names the kind from ``fstat`` and, for anonymous inodes, the ``/proc/self/fd``
  link (``anon_inode:[eventfd]``; a memfd's link is ``/memfd:NAME (deleted)``).
- :func:`require_eventfd` accepts only an eventfd.
- :func:`require_unshrinkable_memory` accepts a file whose size the peer cannot reduce under a
  mapping: a memfd sealed with ``F_SEAL_SHRINK``. Anything else (an unsealed memfd, a file on
  ``/dev/shm`` or hugetlbfs, which cannot be sealed) is refused unless the operator accepted
  unsealed memory knowingly (``allow_unsealed``): then the peer can kill the whole process with
  SIGBUS by truncating it, and that is the operator's informed choice.

Every check raises :class:`FdKindError` (a :class:`ValueError`) whose message names ``what`` the
fd was for and what it is instead; the caller converts it into its own protocol error.
"""

from __future__ import annotations

import fcntl
import os
import stat
from typing import Final

__all__ = [
    "FdKindError",
    "fd_kind",
    "memfd_seals",
    "require_eventfd",
    "require_unshrinkable_memory",
]

#: fcntl's F_GET_SEALS and the seal bits (Linux; named here so older Pythons need not have them).
F_GET_SEALS: Final = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SHRINK: Final = getattr(fcntl, "F_SEAL_SHRINK", 2)


class FdKindError(ValueError):
    """Raised when a peer's file descriptor is not of the kind its use requires (peer's fault)."""


def fd_kind(fd: int) -> str:
    """The kind of ``fd``: ``eventfd``, ``memfd``, ``regular``, ``socket``, ``fifo``, ``chardev``,
    ``blockdev``, ``directory``, ``anon_inode:<what>`` or ``closed`` (not an open fd)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return "closed"
    mode = st.st_mode
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode):
        return "chardev"
    if stat.S_ISBLK(mode):
        return "blockdev"
    if stat.S_ISDIR(mode):
        return "directory"
    link = _link(fd)
    if stat.S_ISREG(mode):
        return "memfd" if link.startswith("/memfd:") else "regular"
    if link == "anon_inode:[eventfd]":
        return "eventfd"
    if link.startswith("anon_inode:"):
        return "anon_inode:" + link[len("anon_inode:"):].strip("[]")
    return "other"


def _link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def require_eventfd(fd: int, what: str) -> None:
    """:class:`FdKindError` unless ``fd`` is an eventfd; ``what`` names its use in the message."""
    kind = fd_kind(fd)
    if kind != "eventfd":
        raise FdKindError(f"{what}: the fd is a {kind}, not an eventfd")


def memfd_seals(fd: int) -> int:
    """The seals of ``fd`` (0 for a file that cannot be sealed)."""
    try:
        return int(fcntl.fcntl(fd, F_GET_SEALS))
    except OSError:
        return 0


def require_unshrinkable_memory(fd: int, what: str, *, allow_unsealed: bool = False) -> None:
    """:class:`FdKindError` unless ``fd`` can back guest memory safely (module docstring).

    A regular file or memfd is required in every case; ``allow_unsealed`` waives only the seal.
    """
    kind = fd_kind(fd)
    if kind not in ("memfd", "regular"):
        raise FdKindError(f"{what}: the fd is a {kind}, not a memfd or a regular file")
    if allow_unsealed or memfd_seals(fd) & F_SEAL_SHRINK:
        return
    if kind == "memfd":
        why = "a memfd without F_SEAL_SHRINK"
    else:
        why = "a regular file, which cannot be sealed"
    raise FdKindError(
        f"{what}: guest memory is {why}: the peer could shrink it under the mapping and kill the"
        " host with SIGBUS (seal it, e.g. QEMU memory-backend-memfd with seal=on, or accept"
        " unsealed memory with [host] allow_unsealed_memory = true)"
    )
