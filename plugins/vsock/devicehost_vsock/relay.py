"""The hybrid vsock relay: real non-blocking Unix sockets for the connection table.

One epoll instance watches every host socket; the relay waits for the epoll descriptor itself with
anyio, so a thousand connections cost one task. Interest is armed on request of the connection
table (``want_read``/``want_write``/``want_close``) and disarmed once reported (one report per
request), with HUP/ERR always reported and final (facts section 9.11: IN/ERR/RDHUP mean "has
data", HUP/ERR mean "closed"; after a half-close only HUP/ERR matter).

The device's own listener is bound at ``base_path`` (a stale socket file is removed first, see
:func:`bind_listener`); host processes connect there and speak the CONNECT line protocol. With
SEQPACKET offered a second, ``SOCK_SEQPACKET``, listener at ``<base_path>_seqpacket`` takes
host-initiated SEQPACKET connections (the CONNECT line is their first message). The listeners
belong to the device (:mod:`devicehost_vsock.listeners`), which hands accepted connections to
:meth:`Relay.take`; :meth:`Relay.serve_listener` accepts itself only for a device driven
without a host. Guest connections to port P are relayed to
``<base_path>_<P>`` or ``<base_path>_<guid>`` with a socket of the guest connection's kind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import stat
import termios
from collections.abc import Callable, Sequence
from typing import Final

import anyio

from devicehost.accepting import AcceptBackoff, accept_socket
from devicehost_vsock.hybrid import host_listener_path
from devicehost_vsock.manager import ConnectionManager
from devicehost_vsock.protocol import TYPE_SEQPACKET, TYPE_STREAM

__all__ = ["Relay", "UnixStream", "bind_listener"]

Buffer = bytes | bytearray | memoryview

_IN: Final = select.EPOLLIN | select.EPOLLRDHUP
_OUT: Final = select.EPOLLOUT
_GONE: Final = select.EPOLLHUP | select.EPOLLERR
#: The argument of the FIONREAD ioctl (a C int, filled in by the kernel in the returned copy).
_INT_ZERO: Final = bytes(4)
#: Room for one SCM_CREDENTIALS message (struct ucred: pid, uid, gid).
_CRED_SPACE: Final = socket.CMSG_SPACE(12)
_PEEK_LENGTH: Final = socket.MSG_PEEK | socket.MSG_TRUNC
#: The host socket kind of each vsock socket type.
_SOCKET_KIND: Final = {TYPE_STREAM: socket.SOCK_STREAM, TYPE_SEQPACKET: socket.SOCK_SEQPACKET}


def bind_listener(path: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A non-blocking Unix listener of ``kind`` (``SOCK_STREAM`` or ``SOCK_SEQPACKET``) at
    ``path``, replacing a stale socket file there.

    Raises :class:`FileExistsError` if ``path`` exists and is not a socket (never deleted).
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; choose another base_path")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        sock.bind(path)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class UnixStream:
    """A host Unix socket as the connection table's ``HostStream``."""

    __slots__ = ("_mask", "_relay", "fd", "sock")

    def __init__(self, sock: socket.socket, relay: Relay) -> None:
        sock.setblocking(False)
        if sock.type == socket.SOCK_SEQPACKET:
            # Every received message then carries credentials: a peek tells an empty message
            # (credentials, no bytes) from end of stream (neither), see message_size.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock = sock
        self.fd = sock.fileno()
        self._relay = relay
        #: Armed epoll interest; None once unregistered (closed or HUP reported).
        self._mask: int | None = 0
        relay.epoll.register(self.fd, 0)
        relay.streams[self.fd] = self

    def fileno(self) -> int:
        return self.fd

    def recv_into(self, buf: memoryview) -> int | None:
        try:
            return self.sock.recv_into(buf)
        except BlockingIOError:
            return None

    def recv_into_many(self, bufs: Sequence[memoryview]) -> int | None:
        try:
            return self.sock.recvmsg_into(bufs)[0]
        except BlockingIOError:
            return None

    def queued(self) -> int:
        return int.from_bytes(fcntl.ioctl(self.fd, termios.FIONREAD, _INT_ZERO), "little")

    def peek(self, max_len: int) -> bytes | None:
        try:
            return self.sock.recv(max_len, socket.MSG_PEEK)
        except BlockingIOError:
            return None

    def send(self, buffers: Sequence[Buffer]) -> int:
        try:
            if len(buffers) == 1:
                return self.sock.send(buffers[0])
            return self.sock.sendmsg(buffers)
        except BlockingIOError:
            return 0

    def message_size(self) -> int | None:
        # A peek with MSG_TRUNC returns the whole length of the next message (SIOCINQ would
        # count every queued message); only a message comes with credentials (SO_PASSCRED), so
        # an empty message is told from end of stream.
        try:
            size, ancillary, _, _ = self.sock.recvmsg_into((), _CRED_SPACE, _PEEK_LENGTH)
        except BlockingIOError:
            return None
        return size if ancillary else -1

    def recv_message_into(self, bufs: Sequence[memoryview]) -> int:
        if len(bufs) == 1 and len(bufs[0]):
            return self.sock.recv_into(bufs[0])
        # recvmsg: Python's recv_into makes no system call for an empty buffer, so an empty
        # message would stay queued.
        return self.sock.recvmsg_into(bufs)[0]

    def send_message(self, buffers: Sequence[Buffer]) -> bool:
        try:
            self.sock.sendmsg(buffers)
        except BlockingIOError:
            return False
        return True

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self._unregister()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def is_closed(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))

    def want_read(self) -> None:
        self._arm(_IN)

    def want_write(self) -> None:
        self._arm(_OUT)

    def want_close(self) -> None:
        # HUP and ERR are always reported while registered.
        pass

    def _arm(self, bits: int) -> None:
        if self._mask is None or self._mask & bits == bits:
            return
        self._mask |= bits
        self._relay.epoll.modify(self.fd, self._mask)

    def _events(self, events: int) -> tuple[bool, bool, bool]:
        """Disarm what fired; returns (readable, writable, closed)."""
        mask = self._mask or 0
        if events & _GONE:
            self._unregister()
            return bool(mask & _IN), bool(mask & _OUT), True
        fired = 0
        if events & _IN and mask & _IN:
            fired |= _IN
        if events & _OUT and mask & _OUT:
            fired |= _OUT
        if fired and self._mask is not None:
            self._mask &= ~fired
            self._relay.epoll.modify(self.fd, self._mask)
        return bool(fired & _IN), bool(fired & _OUT), False

    def _unregister(self) -> None:
        if self._mask is not None:
            self._mask = None
            self._relay.streams.pop(self.fd, None)
            with contextlib.suppress(OSError, ValueError):
                self._relay.epoll.unregister(self.fd)


