"""Guest data on its way to a host socket: direct writes, gathered runs, buffered flushes.

Part of the connection table (:mod:`devicehost_vsock.manager`), split out because it is one
concern: everything that writes to a host socket and advances fwd_cnt (facts section 9.7). A guest
RW is written straight to the socket when nothing is buffered; the rest waits in the connection's
tx buffer (at most the 65536 bytes of credit the device advertised) until the socket is writable.
Consecutive RW packets of one connection may be gathered into one ``sendmsg`` (a *run*) with
exactly the bytes, order, fwd_cnt and guest-visible packets of packet-by-packet handling.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

from devicehost_vsock.connection import Connection, ConnectionState
from devicehost_vsock.protocol import TYPE_STREAM

__all__ = ["HostWriter"]

Key = tuple[int, int]

#: Most payload pieces one coalesced host write gathers (well under the kernel's IOV_MAX).
MAX_GATHER: Final = 256


class HostWriter:
    """Writes guest data to host sockets for one connection table.

    ``remove(conn, rst)`` drops a connection (sending RST if ``rst``); ``schedule(conn)`` marks it
    as having rx work (e.g. a CREDIT_UPDATE now that fwd_cnt moved); ``rsts`` collects RSTs owed
    for keys without a connection.
    """

    def __init__(
        self,
        table: dict[Key, Connection],
        rsts: deque[tuple[int, int, int]],
        schedule: Callable[[Connection], None],
        remove: Callable[[Connection, bool], None],
        log: logging.Logger,
    ) -> None:
        self._table = table
        self._rsts = rsts
        self._schedule = schedule
        self._remove = remove
        self._log = log
        #: The run being gathered: its connection, payload views, bytes and packet count.
        self.run_conn: Connection | None = None
        self._views: list[memoryview] = []
        self._bytes = 0
        self.run_packets = 0
        #: What the run may hold: the free space of its connection's tx buffer (empty when the
        #: run began, and untouched until it is written).
        self._room = 0

    def gather(self, conn: Connection, payload: Sequence[memoryview], total: int) -> bool:
        """Add an RW packet to the run of ``conn`` if packet-by-packet handling would hand it to
        the host socket at once and the run cannot overrun the credit (the host socket takes part
        or all of it; the rest always fits in the empty tx buffer). False: handle it now."""
        if self.run_conn is not None and (
            self._bytes + total > conn.txbuf.available
            or len(self._views) + len(payload) > MAX_GATHER
        ):
            self.flush_run()
            key = conn.key
            assert key is not None
            if self._table.get(key) is not conn:
                # The write failed: packet by packet, this one would have found no connection.
                self._rsts.append((key[0], key[1], TYPE_STREAM))
                return True
        if (
            conn.state is not ConnectionState.CONNECTED
            or conn.peer_shut_send
            or conn.buffered
            or len(payload) > MAX_GATHER
        ):
            return False
        if self.run_conn is None:
            self._room = conn.txbuf.available
        self.run_conn = conn
        self._views.extend(payload)
        self._bytes += total
        self.run_packets += 1
        return True

    def extend_run(self, payload: Sequence[memoryview], total: int) -> bool:
        """Add the next RW packet of the run's own connection, whose header was checked by the
        caller; False if it does not fit (then :meth:`gather` decides)."""
        if not total:
            self.run_packets += 1  # its fate (RST or nothing) is the run's
            return True
        views = self._views
        if self._bytes + total > self._room or len(views) + len(payload) > MAX_GATHER:
            return False
        views.extend(payload)
        self._bytes += total
        self.run_packets += 1
        return True

    def flush_run(self) -> None:
        """Write the gathered run of RW packets (see ``ConnectionManager.handle_tx``)."""
        conn = self.run_conn
        if conn is None:
            return
        views, total, packets = self._views, self._bytes, self.run_packets
        self.drop_run()
        key = conn.key
        assert key is not None and self._table.get(key) is conn
        try:
            written = conn.stream.send(views)
        except OSError as exc:
            self._log.info("vsock: host socket write failed on %s: %s", key, exc)
            self._remove(conn, True)
            # Packet by packet, each later RW of the run would have found no connection.
            self._rsts.extend([(key[0], key[1], TYPE_STREAM)] * (packets - 1))
            return
        if written:
            conn.add_fwd(written)
            self._schedule(conn)
        if total - written:
            conn.txbuf.write(views, written)
            conn.stream.want_write()

    def drop_run(self) -> None:
        self.run_conn = None
        self._views = []
        self._bytes = 0
        self.run_packets = 0

    def guest_rw(self, conn: Connection, payload: Sequence[memoryview], total: int) -> None:
        if conn.state is not ConnectionState.CONNECTED or conn.peer_shut_send:
            self._log.info("vsock: RW on %s in the wrong state, sending RST", conn.key)
            self._remove(conn, True)
            return
        written = 0
        if conn.buffered == 0:
            try:
                written = conn.stream.send(payload)
            except OSError as exc:
                self._log.info("vsock: host socket write failed on %s: %s", conn.key, exc)
                self._remove(conn, True)
                return
            if written:
                conn.add_fwd(written)
                self._schedule(conn)
        rest = total - written
        if rest:
            if rest > conn.txbuf.available:
                self._log.info("vsock: guest overran its credit on %s, sending RST", conn.key)
                self._remove(conn, True)
                return
            conn.txbuf.write(payload, written)
            conn.stream.want_write()

    def guest_message_rw(
        self, conn: Connection, payload: Sequence[memoryview], total: int, eom: bool
    ) -> None:
        """An RW packet of a SEQPACKET connection: its bytes join the message being received;
        with EOM the whole message goes to the host socket as one message (or waits in the tx
        buffer, after the messages before it, until the socket takes it). fwd_cnt counts a
        message's bytes when the host socket took it."""
        if conn.state is not ConnectionState.CONNECTED or conn.peer_shut_send:
            self._log.info("vsock: RW on %s in the wrong state, sending RST", conn.key)
            self._remove(conn, True)
            return
        size = conn.msg_partial + total
        if size > conn.txbuf.capacity:
            # Longer than the window the device advertises: the guest overran its credit.
            self._log.info("vsock: guest message of %d+ bytes overran its credit on %s, sending"
                           " RST", size, conn.key)  # fmt: skip
            self._remove(conn, True)
            return
        if eom and not conn.msg_lens and not conn.ok_pending:
            # Nothing waits before this message: try to hand it over now (the common case).
            views = [*conn.txbuf.views(conn.msg_partial), *payload] if conn.msg_partial else payload
            try:
                sent = conn.stream.send_message(views)
            except OSError as exc:
                self._log.info("vsock: host socket write failed on %s: %s", conn.key, exc)
                self._remove(conn, True)
                return
            if sent:
                conn.txbuf.consume(conn.msg_partial)
                conn.msg_partial = 0
                conn.txbuf.release()
                conn.add_fwd(size)
                self._schedule(conn)
                return
        if total > conn.txbuf.available:
            self._log.info("vsock: guest overran its credit on %s, sending RST", conn.key)
            self._remove(conn, True)
            return
        conn.txbuf.write(payload)
        conn.msg_partial += total
        if eom:
            if conn.msg_lens is None:
                conn.msg_lens = deque()
            conn.msg_lens.append(conn.msg_partial)
            conn.msg_partial = 0
            conn.stream.want_write()

    def _flush_messages(self, conn: Connection) -> None:
        """Hand complete guest messages to the host socket, oldest first, while it takes them."""
        lens = conn.msg_lens
        while lens:
            size = lens[0]
            if not conn.stream.send_message(conn.txbuf.views(size)):
                return
            lens.popleft()
            conn.txbuf.consume(size)
            conn.add_fwd(size)

    def flush(self, conn: Connection) -> bool:
        """Write buffered host-bound bytes. Returns False if the connection was removed."""
        before = conn.fwd_cnt
        try:
            if conn.sock_type != TYPE_STREAM:
                # SEQPACKET: the OK line is a message of its own, then whole guest messages.
                if conn.ok_pending and conn.stream.send_message((conn.ok_pending,)):
                    conn.ok_pending = b""
                if not conn.ok_pending:
                    self._flush_messages(conn)
            else:
                while conn.ok_pending:
                    n = conn.stream.send((conn.ok_pending,))
                    if n <= 0:
                        break
                    conn.ok_pending = conn.ok_pending[n:]
                if not conn.ok_pending and len(conn.txbuf):
                    conn.add_fwd(conn.txbuf.drain(lambda view: conn.stream.send((view,))))
        except OSError as exc:
            self._log.info("vsock: flushing to the host socket failed on %s: %s", conn.key, exc)
            self._remove(conn, True)
            return False
        if conn.ok_pending or conn.msg_lens or (len(conn.txbuf) and not conn.msg_partial):
            conn.stream.want_write()
        elif conn.buffered:
            pass  # only the start of a guest message, which waits for its EOM packet
        else:
            conn.txbuf.release()
            if conn.peer_shut_send and not conn.write_shut:
                try:
                    conn.stream.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    self._log.info("vsock: host socket shutdown failed on %s: %s", conn.key, exc)
                    self._remove(conn, True)
                    return False
                conn.write_shut = True
            if conn.peer_shut_send and conn.peer_shut_recv:
                self._remove(conn, True)
                return False
        if conn.fwd_cnt != before:
            self._schedule(conn)
        return True
