"""The vsock device's saved state: its connection table and listeners, for a live handoff.

Saved only when the descriptors travel with the state (``ctx.fds.carries_fds``: a takeover by a
new ``devicehost`` process, ``docs/servicing.md``): a connection is its host Unix socket, which
cannot outlive the process that holds it, so a ``--state`` file could restore nothing but
connections without sockets. Then ``save_open`` returns None (the device is offered anew).

What is saved (a saved-state type is a wire format, separate from the runtime types, built by
destructuring them exhaustively; the version is bumped with any change):

- the device's listeners (stream, and SEQPACKET if offered) as fd handles, their ``base_path``
  and the temporary directory holding them when ``base_path`` was not configured;
- the last host-side port handed out (so that new host connections get fresh ports);
- the RSTs owed to the guest for keys without a connection;
- per connection (established, being connected either way, or a host connection whose CONNECT
  line is not read yet): its host socket as an fd handle, its type, ports, phase, the bytes of
  its CONNECT line read so far, its deadline as the time left (microseconds), the pending
  REQUEST/RESPONSE and OK line, both directions' credit counters (buf_alloc, fwd_cnt, tx_cnt and
  the guest's values), the flags of owed CREDIT_UPDATE/REQUEST, guest-bound bytes already read
  from the host socket (a SEQPACKET message being relayed in pieces) and host-bound bytes the
  socket has not taken (``txbuf``; for SEQPACKET the lengths of its whole messages and the part
  of the one still being received), and the shutdown flags of both sides.

Not saved: rx buffers the device popped but has not filled (the transport replays them after the
restore: a chain is pushed when its effect is applied, and a held one was not), and per-wait
readiness (every restored connection is treated as readable and re-armed on the new epoll).

:func:`check_untrusted` validates a decoded state, which comes from another process: every
count within its range, every connection's phase consistent with its fields, ports and handles
unique, buffers within the advertised window. Its one error is
:class:`~devicehost.errors.SavedStateError`, naming the field.
"""

from __future__ import annotations

import enum
import os
import tempfile
from collections import deque
from typing import Final

import attrs

from devicehost import SavedStateError, saved_state
from devicehost_vsock.connection import Connection, ConnectionState, HostStream
from devicehost_vsock.hybrid import CONNECT_LINE_MAX, ConnectLineError, decode_connect_untrusted
from devicehost_vsock.owedrsts import MAX_OWED_RSTS
from devicehost_vsock.ports import FIRST_PORT, LAST_PORT
from devicehost_vsock.protocol import MAX_ACTIVE_CONNECTIONS, TYPE_SEQPACKET, TYPE_STREAM

__all__ = [
    "MAX_SAVED_MESSAGES",
    "MAX_SAVED_RSTS",
    "TEMP_PREFIX",
    "SavedConnection",
    "SavedPhase",
    "SavedRst",
    "VsockSavedState",
    "check_untrusted",
    "restore_connection",
    "save_connection",
]

_U32: Final = 0xFFFF_FFFF
#: RSTs owed to the guest that a saved state may carry: as many as the device may owe at all.
MAX_SAVED_RSTS: Final = MAX_OWED_RSTS
#: Whole guest messages one SEQPACKET connection's saved tx buffer may hold (empty messages
#: count too).
MAX_SAVED_MESSAGES: Final = 65536
#: The longest deadline a saved state may name (the connect timeout's own upper bound).
_MAX_DEADLINE_US: Final = 3600 * 1_000_000
#: The longest OK line: "OK " + a GUID + "\n".
_MAX_OK: Final = 40
#: Unix socket paths are at most 107 bytes.
_MAX_PATH: Final = 107
#: The prefix of the temporary directory holding the listeners when no base_path is configured.
TEMP_PREFIX: Final = "devicehost-vsock-"


class SavedPhase(enum.Enum):
    """A connection's phase (``ConnectionState``, saved by value)."""

    PENDING_CONNECT = "pending-connect"
    HOST_CONNECTING = "host-connecting"
    GUEST_CONNECTING = "guest-connecting"
    CONNECTED = "connected"


_PHASE_OF: Final = {ConnectionState(p.value): p for p in SavedPhase}


