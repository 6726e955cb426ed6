"""The VMBus socket: the host's VMBus server, served to one guest in another process.

A :class:`VmbusSocketServer` listens on a Unix ``SOCK_SEQPACKET`` socket and answers one guest
connection at a time through the host's :class:`~devicehost.vmbus.server.VmbusServer` — the same
server, offers and devices the in-process guest uses. Each socket message is one VMBus control
message (:mod:`devicehost.vmbus.messages`); guest memory arrives as memfds with a MEMORY_TABLE,
each channel's interrupts as an eventfd with OPEN_CHANNEL and a pipe with OPEN_CHANNEL_RESULT.
The full protocol, fd rules and limits are in ``docs/vmbus-socket.md``; in short:

- Contact: MEMORY_TABLE (once, with one memory fd per region), then INITIATE_CONTACT; a version
  of facts §2.2 is accepted (VERSION_RESPONSE), any other is refused and may be retried.
- REQUEST_OFFERS sends every visible offer and ALL_OFFERS_DELIVERED, then each new offer as it is
  made and RESCIND_CHANNEL_OFFER for each revoked one.
- GPADL_HEADER/GPADL_BODY are assembled and created over the guest's memory (GPADL_CREATED with
  the server's status); GPADL_TEARDOWN completes with GPADL_TORNDOWN once no ring maps it.
- OPEN_CHANNEL with the guest-to-host interrupt eventfd opens the channel; OPEN_CHANNEL_RESULT
  carries the read end of the host-to-guest interrupt pipe; CLOSE_CHANNEL closes it;
  MODIFY_CHANNEL is answered from Iron on; UNLOAD drops everything of the guest and answers
  UNLOAD_COMPLETE.

Containment: everything from the guest is untrusted. A refused *request* (a GPADL outside its
memory, an open the device fails) is answered with a failure status; a *protocol fault* (a
malformed message, a wrong or missing fd, memory that could shrink, a message out of order, more
than the limits allow) costs the guest its connection, never the host. When the connection ends
for any reason (fault, close, the guest process dying) the guest's channels are closed, its GPADLs
dropped and its memory unmapped; the next guest starts clean. The receive loop yields to the event
loop after every message; the accept loop survives fd exhaustion (EMFILE).

Live handover (:mod:`devicehost.vmbus.handover`): a connection
(:class:`~devicehost.vmbus.socketconnection.GuestConnection`) *parks* between two messages (the
message being handled is finished, the next stay unread in the socket; background sends queue
in its outbox) and *unparks* on a rollback; parked, the server accepts no new guest (it waits in
the listener's backlog). A new process rebuilds the connection from the handover and serves it
with the handed listener (:meth:`VmbusSocketServer.serve_handed_over`); it sends the outbox
first and follows the offers again without resending those the guest has. Once the socket is
handed over, the old server is *abandoned*: on its way out it closes its descriptors only (no
channel closed, no unlink).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from typing import Any, Final

import anyio
import anyio.abc

from devicehost.errors import ConfigError
from devicehost.vmbus.controlsocket import ControlSocket
from devicehost.vmbus.server import VmbusServer
from devicehost.vmbus.socketconnection import (
    MAX_GPADL_WORDS_PER_GUEST,
    MAX_GUEST_MEMORY,
    MAX_PENDING_GPADLS,
    GuestConnection,
    GuestFault,
)

__all__ = [
    "ACCEPT_BACKOFF",
    "MAX_GPADL_WORDS_PER_GUEST",
    "MAX_GUEST_MEMORY",
    "MAX_PENDING_GPADLS",
    "GuestFault",
    "VmbusSocketServer",
]

log = logging.getLogger("devicehost.vmbus.socket")

#: Seconds the accept loop waits before retrying after running out of fds.
ACCEPT_BACKOFF: Final = 0.1
_ACCEPT_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept errors that mean the listener itself is unusable (everything else is one connection's).
_ACCEPT_FATAL: Final = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EOPNOTSUPP})


class VmbusSocketServer:
    """Serves ``server`` to one guest at a time on the Unix SOCK_SEQPACKET socket ``path``."""

    def __init__(self, server: VmbusServer, path: str | os.PathLike[str], *,
                 allow_unsealed_memory: bool = False) -> None:
        #: Set once the socket was handed to another process (live servicing): on the way out
        #: this process closes its descriptors only (no channel closed, no unlink).
        self.abandoned = False
        self.listener: socket.socket | None = None
        self.server = server
        self.path = os.fspath(path)
        self.allow_unsealed_memory = allow_unsealed_memory
        self.connections = 0
        self.refused = 0
        self.last_disconnect: str | None = None
        self._guest: GuestConnection | None = None
        self._scope: anyio.CancelScope | None = None
        self._idle = anyio.Event()
        self._idle.set()
        #: Cleared while parked for a handover: new guests wait in the listener's backlog
        #: (which travels with the listener) instead of being accepted here.
        self._accepting = anyio.Event()
        self._accepting.set()

    @property
    def guest(self) -> dict[str, Any] | None:
        """The connected guest's inspect view (None when no guest is connected)."""
        return None if self._guest is None else self._guest.inspect()

    async def wait_idle(self) -> None:
        """Return once no guest is connected (its channels closed, its GPADLs dropped)."""
        await self._idle.wait()

    def _listen(self) -> socket.socket:
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            sock.listen(4)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on the VMBus socket {self.path!r}: {exc}") from None
        return sock

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Listen and serve until cancelled (or :meth:`aclose`). ConfigError before starting if
        the path cannot be listened on (a live server answers there, or it is not usable)."""
        await self.serve_handed_over(self._listen(), None, task_status=task_status)

    def connection(self, sock: socket.socket, name: str) -> GuestConnection:
        """A guest connection over ``sock`` (a handover fills in its state before serving)."""
        return GuestConnection(self, ControlSocket(sock), name)

    @property
    def connected(self) -> GuestConnection | None:
        """The connected guest's connection (None when no guest is connected)."""
        return self._guest

    def park_accepting(self) -> None:
        """Accept no guest until :meth:`unpark_accepting` (connections wait in the backlog)."""
        self._accepting = anyio.Event()

    def unpark_accepting(self) -> None:
        self._accepting.set()

    def abandon(self) -> None:
        """The socket and its guest belong to another process now (module docstring)."""
        self.abandoned = True

    async def serve_handed_over(
        self, listener: socket.socket, guest: GuestConnection | None, *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on ``listener`` (owned from now on), starting with the connected ``guest``
        (a connection handed over from another process), until cancelled."""
        listener.setblocking(False)
        self.listener = listener
        try:
            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as scope:
                    self._scope = scope
                    if guest is not None:
                        self._guest = guest
                        self._idle = anyio.Event()
                        tg.start_soon(self._serve_guest, guest)
                    task_status.started()
                    while True:
                        conn = await self._accept(listener)
                        if self._guest is not None:
                            # One guest at a time: a second connection is closed at once.
                            self.refused += 1
                            log.warning("VMBus socket %s: a guest is connected already; "
                                        "refusing another", self.path)
                            conn.close()
                            continue
                        self.connections += 1
                        guest = GuestConnection(self, ControlSocket(conn),
                                                 f"socket-guest-{self.connections}")
                        self._guest = guest
                        self._idle = anyio.Event()
                        tg.start_soon(self._serve_guest, guest)
                tg.cancel_scope.cancel()
        finally:
            listener.close()
            if not self.abandoned:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)

    async def _accept(self, listener: socket.socket) -> socket.socket:
        while True:
            await self._accepting.wait()
            await anyio.wait_readable(listener)
            if not self._accepting.is_set():
                continue  # parked meanwhile: the connection stays in the backlog
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_FATAL:
                    raise
                if exc.errno in _ACCEPT_EXHAUSTED:
                    # Out of fds or memory: the connection waits in the backlog; try again later
                    # instead of spinning on a listener that stays readable.
                    log.warning("VMBus socket %s: cannot accept (%s); retrying", self.path, exc)
                    await anyio.sleep(ACCEPT_BACKOFF)
                else:  # e.g. ECONNABORTED: that one connection is gone
                    log.info("VMBus socket %s: accept failed (%s)", self.path, exc)
                continue
            conn.set_inheritable(False)
            return conn

    async def _serve_guest(self, guest: GuestConnection) -> None:
        log.info("VMBus socket %s: guest %s connected", self.path, guest.name)
        try:
            reason = await guest.run()
        finally:
            self._guest = None
            self._idle.set()
        self.last_disconnect = reason
        gpadls, channels = self.leftovers(guest.name)
        if gpadls or channels:  # pragma: no cover - a defect: the cleanup missed something
            log.error("VMBus socket %s: guest %s disconnected (%s) but left %d GPADLs and %d "
                      "open channels", self.path, guest.name, reason, gpadls, channels)
        else:
            log.info("VMBus socket %s: guest %s disconnected (%s); it left no GPADL and no open "
                     "channel", self.path, guest.name, reason)

    def leftovers(self, guest_name: str) -> tuple[int, int]:
        """How many GPADLs and open channels of guest ``guest_name`` the server still has."""
        tree = self.server.inspect()
        gpadls = sum(1 for g in tree["gpadls"].values() if g.get("guest") == guest_name)
        channels = sum(1 for c in tree["channels"] if c.get("guest") == guest_name)
        return gpadls, channels

    async def aclose(self) -> None:
        """Stop listening and disconnect the guest (its channels closed, GPADLs dropped)."""
        if self._scope is not None:
            self._scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._idle.wait()

    def inspect(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "guest": self.guest,
            "connections": self.connections,
            "refused": self.refused,
            "last_disconnect": self.last_disconnect,
        }


def _remove_stale_socket(path: str) -> None:
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return  # not a socket: bind fails with a precise error
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a stale socket of an earlier run
        return
    finally:
        probe.close()
    raise ConfigError(f"the VMBus socket {path!r} is in use by another running host")
