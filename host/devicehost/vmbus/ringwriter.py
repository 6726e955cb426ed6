"""The writing end of a Hyper-V ring (:mod:`devicehost.vmbus.ring` documents the ring, its rules
and its decisions; this module is re-exported there)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import MethodType
from typing import TYPE_CHECKING, Any, cast

from devicehost.vmbus.packet import (
    DESCRIPTOR,
    FLAG_COMPLETION_REQUESTED,
    FOOTER,
    OutgoingPacket,
    PacketType,
)
from devicehost.vmbus.ringcontrol import (
    FEATURE_SUPPORTS_PENDING_SEND_SIZE,
    INBAND_STRUCTS,
    MAX_PACKET_SIZE,
    WORD_FEATURES,
    WORD_IN,
    WORD_MASK,
    WORD_OUT,
    WORD_PSS,
    ZEROS,
    RingEnd,
    RingFull,
    accelerator,
    check_index,
    inband_struct,
)
from devicehost.vmbus.ringmemory import RingError, RingErrorKind, RingMemory

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["OutgoingRing"]


class OutgoingRing(RingEnd):
    """The writing end of a ring. Creating it advertises pending_send_size support and clears
    pending_send_size."""

    def __init__(self, mem: RingMemory) -> None:
        super().__init__(mem)
        self._in = check_index(self._words[WORD_IN], self._size, "in")
        #: Where reserve_inband began a packet in ``_scratch`` (-1: none).
        self._scratch = bytearray()
        self._scratch_at = -1
        self._words[WORD_FEATURES] = FEATURE_SUPPORTS_PENDING_SEND_SIZE
        self._words[WORD_PSS] = 0
        fast = accelerator(mem) if type(self) is OutgoingRing else None
        self._fast: Any = fast
        if fast is not None:
            # The C write_inband and write_inband_batch as this object's own attributes, over
            # the `in` index the C object keeps (as in IncomingRing.__init__).
            fast.in_index = self.__dict__.pop("_in")
            self.__class__ = _AcceleratedOutgoingRing
            fast.bind(MethodType(OutgoingRing.write_inband, self),
                      MethodType(OutgoingRing.write_inband_batch, self), None)
            self.__dict__["write_inband"] = fast.write_inband
            self.__dict__["write_inband_batch"] = fast.write_inband_batch

    def free_bytes(self) -> int:
        """Bytes free for packets now (validates the reader's ``out``)."""
        out = check_index(self._words[WORD_OUT], self._size, "out")
        inp = self._in
        return (out - inp - 8) if out > inp else self._size - (inp - out) - 8

    def can_write(self, total: int) -> bool:
        """Whether a packet of ``total`` bytes fits now."""
        return self.free_bytes() >= total

    @property
    def pending_send_size(self) -> int:
        return int(self._words[WORD_PSS])

    def set_pending_send_size(self, size: int) -> None:
        """Ask the reader to signal once ``size`` bytes are free (0: don't)."""
        if size < 0 or size > self._size - 8:
            raise RingError(RingErrorKind.INVALID_MESSAGE_LENGTH,
                            f"pending send size {size} exceeds {self._size - 8}")
        self._words[WORD_PSS] = (size + 7) & ~7

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
                st = INBAND_STRUCTS.get(n) or inband_struct(n)
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
                image[msg_len - pad : msg_len] = ZEROS[:pad]
            FOOTER.pack_into(image, msg_len, start << 32)
            self.mem.write(start, memoryview(image)[: msg_len + 8])
        else:
            data = self._data
            if data is None or end + 8 > size:
                raise ValueError("publish_inband() completes the packet reserve_inband() began")
            DESCRIPTOR.pack_into(data, start, 6, 2, msg_len >> 3, flags, transaction_id)
            if pad:
                data[end - pad : end] = ZEROS[:pad]
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

    def write_inband_batch(self, payloads: Iterable[Buffer]) -> tuple[int, bool]:
        """Write in-band packets (no completion requested, transaction id 0) while they fit,
        then commit them together; ``payloads`` is any iterable. Returns (packets written,
        whether to signal the reader); raises :class:`RingFull` if not even the first one
        fits."""
        batch: Sequence[Buffer] = (
            cast("Sequence[Buffer]", payloads)
            if type(payloads) is list or type(payloads) is tuple
            else list(payloads)
        )
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
            pos, written = self._fast.write_inband_from(pos, batch)
            if written == len(batch):
                self._in = pos
                return written, self._commit(start)
            # The C loop may have seen a later ``out`` than ours: take a fresh snapshot.
            out = words[1]
            if out >= size or out & 7:  # all or nothing, as when _put finds it below
                self._in = start
                raise RingError(RingErrorKind.INVALID_RING_POINTER, f"out index {out:#x}")
            free = (out - pos - 8) if out > pos else size - (pos - out) - 8
            batch = batch[written:]
        structs = INBAND_STRUCTS
        for payload in batch:
            if data is not None and type(payload) is bytes:
                n = len(payload)
                msg_len = (n + 23) & ~7
                end = pos + msg_len
                # Fast path: it fits and is not too large for the format, and does not wrap.
                if msg_len + 8 <= free and end + 8 <= size and msg_len + 8 <= MAX_PACKET_SIZE:
                    st = structs.get(n) or inband_struct(n)
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
        out = self._words[WORD_OUT]
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
                data[pos : pos + pad] = ZEROS[:pad]
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
            write(pos, ZEROS[:pad] + FOOTER.pack(start << 32))
        end += 8
        self._in = end - size if end >= size else end

    def _commit(self, start: int) -> bool:
        words = self._words
        words[WORD_IN] = self._in
        return words[WORD_MASK] == 0 and words[WORD_OUT] == start


class _AcceleratedOutgoingRing(OutgoingRing):
    """An :class:`OutgoingRing` whose ``in`` index lives in its C accelerator (see ``__init__``)."""

    @property
    def _in(self) -> int:
        return self._fast.in_index  # type: ignore[no-any-return]

    @_in.setter
    def _in(self, value: int) -> None:
        self._fast.in_index = value
