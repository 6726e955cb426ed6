"""One virtqueue as the guest driver sees it: :class:`DriverQueue` posts buffers into guest
memory and collects what the device returned (:mod:`devicehost.virtio.driver` sets queues up).

Chains are device-readable data and device-writable space, as one descriptor per buffer, split
into non-contiguous fragments, or through an indirect table. Each chain's pieces live in one
block of whole pages; freed blocks are kept for reuse (per page count, up to a bound) so the
steady state allocates nothing. The device is not trusted: a used element naming a head that is
not in flight, or a written length beyond the chain's writable space, raises
:class:`DriverError`.

C accelerator (optional, :mod:`devicehost.accel`): when ``devicehost.virtio._driverc`` is built
and not turned off, a queue installs the C versions of ``add_readable``, ``add_segments``,
``add_writable_many``, ``reap``, ``take_used_views`` and ``kick`` as instance attributes. They
work on this object's own state (its ``__dict__``, free list, in-flight and spare dicts) and
cover the common case: exact bytes / bytearray / byte-format C-contiguous memoryview buffers,
chains whose block is in the spare lists, used entries whose chain is in flight, within its
writable space, with a single writable part (or none) and whose block goes back to the spare
lists. They decline everything else -- a full queue, no spare block (the allocator is
Python's), a lying device, a multi-part chain, unusual arguments or state -- by handing the call
(or the rest of a batch) to the pure-Python method, which decides every error. Return values,
bytes in guest memory, state and errors are the same with and without it
(tests/virtio/test_driverc.py compares them).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from types import MethodType
from typing import Any

import attrs

from devicehost import accel
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

__all__ = ["DriverError", "DriverQueue", "QueueFull", "QueueSetup", "UsedBuffer"]

if sys.byteorder != "little":  # pragma: no cover - the avail ring is written as native u16 words
    raise ImportError("devicehost.virtio.driverqueue needs a little-endian machine")

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


@attrs.frozen
class UsedBuffer:
    """A chain the device returned: head, length written, those bytes, the caller's token."""

    head: int
    written: int
    data: bytes
    token: Any = None


# A chain's buffer: (block, its guest address, a view of the whole block, its page count). Made
# once per block and recycled whole, so a chain costs no property lookups and no new view.
_Buffer = tuple[DmaBlock, int, memoryview, int]
# A chain in flight: (buffer, its descriptors head first, writable parts, writable bytes, token).
# The writable parts are a list of views, or the buffer's whole view when the chain's one
# writable piece starts the buffer (a receive buffer: the device's bytes are view[:written]).
_Flight = tuple[_Buffer, tuple[int, ...], list[memoryview] | memoryview, int, Any]

# byte layout: the le32 length field add_segments stores into each header
_LE32 = struct.Struct("<I")
_PIECE_ALIGN = 64
_NO_VIEWS: list[memoryview] = []  # the writable parts of a chain that has none (never changed)
# Recycled buffers kept per queue at most: 16 MiB, enough for a queue of 128 buffers of 64 KiB
# and a header (17 pages each) to run without the allocator. A queue that cannot allocate gives
# its spare blocks back and tries again (see _alloc).
_SPARE_PAGES = 4096


