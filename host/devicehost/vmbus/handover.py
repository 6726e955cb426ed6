"""The VMBus socket guest, handed to a new process live (``docs/servicing.md``).

A host serving ``[host] vmbus_socket`` is taken over (:mod:`devicehost.takeover`) with its guest
connected: the guest keeps its socket, its memory, its GPADLs and its open channels, and sees no
close and no rescind. What travels, besides each VMBus device's ``save_open`` state:

- descriptors, under the handoff entry :data:`VMBUS_FDS` (``@vmbus``): the socket's listener
  (handle 0, so later guests connect to the same path), the guest's connection (handle 1), the
  guest's memory fds (one per region) and, per open channel, the guest-to-host eventfd and the
  write end of the host-to-guest pipe;
- the envelope entry :data:`SOCKET_ENTRY` (``@vmbus-socket``, :class:`SocketHandoverState`): the
  connection's protocol state (version, offers sent, rescinds unanswered, GPADLs half-sent,
  messages queued while parked), the guest's GPADLs (with the memory they name) and its opens
  (ring GPADL, ring split, open data, which descriptors are its signals). The server's
  ``@vmbus`` entry (channel ids) travels as on every save.

**The safe point** (old process, :func:`park`): before the host quiesces, the connection stops
reading the guest *between two messages*: a message being handled is finished (its reply sent),
the next ones stay unread in the socket until the connection resumes, here after a rollback or
in the new process. Decision: no message waits at the guest gate half-handled, because the
connection is parked before the gate closes. Replies of background steps (a rescind, a deferred
GPADL_TORNDOWN) made while parked queue in the connection's outbox, which travels and is sent
first on resume. Ring contents need nothing (guest memory); interrupts wait in the eventfd
counters, and after a handover every open channel looks at its rings once (its eventfd is
signalled once before its device starts).

**The new process** (:func:`restore_socket_guest`): checks everything (this module's
:func:`check_state_untrusted`, then the descriptors' kinds and the memory's seals), maps the
guest's memory, gives the server the guest's GPADLs and opens before any device is offered, so
each VMBus device is restored with ``restore_open`` over its handed-over channel, and starts
nothing: after the old process committed, :meth:`SocketResumption.start` starts the devices and
resumes the connection (outbox first, then reading). A rollback resumes the old connection.

Refused up front (:func:`takeover_refusal`, nothing stopped): a channel open by a client inside
the host (the in-process guest, the intercept relay: its memory does not travel). After the save
(rolled back): a channel the socket guest has open whose device saved nothing, and a guest that
left during the handoff.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Mapping
from typing import Any, Final

import attrs

from devicehost.fds import fd_kind, require_eventfd
from devicehost.handoff import HandoffError, HandoffFd
from devicehost.restoreplan import HOST_PLUGIN, VMBUS_SOCKET_ENTRY
from devicehost.savedstate import decode_envelope_untrusted, encode_envelope, entry_for, saved_state
from devicehost.takeover import VMBUS_FDS
from devicehost.vmbus.channel import EventfdSignal
from devicehost.vmbus.messages import (
    MAX_MESSAGE_SIZE,
    MEMORY_TABLE_MAX_REGIONS,
    SUPPORTED_VERSIONS,
    AllOffersDelivered,
    GpadlCreated,
    GpadlHeader,
    GpadlTeardown,
    GpadlTorndown,
    MemoryRegionEntry,
    MemoryTable,
    ModifyChannelResponse,
    OfferChannelMessage,
    RescindChannelOffer,
    UnloadComplete,
    VersionResponse,
    decode_message_untrusted,
)
from devicehost.vmbus.protocol import USER_DEFINED_SIZE, GpadlRequest, OpenData, VmbusProtocolError
from devicehost.vmbus.server import RemoteChannelState, RemoteGuest, RemoteOpen
from devicehost.vmbus.socketconnection import (
    MAX_GPADL_WORDS_PER_GUEST,
    MAX_PENDING_GPADLS,
    GuestConnection,
    GuestFault,
    PendingGpadl,
)

# Imported here, not in the function that uses them: the new process imports this module before
# it asks for the handoff, so no import runs in the guest-visible window.
from devicehost.vmbus.socketserver import VmbusSocketServer
from devicehost.vmbus.transport import VmbusSavedState, VmbusTransport

__all__ = [
    "SOCKET_ENTRY",
    "VMBUS_FDS",
    "HandedGpadl",
    "HandedGuest",
    "HandedOffer",
    "HandedOpen",
    "HandedOverSignal",
    "HandedPendingGpadl",
    "HandedRegion",
    "ParkedSocket",
    "SocketHandoverState",
    "SocketResumption",
    "VmbusHandoverError",
    "check_state_untrusted",
    "park",
    "restore_socket_guest",
    "takeover_refusal",
]

log = logging.getLogger("devicehost.vmbus.handover")

#: The envelope entry holding :class:`SocketHandoverState`.
SOCKET_ENTRY: Final = VMBUS_SOCKET_ENTRY
LISTENER_HANDLE: Final = 0
CONNECTION_HANDLE: Final = 1
#: Most channel ids a handed-over guest may have been offered, rescinded or opened.
MAX_CHANNELS: Final = 4096
#: Most messages queued while parked that a handover may carry.
MAX_OUTBOX: Final = 4096
_MAX_NAME: Final = 64
_U16: Final = 0xFFFF
_U32: Final = 0xFFFFFFFF
_PAGE: Final = 4096
#: Messages only the host sends: what an outbox may hold.
_HOST_SENT: Final = (OfferChannelMessage, RescindChannelOffer, AllOffersDelivered, GpadlCreated,
                     GpadlTorndown, ModifyChannelResponse, UnloadComplete, VersionResponse)


class VmbusHandoverError(HandoffError):
    """Raised when the VMBus socket guest cannot be handed over, or its handed-over state is
    malformed (then the running host that sent it is to blame)."""


# -- the wire values (saved-state types: a wire format, versioned) --------------------------------


def _tuple(values: Any) -> tuple[Any, ...]:
    return tuple(values)


@attrs.frozen
class HandedRegion:
    """A guest memory region: ``size`` bytes at ``gpa``, ``offset`` into descriptor ``fd``."""

    gpa: int
    size: int
    offset: int
    fd: int


@attrs.frozen
class HandedOffer:
    """An offer the guest was sent, by channel id and key (GUIDs as text)."""

    channel_id: int
    interface_id: str
    instance_id: str
    subchannel_index: int


@attrs.frozen
class HandedPendingGpadl:
    """A GPADL the guest has half-sent: its header and the range bytes so far."""

    channel_id: int
    gpadl_id: int
    range_buflen: int
    range_count: int
    data: bytes


@attrs.frozen
class HandedGpadl:
    """A GPADL of the guest the server holds; ``teardown``: the guest asked to tear it down."""

    channel_id: int
    gpadl_id: int
    count: int
    buf: tuple[int, ...] = attrs.field(converter=_tuple)
    teardown: bool = False


@attrs.frozen
class HandedOpen:
    """A channel the guest has open: its open data and its signal descriptors (handles)."""

    channel_id: int
    ring_gpadl_id: int
    ring_offset: int
    target_vp: int | None
    event_flag: int
    connection_id: int
    user_data: bytes
    to_host: int
    to_guest: int


@attrs.frozen
class HandedGuest:
    """The connected guest: its connection's protocol state and what the server holds of it."""

    name: str
    version: int | None
    offers_requested: bool
    messages: int
    regions: tuple[HandedRegion, ...] = attrs.field(converter=_tuple)
    sent: tuple[HandedOffer, ...] = attrs.field(converter=_tuple)
    rescinded: tuple[int, ...] = attrs.field(converter=_tuple)
    pending: tuple[HandedPendingGpadl, ...] = attrs.field(converter=_tuple)
    gpadl_words: tuple[tuple[int, int], ...] = attrs.field(converter=_tuple)
    gpadls: tuple[HandedGpadl, ...] = attrs.field(converter=_tuple)
    opens: tuple[HandedOpen, ...] = attrs.field(converter=_tuple)
    outbox: tuple[bytes, ...] = attrs.field(converter=_tuple)


