"""The Hyper-V ring buffer: one direction of a VMBus channel, byte for byte, over shared memory.

A ring is one 4096-byte control page followed by ``data_len`` bytes of data (a multiple of 4096).
This module is pure and synchronous: it reads and writes the ring's memory and raises
:class:`RingEmpty`, :class:`RingFull` or :class:`RingError`; waiting is layered on top
(:mod:`devicehost.vmbus.pipe`, :mod:`devicehost.vmbus.channel`).

Rules this module keeps (facts §3):

- The ring memory belongs to both peers; every value read from it is untrusted. Whatever the
  control page or the data area say, the ring never touches memory outside them; corruption
  raises :class:`RingError` with a :class:`RingErrorKind` and blames the peer.
- The reader owns ``out`` and ``interrupt_mask``; the writer owns ``in``, ``pending_send_size``
  and ``feature_bits``. Each endpoint keeps its own index locally (read once from the control
  page when it is created, so a restored ring continues where it was) and re-reads only the
  peer's index, validating it every time.
- A reader's packets are not released to the writer until :meth:`IncomingRing.commit`; payload
  views handed out by :meth:`IncomingRing.read` are valid until then (a payload that wraps
  around the end of contiguous memory is a view of a copy the ring reuses a lap later).

Decisions on ambiguous upstream behaviour:

- [AMBIGUOUS] Upstream rejects a packet whose total size is ``>= data_len - 8`` but also states
  ``maximum_packet_size = data_len - 8`` and sizes pipe messages so that they take exactly that
  many bytes. An empty ring has ``data_len - 8`` free bytes, so such a packet fits: here a packet
  is too large only when it is ``> data_len - 8`` bytes (:attr:`OutgoingRing.maximum_packet_size`
  is inclusive).
- [AMBIGUOUS] Upstream's reader checks ``available >= length`` without the 8-byte footer, which
  would let a lying writer move ``out`` past ``in``. Here the footer must be available too
  (``available >= length + 8``), else InvalidDescriptorLengths.
- A GPA-direct packet with ``range_count == 0`` and a transfer-page packet whose ranges do not
  fit before its payload are InvalidDescriptorLengths.
- ``pending_send_size`` is honoured whether or not the writer set the feature bit (the bit is
  advertised by our writer and reported by :attr:`IncomingRing.peer_supports_pending_send_size`).

Speed: the hot paths (in-band packets that do not wrap, over contiguous memory) are inlined, each
in-band packet is written by one ``struct.pack_into`` (descriptor, payload, padding, footer), and
payloads are read as zero-copy views. ``write_inband_batch`` / ``read_batch`` amortise the control
page accesses and the signalling decision over many packets. ``reserve_inband`` /
``publish_inband`` let a writer build a payload (or read a file) right in the ring's free space.
Any other packet, wrapping or scattered, is written with one copy of each part, and a wrapping
payload is read with one copy. Every check stays on every path.

C accelerator (optional, :mod:`devicehost.accel`): when ``devicehost.vmbus._ringc`` is built and
the data area is one writable view, each ring end gets a ``_ringc.Ring`` over its memory. The
writer's ``write_inband`` and the reader's ``read`` and ``commit`` are then that object's bound
methods, installed as instance attributes (no Python frame per packet; the C object keeps the
index in this object's ``__dict__``), and ``write_inband_batch`` / ``read_batch`` start with a C
loop. The C code takes only in-band packets that need no wrapping; anything else it declines, and
the methods of this class run unchanged, so every error and every unusual packet is decided here.
The C stores of ``in`` / ``out`` are release stores followed by a full fence before the
signalling check, which also makes the cross-process handshake exact on that path.

Memory ordering: in one process every access is ordered (one thread, the GIL). Across processes
CPython issues no fences; x86 keeps stores ordered (payload before ``in``) but may let the
mask/index check of the signalling handshake pass a store, so cross-process waiters
(:class:`devicehost.vmbus.channel.EventfdSignal`) re-poll periodically as a backstop.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from types import MethodType
from typing import TYPE_CHECKING, Any, Final

from devicehost import accel
from devicehost.vmbus.packet import (
    DESCRIPTOR,
    FLAG_COMPLETION_REQUESTED,
    FOOTER,
    GPA_DIRECT_HEADER,
    TRANSFER_PAGE_HEADER,
    IncomingPacket,
    OutgoingPacket,
    PacketType,
    TransferPageRange,
    TransferPages,
    in_band_size,
)
from devicehost.vmbus.ringmemory import (
    CONTROL_SIZE,
    RingError,
    RingErrorKind,
    RingMemory,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "CONTROL_SIZE",
    "FEATURE_SUPPORTS_PENDING_SEND_SIZE",
    "FLAG_COMPLETION_REQUESTED",
    "MAX_PACKET_SIZE",
    "IncomingPacket",
    "IncomingRing",
    "OutgoingPacket",
    "OutgoingRing",
    "PacketType",
    "RingEmpty",
    "RingError",
    "RingErrorKind",
    "RingFull",
    "RingMemory",
    "TransferPageRange",
    "TransferPages",
    "in_band_size",
]

if sys.byteorder != "little":  # pragma: no cover - every VMBus host is little-endian
    raise ImportError("devicehost.vmbus.ring needs a little-endian machine")

FEATURE_SUPPORTS_PENDING_SEND_SIZE: Final = 1

# The packet types and values are defined in devicehost.vmbus.packet and re-exported here.

# Control page, as u32 words (little-endian; we index a native "I" cast of the page):
#   word 0  in (write index)          written by the writer
#   word 1  out (read index)          written by the reader
#   word 2  interrupt_mask            written by the reader (non-zero: do not signal me)
#   word 3  pending_send_size         written by the writer (signal me when this much is free)
#   word 16 feature_bits              written by the writer (bit 0: pending_send_size supported)
_IN: Final = 0
_OUT: Final = 1
_MASK: Final = 2
_PSS: Final = 3
_FEATURES: Final = 16

_ZEROS: Final = bytes(8)

#: The largest packet the format can describe: length8 is a u16 count of 8-byte units, so
#: descriptor + payload + padding is at most 0xFFFF * 8 bytes, plus the 8-byte footer. On rings
#: over 512 KiB this, not the ring's size, bounds a packet.
MAX_PACKET_SIZE: Final = 0xFFFF * 8 + 8

# A whole in-band packet with an n-byte payload, written by one pack_into: descriptor, payload,
# zero padding to 8, footer (packet.py has the layout). Cached per payload size, up to a bound.
_INBAND_STRUCTS: dict[int, struct.Struct] = {}
_INBAND_STRUCTS_MAX: Final = 1024


def _inband_struct(n: int) -> struct.Struct:
    st = _INBAND_STRUCTS.get(n)
    if st is None:
        st = struct.Struct(f"<HHHHQ{n}s{-n & 7}xQ")
        if len(_INBAND_STRUCTS) < _INBAND_STRUCTS_MAX:
            _INBAND_STRUCTS[n] = st
    return st


class RingEmpty(Exception):
    """Raised when the reader finds no packet in the ring."""


class RingFull(Exception):
    """Raised when the writer finds less than ``needed`` free bytes in the ring."""

    def __init__(self, needed: int) -> None:
        self.needed = needed
        super().__init__(f"the ring needs {needed} free bytes")


# The optional C fast paths (devicehost/vmbus/_ringc.c): in-band packets that need no wrapping,
# over contiguous memory. Whatever they do not handle comes back here unchanged.
_ringc = accel.load("devicehost.vmbus._ringc")


def _accelerator(mem: RingMemory) -> Any:
    """The C fast paths over ``mem``, or None (not built, turned off, or scattered memory)."""
    data = mem.data
    if _ringc is None or data is None or data.format != "B" or data.readonly:
        return None
    try:
        return _ringc.Ring(mem.control, data, IncomingPacket)
    except (BufferError, TypeError, ValueError):
        return None


_new_packet: Final = tuple.__new__
_unpack_descriptor: Final = DESCRIPTOR.unpack_from


def _check_index(value: int, size: int, what: str) -> int:
    if value >= size or value & 7:
        raise RingError(RingErrorKind.INVALID_RING_POINTER, f"{what} index {value:#x}")
    return value


def _validate_size(mem: RingMemory) -> None:
    # Packet lengths are u16 counts of 8-byte units and offsets u32: a ring larger than the
    # format can address is refused up front.
    if mem.data_len > 1 << 31:
        raise RingError(RingErrorKind.INVALID_RING_MEMORY, "the data area is too large")


class IncomingRing:
    """The reading end of a ring. Creating it masks interrupts (interrupt_mask = 1)."""

    def __init__(self, mem: RingMemory) -> None:
        _validate_size(mem)
        self.mem = mem
        self._words = mem.words
        self._data = mem.data
        self._size = mem.data_len
        self._out = _check_index(self._words[_OUT], self._size, "out")
        self._cursor = self._out
        self._words[_MASK] = 1
        self._wrapped = bytearray()
        self._fast = _accelerator(mem)
        if self._fast is not None:
            # The C read and commit, as this object's own attributes (no Python frame per
            # packet); what they decline goes to the methods below.
            self._fast.bind(self.__dict__, MethodType(IncomingRing.read, self),
                            self._signal_after_commit)
            self.__dict__["read"] = self._fast.bound_read
            self.__dict__["commit"] = self._fast.bound_commit

    @property
    def data_len(self) -> int:
        return self._size

    @property
    def maximum_packet_size(self) -> int:
        """The largest packet (descriptor + payload + footer) the ring can ever hold."""
        return min(self._size - 8, MAX_PACKET_SIZE)

    @property
    def peer_supports_pending_send_size(self) -> bool:
        return bool(self._words[_FEATURES] & FEATURE_SUPPORTS_PENDING_SEND_SIZE)

    @property
    def interrupt_mask(self) -> bool:
        return self._words[_MASK] != 0

    def set_interrupt_mask(self, masked: bool) -> None:
        """Ask the writer (not) to signal when it makes the ring non-empty."""
        self._words[_MASK] = 1 if masked else 0

    def is_empty(self) -> bool:
        """Whether there is nothing to read past the packets already read (validates ``in``)."""
        return _check_index(self._words[_IN], self._size, "in") == self._cursor

    def read(self) -> IncomingPacket:
        """Read the next packet and move past it (released to the writer on :meth:`commit`).

        Raises :class:`RingEmpty` when there is none, :class:`RingError` when it is corrupt.
        """
        size = self._size
        inp = self._words[0]
        start = self._cursor
        data = self._data
        if data is not None and inp != start and inp < size and not inp & 7:
            # Fast path, as in peek (inlined: one call less per packet).
            stop = inp if inp > start else size
            if start + 16 <= stop:
                kind, doff8, len8, flags, tid = _unpack_descriptor(data, start)
                nxt = start + (len8 << 3) + 8
                if (doff8 == 2 and len8 >= 2 and nxt <= stop and flags <= 1
                        and (kind == 6 or kind == 11)):
                    self._cursor = 0 if nxt == size else nxt
                    return _new_packet(IncomingPacket, (
                        kind, tid, flags == 1, data[start + 16 : start + (len8 << 3)], b"",
                        start, start + 16, self._cursor))
        packet = self.peek()
        self._cursor = packet[7]
        return packet

    def consume(self, packet: IncomingPacket) -> None:
        """Move past ``packet``, which :meth:`peek` just returned."""
        if packet[5] != self._cursor:
            raise ValueError("consume() takes the packet peek() returned last")
        self._cursor = packet[7]

    def peek(self) -> IncomingPacket:
        """Read the next packet without moving past it."""
        size = self._size
        inp = self._words[0]  # in
        if inp >= size or inp & 7:
            raise RingError(RingErrorKind.INVALID_RING_POINTER, f"in index {inp:#x}")
        start = self._cursor
        if inp == start:
            raise RingEmpty
        data = self._data
        stop = inp if inp > start else size
        if data is not None and start + 16 <= stop:
            # Fast path, as in read_batch.
            kind, doff8, len8, flags, tid = DESCRIPTOR.unpack_from(data, start)
            nxt = start + (len8 << 3) + 8
            if (doff8 == 2 and len8 >= 2 and nxt <= stop and flags <= 1
                    and (kind == 6 or kind == 11)):
                return _new_packet(IncomingPacket, (
                    kind, tid, flags == 1, data[start + 16 : start + (len8 << 3)], b"", start,
                    start + 16, 0 if nxt == size else nxt))
        return self._parse(start, inp - start if inp > start else size + inp - start)

    def read_batch(self, max_packets: int = 64) -> list[IncomingPacket]:
        """Read up to ``max_packets`` packets (at least one, else :class:`RingEmpty`) and move
        past them; ``in`` is read once. A corrupt packet raises after the good ones before it
        were read (they stay read: :meth:`commit` or :meth:`rollback`)."""
        size = self._size
        inp = self._words[0]  # in
        if inp >= size or inp & 7:
            raise RingError(RingErrorKind.INVALID_RING_POINTER, f"in index {inp:#x}")
        start = self._cursor
        if inp == start:
            raise RingEmpty
        packets: list[IncomingPacket]
        if self._fast is not None:
            packets, start = self._fast.read_batch(start, inp, max_packets)
            self._cursor = start
            if len(packets) == max_packets or start == inp:
                return packets
        else:
            packets = []
        append = packets.append
        parse = self._parse
        data = self._data
        unpack = DESCRIPTOR.unpack_from
        new, cls = _new_packet, IncomingPacket
        count = len(packets)
        try:
            while count < max_packets and start != inp:
                count += 1
                # Fast path: a plain in-band/completion packet lying in the contiguous stretch
                # [start, stop) of readable bytes. Anything else goes to _parse, which checks
                # everything again and handles wrapping and scattered pages.
                stop = inp if inp > start else size
                if data is not None and start + 16 <= stop:
                    kind, doff8, len8, flags, tid = unpack(data, start)
                    nxt = start + (len8 << 3) + 8
                    if (doff8 == 2 and len8 >= 2 and nxt <= stop and flags <= 1
                            and (kind == 6 or kind == 11)):
                        if nxt == size:
                            nxt = 0
                        append(new(cls, (
                            kind, tid, flags == 1, data[start + 16 : start + (len8 << 3)], b"",
                            start, start + 16, nxt)))
                        start = nxt
                        continue
                packet = parse(start, inp - start if inp > start else size + inp - start)
                append(packet)
                start = packet[7]
        finally:
            self._cursor = start
        return packets

    def _parse(self, start: int, avail: int) -> IncomingPacket:
        size = self._size
        if avail < 16:
            raise RingError(RingErrorKind.INVALID_DATA_AVAILABLE, f"{avail} bytes available")
        data = self._data
        if data is not None and start + 16 <= size:
            kind, doff8, len8, flags, tid = DESCRIPTOR.unpack_from(data, start)
        else:
            kind, doff8, len8, flags, tid = DESCRIPTOR.unpack(self.mem.read(start, 16))
        length = len8 << 3
        if len8 < doff8 or doff8 < 2 or avail < length + 8:
            raise RingError(RingErrorKind.INVALID_DESCRIPTOR_LENGTHS,
                            f"data_offset8 {doff8}, length8 {len8}, {avail} bytes available")
        if flags & ~FLAG_COMPLETION_REQUESTED:
            raise RingError(RingErrorKind.INVALID_DESCRIPTOR_FLAGS, f"flags {flags:#x}")
        extension = b""
        if kind == 6 or kind == 11:
            if doff8 > 2:
                extension = bytes(self.mem.read((start + 16) % size, (doff8 - 2) << 3))
        elif kind == 9 or kind == 7:
            extension = self._extension(kind, start, doff8)
        else:
            raise RingError(RingErrorKind.INVALID_DESCRIPTOR_TYPE, f"type {kind}")
        pstart = start + (doff8 << 3)
        plen = length - (doff8 << 3)
        if data is not None and pstart + plen <= size:
            payload: memoryview | bytes = data[pstart : pstart + plen]
        elif data is not None:
            # The one packet per lap that wraps: copied into a buffer this ring reuses, which
            # stays valid until the next lap, i.e. beyond the commit that releases it.
            pstart %= size
            if len(self._wrapped) < plen:
                self._wrapped = bytearray(plen)
            payload = memoryview(self._wrapped)[:plen]
            first = size - pstart if pstart + plen > size else plen
            payload[:first] = data[pstart : pstart + first]
            payload[first:] = data[: plen - first]
        else:
            pstart %= size
            payload = self.mem.read(pstart, plen)
        nxt = start + length + 8
        if nxt >= size:
            nxt -= size
        return _new_packet(IncomingPacket,
                           (kind, tid, flags == 1, payload, extension, start, pstart, nxt))

    def _extension(self, kind: int, start: int, doff8: int) -> bytes:
        if doff8 < 3:
            raise RingError(RingErrorKind.INVALID_DESCRIPTOR_LENGTHS,
                            f"data_offset8 {doff8} leaves no room for the type {kind} header")
        ext = bytes(self.mem.read((start + 16) % self._size, (doff8 - 2) << 3))
        if kind == 9:
            _, count = GPA_DIRECT_HEADER.unpack_from(ext)
            if count == 0:
                raise RingError(RingErrorKind.INVALID_DESCRIPTOR_LENGTHS,
                                "a GPA-direct packet without ranges")
        else:
            _, _, count = TRANSFER_PAGE_HEADER.unpack_from(ext)
            if 8 + 8 * count > len(ext):
                raise RingError(RingErrorKind.INVALID_DESCRIPTOR_LENGTHS,
                                f"{count} transfer-page ranges do not fit in {len(ext)} bytes")
        return ext

    def overwrite(self, packet: IncomingPacket, offset: int, data: Buffer) -> None:
        """Write ``data`` into ``packet``'s payload at ``offset`` (used by byte-mode pipes to
        rewrite a partly consumed packet's header in place)."""
        n = memoryview(data).nbytes
        if offset < 0 or offset + n > len(packet.payload):
            raise ValueError("the write does not fit in the packet's payload")
        self.mem.write((packet.payload_offset + offset) % self._size, data)

    def _free(self, inp: int, out: int) -> int:
        return (out - inp - 8) if out > inp else self._size - (inp - out) - 8

    def commit(self) -> bool:
        """Release every packet read so far to the writer.

        Returns whether to signal the writer: its pending_send_size (low 3 bits ignored) is
        non-zero and this commit moved the free space from below it to at least it.
        """
        words = self._words
        old = self._out
        new = self._cursor
        if new == old:
            return False
        words[_OUT] = new
        self._out = new
        if not words[_PSS] & ~7:
            return False
        return self._signal_after_commit(old)

    def _signal_after_commit(self, old: int) -> bool:
        """Whether the commit that moved ``out`` from ``old`` to ``_out`` must signal the writer
        (its pending_send_size is set)."""
        pss = self._words[_PSS] & ~7
        inp = _check_index(self._words[_IN], self._size, "in")
        return self._free(inp, old) < pss <= self._free(inp, self._out)

    def rollback(self) -> None:
        """Forget the packets read since the last commit: they will be read again."""
        self._cursor = self._out