@attrs.frozen
class SavedConnection:
    """One connection (fields as :class:`~devicehost_vsock.connection.Connection`)."""

    #: The host socket's handle in ``ctx.fds``.
    socket: int
    sock_type: int
    host_initiated: bool
    phase: SavedPhase
    #: None (both) while a host connection's CONNECT line is not read yet.
    local_port: int | None
    peer_port: int | None
    connect_line: bytes
    #: Microseconds left until the connect or graceful-shutdown timeout; None: no timeout.
    deadline_us: int | None
    request_pending: bool
    response_pending: bool
    ok_pending: bytes
    peer_buf_alloc: int
    peer_fwd_cnt: int
    tx_cnt: int
    fwd_cnt: int
    last_told_fwd_cnt: int
    credit_update_requested: bool
    credit_request_pending: bool
    waiting_for_credit: bool
    #: Host-bound bytes the host socket has not taken (SEQPACKET: whole messages, then the part
    #: of the message being received).
    txbuf: bytes
    msg_lens: tuple[int, ...]
    msg_partial: int
    #: SEQPACKET: the host message being relayed to the guest in pieces, and how much went out.
    rx_message: bytes | None
    rx_offset: int
    host_eof: bool
    host_closed: bool
    shutdown_sent: bool
    peer_shut_send: bool
    peer_shut_recv: bool
    write_shut: bool


@attrs.frozen
class SavedRst:
    """An RST owed to the guest for a key without a connection."""

    local_port: int
    peer_port: int
    sock_type: int


@saved_state("vsock.SavedState", 1)
@attrs.frozen
class VsockSavedState:
    """An open vsock device, handed over live (module docstring)."""

    guest_cid: int
    tx_buffer_size: int
    base_path: str
    #: The temporary directory holding ``base_path`` when none was configured (removed when the
    #: device's host stops), else None.
    temp_dir: str | None
    stream_listener: int
    seqpacket_listener: int | None
    #: The last host-side port handed out.
    last_port: int
    connections: tuple[SavedConnection, ...]
    rsts: tuple[SavedRst, ...]
    packets_in: int
    packets_out: int


# -- runtime -> saved -----------------------------------------------------------------------------


def save_connection(conn: Connection, handle: int, now: float) -> SavedConnection:
    """``conn`` as saved, its host socket under ``handle``; deadlines as the time left at
    ``now``."""
    key = conn.key
    deadline = None
    if conn.deadline is not None:
        deadline = max(0, min(_MAX_DEADLINE_US, round((conn.deadline - now) * 1_000_000)))
    return SavedConnection(
        socket=handle,
        sock_type=conn.sock_type,
        host_initiated=conn.host_initiated,
        phase=_PHASE_OF[conn.state],
        local_port=None if key is None else key[0],
        peer_port=None if key is None else key[1],
        connect_line=bytes(conn.connect_line),
        deadline_us=deadline,
        request_pending=conn.request_pending,
        response_pending=conn.response_pending,
        ok_pending=bytes(conn.ok_pending),
        peer_buf_alloc=conn.peer_buf_alloc,
        peer_fwd_cnt=conn.peer_fwd_cnt,
        tx_cnt=conn.tx_cnt,
        fwd_cnt=conn.fwd_cnt,
        last_told_fwd_cnt=conn.last_told_fwd_cnt,
        credit_update_requested=conn.credit_update_requested,
        credit_request_pending=conn.credit_request_pending,
        waiting_for_credit=conn.waiting_for_credit,
        txbuf=b"".join(conn.txbuf.views(len(conn.txbuf))),
        msg_lens=tuple(conn.msg_lens or ()),
        msg_partial=conn.msg_partial,
        rx_message=None if conn.rx_message is None else bytes(conn.rx_message),
        rx_offset=conn.rx_offset if conn.rx_message is not None else 0,
        host_eof=conn.host_eof,
        host_closed=conn.host_closed,
        shutdown_sent=conn.shutdown_sent,
        peer_shut_send=conn.peer_shut_send,
        peer_shut_recv=conn.peer_shut_recv,
        write_shut=conn.write_shut,
    )


# -- saved -> runtime -----------------------------------------------------------------------------


def restore_connection(
    saved: SavedConnection, stream: HostStream, tx_buffer_size: int, now: float
) -> Connection:
    """The connection ``saved`` (checked by :func:`check_untrusted`) over ``stream``; its
    deadline counts from ``now``."""
    conn = Connection(stream, host_initiated=saved.host_initiated, tx_buffer_size=tx_buffer_size,
                      sock_type=saved.sock_type)
    conn.state = ConnectionState(saved.phase.value)
    if saved.local_port is not None and saved.peer_port is not None:
        conn.key = (saved.local_port, saved.peer_port)
    conn.connect_line = bytearray(saved.connect_line)
    if conn.host_initiated and conn.key is not None:
        conn.connect_request = decode_connect_untrusted(saved.connect_line)
    if saved.deadline_us is not None:
        conn.deadline = now + saved.deadline_us / 1_000_000
    conn.request_pending = saved.request_pending
    conn.response_pending = saved.response_pending
    conn.ok_pending = saved.ok_pending
    conn.peer_buf_alloc = saved.peer_buf_alloc
    conn.peer_fwd_cnt = saved.peer_fwd_cnt
    conn.tx_cnt = saved.tx_cnt
    conn.fwd_cnt = saved.fwd_cnt
    conn.last_told_fwd_cnt = saved.last_told_fwd_cnt
    conn.credit_update_requested = saved.credit_update_requested
    conn.credit_request_pending = saved.credit_request_pending
    conn.waiting_for_credit = saved.waiting_for_credit
    if saved.txbuf:
        conn.txbuf.write([saved.txbuf])
    conn.msg_lens = deque(saved.msg_lens) if saved.msg_lens else None
    conn.msg_partial = saved.msg_partial
    conn.rx_message = None if saved.rx_message is None else bytearray(saved.rx_message)
    conn.rx_offset = saved.rx_offset
    conn.readable = True  # re-armed on the new epoll when first found empty
    conn.host_eof = saved.host_eof
    conn.host_closed = saved.host_closed
    conn.shutdown_sent = saved.shutdown_sent
    conn.peer_shut_send = saved.peer_shut_send
    conn.peer_shut_recv = saved.peer_shut_recv
    conn.write_shut = saved.write_shut
    return conn


