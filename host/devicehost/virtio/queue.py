"""The virtio 1.x split virtqueue, device side, over guest memory (sans-I/O).

Layout (all little endian), ``size`` a power of two from 1 to 32768::

    descriptor table, 16-byte aligned, ``size`` entries of 16 bytes:
        0  le64 addr     guest physical address of the buffer
        8  le32 len      buffer length
        12 le16 flags    NEXT=1 (``next`` is valid), WRITE=2 (device writes), INDIRECT=4
        14 le16 next     index of the following descriptor when NEXT is set
    available ring (driver -> device), 2-byte aligned, 6 + 2 * size bytes:
        0  le16 flags    NO_INTERRUPT=1 (without EVENT_IDX: the driver wants no used interrupts)
        2  le16 idx      free-running count of heads the driver made available
        4  le16 ring[size]
        4 + 2*size le16 used_event (EVENT_IDX: interrupt when used idx passes this)
    used ring (device -> driver), 4-byte aligned, 6 + 8 * size bytes:
        0  le16 flags    NO_NOTIFY=1 (without EVENT_IDX: the device wants no kicks)
        2  le16 idx      free-running count of used elements written
        4  {le32 id; le32 len} ring[size]
        4 + 8*size le16 avail_event (EVENT_IDX: kick when avail idx passes this)

Trust rules: every value read from the rings comes from the guest. A guest that lies gets a
:class:`QueueError` naming what it did; the queue is then *broken* and raises the same error on
every later ``pop``, so a device loop can neither spin nor hang on it. The work of one ``pop`` is
bounded by the queue size (direct chains) plus the indirect table size (at most 32768 entries).

Decisions (AMBIGUOUS in the spec):
- An INDIRECT descriptor must be the only descriptor of its chain in the main table (head, no
  NEXT), as every known driver builds it; an INDIRECT flag anywhere else is a QueueError.
- A device-readable descriptor after a device-writable one is a QueueError (the spec says the
  driver MUST NOT build such chains).
- A chain whose total length exceeds 2**32 - 1 bytes is a QueueError (``used.len`` is 32 bits).

Chains in flight: the queue remembers, in pop order, the heads it popped and has not had back
(``push`` / ``add_used`` / ``add_used_many``), so that a save can carry them
(:attr:`QueueState.inflight`, read by :meth:`SplitQueue.state`). A queue built from a state
with chains in flight returns those chains first, each once, from ``pop`` and ``pop_many``,
re-read from the descriptor table and validated like any chain, before any new chain; they do
not move ``last_avail_idx`` (the driver made them available once). This is how a chain a device
held but did not complete when it was stopped (a save, a handover to another process) is
replayed exactly once; a chain the device pushed is not. The bookkeeping is one store per chain
popped and per chain returned into a table of one 32-bit word per head (``IN_FLIGHT`` | the avail
position it was popped at; the C accelerator keeps the same table on its paths); the order of
the chains in flight is their pop order, by age relative to ``last_avail_idx`` (so a chain held
while more than 65535 others pass is ordered as if younger). A head the guest puts on the ring
again while it is in flight (a guest bug) is tracked once.

C accelerator (optional, :mod:`devicehost.accel`): when ``devicehost.virtio._queuec`` is built
and guest memory is one region, each queue binds a ``_queuec.Queue`` to its rings. It serves
``pop`` and ``pop_many``: direct chains of at most 64 descriptors inside the region, built into
DescriptorChain objects without Python code; ``add_used_many`` with valid heads and lengths in
lists or tuples; and the fence plus used_event / flags look of ``push`` / ``needs_interrupt``
(the memory ordering rules are in the C file's header). It declines, and this module then does
the work and raises the precise error, on everything else: a head outside the table, an avail
index jumping more than the queue size, indirect descriptors, ranges outside memory, loops, a
readable descriptor after a writable one, a next index out of range, longer chains, a chain of
more than 2**32 - 1 bytes, a released memory region, an invalid used head or length, a length
count mismatch. Results, errors, state and guest memory are the same with and without it
(``tests/virtio/test_queuec.py``); ``_queuec`` is looked up at each call, so tests can switch it
off.
"""