class Relay:
    """The socket side of one open vsock device: listener, epoll, guest-initiated connects.

    ``wake`` is called after any event changed the connection table, so the worker can look for
    rx work.
    """

    def __init__(
        self, base_path: str, listener: socket.socket | None,
        wake: Callable[[], None] = lambda: None, seqpacket_listener: socket.socket | None = None,
    ) -> None:
        self.base_path = base_path
        #: The listener the worker accepts on (``serve_listener``), or None when the device's
        #: own accept loops hand connections over (``take``).
        self.listener = listener
        #: The SOCK_SEQPACKET listener at ``<base_path>_seqpacket`` (host -> guest SEQPACKET
        #: connections), or None when the device does not offer SEQPACKET.
        self.seqpacket_listener = seqpacket_listener
        self.epoll = select.epoll()
        self.streams: dict[int, UnixStream] = {}
        #: Called after events changed the table (the worker sets it to its own ``wake``).
        self.wake = wake
        #: The clock of the table's timeouts (the worker sets it to its own when it starts).
        self.clock: Callable[[], float] = anyio.current_time
        #: The table fed by the serve loops (set before they start).
        self.manager: ConnectionManager | None = None

    def connect(self, port: int, sock_type: int = TYPE_STREAM) -> UnixStream:
        """Connect to the host listener of ``port`` with a socket of ``sock_type``'s kind (the
        table's connector); OSError on failure, EPROTOTYPE when the listener is of the other
        kind."""
        path = host_listener_path(self.base_path, port)
        sock = socket.socket(socket.AF_UNIX, _SOCKET_KIND[sock_type])
        try:
            sock.setblocking(False)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return UnixStream(sock, self)

    def take(self, sock: socket.socket, seqpacket: bool) -> None:
        """A host connection accepted by the device's listeners (they speak CONNECT next)."""
        manager = self.manager
        assert manager is not None
        try:
            stream = UnixStream(sock, self)
        except OSError as exc:
            sock.close()
            manager.logger.warning(
                "vsock: cannot watch a host connection on %s, closed it: %s", self.base_path, exc
            )
            return
        manager.accept_host(stream, self.clock(), TYPE_SEQPACKET if seqpacket else TYPE_STREAM)
        self.wake()

    async def serve_listener(
        self, listener: socket.socket | None = None, sock_type: int = TYPE_STREAM
    ) -> None:
        """Accept host connections forever (they speak CONNECT next); ``listener`` (default: the
        stream listener at ``base_path``) gives connections of ``sock_type``. A shortage of
        descriptors or kernel memory is waited out (:mod:`devicehost.accepting`); a connection
        that cannot be watched (epoll out of memory or watches) is closed, and only it is lost."""
        manager = self.manager
        assert manager is not None
        listener = self.listener if listener is None else listener
        assert listener is not None
        backoff = AcceptBackoff(f"vsock listener {listener.getsockname()}", manager.logger)
        while True:
            sock = await accept_socket(listener, backoff)
            try:
                stream = UnixStream(sock, self)
            except OSError as exc:
                sock.close()
                manager.logger.warning(
                    "vsock: cannot watch a host connection on %s, closed it: %s",
                    self.base_path, exc,
                )
                continue
            manager.accept_host(stream, self.clock(), sock_type)
            self.wake()

    async def serve_epoll(self) -> None:
        """Report host socket readiness to the connection table forever."""
        manager = self.manager
        assert manager is not None
        while True:
            await anyio.wait_readable(self.epoll.fileno())
            events = self.epoll.poll(0, 1024)
            now = self.clock()
            for fd, ev in events:
                stream = self.streams.get(fd)
                if stream is None:
                    continue
                readable, writable, closed = stream._events(ev)
                if writable:
                    manager.on_writable(stream)
                if readable:
                    manager.on_readable(stream)
                if closed:
                    manager.on_closed(stream, now)
            if events:
                self.wake()

    def close(self) -> None:
        """Close the epoll instance (the table closes its own streams; the listeners belong to
        the device, which keeps them while it is served)."""
        self.epoll.close()
