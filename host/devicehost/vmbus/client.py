"""The guest side of the in-process VMBus server: receive offers, create GPADLs, open channels.

A :class:`VmbusClient` does what a guest's VMBus driver does, over the same guest memory as the
server: it allocates ring memory with a :class:`devicehost.memory.DmaAllocator`, describes it to
the server as a GPADL, opens the channel and gets its own :class:`RawChannel` over those pages —
reading the ring the host writes and writing the ring the host reads. The intercept plugin and
the test kit drive channels with it.

Ring layout of :meth:`VmbusClient.open` (``ring_pages`` data pages per direction)::

    pages [0, 1 + ring_pages)                 guest -> host ring (control page + data)
    pages [1 + ring_pages, 2 + 2 * ring_pages) host -> guest ring; ring_offset = 1 + ring_pages

Refused requests raise :class:`devicehost.vmbus.server.ChannelRequestError` (the server's answer,
with the status a guest would see). After an offer is revoked, the server has already closed the
channel and dropped its GPADLs; :meth:`ClientChannel.close` then only frees the ring memory.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from devicehost.memory import PAGE_SIZE, DmaAllocator, DmaBlock, GuestMemory
from devicehost.vmbus.channel import RawChannel
from devicehost.vmbus.pipe import BytePipe, MessagePipe
from devicehost.vmbus.protocol import (
    USER_DEFINED_SIZE,
    ChannelRequest,
    CloseRequest,
    GpadlChannelRequest,
    GpadlRequest,
    IncomingOffer,
    ModifyChannelRequest,
    ModifyRequest,
    OpenChannelRequest,
    OpenData,
    OpenRequest,
    TeardownGpadlRequest,
)
from devicehost.vmbus.ring import IncomingRing, OutgoingRing, RingMemory
from devicehost.vmbus.server import ChannelRequestError, VmbusServer

__all__ = ["DEFAULT_RING_PAGES", "ChannelOwner", "ClientChannel", "VmbusClient"]

log = logging.getLogger("devicehost.vmbus.client")

#: Data pages per ring direction by default: 4 (16 KiB), enough for a 12 KiB pipe message.
DEFAULT_RING_PAGES = 4


class ChannelOwner(Protocol):
    """The guest that opened a :class:`ClientChannel` (in process or over the VMBus socket)."""

    async def close(self, channel: ClientChannel) -> None:
        """Close ``channel``, tear its GPADL down and free its ring memory."""


class ClientChannel:
    """An open channel as the guest holds it: its offer, ring memory, GPADL and raw channel.

    ``client`` is the guest that opened it: a :class:`VmbusClient` in process, or a
    :class:`devicehost.vmbus.socketclient.SocketVmbusClient` over the VMBus socket.
    """

    def __init__(self, client: ChannelOwner, offer: IncomingOffer, block: DmaBlock,
                 gpadl_id: int, ring_offset: int, channel: RawChannel) -> None:
        self.client = client
        self.offer = offer
        self.block = block
        self.gpadl_id = gpadl_id
        self.ring_offset = ring_offset
        self.channel = channel
        self.is_open = True

    @property
    def channel_id(self) -> int:
        return self.offer.channel_id

    @property
    def revoked(self) -> bool:
        return self.offer.revoked is not None and self.offer.revoked.is_set()

    def message_pipe(self, *, raw: bool = False) -> MessagePipe:
        return MessagePipe(self.channel, raw=raw)

    def byte_pipe(self) -> BytePipe:
        return BytePipe(self.channel)

    async def close(self) -> None:
        """Close the channel, tear its GPADL down and free its ring memory (idempotent)."""
        await self.client.close(self)

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<ClientChannel {self.offer.offer.key} id={self.channel_id} {state}>"


class VmbusClient:
    """A guest's view of ``server``: offers in, requests out; ring memory from ``allocator``."""

    def __init__(self, server: VmbusServer, allocator: DmaAllocator | None = None, *,
                 see_hidden: bool = False) -> None:
        self.server = server
        self.memory: GuestMemory = server.memory
        self.allocator = allocator if allocator is not None else DmaAllocator(server.memory)
        #: Whether this client also receives offers hidden for an intercept relay.
        self.see_hidden = see_hidden
        self._offers: MemoryObjectReceiveStream[IncomingOffer] = server.subscribe(
            see_hidden=see_hidden)
        self.known: dict[int, IncomingOffer] = {}
        self.channels: dict[int, ClientChannel] = {}

    # -- offers ------------------------------------------------------------------------------------

    @property
    def offers(self) -> MemoryObjectReceiveStream[IncomingOffer]:
        """Every offer the server makes, current ones first (an async iterator)."""
        return self._offers

    def _drain(self) -> None:
        self._drain_into(self.known)

    async def wait_offer(self, match: Callable[[IncomingOffer], bool]) -> IncomingOffer:
        """The first live offer (already received or arriving) for which ``match`` is true."""
        while True:
            self._drain()
            for offer in self.known.values():
                if match(offer) and not (offer.revoked is not None and offer.revoked.is_set()):
                    return offer
            offer = await self._offers.receive()
            self.known[offer.channel_id] = offer

    # -- requests ----------------------------------------------------------------------------------

    async def request(self, channel_id: int, request: ChannelRequest) -> None:
        """Send a raw channel request (opens go through :meth:`open`)."""
        if isinstance(request, OpenChannelRequest):
            raise ValueError("open a channel with VmbusClient.open")
        await self.server.request(channel_id, request)

    async def create_gpadl(self, channel_id: int, pfns: Sequence[int], gpadl_id: int,
                           byte_count: int | None = None) -> None:
        """Describe ``pfns`` (one range at offset 0) to the server as GPADL ``gpadl_id``."""
        count = len(pfns) * PAGE_SIZE if byte_count is None else byte_count
        buf = (count, *pfns)
        await self.server.request(channel_id, GpadlChannelRequest(GpadlRequest(gpadl_id, 1, buf)))

    async def teardown_gpadl(self, channel_id: int, gpadl_id: int) -> None:
        await self.server.request(channel_id, TeardownGpadlRequest(gpadl_id))

    async def modify(self, channel: ClientChannel, target_vp: int) -> None:
        request = ModifyChannelRequest(ModifyRequest(target_vp))
        await self.server.request(channel.channel_id, request)

    async def open(
        self,
        offer: IncomingOffer,
        *,
        ring_pages: int = DEFAULT_RING_PAGES,
        target_vp: int | None = 0,
        user_data: bytes = bytes(USER_DEFINED_SIZE),
        gpadl_id: int | None = None,
        event_flag: int = 0,
        connection_id: int = 0,
    ) -> ClientChannel:
        """Allocate rings, create their GPADL and open ``offer``'s channel.

        ``gpadl_id`` defaults to the page number of the block's second page (as the upstream
        intercept device does). On any failure the GPADL is torn down and the memory freed.
        """
        if ring_pages < 1:
            raise ValueError("a ring needs at least one data page")
        channel_id = offer.channel_id
        if channel_id in self.channels:
            raise ValueError(f"channel {channel_id} is already open")
        block = self.allocator.alloc(2 * (1 + ring_pages))
        ring_offset = 1 + ring_pages
        gpadl = (block.pfns[1] if gpadl_id is None else gpadl_id) & 0xFFFFFFFF
        try:
            await self.create_gpadl(channel_id, block.pfns, gpadl)
        except BaseException:
            self.allocator.free(block)
            raise
        # Like a guest, set the rings up before asking the host to open.
        outgoing = OutgoingRing(RingMemory.from_pages(self.memory, block.pfns[:ring_offset]))
        incoming = IncomingRing(RingMemory.from_pages(self.memory, block.pfns[ring_offset:]))
        data = OpenData(ring_offset=ring_offset, ring_gpadl_id=gpadl, target_vp=target_vp,
                        event_flag=event_flag, connection_id=connection_id, user_data=user_data)
        try:
            signal = await self.server.request(channel_id, OpenChannelRequest(OpenRequest(data)))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._release(channel_id, gpadl, block)
            raise
        assert signal is not None
        channel = ClientChannel(self, offer, block, gpadl, ring_offset,
                                RawChannel(incoming, outgoing, signal))
        self.channels[channel_id] = channel
        return channel

    async def _release(self, channel_id: int, gpadl_id: int, block: DmaBlock) -> None:
        try:
            await self.teardown_gpadl(channel_id, gpadl_id)
        except ChannelRequestError as exc:
            # Revoked: the server dropped the GPADL already. Anything else: the server may still
            # map the pages, so they stay in use for good.
            offer = self.known.get(channel_id)
            if offer is None or offer.revoked is None or not offer.revoked.is_set():
                log.warning("GPADL %#x teardown failed (%s); leaking its pages", gpadl_id, exc)
                self.allocator.leak(block)
                return
        self.allocator.free(block)

    async def close(self, channel: ClientChannel) -> None:
        """Close ``channel``, tear its GPADL down and free its ring memory (idempotent)."""
        if not channel.is_open:
            return
        channel.is_open = False
        self.channels.pop(channel.channel_id, None)
        with anyio.CancelScope(shield=True):
            if not channel.revoked:
                try:
                    await self.server.request(channel.channel_id, CloseRequest())
                except ChannelRequestError as exc:
                    log.info("close of channel %d refused: %s", channel.channel_id, exc)
            channel.channel.close()
            await self._release(channel.channel_id, channel.gpadl_id, channel.block)

    async def reconnect(self, server: VmbusServer) -> None:
        """Continue with ``server``, restored from the state of the one this client used.

        Open channels keep their ring memory and pick up their new signal ends; offers the new
        server no longer makes are marked revoked.
        """
        self._offers.close()
        self.server = server
        self._offers = server.subscribe(see_hidden=self.see_hidden)
        fresh: dict[int, IncomingOffer] = {}
        self._drain_into(fresh)
        for channel_id, old in self.known.items():
            new = fresh.get(channel_id)
            gone = new is None or new.offer.key != old.offer.key
            if gone and old.revoked is not None:
                old.revoked.set()
        self.known = fresh
        for channel_id, channel in list(self.channels.items()):
            new = fresh.get(channel_id)
            if new is None or new.offer.key != channel.offer.offer.key:
                channel.is_open = False
                channel.channel.close()
                del self.channels[channel_id]
                continue
            signal = server.guest_signal(channel_id)
            channel.offer = new
            channel.channel = RawChannel(channel.channel.incoming, channel.channel.outgoing,
                                         signal)

    def _drain_into(self, target: dict[int, IncomingOffer]) -> None:
        while True:
            try:
                offer = self._offers.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            target[offer.channel_id] = offer

    async def aclose(self) -> None:
        """Close every open channel and stop receiving offers."""
        for channel in list(self.channels.values()):
            await channel.close()
        self._offers.close()

    @asynccontextmanager
    async def opened(
        self, offer: IncomingOffer, *, ring_pages: int = DEFAULT_RING_PAGES
    ) -> AsyncIterator[ClientChannel]:
        """``open`` for the duration of a block, closed (and its memory freed) after it."""
        channel = await self.open(offer, ring_pages=ring_pages)
        try:
            yield channel
        finally:
            await channel.close()

