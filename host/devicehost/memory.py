"""Guest memory: regions of real shared memory addressed by guest physical address.

A :class:`GuestMemory` is a set of non-overlapping :class:`MemoryRegion` s. Each region is a shared
mapping: anonymous (in-process), or backed by a memfd so another process (a second Python process,
a VMM over vhost-user) can map the same bytes. Every access is bounds-checked and must fall inside
one region; an access that does not raises :class:`GuestMemoryError`, which is the guest's fault.

Pages are 4096 bytes; a page number (PFN) is ``gpa // 4096``.
:class:`DmaAllocator` hands out page-aligned blocks of a memory's pages and takes them back.
"""

from __future__ import annotations

import bisect
import contextlib
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
        if fd is None:
            self._map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
            self.view = memoryview(self._map)
        else:
            # mmap offsets must be page aligned: map from the aligned start, then slice.
            aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
            self._map = mmap.mmap(fd, size + offset - aligned, flags=mmap.MAP_SHARED,
                                  offset=aligned)
            self.view = memoryview(self._map)[offset - aligned : offset - aligned + size]

    @classmethod
    def anonymous(cls, gpa: int, size: int) -> MemoryRegion:
        """A region of fresh zeroed shared memory, visible to this process (and its forks)."""
        return cls(gpa, size)

    @classmethod
    def memfd(cls, gpa: int, size: int, name: str = "devicehost-guest") -> MemoryRegion:
        """A region backed by a new memfd, so another process can map it (see ``fd``)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(gpa, size, fd=fd, owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def close(self) -> None:
        self.view.release()
        # If a view of this region is still exported, the mapping goes when that view does.
        with contextlib.suppress(BufferError):
            self._map.close()
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
