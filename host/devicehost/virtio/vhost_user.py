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

Live handover (``devicehost run --takeover``, :mod:`devicehost.virtio.vhost_handover` says what
travels): :meth:`VhostUserBackend.save_for_handoff` parks the connection loop at a safe point
(:meth:`~VhostUserBackend.park`: between messages, interrupting only a wait for an accept or for
the first byte of the next message, or holding one complete message at the guest gate; never
half a message), saves the device (stopped by the host) and describes the session, its
descriptors duplicated into ``ctx.fds``. From then until the host resumes, the loop reads
nothing; if the host closes instead (the handover committed), the loop lets go of its copies and
neither closes the device nor unlinks the socket path (the new process owns both). A new
process's backend is built without binding (the transport sees ``ctx.fds.carries_fds``),
:meth:`~VhostUserBackend.restore_handover` rebuilds the session and restores the device, and
after the commit :meth:`~VhostUserBackend.start_adopted` and :meth:`~VhostUserBackend.serve`
resume it on the same listener and connection, the held message first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import attrs

from devicehost.accepting import AcceptBackoff, accept_stream
from devicehost.errors import ConfigError, DeviceHostError
from devicehost.fds import fd_kind
from devicehost.gate import GateShutError
from devicehost.handoff import HandoffError
from devicehost.memory import GuestMemory, SharedRegion
from devicehost.savedstate import entry_for
from devicehost.virtio.queue import QueueState
from devicehost.virtio.traits import DeviceTraits
from devicehost.virtio.transport import (
    QueueResources,
    device_config_read,
    device_config_write,
)
from devicehost.virtio.vhost_handover import (
    HandedQueue,
    HandedRegion,
    HandedVring,
    PendingMessage,
    VhostUserHandover,
    check_handover_untrusted,
)
from devicehost.virtio.vhost_message import (
    HEADER,
    MAX_MEM_REGIONS,
    Header,
    Request,
    VhostUserError,
    decode_header_untrusted,
)
from devicehost.virtio.vhost_session import PROTOCOL_FEATURES, BackendSession, Vring

if TYPE_CHECKING:
    from devicehost.lifecycle import Device

