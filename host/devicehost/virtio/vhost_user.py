"""The vhost-user backend: serve a virtio device to a VMM (QEMU) over a Unix socket.

:class:`BackendSession` (:mod:`devicehost.virtio.vhost_session`, re-exported here) is the
sans-I/O protocol state of one frontend connection: it takes decoded messages (with their file
descriptors), keeps features, the memory table (memfds mapped into a :class:`GuestMemory` at their
guest addresses, plus the VMM-virtual-address map that SET_VRING_ADDR is translated through) and
the vrings, and returns the reply bytes. :class:`VhostUserBackend` is the anyio loop: it
listens, reads messages, maps the session's state onto the device lifecycle, and accepts the
next connection when the VMM goes away.

Lifecycle mapping:
- The device opens (``open`` hook with :class:`QueueResources`) once the memory table is set and
  every vring has a size, addresses and a kick fd ("started"); it runs while every vring is
  enabled (rings start disabled when VHOST_USER_F_PROTOCOL_FEATURES was negotiated, enabled
  otherwise). SET_VRING_ENABLE 0 stops ``run``; 1 starts it again.
- GET_VRING_BASE, SET_MEM_TABLE, SET_FEATURES, RESET_OWNER, and any vring reconfiguration while
  open close the device first; vring positions survive in the session (``base``), so a reopen
  continues where the queues were.
- A protocol violation raises :class:`VhostUserError`: it is logged, the connection is dropped,
  the device is closed, and the backend accepts the next connection. So does a disconnect.
- While the host is saved (:meth:`devicehost.host.Host.save` quiesces its guest gate), a
  complete message waits at the gate before it is applied, so no device hook runs between the
  save and the resume; later messages wait in the socket, kicks in their eventfds. A front-end
  that disconnects meanwhile still has its device closed at once: the queues it served are gone.

What is enforced on the front-end (everything it sends is untrusted; a violation ends only its
own connection, with a :class:`VhostUserError` naming the message and the vring or region):

- File descriptors are checked by kind, from the kernel (:mod:`devicehost.fds`), before any use:
  SET_VRING_KICK/CALL/ERR fds must be eventfds (a ``/dev/zero`` "kick" would read forever, a
  regular file stall the loop, ``/dev/null`` read nothing); SET_MEM_TABLE fds must be memfds or
  regular files; at most 8 fds per message, and an fd no message uses is closed at once.
- Guest memory must not be able to shrink under the mapping (SIGBUS would kill every device):
  a region's file must be sealed with ``F_SEAL_SHRINK`` (QEMU's ``memory-backend-memfd`` seals by
  default), checked on every SET_MEM_TABLE (ADD_MEM_REG is not implemented: its protocol
  feature is not offered, so it is refused as unsupported). ``[host] allow_unsealed_memory =
  true`` accepts unsealed memory knowingly, with a warning per region: the front-end can then
  kill the process by truncating its file. A region must lie inside its file in every case; the
  seals are read before the size, so a file sealed when checked cannot have shrunk since.
- Deadlines (:data:`DEFAULT_DEADLINE`, ``[host] vhost_user_deadline``): the first message must
  arrive within the deadline of connecting (handshake), and every message, once its first byte
  arrived, must be complete (header and payload) within the deadline. A front-end that sends
  half a header and stays connected is dropped after that time, and the next front-end is
  served. Between complete messages a front-end may stay idle as long as it likes (a VMM with a
  paused guest does): one front-end at a time owns the device, as in vhost-user; who may
  connect is decided by the socket's file permissions.
- Session resources are released when the connection ends, not by the garbage collector: the
  device is closed, every fd received is closed, and the memory table's mappings are unmapped
  (or, where a device still holds a view, replaced by zero pages: see :mod:`devicehost.memory`).
- Fairness: the device's queues wait on :class:`EventfdDoorbell`, whose every wait yields to
  the event loop (:mod:`devicehost.virtio.doorbell`), so a front-end kicking without pause
  slows only its own device.

Decisions:
- A KICK without an fd (polling mode) is refused; CALL/ERR without an fd are accepted (those
  notifications are dropped).
- Messages this backend does not implement are violations: QEMU sends them only after
  negotiating protocol features that are not offered here.
- GET_VRING_BASE returns the next avail index the device would pop. Chains the device popped
  but had not pushed when it was closed are not reported (no INFLIGHT_SHMFD); a device that holds
  chains across awaits loses them on a VMM stop, as it would on any reset.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import stat
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc

from devicehost.accepting import AcceptBackoff, accept_stream
from devicehost.errors import ConfigError, DeviceHostError
from devicehost.gate import GateShutError
from devicehost.virtio.traits import DeviceTraits
from devicehost.virtio.transport import (
    QueueResources,
    device_config_read,
    device_config_write,
)
from devicehost.virtio.vhost_message import (
    HEADER,
    MAX_MEM_REGIONS,
    Header,
    Request,
    VhostUserError,
    decode_header_untrusted,
)
from devicehost.virtio.vhost_session import PROTOCOL_FEATURES, BackendSession

if TYPE_CHECKING:
    from devicehost.lifecycle import Device

__all__ = ["DEFAULT_DEADLINE", "PROTOCOL_FEATURES", "BackendSession", "VhostUserBackend",
           "VhostUserError"]

log = logging.getLogger("devicehost.virtio.vhost_user")

#: Seconds a front-end has for its first message after connecting, and for the rest of any
#: message once its first byte arrived (module docstring); ``[host] vhost_user_deadline``.
DEFAULT_DEADLINE: Final = 10.0
#: Requests that change what an open device runs on: the device is closed before they apply.
_CLOSE_FIRST: Final = frozenset({
    Request.GET_VRING_BASE, Request.SET_MEM_TABLE, Request.SET_FEATURES, Request.RESET_OWNER,
    Request.SET_VRING_NUM, Request.SET_VRING_ADDR, Request.SET_VRING_BASE, Request.SET_VRING_KICK,
})


_MAX_FDS: Final = MAX_MEM_REGIONS


class VhostUserBackend:
    """Serves ``device`` to one VMM at a time on the Unix socket ``path``.

    ``errors`` records each dropped connection's protocol error; ``connections`` counts accepted
    connections and ``finished`` those fully torn down (device closed, fds released);
    ``session`` is the live connection's state (None between connections).
    """

    def __init__(self, device: Device, traits: DeviceTraits, path: str) -> None:
        self.device = device
        self.traits = traits
        self.path = path
        self.errors: list[str] = []
        self.connections = 0
        self.finished = 0
        self._finished_event: anyio.Event | None = None
        self.session: BackendSession | None = None
        self._open = False
        self.resources: QueueResources | None = None  # while the device is open
        self.logger = getattr(device.ctx, "logger", log)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Listen and serve connections until cancelled; reports its cancel scope as started.

        Raises :class:`devicehost.ConfigError` (before starting) if the socket path cannot be
        listened on: a live server already answers there, or the path is not usable.
        """
        self._remove_stale_socket()
        try:
            listener = await anyio.create_unix_listener(self.path)
        except OSError as exc:
            raise ConfigError(f"cannot listen on vhost-user socket: {exc.strerror or exc}",
                              key="vhost_user_socket", value=self.path) from None
        try:
            with anyio.CancelScope() as scope:
                task_status.started(scope)
                async with listener:
                    backoff = AcceptBackoff(f"vhost-user socket {self.path}", self.logger)
                    while True:
                        stream = await accept_stream(listener, backoff)
                        self.connections += 1
                        await self._serve_connection(stream)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _remove_stale_socket(self) -> None:
        try:
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                return  # not a socket: binding fails with a precise error below
        except OSError:
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # nobody listens: a stale socket of an earlier run
            return
        finally:
            probe.close()
        raise ConfigError("the vhost-user socket is in use by another running server",
                          key="vhost_user_socket", value=self.path)

    def _setting(self, name: str, default: Any) -> Any:
        """A ``[host]`` setting of the host serving the device (``default`` without a host)."""
        settings = getattr(getattr(self.device.ctx, "host", None), "settings", None)
        return getattr(settings, name, default)

    def _passage(self, request: int) -> contextlib.AbstractAsyncContextManager[None]:
        """The host's guest gate for one front-end message: while the host is saved (quiesced)
        a complete message waits here, unapplied, so no device hook runs between a save and the
        resume; the front-end's later messages wait in the socket. No host: no gate."""
        gate = getattr(getattr(self.device.ctx, "host", None), "gate", None)
        if gate is None:
            return contextlib.nullcontext()
        try:
            name = Request(request).name
        except ValueError:
            name = f"request {request}"
        return gate.passage(f"vhost-user {name} for device {self.device.name!r}")  # type: ignore[no-any-return]

    async def _read_message(
        self, stream: anyio.abc.SocketStream, fds: list[int], *, limit: float, handshake: bool
    ) -> tuple[Header, bytes] | None:
        """The next message (header, payload), its fds added to ``fds``; None at a clean end of
        stream. The deadlines of the module docstring apply (``limit`` seconds)."""
        data = b""
        target = HEADER.size
        header: Header | None = None
        deadline = anyio.current_time() + limit if handshake else math.inf
        raw_socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        while True:
            if header is None and len(data) == HEADER.size:
                header = decode_header_untrusted(data)
                target += header.size
            if len(data) == target:
                assert header is not None
                return header, data[HEADER.size :]
            with anyio.CancelScope(deadline=deadline) as scope:
                # Wait here rather than inside receive_fds: anyio's own wait there does not
                # survive a cancellation that coincides with the socket turning readable.
                await anyio.wait_readable(raw_socket)
                try:
                    chunk, new_fds = await stream.receive_fds(target - len(data), _MAX_FDS)  # type: ignore[attr-defined]
                except anyio.EndOfStream:
                    chunk, new_fds = b"", []
                except RuntimeError as exc:  # unexpected ancillary data
                    raise VhostUserError(f"the VMM sent unexpected ancillary data: {exc}") from None
            if scope.cancelled_caught:
                if not data:
                    raise VhostUserError(
                        f"the VMM sent no message within {limit:g} s of connecting (handshake"
                        " deadline)"
                    )
                raise VhostUserError(
                    f"the VMM sent {len(data)} of {target} bytes of a message and no more within"
                    f" {limit:g} s (message deadline)"
                )
            fds.extend(new_fds)
            if len(fds) > _MAX_FDS:
                raise VhostUserError(
                    f"the VMM sent {len(fds)} file descriptors with one message (max {_MAX_FDS})"
                )
            if not chunk:
                if not data:
                    return None
                raise VhostUserError(
                    f"the VMM disconnected after {len(data)} of {target} bytes of a message"
                )
            if not data:  # the message began: the rest is due within the deadline
                deadline = min(deadline, anyio.current_time() + limit)
            data += chunk

    async def _serve_connection(self, stream: anyio.abc.SocketStream) -> None:
        session = self.session = BackendSession(
            self.traits, self._config_read, self._config_write,
            allow_unsealed=bool(self._setting("allow_unsealed_memory", False)),
            logger=self.logger,
        )
        limit = float(self._setting("vhost_user_deadline", DEFAULT_DEADLINE))
        fds: list[int] = []
        handshake = True
        try:
            async with stream:
                while True:
                    message = await self._read_message(stream, fds, limit=limit,
                                                       handshake=handshake)
                    handshake = False
                    if message is None:
                        self.logger.info("vhost-user frontend disconnected from %s", self.path)
                        break
                    header, payload = message
                    async with self._passage(header.request):
                        if header.request in _CLOSE_FIRST:
                            await self._close(session)
                        reply = session.handle(header, payload, fds)
                        await self._reconcile(session)
                    if reply is not None:
                        await stream.send(reply)
        except VhostUserError as exc:
            self.errors.append(str(exc))
            self.logger.error("vhost-user frontend on %s broke the protocol: %s", self.path, exc)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self.logger.info("vhost-user connection on %s lost: %s", self.path, exc)
        except GateShutError:
            self.logger.info("vhost-user connection on %s ends: the host is closing", self.path)
        except Exception as exc:  # a bug here must not take down the host: drop this VMM only
            self.errors.append(f"backend error: {exc!r}")
            self.logger.exception("vhost-user backend on %s failed; connection dropped", self.path)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with anyio.CancelScope(shield=True):
                await self._close(session)
            session.close()
            self.session = None
            self.finished += 1
            if self._finished_event is not None:
                self._finished_event.set()

    async def wait_finished(self, count: int) -> None:
        """Wait until ``count`` connections have been torn down."""
        while self.finished < count:
            self._finished_event = event = anyio.Event()
            await event.wait()

    def _config_read(self, offset: int, size: int) -> bytes:
        try:
            return device_config_read(self.device, self.traits, offset, size)
        except Exception:
            # The device is to blame, not the VMM: answer zeros and keep the connection.
            self.logger.exception("device %r failed to read its config space", self.device.name)
            return bytes(size)

    def _config_write(self, offset: int, data: bytes) -> None:
        try:
            device_config_write(self.device, offset, data)
        except Exception:
            self.logger.exception("device %r failed a config write", self.device.name)

    async def _close(self, session: BackendSession) -> None:
        if self._open:
            self._open = False
            self.resources = None
            await self.device.close()
            session.stop_queues()

    async def _reconcile(self, session: BackendSession) -> None:
        if not self._open and session.ready():
            resources = session.start_queues()
            try:
                await self.device.open(resources, start=False)
            except DeviceHostError as exc:
                session.stop_queues()
                self.logger.error("device %r did not open over vhost-user: %s",
                                  self.device.name, exc)
                return
            self._open = True
            self.resources = resources
        if self._open:
            if session.all_enabled():
                await self.device.start()
            else:
                await self.device.stop()
