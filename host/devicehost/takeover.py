"""Live servicing: a new ``devicehost run --takeover`` takes every device over from the running one.

The exchange, on the running host's control socket (:mod:`devicehost.control`; the new process is
checked with ``SO_PEERCRED`` like every peer there, and checks the old one back)::

    new -> old   request  {"version": 1, "command": "takeover", "args": {"handoff": 1}}
    old          quiesces (Host.save_for_handoff: guest requests wait, every device stopped at a
                 safe point and saved, with the descriptors it declared)
    old -> new   the handoff (devicehost.handoff: STATE frame + FDS frames), or an error reply
    new          restores every device with its descriptors (restore_open), starts nothing
    new -> old   confirm  {"version": 1, "confirm": true}
               | refuse   {"version": 1, "confirm": false, "error": "device 'x': ..."}
    old -> new   commit   the ok reply {"committed": true, "pid": OLD}  -- or an error reply
    new          starts every device, takes the control socket's listener from the handoff,
                 tells systemd MAINPID=NEW and READY=1
    old          exits 0 without closing any device (their descriptors are the new one's now)

The commit is the point of no return, and it is the old host's: it commits by sending the commit
reply. Before that, anything going wrong (a refusal, the new process dying or closing the
connection, :data:`CONFIRM_TIMEOUT` passing, the commit failing to send) rolls back: the old host
resumes its devices from its own live state and serves on; devices it had closed because they
could not be handed over (``save_open`` returned None) are offered again. The new process starts
no device before it has read the commit, and exits non-zero naming the device and the reason if
it refuses or gets no commit; so at no time do both processes run a device.

What a SIGKILL leaves (``docs/servicing.md`` has the table): the old killed before it sent the
handoff -- the new gets no handoff and exits non-zero; the devices are gone as on any crash. The
old killed after sending -- the new holds the descriptors and the state; it confirms, gets no
commit and exits non-zero (a device may have run in neither since the quiesce: nothing is
corrupted, the guest sees a crash). The new killed before its confirm -- the old rolls back and
serves on. The old killed after committing -- the new serves. The new killed after the commit
-- the devices are gone as on a crash of the new process.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import anyio

from devicehost.errors import SavedStateError
from devicehost.excerpt import excerpt
from devicehost.handoff import (
    HANDOFF_MAGIC,
    HANDOFF_VERSION,
    HEADER_SIZE,
    Handoff,
    HandoffError,
    HandoffFd,
    receive_handoff,
    send_handoff,
)
from devicehost.restoreplan import plan_untrusted
from devicehost.transport import LocalTransport

#: The handoff entry of the VMBus socket's descriptors (devicehost.vmbus.handover).
VMBUS_FDS: Final = "@vmbus"

if TYPE_CHECKING:
    from devicehost.host import Host
    from devicehost.notify import Notifier

__all__ = [
    "CONFIRM_TIMEOUT",
    "CONTROL_ENTRY",
    "HANDOFF_TIMEOUT",
    "Servicing",
    "TakeoverClient",
    "serve_takeover",
    "take_over",
]

log = logging.getLogger("devicehost.takeover")

#: Seconds the old host waits for the new one's confirm after sending the handoff.
CONFIRM_TIMEOUT: Final = 60.0
#: Seconds the new process waits for the handoff, and for the commit after its confirm.
HANDOFF_TIMEOUT: Final = 60.0
#: The handoff "device" under which the control socket's listener travels.
CONTROL_ENTRY: Final = "@control"
_MAX_FRAME: Final = 64 * 1024
_LENGTH: Final = struct.Struct(">I")
_UCRED: Final = struct.Struct("3i")


class Servicing:
    """A running host's live-servicing state (``host.servicing``, set by ``devicehost run``).

    ``listener``: the control socket's listening socket, handed to the new process with the
    devices. ``lock`` is held through a handoff: the host's stop waits for it.
    """

    def __init__(self, listener: socket.socket | None, notifier: Notifier | None = None) -> None:
        self.listener = listener
        self.notifier = notifier
        self.lock = anyio.Lock()
        self.handed_over = anyio.Event()
        self.successor: int | None = None
        self.stopping = False


def _peer(conn: socket.socket) -> tuple[int, int]:
    pid, uid, _gid = _UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(pid), int(uid)


def _frame(value: Mapping[str, Any]) -> bytes:
    payload = json.dumps(value, separators=(",", ":")).encode()
    return _LENGTH.pack(len(payload)) + payload


async def _send(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, InterruptedError):
            await anyio.wait_writable(sock)


async def _recv_exactly(sock: socket.socket, count: int, who: str) -> bytes:
    data = bytearray()
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except (BlockingIOError, InterruptedError):
            await anyio.wait_readable(sock)
            continue
        if not chunk:
            raise HandoffError(f"{who} closed the connection")
        data += chunk
    return bytes(data)


async def _read_object(sock: socket.socket, who: str, first: bytes = b"") -> dict[str, Any]:
    """One length-prefixed JSON object of at most :data:`_MAX_FRAME` bytes; HandoffError blaming
    ``who``."""
    head = first + await _recv_exactly(sock, _LENGTH.size - len(first), who)
    (length,) = _LENGTH.unpack(head)
    if length > _MAX_FRAME:
        raise HandoffError(f"{who} announced a message of {length} bytes (at most {_MAX_FRAME})")
    payload = await _recv_exactly(sock, length, who)
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HandoffError(f"{who} sent invalid JSON") from exc
    if not isinstance(value, dict) or value.get("version") != 1:
        raise HandoffError(f"{who} sent a message that is not a version-1 object")
    return value


# -- the running (old) host -----------------------------------------------------------------------


async def serve_takeover(host: Host, args: Mapping[str, Any], conn: socket.socket) -> None:
    """The control command ``takeover`` (module docstring), on the old host's side. Returns once
    committed (``host.servicing.handed_over`` is set); raises after a rollback (the host serves
    on) or when the takeover is refused before anything was stopped."""
    servicing: Servicing | None = host.servicing
    if servicing is None:
        raise HandoffError("this host cannot be taken over (it was not started by devicehost"
                           " run)")
    if args.get("handoff") != HANDOFF_VERSION or set(args) != {"handoff"}:
        raise HandoffError(f"the new process asks for handoff version {args.get('handoff')!r};"
                           f" this host speaks version {HANDOFF_VERSION}")
    pid, _uid = _peer(conn)  # the control server admitted only this uid or root
    # With the VMBus socket, VMBus devices and their socket guest are handed over live.
    live_vmbus = None if host.settings.vmbus_socket is None else host._vmbus_transport()
    for name in host.devices:
        transport = host._device_transport.get(name)
        if transport is not None and not isinstance(transport, LocalTransport) and (
                transport is not live_vmbus) and not (
                getattr(transport, "hands_over", lambda _d: False)(host.devices[name])):
            raise HandoffError(f"device {name!r} is served by {type(transport).__name__}, which"
                               " cannot be taken over live (restart with --state instead)")
    if live_vmbus is not None:
        from devicehost.vmbus.handover import takeover_refusal

        refusal = takeover_refusal(host)
        if refusal is not None:
            raise HandoffError(refusal)
    if servicing.lock.locked():
        raise HandoffError("another takeover is in progress")
    async with servicing.lock:
        if servicing.stopping or servicing.handed_over.is_set():
            raise HandoffError("this host is stopping")
        log.info("takeover by pid %d: quiescing", pid)
        handoff: Handoff | None = None
        closed: list[tuple[str, str, Any]] = []
        try:
            handoff = await host.save_for_handoff()
            extra = () if servicing.listener is None else (
                HandoffFd(CONTROL_ENTRY, 0, "socket", servicing.listener.fileno()),)
            # Devices that cannot be handed over are closed here; the new host opens them fresh.
            not_saved = _not_saved(handoff.envelope)
            closed = [(name, d.ctx.plugin, d.ctx.config) for name, d in host.devices.items()
                      if name in not_saved]
            for name, _plugin, _config in closed:
                await host.remove_device(name)
            await send_handoff(conn, Handoff(handoff.envelope, handoff.fds + extra))
            with anyio.fail_after(CONFIRM_TIMEOUT):
                answer = await _read_object(conn, f"the new process (pid {pid})")
            if answer.get("confirm") is not True:
                raise HandoffError(f"the new process (pid {pid}) refused:"
                                   f" {str(answer.get('error'))[:1000]}")
            await _send(conn, _frame({"version": 1, "ok": True,
                                      "result": {"committed": True, "pid": os.getpid()}}))
        except BaseException as exc:
            # Nothing was committed: the host serves on from its own live state.
            with anyio.CancelScope(shield=True):
                await _roll_back(host, closed)
            why = "it timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            log.error("takeover by pid %d rolled back, serving on: %s", pid, why)
            if isinstance(exc, Exception):
                raise HandoffError(f"rolled back: {why}") from exc
            raise
        finally:
            if handoff is not None:
                handoff.close()
        host.abandon_devices = True
        servicing.successor = pid
        servicing.handed_over.set()
        if servicing.notifier is not None:
            servicing.notifier.send(f"MAINPID={pid}")
        log.info("handed over to pid %d", pid)


def _not_saved(envelope: bytes) -> set[str]:
    from devicehost.savedstate import decode_envelope_untrusted

    # A VMBus device whose channel is closed stays offered: the new host offers it again under
    # the same channel id, so a VMBus socket guest sees no rescind.
    return {e.device for e in decode_envelope_untrusted(envelope)
            if e.type_name == "host.NotSaved" and e.payload.get("reason") != "channel closed"}


async def _roll_back(host: Host, closed: list[tuple[str, str, Any]]) -> None:
    await host.resume()
    for name, plugin, config in closed:
        host.failures.pop(name, None)
        await host.add_device(name, plugin, config)


# -- the new process ------------------------------------------------------------------------------


class TakeoverClient:
    """The new process's side (module docstring); :func:`devicehost.host.open_host` drives it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.predecessor: int | None = None
        #: The control socket's listener, taken from the handoff once committed.
        self.listener: socket.socket | None = None
        self._sock: socket.socket | None = None
        self._listener_fd: int | None = None

    async def request(self) -> Handoff:
        """Connect and ask for the handoff; HandoffError if no host answers or it refuses."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock = sock
        try:
            sock.connect(self.path)
        except OSError as exc:
            raise HandoffError(f"{self.path}: no host to take over answers:"
                               f" {exc.strerror or exc}") from exc
        sock.setblocking(False)
        # SO_PEERCRED of a listener's connection gives the credentials of whoever called
        # listen(): after a takeover, the first host's pid, but always the right uid.
        _pid, uid = _peer(sock)
        if uid not in (os.geteuid(), 0):
            raise HandoffError(f"{self.path}: the process there runs as uid {uid}, not as this"
                               " user or root; not taking over from it")
        who = "the running host"
        try:
            await _send(sock, _frame({"version": 1, "command": "takeover",
                                      "args": {"handoff": HANDOFF_VERSION}}))
            with anyio.fail_after(HANDOFF_TIMEOUT):
                first = await _recv_exactly(sock, len(HANDOFF_MAGIC), who)
                if first != HANDOFF_MAGIC:
                    reply = await _read_object(sock, who, first)
                    raise HandoffError(f"{who} refused: {str(reply.get('error'))[:1000]}")
                rest = await _recv_exactly(sock, HEADER_SIZE - len(first), who)
                handoff = await receive_handoff(sock, header=first + rest)
        except TimeoutError as exc:
            raise HandoffError(f"{who} sent no handoff within {HANDOFF_TIMEOUT} s") from exc
        except OSError as exc:
            raise HandoffError(f"{who}: the connection failed: {exc}") from exc
        for item in handoff.fds:
            if item.device == "@control" and item.handle == 0:
                self._listener_fd = item.fd
            elif item.device.startswith("@") and item.device != VMBUS_FDS:
                handoff.close()
                raise HandoffError(f"{who} sent descriptors for {item.device[:64]!r}")
        log.info("took the handoff (%d descriptors)", len(handoff.fds))
        return handoff

    async def confirm(self) -> None:
        """Every device is restored: confirm and wait for the commit; HandoffError without one
        (then this process must start nothing)."""
        assert self._sock is not None
        who = "the running host"
        try:
            await _send(self._sock, _frame({"version": 1, "confirm": True}))
            with anyio.fail_after(HANDOFF_TIMEOUT):
                reply = await _read_object(self._sock, who)
        except TimeoutError as exc:
            raise HandoffError(f"{who} did not commit within {HANDOFF_TIMEOUT} s") from exc
        except OSError as exc:
            raise HandoffError(f"{who} did not commit: {exc}") from exc
        result = reply.get("result")
        if reply.get("ok") is not True or not isinstance(result, dict) or result.get(
                "committed") is not True:
            raise HandoffError(f"{who} did not commit: {str(reply.get('error'))[:1000]}")
        pid = result.get("pid")
        self.predecessor = pid if type(pid) is int else None
        if self._listener_fd is not None:
            self.listener = socket.socket(fileno=self._listener_fd)
            self._listener_fd = None
        self._sock.close()
        self._sock = None

    async def refuse(self, reason: str) -> None:
        """Tell the running host to roll back (best effort: it also rolls back when this
        connection closes)."""
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            await _send(self._sock, _frame({"version": 1, "confirm": False,
                                            "error": reason[:4000]}))
        self.close()

    def close(self) -> None:
        """Close the connection and an untaken listener."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._listener_fd is not None:
            os.close(self._listener_fd)
            self._listener_fd = None