from __future__ import annotations

import array
import contextlib
import struct
import threading
from collections.abc import Sequence
from typing import Any, Final

import attrs

from devicehost import accel
from devicehost.memory import GuestMemory, GuestMemoryError

__all__ = [
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_WRITE",
    "MAX_QUEUE_SIZE",
    "RING_F_NO_INTERRUPT",
    "RING_F_NO_NOTIFY",
    "DescriptorChain",
    "QueueError",
    "QueueLayout",
    "QueueState",
    "SplitQueue",
    "full_barrier",
    "need_event",
]

DESC_F_NEXT: Final = 1
DESC_F_WRITE: Final = 2
DESC_F_INDIRECT: Final = 4
RING_F_NO_NOTIFY: Final = 1  # used.flags
RING_F_NO_INTERRUPT: Final = 1  # avail.flags
MAX_QUEUE_SIZE: Final = 32768
MAX_INDIRECT: Final = 32768
#: The in-flight table's mark (its low 16 bits: the avail position the chain was popped at).
_IN_FLIGHT: Final = 0x10000
_MAX_CHAIN_BYTES: Final = 0xFFFFFFFF

# byte layout: descriptor = le64 addr, le32 len, le16 flags, le16 next
DESCRIPTOR: Final = struct.Struct("<QIHH")
# byte layout: one le16 (ring flags, ring idx, avail ring entries, event words)
U16: Final = struct.Struct("<H")
# byte layout: used element = le32 id, le32 len
USED_ELEM: Final = struct.Struct("<II")


_BARRIER_LOCK: Final = threading.Lock()

# The optional C fast paths (devicehost/virtio/_queuec.c). Looked up at each call, so tests can
# switch the accelerator off by setting this to None.
_queuec = accel.load("devicehost.virtio._queuec")


def full_barrier() -> None:
    """A full memory barrier between this side's ring store and its next ring load.

    Where the other side runs in another process (vhost-user), "publish index, then read the
    peer's event index" must not be reordered (x86 may reorder a store with a later load), or both
    sides can miss each other's notification and the queue stalls. Acquiring an uncontended lock
    is an atomic read-modify-write, which is a full barrier on x86.
    """
    with _BARRIER_LOCK:
        pass


class QueueError(Exception):
    """Raised when the guest broke the virtqueue contract (the guest is to blame)."""


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if moving an index from ``old_idx`` to ``new_idx`` crossed ``event_idx`` (mod 2**16)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@attrs.frozen
class QueueLayout:
    """Where a split queue lives: its size and the guest addresses of its three parts."""

    size: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int

    @staticmethod
    def desc_bytes(size: int) -> int:
        return 16 * size

    @staticmethod
    def avail_bytes(size: int) -> int:
        return 6 + 2 * size

    @staticmethod
    def used_bytes(size: int) -> int:
        return 6 + 8 * size


@attrs.frozen
class QueueState:
    """The device's position in a queue: what ``GET_VRING_BASE`` and save/restore carry.

    ``inflight``: the heads popped but not yet returned, in pop order (module docstring); a
    queue built from this state replays them first.
    """

    last_avail_idx: int = 0
    used_idx: int = 0
    inflight: tuple[int, ...] = ()


