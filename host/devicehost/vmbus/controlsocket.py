"""One end of a VMBus socket: SOCK_SEQPACKET messages of at most 240 bytes, with fds beside them.

Both the host (:mod:`devicehost.vmbus.socketserver`) and the guest
(:mod:`devicehost.vmbus.socketclient`) send and receive through a :class:`ControlSocket`. Each
``receive`` returns exactly one message and the fds that came with it (``SCM_RIGHTS``, received
close-on-exec). Framing faults of the peer raise :class:`ControlSocketError` after closing every
fd that arrived: a message longer than :data:`MAX_MESSAGE_SIZE` (truncated by the kernel), more
than :data:`MAX_FDS` fds or ancillary data cut short, ancillary data other than fds. End of
stream (the peer closed or died) is ``(b"", [])``: a zero-length message is no VMBus message
either, so it ends the connection the same way.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from typing import Final

import anyio

from devicehost.vmbus.messages import MAX_MESSAGE_SIZE, MEMORY_TABLE_MAX_REGIONS

__all__ = ["MAX_FDS", "ControlSocket", "ControlSocketError", "close_fds"]

#: Most fds one message may carry (a full memory table).
MAX_FDS: Final = MEMORY_TABLE_MAX_REGIONS
_ANCILLARY: Final = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ControlSocketError(Exception):
    """Raised when the peer breaks the socket's framing (the peer is to blame)."""


def close_fds(fds: list[int]) -> None:
    """Close every fd in ``fds`` (errors ignored) and empty the list."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


class ControlSocket:
    """A connected SOCK_SEQPACKET socket, owned (closed by :meth:`close`)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._send_lock = anyio.Lock()
        self.closed = False

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> ControlSocket:
        """Connect to a VMBus socket at ``path`` (OSError if nobody listens there)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            try:
                sock.connect(os.fspath(path))
            except BlockingIOError:
                await anyio.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error)) from None
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def receive_nowait(self) -> tuple[bytes, list[int]]:
        """One message and its fds; BlockingIOError if none is waiting (see the module)."""
        data, ancillary, flags, _addr = self.sock.recvmsg(
            MAX_MESSAGE_SIZE + 1, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
        fds: list[int] = []
        unexpected = False
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                values = array.array("i")
                values.frombytes(payload[: len(payload) - len(payload) % values.itemsize])
                fds.extend(values)
            else:
                unexpected = True
        too_long = flags & socket.MSG_TRUNC or len(data) > MAX_MESSAGE_SIZE
        if too_long or flags & socket.MSG_CTRUNC or unexpected or len(fds) > MAX_FDS:
            close_fds(fds)
            if too_long:
                raise ControlSocketError(f"a message is longer than {MAX_MESSAGE_SIZE} bytes")
            raise ControlSocketError(
                f"a message carries more than {MAX_FDS} fds or unexpected ancillary data")
        if not data:
            close_fds(fds)
        return data, fds

    async def receive(self) -> tuple[bytes, list[int]]:
        """Wait for one message and its fds (``(b"", [])`` at end of stream)."""
        while True:
            try:
                return self.receive_nowait()
            except BlockingIOError:
                pass
            except (ConnectionResetError, BrokenPipeError):
                return b"", []
            except OSError:
                if self.closed:  # closed here meanwhile
                    return b"", []
                raise
            try:
                await anyio.wait_readable(self.sock)
            except anyio.ClosedResourceError:
                return b"", []

    async def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one message with ``fds`` (the fds stay open here). OSError if the peer is
        gone (BrokenPipeError, ConnectionResetError)."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        async with self._send_lock:
            while True:
                try:
                    self.sock.sendmsg([data], ancillary)
                    return
                except BlockingIOError:
                    await anyio.wait_writable(self.sock)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(RuntimeError):  # no event loop: nobody waits on it
            anyio.notify_closing(self.sock)
        self.sock.close()