async def take_over(host: Host, takeover: TakeoverClient, devices: Iterable[Any]) -> None:
    """The new process's takeover, driven by :func:`devicehost.host.open_host`: build every device
    of ``devices`` (imports, constructors) before asking, then ask for the handoff and restore it
    into ``host``; any failure refuses (the running host rolls back) and is raised."""
    configured = list(devices)
    for spec in configured:  # imports and constructors run before the running host quiesces
        host._build(spec.name, spec.plugin, spec.config)
    _import_restore_paths()
    if host.settings.vmbus_socket is not None:
        import devicehost.vmbus.handover  # noqa: F401  (not inside the handoff window)
    handoff = await takeover.request()
    handed = handoff.by_device()
    try:
        try:
            plan = plan_untrusted(handoff.envelope, {d.name: d.plugin for d in configured})
        except SavedStateError as exc:
            raise HandoffError(f"the handed-over state: {exc}") from exc
        for name in handed:
            if name not in plan.states and not name.startswith("@"):
                raise HandoffError(f"the running host sent descriptors for {excerpt(name)},"
                                   " which its state does not hold")
        await host._restore(plan, configured, handed=handed, before_start=takeover.confirm)
    except BaseException as exc:
        for name, fds in handed.items():  # those no device's stash took ownership of
            if not name.startswith("@"):
                for fd, _kind in fds.values():
                    os.close(fd)
        with anyio.CancelScope(shield=True):
            await takeover.refuse(str(exc) if isinstance(exc, Exception) else repr(exc))
        raise


#: Modules a takeover's restore imports lazily, per package: imported before the handoff is asked
#: for, so that their import time (10-20 ms for vhost-user) is not part of the guests' pause.
_RESTORE_PATHS: Final = {
    "devicehost.virtio": ("devicehost.virtio.vhost_user", "devicehost.virtio.vhost_session",
                          "devicehost.virtio.vhost_handover"),
}


def _import_restore_paths() -> None:
    """Import the restore-path modules of every transport package the built devices use."""
    for package, modules in _RESTORE_PATHS.items():
        if package in sys.modules:
            for module in modules:
                importlib.import_module(module)