class DescriptorChain:
    """One popped descriptor chain: device-readable parts, then device-writable parts.

    The parts are memoryviews straight into guest memory, validated when the chain was popped.
    ``read`` consumes the readable parts sequentially (a cursor); ``write_at`` writes anywhere in
    the writable parts.
    """

    __slots__ = ("_read_pos", "head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self, head: int, readable: Sequence[memoryview], writable: Sequence[memoryview]
    ) -> None:
        self.head = head
        self.readable: tuple[memoryview, ...] = tuple(readable)
        self.writable: tuple[memoryview, ...] = tuple(writable)
        self.readable_len = sum(len(v) for v in self.readable)
        self.writable_len = sum(len(v) for v in self.writable)
        self._read_pos = 0

    @classmethod
    def _of(
        cls, head: int, readable: list[memoryview], writable: list[memoryview],
        readable_len: int, writable_len: int,
    ) -> DescriptorChain:
        # The queue's constructor: the lengths are already known.
        chain = cls.__new__(cls)
        chain.head = head
        chain.readable = tuple(readable)
        chain.writable = tuple(writable)
        chain.readable_len = readable_len
        chain.writable_len = writable_len
        chain._read_pos = 0
        return chain

    def __repr__(self) -> str:
        return (
            f"<DescriptorChain head={self.head} readable={self.readable_len}"
            f" writable={self.writable_len}>"
        )

    @property
    def remaining(self) -> int:
        """Readable bytes not yet consumed by ``read``."""
        return self.readable_len - self._read_pos

    def read(self, max_bytes: int = -1) -> bytes:
        """Consume and return up to ``max_bytes`` (all if negative) of the readable bytes."""
        start = self._read_pos
        left = self.readable_len - start
        n = left if max_bytes < 0 else min(max_bytes, left)
        out = self.peek(start, n)
        self._read_pos = start + n
        return out

    def peek(self, offset: int, size: int) -> bytes:
        """A copy of ``size`` readable bytes at ``offset`` (clamped to the readable length)."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        size = max(0, min(size, self.readable_len - offset))
        if size == 0:
            return b""
        parts = self.readable
        if len(parts) == 1:
            return bytes(parts[0][offset : offset + size])
        chunks: list[memoryview] = []
        need = size
        for part in parts:
            if offset >= len(part):
                offset -= len(part)
                continue
            piece = part[offset : offset + need]
            chunks.append(piece)
            need -= len(piece)
            offset = 0
            if need == 0:
                break
        return b"".join(chunks)

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset`` of the writable parts; returns ``offset + len(data)``.

        Raises ValueError (a device bug, not the guest's) if it does not fit.
        """
        src = memoryview(data).cast("B")
        if offset < 0 or offset + len(src) > self.writable_len:
            raise ValueError(
                f"write of {len(src)} bytes at {offset} exceeds the chain's {self.writable_len}"
                " writable bytes"
            )
        end = offset + len(src)
        for part in self.writable:
            if not src:
                break
            if offset >= len(part):
                offset -= len(part)
                continue
            n = min(len(part) - offset, len(src))
            part[offset : offset + n] = src[:n]
            src = src[n:]
            offset = 0
        return end


