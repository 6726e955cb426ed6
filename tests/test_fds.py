"""The fd-kind checks every transport runs on a peer's file descriptors."""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from devicehost.fds import (
    F_SEAL_SHRINK,
    FdKindError,
    fd_kind,
    memfd_seals,
    require_eventfd,
    require_unshrinkable_memory,
)

F_ADD_SEALS = 1033


@contextmanager
def opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def test_kinds_are_read_from_the_kernel() -> None:
    with opened(os.eventfd(0)) as fd:
        assert fd_kind(fd) == "eventfd"
    with opened(os.memfd_create("t")) as fd:
        assert fd_kind(fd) == "memfd"
    with tempfile.TemporaryFile() as f:
        assert fd_kind(f.fileno()) == "regular"
    with opened(os.open("/dev/zero", os.O_RDONLY)) as fd:
        assert fd_kind(fd) == "chardev"
    r, w = os.pipe()
    with opened(r), opened(w):
        assert fd_kind(r) == "fifo"
    a, b = socket.socketpair()
    with a, b:
        assert fd_kind(a.fileno()) == "socket"
    with opened(os.open("/", os.O_RDONLY)) as fd:
        assert fd_kind(fd) == "directory"
    fd = os.eventfd(0)
    os.close(fd)
    assert fd_kind(fd) == "closed"


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_a_device_file_is_not_an_eventfd(path: str) -> None:
    with opened(os.open(path, os.O_RDONLY)) as fd, pytest.raises(
        FdKindError, match="SET_VRING_KICK for vring 0: the fd is a chardev, not an eventfd"
    ):
        require_eventfd(fd, "SET_VRING_KICK for vring 0")


def test_only_an_eventfd_passes_as_one() -> None:
    with opened(os.eventfd(0)) as fd:
        require_eventfd(fd, "kick")
    r, w = os.pipe()
    os.close(w)
    for fd in (os.memfd_create("x"), r):
        with opened(fd), pytest.raises(FdKindError, match="not an eventfd"):
            require_eventfd(fd, "kick")


def test_memory_must_be_sealed_against_shrinking() -> None:
    flags = os.MFD_ALLOW_SEALING
    with opened(os.memfd_create("mem", flags)) as fd:
        os.ftruncate(fd, 4096)
        with pytest.raises(FdKindError, match=r"memfd without F_SEAL_SHRINK.*SIGBUS"):
            require_unshrinkable_memory(fd, "region 0")
        require_unshrinkable_memory(fd, "region 0", allow_unsealed=True)
        fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK)
        assert memfd_seals(fd) & F_SEAL_SHRINK
        require_unshrinkable_memory(fd, "region 0")
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)  # the seal is what makes the mapping safe


def test_regular_files_and_other_kinds() -> None:
    with tempfile.TemporaryFile() as f:
        with pytest.raises(FdKindError, match="regular file, which cannot be sealed"):
            require_unshrinkable_memory(f.fileno(), "region 1")
        require_unshrinkable_memory(f.fileno(), "region 1", allow_unsealed=True)
    with opened(os.eventfd(0)) as fd, pytest.raises(FdKindError, match="eventfd, not a memfd"):
        require_unshrinkable_memory(fd, "region 2", allow_unsealed=True)
    with opened(os.open("/dev/null", os.O_RDONLY)) as fd:
        assert memfd_seals(fd) == 0
