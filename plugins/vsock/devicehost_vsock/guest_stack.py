"""A guest-side vsock stack over the in-process virtio driver, for tests, the demo and benchmarks.

Two levels:

- :class:`GuestStack`: raw packets. ``post_rx`` posts rx buffers, ``send`` builds a tx chain from
  header fields (src_cid = the guest CID, dst_cid = 2, type STREAM unless overridden) and payload,
  ``recv`` returns the next packet the device completed. Nothing happens behind the test's back.
- :class:`GuestSockets`: stream and SEQPACKET sockets on top, with the guest's half of the credit
  protocol (advertises ``buf_alloc``, tells its fwd_cnt in CREDIT_UPDATE once half of it was
  consumed or when asked, never sends more than the device's credit). ``pump`` (run it in a task)
  keeps rx buffers posted and dispatches packets; ``connect`` opens a connection to a host port;
  ``listen`` accepts host-initiated connections, optionally echoing them. A SEQPACKET connection
  sends messages as Linux does (pieces within the credit, EOM on the last; EMSGSIZE for a message
  longer than the peer's buf_alloc) and collects whole received messages in ``messages``.
"""

from __future__ import annotations

import errno
import math
import struct
from collections.abc import Sequence
from typing import Protocol

import anyio
import attrs

from devicehost.virtio import DriverQueue, QueueFull
from devicehost_vsock.protocol import (
    CID_HOST,
    HEADER,
    HEADER_SIZE,
    QUEUE_EVENT,
    SEQ_EOM,
    SHUTDOWN_RECEIVE,
    SHUTDOWN_SEND,
    TYPE_SEQPACKET,
    TYPE_STREAM,
    Header,
    Op,
    decode_header_untrusted,
)

__all__ = ["GuestConnection", "GuestSockets", "GuestStack", "Packet", "QueueOwner"]

_U32 = 0xFFFF_FFFF
# byte layout: struct virtio_vsock_event = le32 id
_EVENT = struct.Struct("<I")
_RW = int(Op.RW)
#: Where the le32 ``len`` field sits in the vsock header (facts section 9.2).
_LEN_AT = 24
_CREDIT_UPDATE = int(Op.CREDIT_UPDATE)
_CREDIT_REQUEST = int(Op.CREDIT_REQUEST)
#: Ops the pump handles inline for established connections.
_FAST_OPS = frozenset((_RW, _CREDIT_UPDATE, _CREDIT_REQUEST))


class QueueOwner(Protocol):
    """What the stack needs of a driver: its queues (a ``VirtioDriver``, or a vhost-user
    frontend of a test)."""

    def queue(self, index: int) -> DriverQueue: ...


@attrs.frozen
class Packet:
    """One packet the device sent: its header and payload (``written`` = completion length)."""

    header: Header
    data: bytes
    written: int


