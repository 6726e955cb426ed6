"""One VMBus socket guest's connection: what :mod:`devicehost.vmbus.socketserver` serves.

A :class:`GuestConnection` holds one guest's memory, negotiated version, offers sent and GPADL
assembly, and runs its receive loop (protocol, limits and faults: the socketserver module and
``docs/vmbus-socket.md``). For a live handover (:mod:`devicehost.vmbus.handover`) it *parks*
between two messages and *unparks* on a rollback, and a new process rebuilds it from the
handed-over state.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream

from devicehost.fds import FdKindError, require_eventfd, require_unshrinkable_memory
from devicehost.memory import PAGE_SIZE, GuestMemory, MemoryRegion
from devicehost.vmbus.channel import EventfdSignal
from devicehost.vmbus.controlsocket import ControlSocket, ControlSocketError, close_fds
from devicehost.vmbus.messages import (
    SUPPORTED_VERSIONS,
    AllOffersDelivered,
    CloseChannel,
    GpadlBody,
    GpadlCreated,
    GpadlHeader,
    GpadlTeardown,
    GpadlTorndown,
    InitiateContact,
    MemoryTable,
    Message,
    ModifyChannel,
    ModifyChannelResponse,
    OfferChannelMessage,
    OpenChannel,
    OpenResult,
    RelIdReleased,
    RequestOffers,
    RescindChannelOffer,
    Unload,
    UnloadComplete,
    Version,
    VersionResponse,
    decode_message_untrusted,
    encode_message,
)
from devicehost.vmbus.protocol import (
    STATUS_SUCCESS,
    VP_INDEX_DISABLE_INTERRUPT,
    GpadlChannelRequest,
    GpadlRequest,
    IncomingOffer,
    ModifyChannelRequest,
    ModifyRequest,
    OfferFlags,
    OpenChannelRequest,
    OpenData,
    OpenRequest,
    TeardownGpadlRequest,
    VmbusProtocolError,
)
from devicehost.vmbus.protocol import CloseRequest as CloseChannelRequest
from devicehost.vmbus.server import ChannelRequestError, RemoteGuest

if TYPE_CHECKING:
    from devicehost.vmbus.socketserver import VmbusSocketServer

__all__ = [
    "MAX_GPADL_WORDS_PER_GUEST",
    "MAX_GUEST_MEMORY",
    "MAX_PENDING_GPADLS",
    "GuestConnection",
    "GuestFault",
    "PendingGpadl",
]

log = logging.getLogger("devicehost.vmbus.socket")

#: Most bytes of guest memory one guest may map (all regions together).
MAX_GUEST_MEMORY: Final = 1 << 40
#: GPADLs a guest may have half-sent (GPADL_HEADER without all its GPADL_BODY messages).
MAX_PENDING_GPADLS: Final = 64
#: Range words a guest's GPADLs may hold in all (pending and created): 2**18 words describe
#: 1 GiB of 4 KiB pages.
MAX_GPADL_WORDS_PER_GUEST: Final = 1 << 18


class GuestFault(Exception):
    """Raised when a socket guest breaks the protocol; the guest is to blame and loses its
    connection."""


class _GuestGone(Exception):
    """The guest's end of the socket is closed (not a fault: the guest left or died)."""


class PendingGpadl:
    def __init__(self, header: GpadlHeader) -> None:
        self.header = header
        self.data = bytearray()


def _words(data: bytes) -> tuple[int, ...]:
    mv = memoryview(data).cast("Q")
    return tuple(mv)