class SplitQueue:
    """The device side of one split virtqueue.

    ``pop`` returns the next available chain (or None); ``push`` puts a chain on the used ring and
    says whether the driver must be interrupted. ``enable_notifications`` and
    ``disable_notifications`` control the driver's kicks (``used.flags``, or with EVENT_IDX
    ``avail_event``).
    """

    def __init__(
        self,
        memory: GuestMemory,
        layout: QueueLayout,
        *,
        event_idx: bool = False,
        indirect: bool = True,
        state: QueueState = QueueState(),
    ) -> None:
        size = layout.size
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if layout.desc_gpa % 16 or layout.avail_gpa % 2 or layout.used_gpa % 4:
            raise QueueError(f"misaligned queue parts {layout}")
        self.memory = memory
        self.layout = layout
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        try:
            self._desc = memory.view(layout.desc_gpa, QueueLayout.desc_bytes(size))
            self._avail = memory.view(layout.avail_gpa, QueueLayout.avail_bytes(size))
            self._used = memory.view(layout.used_gpa, QueueLayout.used_bytes(size))
        except GuestMemoryError as exc:
            raise QueueError(f"queue rings are outside guest memory: {exc}") from None
        regions = memory.regions
        # Fast path for the common single-region memory: bounds-check and slice directly.
        self._flat: tuple[int, int, memoryview] | None = (
            (regions[0].gpa, regions[0].end, regions[0].view) if len(regions) == 1 else None
        )
        self.last_avail_idx = state.last_avail_idx & 0xFFFF
        #: The guest's avail idx as last read and validated; ``pop`` reads it again only once
        #: every entry up to it was popped.
        self._avail_shadow = self.last_avail_idx
        self.used_idx = state.used_idx & 0xFFFF
        self._signalled_used = self.used_idx
        self._notify = True
        self.broken: QueueError | None = None
        inflight = tuple(state.inflight)
        if len(set(inflight)) != len(inflight) or any(
                not 0 <= h < size for h in inflight):
            raise QueueError(f"chains in flight {inflight[:8]}... are not distinct heads of a"
                             f" {size}-entry queue")
        #: Per head: _IN_FLIGHT | the avail position it was popped at, or 0 (module docstring).
        self._track = array.array("I", bytes(4 * size))
        #: Heads of a saved state's chains in flight, returned by pop before any new chain
        #: (the last one first), and the avail position their pop order starts at.
        self._replay: list[int] = list(reversed(inflight))
        self._replay_base = (self.last_avail_idx - len(inflight)) & 0xFFFF
        self._replay_count = len(inflight)
        self._fast: Any = None
        if _queuec is not None and self._flat is not None:
            region = regions[0]
            # An unusual region (format, alignment) is refused: the pure-Python paths serve it.
            with contextlib.suppress(TypeError, ValueError):
                self._fast = _queuec.Queue(
                    self._desc, self._avail, self._used, region.view, region.gpa, size,
                    DescriptorChain, track=self._track,
                )

    # -- state -----------------------------------------------------------------------------------

    def state(self) -> QueueState:
        """Where the device is, with the chains in flight in pop order (replays due included)."""
        last = self.last_avail_idx
        ages = [((last - (word & 0xFFFF)) & 0xFFFF, head)
                for head, word in enumerate(self._track) if word & _IN_FLIGHT]
        base = self._replay_base
        done = self._replay_count - len(self._replay)
        ages += [((last - base - done - i) & 0xFFFF, head)
                 for i, head in enumerate(reversed(self._replay))]
        ages.sort(key=lambda item: -item[0])  # oldest first; stable for equal ages
        return QueueState(last, self.used_idx, tuple(head for _, head in ages))

    def inflight(self) -> tuple[int, ...]:
        """The heads popped and not returned yet, in pop order (not counting replays due)."""
        replays = set(self._replay)
        return tuple(h for h in self.state().inflight if h not in replays)

    def _pop_replay(self) -> DescriptorChain:
        head = self._replay.pop()
        chain = self._walk(head)  # validated as any chain (a QueueError breaks the queue)
        done = self._replay_count - len(self._replay) - 1
        self._track[head] = _IN_FLIGHT | ((self._replay_base + done) & 0xFFFF)
        return chain

    def _avail_idx(self) -> int:
        return U16.unpack_from(self._avail, 2)[0]  # type: ignore[no-any-return]

    def has_available(self) -> bool:
        """True if the driver made buffers available that ``pop`` has not returned yet (chains
        to replay included)."""
        return bool(self._replay) or self._avail_idx() != self.last_avail_idx

    # -- notifications (driver -> device) ---------------------------------------------------------

    def enable_notifications(self) -> bool:
        """Ask the driver to kick on new buffers; True if some are already available."""
        self._notify = True
        if self.event_idx:
            U16.pack_into(self._used, 4 + 8 * self.size, self.last_avail_idx)
        else:
            U16.pack_into(self._used, 0, U16.unpack_from(self._used, 0)[0] & ~RING_F_NO_NOTIFY)
        full_barrier()
        return self.has_available()

    def disable_notifications(self) -> None:
        """Tell the driver that kicks are not needed (the device is polling)."""
        self._notify = False
        if not self.event_idx:
            U16.pack_into(self._used, 0, U16.unpack_from(self._used, 0)[0] | RING_F_NO_NOTIFY)

    # -- pop ---------------------------------------------------------------------------------------

    def _fail(self, message: str) -> QueueError:
        self.broken = QueueError(message)
        return self.broken

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None; QueueError if the guest lied."""
        if self.broken is not None:
            raise self.broken
        if self._replay:
            return self._pop_replay()
        fast = self._fast
        if fast is not None and _queuec is not None:
            chain = fast.pop(self)
            if chain is not False:
                return chain  # type: ignore[no-any-return]
        last = self.last_avail_idx
        if last == self._avail_shadow:
            # Everything seen so far is popped: read the guest's index again (a real device
            # keeps the same shadow copy and validates each new value once).
            avail_idx = U16.unpack_from(self._avail, 2)[0]
            pending = (avail_idx - last) & 0xFFFF
            if pending == 0:
                return None
            if pending > self.size:
                raise self._fail(
                    f"guest moved avail idx to {avail_idx}, {pending} entries past the device's"
                    f" {last}, more than the queue size {self.size}"
                )
            self._avail_shadow = avail_idx
        head = U16.unpack_from(self._avail, 4 + 2 * (last % self.size))[0]
        chain = self._walk(head)
        self._track[head] = _IN_FLIGHT | last
        self.last_avail_idx = last = (last + 1) & 0xFFFF
        if self.event_idx and self._notify:
            U16.pack_into(self._used, 4 + 8 * self.size, last)
        return chain

    def pop_many(self, limit: int | None = None) -> list[DescriptorChain]:
        """Every available chain in order, as repeated :meth:`pop` calls would return them.

        At most ``limit`` chains, and never more than the queue size in one call (an honest
        driver cannot have more outstanding; a guest in another process that keeps publishing
        cannot keep the device here). The state afterwards (indices, ``avail_event``) is the one
        the same number of ``pop`` calls leaves. If the guest broke the queue after some chains
        were popped, those are returned and the queue is broken: the next ``pop`` or
        ``pop_many`` raises the QueueError. If the first chain is already bad, it is raised.
        """
        if self.broken is not None:
            raise self.broken
        size = self.size
        if limit is None:
            limit = size
        elif limit < 0:
            raise ValueError(f"negative pop_many limit {limit}")
        else:
            limit = min(limit, size)
        chains: list[DescriptorChain] = []
        while self._replay and len(chains) < limit:
            try:
                chains.append(self._pop_replay())
            except QueueError:
                if not chains:
                    raise
                return chains
        track = self._track
        last = start = self.last_avail_idx
        avail = self._avail
        unpack = U16.unpack_from
        walk = self._walk
        fast = self._fast if _queuec is not None else None
        try:
            while len(chains) < limit:
                if fast is not None:
                    # The C walk pops what it can; a declined entry takes one turn of the loop
                    # below (which pops it or raises), then the C walk goes on.
                    got = fast.pop_many(chains, last, self._avail_shadow, limit)
                    self.last_avail_idx = last = got & 0xFFFF
                    self._avail_shadow = got >> 16 & 0xFFFF
                    if got < 1 << 32 or len(chains) >= limit:
                        break
                if last == self._avail_shadow:
                    avail_idx = unpack(avail, 2)[0]
                    pending = (avail_idx - last) & 0xFFFF
                    if pending == 0:
                        break
                    if pending > size:
                        raise self._fail(
                            f"guest moved avail idx to {avail_idx}, {pending} entries past the"
                            f" device's {last}, more than the queue size {size}"
                        )
                    self._avail_shadow = avail_idx
                head = unpack(avail, 4 + 2 * (last % size))[0]
                chains.append(walk(head))
                track[head] = _IN_FLIGHT | last
                self.last_avail_idx = last = (last + 1) & 0xFFFF
        except QueueError:
            if not chains:
                raise
        if last != start and self.event_idx and self._notify:
            U16.pack_into(self._used, 4 + 8 * size, last)
        return chains

    def _buffer(self, addr: int, length: int) -> memoryview:
        flat = self._flat
        if flat is not None:
            start, end, view = flat
            if start <= addr and addr + length <= end:
                return view[addr - start : addr - start + length]
            raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is outside guest memory")
        return self.memory.view(addr, length)

    def _walk(self, head: int) -> DescriptorChain:
        flat = self._flat
        if flat is None or head >= self.size:
            return self._walk_general(head)
        # The common chain: direct descriptors in single-region memory. Anything else (an
        # indirect descriptor, a range outside memory) is handed to the general walk, which
        # starts over and raises the precise error; every check of the general walk is made
        # here or there.
        start, end, memory = flat
        unpack = DESCRIPTOR.unpack_from
        table = self._desc
        size = self.size
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        readable_len = writable_len = 0
        index = head
        count = 0
        while True:
            count += 1
            if count > size:
                return self._walk_general(head)
            addr, length, flags, nxt = unpack(table, 16 * index)
            if flags & DESC_F_INDIRECT or addr < start or addr + length > end:
                return self._walk_general(head)
            offset = addr - start
            if flags & DESC_F_WRITE:
                writable.append(memory[offset : offset + length])
                writable_len += length
            elif writable:
                return self._walk_general(head)
            else:
                readable.append(memory[offset : offset + length])
                readable_len += length
            if not flags & DESC_F_NEXT:
                break
            if nxt >= size:
                return self._walk_general(head)
            index = nxt
        if readable_len + writable_len > _MAX_CHAIN_BYTES:
            return self._walk_general(head)
        return DescriptorChain._of(head, readable, writable, readable_len, writable_len)

    def _walk_general(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise self._fail(
                f"guest put head {head} on the avail ring of a {self.size}-entry queue"
            )
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        readable_len = writable_len = 0
        flat = self._flat
        unpack = DESCRIPTOR.unpack_from
        table = self._desc
        table_size = self.size
        where = "descriptor table"
        index = head
        count = 0
        while True:
            count += 1
            if count > table_size:
                raise self._fail(
                    f"guest chain at head {head} in the {where} is longer than its {table_size}"
                    " entries (a descriptor loop)"
                )
            addr, length, flags, nxt = unpack(table, 16 * index)
            if flags & DESC_F_INDIRECT:
                if where != "descriptor table":
                    raise self._fail(f"guest nested an indirect descriptor in chain {head}")
                if not self.indirect:
                    raise self._fail(
                        f"guest used an indirect descriptor in chain {head} without"
                        " RING_INDIRECT_DESC"
                    )
                if count != 1 or flags & DESC_F_NEXT:
                    raise self._fail(
                        f"guest's indirect descriptor {index} in chain {head} is not the chain's"
                        " only descriptor"
                    )
                if length == 0 or length % 16 or length // 16 > MAX_INDIRECT:
                    raise self._fail(
                        f"guest's indirect table in chain {head} has invalid length {length}"
                    )
                try:
                    table = self._buffer(addr, length)
                except GuestMemoryError:
                    raise self._fail(
                        f"guest's indirect table {addr:#x}+{length:#x} in chain {head} is outside"
                        " guest memory"
                    ) from None
                table_size = length // 16
                where = "indirect table"
                index = 0
                count = 0
                continue
            if flat is not None and flat[0] <= addr and addr + length <= flat[1]:
                start = addr - flat[0]
                view = flat[2][start : start + length]
            else:
                try:
                    view = self._buffer(addr, length)
                except GuestMemoryError:
                    raise self._fail(
                        f"guest's descriptor {index} ({where}) in chain {head} points outside"
                        f" guest memory: {addr:#x}+{length:#x}"
                    ) from None
            if flags & DESC_F_WRITE:
                writable.append(view)
                writable_len += length
            elif writable:
                raise self._fail(
                    f"guest chain {head} has a device-readable descriptor after a writable one"
                )
            else:
                readable.append(view)
                readable_len += length
            if readable_len + writable_len > _MAX_CHAIN_BYTES:
                raise self._fail(f"guest chain {head} is longer than 2**32-1 bytes")
            if not flags & DESC_F_NEXT:
                return DescriptorChain._of(head, readable, writable, readable_len, writable_len)
            if nxt >= table_size:
                raise self._fail(
                    f"guest's descriptor {index} ({where}) in chain {head} links to {nxt}, outside"
                    f" the {table_size} entries"
                )
            index = nxt

    # -- push / notifications (device -> driver) -------------------------------------------------

    def push(self, head: int, written: int) -> bool:
        """Return chain ``head`` with ``written`` bytes written; True if the driver wants an
        interrupt now (used ring flags, or EVENT_IDX's used_event)."""
        self.add_used(head, written)
        return self._should_interrupt()

    def add_used(self, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes written without deciding on an interrupt
        (a batch of these is followed by one :meth:`needs_interrupt`, as the virtio spec allows:
        the event index comparison covers every entry added since the last decision)."""
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} is not a descriptor of this {self.size}-entry queue")
        if not 0 <= written <= _MAX_CHAIN_BYTES:
            raise ValueError(f"written length {written} does not fit in le32")
        old = self.used_idx
        USED_ELEM.pack_into(self._used, 4 + 8 * (old % self.size), head, written)
        new = (old + 1) & 0xFFFF
        U16.pack_into(self._used, 2, new)
        self.used_idx = new
        self._track[head] = 0

    def add_used_many(self, heads: Sequence[int], written: int | Sequence[int] = 0) -> None:
        """:meth:`add_used` for each of ``heads`` in order, publishing the used index once at
        the end; ``written`` is one length for all or one per head."""
        fast = self._fast
        if fast is not None and _queuec is not None:
            idx = fast.used_many(heads, written, self.used_idx)
            if idx >= 0:
                self.used_idx = idx  # the C path cleared the heads' in-flight words
                return
        size = self.size
        lengths = [written] * len(heads) if isinstance(written, int) else written
        if len(lengths) != len(heads):
            raise ValueError(f"{len(heads)} heads but {len(lengths)} written lengths")
        used = self._used
        pack = USED_ELEM.pack_into
        idx = self.used_idx
        for head, length in zip(heads, lengths, strict=True):
            if not 0 <= head < size:
                raise ValueError(f"head {head} is not a descriptor of this {size}-entry queue")
            if not 0 <= length <= _MAX_CHAIN_BYTES:
                raise ValueError(f"written length {length} does not fit in le32")
            pack(used, 4 + 8 * (idx % size), head, length)
            idx = (idx + 1) & 0xFFFF
        U16.pack_into(used, 2, idx)
        self.used_idx = idx
        track = self._track
        for head in heads:
            track[head] = 0

    def needs_interrupt(self) -> bool:
        """True if the used entries added since the last decision need an interrupt now (used
        ring flags, or EVENT_IDX's used_event); False when nothing was added since."""
        if self.used_idx == self._signalled_used:
            return False
        return self._should_interrupt()

    def _should_interrupt(self) -> bool:
        new = self.used_idx
        fast = self._fast
        if fast is not None and _queuec is not None:
            old = self._signalled_used
            self._signalled_used = new
            return fast.should_interrupt(new, old, self.event_idx)  # type: ignore[no-any-return]
        full_barrier()
        if self.event_idx:
            used_event = U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
            old = self._signalled_used
            self._signalled_used = new
            return need_event(used_event, new, old)
        self._signalled_used = new
        return not U16.unpack_from(self._avail, 0)[0] & RING_F_NO_INTERRUPT