# -- validation -----------------------------------------------------------------------------------


def _fail(where: str, what: str) -> SavedStateError:
    return SavedStateError(f"vsock saved state: {where}: {what}")


def _u32(value: int, where: str) -> None:
    if not 0 <= value <= _U32:
        raise _fail(where, f"{value} is not a u32")


def _check_paths(state: VsockSavedState, configured: str) -> None:
    base = state.base_path
    if not base or "\0" in base or len(base.encode()) > _MAX_PATH or not os.path.isabs(base):
        raise _fail("base_path", "not an absolute Unix socket path")
    if configured:
        if base != configured:
            raise _fail("base_path", f"{base!r} is not the configured base_path {configured!r}")
        if state.temp_dir is not None:
            raise _fail("temp_dir", "set although base_path is configured")
        return
    # No base_path configured: the listeners live in a temporary directory of the device's,
    # which the device removes when it stops; only such a directory is accepted.
    temp = state.temp_dir
    if (
        temp is None
        or os.path.dirname(temp) != tempfile.gettempdir()
        or not os.path.basename(temp).startswith(TEMP_PREFIX)
        or base != os.path.join(temp, "vsock")
    ):
        raise _fail("temp_dir", f"{temp!r} is not a vsock temporary directory holding base_path")


def _check_connection(c: SavedConnection, where: str, tx_buffer_size: int,
                      types: frozenset[int]) -> None:
    if c.sock_type not in types:
        raise _fail(where, f"socket type {c.sock_type} was not negotiated by the driver")
    for name in ("peer_buf_alloc", "peer_fwd_cnt", "tx_cnt", "fwd_cnt", "last_told_fwd_cnt"):
        _u32(getattr(c, name), f"{where}.{name}")
    pending = c.phase is SavedPhase.PENDING_CONNECT
    if (c.local_port is None) != (c.peer_port is None) or (c.local_port is None) != pending:
        raise _fail(where, "ports must be given exactly when the CONNECT line was read")
    if pending and not c.host_initiated:
        raise _fail(where, "only a host connection waits for its CONNECT line")
    if c.local_port is not None and c.peer_port is not None:
        _u32(c.local_port, f"{where}.local_port")
        _u32(c.peer_port, f"{where}.peer_port")
        if c.host_initiated and not FIRST_PORT <= c.local_port <= LAST_PORT:
            raise _fail(where, f"host-side port {c.local_port:#x} is outside the host range")
    if len(c.connect_line) > CONNECT_LINE_MAX:
        raise _fail(where, f"CONNECT line of {len(c.connect_line)} bytes")
    if c.host_initiated and not pending:
        try:
            request = decode_connect_untrusted(c.connect_line)
        except ConnectLineError as exc:
            raise _fail(where, f"CONNECT line: {exc}") from exc
        if request.port != c.peer_port:
            raise _fail(where, "the CONNECT line names another port than the connection")
    elif not c.host_initiated and c.connect_line:
        raise _fail(where, "a guest connection has no CONNECT line")
    if c.host_initiated and c.phase is SavedPhase.GUEST_CONNECTING:
        raise _fail(where, "phase guest-connecting for a host connection")
    if c.phase is SavedPhase.HOST_CONNECTING and not c.host_initiated:
        raise _fail(where, "phase host-connecting for a guest connection")
    if c.request_pending and c.phase is not SavedPhase.HOST_CONNECTING:
        raise _fail(where, "a REQUEST pending outside host-connecting")
    if c.response_pending != (c.phase is SavedPhase.GUEST_CONNECTING):
        raise _fail(where, "a RESPONSE is pending exactly while guest-connecting")
    if len(c.ok_pending) > _MAX_OK or (c.ok_pending and not c.host_initiated):
        raise _fail(where, "OK line pending that this connection cannot owe")
    if c.deadline_us is not None and not 0 <= c.deadline_us <= _MAX_DEADLINE_US:
        raise _fail(where, f"deadline {c.deadline_us} us is out of range")
    if c.deadline_us is None and c.phase in (SavedPhase.PENDING_CONNECT,
                                             SavedPhase.HOST_CONNECTING):
        raise _fail(where, f"no deadline while {c.phase.value} (the connect timeout runs)")
    if len(c.txbuf) > tx_buffer_size:
        raise _fail(where, f"{len(c.txbuf)} buffered bytes exceed the window of"
                           f" {tx_buffer_size}")
    if c.sock_type == TYPE_STREAM:
        if c.msg_lens or c.msg_partial or c.rx_message is not None or c.rx_offset:
            raise _fail(where, "message boundaries on a stream connection")
    else:
        if len(c.msg_lens) > MAX_SAVED_MESSAGES or any(n < 0 for n in c.msg_lens):
            raise _fail(where, "message lengths out of range")
        if c.msg_partial < 0 or sum(c.msg_lens) + c.msg_partial != len(c.txbuf):
            raise _fail(where, "message lengths do not add up to the buffered bytes")
        staged = c.rx_message
        if staged is None:
            if c.rx_offset:
                raise _fail(where, "an rx offset without a staged message")
        elif len(staged) > tx_buffer_size or not 0 <= c.rx_offset < len(staged):
            raise _fail(where, "the staged host message or its offset is out of range")
    if c.write_shut and not c.peer_shut_send:
        raise _fail(where, "host write side shut without the guest's SHUTDOWN(SEND)")
    if (c.shutdown_sent or c.host_eof) and c.phase is not SavedPhase.CONNECTED:
        raise _fail(where, "end of stream relayed on an unconnected connection")