class GuestConnection:
    """One guest's connection: its memory, negotiated version, offers sent and GPADL assembly."""

    def __init__(self, owner: VmbusSocketServer, sock: ControlSocket, name: str) -> None:
        self.owner = owner
        self.server = owner.server
        self.sock = sock
        self.name = name
        self.memory: GuestMemory | None = None
        self.guest: RemoteGuest | None = None
        self.version: int | None = None
        self.state = "contact"
        self.offers_requested = False
        self.sent: dict[int, IncomingOffer] = {}
        self.rescinded: set[int] = set()
        self.pending: dict[int, PendingGpadl] = {}
        self.gpadl_words: dict[int, int] = {}
        self.messages = 0
        #: Messages sent while parked (background steps: rescinds, torndowns), sent in order
        #: when the connection resumes here or in the process it is handed to.
        self.outbox: list[bytes] = []
        #: Whether the connection ended (the guest left or faulted); it then parks no more.
        self.ended = False
        #: GPADL teardowns to request once a handed-over connection resumes (their GPADLs
        #: were restored without the teardown flag).
        self.resume_teardowns: list[GpadlTeardown] = []
        #: A handed-over connection: its REQUEST_OFFERS was answered in the other process.
        self.resume_offers = False
        self._park_requested = False
        self._parked = anyio.Event()
        self._unparked = anyio.Event()
        self._receiving: anyio.CancelScope | None = None
        self._flushing = False
        self._offers: MemoryObjectReceiveStream[IncomingOffer] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        #: Why a background step ended the connection (a fault found outside the receive loop).
        self._fault: str | None = None

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> str:
        """Serve the guest until it leaves or faults; returns why the connection ended."""
        reason = "the guest closed the connection"
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                try:
                    await self._resume_handed_over()
                    reason = await self._receive_loop()
                except GuestFault as exc:
                    reason = f"guest fault: {exc}"
                    log.warning("VMBus socket guest %s: %s; disconnecting it", self.name, exc)
                except _GuestGone as exc:
                    reason = str(exc)
                tg.cancel_scope.cancel()
            if self._fault is not None:
                reason = self._fault
        except Exception as exc:
            # A defect here must cost this guest its connection, never the host.
            reason = f"internal error: {exc!r}"
            log.exception("VMBus socket guest %s: internal error; disconnecting it", self.name)
        finally:
            self.ended = True
            self._parked.set()  # a park waiting for this connection returns (it ended)
            with anyio.CancelScope(shield=True):
                await self._cleanup()
        return reason

    # -- parking (live handover, devicehost.vmbus.handover) --------------------------------------

    async def park(self) -> None:
        """Stop reading the guest between two messages and return once stopped (or once the
        connection ended: see :attr:`ended`). A message being handled is finished first; the
        next ones stay unread in the socket. Sends of background steps go to :attr:`outbox`."""
        self._park_requested = True
        self._unparked = anyio.Event()
        if self._receiving is not None:
            self._receiving.cancel()
        await self._parked.wait()

    def unpark(self) -> None:
        """Read the guest again (after :meth:`park`; the outbox is sent first)."""
        if self._park_requested:
            self._park_requested = False
            self._parked = anyio.Event()
            self._unparked.set()

    async def _resume_handed_over(self) -> None:
        """A connection rebuilt from a handover (no-op otherwise): send what the old process
        left in the outbox, follow the offers again without resending those the guest has, and
        request the teardowns the old process had pending."""
        await self._flush_outbox()
        if self.resume_offers:
            self._offers = offers = self.server.subscribe()
            while True:
                try:
                    incoming = offers.receive_nowait()
                except anyio.WouldBlock:
                    break
                await self._offer_or_watch(incoming)
            assert self._tg is not None
            self._tg.start_soon(self._forward_offers, offers)
        teardowns, self.resume_teardowns = self.resume_teardowns, []
        for message in teardowns:
            self._gpadl_teardown(message)

    async def _offer_or_watch(self, incoming: IncomingOffer) -> None:
        known = self.sent.get(incoming.channel_id)
        if known is not None and known.revoked is incoming.revoked:
            # The guest has this very offer from the old process: only watch it.
            assert self._tg is not None
            self._tg.start_soon(self._watch_revoke, incoming)
        else:
            await self._offer(incoming)

    async def _flush_outbox(self) -> None:
        self._flushing = True
        try:
            while self.outbox:
                data = self.outbox.pop(0)
                try:
                    await self.sock.send(data)
                except OSError as exc:
                    raise _GuestGone(f"the guest is gone ({exc})") from None
        finally:
            self._flushing = False

    async def _receive(self) -> tuple[bytes, list[int]] | None:
        """The next message, or None if a park interrupted the wait."""
        with anyio.CancelScope() as scope:
            self._receiving = scope
            try:
                return await self.sock.receive()
            finally:
                self._receiving = None
        return None

    async def _receive_loop(self) -> str:
        while True:
            if self._park_requested:
                self._parked.set()
                await self._unparked.wait()
                await self._flush_outbox()
                continue
            try:
                received = await self._receive()
            except ControlSocketError as exc:
                raise GuestFault(str(exc)) from None
            except OSError as exc:
                return f"socket error: {exc}"
            if received is None:
                continue
            data, fds = received
            if not data:
                return "the guest closed the connection"
            try:
                await self._handle(data, fds)
            finally:
                close_fds(fds)  # every fd not taken over by the handler
            self.messages += 1
            # Bounded work per message, then let every other task of the host run.
            await anyio.lowlevel.checkpoint()

    async def _send(self, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        if self._park_requested or self._flushing:
            # Parked: background steps queue their messages (never with fds: only the receive
            # loop's replies carry fds, and it is parked).
            assert not fds
            self.outbox.append(encode_message(message))
            return
        try:
            await self.sock.send(encode_message(message), fds)
        except OSError as exc:
            raise _GuestGone(f"the guest is gone ({exc})") from None

    async def _cleanup(self) -> None:
        """Drop everything of the guest; each step runs even if one before it failed (a defect
        here is logged, never raised into the host)."""
        if self._offers is not None:
            self._offers.close()
        try:
            if self.guest is not None and not self.owner.abandoned:
                await self.server.disconnect(self.guest)
        except Exception:
            log.exception("VMBus socket guest %s: closing its channels failed", self.name)
        self.sock.close()
        try:
            if self.memory is not None:
                self.memory.close()
        except Exception:
            log.exception("VMBus socket guest %s: unmapping its memory failed", self.name)
        self.pending.clear()

    # -- dispatch --------------------------------------------------------------------------------

    async def _handle(self, data: bytes, fds: list[int]) -> None:
        try:
            message = decode_message_untrusted(data, self.version)
        except VmbusProtocolError as exc:
            raise GuestFault(str(exc)) from None
        if fds and not isinstance(message, (MemoryTable, OpenChannel)):
            raise GuestFault(f"{type(message).__name__} carries {len(fds)} fds; it takes none")
        if isinstance(message, MemoryTable):
            self._memory_table(message, fds)
        elif isinstance(message, InitiateContact):
            await self._initiate_contact(message)
        elif self.state != "connected":
            raise GuestFault(f"{type(message).__name__} before INITIATE_CONTACT was accepted")
        elif isinstance(message, RequestOffers):
            await self._request_offers()
        elif isinstance(message, GpadlHeader):
            await self._gpadl_header(message)
        elif isinstance(message, GpadlBody):
            await self._gpadl_body(message)
        elif isinstance(message, GpadlTeardown):
            self._gpadl_teardown(message)
        elif isinstance(message, OpenChannel):
            await self._open(message, fds)
        elif isinstance(message, CloseChannel):
            await self._close(message)
        elif isinstance(message, RelIdReleased):
            self.rescinded.discard(message.channel_id)
        elif isinstance(message, ModifyChannel):
            await self._modify(message)
        elif isinstance(message, Unload):
            await self._unload()
        else:
            raise GuestFault(f"{type(message).__name__} is a message the host sends, not the guest")

    # -- contact ---------------------------------------------------------------------------------

    def _memory_table(self, message: MemoryTable, fds: list[int]) -> None:
        if self.memory is not None:
            raise GuestFault("MEMORY_TABLE was already sent")
        if not message.regions or len(fds) != len(message.regions):
            raise GuestFault(f"MEMORY_TABLE lists {len(message.regions)} regions but carries "
                             f"{len(fds)} fds (one per region, at least one)")
        memory = GuestMemory()
        total = 0
        try:
            for index, (entry, fd) in enumerate(zip(message.regions, fds, strict=True)):
                what = f"guest memory region {index}"
                require_unshrinkable_memory(fd, what,
                                            allow_unsealed=self.owner.allow_unsealed_memory)
                if (entry.size <= 0 or entry.gpa % PAGE_SIZE or entry.size % PAGE_SIZE
                        or entry.offset % PAGE_SIZE):
                    raise GuestFault(f"{what}: gpa, size and offset must be whole pages, size > 0")
                total += entry.size
                if total > MAX_GUEST_MEMORY or entry.gpa + entry.size > 1 << 64:
                    raise GuestFault(f"guest memory exceeds {MAX_GUEST_MEMORY} bytes or 2**64")
                if os.fstat(fd).st_size < entry.offset + entry.size:
                    raise GuestFault(f"{what}: the fd is smaller than offset + size")
                region = MemoryRegion(entry.gpa, entry.size, fd=fd, offset=entry.offset,
                                      owns_fd=True)
                fds[index] = -1  # the region owns it now
                memory.add_region(region)
        except (FdKindError, ValueError, OverflowError, OSError) as exc:
            memory.close()
            raise GuestFault(str(exc)) from None
        except BaseException:
            memory.close()
            raise
        fds[:] = [fd for fd in fds if fd >= 0]
        self.memory = memory

    async def _initiate_contact(self, message: InitiateContact) -> None:
        if self.state != "contact":
            raise GuestFault("INITIATE_CONTACT while already connected")
        if self.memory is None:
            raise GuestFault("INITIATE_CONTACT before MEMORY_TABLE")
        version = message.version_requested
        if version not in SUPPORTED_VERSIONS:
            log.info("VMBus socket guest %s asked for version %#010x: refused", self.name, version)
            await self._send(VersionResponse(False, 0, 0))
            return
        self.version = version
        self.state = "connected"
        self.guest = RemoteGuest(self.memory, self.name)
        # No feature of §2.4 is offered; from Copper on the response says so (VersionResponse2).
        features = 0 if version >= Version.COPPER else None
        await self._send(VersionResponse(True, 0, 0, supported_features=features))

    async def _request_offers(self) -> None:
        if self.offers_requested:
            raise GuestFault("REQUEST_OFFERS was already sent")
        self.offers_requested = True
        self._offers = offers = self.server.subscribe()
        while True:
            try:
                offer = offers.receive_nowait()
            except anyio.WouldBlock:
                break
            await self._offer(offer)
        await self._send(AllOffersDelivered())
        assert self._tg is not None
        self._tg.start_soon(self._forward_offers, offers)

    async def _offer(self, incoming: IncomingOffer) -> None:
        offer = incoming.offer
        # The guest negotiated no confidential channels: the flag is cleared (facts §2.6).
        flags = offer.flags & ~OfferFlags.CONFIDENTIAL_RING_BUFFER
        self.sent[offer.channel_id] = incoming
        await self._send(OfferChannelMessage(attrs.evolve(offer, flags=flags)))
        assert self._tg is not None
        self._tg.start_soon(self._watch_revoke, incoming)

    async def _forward_offers(self, offers: MemoryObjectReceiveStream[IncomingOffer]) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
            async for incoming in offers:
                await self._guarded(self._offer(incoming))

    async def _watch_revoke(self, incoming: IncomingOffer) -> None:
        if incoming.revoked is None:
            return
        await incoming.revoked.wait()
        channel_id = incoming.channel_id
        if self.sent.get(channel_id) is incoming:
            del self.sent[channel_id]
            self.rescinded.add(channel_id)
            await self._guarded(self._send(RescindChannelOffer(channel_id)))

    async def _guarded(self, step: Any) -> None:
        """Run a background step; a guest fault in it ends the connection."""
        try:
            await step
        except GuestFault as exc:
            log.warning("VMBus socket guest %s: %s; disconnecting it", self.name, exc)
            self._fault = f"guest fault: {exc}"
            self.sock.close()  # the receive loop sees end of stream and cleans up
        except _GuestGone:
            self.sock.close()

    # -- GPADLs ----------------------------------------------------------------------------------

    async def _gpadl_header(self, message: GpadlHeader) -> None:
        if message.gpadl_id in self.pending:
            raise GuestFault(f"GPADL {message.gpadl_id:#x} is already being sent")
        if len(self.pending) >= MAX_PENDING_GPADLS:
            raise GuestFault(f"more than {MAX_PENDING_GPADLS} GPADLs half-sent")
        if message.range_buflen % 8:
            raise GuestFault(f"GPADL {message.gpadl_id:#x}: range length "
                             f"{message.range_buflen} is not whole u64 words")
        words = message.range_buflen // 8
        if sum(self.gpadl_words.values()) + words > MAX_GPADL_WORDS_PER_GUEST:
            raise GuestFault(f"the guest's GPADLs exceed {MAX_GPADL_WORDS_PER_GUEST} range words")
        pending = PendingGpadl(message)
        self.pending[message.gpadl_id] = pending
        await self._gpadl_data(pending, message.data)

    async def _gpadl_body(self, message: GpadlBody) -> None:
        pending = self.pending.get(message.gpadl_id)
        if pending is None:
            raise GuestFault(f"GPADL_BODY for GPADL {message.gpadl_id:#x}, which has no header")
        await self._gpadl_data(pending, message.data)

    async def _gpadl_data(self, pending: PendingGpadl, data: bytes) -> None:
        header = pending.header
        if len(data) % 8 or len(pending.data) + len(data) > header.range_buflen:
            raise GuestFault(f"GPADL {header.gpadl_id:#x}: range data is not whole words or "
                             f"exceeds the {header.range_buflen} bytes its header announced")
        pending.data += data
        if len(pending.data) < header.range_buflen:
            return
        del self.pending[header.gpadl_id]
        request = GpadlRequest(header.gpadl_id, header.range_count, _words(bytes(pending.data)))
        status = STATUS_SUCCESS
        try:
            await self.server.request(header.channel_id, GpadlChannelRequest(request),
                                      guest=self.guest)
        except ChannelRequestError as exc:
            log.info("VMBus socket guest %s: GPADL %#x refused: %s", self.name,
                     header.gpadl_id, exc)
            status = exc.status
        else:
            self.gpadl_words[header.gpadl_id] = len(request.buf)
        await self._send(GpadlCreated(header.channel_id, header.gpadl_id, status))

    def _gpadl_teardown(self, message: GpadlTeardown) -> None:
        # A teardown of a mapped GPADL waits for the channel's close, which is a later message:
        # it completes in its own task (at most one per GPADL: a second is refused).
        # The guest is bound now: an UNLOAD handled before the task runs must not make it act
        # for anyone else.
        assert self._tg is not None and self.guest is not None
        self._tg.start_soon(self._guarded, self._teardown(message, self.guest))

    async def _teardown(self, message: GpadlTeardown, guest: RemoteGuest) -> None:
        try:
            await self.server.request(message.channel_id, TeardownGpadlRequest(message.gpadl_id),
                                      guest=guest)
        except ChannelRequestError as exc:
            if message.channel_id not in self.rescinded:
                raise GuestFault(f"GPADL_TEARDOWN refused: {exc}") from None
            # Rescinded: the server dropped the channel's GPADLs already.
        self.gpadl_words.pop(message.gpadl_id, None)
        await self._send(GpadlTorndown(message.gpadl_id))

    # -- channels --------------------------------------------------------------------------------

    async def _open(self, message: OpenChannel, fds: list[int]) -> None:
        if len(fds) != 1:
            raise GuestFault(f"OPEN_CHANNEL carries {len(fds)} fds, it needs 1: the guest-to-host "
                             "interrupt eventfd")
        try:
            require_eventfd(fds[0], "OPEN_CHANNEL guest-to-host interrupt")
        except FdKindError as exc:
            raise GuestFault(str(exc)) from None
        # Host-to-guest interrupts: a pipe whose write end only the host holds, so no guest can
        # make the host's notify block (docs/vmbus-socket.md, "File descriptors").
        to_guest_r, to_guest_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal = EventfdSignal(fds[0], to_guest_w, owns_fds=True)
        fds.clear()  # the signal owns them; the server closes it when the open fails or ends
        target_vp = None if message.target_vp == VP_INDEX_DISABLE_INTERRUPT else message.target_vp
        data = OpenData(
            ring_offset=message.downstream_ring_buffer_page_offset,
            ring_gpadl_id=message.ring_buffer_gpadl_id, target_vp=target_vp,
            event_flag=message.event_flag, connection_id=message.connection_id or 0,
            user_data=message.user_data)
        status = STATUS_SUCCESS
        try:
            try:
                await self.server.request(message.channel_id,
                                          OpenChannelRequest(OpenRequest(data)),
                                          guest=self.guest, signal=signal)
            except ChannelRequestError as exc:
                log.info("VMBus socket guest %s: open of channel %d refused: %s", self.name,
                         message.channel_id, exc)
                status = exc.status
            result = OpenResult(message.channel_id, message.open_id, status)
            await self._send(result, [to_guest_r] if status == STATUS_SUCCESS else [])
        finally:
            os.close(to_guest_r)  # the guest has its copy (or the open failed)

    async def _close(self, message: CloseChannel) -> None:
        try:
            await self.server.request(message.channel_id, CloseChannelRequest(), guest=self.guest)
        except ChannelRequestError as exc:
            # No reply exists to carry a refusal; a close of a rescinded channel is normal.
            log.info("VMBus socket guest %s: close of channel %d refused: %s", self.name,
                     message.channel_id, exc)

    async def _modify(self, message: ModifyChannel) -> None:
        status = STATUS_SUCCESS
        try:
            await self.server.request(message.channel_id,
                                      ModifyChannelRequest(ModifyRequest(message.target_vp)),
                                      guest=self.guest)
        except ChannelRequestError as exc:
            status = exc.status
        if self.version is not None and self.version >= Version.IRON:
            await self._send(ModifyChannelResponse(message.channel_id, status))

    async def _unload(self) -> None:
        if self._offers is not None:
            self._offers.close()
            self._offers = None
        assert self.guest is not None
        await self.server.disconnect(self.guest)
        self.sent.clear()
        self.rescinded.clear()
        self.pending.clear()
        self.gpadl_words.clear()
        self.state = "contact"
        self.offers_requested = False
        self.guest = None
        version, self.version = self.version, None
        if version is not None and version >= Version.WIN7:
            await self._send(UnloadComplete())

    def inspect(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "version": None if self.version is None else f"{self.version:#010x}",
            "memory_bytes": 0 if self.memory is None else self.memory.size,
            "offers_sent": sorted(self.sent),
            "gpadls_pending": len(self.pending),
            "messages": self.messages,
        }