def _pages(n: int) -> int:
    return max(1, -(-n // PAGE_SIZE))


def _new_buffer(block: DmaBlock) -> _Buffer:
    return block, block.gpa, block.view, len(block.pfns)


def _part_view(parts: list[memoryview] | memoryview, written: int) -> memoryview:
    if type(parts) is memoryview:
        return parts[:written]
    if len(parts) == 1:
        return parts[0][:written]
    return memoryview(_joined(parts, written))


# The methods the C accelerator replaces on an accelerated queue (in the order it takes them
# as fallbacks).
_ACCELERATED = (
    "add_readable", "add_writable_many", "reap", "take_used_views", "kick", "add_segments"
)
# The optional C fast paths (devicehost/virtio/_driverc.c); looked up when a queue is made, so
# tests can switch them off by setting this to None.
_driverc = accel.load("devicehost.virtio._driverc")


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
        # The avail ring as native u16 words (the module refuses big-endian machines):
        # [1] idx, [2 + i] ring[i], [2 + size] used_event.
        self._avail_words = self._avail.cast("H")
        self._used = view[used_off : used_off + QueueLayout.used_bytes(size)]
        self._free = list(range(size - 1, -1, -1))
        self._in_flight: dict[int, _Flight] = {}
        self.avail_idx = 0
        self.last_used = 0
        self._kicked_at = 0
        self.kick_doorbell: Doorbell = EventDoorbell()
        self.call_doorbell: Doorbell = EventDoorbell()
        self.kicks = 0
        self._spare: dict[int, list[_Buffer]] = {}
        self._spare_pages = 0
        self._fast: Any = None
        if _driverc is not None and type(self) is DriverQueue:  # a subclass keeps its methods
            self._accelerate(_driverc)

    def _accelerate(self, driverc: Any) -> None:
        # The C object works on this queue's own state (its __dict__, free list, in-flight and
        # spare dicts); its methods, installed as instance attributes, take the common case and
        # pass everything else, arguments unchanged, to the methods of this class.
        try:
            fast = driverc.Queue(
                self.__dict__, self._desc, self._avail, self._used, self.size, self.event_idx,
                _SPARE_PAGES, _NO_VIEWS,
                tuple(MethodType(getattr(DriverQueue, name), self) for name in _ACCELERATED),
            )
        except (BufferError, TypeError, ValueError):
            return
        self._fast = fast
        for name in _ACCELERATED:
            self.__dict__[name] = getattr(fast, name)

    def _alloc(self, pages: int) -> _Buffer:
        spare = self._spare.get(pages)
        if spare:
            self._spare_pages -= pages
            return spare.pop()
        try:
            return _new_buffer(self.allocator.alloc(pages))
        except MemoryError:
            if not self._spare_pages:
                raise
        self._free_spare()
        return _new_buffer(self.allocator.alloc(pages))

    def _free_spare(self) -> None:
        for buffers in self._spare.values():
            for buffer in buffers:
                self.allocator.free(buffer[0])
        self._spare.clear()
        self._spare_pages = 0

    def _recycle(self, buf: _Buffer) -> None:
        # Keep freed chain buffers for reuse (no allocator search, no zeroing) up to a bound.
        pages = buf[3]
        if self._spare_pages + pages > _SPARE_PAGES:
            self.allocator.free(buf[0])
            return
        spare = self._spare.get(pages)
        if spare is None:
            self._spare[pages] = spare = []
        spare.append(buf)
        self._spare_pages += pages

    def setup(self) -> QueueSetup:
        return QueueSetup(self.index, self.layout, self.kick_doorbell, self.call_doorbell)

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def accelerated(self) -> bool:
        """Whether the C fast paths serve this queue."""
        return self._fast is not None

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
        buffer = self._alloc((end + PAGE_SIZE - 1) // PAGE_SIZE)
        _, base, view, _ = buffer
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
        self._in_flight[head] = (
            buffer, tuple(used_descs), writable_views or _NO_VIEWS, writable_len, token
        )
        self._publish(head)
        return head

    def _publish(self, head: int) -> None:
        self._enter(head)
        self._avail_words[1] = self.avail_idx

    def _enter(self, head: int) -> None:
        # The avail ring entry for ``head``; the avail index is the caller's to publish.
        avail_idx = self.avail_idx
        self._avail_words[2 + avail_idx % self.size] = head
        self.avail_idx = (avail_idx + 1) & 0xFFFF

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
        try:
            for _ in range(count):
                buffer = self._alloc(pages)
                head = free.pop()
                DESCRIPTOR.pack_into(self._desc, 16 * head, buffer[1], size, DESC_F_WRITE, 0)
                self._in_flight[head] = (buffer, (head,), buffer[2], size, None)
                self._enter(head)
        finally:
            self._avail_words[1] = self.avail_idx
        return count

    def _add_writable(self, size: int, token: Any) -> int:
        # The common receive buffer (one device-writable descriptor), laid out as ``add`` would.
        free = self._free
        if not free:
            raise QueueFull(f"queue {self.index}: 1 descriptors needed, 0 free")
        end = ((size + _PIECE_ALIGN - 1) & -_PIECE_ALIGN) + _PIECE_ALIGN
        buffer = self._alloc((end + PAGE_SIZE - 1) // PAGE_SIZE)
        head = free.pop()
        DESCRIPTOR.pack_into(self._desc, 16 * head, buffer[1], size, DESC_F_WRITE, 0)
        self._in_flight[head] = (buffer, (head,), buffer[2], size, token)
        self._publish(head)
        return head

    def add_readable(
        self, first: _BufferLike, second: _BufferLike | None = None, token: Any = None
    ) -> int:
        """Post a device-readable chain of one or two buffers (e.g. a packet header and its
        payload), copied into guest memory and laid out as ``add`` would lay them out; the lean
        path of the common transmit chain. Does not kick. Raises :class:`QueueFull`."""
        free = self._free
        n1 = len(first)
        if second is None or not (n2 := len(second)):
            if not free:
                raise QueueFull(f"queue {self.index}: 1 descriptors needed, 0 free")
            pages = (((n1 + _PIECE_ALIGN - 1) & -_PIECE_ALIGN) + _PIECE_ALIGN + PAGE_SIZE - 1) // (
                PAGE_SIZE
            )
            buffer = self._alloc(pages)
            buffer[2][:n1] = first
            head = free.pop()
            DESCRIPTOR.pack_into(self._desc, 16 * head, buffer[1], n1, 0, 0)
            self._in_flight[head] = (buffer, (head,), _NO_VIEWS, 0, token)
            self._publish(head)
            return head
        if len(free) < 2:
            raise QueueFull(f"queue {self.index}: 2 descriptors needed, {len(free)} free")
        head = self._enter_pair(first, n1, second, n2, token)
        self._avail_words[1] = self.avail_idx
        return head

    def _enter_pair(
        self, first: _BufferLike, n1: int, second: _BufferLike, n2: int, token: Any
    ) -> int:
        # A chain of two device-readable buffers (two free descriptors are the caller's to
        # check), laid out back to front as ``add`` does: the second buffer, a gap, the first.
        # The avail entry is written; the avail index is the caller's to publish.
        off1 = ((n2 + _PIECE_ALIGN - 1) & -_PIECE_ALIGN) + _PIECE_ALIGN
        pages = (off1 + ((n1 + _PIECE_ALIGN - 1) & -_PIECE_ALIGN) + _PIECE_ALIGN
                 + PAGE_SIZE - 1) // PAGE_SIZE
        buffer = self._alloc(pages)
        _, gpa, view, _ = buffer
        view[:n2] = second
        view[off1 : off1 + n1] = first
        free = self._free
        head = free.pop()
        nxt = free.pop()
        pack = DESCRIPTOR.pack_into
        pack(self._desc, 16 * head, gpa + off1, n1, DESC_F_NEXT, nxt)
        pack(self._desc, 16 * nxt, gpa, n2, 0, 0)
        self._in_flight[head] = (buffer, (head, nxt), _NO_VIEWS, 0, token)
        self._enter(head)
        return head

    def add_segments(
        self, header: _BufferLike, data: _BufferLike, segment: int, length_at: int
    ) -> int:
        """Post ``data`` cut into consecutive pieces of at most ``segment`` bytes, each as the
        two-buffer chain ``add_readable(header', piece)`` where ``header'`` is ``header`` with
        the piece's length stored as a le32 at byte ``length_at`` (e.g. a vsock RW header), while
        two descriptors are free. Returns how many bytes of ``data`` were posted (the pieces
        not posted are the caller's to send later). Does not kick; raises no QueueFull."""
        if segment <= 0:
            raise ValueError(f"segment must be positive, not {segment}")
        template = bytearray(header)
        n1 = len(template)
        if not 0 <= length_at <= n1 - 4:
            raise ValueError(f"a le32 at {length_at} is not inside a {n1}-byte header")
        view = memoryview(data).cast("B")
        total = len(view)
        free = self._free
        offset = 0
        try:
            while offset < total and len(free) >= 2:
                n = min(total - offset, segment)
                _LE32.pack_into(template, length_at, n)
                self._enter_pair(template, n1, view[offset : offset + n], n, None)
                offset += n
        finally:
            if offset:
                self._avail_words[1] = self.avail_idx
        return offset

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
        data = bytes(_part_view(flight[2], written)) if written else b""
        self._recycle(flight[0])
        self._free.extend(reversed(flight[1]))
        return UsedBuffer(head, written, data, flight[4])

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
        pop = self._in_flight.pop
        free = self._free
        spare = self._spare
        spare_pages = self._spare_pages
        unpack = USED_ELEM.unpack_from
        count = 0
        try:
            while last != used_idx:
                head, written = unpack(used_view, 4 + 8 * (last % size))
                flight = pop(head, None)
                if flight is None:
                    raise DriverError(
                        f"device returned head {head} on queue {self.index}, not in flight"
                    )
                last = (last + 1) & 0xFFFF
                buffer, descriptors, parts, writable_len, _ = flight
                if written > writable_len:
                    raise DriverError(
                        f"device wrote {written} bytes into chain {head} of queue {self.index},"
                        f" which has {writable_len} writable bytes"
                    )
                if views is not None:
                    views.append((
                        written,
                        parts[:written] if type(parts) is memoryview
                        else _part_view(parts, written),
                    ))
                pages = buffer[3]
                if spare_pages + pages > _SPARE_PAGES:
                    self.allocator.free(buffer[0])
                else:
                    kept = spare.get(pages)
                    if kept is None:
                        spare[pages] = kept = []
                    kept.append(buffer)
                    spare_pages += pages
                if len(descriptors) == 1:
                    free.append(descriptors[0])
                else:
                    free.extend(reversed(descriptors))
                count += 1
        finally:
            self.last_used = last
            self._spare_pages = spare_pages
            if self.event_idx:
                self._avail_words[2 + size] = last
        return count

    def get_used_view(self) -> tuple[int, int, memoryview, Any] | None:
        """Like :meth:`get_used` without copying the written bytes: ``(head, written, data,
        token)`` where ``data`` views the buffer itself. The view is valid only until the next
        ``add`` on this queue (which may reuse the buffer)."""
        taken = self._take_used()
        if taken is None:
            return None
        head, written, flight = taken
        data = _part_view(flight[2], written)
        self._recycle(flight[0])
        self._free.extend(reversed(flight[1]))
        return head, written, data, flight[4]

    def _take_used(self) -> tuple[int, int, _Flight] | None:
        used_idx = U16.unpack_from(self._used, 2)[0]
        last = self.last_used
        if used_idx == last:
            return None
        head, written = USED_ELEM.unpack_from(self._used, 4 + 8 * (last % self.size))
        flight = self._in_flight.pop(head, None)
        if flight is None:
            raise DriverError(f"device returned head {head} on queue {self.index}, not in flight")
        self.last_used = last = (last + 1) & 0xFFFF
        if self.event_idx:
            self._avail_words[2 + self.size] = last
        if written > flight[3]:
            raise DriverError(
                f"device wrote {written} bytes into chain {head} of queue {self.index}, which has"
                f" {flight[3]} writable bytes"
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
        fast, self._fast = self._fast, None
        if fast is not None:
            for name in _ACCELERATED:
                del self.__dict__[name]
            fast.close()
        for flight in self._in_flight.values():
            self.allocator.free(flight[0][0])
        self._in_flight.clear()
        self._free_spare()
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


