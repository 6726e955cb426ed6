"""The guest side of virtio, for tests and the demo: rings and buffers in guest memory.

:class:`VirtioDriver` negotiates features over a :class:`DeviceLink` (the in-process transport
implements it), allocates every queue's descriptor table and rings with a
:class:`devicehost.memory.DmaAllocator`, and starts the queues. :class:`DriverQueue` posts
buffers: device-readable data and device-writable space, as one descriptor per buffer, split into
non-contiguous fragments, or through an indirect table; it kicks when the device asked for kicks
and collects used buffers (with the bytes the device wrote).

The device is not trusted by the driver either: a used element naming a head that is not in
flight, or a written length beyond the chain's writable space, raises :class:`DriverError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import attrs

from devicehost.memory import PAGE_SIZE, DmaAllocator, DmaBlock, GuestMemory
from devicehost.virtio.doorbell import Doorbell, EventDoorbell
from devicehost.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESCRIPTOR,
    RING_F_NO_NOTIFY,
    U16,
    USED_ELEM,
    QueueLayout,
    full_barrier,
    need_event,
)
from devicehost.virtio.traits import RING_EVENT_IDX, negotiate

__all__ = [
    "DeviceLink",
    "DriverError",
    "DriverQueue",
    "QueueFull",
    "QueueSetup",
    "UsedBuffer",
    "VirtioDriver",
]

_BufferLike = bytes | bytearray | memoryview


class DriverError(Exception):
    """Raised when the device broke the queue contract as the driver sees it (device's fault)."""


class QueueFull(Exception):
    """Raised when a queue has too few free descriptors for a chain (the caller's to handle)."""


@attrs.frozen
class QueueSetup:
    """One queue as the driver started it: layout, the kick the device waits on and the call
    (interrupt) the driver waits on."""

    index: int
    layout: QueueLayout
    kick: Doorbell
    call: Doorbell


class DeviceLink(Protocol):
    """What the driver needs from the device side (a transport's in-process port)."""

    @property
    def offered_features(self) -> int: ...

    @property
    def queue_count(self) -> int: ...

    @property
    def max_queue_size(self) -> int: ...

    def read_config(self, offset: int, size: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    async def start(self, features: int, queues: Sequence[QueueSetup]) -> None: ...

    async def reset(self) -> None: ...


@attrs.frozen
class UsedBuffer:
    """A chain the device returned: head, length written, those bytes, the caller's token."""

    head: int
    written: int
    data: bytes
    token: Any = None


@attrs.define
class _InFlight:
    block: DmaBlock
    descriptors: list[int]
    writable: list[memoryview]
    writable_len: int
    token: Any


_PIECE_ALIGN = 64
_NO_VIEWS: list[memoryview] = []  # the writable parts of a chain that has none (never changed)
_SPARE_PAGES = 1024  # 4 MiB of recycled buffers per queue at most


def _pages(n: int) -> int:
    return max(1, -(-n // PAGE_SIZE))


class DriverQueue:
    """The driver side of one split queue."""

    def __init__(
        self, index: int, memory: GuestMemory, allocator: DmaAllocator, size: int, *,
        event_idx: bool,
    ) -> None:
        self.index = index
        self.memory = memory
        self.allocator = allocator
        self.size = size
        self.event_idx = event_idx
        avail_off = QueueLayout.desc_bytes(size)
        used_off = -(-(avail_off + QueueLayout.avail_bytes(size)) // PAGE_SIZE) * PAGE_SIZE
        total = used_off + QueueLayout.used_bytes(size)
        self._ring_block = allocator.alloc(_pages(total))
        base = self._ring_block.gpa
        self.layout = QueueLayout(size, base, base + avail_off, base + used_off)
        view = self._ring_block.view
        self._desc = view[: avail_off]
        self._avail = view[avail_off : avail_off + QueueLayout.avail_bytes(size)]
        self._used = view[used_off : used_off + QueueLayout.used_bytes(size)]
        self._free = list(range(size - 1, -1, -1))
        self._in_flight: dict[int, _InFlight] = {}
        self.avail_idx = 0
        self.last_used = 0
        self._kicked_at = 0
        self.kick_doorbell: Doorbell = EventDoorbell()
        self.call_doorbell: Doorbell = EventDoorbell()
        self.kicks = 0
        self._spare: dict[int, list[DmaBlock]] = {}
        self._spare_pages = 0

    def _alloc(self, pages: int) -> DmaBlock:
        spare = self._spare.get(pages)
        if spare:
            self._spare_pages -= pages
            return spare.pop()
        return self.allocator.alloc(pages)

    def _recycle(self, block: DmaBlock) -> None:
        # Keep freed chain buffers for reuse (no allocator search, no zeroing) up to a bound.
        pages = len(block.pfns)
        if self._spare_pages + pages > _SPARE_PAGES:
            self.allocator.free(block)
            return
        self._spare.setdefault(pages, []).append(block)
        self._spare_pages += pages

    def setup(self) -> QueueSetup:
        return QueueSetup(self.index, self.layout, self.kick_doorbell, self.call_doorbell)

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- posting -----------------------------------------------------------------------------------

    def add(
        self,
        readable: Sequence[_BufferLike] = (),
        writable: Sequence[int] = (),
        *,
        fragment: int | None = None,
        indirect: bool = False,
        token: Any = None,
    ) -> int:
        """Post one chain: ``readable`` buffers (copied into guest memory) then ``writable``
        buffers of the given sizes. ``fragment`` splits every buffer into pieces of at most that
        many bytes, never adjacent in guest memory; ``indirect`` puts the chain in an
        indirect table. Returns the head index. Raises :class:`QueueFull`."""
        if not readable and len(writable) == 1 and fragment is None and not indirect:
            return self._add_writable(writable[0], token)
        sizes: list[int] = []
        datas: list[_BufferLike | None] = []  # None: device-writable
        for buf in readable:
            data = buf if type(buf) is bytes else memoryview(buf).cast("B")
            n = len(data)
            if fragment is None or n <= fragment:
                datas.append(data)
                sizes.append(n)
            else:
                mv = memoryview(data)
                for off in range(0, n, fragment):
                    piece = mv[off : off + fragment]
                    datas.append(piece)
                    sizes.append(len(piece))
        for n in writable:
            if fragment is None or n <= fragment:
                datas.append(None)
                sizes.append(n)
            else:
                for off in range(0, n, fragment):
                    datas.append(None)
                    sizes.append(min(fragment, n - off))
        count = len(sizes)
        if not count:
            raise ValueError("a chain needs at least one buffer")
        free = self._free
        needed = 1 if indirect else count
        if needed > len(free):
            raise QueueFull(f"queue {self.index}: {needed} descriptors needed, {len(free)} free")
        # One block per chain. Pieces are laid out back to front, 64-byte aligned, with a 64-byte
        # gap between them, so consecutive pieces are never adjacent in guest memory.
        offsets = [0] * count
        end = 0
        for i in range(count - 1, -1, -1):
            offsets[i] = end
            end += ((sizes[i] + _PIECE_ALIGN - 1) & -_PIECE_ALIGN) + _PIECE_ALIGN
        table_off = end
        if indirect:
            end += 16 * count
        block = self._alloc((end + PAGE_SIZE - 1) // PAGE_SIZE)
        view = block.view
        base = block.gpa
        pack = DESCRIPTOR.pack_into
        if indirect:
            head = free.pop()
            used_descs = [head]
            table, first, links = view, table_off, list(range(1, count + 1))
            pack(self._desc, 16 * head, base + table_off, 16 * count, DESC_F_INDIRECT, 0)
        else:
            used_descs = free[-count:]
            del free[-count:]
            used_descs.reverse()
            head = used_descs[0]
            table, first, links = self._desc, 0, [*used_descs[1:], 0]
        writable_views: list[memoryview] = []
        writable_len = 0
        last = count - 1
        for i in range(count):
            off = offsets[i]
            size = sizes[i]
            src = datas[i]
            if src is None:
                writable_views.append(view[off : off + size])
                writable_len += size
                flags = DESC_F_WRITE
            else:
                view[off : off + size] = src
                flags = 0
            if i != last:
                flags |= DESC_F_NEXT
            slot = i if indirect else used_descs[i]
            pack(table, first + 16 * slot, base + off, size, flags, links[i] if i != last else 0)
        self._in_flight[head] = _InFlight(block, used_descs, writable_views, writable_len, token)
        U16.pack_into(self._avail, 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        U16.pack_into(self._avail, 2, self.avail_idx)
        return head

    def add_writable_many(self, count: int, size: int) -> int:
        """Post up to ``count`` receive buffers of ``size`` device-writable bytes each (one
        descriptor apiece, laid out as ``add`` would), as many as there are free descriptors,
        publishing the avail index once; returns how many were posted. Does not kick."""
        free = self._free
        count = min(count, len(free))
        if count <= 0:
            return 0
        pages = (((size + _PIECE_ALIGN - 1) & -_PIECE_ALIGN) + _PIECE_ALIGN + PAGE_SIZE - 1) // (
            PAGE_SIZE
        )
        alloc = self._alloc
        pack = DESCRIPTOR.pack_into
        desc = self._desc
        avail = self._avail
        in_flight = self._in_flight
        ring_size = self.size
        avail_idx = self.avail_idx
        for _ in range(count):
            block = alloc(pages)
            head = free.pop()
            pack(desc, 16 * head, block.gpa, size, DESC_F_WRITE, 0)
            in_flight[head] = _InFlight(block, [head], [block.view[:size]], size, None)
            U16.pack_into(avail, 4 + 2 * (avail_idx % ring_size), head)
            avail_idx = (avail_idx + 1) & 0xFFFF
        self.avail_idx = avail_idx
        U16.pack_into(avail, 2, avail_idx)
        return count

    def _add_writable(self, size: int, token: Any) -> int:
        # The common receive buffer (one device-writable descriptor), laid out as ``add`` would.
        free = self._free
        if not free:
            raise QueueFull(f"queue {self.index}: 1 descriptors needed, 0 free")
        end = ((size + _PIECE_ALIGN - 1) & -_PIECE_ALIGN) + _PIECE_ALIGN
        block = self._alloc((end + PAGE_SIZE - 1) // PAGE_SIZE)
        head = free.pop()
        DESCRIPTOR.pack_into(self._desc, 16 * head, block.gpa, size, DESC_F_WRITE, 0)
        self._in_flight[head] = _InFlight(block, [head], [block.view[:size]], size, token)
        avail_idx = self.avail_idx
        U16.pack_into(self._avail, 4 + 2 * (avail_idx % self.size), head)
        self.avail_idx = avail_idx = (avail_idx + 1) & 0xFFFF
        U16.pack_into(self._avail, 2, avail_idx)
        return head

    def add_readable(
        self, first: _BufferLike, second: _BufferLike | None = None, token: Any = None
    ) -> int:
        """Post a device-readable chain of one or two buffers (e.g. a packet header and its
        payload), copied into guest memory and laid out as ``add`` would lay them out; the lean
        path of the common transmit chain. Does not kick. Raises :class:`QueueFull`."""
        free = self._free
        n1 = len(first)
        if second is None or not len(second):
            if not free:
                raise QueueFull(f"queue {self.index}: 1 descriptors needed, 0 free")
            end = ((n1 + _PIECE_ALIGN - 1) & -_PIECE_ALIGN) + _PIECE_ALIGN
            block = self._alloc((end + PAGE_SIZE - 1) // PAGE_SIZE)
            block.view[:n1] = first
            head = free.pop()
            DESCRIPTOR.pack_into(self._desc, 16 * head, block.gpa, n1, 0, 0)
            descriptors = [head]
        else:
            if len(free) < 2:
                raise QueueFull(f"queue {self.index}: 2 descriptors needed, {len(free)} free")
            n2 = len(second)
            # Back to front, as ``add`` does: the second buffer first, then a gap, then the first.
            off1 = ((n2 + _PIECE_ALIGN - 1) & -_PIECE_ALIGN) + _PIECE_ALIGN
            end = off1 + ((n1 + _PIECE_ALIGN - 1) & -_PIECE_ALIGN) + _PIECE_ALIGN
            block = self._alloc((end + PAGE_SIZE - 1) // PAGE_SIZE)
            view = block.view
            view[:n2] = second
            view[off1 : off1 + n1] = first
            head = free.pop()
            nxt = free.pop()
            gpa = block.gpa
            pack = DESCRIPTOR.pack_into
            pack(self._desc, 16 * head, gpa + off1, n1, DESC_F_NEXT, nxt)
            pack(self._desc, 16 * nxt, gpa, n2, 0, 0)
            descriptors = [head, nxt]
        self._in_flight[head] = _InFlight(block, descriptors, _NO_VIEWS, 0, token)
        avail_idx = self.avail_idx
        U16.pack_into(self._avail, 4 + 2 * (avail_idx % self.size), head)
        self.avail_idx = avail_idx = (avail_idx + 1) & 0xFFFF
        U16.pack_into(self._avail, 2, avail_idx)
        return head

    def kick(self) -> bool:
        """Notify the device of new buffers if it asked for notifications; True if rung."""
        full_barrier()
        if self.event_idx:
            avail_event = U16.unpack_from(self._used, 4 + 8 * self.size)[0]
            needed = need_event(avail_event, self.avail_idx, self._kicked_at)
        else:
            needed = not U16.unpack_from(self._used, 0)[0] & RING_F_NO_NOTIFY
        self._kicked_at = self.avail_idx
        if needed:
            self.kicks += 1
            self.kick_doorbell.ring()
        return needed

    # -- collecting --------------------------------------------------------------------------------

    def get_used(self) -> UsedBuffer | None:
        """The next chain the device returned, or None."""
        taken = self._take_used()
        if taken is None:
            return None
        head, written, flight = taken
        parts = flight.writable
        if written == 0:
            data = b""
        elif len(parts) == 1:
            data = bytes(parts[0][:written])
        else:
            data = _joined(parts, written)
        self._recycle(flight.block)
        self._free.extend(reversed(flight.descriptors))
        return UsedBuffer(head, written, data, flight.token)

    def take_used_views(self) -> list[tuple[int, memoryview]]:
        """Every chain the device returned so far, as ``(written, data)`` like
        :meth:`get_used_view` gives them (views valid until the next ``add`` on this queue), with
        the same checks; the driver's used_event is written once for the batch."""
        out: list[tuple[int, memoryview]] = []
        self._collect(out)
        return out

    def reap(self) -> int:
        """Collect every chain the device returned without looking at what it wrote (transmit
        completions); returns how many. The same checks as :meth:`get_used` apply."""
        return self._collect(None)

    def _collect(self, views: list[tuple[int, memoryview]] | None) -> int:
        # Take every used entry (appending (written, data) to ``views`` unless it is None),
        # recycle the chains, and write used_event once; returns how many were taken.
        used_view = self._used
        used_idx = U16.unpack_from(used_view, 2)[0]
        last = self.last_used
        if used_idx == last:
            return 0
        size = self.size
        in_flight = self._in_flight
        free = self._free
        unpack = USED_ELEM.unpack_from
        recycle = self._recycle
        count = 0
        try:
            while last != used_idx:
                head, written = unpack(used_view, 4 + 8 * (last % size))
                flight = in_flight.pop(head, None)
                if flight is None:
                    raise DriverError(
                        f"device returned head {head} on queue {self.index}, not in flight"
                    )
                last = (last + 1) & 0xFFFF
                if written > flight.writable_len:
                    raise DriverError(
                        f"device wrote {written} bytes into chain {head} of queue {self.index},"
                        f" which has {flight.writable_len} writable bytes"
                    )
                if views is not None:
                    parts = flight.writable
                    views.append((
                        written,
                        parts[0][:written] if len(parts) == 1
                        else memoryview(_joined(parts, written)),
                    ))
                recycle(flight.block)
                descriptors = flight.descriptors
                if len(descriptors) == 1:
                    free.append(descriptors[0])
                else:
                    free.extend(reversed(descriptors))
                count += 1
        finally:
            self.last_used = last
            if self.event_idx:
                U16.pack_into(self._avail, 4 + 2 * size, last)
        return count

    def get_used_view(self) -> tuple[int, int, memoryview, Any] | None:
        """Like :meth:`get_used` without copying the written bytes: ``(head, written, data,
        token)`` where ``data`` views the buffer itself. The view is valid only until the next
        ``add`` on this queue (which may reuse the buffer)."""
        taken = self._take_used()
        if taken is None:
            return None
        head, written, flight = taken
        parts = flight.writable
        data = parts[0][:written] if len(parts) == 1 else memoryview(_joined(parts, written))
        self._recycle(flight.block)
        self._free.extend(reversed(flight.descriptors))
        return head, written, data, flight.token

    def _take_used(self) -> tuple[int, int, _InFlight] | None:
        used_idx = U16.unpack_from(self._used, 2)[0]
        if used_idx == self.last_used:
            return None
        head, written = USED_ELEM.unpack_from(self._used, 4 + 8 * (self.last_used % self.size))
        flight = self._in_flight.pop(head, None)
        if flight is None:
            raise DriverError(f"device returned head {head} on queue {self.index}, not in flight")
        self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            U16.pack_into(self._avail, 4 + 2 * self.size, self.last_used)
        if written > flight.writable_len:
            raise DriverError(
                f"device wrote {written} bytes into chain {head} of queue {self.index}, which has"
                f" {flight.writable_len} writable bytes"
            )
        return head, written, flight

    async def wait_used(self) -> UsedBuffer:
        """Wait for the next used chain."""
        while True:
            used = self.get_used()
            if used is not None:
                return used
            await self.call_doorbell.wait()

    def release(self) -> None:
        """Give back every page of this queue (the device must be stopped)."""
        for flight in self._in_flight.values():
            self.allocator.free(flight.block)
        self._in_flight.clear()
        for blocks in self._spare.values():
            for block in blocks:
                self.allocator.free(block)
        self._spare.clear()
        self._spare_pages = 0
        self.allocator.free(self._ring_block)


def _joined(parts: Sequence[memoryview], written: int) -> bytes:
    chunks = []
    need = written
    for view in parts:
        if need == 0:
            break
        chunks.append(view[:need])
        need -= len(chunks[-1])
    return b"".join(chunks)


class VirtioDriver:
    """A guest driver for one virtio device over a :class:`DeviceLink`."""

    def __init__(self, link: DeviceLink, memory: GuestMemory, allocator: DmaAllocator) -> None:
        self.link = link
        self.memory = memory
        self.allocator = allocator
        self.features = 0
        self.queues: list[DriverQueue] = []

    @property
    def offered_features(self) -> int:
        return self.link.offered_features

    async def start(self, *, queue_size: int = 256, features: int | None = None) -> None:
        """Negotiate ``features`` (default: everything offered), set up all queues with
        ``queue_size`` entries (capped at the device's maximum) and start them."""
        if self.queues:
            raise RuntimeError("the driver is already started; reset it first")
        offered = self.link.offered_features
        self.features = negotiate(offered, offered if features is None else features)
        size = min(queue_size, self.link.max_queue_size)
        event_idx = bool(self.features >> RING_EVENT_IDX & 1)
        self.queues = [
            DriverQueue(i, self.memory, self.allocator, size, event_idx=event_idx)
            for i in range(self.link.queue_count)
        ]
        try:
            await self.link.start(self.features, [q.setup() for q in self.queues])
        except BaseException:
            self._release()
            raise

    def queue(self, index: int) -> DriverQueue:
        return self.queues[index]

    def read_config(self, offset: int, size: int) -> bytes:
        return self.link.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        self.link.write_config(offset, data)

    async def reset(self) -> None:
        """Stop the device (its queues stop, it is closed) and free the rings and buffers."""
        await self.link.reset()
        self._release()

    def _release(self) -> None:
        for q in self.queues:
            q.release()
        self.queues = []
        self.features = 0

