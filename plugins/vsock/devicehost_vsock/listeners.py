"""The device's host-facing listeners, bound for as long as the device is served.

A host program may connect to ``base_path`` (and, with SEQPACKET, ``<base_path>_seqpacket``) at any
time, also before a guest's driver has started the device or after it stopped. The listeners are
therefore bound when the device is offered, not when it is opened, and stay until the host stops
(:meth:`HostListeners.serve` runs in the host's task group and closes them when cancelled).

One accept loop per listener runs all that time. While a guest driver has the device open
(:meth:`attach`, from ``open``, synchronously: no connection falls between the two), accepted
sockets go to the open device's connection table, but only while the device runs (:meth:`resume`
when ``run`` starts, :meth:`pause` when it stops): a stopped device (being saved for a handoff)
takes no connection, which waits in the listener's backlog instead. Otherwise each is refused as
when no guest listens: its CONNECT line (or message) is read, within the connect timeout (2 s),
and the socket is closed without ``OK``. Accepting waits out a shortage of descriptors as every
accept loop does (:mod:`devicehost.accepting`).

Live handoff (``docs/servicing.md``): the listeners travel with the device's saved state. The
process that handed them over must neither accept on them nor remove their socket files: when
``handed_over()`` is true (the host abandoned its devices to a successor) or :meth:`release` was
called, stopping closes this process's descriptors only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from typing import Final

import anyio

from devicehost.accepting import AcceptBackoff, accept_socket
from devicehost_vsock.hybrid import CONNECT_LINE_MAX, seqpacket_listener_path
from devicehost_vsock.protocol import CONNECTION_TIMEOUT
from devicehost_vsock.relay import bind_listener
from devicehost_vsock.saved import TEMP_PREFIX

__all__ = ["MAX_REFUSING", "HostListeners"]

#: Host connections being refused at once (each holds a descriptor for up to the connect
#: timeout); more are closed at once, unread.
MAX_REFUSING: Final = 64


class HostListeners:
    """The stream listener at ``base_path`` and, if enabled, the SEQPACKET one beside it."""

    def __init__(
        self,
        base_path: str,
        stream: socket.socket,
        seqpacket: socket.socket | None,
        temp_dir: str | None,
        logger: logging.Logger,
        connect_timeout: float = CONNECTION_TIMEOUT,
        handed_over: Callable[[], bool] = lambda: False,
    ) -> None:
        self.base_path = base_path
        self.stream = stream
        self.seqpacket = seqpacket
        self._temp_dir = temp_dir
        self._log = logger
        self._connect_timeout = connect_timeout
        #: Takes accepted sockets (and whether they are SEQPACKET ones) while a guest driver has
        #: the device open; None: refuse them.
        self._accept: Callable[[socket.socket, bool], None] | None = None
        self._refusing = 0
        self._closed = False
        #: True while attached to a device that is not running: nothing is accepted.
        self._paused = False
        #: Set (and dropped) when accepting may go on; made by a loop that waits.
        self._wakeup: anyio.Event | None = None
        #: The scopes of the accept calls in progress (cancelled by :meth:`pause`).
        self._accepting: set[anyio.CancelScope] = set()
        self._serve_scope: anyio.CancelScope | None = None
        self._released = False
        self._handed_over = handed_over
        #: True once :meth:`serve` was started.
        self.serving = False

    @classmethod
    def bind(
        cls, base_path: str, *, seqpacket: bool, logger: logging.Logger,
        connect_timeout: float = CONNECTION_TIMEOUT,
        handed_over: Callable[[], bool] = lambda: False,
    ) -> HostListeners:
        """Bind the listeners (``base_path`` "": a fresh temporary directory's ``vsock``);
        OSError (FileExistsError for a non-socket file in the way) if they cannot be bound."""
        temp_dir = None
        if not base_path:
            temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX)
            base_path = os.path.join(temp_dir, "vsock")
        seq_sock = None
        try:
            stream = bind_listener(base_path)
            if seqpacket:
                try:
                    seq_sock = bind_listener(
                        seqpacket_listener_path(base_path), socket.SOCK_SEQPACKET
                    )
                except BaseException:
                    stream.close()
                    with contextlib.suppress(OSError):
                        os.unlink(base_path)
                    raise
        except BaseException:
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return cls(base_path, stream, seq_sock, temp_dir, logger, connect_timeout, handed_over)

    @property
    def temp_dir(self) -> str | None:
        """The temporary directory holding ``base_path`` when none was configured."""
        return self._temp_dir

    def sockets(self) -> Iterator[tuple[socket.socket, bool]]:
        """Each listener and whether it is the SEQPACKET one."""
        yield self.stream, False
        if self.seqpacket is not None:
            yield self.seqpacket, True

    # ----------------------------------------------------------------- accepting

    def attach(self, accept: Callable[[socket.socket, bool], None]) -> None:
        """A guest driver opened the device: hand every connection accepted to ``accept``, once
        the device runs (:meth:`resume`)."""
        self._accept = accept
        self._paused = True

    def resume(self) -> None:
        """The attached device runs: accept and hand connections over."""
        self._paused = False
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def pause(self) -> None:
        """The attached device stopped: accept nothing (connections wait in the backlog)."""
        self._paused = True
        for scope in self._accepting:
            scope.cancel()

    def detach(self) -> None:
        """The device was closed: refuse host connections again."""
        self._accept = None
        self.resume()

    def release(self) -> None:
        """Another owner serves these listeners now (a live handoff): stop serving and, when
        stopped, close this owner's descriptors without removing the socket files."""
        self._released = True
        self.pause()
        if self._serve_scope is not None:
            self._serve_scope.cancel()

    async def serve(self) -> None:
        """Accept on every listener until cancelled (the host stopping), then close them."""
        self.serving = True
        try:
            with anyio.CancelScope() as self._serve_scope:
                if self._released:
                    return
                async with anyio.create_task_group() as tg:
                    for sock, seq in self.sockets():
                        tg.start_soon(self._accept_on, sock, seq, tg)
        finally:
            self.close()

    async def _accept_on(
        self, listener: socket.socket, seq: bool, tg: anyio.abc.TaskGroup
    ) -> None:
        backoff = AcceptBackoff(f"vsock listener {listener.getsockname()}", self._log)
        while True:
            if self._paused:
                if self._wakeup is None:
                    self._wakeup = anyio.Event()
                await self._wakeup.wait()
                continue
            with anyio.CancelScope() as scope:
                self._accepting.add(scope)
                try:
                    sock = await accept_socket(listener, backoff)
                finally:
                    self._accepting.discard(scope)
            if scope.cancelled_caught:
                continue  # paused while waiting: nothing was accepted
            accept = self._accept
            if accept is not None:
                accept(sock, seq)
            elif self._refusing >= MAX_REFUSING:
                sock.close()
            else:
                self._refusing += 1
                tg.start_soon(self._refuse, sock, seq)

    async def _refuse(self, sock: socket.socket, seq: bool) -> None:
        """Read the CONNECT line (message), then close without OK: as when no guest listens."""
        try:
            sock.setblocking(False)
            with anyio.move_on_after(self._connect_timeout):
                line = b""
                while not line.endswith(b"\n") and len(line) < CONNECT_LINE_MAX:
                    await anyio.wait_readable(sock)
                    try:
                        chunk = sock.recv(CONNECT_LINE_MAX - len(line))
                    except BlockingIOError:
                        continue
                    if seq or not chunk:
                        break
                    line += chunk
            self._log.info("vsock: host connection to %s refused: no guest driver has the device"
                           " open", self.base_path)  # fmt: skip
        except OSError:
            pass
        finally:
            self._refusing -= 1
            sock.close()

    def close(self) -> None:
        """Close the listeners and remove their socket files (and a temporary directory);
        after a handoff (``handed_over()`` or :meth:`release`) only close the descriptors."""
        if self._closed:
            return
        self._closed = True
        keep_files = self._released or self._handed_over()
        for sock, _ in self.sockets():
            sock.close()
        if keep_files:
            return
        for _, seq in self.sockets():
            path = seqpacket_listener_path(self.base_path) if seq else self.base_path
            with contextlib.suppress(OSError):
                os.unlink(path)
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