class GuestStack:
    """Raw vsock packets through the driver's rx (0) and tx (1) queues."""

    def __init__(self, driver: QueueOwner, cid: int = 3, buf_alloc: int = 65536) -> None:
        self.driver = driver
        self.cid = cid
        self.buf_alloc = buf_alloc
        self.rxq = driver.queue(0)
        self.txq = driver.queue(1)
        self._tx_room = anyio.Lock()

    def post_rx(self, count: int = 1, size: int = HEADER_SIZE + 4096, *,
                fragment: int | None = None) -> None:
        """Post ``count`` rx buffers of ``size`` writable bytes and kick."""
        for _ in range(count):
            self.rxq.add(writable=[size], fragment=fragment)
        self.rxq.kick()

    def header(self, op: int, src_port: int, dst_port: int, length: int = 0, *, flags: int = 0,
               buf_alloc: int | None = None, fwd_cnt: int = 0, src_cid: int | None = None,
               dst_cid: int = CID_HOST, type_: int = TYPE_STREAM) -> bytes:
        return HEADER.pack(
            self.cid if src_cid is None else src_cid, dst_cid, src_port, dst_port, length, type_,
            op, flags, self.buf_alloc if buf_alloc is None else buf_alloc, fwd_cnt,
        )  # fmt: skip

    async def wait_tx_room(self) -> None:
        """Wait until tx descriptors are free again (one task waits on the doorbell at a time;
        the others find room reaped by it)."""
        async with self._tx_room:
            if not self.txq.reap():
                await self.txq.wait_used()
                self.txq.reap()

    def reap_tx(self) -> int:
        """Collect completed tx chains; returns how many."""
        return self.txq.reap()

    def send_raw(self, parts: Sequence[bytes | memoryview], *, fragment: int | None = None) -> None:
        """Post one tx chain of ``parts`` (raw bytes) and kick."""
        self.reap_tx()
        if fragment is None and 1 <= len(parts) <= 2:
            self.txq.add_readable(*parts)
        else:
            self.txq.add(list(parts), fragment=fragment)
        self.txq.kick()

    async def send_raw_wait(self, parts: Sequence[bytes | memoryview]) -> None:
        """Like :meth:`send_raw`, waiting for tx descriptors when the queue is full."""
        while True:
            try:
                self.send_raw(parts)
                return
            except QueueFull:
                await self.wait_tx_room()

    def send_rw_batch(self, conn: GuestConnection, data: memoryview, chunk: int) -> int:
        """Post RW packets of ``conn`` carrying a prefix of ``data`` (at most ``chunk`` bytes
        each, within its credit, while tx descriptors last) and kick once; returns the bytes
        posted (0 if the credit or the descriptors allowed none)."""
        txq = self.txq
        txq.reap()
        total = min(len(data), conn.credit)
        if total <= 0:
            return 0
        # One header for the batch; each packet gets its own length (byte 24 of the header).
        header = HEADER.pack(self.cid, CID_HOST, conn.local_port, conn.peer_port, 0, TYPE_STREAM,
                             _RW, 0, self.buf_alloc, conn.rx_cnt)
        offset = txq.add_segments(header, data[:total], chunk, _LEN_AT)
        if offset:
            conn.tx_cnt = (conn.tx_cnt + offset) & _U32
            txq.kick()
        return offset

    def send(self, op: int, src_port: int, dst_port: int, data: bytes = b"", *,
             fragment: int | None = None, **fields: int) -> None:
        """Send one packet; ``fields`` override header fields (flags, buf_alloc, fwd_cnt, ...)."""
        header = self.header(op, src_port, dst_port, len(data), **fields)
        if fragment is not None:
            self.reap_tx()
            self.txq.add([header, data] if data else [header], fragment=fragment)
            self.txq.kick()
        else:
            self.send_raw([header, data] if data else [header])

    def try_recv(self) -> Packet | None:
        used = self.rxq.get_used()
        if used is None:
            return None
        if used.written < HEADER_SIZE:
            return Packet(Header(0, 0, 0, 0, Op.INVALID), b"", used.written)
        header = decode_header_untrusted(used.data)
        return Packet(header, used.data[HEADER_SIZE : HEADER_SIZE + header.len], used.written)

    async def recv(self, timeout: float = 5.0) -> Packet:
        """The next packet; raises TimeoutError after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            while True:
                packet = self.try_recv()
                if packet is not None:
                    return packet
                await self.rxq.call_doorbell.wait()

    async def recv_op(self, op: int, timeout: float = 5.0) -> Packet:
        """The next packet with ``op``, skipping others (e.g. CREDIT_UPDATE)."""
        with anyio.fail_after(timeout):
            while True:
                packet = await self.recv(math.inf)
                if packet.header.op == op:
                    return packet

    def post_events(self, count: int = 1) -> None:
        """Post ``count`` event buffers (4 writable bytes each, as Linux posts them) on the event
        queue (queue 2; only where the device has one) and kick."""
        evq = self.driver.queue(QUEUE_EVENT)
        for _ in range(count):
            evq.add(writable=[_EVENT.size])
        evq.kick()

    async def recv_event(self, timeout: float = 5.0) -> int:
        """The id of the next event the device sent (0 = TRANSPORT_RESET)."""
        evq = self.driver.queue(QUEUE_EVENT)
        with anyio.fail_after(timeout):
            used = await evq.wait_used()
        if used.written != _EVENT.size:
            raise AssertionError(f"the device wrote {used.written} bytes of a 4-byte event")
        event_id: int = _EVENT.unpack(used.data)[0]
        return event_id

    async def expect_silence(self, seconds: float) -> None:
        """Assert that no packet arrives within ``seconds``."""
        with anyio.move_on_after(seconds):
            packet = await self.recv(math.inf)
            raise AssertionError(f"expected no packet, got {packet.header}")


@attrs.define(eq=False)
class GuestConnection:
    """One guest stream socket of :class:`GuestSockets`."""

    sockets: GuestSockets
    local_port: int
    peer_port: int
    established: anyio.Event = attrs.field(factory=anyio.Event)
    reset: bool = False
    peer_shutdown: bool = False
    received: bytearray = attrs.field(factory=bytearray)
    rx_cnt: int = 0
    told_fwd_cnt: int = 0
    tx_cnt: int = 0
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    echo: bool = False
    pending: bytearray = attrs.field(factory=bytearray)
    #: TYPE_STREAM or TYPE_SEQPACKET (then ``messages`` collects what arrived, message by message).
    sock_type: int = TYPE_STREAM
    messages: list[bytes] = attrs.field(factory=list)
    #: The message being received (its packets so far), SEQPACKET only.
    partial: bytearray = attrs.field(factory=bytearray)
    #: The event of the tasks waiting in :meth:`wait_changed` (made by the first of them).
    _changed: anyio.Event | None = attrs.field(default=None, init=False)
    #: What a :meth:`send_all` waiting for credit has left to send (the pump posts it as
    #: credit arrives, see :meth:`_advance`), its packet size, and the event that wakes it.
    _unsent: memoryview | None = attrs.field(default=None, init=False)
    _chunk: int = attrs.field(default=65536, init=False)
    _sender: anyio.Event | None = attrs.field(default=None, init=False)

    @property
    def credit(self) -> int:
        # Clamped at 0 as Linux does (the device's own arithmetic, see Connection.peer_credit).
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & _U32))

    def _notify(self) -> None:
        event = self._changed
        if event is not None:
            self._changed = None
            event.set()

    async def wait_changed(self) -> None:
        """Wait until the pump next handles a packet of this connection."""
        event = self._changed
        if event is None:
            event = self._changed = anyio.Event()
        await event.wait()

    def _advance(self) -> None:
        """The pump saw a packet of this connection: post what a waiting :meth:`send_all`
        holds, as far as the credit and the tx descriptors allow, and wake it when everything
        is posted, when descriptors ran out or when the connection was reset (it keeps waiting
        while only credit is missing). A guest kernel's socket does the same from its receive
        path: the sender is not scheduled once per credit update."""
        view = self._unsent
        if view is None:
            return
        if not self.reset:
            if not self.credit:
                return
            sent = self.sockets.stack.send_rw_batch(self, view, self._chunk)
            if sent:
                self._unsent = view = view[sent:]
                if len(view) and not self.credit:
                    return
        sender = self._sender
        if sender is not None:
            self._sender = None
            sender.set()

    async def send_all(self, data: bytes | memoryview, chunk: int = 65536) -> None:
        """Send ``data`` as RW packets of at most ``chunk`` bytes, waiting for credit.

        Like a guest kernel's socket send: every pass posts as many packets as the credit and
        the free tx descriptors allow, then kicks once. While credit is missing the rest is
        left to the pump, which posts it as the device's CREDIT_UPDATEs arrive."""
        view = memoryview(data).cast("B")
        stack = self.sockets.stack
        while len(view):
            if self.reset:
                raise ConnectionResetError(f"guest connection {self.local_port} was reset")
            if self.credit == 0:
                self._unsent, self._chunk = view, chunk
                self._sender = sender = anyio.Event()
                try:
                    await sender.wait()
                finally:
                    rest, self._unsent, self._sender = self._unsent, None, None
                view = rest if rest is not None else view
                continue
            sent = stack.send_rw_batch(self, view, chunk)
            if sent == 0:  # no free tx descriptors: wait for the device to complete some
                await stack.wait_tx_room()
                continue
            view = view[sent:]

    def _received(self, data: bytes | memoryview, flags: int) -> None:
        if self.sock_type == TYPE_STREAM:
            self.received += data
            return
        self.partial += data
        if flags & SEQ_EOM:
            self.messages.append(bytes(self.partial))
            self.partial.clear()

    async def send_messages(
        self, messages: Sequence[bytes | memoryview], chunk: int = 65536
    ) -> None:
        """SEQPACKET: send each message as RW packets of at most ``chunk`` bytes within the
        credit, EOM on its last (an empty message is one empty RW with EOM), as many as the credit
        and descriptors allow per kick; raises ``OSError(EMSGSIZE)`` for a message longer than
        the peer's buf_alloc, as Linux does."""
        stack = self.sockets.stack
        txq = stack.txq
        txq.reap()
        posted = False
        for message in messages:
            view = memoryview(message).cast("B")
            if len(view) > self.peer_buf_alloc:
                raise OSError(errno.EMSGSIZE, f"message of {len(view)} bytes exceeds the peer's"
                              f" buffer of {self.peer_buf_alloc}")  # fmt: skip
            while True:
                if self.reset:
                    raise ConnectionResetError(f"guest connection {self.local_port} was reset")
                n = min(len(view), self.credit, chunk)
                if n == 0 and len(view):
                    if posted:
                        txq.kick()
                        posted = False
                    await self.wait_changed()
                    continue
                last = n == len(view)
                header = HEADER.pack(
                    stack.cid, CID_HOST, self.local_port, self.peer_port, n, TYPE_SEQPACKET, _RW,
                    SEQ_EOM if last else 0, stack.buf_alloc, self.rx_cnt,
                )  # fmt: skip
                try:
                    txq.add_readable(header, view[:n] if n else None)
                except QueueFull:
                    if posted:
                        txq.kick()
                        posted = False
                    await stack.wait_tx_room()
                    continue
                posted = True
                self.tx_cnt = (self.tx_cnt + n) & _U32
                view = view[n:]
                if last:
                    break
        if posted:
            txq.kick()

    async def recv_message(self) -> bytes:
        """SEQPACKET: wait for the next whole message and return it."""
        while not self.messages:
            if self.reset or self.peer_shutdown:
                raise ConnectionResetError(f"guest connection {self.local_port} ended early")
            await self.wait_changed()
        return self.messages.pop(0)

    async def recv_exactly(self, n: int) -> bytes:
        """Wait until ``n`` bytes arrived and return them."""
        while len(self.received) < n:
            if self.reset or self.peer_shutdown:
                raise ConnectionResetError(f"guest connection {self.local_port} ended early")
            await self.wait_changed()
        out = bytes(self.received[:n])
        del self.received[:n]
        return out

    async def shutdown(self) -> None:
        await self.sockets.send_control(self, Op.SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RECEIVE)


