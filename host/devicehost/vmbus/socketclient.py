"""The guest side of a VMBus socket: drive a running host's VMBus devices from another process.

:meth:`SocketVmbusClient.connect` connects to a host's ``[host] vmbus_socket``, makes the guest's
memory (a memfd sealed against shrinking, handed to the host with MEMORY_TABLE), negotiates a
version (highest first, as a guest's VMBus driver does), and asks for the offers. Then, as
:class:`devicehost.vmbus.client.VmbusClient` does in process, it allocates ring pages, describes
them as a GPADL, opens a channel and gives the same
:class:`~devicehost.vmbus.client.ClientChannel` whose :class:`RawChannel` reads and writes the
shared rings; only interrupts (an eventfd and a pipe per channel) and control
messages cross the socket. Anything that takes a message pipe (``VmbfsClient``) works over it::

    async with SocketVmbusClient.connect("/run/devicehost/vmbus.sock") as bus:
        offer = await bus.wait_offer(lambda o: o.offer.interface_id == VMBFS_INTERFACE)
        async with bus.opened(offer) as channel:
            data = await VmbfsClient(channel.message_pipe()).read_file("/imc.hiv")

Ring layout of :meth:`SocketVmbusClient.open` (``ring_pages`` data pages per direction), as the
in-process client: pages ``[0, 1 + ring_pages)`` are the guest-to-host ring, the rest the
host-to-guest ring, ``ring_offset = 1 + ring_pages``. The host is untrusted too: every message
from it is decoded with :func:`~devicehost.vmbus.messages.decode_message_untrusted`; a bad one
ends the connection (:class:`SocketClientError`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
import anyio.abc

from devicehost.fds import fd_kind
from devicehost.memory import PAGE_SIZE, DmaAllocator, DmaBlock, GuestMemory, MemoryRegion
from devicehost.vmbus.channel import EventfdSignal, RawChannel
from devicehost.vmbus.client import ClientChannel
from devicehost.vmbus.controlsocket import ControlSocket, ControlSocketError, close_fds
from devicehost.vmbus.messages import (
    GPADL_BODY_MAX_WORDS,
    GPADL_HEADER_MAX_WORDS,
    SUPPORTED_VERSIONS,
    AllOffersDelivered,
    CloseChannel,
    GpadlBody,
    GpadlCreated,
    GpadlHeader,
    GpadlTeardown,
    GpadlTorndown,
    InitiateContact,
    MemoryRegionEntry,
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
    USER_DEFINED_SIZE,
    VP_INDEX_DISABLE_INTERRUPT,
    IncomingOffer,
    VmbusProtocolError,
)
from devicehost.vmbus.ring import IncomingRing, OutgoingRing, RingMemory

__all__ = [
    "DEFAULT_MEMORY_SIZE",
    "PipeWaitSignal",
    "SocketClientError",
    "SocketVmbusClient",
    "sealed_memory",
]

log = logging.getLogger("devicehost.vmbus.socketclient")

#: Guest memory a client makes by default: room for many channels' rings.
DEFAULT_MEMORY_SIZE: Final = 4 << 20
DEFAULT_RING_PAGES: Final = 4
_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SocketClientError(Exception):
    """Raised when the host refuses a request (``status`` is its status), sends what is not a
    VMBus message, or the connection ends (``status`` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def sealed_memory(size: int, gpa: int = 0, *, seal: bool = True) -> GuestMemory:
    """Guest memory of ``size`` bytes at ``gpa`` in a memfd sealed against shrinking and growing
    (``seal=False``: unsealed, which a host refuses unless it allows unsealed memory)."""
    fd = os.memfd_create("devicehost-socket-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        if seal:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        return GuestMemory([MemoryRegion(gpa, size, fd=fd, owns_fd=True)])
    except BaseException:
        os.close(fd)
        raise


def _takes_fd(message: Message) -> bool:
    """Only a successful OPEN_CHANNEL_RESULT carries an fd (the host-to-guest pipe)."""
    return isinstance(message, OpenResult) and message.status == STATUS_SUCCESS


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class PipeWaitSignal(EventfdSignal):
    """The guest's end of a channel signal: it waits on the read end of the host's pipe and
    writes the guest-to-host eventfd (docs/vmbus-socket.md, "File descriptors")."""

    def _drain(self) -> bool:
        got = False
        while True:
            try:
                chunk = os.read(self.wait_fd, 4096)
            except BlockingIOError:
                return got
            if not chunk:
                # The host closed its end (the channel is gone): a pipe at end of file stays
                # readable, so stop waiting on it for good; waiters see ChannelClosed.
                self.close()
                return True
            got = True
            if len(chunk) < 4096:
                return got


def _pipe_read_end(fds: list[int]) -> int:
    """The host-to-guest pipe of an OPEN_CHANNEL_RESULT (SocketClientError if it is not one)."""
    if len(fds) != 1 or fd_kind(fds[0]) != "fifo":
        raise SocketClientError("the host's OPEN_CHANNEL_RESULT lacks its interrupt pipe")
    fd = fds.pop()
    os.set_blocking(fd, False)
    return fd


class _Reply:
    """One awaited reply from the host (with the fds that came with it)."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.message: Message | None = None
        self.fds: list[int] = []
        self.error: SocketClientError | None = None

    def set(self, message: Message, fds: list[int]) -> None:
        self.message = message
        self.fds = fds
        self.event.set()

    async def wait(self) -> Message:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        assert self.message is not None
        return self.message


class SocketVmbusClient:
    """A guest connected to a VMBus socket; build it with :meth:`connect`."""

    def __init__(self, sock: ControlSocket, memory: GuestMemory, task_group: anyio.abc.TaskGroup
                 ) -> None:
        self.sock = sock
        self.memory = memory
        self.allocator = DmaAllocator(memory)
        self.version: int | None = None
        self.known: dict[int, IncomingOffer] = {}
        self.channels: dict[int, ClientChannel] = {}
        self.closed_reason: str | None = None
        self._tg = task_group
        self._replies: dict[tuple[type[Message], int], _Reply] = {}
        self._offers_changed = anyio.Event()
        self._next_gpadl_id = 1

    # -- connection ------------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        memory: GuestMemory | None = None,
        memory_size: int = DEFAULT_MEMORY_SIZE,
        versions: Sequence[int] = tuple(reversed(SUPPORTED_VERSIONS)),
        request_offers: bool = True,
    ) -> AsyncIterator[SocketVmbusClient]:
        """Connect, hand over ``memory`` (default: :func:`sealed_memory` of ``memory_size``),
        negotiate the first of ``versions`` the host accepts and (``request_offers``) receive
        the offers. Everything is closed (channels, GPADLs, memory) when the block exits."""
        owned = memory is None
        guest_memory = sealed_memory(memory_size) if memory is None else memory
        try:
            sock = await ControlSocket.connect(path)
            try:
                async with anyio.create_task_group() as tg:
                    client = cls(sock, guest_memory, tg)
                    tg.start_soon(client._read_loop)
                    try:
                        await client._contact(versions)
                        if request_offers:
                            await client.request_offers()
                        yield client
                    finally:
                        with anyio.CancelScope(shield=True):
                            await client.aclose()
                        tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The one exception, not a group of one: callers match on what was raised.
                raise _single(group) from None
            finally:
                sock.close()
        finally:
            if owned:
                guest_memory.close()

    async def _contact(self, versions: Sequence[int]) -> None:
        regions = self.memory.regions
        fds = [r.fd for r in regions]
        if any(fd is None for fd in fds):
            raise ValueError("a socket guest's memory must be fd-backed (memfd) regions")
        table = MemoryTable(tuple(MemoryRegionEntry(r.gpa, r.size, r.offset) for r in regions))
        await self.send(table, [fd for fd in fds if fd is not None])
        for version in versions:
            reply = self._expect(VersionResponse, 0)
            await self.send(InitiateContact(version))
            response = await reply.wait()
            assert isinstance(response, VersionResponse)
            if response.version_supported:
                if response.connection_state != 0:
                    raise SocketClientError(
                        f"the host accepted version {version:#010x} but reports connection "
                        f"state {response.connection_state}")
                self.version = version
                return
        raise SocketClientError("the host accepts none of the versions asked for")

    async def request_offers(self) -> list[IncomingOffer]:
        """Ask for the offers; returns them once ALL_OFFERS_DELIVERED arrived. Later offers and
        rescinds keep arriving in :attr:`known`."""
        reply = self._expect(AllOffersDelivered, 0)
        await self.send(RequestOffers())
        await reply.wait()
        return list(self.known.values())

    async def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        """Send one message (with ``fds``) to the host."""
        if self.closed_reason is not None:
            raise SocketClientError(f"the connection is closed: {self.closed_reason}")
        try:
            await self.sock.send(encode_message(message), tuple(fds))
        except OSError as exc:
            raise SocketClientError(f"cannot send to the host: {exc}") from None

    def _expect(self, kind: type[Message], key: int) -> _Reply:
        if (kind, key) in self._replies:
            raise SocketClientError(f"already waiting for {kind.__name__} {key}")
        reply = self._replies[(kind, key)] = _Reply()
        if self.closed_reason is not None:
            reply.error = SocketClientError(f"the connection is closed: {self.closed_reason}")
            reply.event.set()
        return reply

    async def _read_loop(self) -> None:
        reason = "the host closed the connection"
        try:
            while True:
                try:
                    data, fds = await self.sock.receive()
                except ControlSocketError as exc:
                    reason = f"the host broke the framing: {exc}"
                    break
                if not data:
                    break
                try:
                    message = decode_message_untrusted(data, self.version)
                except VmbusProtocolError as exc:
                    close_fds(fds)
                    reason = f"the host sent a bad message: {exc}"
                    break
                if fds and not _takes_fd(message):
                    close_fds(fds)
                    reason = f"the host sent fds with {type(message).__name__}"
                    break
                self._dispatch(message, fds)
        finally:
            self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        self.closed_reason = reason
        for channel in self.channels.values():
            channel.channel.close()  # its waiters see ChannelClosed (a pipe: ConnectionReset)
        for reply in self._replies.values():
            reply.error = SocketClientError(f"the connection is closed: {reason}")
            reply.event.set()
        self._replies.clear()
        self._offers_changed.set()

    def _answer(self, kind: type[Message], key: int, message: Message,
                fds: list[int] | None = None) -> None:
        reply = self._replies.pop((kind, key), None)
        if reply is None:
            log.warning("unexpected %s from the host", type(message).__name__)
            close_fds(fds or [])
            return
        reply.set(message, fds or [])

    def _dispatch(self, message: Message, fds: list[int]) -> None:
        if isinstance(message, OfferChannelMessage):
            offer = IncomingOffer(message.offer, revoked=anyio.Event())
            self.known[offer.channel_id] = offer
            self._offers_changed.set()
            self._offers_changed = anyio.Event()
        elif isinstance(message, RescindChannelOffer):
            self._rescind(message.channel_id)
        elif isinstance(message, VersionResponse | AllOffersDelivered | UnloadComplete):
            self._answer(type(message), 0, message)
        elif isinstance(message, GpadlCreated | GpadlTorndown):
            self._answer(type(message), message.gpadl_id, message)
        elif isinstance(message, OpenResult):
            self._answer(OpenResult, message.channel_id, message, fds)
        elif isinstance(message, ModifyChannelResponse):
            self._answer(type(message), message.channel_id, message)
        else:
            log.warning("the host sent %s, which a host never sends", type(message).__name__)

    def _rescind(self, channel_id: int) -> None:
        offer = self.known.pop(channel_id, None)
        if offer is not None and offer.revoked is not None:
            offer.revoked.set()
        self._offers_changed.set()
        self._offers_changed = anyio.Event()
        channel = self.channels.get(channel_id)
        if channel is None:
            self._tg.start_soon(self._release_id, channel_id)
        else:
            # The host closed it: waiters see ChannelClosed; close() frees the memory.
            channel.channel.close()

    async def _release_id(self, channel_id: int) -> None:
        with contextlib.suppress(SocketClientError):
            await self.send(RelIdReleased(channel_id))

    # -- offers ----------------------------------------------------------------------------------

    async def wait_offer(self, match: Callable[[IncomingOffer], bool]) -> IncomingOffer:
        """The first live offer (already received or arriving) for which ``match`` is true."""
        while True:
            for offer in self.known.values():
                if match(offer):
                    return offer
            if self.closed_reason is not None:
                raise SocketClientError(f"the connection is closed: {self.closed_reason}")
            await self._offers_changed.wait()

    # -- GPADLs and channels ---------------------------------------------------------------------

    def new_gpadl_id(self) -> int:
        gpadl_id = self._next_gpadl_id
        self._next_gpadl_id = (gpadl_id + 1) & 0xFFFFFFFF or 1
        return gpadl_id

    async def create_gpadl(self, channel_id: int, words: Sequence[int], gpadl_id: int,
                           count: int = 1) -> None:
        """Send GPADL ``gpadl_id`` (range buffer ``words``, ``count`` ranges) as GPADL_HEADER and
        GPADL_BODY messages; SocketClientError with the host's status if it is refused."""
        data = b"".join(w.to_bytes(8, "little") for w in words)
        reply = self._expect(GpadlCreated, gpadl_id)
        first = 8 * GPADL_HEADER_MAX_WORDS
        await self.send(GpadlHeader(channel_id, gpadl_id, len(data), count, data[:first]))
        for start in range(first, len(data), 8 * GPADL_BODY_MAX_WORDS):
            await self.send(GpadlBody(gpadl_id, data[start:start + 8 * GPADL_BODY_MAX_WORDS]))
        created = await reply.wait()
        assert isinstance(created, GpadlCreated)
        if created.status != STATUS_SUCCESS:
            raise SocketClientError(f"the host refused GPADL {gpadl_id:#x}", created.status)

    async def teardown_gpadl(self, channel_id: int, gpadl_id: int) -> None:
        reply = self._expect(GpadlTorndown, gpadl_id)
        await self.send(GpadlTeardown(channel_id, gpadl_id))
        await reply.wait()

    async def open(self, offer: IncomingOffer, *, ring_pages: int = DEFAULT_RING_PAGES,
                   target_vp: int | None = 0, user_data: bytes = bytes(USER_DEFINED_SIZE)
                   ) -> ClientChannel:
        """Allocate rings, create their GPADL and open ``offer``'s channel. On failure the
        GPADL is torn down and the memory freed."""
        if ring_pages < 1:
            raise ValueError("a ring needs at least one data page")
        channel_id = offer.channel_id
        if channel_id in self.channels:
            raise ValueError(f"channel {channel_id} is already open")
        block = self.allocator.alloc(2 * (1 + ring_pages))
        ring_offset = 1 + ring_pages
        gpadl_id = self.new_gpadl_id()
        try:
            await self.create_gpadl(channel_id, (len(block.pfns) * PAGE_SIZE, *block.pfns),
                                    gpadl_id)
        except BaseException:
            self.allocator.free(block)
            raise
        outgoing = OutgoingRing(RingMemory.from_pages(self.memory, block.pfns[:ring_offset]))
        incoming = IncomingRing(RingMemory.from_pages(self.memory, block.pfns[ring_offset:]))
        to_host = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vp = VP_INDEX_DISABLE_INTERRUPT if target_vp is None else target_vp
        reply = self._expect(OpenResult, channel_id)
        try:
            await self.send(OpenChannel(channel_id, channel_id, gpadl_id, vp, ring_offset,
                                        user_data), [to_host])
            result = await reply.wait()
            assert isinstance(result, OpenResult)
            if result.status != STATUS_SUCCESS:
                raise SocketClientError(f"the host refused to open channel {channel_id}",
                                        result.status)
            to_guest = _pipe_read_end(reply.fds)
            signal = PipeWaitSignal(to_guest, to_host, owns_fds=True)
        except BaseException:
            os.close(to_host)
            close_fds(reply.fds)
            with anyio.CancelScope(shield=True):
                await self._release(channel_id, gpadl_id, block)
            raise
        channel = ClientChannel(self, offer, block, gpadl_id, ring_offset,
                                RawChannel(incoming, outgoing, signal))
        self.channels[channel_id] = channel
        return channel

    async def _release(self, channel_id: int, gpadl_id: int, block: DmaBlock) -> None:
        try:
            await self.teardown_gpadl(channel_id, gpadl_id)
        except SocketClientError as exc:
            # The host may still map the pages: they stay in use for good.
            log.warning("GPADL %#x teardown failed (%s); leaking its pages", gpadl_id, exc)
            self.allocator.leak(block)
            return
        self.allocator.free(block)

    async def close(self, channel: ClientChannel) -> None:
        """Close ``channel``, tear its GPADL down and free its ring memory (idempotent). After
        a rescind the host has dropped both already: only the memory is freed and the channel id
        released."""
        if not channel.is_open:
            return
        channel.is_open = False
        self.channels.pop(channel.channel_id, None)
        channel.channel.close()
        with anyio.CancelScope(shield=True):
            if channel.revoked:
                self.allocator.free(channel.block)
                with contextlib.suppress(SocketClientError):
                    await self.send(RelIdReleased(channel.channel_id))
                return
            with contextlib.suppress(SocketClientError):
                await self.send(CloseChannel(channel.channel_id))
            await self._release(channel.channel_id, channel.gpadl_id, channel.block)

    async def modify(self, channel: ClientChannel, target_vp: int) -> int | None:
        """Retarget the channel's interrupt; the host's status from Iron on, else None."""
        reply = None
        if self.version is not None and self.version >= Version.IRON:
            reply = self._expect(ModifyChannelResponse, channel.channel_id)
        await self.send(ModifyChannel(channel.channel_id, target_vp))
        if reply is None:
            return None
        response = await reply.wait()
        assert isinstance(response, ModifyChannelResponse)
        return response.status

    @asynccontextmanager
    async def opened(self, offer: IncomingOffer, *, ring_pages: int = DEFAULT_RING_PAGES
                     ) -> AsyncIterator[ClientChannel]:
        """``open`` for the duration of a block, closed (and its memory freed) after it."""
        channel = await self.open(offer, ring_pages=ring_pages)
        try:
            yield channel
        finally:
            await channel.close()

    async def unload(self) -> None:
        """UNLOAD: the host drops every channel and GPADL of this guest (UNLOAD_COMPLETE)."""
        channels = list(self.channels.values())
        self.channels.clear()
        for channel in channels:
            channel.is_open = False
            channel.channel.close()
        reply = self._expect(UnloadComplete, 0)
        await self.send(Unload())
        await reply.wait()
        for channel in channels:  # the host no longer maps them
            self.allocator.free(channel.block)
        self.version = None
        self.known.clear()

    async def aclose(self) -> None:
        """Close every open channel (while the connection lasts)."""
        for channel in list(self.channels.values()):
            if self.closed_reason is None:
                await channel.close()
            else:
                channel.is_open = False
                channel.channel.close()
        self.channels.clear()

    def inspect(self) -> dict[str, Any]:
        return {
            "version": None if self.version is None else f"{self.version:#010x}",
            "offers": sorted(self.known),
            "channels": sorted(self.channels),
            "closed": self.closed_reason,
        }