def check_untrusted(
    state: VsockSavedState, *, guest_cid: int, tx_buffer_size: int, base_path: str,
    seqpacket: bool, types: frozenset[int],
) -> None:
    """Validate ``state`` (decoded from another process) against the device's configuration
    and the socket ``types`` the driver negotiated; :class:`SavedStateError` naming the field."""
    if state.guest_cid != guest_cid:
        raise _fail("guest_cid", f"saved for CID {state.guest_cid}, configured {guest_cid}")
    if state.tx_buffer_size != tx_buffer_size:
        raise _fail("tx_buffer_size", f"saved with {state.tx_buffer_size}, configured"
                                      f" {tx_buffer_size} (the guest was told the saved one)")
    _check_paths(state, base_path)
    if (state.seqpacket_listener is not None) != seqpacket:
        raise _fail("seqpacket_listener", "present exactly when SEQPACKET is offered")
    if not FIRST_PORT - 1 <= state.last_port <= LAST_PORT:
        raise _fail("last_port", f"{state.last_port:#x} is outside the host range")
    for name in ("packets_in", "packets_out"):
        if not 0 <= getattr(state, name) < 1 << 63:
            raise _fail(name, "out of range")
    if len(state.connections) > MAX_ACTIVE_CONNECTIONS:
        raise _fail("connections", f"{len(state.connections)} exceed the limit of"
                                   f" {MAX_ACTIVE_CONNECTIONS}")
    if len(state.rsts) > MAX_SAVED_RSTS:
        raise _fail("rsts", f"{len(state.rsts)} exceed the limit of {MAX_SAVED_RSTS}")
    for i, rst in enumerate(state.rsts):
        _u32(rst.local_port, f"rsts[{i}].local_port")
        _u32(rst.peer_port, f"rsts[{i}].peer_port")
        if rst.sock_type not in (TYPE_STREAM, TYPE_SEQPACKET):
            raise _fail(f"rsts[{i}]", f"socket type {rst.sock_type}")
    handles = {state.stream_listener}
    if state.seqpacket_listener is not None:
        handles.add(state.seqpacket_listener)
    if len(handles) != (2 if seqpacket else 1):
        raise _fail("seqpacket_listener", "the same handle as the stream listener")
    keys: set[tuple[int, int]] = set()
    host_ports: set[int] = set()
    for i, conn in enumerate(state.connections):
        where = f"connections[{i}]"
        _check_connection(conn, where, tx_buffer_size, types)
        if conn.socket in handles:
            raise _fail(where, f"socket handle {conn.socket} is used twice")
        handles.add(conn.socket)
        if conn.local_port is not None and conn.peer_port is not None:
            key = (conn.local_port, conn.peer_port)
            if key in keys:
                raise _fail(where, f"connection {key} appears twice")
            keys.add(key)
            if conn.host_initiated:
                if conn.local_port in host_ports:
                    raise _fail(where, f"host-side port {conn.local_port:#x} is used twice")
                host_ports.add(conn.local_port)
