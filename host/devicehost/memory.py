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

Sharing between processes: :meth:`GuestMemory.share` describes a memory's regions as
:class:`SharedRegion` values (guest address, size, file offset) plus their memfds, to be sent to
another process (over ``SCM_RIGHTS``, e.g. in a handoff); an anonymous region cannot be shared.
:meth:`GuestMemory.from_shared` maps the descriptors a process received: each must pass
:func:`devicehost.fds.require_unshrinkable_memory` and each region must lie inside its file, or
:class:`SharedMemoryError` (the sender's fault) is raised; a write through one process's mapping
is seen through the other's.

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
import contextlib
import ctypes
import fcntl
import mmap
import os
from collections.abc import Iterable
from typing import Final

import attrs

from devicehost.fds import FdKindError, require_unshrinkable_memory

__all__ = [
    "PAGE_SIZE",
    "DmaAllocator",
    "DmaBlock",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryRegion",
    "SharedMemoryError",
    "SharedRegion",
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


class SharedMemoryError(ValueError):
    """Raised when memory received from another process cannot be mapped safely: a descriptor
    of the wrong kind or that the sender could shrink, a region outside its file, regions that
    overlap or do not match their descriptors (the sender's fault); or when a memory that has
    an anonymous region is asked to be shared (the caller's)."""


#: Guest addresses, sizes and file offsets of shared regions fit 63 bits (mmap's off_t).
_MAX_SHARED: Final = 0x7FFF_FFFF_FFFF_FFFF


@attrs.frozen
class SharedRegion:
    """Where one shared region lies: ``size`` bytes at guest address ``gpa``, starting
    ``offset`` bytes into its file (the descriptor travels beside it)."""

    gpa: int
    size: int
    offset: int


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

    def share(self) -> tuple[tuple[SharedRegion, ...], tuple[int, ...]]:
        """The regions, in guest-address order, and their descriptors (one per region, in the
        same order), for another process to map with :meth:`from_shared`.

        The descriptors stay this memory's (closed by its :meth:`close`): send or duplicate
        them, never close them. :class:`SharedMemoryError` if a region is anonymous (no file
        another process could map).
        """
        shared = []
        fds = []
        for region in self._regions:
            if region.fd is None:
                raise SharedMemoryError(
                    f"{region!r} is anonymous memory: only memfd- or file-backed regions can be"
                    " shared with another process (build the memory with GuestMemory.memfd)"
                )
            shared.append(SharedRegion(region.gpa, region.size, region.offset))
            fds.append(region.fd)
        return tuple(shared), tuple(fds)

    @classmethod
    def from_shared(
        cls,
        regions: Iterable[SharedRegion],
        fds: Iterable[int],
        *,
        allow_unsealed: bool = False,
        what: str = "shared guest memory",
    ) -> GuestMemory:
        """Map memory another process shared (:meth:`share`): ``fds[i]`` backs ``regions[i]``.

        The descriptors become the new memory's (closed by its :meth:`close`) and are closed
        here if it cannot be built, so the caller never closes them. Each must be a memfd
        sealed against shrinking (or any memfd or regular file with ``allow_unsealed``, see
        :func:`devicehost.fds.require_unshrinkable_memory`) and each region must lie inside its
        file; the regions must not overlap and no descriptor may back two regions (duplicate it
        first). :class:`SharedMemoryError` names ``what`` and the region otherwise.
        """
        regions = list(regions)
        pending = list(fds)  # not yet owned by a mapped region: closed on failure
        memory = cls()
        try:
            if len(regions) != len(pending):
                raise SharedMemoryError(
                    f"{what}: {len(regions)} regions but {len(pending)} descriptors")
            if len(set(pending)) != len(pending):
                raise SharedMemoryError(f"{what}: one descriptor backs two regions")
            for index, (shared, fd) in enumerate(zip(regions, list(pending), strict=True)):
                region = _map_shared(shared, fd, allow_unsealed, f"{what} region {index}")
                pending.remove(fd)  # the region owns it now
                try:
                    memory.add_region(region)
                except ValueError as exc:
                    region.close()
                    raise SharedMemoryError(f"{what}: the regions overlap: {exc}") from None
        except BaseException:
            memory.close()
            for fd in pending:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        return memory

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


def _map_shared(shared: SharedRegion, fd: int, allow_unsealed: bool, what: str) -> MemoryRegion:
    """A region mapping ``fd`` as ``shared`` says, once the fd and the bounds are checked; owns
    ``fd`` only once returned."""
    gpa, size, offset = shared.gpa, shared.size, shared.offset
    if not (0 < size <= _MAX_SHARED and 0 <= gpa <= _MAX_SHARED - size
            and 0 <= offset <= _MAX_SHARED - size):
        raise SharedMemoryError(
            f"{what}: guest address {gpa:#x}, size {size:#x} or file offset {offset:#x} is out"
            " of range")
    # Seals first: once F_SEAL_SHRINK is seen, the size read after it can only grow.
    try:
        require_unshrinkable_memory(fd, what, allow_unsealed=allow_unsealed)
        file_size = os.fstat(fd).st_size
    except (FdKindError, OSError) as exc:
        raise SharedMemoryError(str(exc) if isinstance(exc, FdKindError)
                                else f"{what}: the descriptor is unusable: {exc}") from None
    if file_size < offset + size:
        raise SharedMemoryError(
            f"{what} (guest address {gpa:#x}, {size:#x} bytes at file offset {offset:#x})"
            f" reaches beyond the end of its {file_size}-byte file")
    try:
        region = MemoryRegion(gpa, size, fd=fd, offset=offset, owns_fd=True)
    except (OSError, ValueError, OverflowError) as exc:
        raise SharedMemoryError(f"{what} cannot be mapped: {exc}") from None
    return region


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