__all__ = ["DEFAULT_DEADLINE", "PROTOCOL_FEATURES", "Adopted", "BackendSession",
           "VhostUserBackend", "VhostUserError"]

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
        # -- parking for a handoff (module docstring of devicehost.virtio.vhost_handover) --
        #: A save for a handoff asked the loop to park at its next safe point.
        self._park_requested = False
        self._parked: anyio.Event | None = None
        #: The wait a park may interrupt: an accept, or the first byte of the next message.
        self._idle_scope: anyio.CancelScope | None = None
        #: The complete message the loop holds at the guest gate, unapplied (with its fds).
        self._at_gate: tuple[Header, bytes, list[int]] | None = None
        self._stream: anyio.abc.SocketStream | None = None
        self._listener: anyio.abc.SocketListener | None = None
        self._handshake = False
        #: Saved for a handoff and not resumed since: if the host now closes, the session and
        #: the socket path are the new process's and are left alone.
        self._handed = False
        #: A session taken over from another process, resumed by :meth:`serve`.
        self._adopted: Adopted | None = None

    async def serve(self, *, task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Listen and serve connections until cancelled; reports its cancel scope as started.

        Raises :class:`devicehost.ConfigError` (before starting) if the socket path cannot be
        listened on: a live server already answers there, or the path is not usable.
        """
        adopted, self._adopted = self._adopted, None
        if adopted is not None:
            # Taken over: the listener and the connection came from the old process; nothing
            # is bound (the path is already ours).
            listener = await anyio.abc.SocketListener.from_socket(adopted.listener)
        else:
            self._remove_stale_socket()
            try:
                listener = await anyio.create_unix_listener(self.path)
            except OSError as exc:
                raise ConfigError(f"cannot listen on vhost-user socket: {exc.strerror or exc}",
                                  key="vhost_user_socket", value=self.path) from None
        self._listener = listener
        try:
            with anyio.CancelScope() as scope:
                task_status.started(scope)
                async with listener:
                    backoff = AcceptBackoff(f"vhost-user socket {self.path}", self.logger)
                    if adopted is not None and adopted.connection is not None:
                        resumed = await anyio.abc.UNIXSocketStream.from_socket(
                            adopted.connection)
                        self.connections += 1
                        await self._serve_connection(resumed, adopted)
                    while True:
                        stream = await self._accept(listener, backoff)
                        if stream is not None:
                            self.connections += 1
                            await self._serve_connection(stream)
        finally:
            self._listener = None
            if not self._handed:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)

    async def _accept(self, listener: anyio.abc.SocketListener, backoff: AcceptBackoff
                      ) -> anyio.abc.SocketStream | None:
        """The next connection, or None after the loop parked for a save and was resumed."""
        if self._park_requested or self._handed:
            await self._park_idle()
            return None
        with anyio.CancelScope() as idle:
            self._idle_scope = idle
            try:
                # Cancelling a wait for a connection loses none: it stays in the backlog.
                return await accept_stream(listener, backoff)
            finally:
                self._idle_scope = None
        return None

    async def _park_idle(self) -> None:
        """Park between messages (or connections) until the host resumes; if it closes instead
        (after a handoff), stay here until cancelled, touching nothing."""
        self._mark_parked()
        try:
            async with self._passage(None):
                self._unpark()
        except GateShutError:
            await anyio.sleep_forever()

    def _parking(self) -> bool:
        """True once a save asked the loop to park (a method: it changes while the loop waits)."""
        return self._park_requested

    def _mark_parked(self) -> None:
        if self._parked is not None:
            self._parked.set()

    def _unpark(self) -> None:
        # The gate let the loop through: the host resumed (a rollback, or a save that was not a
        # handoff): the session is ours again.
        self._park_requested = False
        self._handed = False
        self._parked = None

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

    def _passage(self, request: int | None) -> contextlib.AbstractAsyncContextManager[None]:
        """The host's guest gate for one front-end message: while the host is saved (quiesced)
        a complete message waits here, unapplied, so no device hook runs between a save and the
        resume; the front-end's later messages wait in the socket. No host: no gate."""
        gate = getattr(getattr(self.device.ctx, "host", None), "gate", None)
        if gate is None:
            return contextlib.nullcontext()
        if request is None:
            name = "connection (parked between messages)"
        else:
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
            if not data:
                # Between messages: the one wait a park interrupts (nothing of the next
                # message has been read yet).
                if self._park_requested or self._handed:
                    await self._park_idle()
                    continue
                with anyio.CancelScope(deadline=deadline) as idle:
                    self._idle_scope = idle
                    try:
                        await anyio.wait_readable(raw_socket)
                    finally:
                        self._idle_scope = None
                if idle.cancelled_caught and self._parking():
                    continue
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

    def new_session(self) -> BackendSession:
        """A fresh protocol state for a connection to this backend."""
        return BackendSession(
            self.traits, self._config_read, self._config_write,
            allow_unsealed=bool(self._setting("allow_unsealed_memory", False)),
            logger=self.logger,
        )

    async def _serve_connection(self, stream: anyio.abc.SocketStream,
                                adopted: Adopted | None = None) -> None:
        session = self.new_session() if adopted is None else adopted.session
        assert session is not None
        self.session = session
        limit = float(self._setting("vhost_user_deadline", DEFAULT_DEADLINE))
        fds: list[int] = []
        self._handshake = handshake = True if adopted is None else adopted.handshake
        pending = None if adopted is None else adopted.pending
        self._stream = stream
        try:
            async with stream:
                while True:
                    if pending is not None:
                        # The message the old process held at its gate: applied first, once.
                        header, payload, fds[:] = pending
                        pending = None
                    else:
                        message = await self._read_message(stream, fds, limit=limit,
                                                           handshake=handshake)
                        self._handshake = handshake = False
                        if message is None:
                            self.logger.info("vhost-user frontend disconnected from %s",
                                             self.path)
                            break
                        header, payload = message
                    self._at_gate = (header, payload, fds)
                    if self._park_requested:
                        self._mark_parked()
                    async with self._passage(header.request):
                        self._at_gate = None
                        self._unpark()
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
            if self._handed:
                # Handed over: the connection, the session and the device are the new
                # process's; this one only lets go of its copies (no device hook runs).
                self.logger.info("vhost-user connection on %s handed over", self.path)
                self._at_gate = None
                self._stream = None
                await anyio.sleep_forever()
            self.logger.info("vhost-user connection on %s ends: the host is closing", self.path)
        except Exception as exc:  # a bug here must not take down the host: drop this VMM only
            self.errors.append(f"backend error: {exc!r}")
            self.logger.exception("vhost-user backend on %s failed; connection dropped", self.path)
        finally:
            self._at_gate = None
            self._stream = None
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if not self._handed:
                with anyio.CancelScope(shield=True):
                    await self._close(session)
            session.close()
            self.session = None
            self.finished += 1
            if self._finished_event is not None:
                self._finished_event.set()

    # -- handover (devicehost.virtio.vhost_handover) ----------------------------------------------

    async def park(self) -> None:
        """Park the connection loop at its next safe point (the host's gate is quiesced):
        between messages, or holding one complete message at the gate. :class:`HandoffError`
        if it does not get there in twice the message deadline (a front-end that does not read
        its replies): the takeover then rolls back."""
        self._park_requested = True
        self._parked = parked = anyio.Event()
        if self._at_gate is not None:
            parked.set()
        elif self._idle_scope is not None:
            self._idle_scope.cancel()
        limit = float(self._setting("vhost_user_deadline", DEFAULT_DEADLINE))
        with anyio.move_on_after(2 * limit + 5):
            await parked.wait()
        if not parked.is_set():
            raise HandoffError(f"the vhost-user connection of device {self.device.name!r} did"
                               " not reach a safe point (the VMM neither completes its message"
                               " nor reads its replies)")

    async def save_for_handoff(self) -> VhostUserHandover | None:
        """Park, save the device (stopped by the host) and describe the session, its
        descriptors put in the device's ``ctx.fds``; None if the device is open but its
        ``save_open`` saves nothing (it cannot be handed over)."""
        await self.park()
        device_type, device_version, device_payload = "", 0, b""
        if self._open:
            value = await self.device.save()
            if value is None:
                return None
            entry = entry_for(self.device.name, self.device.ctx.plugin, value)
            device_type, device_version = entry.type_name, entry.type_version
            device_payload = json.dumps(entry.payload, separators=(",", ":")).encode()
        put = self.device.ctx.fds.put
        assert self._listener is not None
        listener = put(self._listener.extra(anyio.abc.SocketAttribute.raw_socket))
        session, stream = self.session, self._stream
        if session is None or stream is None:
            state = VhostUserHandover(
                listener, None, False, 0, 0, False, (),
                tuple(_handed_vring(Vring(), put) for _ in range(self.traits.queue_count)),
                False, False, "", 0, b"", None)
        else:
            connection = put(stream.extra(anyio.abc.SocketAttribute.raw_socket))
            regions: tuple[HandedRegion, ...] = ()
            if session.memory is not None:
                users = {gpa: user for user, _size, gpa in session.user_map}
                shared, fds = session.memory.share()
                regions = tuple(HandedRegion(r.gpa, r.size, users[r.gpa], r.offset, put(fd),
                                             fd_kind(fd)) for r, fd in zip(shared, fds,
                                                                           strict=True))
            pending = None
            if self._at_gate is not None:
                header, payload, fds_in = self._at_gate
                carried = tuple((put(fd), kind) for fd in fds_in
                                if (kind := fd_kind(fd)) in ("eventfd", "memfd", "regular"))
                pending = PendingMessage(header.request, header.flags, payload, carried)
            state = VhostUserHandover(
                listener, connection, self._handshake, session.features,
                session.protocol_features, session.owner, regions,
                tuple(_handed_vring(v, put) for v in session.vrings),
                self._open, self._open and session.all_enabled(),
                device_type, device_version, device_payload, pending)
        self._handed = True
        return state

    async def restore_handover(self, state: VhostUserHandover, device_state: Any) -> None:
        """Rebuild a session handed over by another process (checked first: the state is
        untrusted) from the descriptors in ``ctx.fds``; the device is restored
        (``restore_open``) but nothing runs and nothing is read until :meth:`start_adopted`
        and :meth:`serve`. Raises VhostHandoverError, SharedMemoryError, HandoffError, or the
        device's restore error."""
        check_handover_untrusted(state, self.traits, PROTOCOL_FEATURES)
        fds = self.device.ctx.fds
        what = f"device {self.device.name!r}: handed-over"
        listener = fds.take_socket(state.listener)
        connection: socket.socket | None = None
        session: BackendSession | None = None
        pending_fds: list[int] = []
        try:
            if state.connection is None:
                self._adopted = Adopted(listener, None, None, False, None, running=False)
                return
            connection = fds.take_socket(state.connection)
            session = self.new_session()
            session.features = state.features
            session.protocol_features = state.protocol_features
            session.owner = state.owner
            if state.regions:
                memory = GuestMemory.from_shared(
                    [SharedRegion(r.gpa, r.size, r.mmap_offset) for r in state.regions],
                    [fds.take(r.fd, r.kind) for r in state.regions],
                    allow_unsealed=session.allow_unsealed, what=f"{what} guest memory")
                session.adopt_memory(memory, [(r.user_addr, r.size, r.gpa)
                                              for r in state.regions])
            for v, hv in zip(session.vrings, state.vrings, strict=True):
                v.num, v.desc, v.avail, v.used = hv.num, hv.desc, hv.avail, hv.used
                v.base, v.enabled, v.started = hv.base, hv.enabled, hv.started
                for bell, handle in ((v.kick, hv.kick), (v.call, hv.call), (v.err, hv.err)):
                    if handle is not None:
                        bell.set_fd(fds.take(handle, "eventfd"))
            pending = None
            if state.pending is not None:
                p = state.pending
                pending_fds.extend(fds.take(handle, kind) for handle, kind in p.fds)
                pending = (Header(p.request, p.flags, len(p.payload)), p.payload, pending_fds)
            if state.device_open:
                restored = [QueueState(hv.queue.last_avail_idx, hv.queue.used_idx,
                                       hv.queue.inflight)
                            for hv in state.vrings if hv.queue is not None]
                try:
                    resources = session.start_queues(restored)
                except VhostUserError as exc:
                    raise HandoffError(f"{what} vrings: {exc}") from None
                await self.device.restore(device_state, resources)
                self._open = True
                self.resources = resources
            self._adopted = Adopted(listener, connection, session, state.handshake, pending,
                                    running=state.device_running)
        except BaseException:
            listener.close()
            if connection is not None:
                connection.close()
            if session is not None:
                session.close()
            for fd in pending_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._open = False
            self.resources = None
            raise

    async def start_adopted(self) -> None:
        """After the commit: run the restored device if it ran, and make every queue look at
        its ring once (kicks that arrived during the handoff are in the eventfd counters, but
        one the old process consumed without popping would otherwise be missed; a spurious
        look costs nothing, a missed one stalls). :meth:`serve` then resumes the loop."""
        adopted = self._adopted
        if adopted is None or adopted.session is None:
            return
        for v in adopted.session.vrings:
            if v.kick.fd is not None:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_write(v.kick.fd, 1)
        if self._open and adopted.running:
            await self.device.start()
        if self.resources is not None:
            for q in self.resources.queues:
                q.notify()  # used entries may have been published without an interrupt

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


@attrs.define
class Adopted:
    """A session taken over from another process, waiting for :meth:`VhostUserBackend.serve`:
    the listener, the VMM connection (None: no VMM was connected), the session, whether its
    first message is still due, the message held at the old process's gate, and whether the
    device ran."""

    listener: socket.socket
    connection: socket.socket | None
    session: BackendSession | None
    handshake: bool
    pending: tuple[Header, bytes, list[int]] | None
    running: bool


def _handed_vring(v: Vring, put: Callable[[int], int]) -> HandedVring:
    def handle(fd: int | None) -> int | None:
        return None if fd is None else put(fd)

    queue = None
    if v.queue is not None:
        st = v.queue.state()
        queue = HandedQueue(st.last_avail_idx, st.used_idx, st.inflight)
    return HandedVring(v.num, v.desc, v.avail, v.used, v.base, v.enabled, v.started,
                       handle(v.kick.fd), handle(v.call.fd), handle(v.err.fd), queue)
