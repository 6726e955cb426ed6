"""Saving an open vsock device for a live handoff, and rebuilding it in the new process.

:func:`save_runner` turns a stopped runner into a :class:`~devicehost_vsock.saved.VsockSavedState`
and declares every descriptor it needs through ``ctx.fds`` (the listeners and each connection's
host socket). :func:`restore_runner` validates such a state (it comes from another process),
takes the descriptors back and builds a runner over the new queues. It acts on nothing outside
this process: no byte is written to a host socket or to the guest, nothing is accepted (the
listeners are paused until the runner runs), sockets are only registered with the new epoll. If
anything fails, the descriptors taken so far are closed without ``shutdown`` (which would end the
connection for the process that still serves it: the handoff rolls back).

The rx buffers the old runner held (popped, not yet filled) are not part of the state: the
transport returns them again from ``pop`` after the restore (a chain is pushed when its effect is
applied; the runner pushes tx chains in the same step that handles them, so only rx buffers
waiting for data are ever held across an await).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Final

import anyio

from devicehost import SavedStateError
from devicehost.handoff import FdStash
from devicehost_vsock.connection import Connection
from devicehost_vsock.hybrid import seqpacket_listener_path
from devicehost_vsock.listeners import HostListeners
from devicehost_vsock.relay import UnixStream
from devicehost_vsock.saved import (
    MAX_SAVED_RSTS,
    SavedRst,
    VsockSavedState,
    check_untrusted,
    restore_connection,
    save_connection,
)
from devicehost_vsock.worker import VsockWorker

__all__ = ["check_state", "restore_listeners", "restore_table", "save_runner"]

_KIND: Final = {1: socket.SOCK_STREAM, 2: socket.SOCK_SEQPACKET}


def save_runner(
    fds: FdStash, worker: VsockWorker, listeners: HostListeners, *, guest_cid: int
) -> VsockSavedState:
    """The state of the stopped ``worker`` and its ``listeners``, descriptors put in ``fds``."""
    manager = worker.manager
    conns, rsts, last_port = manager.saved_view()
    now = worker.now()
    stream_listener = fds.put(listeners.stream)
    seqpacket_listener = None if listeners.seqpacket is None else fds.put(listeners.seqpacket)
    saved = []
    for conn in conns:
        stream = conn.stream
        if not isinstance(stream, UnixStream):
            raise TypeError(f"connection {conn.key} has no Unix socket to hand over")
        saved.append(save_connection(conn, fds.put(stream.fileno()), now))
    if len(rsts) > MAX_SAVED_RSTS:
        manager.logger.warning("vsock: %d RSTs owed to the guest, the last %d not handed over",
                               len(rsts), len(rsts) - MAX_SAVED_RSTS)
    return VsockSavedState(
        guest_cid=guest_cid,
        tx_buffer_size=manager.tx_buffer_size,
        base_path=listeners.base_path,
        temp_dir=listeners.temp_dir,
        stream_listener=stream_listener,
        seqpacket_listener=seqpacket_listener,
        last_port=last_port,
        connections=tuple(saved),
        rsts=tuple(SavedRst(*r) for r in rsts[:MAX_SAVED_RSTS]),
        packets_in=worker.packets_in,
        packets_out=worker.packets_out,
    )


class _Taken:
    """Descriptors taken from the stash so far: closed (never shut down) if the restore fails."""

    def __init__(self, fds: FdStash) -> None:
        self._fds = fds
        self.sockets: list[socket.socket] = []

    def take(self, handle: int, kind: int, what: str) -> socket.socket:
        sock = self._fds.take_socket(handle)
        self.sockets.append(sock)
        if sock.family != socket.AF_UNIX or sock.type != kind:
            raise SavedStateError(f"vsock saved state: {what} (handle {handle}) is not a Unix"
                                  f" socket of kind {kind!r}")
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def _listener(taken: _Taken, handle: int, kind: int, path: str) -> socket.socket:
    sock = taken.take(handle, kind, f"the listener at {path}")
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if not listening or sock.getsockname() != path:
        raise SavedStateError(f"vsock saved state: handle {handle} is not the listener at {path}")
    sock.setblocking(False)
    return sock


def restore_listeners(
    fds: FdStash, state: VsockSavedState, *, logger: logging.Logger, connect_timeout: float,
    handed_over: Callable[[], bool],
) -> HostListeners:
    """The listeners of ``state`` (checked), taken back from ``fds``."""
    taken = _Taken(fds)
    try:
        stream = _listener(taken, state.stream_listener, socket.SOCK_STREAM, state.base_path)
        seqpacket = None
        if state.seqpacket_listener is not None:
            seqpacket = _listener(taken, state.seqpacket_listener, socket.SOCK_SEQPACKET,
                                  seqpacket_listener_path(state.base_path))
    except BaseException:
        taken.close()
        raise
    return HostListeners(state.base_path, stream, seqpacket, state.temp_dir, logger,
                         connect_timeout, handed_over)


def restore_table(fds: FdStash, state: VsockSavedState, worker: VsockWorker) -> None:
    """Fill the new ``worker``'s connection table from ``state`` (checked), each host socket
    taken back from ``fds`` and registered with the worker's relay."""
    taken = _Taken(fds)
    relay = worker.relay
    manager = worker.manager
    now = anyio.current_time()
    conns: list[Connection] = []
    try:
        for i, saved in enumerate(state.connections):
            sock = taken.take(saved.socket, _KIND[saved.sock_type], f"connections[{i}]")
            conns.append(restore_connection(saved, UnixStream(sock, relay),
                                            manager.tx_buffer_size, now))
    except BaseException:
        taken.close()
        raise
    manager.adopt(conns, [(r.local_port, r.peer_port, r.sock_type) for r in state.rsts],
                  state.last_port)
    worker.packets_in = state.packets_in
    worker.packets_out = state.packets_out


def check_state(
    state: object, *, guest_cid: int, tx_buffer_size: int, base_path: str, seqpacket: bool,
    types: frozenset[int],
) -> VsockSavedState:
    """``state`` as a checked :class:`VsockSavedState` (:func:`saved.check_untrusted`)."""
    if not isinstance(state, VsockSavedState):
        raise SavedStateError(f"vsock cannot restore a {type(state).__qualname__}")
    check_untrusted(state, guest_cid=guest_cid, tx_buffer_size=tx_buffer_size,
                    base_path=base_path, seqpacket=seqpacket, types=types)
    return state
