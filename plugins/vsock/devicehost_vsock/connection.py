"""One relayed vsock connection: its state, its host stream and its credit accounting.

A connection pairs a guest socket with one host Unix socket of the same kind. The connection table
(:mod:`devicehost_vsock.manager`) drives the transitions; this module holds the per-connection
data, the arithmetic of the credit flow and the interface of the host socket the table talks to.

A SEQPACKET connection (virtio feature SEQPACKET) pairs a guest SEQPACKET socket with a host
``SOCK_SEQPACKET`` Unix socket: one host message is one guest message (EOM on its last packet).

States (facts section 9.5)::

    host-initiated:  (pending: reading CONNECT) -> HOST_CONNECTING (REQUEST sent, waiting RESPONSE)
                                                -> CONNECTED
    guest-initiated: GUEST_CONNECTING (RESPONSE not yet delivered) -> CONNECTED

Counters are u32 and wrap: ``fwd_cnt`` counts guest bytes handed to the host socket, ``tx_cnt``
counts bytes sent to the guest in RW packets, ``peer_buf_alloc``/``peer_fwd_cnt`` are the guest's
last advertised receive buffer and its consumed count.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from devicehost_vsock.hybrid import ConnectRequest
from devicehost_vsock.protocol import TX_BUF_SIZE, TYPE_STREAM
from devicehost_vsock.txbuffer import TxBuffer

__all__ = ["Connection", "ConnectionState", "HostStream"]

_U32 = 0xFFFF_FFFF

Buffer = bytes | bytearray | memoryview


class HostStream(Protocol):
    """The host end of a connection: a non-blocking stream socket plus readiness requests.

    The connection table calls these synchronously; the relay implements them over a real Unix
    socket and reports readiness back through the table's ``on_readable``/``on_writable``/
    ``on_closed``. ``OSError`` from any method means the host socket failed.
    """

    def recv_into(self, buf: memoryview) -> int | None:
        """Read into ``buf``: the byte count, 0 at end of stream, ``None`` if it would block."""

    def recv_into_many(self, bufs: Sequence[memoryview]) -> int | None:
        """Read into ``bufs`` in order, each filled before the next (one scatter read): the byte
        count, 0 at end of stream, ``None`` if it would block."""

    def queued(self) -> int:
        """Bytes queued for reading right now (0 when none, also at end of stream); a hint that
        sizes scatter reads (more may arrive before the read)."""

    def peek(self, max_len: int) -> bytes | None:
        """Return up to ``max_len`` queued bytes without consuming them (``b""`` at end of
        stream, ``None`` if nothing is queued yet)."""

    def send(self, buffers: Sequence[Buffer]) -> int:
        """Write the concatenation of ``buffers``; return the bytes taken (0 if it would block)."""

    def shutdown(self, how: int) -> None:
        """``socket.shutdown`` with ``SHUT_RD``, ``SHUT_WR`` or ``SHUT_RDWR``."""

    def close(self) -> None:
        """Shut down both directions and release the socket; never raises."""

    def is_closed(self) -> bool:
        """True when the socket is fully closed (both directions shut: POLLHUP)."""

    def message_size(self) -> int | None:
        """SEQPACKET sockets: the length of the next queued message (0 for an empty one), -1 at
        end of stream, ``None`` if nothing is queued yet."""

    def recv_message_into(self, bufs: Sequence[memoryview]) -> int:
        """SEQPACKET sockets: read the next message into ``bufs`` in order (what does not fit is
        discarded); its byte count."""

    def send_message(self, buffers: Sequence[Buffer]) -> bool:
        """SEQPACKET sockets: send the concatenation of ``buffers`` as one message; False (nothing
        sent) if it would block."""

    def want_read(self) -> None:
        """Ask for one ``on_readable`` report when data or end of stream is queued."""

    def want_write(self) -> None:
        """Ask for one ``on_writable`` report when the socket accepts data again."""

    def want_close(self) -> None:
        """Ask for one ``on_closed`` report when the socket is fully closed."""


class ConnectionState(enum.Enum):
    PENDING_CONNECT = "pending-connect"
    HOST_CONNECTING = "host-connecting"
    GUEST_CONNECTING = "guest-connecting"
    CONNECTED = "connected"


class Connection:
    """The state of one connection; the connection table owns every transition."""

    __slots__ = (
        "connect_line",
        "connect_request",
        "credit_request_pending",
        "credit_update_requested",
        "deadline",
        "fwd_cnt",
        "host_closed",
        "host_eof",
        "host_initiated",
        "key",
        "last_told_fwd_cnt",
        "msg_lens",
        "msg_partial",
        "ok_pending",
        "peer_buf_alloc",
        "peer_fwd_cnt",
        "peer_shut_recv",
        "peer_shut_send",
        "readable",
        "request_pending",
        "response_pending",
        "rx_message",
        "rx_offset",
        "shutdown_sent",
        "sock_type",
        "state",
        "stream",
        "tx_cnt",
        "txbuf",
        "waiting_for_credit",
        "write_shut",
    )

    def __init__(
        self, stream: HostStream, *, host_initiated: bool, tx_buffer_size: int = TX_BUF_SIZE,
        sock_type: int = TYPE_STREAM,
    ) -> None:
        self.stream = stream
        self.host_initiated = host_initiated
        #: TYPE_STREAM or TYPE_SEQPACKET: the header type of every packet of this connection.
        self.sock_type = sock_type
        # SEQPACKET only. Guest -> host: the lengths of the complete messages in ``txbuf`` that the
        # host socket has not taken yet (made on first use), and the bytes of the message being
        # received (at the tail of ``txbuf``, sent once its EOM packet arrives). Host -> guest:
        # the host message being relayed in pieces, and how much of it went out.
        self.msg_lens: deque[int] | None = None
        self.msg_partial = 0
        self.rx_message: bytearray | None = None
        self.rx_offset = 0
        #: (local_port, peer_port); None while a host connection has not sent its CONNECT line.
        self.key: tuple[int, int] | None = None
        self.state = ConnectionState.PENDING_CONNECT
        self.connect_line = bytearray()
        self.connect_request: ConnectRequest | None = None
        #: Monotonic time at which a connect or graceful-shutdown timeout fires.
        self.deadline: float | None = None
        self.request_pending = False
        self.response_pending = False
        #: Bytes of the ``OK`` line not yet written to the host socket (they precede guest data).
        self.ok_pending = b""
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        self.fwd_cnt = 0
        self.last_told_fwd_cnt = 0
        self.credit_update_requested = False
        self.credit_request_pending = False
        self.waiting_for_credit = False
        #: Host-bound bytes the socket did not take yet; capacity = the buf_alloc the device
        #: advertises, storage allocated on first use only.
        self.txbuf = TxBuffer(tx_buffer_size)
        #: The host socket may have data or end of stream queued.
        self.readable = True
        self.host_eof = False
        self.host_closed = False
        self.shutdown_sent = False
        self.peer_shut_send = False
        self.peer_shut_recv = False
        self.write_shut = False

    @property
    def peer_credit(self) -> int:
        """Bytes the guest can still receive: buf_alloc - (tx_cnt - fwd_cnt), never below 0.

        As Linux's ``virtio_transport_get_credit``/``virtio_transport_has_space``: the bytes in
        flight are a u32 difference (the counters wrap), the credit is that subtracted from
        buf_alloc *without* wrapping and clamped at 0. A guest that shrinks its window below what
        is already in flight (or reports a fwd_cnt ahead of what it was sent, which reads as a
        huge in-flight count) has no credit until its updates make the difference positive again.
        """
        credit = self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & _U32)
        return credit if credit > 0 else 0

    def set_peer_credit(self, buf_alloc: int, fwd_cnt: int) -> None:
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt

    def add_fwd(self, n: int) -> None:
        self.fwd_cnt = (self.fwd_cnt + n) & _U32

    def add_tx(self, n: int) -> None:
        self.tx_cnt = (self.tx_cnt + n) & _U32

    @property
    def buffered(self) -> int:
        """Host-bound bytes not yet accepted by the host socket (OK line included)."""
        return len(self.ok_pending) + len(self.txbuf)

    @property
    def credit_update_due(self) -> bool:
        return self.credit_update_requested or self.fwd_cnt != self.last_told_fwd_cnt

    def __repr__(self) -> str:
        return f"<Connection {self.key} {self.state.value}>"