@saved_state("vmbus.SocketHandoverState", 1)
@attrs.frozen
class SocketHandoverState:
    """The VMBus socket's state in a handover: its counters and the connected guest (if any)."""

    connections: int
    refused: int
    guest: HandedGuest | None = None


# -- checking (pure) -------------------------------------------------------------------------------


def _u32(value: int, what: str) -> None:
    if not 0 <= value <= _U32:
        raise VmbusHandoverError(f"{what} {value} is not a u32")


def check_state_untrusted(state: SocketHandoverState, kinds: Mapping[int, str]) -> None:
    """Check a handed-over state against the descriptors that came with it (handle -> kind,
    as the kernel says): counts, ids, sizes, which handle is what. Raises
    :class:`VmbusHandoverError` only. The GPADL ranges are checked against the guest's memory
    when the server rebuilds them; the memory's seals when it is mapped."""
    if not 0 <= state.connections <= _U32 or not 0 <= state.refused <= _U32:
        raise VmbusHandoverError("connection counters out of range")
    if kinds.get(LISTENER_HANDLE) != "socket":
        raise VmbusHandoverError("the VMBus socket's listener is missing or not a socket")
    guest = state.guest
    expected = {LISTENER_HANDLE}
    if guest is None:
        if set(kinds) != expected:
            raise VmbusHandoverError("descriptors travel for a guest that is not there")
        return
    if not guest.name or len(guest.name) > _MAX_NAME or not guest.name.isprintable():
        raise VmbusHandoverError("the guest's name is empty, too long or not printable")
    if kinds.get(CONNECTION_HANDLE) != "socket":
        raise VmbusHandoverError("the guest's connection is missing or not a socket")
    expected.add(CONNECTION_HANDLE)
    connected = guest.version is not None
    if connected and guest.version not in SUPPORTED_VERSIONS:
        raise VmbusHandoverError(f"version {guest.version!r} is not a VMBus version")
    if not 0 <= guest.messages < 1 << 63:
        raise VmbusHandoverError("message count out of range")
    if len(guest.regions) > MEMORY_TABLE_MAX_REGIONS or (connected and not guest.regions):
        raise VmbusHandoverError(f"{len(guest.regions)} memory regions (1 to"
                                 f" {MEMORY_TABLE_MAX_REGIONS} once connected)")

    def handle(value: int, kind: str, what: str) -> None:
        if value in expected or kinds.get(value) != kind:
            raise VmbusHandoverError(f"{what}: descriptor {value} is missing, repeated or not"
                                     f" a {kind}")
        expected.add(value)

    for index, region in enumerate(guest.regions):
        if not (region.size > 0 and region.gpa >= 0 and region.offset >= 0
                and not (region.gpa | region.size | region.offset) % _PAGE
                and region.gpa + region.size <= 1 << 64 and region.offset < 1 << 63):
            raise VmbusHandoverError(f"memory region {index} is not whole pages in range")
        kind = kinds.get(region.fd, "")
        handle(region.fd, kind if kind in ("memfd", "regular") else "memfd",
               f"memory region {index}")
    if not connected and (guest.offers_requested or guest.sent or guest.rescinded
                          or guest.pending or guest.gpadl_words or guest.gpadls or guest.opens):
        raise VmbusHandoverError("a guest that is not connected has offers or GPADLs")
    for name, count in (("offers sent", len(guest.sent)), ("rescinds", len(guest.rescinded)),
                        ("GPADLs", len(guest.gpadls)), ("opens", len(guest.opens)),
                        ("GPADL word counts", len(guest.gpadl_words))):
        if count > MAX_CHANNELS:
            raise VmbusHandoverError(f"{count} {name} (at most {MAX_CHANNELS})")
    if len(guest.sent) != len({o.channel_id for o in guest.sent}):
        raise VmbusHandoverError("an offer is listed twice")
    for offer in guest.sent:
        _u32(offer.channel_id, "offered channel id")
        if not 0 <= offer.subchannel_index <= _U16:
            raise VmbusHandoverError("subchannel index out of range")
    for channel_id in guest.rescinded:
        _u32(channel_id, "rescinded channel id")
    if len(guest.pending) > MAX_PENDING_GPADLS or len(
            {p.gpadl_id for p in guest.pending}) != len(guest.pending):
        raise VmbusHandoverError("too many or repeated half-sent GPADLs")
    words = 0
    for pending in guest.pending:
        _u32(pending.channel_id, "channel id")
        _u32(pending.gpadl_id, "GPADL id")
        if not (0 < pending.range_buflen <= _U16 and pending.range_buflen % 8 == 0
                and 0 <= pending.range_count <= _U16 and len(pending.data) % 8 == 0
                and len(pending.data) < pending.range_buflen):
            raise VmbusHandoverError(f"half-sent GPADL {pending.gpadl_id:#x} is malformed")
        words += pending.range_buflen // 8
    ids: set[int] = set()
    for gpadl_id, count in guest.gpadl_words:
        _u32(gpadl_id, "GPADL id")
        if gpadl_id in ids or not 0 <= count <= _U16 // 8:
            raise VmbusHandoverError(f"GPADL {gpadl_id:#x}: word count repeated or too large")
        ids.add(gpadl_id)
        words += count
    if words > MAX_GPADL_WORDS_PER_GUEST:
        raise VmbusHandoverError(f"the guest's GPADLs exceed {MAX_GPADL_WORDS_PER_GUEST} words")
    gpadls: set[int] = set()
    for gpadl in guest.gpadls:
        _u32(gpadl.channel_id, "channel id")
        _u32(gpadl.gpadl_id, "GPADL id")
        if gpadl.gpadl_id in gpadls or not 1 <= gpadl.count <= _U16 or len(gpadl.buf) > (
                _U16 // 8) or any(not 0 <= w < 1 << 64 for w in gpadl.buf):
            raise VmbusHandoverError(f"GPADL {gpadl.gpadl_id:#x} is repeated or malformed")
        gpadls.add(gpadl.gpadl_id)
    if sum(len(g.buf) for g in guest.gpadls) > MAX_GPADL_WORDS_PER_GUEST:
        raise VmbusHandoverError(f"the guest's GPADLs exceed {MAX_GPADL_WORDS_PER_GUEST} words")
    opened: set[int] = set()
    for item in guest.opens:
        _u32(item.channel_id, "channel id")
        if item.channel_id in opened or item.ring_gpadl_id not in gpadls:
            raise VmbusHandoverError(f"open channel {item.channel_id} is repeated or its ring"
                                     " GPADL is not handed over")
        opened.add(item.channel_id)
        if not (0 < item.ring_offset <= _U32 and 0 <= item.event_flag <= _U16
                and 0 <= item.connection_id <= _U32 and len(item.user_data) == USER_DEFINED_SIZE
                and (item.target_vp is None or 0 <= item.target_vp <= _U32)):
            raise VmbusHandoverError(f"open channel {item.channel_id}: open data out of range")
        handle(item.to_host, "eventfd", f"open channel {item.channel_id}'s guest-to-host signal")
        handle(item.to_guest, "fifo", f"open channel {item.channel_id}'s host-to-guest signal")
    if len(guest.outbox) > MAX_OUTBOX:
        raise VmbusHandoverError(f"{len(guest.outbox)} queued messages (at most {MAX_OUTBOX})")
    for data in guest.outbox:
        if len(data) > MAX_MESSAGE_SIZE:
            raise VmbusHandoverError("a queued message is longer than a VMBus message")
        try:
            message = decode_message_untrusted(data, guest.version)
        except VmbusProtocolError as exc:
            raise VmbusHandoverError(f"a queued message does not decode: {exc}") from None
        if not isinstance(message, _HOST_SENT):
            raise VmbusHandoverError(f"a queued {type(message).__name__} is not the host's")
    if set(kinds) != expected:
        raise VmbusHandoverError(f"descriptors {sorted(set(kinds) - expected)[:8]} belong to"
                                 " nothing in the state")


# -- the old process -------------------------------------------------------------------------------


def takeover_refusal(host: Any) -> str | None:
    """Why ``host``'s VMBus cannot be handed over live, checked before anything stops (None: it
    can). A channel open by a client inside the host cannot: that memory does not travel."""
    transport = _transport(host)
    if transport is None:
        return None
    names = {id(handle): name for name, handle in transport._handles.items()}
    for handle in transport.server.in_process_opens():
        name = names.get(id(handle), str(handle.key))
        return (f"VMBus channel {handle.channel_id} (device {name!r}) is open by a client"
                " inside this host, whose memory cannot be handed over live (restart with"
                " --state instead)")
    return None


def _transport(host: Any) -> VmbusTransport | None:
    vmbus: VmbusTransport | None = host._vmbus_transport()
    return vmbus


async def park(host: Any) -> ParkedSocket | None:
    """Park the VMBus socket's guest connection at its safe point (module docstring); None if
    the host serves no VMBus socket."""
    transport = _transport(host)
    if transport is None or transport.socket is None:
        return None
    transport.socket.park_accepting()
    connection = transport.socket.connected
    if connection is not None:
        await connection.park()
    return ParkedSocket(transport, transport.socket, connection)


class ParkedSocket:
    """The old process's parked VMBus socket: :meth:`capture` what travels, :meth:`resume` on
    a rollback."""

    def __init__(self, transport: VmbusTransport, server: VmbusSocketServer,
                 connection: GuestConnection | None) -> None:
        self.transport = transport
        self.server = server
        self.connection = connection

    def resume(self) -> None:
        """Rollback: the connection reads the guest again (its outbox first), and new guests
        are accepted again."""
        if self.connection is not None:
            self.connection.unpark()
        self.server.unpark_accepting()

    def capture(self, envelope: bytes) -> tuple[bytes, list[HandoffFd]]:
        """``envelope`` with the :data:`SOCKET_ENTRY` added, and the descriptors (duplicates,
        the caller's). VmbusHandoverError naming the device if the guest has a channel open
        whose device saved nothing, or if the guest left meanwhile."""
        conn = self.connection
        if conn is not None and conn.ended:
            raise VmbusHandoverError("the VMBus socket guest disconnected during the handoff")
        entries = decode_envelope_untrusted(envelope)
        not_saved = {e.device for e in entries if e.type_name == "host.NotSaved"}
        by_handle = {id(h): name for name, h in self.transport._handles.items()}
        fds: list[HandoffFd] = []

        def put(kind: str, fd: int) -> int:
            handle = len(fds)
            fds.append(HandoffFd(VMBUS_FDS, handle, kind, os.dup(fd)))
            return handle

        try:
            assert self.server.listener is not None
            put("socket", self.server.listener.fileno())
            guest = None
            if conn is not None:
                put("socket", conn.sock.sock.fileno())
                guest = self._guest(conn, put, not_saved, by_handle)
        except BaseException:
            for item in fds:
                os.close(item.fd)
            raise
        state = SocketHandoverState(self.server.connections, self.server.refused, guest)
        entries.append(entry_for(SOCKET_ENTRY, HOST_PLUGIN, state))
        return encode_envelope(entries), fds

    def _guest(self, conn: GuestConnection, put: Any, not_saved: set[str],
               by_handle: dict[int, str]) -> HandedGuest:
        server = self.transport.server
        regions: tuple[HandedRegion, ...] = ()
        if conn.memory is not None:
            regions = tuple(HandedRegion(r.gpa, r.size, r.offset, put(fd_kind(r.fd), r.fd))
                            for r in conn.memory.regions if r.fd is not None)
        gpadls: list[HandedGpadl] = []
        opens: list[HandedOpen] = []
        if conn.guest is not None:
            gpadls = [HandedGpadl(g.channel_id, g.request.id, g.request.count, g.request.buf,
                                  g.teardown_requested)
                      for g in server.remote_gpadls(conn.guest)]
            for handle, signal in server.remote_opens(conn.guest):
                name = by_handle.get(id(handle), str(handle.key))
                if name in not_saved:
                    raise VmbusHandoverError(
                        f"device {name!r}: its VMBus channel is open by the socket guest but"
                        " its save_open saved nothing, so it cannot be handed over live")
                assert isinstance(signal, EventfdSignal) and handle.open_request is not None
                d = handle.open_request.open_data
                opens.append(HandedOpen(handle.channel_id, d.ring_gpadl_id, d.ring_offset,
                                        d.target_vp, d.event_flag, d.connection_id,
                                        d.user_data, put("eventfd", signal.wait_fd),
                                        put("fifo", signal.notify_fd)))
        sent = tuple(HandedOffer(cid, str(i.offer.interface_id), str(i.offer.instance_id),
                                 i.offer.subchannel_index) for cid, i in sorted(conn.sent.items()))
        pending = tuple(HandedPendingGpadl(p.header.channel_id, p.header.gpadl_id,
                                           p.header.range_buflen, p.header.range_count,
                                           bytes(p.data)) for p in conn.pending.values())
        return HandedGuest(conn.name, conn.version, conn.offers_requested, conn.messages,
                           regions, sent, tuple(sorted(conn.rescinded)), pending,
                           tuple(sorted(conn.gpadl_words.items())), tuple(gpadls),
                           tuple(opens), tuple(conn.outbox))


# -- the new process -------------------------------------------------------------------------------


def _check_descriptors(fds: Mapping[int, tuple[int, str]]) -> None:
    """What the kernel says of the descriptors, beyond their kind."""
    for handle, (fd, _kind) in fds.items():
        kind = fd_kind(fd)
        if kind == "eventfd":
            require_eventfd(fd, f"descriptor {handle}")
        elif kind == "fifo" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_WRONLY:
            raise VmbusHandoverError(f"descriptor {handle}: a pipe's read end, not its write end")
        elif kind == "socket":
            sock = socket.socket(fileno=os.dup(fd))
            try:
                ok = (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET
                      and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
                      == (handle == LISTENER_HANDLE))
            finally:
                sock.close()
            if not ok:
                raise VmbusHandoverError(f"descriptor {handle}: not the VMBus socket's"
                                         f" {'listener' if handle == 0 else 'connection'}")


class HandedOverSignal(EventfdSignal):
    """The host's end of a handed-over channel's signal. Its first wait returns at once, so the
    channel looks at its rings once after the handover: an interrupt the old process had taken
    from the eventfd but not acted on yet is not lost. (Not by writing the eventfd: the guest
    shares its file description and may have made a write block.)"""

    def __init__(self, wait_fd: int, notify_fd: int, *, owns_fds: bool = False) -> None:
        super().__init__(wait_fd, notify_fd, owns_fds=owns_fds)
        self._look_once = True

    def _drain(self) -> bool:
        drained = super()._drain()
        if self._look_once:
            self._look_once = False
            return True
        return drained


class SocketResumption:
    """The new process's VMBus socket, restored but not yet serving (module docstring)."""

    def __init__(self, transport: VmbusTransport, server: VmbusSocketServer,
                 listener: socket.socket, guest: HandedGuest | None,
                 connection: GuestConnection | None) -> None:
        self.transport = transport
        self.server = server
        self.listener = listener
        self.guest = guest
        self.connection = connection

    def finish_restore(self) -> None:
        """After every device was added: every handed-over channel was taken by its offer, and
        the connection knows the offers the guest has. VmbusHandoverError otherwise."""
        left = self.transport.server.unclaimed_remote()
        if left:
            raise VmbusHandoverError(f"the socket guest has channels {left[:8]} that no"
                                     " configured device offers")
        conn, guest = self.connection, self.guest
        if conn is None or guest is None:
            return
        channels = {h.channel_id: h for h in self.transport.server.handles()}
        for offer in guest.sent:
            handle = channels.get(offer.channel_id)
            if handle is None or (str(handle.key.interface_id), str(handle.key.instance_id),
                                  handle.key.subchannel_index) != (
                    offer.interface_id.lower(), offer.instance_id.lower(),
                    offer.subchannel_index):
                raise VmbusHandoverError(f"the socket guest was offered channel"
                                         f" {offer.channel_id}, which no configured device"
                                         " offers under that id")
            conn.sent[offer.channel_id] = handle.incoming_offer()

    async def start(self) -> None:
        """After the commit: start the restored VMBus devices (each open channel's first wait
        returns at once: :class:`HandedOverSignal`), then serve the socket again."""
        held, self.transport.held = self.transport.held, []
        self.transport.strict_restore = False
        for device in held:
            await device.start()
        await self.transport.host.task_group.start(
            self.server.serve_handed_over, self.listener, self.connection)
        self.transport.socket = self.server
        log.info("serving VMBus to a guest process on %s again (guest %s)", self.server.path,
                 None if self.connection is None else self.connection.name)


def restore_socket_guest(host: Any, plan: Any, names: dict[str, Any],
                         fds: dict[int, tuple[int, str]]) -> SocketResumption:
    """Rebuild the VMBus socket from a handover (module docstring), before any device is
    offered. The descriptors ``fds`` (handle -> (fd, kind)) are owned from here on (closed on
    failure). VmbusHandoverError for anything malformed."""
    owned = dict(fds)
    listener: socket.socket | None = None
    try:
        state: SocketHandoverState = plan.vmbus_socket
        check_state_untrusted(state, {h: k for h, (_fd, k) in owned.items()})
        _check_descriptors(owned)
        for channel in plan.vmbus.channels:
            if channel.gpadls or channel.open is not None:
                raise VmbusHandoverError(f"channel {channel.channel_id} holds state of a client"
                                         " inside the host, which is not handed over")
        listener = socket.socket(fileno=owned.pop(LISTENER_HANDLE)[0])
        path = _same_path(host.settings.vmbus_socket, listener)
        transport = host.transport(VmbusTransport)
        server = VmbusSocketServer(transport.server, path,
                                   allow_unsealed_memory=host.settings.allow_unsealed_memory)
        server.connections, server.refused = state.connections, state.refused
        guest = state.guest
        connection = None
        remote: dict[int, RemoteChannelState] = {}
        if guest is not None:
            sock = socket.socket(fileno=owned.pop(CONNECTION_HANDLE)[0])
            connection = server.connection(sock, guest.name)
            remote = _rebuild_connection(connection, guest, owned)
        try:
            transport.restore(VmbusSavedState(plan.vmbus, names))
        except ValueError as exc:
            raise VmbusHandoverError(f"device '@vmbus': {exc}") from exc
        transport.server.restore_remote(remote)
        transport.strict_restore = True
    except BaseException:
        for fd, _kind in owned.values():
            os.close(fd)
        if listener is not None:
            listener.close()
        raise
    return SocketResumption(transport, server, listener, guest, connection)


def _same_path(configured: Any, listener: socket.socket) -> str:
    """The configured VMBus socket path, which must be the one the handed listener is bound to
    (the socket file and what this process will unlink at its end)."""
    bound = listener.getsockname()
    if configured is None:
        raise VmbusHandoverError(f"the running host serves the VMBus socket {bound!r}; this"
                                 " config has no [host] vmbus_socket")
    path: str = os.fspath(configured)
    if not isinstance(bound, str) or os.path.abspath(bound) != os.path.abspath(path):
        raise VmbusHandoverError(f"the running host serves the VMBus socket at {bound!r}, this"
                                 f" config names {path!r}")
    return path


def _rebuild_connection(conn: GuestConnection, guest: HandedGuest,
                        owned: dict[int, tuple[int, str]]) -> dict[int, RemoteChannelState]:
    """Fill ``conn`` from ``guest``; the remote channel state for the server. Takes the memory
    and signal descriptors out of ``owned``."""
    if guest.regions:
        fds = [owned.pop(r.fd)[0] for r in guest.regions]
        table = MemoryTable(tuple(MemoryRegionEntry(r.gpa, r.size, r.offset)
                                  for r in guest.regions))
        try:
            conn._memory_table(table, fds)  # the checks a guest's MEMORY_TABLE gets
        except GuestFault as exc:
            for fd in fds:
                os.close(fd)
            raise VmbusHandoverError(f"the guest's memory: {exc}") from None
    conn.version = guest.version
    conn.messages = guest.messages
    conn.offers_requested = conn.resume_offers = guest.offers_requested
    conn.rescinded = set(guest.rescinded)
    conn.gpadl_words = dict(guest.gpadl_words)
    conn.outbox = list(guest.outbox)
    for item in guest.pending:
        pending = PendingGpadl(GpadlHeader(item.channel_id, item.gpadl_id, item.range_buflen,
                                            item.range_count))
        pending.data += item.data
        conn.pending[item.gpadl_id] = pending
    if guest.version is None:
        return {}
    assert conn.memory is not None
    conn.state = "connected"
    conn.guest = remote_guest = RemoteGuest(conn.memory, guest.name)
    gpadls: dict[int, list[GpadlRequest]] = {}
    for g in guest.gpadls:
        gpadls.setdefault(g.channel_id, []).append(GpadlRequest(g.gpadl_id, g.count, g.buf))
        if g.teardown:
            conn.resume_teardowns.append(GpadlTeardown(g.channel_id, g.gpadl_id))
    opens: dict[int, RemoteOpen] = {}
    for o in guest.opens:
        to_host, to_guest = owned.pop(o.to_host)[0], owned.pop(o.to_guest)[0]
        signal = HandedOverSignal(to_host, to_guest, owns_fds=True)
        data = OpenData(ring_offset=o.ring_offset, ring_gpadl_id=o.ring_gpadl_id,
                        target_vp=o.target_vp, event_flag=o.event_flag,
                        connection_id=o.connection_id, user_data=o.user_data)
        opens[o.channel_id] = RemoteOpen(data, signal)
    return {cid: RemoteChannelState(remote_guest, tuple(gpadls.get(cid, ())), opens.get(cid))
            for cid in set(gpadls) | set(opens)}

