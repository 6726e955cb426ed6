"""Guest memory: regions of real shared memory addressed by guest physical address.

A :class:`GuestMemory` is a set of non-overlapping :class:`MemoryRegion` s. Each region is a shared
mapping: anonymous (in-process), or backed by a memfd so another process (a second Python process,
a VMM over vhost-user) can map the same bytes. Every access is bounds-checked and must fall inside
one region; an access that does not raises :class:`GuestMemoryError`, which is the guest's fault.

Pages are 4096 bytes; a page number (PFN) is ``gpa // 4096``.
:class:`DmaAllocator` hands out page-aligned blocks of a memory's pages and takes them back.

Memfds this module creates (:meth:`MemoryRegion.memfd`) are sealed against shrinking and growing
(``F_SEAL_SHRINK | F_SEAL_GROW``), as QEMU's ``memory-backend-memfd`` seals its own: a peer that
maps them (a vhost-user backend, a VMBus socket host) can rely on the size, and
:func:`devicehost.fds.require_unshrinkable_memory` accepts them.

Closing releases deterministically. A file-backed region's pages are mapped over an anonymous
placeholder that Python's :class:`mmap.mmap` owns, so no duplicate of the fd hides inside the
mmap object. :meth:`MemoryRegion.close` unmaps at once when no view of the region is left; when
some are (a device still holding a chain, an exception's traceback keeping a frame alive), it
maps zero pages over the range in place: the file's pages and fd are released now, those stale
views read zeros and write nowhere (never into another session's memory), and the placeholder
goes when the last view does. Nothing waits for the garbage collector.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import mmap
import os
from collections.abc import Iterable
from typing import Final

import attrs

__all__ = [
    "PAGE_SIZE",
    "DmaAllocator",
    "DmaBlock",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryRegion",
]

PAGE_SIZE: Final = 4096

#: The seals every memfd made here carries: its size is fixed for good.
_SIZE_SEALS: Final = getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4)
_F_ADD_SEALS: Final = getattr(fcntl, "F_ADD_SEALS", 1033)
_MFD_ALLOW_SEALING: Final = getattr(os, "MFD_ALLOW_SEALING", 2)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_MAP_FIXED: Final = getattr(mmap, "MAP_FIXED", 0x10)
_MAP_FAILED: Final = ctypes.c_void_p(-1).value
#: Flags of the anonymous placeholder under a file mapping: private and not accounted as
#: commit charge (a 256 GiB guest must not need 256 GiB of commit for pages it never uses).
_PLACEHOLDER: Final = mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0x4000)


def _map_fixed(address: int, length: int, flags: int, fd: int, offset: int) -> None:
    """mmap(2) with MAP_FIXED over ``address`` (a range this process already maps)."""
    got = _libc.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE, flags | _MAP_FIXED, fd,
                     offset)
    if got == _MAP_FAILED or got != address:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap over {address:#x}+{length:#x}: {os.strerror(err)}")


def _address(mapping: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class GuestMemoryError(Exception):
    """Raised when an address range is not entirely inside one region of guest memory."""


class MemoryRegion:
    """``size`` bytes of shared memory mapped at guest physical address ``gpa``.

    ``fd`` is the memfd backing the region (None for an anonymous mapping); ``offset`` is where
    the region starts inside that file. The region owns its mapping; ``close`` unmaps it and
    closes the fd if the region created it.
    """

    def __init__(
        self,
        gpa: int,
        size: int,
        *,
        fd: int | None = None,
        offset: int = 0,
        owns_fd: bool = False,
    ) -> None:
        if size <= 0:
            raise ValueError("a memory region must not be empty")
        if gpa < 0 or offset < 0:
            raise ValueError("negative guest address or file offset")
        self.gpa = gpa
        self.size = size
        self.fd = fd
        self.offset = offset
        self._owns_fd = owns_fd
        #: Where a file-backed mapping starts in this process (None: anonymous).
        self._address: int | None = None
        if fd is None:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
            self.view = memoryview(self._map)
        else:
            # mmap offsets must be page aligned: map from the aligned start, then slice. The
            # file goes over an anonymous placeholder (module docstring: no hidden dup of fd).
            if offset > 0x7FFF_FFFF_FFFF_FFFF or size > 0x7FFF_FFFF_FFFF_FFFF:
                raise OverflowError("region size or file offset out of range")
            aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
            length = size + offset - aligned
            self._map = mmap.mmap(-1, length, flags=_PLACEHOLDER)
            address = _address(self._map)
            try:
                _map_fixed(address, length, mmap.MAP_SHARED, fd, aligned)
            except BaseException:
                self._map.close()
                raise
            self._address = address
            self.view = memoryview(self._map)[offset - aligned : offset - aligned + size]

    @classmethod
    def anonymous(cls, gpa: int, size: int) -> MemoryRegion:
        """A region of fresh zeroed shared memory, visible to this process (and its forks)."""
        return cls(gpa, size)

    @classmethod
    def memfd(cls, gpa: int, size: int, name: str = "devicehost-guest") -> MemoryRegion:
        """A region backed by a new memfd, so another process can map it (see ``fd``); the memfd
        is sealed against shrinking and growing (module docstring)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | _MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, _F_ADD_SEALS, _SIZE_SEALS)
            return cls(gpa, size, fd=fd, owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def close(self) -> None:
        """Unmap the region and close its fd if it owns it, now (see the module docstring for
        views still held elsewhere); closing twice is harmless."""
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            # Views of the region are still alive: put zero pages over the file's pages so the
            # file is released now; the placeholder is unmapped when the last view goes.
            address, self._address = self._address, None
            if address is not None:
                _map_fixed(address, len(self._map), _PLACEHOLDER | mmap.MAP_ANONYMOUS, -1, 0)
        else:
            self._address = None
        if self._owns_fd and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __repr__(self) -> str:
        kind = "anonymous" if self.fd is None else f"fd {self.fd}"
        return f"<MemoryRegion gpa={self.gpa:#x} size={self.size:#x} {kind}>"


class GuestMemory:
    """Guest physical memory made of regions. Accesses never cross a region boundary."""

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        for region in regions:
            self.add_region(region)

    @classmethod
    def anonymous(cls, size: int, gpa: int = 0) -> GuestMemory:
        """One anonymous shared region of ``size`` bytes at ``gpa``."""
        return cls([MemoryRegion.anonymous(gpa, size)])

    @classmethod
    def memfd(cls, size: int, gpa: int = 0) -> GuestMemory:
        """One memfd-backed region of ``size`` bytes at ``gpa`` (shareable with other processes)."""
        return cls([MemoryRegion.memfd(gpa, size)])

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    def add_region(self, region: MemoryRegion) -> None:
        i = bisect.bisect_left(self._starts, region.gpa)
        if i > 0 and self._regions[i - 1].end > region.gpa:
            raise ValueError(f"{region!r} overlaps {self._regions[i - 1]!r}")
        if i < len(self._regions) and region.end > self._regions[i].gpa:
            raise ValueError(f"{region!r} overlaps {self._regions[i]!r}")
        self._regions.insert(i, region)
        self._starts.insert(i, region.gpa)

    def close(self) -> None:
        for region in self._regions:
            region.close()
        self._regions.clear()
        self._starts.clear()

    @property
    def size(self) -> int:
        """Total bytes of all regions."""
        return sum(r.size for r in self._regions)

    def _locate(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest range {gpa:#x}+{length:#x}")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self._regions[i]
            start = gpa - region.gpa
            if start + length <= region.size:
                return region, start
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest memory")

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of ``length`` bytes at ``gpa`` (no copy)."""
        region, start = self._locate(gpa, length)
        return region.view[start : start + length]

    def read(self, gpa: int, length: int) -> bytes:
        """A copy of ``length`` bytes at ``gpa``."""
        return bytes(self.view(gpa, length))

    def read_into(self, gpa: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` with the bytes at ``gpa``."""
        mv = memoryview(buf).cast("B")
        mv[:] = self.view(gpa, len(mv))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``gpa``."""
        mv = memoryview(data).cast("B")
        self.view(gpa, len(mv))[:] = mv

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        """Set ``length`` bytes at ``gpa`` to ``byte``."""
        view = self.view(gpa, length)
        view[:] = bytes([byte]) * length

    def page_view(self, pfn: int, count: int = 1) -> memoryview:
        """A view of ``count`` whole pages starting at page number ``pfn``."""
        return self.view(pfn * PAGE_SIZE, count * PAGE_SIZE)


@attrs.frozen
class DmaBlock:
    """Page-aligned memory handed out by a :class:`DmaAllocator`: its page numbers and bytes."""

    pfns: tuple[int, ...]
    view: memoryview = attrs.field(eq=False, repr=False)

    @property
    def gpa(self) -> int:
        return self.pfns[0] * PAGE_SIZE

    @property
    def size(self) -> int:
        return len(self.pfns) * PAGE_SIZE


class DmaAllocator:
    """Hands out contiguous page-aligned blocks of ``memory`` and takes them back.

    Pages handed out stay in use until ``free``; ``leak`` keeps them in use for good (for memory
    a peer may still write to, e.g. after a failed GPADL teardown).
    """

    def __init__(self, memory: GuestMemory, *, gpa: int | None = None, size: int | None = None):
        if gpa is None:
            if not memory.regions:
                raise ValueError("the memory has no regions")
            region = memory.regions[0]
            gpa, size = region.gpa, region.size if size is None else size
        elif size is None:
            raise ValueError("size is required with gpa")
        assert size is not None
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ValueError("the DMA range must be whole pages")
        memory.view(gpa, size)  # bounds check now, not at the first allocation
        self.memory = memory
        self._first = gpa // PAGE_SIZE
        self._count = size // PAGE_SIZE
        self._used = bytearray(self._count)
        self.leaked: set[int] = set()

    @property
    def free_pages(self) -> int:
        return self._used.count(0)

    def alloc(self, pages: int) -> DmaBlock:
        """A block of ``pages`` contiguous zeroed pages; MemoryError if none is free."""
        if pages <= 0:
            raise ValueError("allocate at least one page")
        start = self._used.find(bytes(pages))
        if start < 0:
            raise MemoryError(f"no {pages} contiguous free DMA pages")
        self._used[start : start + pages] = b"\x01" * pages
        pfns = tuple(range(self._first + start, self._first + start + pages))
        view = self.memory.page_view(pfns[0], pages)
        view[:] = bytes(len(view))
        return DmaBlock(pfns, view)

    def free(self, block: DmaBlock) -> None:
        """Take the block's pages back."""
        for pfn in block.pfns:
            i = pfn - self._first
            if not 0 <= i < self._count or not self._used[i]:
                raise ValueError(f"page {pfn:#x} was not allocated here")
            if pfn in self.leaked:
                raise ValueError(f"page {pfn:#x} was leaked and can never be freed")
        for pfn in block.pfns:
            self._used[pfn - self._first] = 0

    def leak(self, block: DmaBlock) -> None:
        """Keep the block's pages in use for good."""
        self.leaked.update(block.pfns)

    def in_use(self, pfn: int) -> bool:
        i = pfn - self._first
        return 0 <= i < self._count and bool(self._used[i])
