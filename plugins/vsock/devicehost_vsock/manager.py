"""The connection table of the vsock device: every guest packet and host event, sans I/O.

Pure and synchronous. The worker hands it guest tx packets (:meth:`ConnectionManager.handle_tx`),
accepted host sockets (:meth:`~ConnectionManager.accept_host`) and readiness reports
(``on_readable``/``on_writable``/``on_closed``), and asks it to fill one rx buffer at a time
(:meth:`~ConnectionManager.produce_rx`, from its base :class:`~devicehost_vsock.rxproducer.
RxProducer`, the rx half of the table). Time is an explicit ``now`` (monotonic seconds); host
sockets are :class:`~devicehost_vsock.connection.HostStream` values, so tests drive it with fakes.

Rules (facts sections 9.4-9.8, 9.10, 9.13):

- Device packets carry src_cid 2, dst_cid = guest CID, the connection's type (STREAM, or
  SEQPACKET when negotiated), buf_alloc = ``tx_buffer_size`` (65536 as upstream unless
  configured) and the current fwd_cnt; RST carries buf_alloc 0 and fwd_cnt 0.
- Guest packets of a type not negotiated, a foreign src_cid or dst_cid != 2 get RST (and drop any
  connection with that key); a packet of the other type on a connection resets it. A guest
  REQUEST connects a host socket of its type (``EPROTOTYPE`` from a listener of the other kind:
  RST). An RW longer than ``tx_buffer_size`` or with fewer payload bytes than its len is
  dropped without RST. Unknown ops get RST and drop the connection. RST is never answered.
- SEQPACKET: a guest message (RW packets up to the one with EOM) goes to the host socket as one
  message, and one host message to the guest as RW packets with EOM on the last; see
  ``hostwrite.py`` and ``RxProducer._produce_message``.
- Peer credit is taken only from REQUEST, RESPONSE and CREDIT_UPDATE.
- One rx buffer gets, per connection, in order: an expired timeout (remove + RST), a pending
  REQUEST or RESPONSE, a CREDIT_UPDATE (fwd_cnt changed or requested), a CREDIT_REQUEST, host data
  or SHUTDOWN. RSTs for keys without a connection go first (at most 4096 wait for rx buffers;
  ``owedrsts.py`` says which are dropped beyond). Connections are served round robin.
- At most 1024 established plus pending host connections.

Decisions on the items the facts mark:

- **[UPSTREAM-BUG]** SHUTDOWN on a connection that is not connected, a failing socket
  ``shutdown()`` and a failing flush on write-ready all remove the connection and send RST.
- **[AMBIGUOUS]** A tx chain shorter than 44 bytes is read as if zero-filled (so it usually fails
  validation and gets RST), as upstream does.
- **[AMBIGUOUS]** An rx buffer with no room after the header is never used to read host data (a
  0-byte read would look like end of stream); control packets still use it, and a buffer is
  otherwise used only when a packet is written into it (facts 9.8) -- with one exception: when
  host data is known to be waiting (peeked, not guessed) and nothing else is, it is completed
  with length 0 so that it does not block the buffers behind it. End of stream (a SHUTDOWN) fits.
- Peer credit is clamped at 0 as Linux computes it (``Connection.peer_credit``): a guest that
  shrinks its window below what is in flight gets no RW until its credit is positive again.
- **[AMBIGUOUS]** Host reads are capped by the guest's credit whatever the rx buffer shape.
- **[AMBIGUOUS]** After guest SHUTDOWN(RECEIVE) the host socket's read side is shut; once its
  queued bytes are relayed the device sees end of stream and sends SHUTDOWN(SEND), as upstream.
- **[AMBIGUOUS]** The connect deadline (``connection_timeout``, 2 s from accept) covers reading
  CONNECT and the guest's RESPONSE; it is cleared when the RESPONSE arrives and the OK line is
  queued, and a socket that will not take those few bytes fails the connection on its next write.
- Timeouts, like every rx-side action, are only acted on while the guest has an rx buffer posted,
  with one deliberate exception (upstream checks it lazily too): a host connection whose CONNECT
  line was not read by its deadline is closed even without rx buffers (:meth:`drop_silent`;
  the guest never heard of it, so nothing is owed to it). Otherwise host peers that connect and
  say nothing would pile up, one descriptor each, for as long as the guest posts no buffer.
- An rx buffer too small for a header is completed with length 0 before any packet is built for
  it, so nothing is lost and no connection is harmed (upstream builds the packet first, fails to
  write it and drops the connection it was meant for).
- **[DECISION]** SEQPACKET limits: the longest message either way is ``tx_buffer_size`` (host ->
  guest also the guest's buf_alloc). Linux refuses a longer send with EMSGSIZE; a host message
  has already been sent when the device sees it, so the connection is reset instead (RST, the host
  socket closed with the message unread); a guest that sends a longer one overran its credit
  (RST). ``EOR`` has no Unix counterpart: never set, and dropped from guest packets.
- A host connection to the SEQPACKET listener when the driver did not negotiate SEQPACKET is
  read (its CONNECT message) and closed without OK, as when no guest listens.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Final

from devicehost_vsock.connection import Connection, ConnectionState, HostStream
from devicehost_vsock.deadlines import Deadlines
from devicehost_vsock.hostwrite import HostWriter
from devicehost_vsock.hybrid import encode_ok
from devicehost_vsock.owedrsts import OwedRsts
from devicehost_vsock.ports import PortAllocator
from devicehost_vsock.protocol import (
    CID_HOST,
    CONNECTION_TIMEOUT,
    GRACEFUL_SHUTDOWN_TIMEOUT,
    HEADER,
    HEADER_SIZE,
    MAX_ACTIVE_CONNECTIONS,
    SEQ_EOM,
    SHUTDOWN_RECEIVE,
    SHUTDOWN_SEND,
    TX_BUF_SIZE,
    TYPE_SEQPACKET,
    TYPE_STREAM,
    Op,
)
from devicehost_vsock.rxproducer import MoreBuffers, RxProducer
from devicehost_vsock.txbuffer import TxBuffer

__all__ = ["ConnectionManager", "Connector", "MoreBuffers"]

#: Opens the host socket for a guest connection to port P of a socket type (TYPE_STREAM or
#: TYPE_SEQPACKET, the host socket's kind must match); raises OSError when it cannot.
Connector = Callable[[int, int], HostStream]

Buffer = bytes | bytearray | memoryview
Key = tuple[int, int]

_ZERO_HEADER: Final = bytes(HEADER_SIZE)


def _prefix(parts: Sequence[memoryview], length: int) -> list[memoryview]:
    """The first ``length`` bytes of the concatenation of ``parts``, as views."""
    out: list[memoryview] = []
    for part in parts:
        if length <= 0:
            break
        if len(part) > length:
            part = part[:length]
        out.append(part)
        length -= len(part)
    return out


class ConnectionManager(RxProducer):
    """The connection table of one started vsock device."""

    def __init__(
        self,
        guest_cid: int,
        connect: Connector,
        *,
        connection_timeout: float = CONNECTION_TIMEOUT,
        graceful_timeout: float = GRACEFUL_SHUTDOWN_TIMEOUT,
        max_connections: int = MAX_ACTIVE_CONNECTIONS,
        tx_buffer_size: int = TX_BUF_SIZE,
        logger: logging.Logger | None = None,
        stream: bool = True,
        seqpacket: bool = False,
    ) -> None:
        self.guest_cid = guest_cid
        #: The socket types the driver negotiated (STREAM unless NO_IMPLIED_STREAM without
        #: STREAM; SEQPACKET with its feature): packets of any other type get RST.
        self.types = frozenset(
            t for t, ok in ((TYPE_STREAM, stream), (TYPE_SEQPACKET, seqpacket)) if ok
        )
        #: The buf_alloc advertised to the guest, each connection's host-bound buffer capacity
        #: and the longest RW accepted from the guest (upstream: always 65536).
        self.tx_buffer_size = tx_buffer_size
        self._connect = connect
        self._connection_timeout = connection_timeout
        self._graceful_timeout = graceful_timeout
        self._max_connections = max_connections
        self._log = logger or logging.getLogger("devicehost_vsock")
        self._table: dict[Key, Connection] = {}
        #: Host connections that have not completed their CONNECT line (no key yet).
        self._pending: set[Connection] = set()
        self._by_stream: dict[int, Connection] = {}
        self._ports = PortAllocator()
        #: Connections that may have rx work, in service order (lazily pruned).
        self._work: dict[Connection, None] = {}
        #: RSTs owed to the guest for keys that have no connection (any more): (local port, peer
        #: port, socket type of the packet or connection they answer).
        #: Bounded (:mod:`devicehost_vsock.owedrsts`): a guest cannot grow it by posting no rx.
        self._rsts: OwedRsts = OwedRsts()
        self._deadlines = Deadlines(self._is_live)
        #: The same connect deadlines of host connections whose CONNECT line was not read yet
        #: (the guest has not heard of them), served without rx buffers (:meth:`drop_silent`).
        self._connect_deadlines = Deadlines(self._pending.__contains__)
        #: Packet lengths written into the buffers ``more`` handed to the last ``produce_rx``,
        #: in order (the buffers after these were not used).
        self.extra_sizes: list[int] = []
        #: Writes to host sockets, including runs of RW packets gathered for one write
        #: (``handle_tx(..., coalesce=True)``; written by :meth:`flush_tx`).
        self._writer = HostWriter(
            self._table, self._rsts, self._schedule,
            lambda conn, rst: self._remove(conn, rst=rst), self._log,
        )
        self._flush = self._writer.flush

    # ----------------------------------------------------------------- inspection

    def __len__(self) -> int:
        """Active connections: established plus pending host connections."""
        return len(self._table) + len(self._pending)

    def connection(self, key: Key) -> Connection | None:
        return self._table.get(key)

    @property
    def keys(self) -> list[Key]:
        return list(self._table)

    def known_connections(self) -> list[tuple[int, int, int]]:
        """The connections the guest knows of: (device port, guest port, socket type) each,
        what a device in a worker reports so that a restarted worker can reset them
        (:meth:`reset_stale`). Changes move :attr:`table_generation`."""
        return [(key[0], key[1], conn.sock_type) for key, conn in self._table.items()]

    def reset_stale(self, connections: Sequence[tuple[int, int, int]]) -> int:
        """Queue an RST to the guest for each (device port, guest port, socket type) that has no
        connection in this table: connections a previous incarnation of the device held (a
        worker that died), which the guest must drop now rather than wait on forever. They go
        out before any other packet, as soon as the guest posts rx buffers. Returns how many."""
        count = 0
        for local, peer, sock_type in connections:
            if (local, peer) in self._table or sock_type not in (TYPE_STREAM, TYPE_SEQPACKET):
                continue
            self._rsts.append((local & 0xFFFF_FFFF, peer & 0xFFFF_FFFF, sock_type))
            count += 1
        return count

    def has_rx_work(self, now: float) -> bool:
        """Whether an rx buffer could be used now (may be a false positive: then
        :meth:`produce_rx` returns ``None`` and the work set is empty)."""
        if self._rsts or self._work:
            return True
        return self._deadlines.due(now)

    def next_deadline(self) -> float | None:
        """The earliest pending timeout, for the worker's wait."""
        return self._deadlines.next()

    @property
    def logger(self) -> logging.Logger:
        return self._log

    def next_silent_deadline(self) -> float | None:
        """When the earliest host connection still owing its CONNECT line times out."""
        return self._connect_deadlines.next()

    def drop_silent(self, now: float) -> int:
        """Close the host connections whose connect deadline passed before their CONNECT line
        was read; returns how many. Nothing is sent to the guest (it never heard of them), so
        this needs no rx buffer: a guest that posts none cannot make idle host connections pile
        up until the host runs out of descriptors."""
        dropped = 0
        for conn in self._connect_deadlines.expired(now):
            self._remove(conn, rst=False)
            dropped += 1
        if dropped:
            self._log.info(
                "vsock: closed %d host connection(s) that sent no CONNECT line within %g s",
                dropped, self._connection_timeout,
            )
        return dropped

    def close_all(self) -> None:
        """Drop every connection (queues stopped): host sockets closed, no packet sent."""
        self._writer.drop_run()
        for conn in [*self._table.values(), *self._pending]:
            conn.stream.close()
        if self._table:
            self.table_generation += 1
        self._table.clear()
        self._pending.clear()
        self._by_stream.clear()
        self._work.clear()
        self._rsts.clear()
        self._deadlines.clear()
        self._connect_deadlines.clear()
        self._ports = PortAllocator()

    # ----------------------------------------------------------------- live handoff

    def saved_view(self) -> tuple[list[Connection], list[tuple[int, int, int]], int]:
        """What a save needs (``saved.py``): every connection (established first, then host
        connections still owing their CONNECT line), the RSTs owed, the last host-side port.
        Only valid between packets (no gathered run of RW packets is pending)."""
        if self._writer.run_conn is not None:
            raise RuntimeError("a run of guest RW packets is still being gathered")
        return [*self._table.values(), *self._pending], list(self._rsts), self._ports.last

    def adopt(self, conns: Sequence[Connection], rsts: Sequence[tuple[int, int, int]],
              last_port: int) -> None:
        """Fill this (new, empty) table with restored connections (checked: keys unique) and
        the RSTs owed; every connection is scheduled, and one waiting to write re-arms."""
        in_use = set()
        for conn in conns:
            if conn.key is None:
                self._pending.add(conn)
                if conn.deadline is not None:
                    self._connect_deadlines.set(conn, conn.deadline)
            else:
                self._table[conn.key] = conn
                if conn.host_initiated:
                    in_use.add(conn.key[0])
            self._by_stream[id(conn.stream)] = conn
            if conn.deadline is not None:
                self._deadlines.set(conn, conn.deadline)
            if conn.buffered:
                conn.stream.want_write()
            self._schedule(conn)
        self._rsts.extend(rsts)
        self._ports = PortAllocator.resume(last_port, in_use)

    # ----------------------------------------------------------------- host events

    def accept_host(self, stream: HostStream, now: float, sock_type: int = TYPE_STREAM) -> bool:
        """A host process connected to the device's listener for ``sock_type`` connections.
        Returns False (and closes the stream) when the connection limit is reached. (If the
        driver did not negotiate that type, the connection is closed once its CONNECT line is
        read, as when no guest listens.)"""
        if len(self) >= self._max_connections:
            self._log.info("vsock: connection limit reached, closing accepted host connection")
            stream.close()
            return False
        conn = Connection(
            stream, host_initiated=True, tx_buffer_size=self.tx_buffer_size, sock_type=sock_type
        )
        self._pending.add(conn)
        self._by_stream[id(stream)] = conn
        self._deadlines.set(conn, now + self._connection_timeout)
        self._connect_deadlines.set(conn, now + self._connection_timeout)
        self._schedule(conn)
        return True

    def on_readable(self, stream: HostStream) -> None:
        conn = self._by_stream.get(id(stream))
        if conn is not None:
            conn.readable = True
            self._schedule(conn)

    def on_writable(self, stream: HostStream) -> None:
        conn = self._by_stream.get(id(stream))
        if conn is not None:
            self._flush(conn)

    def on_closed(self, stream: HostStream, now: float) -> None:
        conn = self._by_stream.get(id(stream))
        if conn is None:
            return
        conn.host_closed = True
        conn.readable = True
        if conn.shutdown_sent and conn.deadline is None:
            self._deadlines.set(conn, now + self._graceful_timeout)
        self._schedule(conn)

    # ----------------------------------------------------------------- guest tx

    def handle_tx(
        self, header: Buffer, payload: Sequence[memoryview] = (), now: float = 0.0,
        coalesce: bool = False,
    ) -> None:
        """Handle one guest tx packet: ``header`` is what the chain's readable part held before
        the payload (zero-filled if shorter than 44 bytes), ``payload`` the readable bytes after.

        With ``coalesce``, consecutive RW packets of one connection that the host socket would be
        asked to take right away are gathered and written with one ``sendmsg`` by
        :meth:`flush_tx` (or by the next packet that is not such an RW): the bytes, their order,
        fwd_cnt and every packet the guest gets are those of packet-by-packet handling. The
        caller must call :meth:`flush_tx` before the payload memory is given back to the guest.
        """
        if len(header) >= HEADER_SIZE:
            fields = HEADER.unpack_from(header)
        else:
            fields = HEADER.unpack(bytes(header) + _ZERO_HEADER[len(header) :])
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt) = (
            fields
        )
        key = (dst_port, src_port)
        run = self._writer.run_conn
        if run is not None:
            if (
                op != _RW or run.key != key or type_ != TYPE_STREAM or src_cid != self.guest_cid
                or dst_cid != CID_HOST
            ):
                self._writer.flush_run()
            elif length <= self.tx_buffer_size:
                # The next RW of the run being gathered (the common case): the connection and
                # its state were checked when the run began and cannot have changed since.
                available = len(payload[0]) if len(payload) == 1 else sum(map(len, payload))
                if available >= length and self._writer.extend_run(
                    payload if available == length else _prefix(payload, length), length
                ):
                    return
        if op == _RW:
            if length > self.tx_buffer_size:
                self._log.info("vsock: guest RW of %d bytes is too long, dropped", length)
                return
            available = len(payload[0]) if len(payload) == 1 else sum(map(len, payload))
            if available < length:
                self._log.info("vsock: guest RW data length mismatch, dropped")
                return
            if (
                length
                and type_ == TYPE_STREAM
                and src_cid == self.guest_cid
                and dst_cid == CID_HOST
                and (conn := self._table.get(key)) is not None
                and conn.sock_type == TYPE_STREAM
            ):
                # Data for an existing connection (the common case): what the op dispatch
                # below does for it, without the dispatch.
                parts = payload if available == length else _prefix(payload, length)
                if not (coalesce and self._writer.gather(conn, parts, length)):
                    self._writer.guest_rw(conn, parts, length)
                return
        if type_ not in self.types or src_cid != self.guest_cid or dst_cid != CID_HOST:
            self._log.info("vsock: guest packet with bad type/cid for %s, sending RST", key)
            self._reset(key, type_)
            return
        if op == Op.REQUEST:
            self._guest_request(key, buf_alloc, fwd_cnt, type_)
            return
        conn = self._table.get(key)
        if op == Op.RST:
            if conn is not None:
                self._remove(conn, rst=False)
            return
        if conn is None:
            self._rsts.append((key[0], key[1], type_))
            return
        if conn.sock_type != type_:
            self._log.info("vsock: guest packet of type %d on a type %d connection %s, sending"
                           " RST", type_, conn.sock_type, key)  # fmt: skip
            self._remove(conn, rst=True)
            return
        if op == Op.RW and type_ == TYPE_SEQPACKET:
            self._writer.guest_message_rw(
                conn, payload if available == length else _prefix(payload, length), length,
                bool(flags & SEQ_EOM),
            )  # fmt: skip
            return
        if op == Op.RESPONSE:
            self._guest_response(conn, buf_alloc, fwd_cnt)
        elif op == Op.SHUTDOWN:
            self._guest_shutdown(conn, flags)
        elif op == Op.RW:
            if length:
                parts = payload if available == length else _prefix(payload, length)
                if not (coalesce and self._writer.gather(conn, parts, length)):
                    self._writer.guest_rw(conn, parts, length)
            elif self._writer.run_conn is conn:
                self._writer.run_packets += 1  # its fate (RST or nothing) is the run's
        elif op == Op.CREDIT_UPDATE:
            conn.set_peer_credit(buf_alloc, fwd_cnt)
            if conn.state is ConnectionState.CONNECTED:
                if conn.peer_credit > 0:
                    conn.waiting_for_credit = False
                    conn.credit_request_pending = False  # no point asking for credit it has
                else:
                    conn.credit_request_pending = True
                    conn.waiting_for_credit = True
                self._schedule(conn)
        elif op == Op.CREDIT_REQUEST:
            conn.credit_update_requested = True
            self._schedule(conn)
        else:
            self._log.info("vsock: guest sent unknown op %d on %s, sending RST", op, key)
            self._remove(conn, rst=True)

    def flush_tx(self) -> None:
        """Write the gathered run of RW packets (see ``handle_tx(..., coalesce=True)``)."""
        self._writer.flush_run()

    def _guest_request(self, key: Key, buf_alloc: int, fwd_cnt: int, sock_type: int) -> None:
        if len(self) >= self._max_connections:
            self._log.info("vsock: connection limit reached, refusing guest connect to %d", key[0])
            self._rsts.append((key[0], key[1], sock_type))
            return
        try:
            stream = self._connect(key[0], sock_type)
        except OSError as exc:
            # EPROTOTYPE: the host listener is of the other kind (stream vs SEQPACKET).
            self._log.info("vsock: guest connect to port %d failed: %s", key[0], exc)
            self._rsts.append((key[0], key[1], sock_type))
            return
        old = self._table.get(key)
        if old is not None:
            self._log.info("vsock: guest REQUEST for existing connection %s, resetting", key)
            stream.close()
            self._remove(old, rst=True)
            return
        conn = Connection(
            stream, host_initiated=False, tx_buffer_size=self.tx_buffer_size, sock_type=sock_type
        )
        conn.key = key
        conn.state = ConnectionState.GUEST_CONNECTING
        conn.response_pending = True
        conn.set_peer_credit(buf_alloc, fwd_cnt)
        self._table[key] = conn
        self.table_generation += 1
        self._by_stream[id(stream)] = conn
        self._schedule(conn)

    def _guest_response(self, conn: Connection, buf_alloc: int, fwd_cnt: int) -> None:
        request = conn.connect_request
        if (
            conn.state is not ConnectionState.HOST_CONNECTING
            or conn.request_pending
            or request is None
            or conn.key is None
        ):
            self._log.info("vsock: unexpected RESPONSE on %s, sending RST", conn.key)
            self._remove(conn, rst=True)
            return
        conn.set_peer_credit(buf_alloc, fwd_cnt)
        conn.ok_pending = encode_ok(conn.key[0], request)
        conn.state = ConnectionState.CONNECTED
        conn.deadline = None
        if self._flush(conn):
            self._schedule(conn)

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        if conn.state is not ConnectionState.CONNECTED:
            self._log.info("vsock: SHUTDOWN on unconnected %s, sending RST", conn.key)
            self._remove(conn, rst=True)
            return
        if flags & SHUTDOWN_SEND and conn.msg_partial:
            # A SEQPACKET message the guest will never finish: not delivered (a host message
            # cannot be sent in part), so that the host socket's write side can be shut.
            conn.txbuf.drop_tail(conn.msg_partial)
            conn.msg_partial = 0
        try:
            if flags & SHUTDOWN_SEND:
                conn.peer_shut_send = True
                if conn.buffered == 0 and not conn.write_shut:
                    conn.stream.shutdown(socket.SHUT_WR)
                    conn.write_shut = True
            if flags & SHUTDOWN_RECEIVE and not conn.peer_shut_recv:
                conn.peer_shut_recv = True
                conn.stream.shutdown(socket.SHUT_RD)
                conn.readable = True
        except OSError as exc:
            self._log.info("vsock: host socket shutdown failed on %s: %s", conn.key, exc)
            self._remove(conn, rst=True)
            return
        if conn.peer_shut_send and conn.peer_shut_recv and conn.buffered == 0:
            self._remove(conn, rst=True)
            return
        self._schedule(conn)

    # ----------------------------------------------------------------- helpers

    def _schedule(self, conn: Connection) -> None:
        self._work[conn] = None

    def _is_live(self, conn: Connection) -> bool:
        if conn.key is None:
            return conn in self._pending
        return self._table.get(conn.key) is conn

    def _reset(self, key: Key, sock_type: int) -> None:
        conn = self._table.get(key)
        if conn is not None:
            # The RST goes out with the connection's type, or the guest would not match it.
            sock_type = conn.sock_type
            self._remove(conn, rst=False)
        elif sock_type not in (TYPE_STREAM, TYPE_SEQPACKET):
            sock_type = TYPE_STREAM
        self._rsts.append((key[0], key[1], sock_type))

    def _remove(self, conn: Connection, *, rst: bool) -> None:
        if conn.key is None:
            self._pending.discard(conn)
        elif self._table.get(conn.key) is conn:
            del self._table[conn.key]
            self.table_generation += 1
            if rst:
                self._rsts.append((conn.key[0], conn.key[1], conn.sock_type))
        if conn.host_initiated and conn.key is not None:
            self._ports.free(conn.key[0])
        self._by_stream.pop(id(conn.stream), None)
        self._work.pop(conn, None)
        conn.txbuf = _EMPTY_TXBUF
        conn.stream.close()


_EMPTY_TXBUF: Final = TxBuffer(0)
_RW: Final = int(Op.RW)