class GuestSockets:
    """Guest stream sockets over a :class:`GuestStack` (run :meth:`pump` in a task)."""

    def __init__(self, stack: GuestStack, *, rx_buffers: int = 64,
                 rx_size: int = HEADER_SIZE + 65536) -> None:
        self.stack = stack
        self.rx_buffers = rx_buffers
        self.rx_size = rx_size
        self.connections: dict[tuple[int, int], GuestConnection] = {}
        self.listening: dict[int, bool] = {}
        #: The socket type of each listening port (a REQUEST of another type gets RST).
        self.listening_type: dict[int, int] = {}
        self.accepted: list[GuestConnection] = []

    def reset_all(self) -> None:
        """What the guest does on VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: every connection is reset
        (its waiters raise ConnectionResetError)."""
        for conn in self.connections.values():
            conn.reset = True
            conn._advance()
            conn._notify()
        self.connections.clear()

    def listen(self, port: int, *, echo: bool = False, sock_type: int = TYPE_STREAM) -> None:
        self.listening[port] = echo
        self.listening_type[port] = sock_type

    async def connect(
        self, host_port: int, local_port: int, sock_type: int = TYPE_STREAM
    ) -> GuestConnection:
        conn = GuestConnection(self, local_port, host_port, sock_type=sock_type)
        self.connections[(local_port, host_port)] = conn
        await self.send_control(conn, Op.REQUEST)
        while not conn.established.is_set():
            if conn.reset:
                raise ConnectionRefusedError(f"host port {host_port} refused the connection")
            await conn.wait_changed()
        return conn

    async def send_control(self, conn: GuestConnection, op: int, flags: int = 0) -> None:
        conn.told_fwd_cnt = conn.rx_cnt
        await self.stack.send_raw_wait([self.stack.header(
            op, conn.local_port, conn.peer_port, flags=flags, fwd_cnt=conn.rx_cnt,
            type_=conn.sock_type)])

    async def send_rw(self, conn: GuestConnection, data: memoryview | bytes) -> None:
        conn.tx_cnt = (conn.tx_cnt + len(data)) & _U32
        await self.stack.send_raw_wait([self.stack.header(
            Op.RW, conn.local_port, conn.peer_port, len(data), fwd_cnt=conn.rx_cnt), data])

    async def pump(self) -> None:
        """Keep rx buffers posted and dispatch every packet, forever.

        Like a guest kernel's receive poll: every completed buffer is handled in one pass, data
        of established connections is appended straight from the buffer, each connection that
        received half its buf_alloc or was asked for credit sends one CREDIT_UPDATE at the end
        of the pass, the connections that changed are told once per pass (a ``send_all``
        waiting for credit has its data posted right then, see ``GuestConnection._advance``),
        and the buffers are then reposted with one kick. The
        pump owns the rx queue: nothing else may post rx buffers while it runs (a pass reads the
        completed buffers in place)."""
        stack = self.stack
        rxq = stack.rxq
        connections = self.connections
        half = stack.buf_alloc // 2
        unpack = HEADER.unpack_from
        while True:
            missing = self.rx_buffers - rxq.in_flight
            if missing > 0 and rxq.add_writable_many(missing, self.rx_size):
                rxq.kick()
            changed: dict[GuestConnection, None] = {}
            asked: set[GuestConnection] = set()
            used = rxq.take_used_views()
            if not used:
                await rxq.call_doorbell.wait()
                continue
            # Views of the buffers themselves (copied out below, before any buffer is reposted).
            for written, data in used:
                if written >= HEADER_SIZE:
                    _, _, src_port, dst_port, length, _, op, flags, buf_alloc, fwd_cnt = unpack(
                        data
                    )
                    conn = connections.get((dst_port, src_port)) if op in _FAST_OPS else None
                    if conn is not None and not conn.echo:
                        # RW, CREDIT_UPDATE or CREDIT_REQUEST on an established, non-echoing
                        # connection; credit is told once per pass, below.
                        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
                        changed[conn] = None
                        if op == _RW:
                            payload = data[HEADER_SIZE : HEADER_SIZE + length]
                            conn.rx_cnt = (conn.rx_cnt + len(payload)) & _U32
                            conn._received(payload, flags)
                        elif op == _CREDIT_REQUEST:
                            asked.add(conn)
                    else:
                        header = decode_header_untrusted(data)
                        await self._dispatch(header, data[HEADER_SIZE : HEADER_SIZE + header.len])
                else:
                    await self._dispatch(Header(0, 0, 0, 0, Op.INVALID), b"")
            for conn in changed:
                if not conn.reset and (
                    conn in asked or (conn.rx_cnt - conn.told_fwd_cnt) & _U32 >= half
                ):
                    await self.send_control(conn, Op.CREDIT_UPDATE)
                conn._advance()
                conn._notify()

    async def _dispatch(self, h: Header, data: bytes | memoryview) -> None:
        key = (h.dst_port, h.src_port)
        conn = self.connections.get(key)
        if h.op == Op.REQUEST:
            if (
                h.dst_port not in self.listening
                or conn is not None
                or self.listening_type[h.dst_port] != h.type
            ):
                await self.stack.send_raw_wait([self.stack.header(
                    Op.RST, h.dst_port, h.src_port, buf_alloc=0, type_=h.type)])
                return
            conn = GuestConnection(self, h.dst_port, h.src_port, echo=self.listening[h.dst_port],
                                   sock_type=h.type)
            conn.peer_buf_alloc, conn.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
            self.connections[key] = conn
            self.accepted.append(conn)
            conn.established.set()
            await self.send_control(conn, Op.RESPONSE)
            conn._notify()
            return
        if conn is None:
            if h.op != Op.RST:
                await self.stack.send_raw_wait([self.stack.header(
                    Op.RST, h.dst_port, h.src_port, buf_alloc=0, type_=h.type)])
            return
        if h.op != Op.RST:
            conn.peer_buf_alloc, conn.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
        if h.op == Op.RESPONSE:
            conn.established.set()
        elif h.op == Op.RST:
            conn.reset = True
            del self.connections[key]
        elif h.op == Op.RW:
            conn.rx_cnt = (conn.rx_cnt + len(data)) & _U32
            if conn.echo:
                conn.pending += data
            else:
                conn._received(data, h.flags)
            if (conn.rx_cnt - conn.told_fwd_cnt) & _U32 >= self.stack.buf_alloc // 2:
                await self.send_control(conn, Op.CREDIT_UPDATE)
        elif h.op == Op.CREDIT_REQUEST:
            await self.send_control(conn, Op.CREDIT_UPDATE)
        elif h.op == Op.SHUTDOWN:
            conn.peer_shutdown = True
            if conn.echo:
                await self.stack.send_raw_wait([self.stack.header(
                    Op.RST, conn.local_port, conn.peer_port, buf_alloc=0, type_=conn.sock_type)])
                conn.reset = True
                del self.connections[key]
        if conn.echo and conn.pending and not conn.reset:
            n = min(len(conn.pending), conn.credit)
            if n:
                chunk = bytes(conn.pending[:n])
                del conn.pending[:n]
                await self.send_rw(conn, chunk)
        conn._advance()
        conn._notify()
