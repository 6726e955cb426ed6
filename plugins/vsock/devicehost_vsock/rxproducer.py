"""The rx half of the vsock connection table: filling the guest's rx buffers, sans I/O.

:class:`RxProducer` is a base of :class:`~devicehost_vsock.manager.ConnectionManager` (which
owns the table, its guest tx handling and host events); it holds what one rx buffer gets (facts
section 9.8): RSTs owed for keys without a connection first, then per connection, round robin,
an expired timeout (remove + RST), a pending REQUEST or RESPONSE, a CREDIT_UPDATE (fwd_cnt
changed or requested), a CREDIT_REQUEST, host data or SHUTDOWN. Host data is read straight into
the buffer, capped by the guest's credit; a run of further buffers may be filled by one scatter
read when one connection alone has work. See the manager's docstring for the decisions on the
items the facts mark.

The common packet of a guest -> host transfer, a CREDIT_UPDATE of an established connection
that is first in line, is built by a short path with the same result as the general one.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Final

from devicehost_vsock.connection import Connection, ConnectionState
from devicehost_vsock.connectline import read_connect_line, read_connect_message
from devicehost_vsock.deadlines import Deadlines
from devicehost_vsock.hybrid import ConnectLineError, decode_connect_untrusted
from devicehost_vsock.ports import PortAllocator
from devicehost_vsock.protocol import (
    CID_HOST,
    HEADER,
    HEADER_SIZE,
    SEQ_EOM,
    SHUTDOWN_RECEIVE,
    SHUTDOWN_SEND,
    TYPE_SEQPACKET,
    TYPE_STREAM,
    Op,
)

__all__ = ["MoreBuffers", "RxProducer"]

#: Hands out the next posted rx buffer (one writable range longer than a header), or None.
MoreBuffers = Callable[[], memoryview | None]

Key = tuple[int, int]

#: Most rx buffers one host read fills (one scatter read, one ``recvmsg`` iovec list).
_MAX_RUN: Final = 64
_RW: Final = int(Op.RW)
_CREDIT_UPDATE: Final = int(Op.CREDIT_UPDATE)
_CONNECTED: Final = ConnectionState.CONNECTED


class RxProducer:
    """Fills rx buffers from the connection table's state (a base of ``ConnectionManager``)."""

    # The table's state and primitives, set up and defined by ConnectionManager.
    guest_cid: int
    tx_buffer_size: int
    types: frozenset[int]
    #: Packet lengths written into the buffers ``more`` handed to the last ``produce_rx``,
    #: in order (the buffers after these were not used).
    extra_sizes: list[int]
    _table: dict[Key, Connection]
    _pending: set[Connection]
    _work: dict[Connection, None]
    _rsts: deque[tuple[int, int, int]]
    _deadlines: Deadlines
    _ports: PortAllocator
    _graceful_timeout: float
    _log: logging.Logger
    _is_live: Callable[[Connection], bool]
    _remove: Callable[..., None]
    _data_waiting: bool = False
    #: Counts changes of the set of connections the guest knows (keys entering or leaving the
    #: table): ``ConnectionManager.known_connections`` is reported when it moves.
    table_generation: int = 0

    def produce_rx(
        self, packet: memoryview, now: float, more: MoreBuffers | None = None
    ) -> int | None:
        """Fill one rx buffer (``packet``: header then payload space, writable).

        Returns the packet length, 0 if the buffer was too small for a header (it must then be
        completed with length 0), or ``None`` if there was nothing to send (the buffer is unused).

        ``more``, if given, lends further rx buffers for a run of RW packets: when ``packet`` gets
        host data, its connection is the only one with rx work and its credit reaches past
        ``packet``, one scatter read fills ``packet`` and as many lent buffers as the data and
        the credit cover, exactly as successive calls would (each buffer a full RW packet, the
        last one capped by the credit). Their packet lengths are left in :attr:`extra_sizes`;
        lent buffers past those are unused.
        """
        self.extra_sizes = []
        #: Set when a connection has host data queued that this (header-only) buffer cannot take.
        self._data_waiting = False
        if self._deadlines.due(now):
            self._expire(now)
        if len(packet) < HEADER_SIZE:
            return 0
        if self._rsts:
            local, peer, sock_type = self._rsts.popleft()
            self._emit(packet, local, peer, Op.RST, 0, 0, 0, 0, sock_type)
            return HEADER_SIZE
        work = self._work
        if work:
            conn = next(iter(work))
            if (
                conn.state is _CONNECTED
                and conn.deadline is None
                and not (conn.request_pending or conn.response_pending)
                and (conn.credit_update_requested or conn.fwd_cnt != conn.last_told_fwd_cnt)
                and self._is_live(conn)
            ):
                # The short path of the loop below for its most common packet: the first
                # connection in line owes a CREDIT_UPDATE (it has no timeout and no RESPONSE to
                # send first); like any served connection it goes to the back of the line.
                del work[conn]
                conn.credit_update_requested = False
                conn.last_told_fwd_cnt = fwd_cnt = conn.fwd_cnt
                key = conn.key
                assert key is not None
                HEADER.pack_into(
                    packet, 0, CID_HOST, self.guest_cid, key[0], key[1], 0, conn.sock_type,
                    _CREDIT_UPDATE, 0, self.tx_buffer_size, fwd_cnt,
                )  # fmt: skip
                if self._may_have_work(conn):
                    work[conn] = None
                return HEADER_SIZE
        # Connections that produced nothing but may still have work (e.g. data waiting for a
        # bigger buffer) are put back after the loop, so one call visits each at most once.
        idle: list[Connection] = []
        try:
            while self._work:
                conn = next(iter(self._work))
                del self._work[conn]
                if not self._is_live(conn):
                    continue
                # A run of RW packets only where successive calls would serve this connection
                # alone (no other connection or RST is waiting for a buffer).
                solo = more if not self._work and not idle and not self._rsts else None
                size = self._produce_for(conn, packet, now, solo)
                if size is not None:
                    if self._is_live(conn) and self._may_have_work(conn):
                        self._work[conn] = None
                    return size
                if self._is_live(conn) and self._may_have_work(conn):
                    idle.append(conn)
                if self._rsts:
                    local, peer, sock_type = self._rsts.popleft()
                    self._emit(packet, local, peer, Op.RST, 0, 0, 0, 0, sock_type)
                    return HEADER_SIZE
            if self._data_waiting:
                # Only host data is waiting (seen, not guessed) and this buffer has no room for
                # any: hand it back empty rather than holding it forever in front of usable
                # buffers. Otherwise the buffer stays unused, there for the next control packet.
                return 0
            return None
        finally:
            for conn in idle:
                self._work[conn] = None

    def _produce_for(
        self, conn: Connection, packet: memoryview, now: float, more: MoreBuffers | None = None
    ) -> int | None:
        if conn.deadline is not None and now >= conn.deadline:
            self._log.info("vsock: timeout on %s", conn.key)
            sent_request = conn.key is not None and not conn.request_pending
            self._remove(conn, rst=sent_request)
            return None
        if conn.state is ConnectionState.PENDING_CONNECT:
            return self._read_connect_line(conn, packet)
        key = conn.key
        assert key is not None
        if conn.request_pending:
            conn.request_pending = False
            return self._emit(
                packet, key[0], key[1], Op.REQUEST, 0, 0, self.tx_buffer_size, 0, conn.sock_type
            )
        if conn.response_pending:
            conn.response_pending = False
            conn.state = ConnectionState.CONNECTED
            conn.last_told_fwd_cnt = conn.fwd_cnt
            return self._control(packet, conn, Op.RESPONSE)
        if conn.state is not ConnectionState.CONNECTED:
            return None
        if conn.credit_update_due:
            conn.credit_update_requested = False
            conn.last_told_fwd_cnt = conn.fwd_cnt
            return self._control(packet, conn, Op.CREDIT_UPDATE)
        if conn.credit_request_pending:
            conn.credit_request_pending = False
            return self._control(packet, conn, Op.CREDIT_REQUEST)
        if conn.sock_type != TYPE_STREAM:
            return self._produce_message(conn, packet, now)
        if conn.host_eof or not conn.readable:
            return None
        credit = conn.peer_credit
        if credit == 0:
            if conn.waiting_for_credit:
                return None
            conn.waiting_for_credit = True
            return self._control(packet, conn, Op.CREDIT_REQUEST)
        space = len(packet) - HEADER_SIZE
        if space <= 0:
            # A header-only buffer: used for data only in the documented case (data truly waits,
            # see produce_rx), so look without reading. End of stream fits it (SHUTDOWN).
            try:
                peeked = conn.stream.peek(1)
            except OSError as exc:
                self._log.info("vsock: host socket read failed on %s: %s", key, exc)
                self._remove(conn, rst=True)
                return None
            if peeked is None:
                conn.readable = False
                conn.stream.want_read()
                return None
            if peeked:
                self._data_waiting = True
                return None
            return self._host_eof(conn, packet, now)
        first = min(credit, space)
        extras: list[memoryview] = []
        try:
            # Lend further buffers only for the bytes already queued (and within credit):
            # what arrives later is read by the next call, as successive calls would.
            if more is not None and first < credit and (
                (left := min(credit, conn.stream.queued()) - first) > 0
            ):
                views = [packet[HEADER_SIZE : HEADER_SIZE + first]]
                while left > 0 and len(extras) < _MAX_RUN and (extra := more()) is not None:
                    cap = min(len(extra) - HEADER_SIZE, left)
                    extras.append(extra)
                    views.append(extra[HEADER_SIZE : HEADER_SIZE + cap])
                    left -= cap
                stream = conn.stream
                n = stream.recv_into_many(views) if extras else stream.recv_into(views[0])
            else:
                n = conn.stream.recv_into(packet[HEADER_SIZE : HEADER_SIZE + first])
        except OSError as exc:
            self._log.info("vsock: host socket read failed on %s: %s", key, exc)
            self._remove(conn, rst=True)
            return None
        if n is None:
            conn.readable = False
            conn.stream.want_read()
            return None
        if n == 0:
            return self._host_eof(conn, packet, now)
        buf_alloc = self.tx_buffer_size
        if n <= first:
            conn.add_tx(n)
            return self._emit(packet, key[0], key[1], Op.RW, n, 0, buf_alloc, conn.fwd_cnt)
        # The scatter read went on into lent buffers: each is one more RW packet.
        conn.add_tx(n)
        size = self._emit(packet, key[0], key[1], Op.RW, first, 0, buf_alloc, conn.fwd_cnt)
        rest = n - first
        sizes = self.extra_sizes
        local, peer, cid, fwd_cnt = key[0], key[1], self.guest_cid, conn.fwd_cnt
        # Packets of one length share their header bytes (packed once, copied into each).
        header, header_len = b"", -1
        for extra in extras:
            if rest <= 0:
                break
            k = min(rest, len(extra) - HEADER_SIZE)
            if k != header_len:
                header, header_len = HEADER.pack(
                    CID_HOST, cid, local, peer, k, TYPE_STREAM, _RW, 0, buf_alloc, fwd_cnt
                ), k
            extra[:HEADER_SIZE] = header
            sizes.append(HEADER_SIZE + k)
            rest -= k
        return size

    def _produce_message(self, conn: Connection, packet: memoryview, now: float) -> int | None:
        """Host data of a SEQPACKET connection: the next host message, whole in this buffer
        when it fits (and the credit covers it), else staged and sent in pieces as buffers and
        credit allow, EOM on its last piece. A message longer than the guest could ever hold
        (its buf_alloc) or than ``tx_buffer_size`` resets the connection (see the decisions in
        the manager's docstring)."""
        key = conn.key
        assert key is not None
        staged = conn.rx_message
        space = len(packet) - HEADER_SIZE
        credit = conn.peer_credit
        if staged is None:
            if conn.host_eof or not conn.readable:
                return None
            try:
                size = conn.stream.message_size()
            except OSError as exc:
                self._log.info("vsock: host socket read failed on %s: %s", key, exc)
                self._remove(conn, rst=True)
                return None
            if size is None:
                conn.readable = False
                conn.stream.want_read()
                return None
            if size < 0:
                return self._host_eof(conn, packet, now)
            limit = min(conn.peer_buf_alloc, self.tx_buffer_size)
            if size > limit:
                self._log.warning(
                    "vsock: host message of %d bytes on %s exceeds the %d the guest can take"
                    " (Linux would refuse it with EMSGSIZE); resetting the connection",
                    size, key, limit,
                )  # fmt: skip
                self._remove(conn, rst=True)
                return None
            if size and not credit:
                return self._want_credit(packet, conn)
            if size and space <= 0:
                self._data_waiting = True
                return None
            try:
                if size <= credit and size <= space:
                    # The whole message in this buffer (the common case), EOM on it.
                    n = conn.stream.recv_message_into([packet[HEADER_SIZE : HEADER_SIZE + size]])
                    conn.add_tx(n)
                    return self._emit(
                        packet, key[0], key[1], Op.RW, n, SEQ_EOM, self.tx_buffer_size,
                        conn.fwd_cnt, TYPE_SEQPACKET,
                    )  # fmt: skip
                staged = bytearray(size)
                conn.stream.recv_message_into([memoryview(staged)])
            except OSError as exc:
                self._log.info("vsock: host socket read failed on %s: %s", key, exc)
                self._remove(conn, rst=True)
                return None
            conn.rx_message, conn.rx_offset = staged, 0
        if not credit:
            return self._want_credit(packet, conn)
        if space <= 0:
            self._data_waiting = True
            return None
        start = conn.rx_offset
        k = min(len(staged) - start, credit, space)
        packet[HEADER_SIZE : HEADER_SIZE + k] = staged[start : start + k]
        conn.rx_offset = start + k
        conn.add_tx(k)
        flags = 0
        if conn.rx_offset == len(staged):
            conn.rx_message = None
            flags = SEQ_EOM
        return self._emit(
            packet, key[0], key[1], Op.RW, k, flags, self.tx_buffer_size, conn.fwd_cnt,
            TYPE_SEQPACKET,
        )  # fmt: skip

    def _want_credit(self, packet: memoryview, conn: Connection) -> int | None:
        """No credit for waiting host data: one CREDIT_REQUEST, then wait for an update."""
        if conn.waiting_for_credit:
            return None
        conn.waiting_for_credit = True
        return self._control(packet, conn, Op.CREDIT_REQUEST)

    def _host_eof(self, conn: Connection, packet: memoryview, now: float) -> int:
        """The host socket reached end of stream: SHUTDOWN(SEND, RECEIVE if fully closed)."""
        conn.host_eof = True
        conn.shutdown_sent = True
        conn.host_closed = conn.host_closed or conn.stream.is_closed()
        flags = SHUTDOWN_SEND | (SHUTDOWN_RECEIVE if conn.host_closed else 0)
        if conn.host_closed:
            self._deadlines.set(conn, now + self._graceful_timeout)
        else:
            conn.stream.want_close()
        return self._control(packet, conn, Op.SHUTDOWN, flags)

    def _read_connect_line(self, conn: Connection, packet: memoryview) -> int | None:
        read = read_connect_line if conn.sock_type == TYPE_STREAM else read_connect_message
        progress = read(conn.stream, conn.connect_line)
        if progress.failure is not None:
            self._log.info("vsock: %s, closing", progress.failure)
            self._remove(conn, rst=False)
            return None
        if not progress.complete:
            conn.readable = False
            conn.stream.want_read()
            return None
        try:
            request = decode_connect_untrusted(conn.connect_line)
        except ConnectLineError as exc:
            self._log.info("vsock: %s; closing", exc)
            self._remove(conn, rst=False)
            return None
        if request.port is None:
            self._log.info("vsock: host CONNECT names a GUID without a vsock port; closing")
            self._remove(conn, rst=False)
            return None
        if conn.sock_type not in self.types:
            # Refused as when no guest listens: the line is read, the socket closed without OK.
            self._log.info("vsock: the guest driver has no type %d sockets; closing host"
                           " connection to port %d", conn.sock_type, request.port)  # fmt: skip
            self._remove(conn, rst=False)
            return None
        local = self._ports.allocate()
        while (local, request.port) in self._table:
            local = self._ports.allocate()
        key = (local, request.port)
        self._pending.discard(conn)
        conn.key = key
        conn.connect_request = request
        conn.state = ConnectionState.HOST_CONNECTING
        self._table[key] = conn
        self.table_generation += 1
        return self._emit(
            packet, local, request.port, Op.REQUEST, 0, 0, self.tx_buffer_size, 0, conn.sock_type
        )

    def _control(self, packet: memoryview, conn: Connection, op: Op, flags: int = 0) -> int:
        key = conn.key
        assert key is not None
        return self._emit(
            packet, key[0], key[1], op, 0, flags, self.tx_buffer_size, conn.fwd_cnt,
            conn.sock_type,
        )  # fmt: skip

    def _emit(
        self,
        packet: memoryview,
        local: int,
        peer: int,
        op: Op,
        length: int,
        flags: int,
        buf_alloc: int,
        fwd_cnt: int,
        sock_type: int = TYPE_STREAM,
    ) -> int:
        HEADER.pack_into(
            packet, 0, CID_HOST, self.guest_cid, local, peer, length, sock_type, op, flags,
            buf_alloc, fwd_cnt,
        )  # fmt: skip
        return HEADER_SIZE + length

    def _may_have_work(self, conn: Connection) -> bool:
        if conn.state is ConnectionState.PENDING_CONNECT:
            return conn.readable
        if conn.request_pending or conn.response_pending:
            return True
        if conn.state is not ConnectionState.CONNECTED:
            return False
        if conn.credit_update_due or conn.credit_request_pending:
            return True
        if conn.rx_message is not None:
            return conn.peer_credit > 0 or not conn.waiting_for_credit
        if conn.host_eof or not conn.readable:
            return False
        return conn.peer_credit > 0 or not conn.waiting_for_credit

    def _expire(self, now: float) -> None:
        for conn in self._deadlines.expired(now):
            # Expired connections are served first.
            self._work = {conn: None, **self._work}

