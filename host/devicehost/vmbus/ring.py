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

from types import MethodType
from typing import TYPE_CHECKING, Any, Final

from devicehost.vmbus.packet import (
    DESCRIPTOR,
    FLAG_COMPLETION_REQUESTED,
    GPA_DIRECT_HEADER,
    TRANSFER_PAGE_HEADER,
    IncomingPacket,
    OutgoingPacket,
    PacketType,
    TransferPageRange,
    TransferPages,
    in_band_size,
)
from devicehost.vmbus.ringcontrol import (
    FEATURE_SUPPORTS_PENDING_SEND_SIZE,
    MAX_PACKET_SIZE,
    WORD_FEATURES,
    WORD_IN,
    WORD_MASK,
    WORD_OUT,
    WORD_PSS,
    RingEmpty,
    RingEnd,
    RingFull,
    accelerator,
    check_index,
)
from devicehost.vmbus.ringmemory import (
    CONTROL_SIZE,
    RingError,
    RingErrorKind,
    RingMemory,
)
from devicehost.vmbus.ringwriter import OutgoingRing

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

_new_packet: Final = tuple.__new__
_unpack_descriptor: Final = DESCRIPTOR.unpack_from


class IncomingRing(RingEnd):
    """The reading end of a ring. Creating it masks interrupts (interrupt_mask = 1)."""

    def __init__(self, mem: RingMemory) -> None:
        super().__init__(mem)
        self._out = check_index(self._words[WORD_OUT], self._size, "out")
        self._cursor = self._out
        self._words[WORD_MASK] = 1
        self._wrapped = bytearray()
        fast = accelerator(mem) if type(self) is IncomingRing else None
        self._fast: Any = fast
        if fast is not None:
            # The C read, commit and read_batch, as this object's own attributes (no Python
            # frame per packet), over indices the C object keeps; what they decline goes to the
            # methods below, which see those indices through _AcceleratedIncomingRing's
            # properties.
            fast.out_index = self.__dict__.pop("_out")
            fast.cursor = self.__dict__.pop("_cursor")
            self.__class__ = _AcceleratedIncomingRing
            fast.bind(MethodType(IncomingRing.read, self), self._signal_after_commit,
                      MethodType(IncomingRing.read_batch, self))
            self.__dict__["read"] = fast.read
            self.__dict__["commit"] = fast.commit
            self.__dict__["read_batch"] = fast.read_batch

    @property
    def peer_supports_pending_send_size(self) -> bool:
        return bool(self._words[WORD_FEATURES] & FEATURE_SUPPORTS_PENDING_SEND_SIZE)

    @property
    def interrupt_mask(self) -> bool:
        return self._words[WORD_MASK] != 0

    def set_interrupt_mask(self, masked: bool) -> None:
        """Ask the writer (not) to signal when it makes the ring non-empty."""
        self._words[WORD_MASK] = 1 if masked else 0

    def is_empty(self) -> bool:
        """Whether there is nothing to read past the packets already read (validates ``in``)."""
        return check_index(self._words[WORD_IN], self._size, "in") == self._cursor

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
            packets, start = self._fast.read_from(start, inp, max_packets)
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
        words[WORD_OUT] = new
        self._out = new
        if not words[WORD_PSS] & ~7:
            return False
        return self._signal_after_commit(old)

    def _signal_after_commit(self, old: int) -> bool:
        """Whether the commit that moved ``out`` from ``old`` to ``_out`` must signal the writer
        (its pending_send_size is set)."""
        pss = self._words[WORD_PSS] & ~7
        inp = check_index(self._words[WORD_IN], self._size, "in")
        return self._free(inp, old) < pss <= self._free(inp, self._out)

    def rollback(self) -> None:
        """Forget the packets read since the last commit: they will be read again."""
        self._cursor = self._out


class _AcceleratedIncomingRing(IncomingRing):
    """An :class:`IncomingRing` whose indices live in its C accelerator (see ``__init__``)."""

    @property
    def _cursor(self) -> int:
        return self._fast.cursor  # type: ignore[no-any-return]

    @_cursor.setter
    def _cursor(self, value: int) -> None:
        self._fast.cursor = value

    @property
    def _out(self) -> int:
        return self._fast.out_index  # type: ignore[no-any-return]

    @_out.setter
    def _out(self, value: int) -> None:
        self._fast.out_index = value
