"""Guest memory: sealed memfds, and a close that releases a file-backed region at once."""

from __future__ import annotations

import fcntl
import os

import pytest

from devicehost.fds import require_unshrinkable_memory
from devicehost.memory import GuestMemory, GuestMemoryError, MemoryRegion


def _memfd_mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum("/memfd:" in line for line in maps)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_memfd_memory_is_sealed_against_shrinking_and_growing() -> None:
    memory = GuestMemory.memfd(65536)
    try:
        fd = memory.regions[0].fd
        assert fd is not None
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        require_unshrinkable_memory(fd, "test")  # what a peer backend checks
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1 << 20)
        memory.write(60000, b"still usable")
        assert memory.read(60000, 12) == b"still usable"
    finally:
        memory.close()


def test_close_releases_fd_and_mapping_even_while_views_are_held() -> None:
    """A device may still hold a view (a chain, a traceback's frame): closing the memory must
    not wait for it. The file's pages and fd go at once; the stale view reads zeros and its
    writes reach no file."""
    fds, mappings = _fds(), _memfd_mappings()
    fd = os.memfd_create("peer", os.MFD_CLOEXEC)
    os.ftruncate(fd, 3 * 65536)
    os.pwrite(fd, b"guest data", 65536 + 100)
    peer = os.dup(fd)  # what the peer (the VMM) keeps
    memory = GuestMemory([MemoryRegion(0x10000, 65536, fd=fd, offset=65536, owns_fd=True)])
    held = memory.view(0x10000 + 100, 10)
    assert bytes(held) == b"guest data"
    assert _memfd_mappings() == mappings + 1
    memory.close()
    assert _fds() == fds + 1  # only the peer's copy is left
    assert _memfd_mappings() == mappings
    assert bytes(held) == bytes(10)
    held[:] = b"stale xxxx"
    assert os.pread(peer, 10, 65536 + 100) == b"guest data"
    with pytest.raises(GuestMemoryError):
        memory.read(0x10000, 1)
    del held
    os.close(peer)
    assert _fds() == fds


def test_close_without_views_unmaps_and_closing_twice_is_harmless() -> None:
    mappings = _memfd_mappings()
    fd = os.memfd_create("peer", os.MFD_CLOEXEC)
    os.ftruncate(fd, 65536)
    region = MemoryRegion(0, 65536, fd=fd)  # the caller keeps the fd
    region.view[:4] = b"abcd"
    region.close()
    region.close()
    assert _memfd_mappings() == mappings
    assert os.pread(fd, 4, 0) == b"abcd"
    os.close(fd)


def test_an_fd_that_cannot_be_mapped_is_refused_without_leaking() -> None:
    fds = _fds()
    fd = os.eventfd(0)
    with pytest.raises(OSError):
        MemoryRegion(0, 4096, fd=fd)
    os.close(fd)
    with pytest.raises(OverflowError):
        MemoryRegion(0, 4096, fd=0, offset=1 << 64)
    assert _fds() == fds


def test_a_file_region_larger_than_the_machine_maps_and_releases() -> None:
    """Guest RAM is sparse: mapping a 256 GiB memfd must cost no commit charge (the placeholder
    under the file mapping is not accounted), before or after a close with a view held."""
    fd = os.memfd_create("huge", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 256 << 30)
        region = MemoryRegion(0, 256 << 30, fd=fd)
        region.view[200 << 30 : (200 << 30) + 3] = b"abc"
        held = region.view[:8]
        region.close()
        assert os.pread(fd, 3, 200 << 30) == b"abc"
        assert bytes(held) == bytes(8)
        del held
    finally:
        os.close(fd)
