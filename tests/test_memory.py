"""Guest memory: sealed memfds, a close that releases a file-backed region at once, sharing."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys

import pytest

from devicehost.fds import require_unshrinkable_memory
from devicehost.memory import (
    GuestMemory,
    GuestMemoryError,
    MemoryRegion,
    SharedMemoryError,
    SharedRegion,
)


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


# -- sharing between processes ----------------------------------------------------------------

_CHILD = """
import json, os, socket, sys
from devicehost.memory import GuestMemory, SharedRegion
sock = socket.socket(fileno=int(sys.argv[1]))
msg, fds, _, _ = socket.recv_fds(sock, 65536, 16)
regions = [SharedRegion(*r) for r in json.loads(msg)]
memory = GuestMemory.from_shared(regions, fds)
seen = memory.read(0x10000 + 100, 6)
memory.write(0x40000 + 8, b"child:" + seen)
memory.close()
sock.sendall(b"done")
"""


def _sealed(size: int) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def test_shared_memory_is_the_same_bytes_in_another_process() -> None:
    memory = GuestMemory([MemoryRegion.memfd(0x10000, 65536), MemoryRegion.memfd(0x40000, 8192)])
    parent, child = socket.socketpair()
    try:
        regions, fds = memory.share()
        assert [(r.gpa, r.size, r.offset) for r in regions] == [(0x10000, 65536, 0),
                                                                 (0x40000, 8192, 0)]
        memory.write(0x10000 + 100, b"parent")
        socket.send_fds(parent, [json.dumps([[r.gpa, r.size, r.offset] for r in regions])
                                 .encode()], list(fds))
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(child.fileno())],
                              pass_fds=[child.fileno()], timeout=60, capture_output=True)
        assert proc.returncode == 0, proc.stderr.decode()
        assert parent.recv(4) == b"done"
        assert memory.read(0x40000 + 8, 12) == b"child:parent"
        # the descriptors are still the memory's own
        assert all(os.fstat(fd) for fd in fds)
    finally:
        parent.close()
        child.close()
        memory.close()


def test_from_shared_maps_an_offset_and_owns_its_descriptors() -> None:
    fds_before = _fds()
    fd = _sealed(3 * 65536)
    os.pwrite(fd, b"at offset", 65536 + 5)
    peer = os.dup(fd)
    memory = GuestMemory.from_shared([SharedRegion(0x100000, 65536, 65536)], [fd])
    assert memory.read(0x100005, 9) == b"at offset"
    memory.write(0x100000, b"seen")
    assert os.pread(peer, 4, 65536) == b"seen"
    assert memory.share()[0] == (SharedRegion(0x100000, 65536, 65536),)
    memory.close()
    os.close(peer)
    assert _fds() == fds_before


def _refused(regions: list[tuple[int, int, int]], fds: list[int], match: str) -> None:
    with pytest.raises(SharedMemoryError, match=match):
        GuestMemory.from_shared([SharedRegion(*r) for r in regions], fds)
    for fd in fds:  # every descriptor was closed, none leaked
        with pytest.raises(OSError):
            os.fstat(fd)


def test_from_shared_refuses_unsafe_memory_and_closes_every_descriptor() -> None:
    fds_before = _fds()
    _refused([(0, 65536, 0)], [_sealed(4096)], "beyond the end of its 4096-byte file")
    _refused([(0, 4096, 4096)], [_sealed(4096)], "beyond the end")
    unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, 4096)
    _refused([(0, 4096, 0)], [unsealed], "without F_SEAL_SHRINK")
    _refused([(0, 4096, 0)], [os.eventfd(0)], "is a eventfd, not a memfd")
    a, b = socket.socketpair()
    _refused([(0, 4096, 0)], [a.detach()], "is a socket")
    b.close()
    _refused([(0, 4096, 0), (2048, 4096, 0)], [_sealed(4096), _sealed(4096)], "overlap")
    _refused([(0, 4096, 0), (8192, 4096, 0)], [_sealed(4096)], "2 regions but 1 descriptors")
    _refused([(0, 0, 0)], [_sealed(4096)], "out of range")
    _refused([(1 << 63, 4096, 0)], [_sealed(4096)], "out of range")
    same = _sealed(8192)
    _refused([(0, 4096, 0), (8192, 4096, 4096)], [same, same], "one descriptor backs two")
    assert _fds() == fds_before


def test_from_shared_accepts_unsealed_memory_only_when_allowed() -> None:
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    memory = GuestMemory.from_shared([SharedRegion(0, 4096, 0)], [fd], allow_unsealed=True)
    memory.write(0, b"ok")
    assert memory.read(0, 2) == b"ok"
    memory.close()


def test_anonymous_memory_cannot_be_shared() -> None:
    memory = GuestMemory([MemoryRegion.memfd(0, 4096), MemoryRegion.anonymous(8192, 4096)])
    try:
        with pytest.raises(SharedMemoryError, match="anonymous"):
            memory.share()
    finally:
        memory.close()