class OutgoingRing:
    """The writing end of a ring. Creating it advertises pending_send_size support and clears
    pending_send_size."""

    def __init__(self, mem: RingMemory) -> None:
        _validate_size(mem)
        self.mem = mem
        self._words = mem.words
        self._data = mem.data
        self._size = mem.data_len
        self._in = _check_index(self._words[_IN], self._size, "in")
        #: Where reserve_inband began a packet in ``_scratch`` (-1: none).
        self._scratch = bytearray()
        self._scratch_at = -1
        self._words[_FEATURES] = FEATURE_SUPPORTS_PENDING_SEND_SIZE
        self._words[_PSS] = 0
        self._fast = _accelerator(mem)
        if self._fast is not None:
            # The C write_inband as this object's own attribute (see IncomingRing.__init__).
            self._fast.bind(self.__dict__, MethodType(OutgoingRing.write_inband, self), None)
            self.__dict__["write_inband"] = self._fast.bound_write_inband

    @property
    def data_len(self) -> int:
        return self._size

    @property
    def maximum_packet_size(self) -> int:
        """The largest packet (descriptor + payload + footer) the ring can ever hold."""
        return min(self._size - 8, MAX_PACKET_SIZE)

    def free_bytes(self) -> int:
        """Bytes free for packets now (validates the reader's ``out``)."""
        out = _check_index(self._words[_OUT], self._size, "out")
        inp = self._in
        return (out - inp - 8) if out > inp else self._size - (inp - out) - 8

    def can_write(self, total: int) -> bool:
        """Whether a packet of ``total`` bytes fits now."""
        return self.free_bytes() >= total

    @property
    def pending_send_size(self) -> int:
        return int(self._words[_PSS])

    def set_pending_send_size(self, size: int) -> None:
        """Ask the reader to signal once ``size`` bytes are free (0: don't)."""
        if size < 0 or size > self._size - 8:
            raise RingError(RingErrorKind.INVALID_MESSAGE_LENGTH,
                            f"pending send size {size} exceeds {self._size - 8}")
        self._words[_PSS] = (size + 7) & ~7

    def write_inband(self, payload: Buffer | Sequence[Buffer], *, transaction_id: int = 0,
                     completion_requested: bool = False) -> bool:
        """Write one in-band packet and commit it. Returns whether to signal the reader.

        ``payload`` is one bytes-like object, or a tuple or list of them written back to back.
        """
        start = self._in
        flags = 1 if completion_requested else 0
        data = self._data
        if data is not None and type(payload) is bytes:
            # Fast path: one bytes payload that does not wrap (same checks as _put).
            n = len(payload)
            msg_len = (n + 23) & ~7
            end = start + msg_len
            size = self._size
            if msg_len + 8 > size - 8 or msg_len + 8 > MAX_PACKET_SIZE:
                raise RingError(RingErrorKind.INVALID_MESSAGE_LENGTH,
                                f"a {msg_len + 8}-byte packet can never fit in a {size}-byte ring")
            words = self._words
            out = words[1]
            if out >= size or out & 7:
                raise RingError(RingErrorKind.INVALID_RING_POINTER, f"out index {out:#x}")
            free = (out - start - 8) if out > start else size - (start - out) - 8
            if free < msg_len + 8:
                raise RingFull(msg_len + 8)
            if end + 8 <= size:
                st = _INBAND_STRUCTS.get(n) or _inband_struct(n)
                st.pack_into(data, start, 6, 2, msg_len >> 3, flags, transaction_id, payload,
                             start << 32)
                end += 8
                self._in = end - size if end >= size else end
                words[0] = self._in
                return words[2] == 0 and words[1] == start
        self._put(6, 2, b"", payload, flags, transaction_id)
        return self._commit(start)

    def reserve_inband(self, n: int) -> memoryview:
        """A writable view of the payload of the next in-band packet, ``n`` bytes, for the
        caller to build (or read data) into; :meth:`publish_inband` then sends it.

        The view is right in the ring's free space when the packet lies in contiguous memory
        without wrapping (publishing copies nothing); otherwise it is in a buffer the ring
        reuses, and publishing writes the packet with one copy, wrapping it as needed.
        Raises :class:`RingFull` / :class:`RingError` as :meth:`write_inband` would. Nothing is
        visible to the reader until :meth:`publish_inband`, which must be the next write.
        """
        data = self._data
        size = self._size
        start = self._in
        total = ((n + 23) & ~7) + 8
        if total > size - 8 or total > MAX_PACKET_SIZE:
            raise RingError(RingErrorKind.INVALID_MESSAGE_LENGTH,
                            f"a {total}-byte packet can never fit in a {size}-byte ring")
        out = self._words[1]
        if out >= size or out & 7:
            raise RingError(RingErrorKind.INVALID_RING_POINTER, f"out index {out:#x}")
        if ((out - start - 8) if out > start else size - (start - out) - 8) < total:
            raise RingFull(total)
        if data is None or start + total > size:
            # The whole packet is built in the scratch buffer and written at publish.
            if len(self._scratch) < total:
                self._scratch = bytearray(total)
            self._scratch_at = start
            return memoryview(self._scratch)[16 : 16 + n]
        self._scratch_at = -1
        return data[start + 16 : start + 16 + n]

    def publish_inband(self, n: int, *, transaction_id: int = 0,
                       completion_requested: bool = False) -> bool:
        """Complete the packet whose ``n`` payload bytes were written into the view
        :meth:`reserve_inband` (``n``) returned: write its descriptor, padding and footer around
        them and commit it. Returns whether to signal the reader.

        Raises :class:`RingError` (InvalidRingPointer, the reader's fault) if the reader's ``out``
        moved backwards since the reservation, so that the packet no longer fits.
        """
        size = self._size
        start = self._in
        msg_len = (n + 23) & ~7
        end = start + msg_len
        words = self._words
        out = words[1]
        if out >= size or out & 7:
            raise RingError(RingErrorKind.INVALID_RING_POINTER, f"out index {out:#x}")
        free = (out - start - 8) if out > start else size - (start - out) - 8
        if free < msg_len + 8:
            raise RingError(RingErrorKind.INVALID_RING_POINTER,
                            f"out index {out:#x} took back space reserved for a packet")
        flags = 1 if completion_requested else 0
        pad = msg_len - 16 - n
        if self._scratch_at == start:
            self._scratch_at = -1
            image = self._scratch
            DESCRIPTOR.pack_into(image, 0, 6, 2, msg_len >> 3, flags, transaction_id)
            if pad:
                image[msg_len - pad : msg_len] = _ZEROS[:pad]
            FOOTER.pack_into(image, msg_len, start << 32)
            self.mem.write(start, memoryview(image)[: msg_len + 8])
        else:
            data = self._data
            if data is None or end + 8 > size:
                raise ValueError("publish_inband() completes the packet reserve_inband() began")
            DESCRIPTOR.pack_into(data, start, 6, 2, msg_len >> 3, flags, transaction_id)
            if pad:
                data[end - pad : end] = _ZEROS[:pad]
            FOOTER.pack_into(data, end, start << 32)
        end += 8
        self._in = end - size if end >= size else end
        words[0] = self._in
        return words[2] == 0 and words[1] == start

    def write_completion(self, transaction_id: int, payload: Buffer = b"") -> bool:
        """Write one completion packet and commit it. Returns whether to signal the reader."""
        start = self._in
        self._put(11, 2, b"", payload, 0, transaction_id)
        return self._commit(start)

    def write_inband_batch(self, payloads: Sequence[Buffer]) -> tuple[int, bool]:
        """Write in-band packets (no completion requested, transaction id 0) while they fit,
        then commit them together. Returns (packets written, whether to signal the reader);
        raises :class:`RingFull` if not even the first one fits."""
        if type(payloads) is not list and type(payloads) is not tuple:
            payloads = list(payloads)
        start = self._in
        size = self._size
        words = self._words
        data = self._data
        # The reader only ever frees space, so one snapshot of ``out`` is a safe bound.
        out = words[1]
        if out >= size or out & 7:
            raise RingError(RingErrorKind.INVALID_RING_POINTER, f"out index {out:#x}")
        pos = start
        free = (out - pos - 8) if out > pos else size - (pos - out) - 8
        written = 0
        if self._fast is not None:
            pos, written = self._fast.write_inband_batch(pos, payloads)
            if written == len(payloads):
                self._in = pos
                return written, self._commit(start)
            # The C loop may have seen a later ``out`` than ours: take a fresh snapshot.
            out = words[1]
            if out >= size or out & 7:  # all or nothing, as when _put finds it below
                self._in = start
                raise RingError(RingErrorKind.INVALID_RING_POINTER, f"out index {out:#x}")
            free = (out - pos - 8) if out > pos else size - (pos - out) - 8
            payloads = payloads[written:]
        structs = _INBAND_STRUCTS
        for payload in payloads:
            if data is not None and type(payload) is bytes:
                n = len(payload)
                msg_len = (n + 23) & ~7
                end = pos + msg_len
                # Fast path: it fits and is not too large for the format, and does not wrap.
                if msg_len + 8 <= free and end + 8 <= size and msg_len + 8 <= MAX_PACKET_SIZE:
                    st = structs.get(n) or _inband_struct(n)
                    st.pack_into(data, pos, 6, 2, msg_len >> 3, 0, 0, payload, pos << 32)
                    pos = end + 8 if end + 8 < size else 0
                    free -= msg_len + 8
                    written += 1
                    continue
            self._in = pos
            try:
                self._put(6, 2, b"", payload, 0, 0)
            except RingFull:
                self._in = pos
                if written:
                    break
                raise
            except BaseException:
                self._in = start
                raise
            written += 1
            free -= (self._in - pos) % size
            pos = self._in
        self._in = pos
        return written, self._commit(start)

    def write(self, packet: OutgoingPacket) -> bool:
        """Write any packet and commit it. Returns whether to signal the reader."""
        return self.write_batch((packet,))

    def write_batch(self, packets: Sequence[OutgoingPacket]) -> bool:
        """Write packets back to back and commit them together; all or none are written.

        Returns whether to signal the reader (it was unmasked and the ring was empty).
        """
        start = self._in
        try:
            for p in packets:
                ext = p.extension()
                flags = FLAG_COMPLETION_REQUESTED if (
                    p.completion_requested or p.kind in (PacketType.GPA_DIRECT,
                                                         PacketType.TRANSFER_PAGES)) else 0
                self._put(int(p.kind), 2 + len(ext) // 8, ext, p.payload, flags, p.transaction_id)
        except BaseException:
            self._in = start
            raise
        return self._commit(start)

    def _put(self, kind: int, doff8: int, ext: bytes, payload: Buffer | Sequence[Buffer],
             flags: int, tid: int) -> None:
        t = type(payload)
        if t is bytes or t is bytearray:
            parts: Sequence[Buffer] = (payload,)  # type: ignore[assignment]
            n = len(payload)  # type: ignore[arg-type]
        elif t is tuple or t is list:
            parts = payload  # type: ignore[assignment]
            n = 0
            for p in parts:
                n += len(p) if type(p) is bytes else memoryview(p).nbytes
        else:
            # Any other object is one buffer (memoryview, array, mmap, a bytes subclass...).
            parts = (payload,)  # type: ignore[assignment]
            n = memoryview(payload).nbytes  # type: ignore[arg-type]
        header = doff8 << 3
        msg_len = (header + n + 7) & ~7
        total = msg_len + 8
        size = self._size
        if total > size - 8 or total > MAX_PACKET_SIZE:
            raise RingError(RingErrorKind.INVALID_MESSAGE_LENGTH,
                            f"a {total}-byte packet can never fit in a {size}-byte ring")
        out = self._words[_OUT]
        if out >= size or out & 7:
            raise RingError(RingErrorKind.INVALID_RING_POINTER, f"out index {out:#x}")
        start = self._in
        free = (out - start - 8) if out > start else size - (start - out) - 8
        if free < total:
            raise RingFull(total)
        data = self._data
        end = start + msg_len
        pad = msg_len - header - n
        if data is not None and end + 8 <= size:
            # One copy of each part straight into the ring.
            DESCRIPTOR.pack_into(data, start, kind, doff8, msg_len >> 3, flags, tid)
            if ext:
                data[start + 16 : start + header] = ext
            pos = start + header
            for part in parts:
                if type(part) is not bytes:
                    part = memoryview(part).cast("B")
                k = len(part)
                data[pos : pos + k] = part
                pos += k
            if pad:
                data[pos : pos + pad] = _ZEROS[:pad]
            FOOTER.pack_into(data, end, start << 32)
        else:
            # Wrapping or scattered: each piece is written where it lands (still one copy).
            write = self.mem.write
            write(start, DESCRIPTOR.pack(kind, doff8, msg_len >> 3, flags, tid) + ext)
            pos = start + header
            for part in parts:
                if pos >= size:
                    pos -= size
                write(pos, part)
                pos += memoryview(part).nbytes
            if pos >= size:
                pos -= size
            write(pos, _ZEROS[:pad] + FOOTER.pack(start << 32))
        end += 8
        self._in = end - size if end >= size else end

    def _commit(self, start: int) -> bool:
        words = self._words
        words[_IN] = self._in
        return words[_MASK] == 0 and words[_OUT] == start
