"""VMBus pipes: framing over in-band packets, in message mode and byte mode (facts §4).

Each in-band packet of a pipe starts with an 8-byte pipe header::

    0 u32 packet_type   DATA (1), PARTIAL (2, byte mode, written back by the reader),
                        SETUP_GPA_DIRECT (3) and TEARDOWN_GPA_DIRECT (4) (defined, unused)
    4 u32 len           DATA: bytes after the header. PARTIAL: low 16 bits the original length,
                        high 16 bits the bytes already consumed.

:class:`MessagePipe` sends each message as one packet (or, ``raw=True``, without a header: the
payload is the packet's padded payload). :class:`BytePipe` is a byte stream: writes are cut into
packets of at most :data:`BYTE_PIPE_CHUNK` bytes; a read may consume part of a packet, whose
header it then rewrites in place as PARTIAL; a zero-length DATA packet is end-of-file.

Each pipe has a synchronous core (``try_send``/``try_recv`` change state or raise
:class:`anyio.WouldBlock`) and an anyio shell (``send``/``recv``/``wait_write_ready``) that follows
the upstream waiting policy: a reader unmasks its ring's interrupts before sleeping and re-checks
the ring, and masks them again before consuming; a writer waiting for space publishes
``pending_send_size = max(needed, maximum_packet_size / 4)`` and clears it once space appears.
One task may send and another receive at the same time; two concurrent senders (or receivers) on
one pipe are not supported.

Cancellation (device runners are cancelled on every stop): the shells only await while nothing
is taken or written, and return right after the synchronous step that takes or sends, with no
await after it. So a cancelled ``recv`` leaves the ring as it was and a ``recv`` that took a
message returns it; a ``send`` that returns has sent and a cancelled one has not.
``BytePipe.send`` of more than fits at once is the exception every byte stream has: cancelled while
waiting for room, it has sent a prefix of ``data`` in whole chunks.

Speed: an operation that needs no wait does not await at all (a checkpoint, or even anyio's
``checkpoint_if_cancelled``, costs as much as moving a small message), except every
:data:`FAIR_EVERY`-th operation in a row, which first goes through a full checkpoint before
taking or writing anything. So a pipe that always has work cannot starve the other tasks, and a
cancellation is noticed at the latest after FAIR_EVERY operations that did not wait (the loop
that calls the pipe usually notices it sooner, at its own awaits).

Decisions:

- A DATA header claiming more bytes than its packet holds (upstream: a memory access error) is
  :class:`PipeError` InvalidPacketLength; so is a packet too short for a pipe header.
- A message larger than the receiver's buffer raises :class:`PacketTooLarge` and stays in the
  ring, so the caller may retry with a larger buffer.
- A byte-mode reader accepts PARTIAL packets from the peer as if it had rewritten them itself,
  provided consumed < length <= the bytes the packet holds.
- ``wait_write_ready`` for a size that can never fit fails at once with :class:`PipeError` kind
  Ring whose cause is the ring's InvalidMessageLength (upstream reports the ring error).

Errors: :class:`PacketTooLarge` (a message above the size limit: the sender's fault when sending,
the peer's when receiving), :class:`ConnectionReset` (the channel was closed), and
:class:`PipeError` with a :class:`PipeErrorKind` for everything the peer got wrong.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeVar

import anyio
from anyio.lowlevel import checkpoint

from devicehost.vmbus.channel import ChannelClosed, RawChannel
from devicehost.vmbus.ring import (
    PacketType,
    RingEmpty,
    RingError,
    RingErrorKind,
    RingFull,
    in_band_size,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from devicehost.vmbus.ring import IncomingPacket

__all__ = [
    "BYTE_PIPE_CHUNK",
    "FAIR_EVERY",
    "MAXIMUM_PIPE_PACKET_SIZE",
    "PIPE_DATA",
    "PIPE_PARTIAL",
    "PIPE_SETUP_GPA_DIRECT",
    "PIPE_TEARDOWN_GPA_DIRECT",
    "BytePipe",
    "ConnectionReset",
    "MessagePipe",
    "PacketTooLarge",
    "PipeError",
    "PipeErrorKind",
]

PIPE_DATA: Final = 1
PIPE_PARTIAL: Final = 2
PIPE_SETUP_GPA_DIRECT: Final = 3
PIPE_TEARDOWN_GPA_DIRECT: Final = 4
MAXIMUM_PIPE_PACKET_SIZE: Final = 16384
BYTE_PIPE_CHUNK: Final = 2048
#: Operations a pipe completes without waiting before it checkpoints (yields) once.
FAIR_EVERY: Final = 16

# Pipe header (8 bytes): u32 packet_type, u32 len.
_HEADER: Final = struct.Struct("<II")
_HEADER_SIZE: Final = 8
# Messages up to this size are sent as one bytes object (header + data joined): cheaper than
# writing two parts; larger ones are written as two parts, with no extra copy.
_JOIN_LIMIT: Final = 1024
_IN_BAND: Final = int(PacketType.IN_BAND)
_T = TypeVar("_T")


class PipeErrorKind(enum.Enum):
    UNEXPECTED_RING_PACKET_TYPE = "UnexpectedRingPacketType"
    INVALID_PIPE_PACKET_TYPE = "InvalidPipePacketType"
    INVALID_PACKET_LENGTH = "InvalidPacketLength"
    PACKET_TOO_LARGE = "PacketTooLarge"
    RING = "Ring"
    CONNECTION_RESET = "ConnectionReset"


class PipeError(Exception):
    """Raised when a pipe cannot go on: the peer broke the framing or the ring (``kind`` says
    how; a ring error is the ``__cause__``)."""

    def __init__(self, kind: PipeErrorKind, detail: str) -> None:
        self.kind = kind
        super().__init__(f"{kind.value}: {detail}")


class PacketTooLarge(PipeError):
    """Raised when a message is larger than the pipe allows (on send: the caller's message; on
    receive: the peer's message is larger than the caller's buffer or the pipe's limit)."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(PipeErrorKind.PACKET_TOO_LARGE, f"{size} bytes exceed the limit {limit}")


class ConnectionReset(PipeError):
    """Raised when waiting on a pipe whose channel was closed (the peer is gone)."""

    def __init__(self) -> None:
        super().__init__(PipeErrorKind.CONNECTION_RESET, "the channel was closed")


def _ring_error(exc: RingError) -> PipeError:
    err = PipeError(PipeErrorKind.RING, str(exc))
    err.__cause__ = exc
    return err


class _Pipe:
    def __init__(self, channel: RawChannel) -> None:
        self.channel = channel
        self._out = channel.outgoing
        self._in = channel.incoming
        #: Largest message (data bytes after the pipe header) this end may send / receive.
        self.max_send = min(MAXIMUM_PIPE_PACKET_SIZE, self._out.maximum_packet_size - 32)
        self.max_recv = min(MAXIMUM_PIPE_PACKET_SIZE, self._in.maximum_packet_size - 32)
        self._streak = 0
        # Waits go straight to the signal (RawChannel.wait_for_signal only forwards to it):
        # every coroutine layer between a waiter and its event costs on each wake-up.
        self._signal = channel.signal

    async def _fair(self) -> None:
        """Every FAIR_EVERY-th operation in a row: a full checkpoint (cancellation, then
        scheduling), before anything is taken or written."""
        self._streak = 0
        await checkpoint()

    async def _receive(self, attempt: Callable[[], _T]) -> _T:
        """Run the non-blocking receive ``attempt`` until it succeeds, sleeping on the signal in
        between. Cancel-safe: ``attempt`` takes a message without yielding, and every await
        here happens while nothing has been taken."""
        self._streak += 1
        if self._streak >= FAIR_EVERY:
            await self._fair()
        ring = self._in
        while True:
            ring.set_interrupt_mask(True)
            try:
                return attempt()
            except anyio.WouldBlock:
                pass
            # Unmask, then re-check before sleeping, so that a signal cannot be missed.
            try:
                ring.set_interrupt_mask(False)
                empty = ring.is_empty()
            except RingError as exc:
                raise _ring_error(exc) from exc
            if not empty:
                await checkpoint()  # the peer wrote in between (or lies): retry, yielding once
                continue
            await self._wait_signal()

    async def _wait_signal(self) -> None:
        self._streak = 0
        try:
            await self._signal.wait()
        except ChannelClosed:
            raise ConnectionReset() from None

    async def _wait_space(self, total: int) -> None:
        """Sleep until ``total`` bytes are free in the outgoing ring (nothing is written)."""
        ring = self._out
        try:
            if total > ring.maximum_packet_size:
                raise RingError(RingErrorKind.INVALID_MESSAGE_LENGTH,
                                f"{total} bytes can never fit in the ring")
            if ring.can_write(total):
                self._streak += 1
                if self._streak >= FAIR_EVERY:
                    await self._fair()
                return
            ring.set_pending_send_size(max(total, ring.maximum_packet_size // 4))
            try:
                while not ring.can_write(total):
                    await self._wait_signal()
            finally:
                ring.set_pending_send_size(0)
        except RingError as exc:
            raise _ring_error(exc) from exc

    def _commit_read(self) -> None:
        try:
            signal = self._in.commit()
        except RingError as exc:
            raise _ring_error(exc) from exc
        if signal:
            self.channel.signal_remote()

    def _peek(self) -> IncomingPacket | None:
        try:
            packet = self._in.peek()
        except RingEmpty:
            return None
        except RingError as exc:
            raise _ring_error(exc) from exc
        if packet.kind != PacketType.IN_BAND:
            raise PipeError(PipeErrorKind.UNEXPECTED_RING_PACKET_TYPE,
                            f"ring packet type {packet.kind} on a pipe")
        return packet

    def _write(self, payload: Buffer | tuple[Buffer, ...]) -> None:
        try:
            signal = self._out.write_inband(payload)
        except RingFull:
            raise anyio.WouldBlock from None
        except RingError as exc:
            raise _ring_error(exc) from exc
        if signal:
            self.channel.signal_remote()


class MessagePipe(_Pipe):
    """Messages, one per in-band packet. ``raw=True``: no pipe header (received messages are
    then the packets' payloads, padded to 8 bytes)."""

    def __init__(self, channel: RawChannel, *, raw: bool = False) -> None:
        super().__init__(channel)
        self.raw = raw
        self._header_size = 0 if raw else _HEADER_SIZE
        #: The view :meth:`reserve` handed out last, while it is still in the ring's free space.
        self._reserved: memoryview | None = None
        self._scratch = bytearray()
        if raw:
            self.max_send = self._out.maximum_packet_size - 24
            self.max_recv = self._in.maximum_packet_size - 24

    def reserve(self, n: int) -> memoryview:
        """A writable buffer for the next message, exactly ``n`` bytes, to fill and then pass to
        :meth:`try_send` (or :meth:`send`) as is: when the packet fits in the outgoing ring now
        without wrapping, it is a view of the ring's free space, so sending it copies nothing;
        otherwise it is a reused buffer, copied once on send.

        Only the bytes of a message that is sent are visible to the peer through the pipe, but
        the ring's free space is the peer's memory too: reserve only for data the peer may see.
        A reservation is for the very next send: sending anything else, or reserving again,
        first discards it (and may overwrite its bytes); the buffer must not be written once
        anything was sent.
        """
        if n > self.max_send:
            raise PacketTooLarge(n, self.max_send)
        header = self._header_size
        try:
            view = self._out.reserve_inband(n + header)
        except RingFull:
            # No room now: a reused buffer (fresh memory every time costs page faults), sent
            # by copy once there is room.
            self._reserved = None
            if len(self._scratch) < n:
                self._scratch = bytearray(n)
            return memoryview(self._scratch)[:n]
        except RingError as exc:
            raise _ring_error(exc) from exc
        if header:
            _HEADER.pack_into(view, 0, PIPE_DATA, n)
            view = view[header:]
        self._reserved = view
        return view

    def try_send(self, data: Buffer) -> None:
        """Send one message now; :class:`anyio.WouldBlock` if the ring is full."""
        reserved = self._reserved
        if reserved is not None:
            self._reserved = None
            if data is reserved:
                try:
                    signal = self._out.publish_inband(len(reserved) + self._header_size)
                except RingError as exc:
                    raise _ring_error(exc) from exc
                if signal:
                    self.channel.signal_remote()
                return
        t = type(data)
        n = len(data) if t is bytes or t is bytearray else memoryview(data).nbytes  # type: ignore[arg-type]
        if n > self.max_send:
            raise PacketTooLarge(n, self.max_send)
        if self.raw:
            self._write(data)
        elif n <= _JOIN_LIMIT:
            self._write(_HEADER.pack(PIPE_DATA, n) + data)
        else:
            self._write((_HEADER.pack(PIPE_DATA, n), data))

    async def send(self, data: Buffer) -> None:
        """Send one message, waiting for ring space. Cancel-safe: if it returns the message was
        sent; if it raises (cancelled or not), it was not."""
        self._streak += 1
        if self._streak >= FAIR_EVERY:
            await self._fair()
        while True:
            try:
                self.try_send(data)
                return
            except anyio.WouldBlock:
                n = memoryview(data).nbytes
                await self._wait_space(in_band_size(n if self.raw else n + _HEADER_SIZE))

    async def wait_write_ready(self, n: int) -> None:
        """Wait until a message of ``n`` bytes fits; fails at once if it never can."""
        await self._wait_space(in_band_size(n if self.raw else n + _HEADER_SIZE))

    def _take(self, max_len: int | None) -> tuple[IncomingPacket, memoryview | bytes]:
        """The next packet and a view of the message in it, checked but not consumed."""
        ring = self._in
        try:
            packet = ring.peek()
        except RingEmpty:
            raise anyio.WouldBlock from None
        except RingError as exc:
            raise _ring_error(exc) from exc
        if packet[0] != _IN_BAND:
            raise PipeError(PipeErrorKind.UNEXPECTED_RING_PACKET_TYPE,
                            f"ring packet type {packet[0]} on a pipe")
        limit = self.max_recv if max_len is None or max_len > self.max_recv else max_len
        payload = packet[3]
        size = len(payload)
        if self.raw:
            if size > limit:
                raise PacketTooLarge(size, limit)
            return packet, payload
        if size < _HEADER_SIZE:
            raise PipeError(PipeErrorKind.INVALID_PACKET_LENGTH, "no pipe header")
        kind, n = _HEADER.unpack_from(payload)
        if kind != PIPE_DATA:
            raise PipeError(PipeErrorKind.INVALID_PIPE_PACKET_TYPE, f"pipe packet {kind}")
        if n > limit:
            raise PacketTooLarge(n, limit)
        if n > size - _HEADER_SIZE:
            raise PipeError(PipeErrorKind.INVALID_PACKET_LENGTH,
                            f"header says {n} bytes, the packet holds {size - 8}")
        return packet, memoryview(payload)[_HEADER_SIZE : _HEADER_SIZE + n]

    def _release(self, packet: IncomingPacket) -> None:
        self._in.consume(packet)
        self._commit_read()

    def try_recv(self, max_len: int | None = None) -> bytes:
        """Receive one message now (at most ``max_len`` bytes, else :class:`PacketTooLarge` and
        the message stays); :class:`anyio.WouldBlock` if there is none."""
        packet, message = self._take(max_len)
        data = bytes(message)
        self._release(packet)
        return data

    def try_recv_parsed(self, parse: Callable[[memoryview | bytes], _T],
                        max_len: int | None = None) -> _T:
        """Receive one message now and return ``parse(message)``, where ``message`` is a view of
        it in the ring: nothing is copied unless ``parse`` copies (and it must copy what it
        keeps; the view is released when it returns). The message is consumed even if ``parse``
        raises. Otherwise as :meth:`try_recv`."""
        packet, message = self._take(max_len)
        try:
            return parse(message)
        finally:
            self._release(packet)

    async def recv(self, max_len: int | None = None) -> bytes:
        """Receive one message, waiting for it; :class:`ConnectionReset` if the channel closes.
        Cancel-safe: a cancelled receive leaves the message in the ring."""
        return await self._receive(lambda: self.try_recv(max_len))

    async def recv_parsed(self, parse: Callable[[memoryview | bytes], _T],
                          max_len: int | None = None) -> _T:
        """:meth:`try_recv_parsed`, waiting for the message (cancel-safe as :meth:`recv`: a
        cancelled call has not called ``parse`` and left the message in the ring)."""
        return await self._receive(lambda: self.try_recv_parsed(parse, max_len))


class BytePipe(_Pipe):
    """A byte stream over in-band packets."""

    def __init__(self, channel: RawChannel) -> None:
        super().__init__(channel)
        self.chunk = min(BYTE_PIPE_CHUNK, self.max_send)
        self._eof = False

    @property
    def at_eof(self) -> bool:
        """Whether the peer's end-of-file was read."""
        return self._eof

    def try_send(self, data: Buffer) -> int:
        """Send as much of ``data`` as fits now, in whole chunks; returns the bytes sent.
        :class:`anyio.WouldBlock` if nothing fits (and ``data`` is not empty)."""
        mv = memoryview(data).cast("B")
        sent = 0
        while sent < len(mv):
            piece = mv[sent : sent + self.chunk]
            try:
                self._write((_HEADER.pack(PIPE_DATA, len(piece)), piece))
            except anyio.WouldBlock:
                if sent:
                    return sent
                raise
            sent += len(piece)
        return sent

    async def send(self, data: Buffer) -> None:
        """Send all of ``data``, waiting for ring space as needed. If it returns, all was sent;
        cancelled, it has sent a prefix of whole chunks (possibly none)."""
        self._streak += 1
        if self._streak >= FAIR_EVERY:
            await self._fair()
        mv = memoryview(data).cast("B")
        sent = 0
        while sent < len(mv):
            try:
                sent += self.try_send(mv[sent:])
            except anyio.WouldBlock:
                n = min(self.chunk, len(mv) - sent)
                await self._wait_space(in_band_size(n + _HEADER_SIZE))

    def try_send_eof(self) -> None:
        """Shut down writing: send a zero-length DATA packet now."""
        self._write((_HEADER.pack(PIPE_DATA, 0),))

    async def send_eof(self) -> None:
        """Shut down writing, waiting for ring space (cancel-safe like MessagePipe.send)."""
        self._streak += 1
        if self._streak >= FAIR_EVERY:
            await self._fair()
        while True:
            try:
                self.try_send_eof()
                return
            except anyio.WouldBlock:
                await self._wait_space(in_band_size(_HEADER_SIZE))

    async def wait_write_ready(self, n: int) -> None:
        """Wait until a chunk of ``min(n, chunk)`` bytes fits."""
        await self._wait_space(in_band_size(min(n, self.chunk) + _HEADER_SIZE))

    def try_recv(self, max_len: int) -> bytes:
        """Read up to ``max_len`` bytes now. Returns b"" at end-of-file;
        :class:`anyio.WouldBlock` if nothing is there."""
        if max_len <= 0 or self._eof:
            return b""
        out = bytearray()
        while len(out) < max_len:
            packet = self._peek()
            if packet is None:
                break
            payload = packet.payload
            if len(payload) < _HEADER_SIZE:
                raise PipeError(PipeErrorKind.INVALID_PACKET_LENGTH, "no pipe header")
            kind, n = _HEADER.unpack_from(payload)
            if kind == PIPE_DATA:
                total, done = n, 0
            elif kind == PIPE_PARTIAL:
                total, done = n & 0xFFFF, n >> 16
                if done >= total:
                    raise PipeError(PipeErrorKind.INVALID_PACKET_LENGTH,
                                    f"partial packet with {done} of {total} bytes consumed")
            else:
                raise PipeError(PipeErrorKind.INVALID_PIPE_PACKET_TYPE, f"pipe packet {kind}")
            if total > self.max_recv:
                raise PacketTooLarge(total, self.max_recv)
            if total > len(payload) - _HEADER_SIZE:
                raise PipeError(PipeErrorKind.INVALID_PACKET_LENGTH,
                                f"header says {total} bytes, the packet holds {len(payload) - 8}")
            if total == 0:
                if out:
                    break  # end-of-file is consumed only by a read that returns nothing else
                self._in.consume(packet)
                self._eof = True
                break
            take = min(max_len - len(out), total - done)
            out += payload[_HEADER_SIZE + done : _HEADER_SIZE + done + take]
            if done + take < total:
                self._in.overwrite(packet, 0, _HEADER.pack(PIPE_PARTIAL,
                                                           total | (done + take) << 16))
                break
            self._in.consume(packet)
        self._commit_read()
        if not out and not self._eof:
            raise anyio.WouldBlock
        return bytes(out)

    async def recv(self, max_len: int) -> bytes:
        """Read up to ``max_len`` bytes, waiting for at least one (b"" at end-of-file);
        :class:`ConnectionReset` if the channel closes first. Cancel-safe: a cancelled read
        consumed nothing."""
        return await self._receive(lambda: self.try_recv(max_len))
