"""What the VMBus server keeps per offer, per GPADL and per remote guest.

:class:`ChannelHandle` is the device side's handle on one offer (its channel id, open state,
open request and channel); :class:`ServerGpadl` is one GPADL (its ranges, the memory it was made
over, its owner and how many rings map it); :class:`RemoteGuest` is a guest of the server in
another process. The rules they follow are :mod:`devicehost.vmbus.server`'s; the server is the
only one that changes them.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

import anyio

from devicehost.vmbus.protocol import (
    STATUS_UNSUCCESSFUL,
    GpadlRequest,
    IncomingOffer,
    ModifyRequest,
    OfferChannel,
    OfferKey,
    OfferParams,
    OpenRequest,
    OpenResources,
    RestoreRequest,
    RestoreResult,
    RevokeRequest,
    ServerRequest,
)

if TYPE_CHECKING:
    from devicehost.memory import GuestMemory
    from devicehost.vmbus.channel import RawChannel, Signal
    from devicehost.vmbus.gpadl import MultiPagedRange
    from devicehost.vmbus.server import VmbusServer
    from devicehost.vmbus.serverstate import SavedChannel

__all__ = [
    "ChannelDevice",
    "ChannelHandle",
    "ChannelRequestError",
    "OpenState",
    "Owner",
    "RemoteGuest",
    "ServerGpadl",
]


class ChannelRequestError(Exception):
    """Raised when the server refuses a guest's request; the guest (or the device, for a failed
    open) is to blame. ``status`` is what the guest sees on the wire."""

    def __init__(self, message: str, status: int = STATUS_UNSUCCESSFUL) -> None:
        super().__init__(message)
        self.status = status


class ChannelDevice(Protocol):
    """What the server calls on the device side of one offer."""

    async def open(self, resources: OpenResources) -> None:
        """The guest opened the channel; raise to fail the open."""

    async def close(self) -> None:
        """The channel closes (guest close, or revoke); the host's channel closes after."""

    async def modify(self, request: ModifyRequest) -> int:
        """The guest retargets the interrupt; return a status (0 = success)."""


class RemoteGuest:
    """A guest of the server in another process (a VMBus socket guest): its memory and name.

    Identity is the object: each connection is a new guest, whose GPADL ids start afresh.
    """

    def __init__(self, memory: GuestMemory, name: str) -> None:
        self.memory = memory
        self.name = name

    def __repr__(self) -> str:
        return f"<RemoteGuest {self.name}>"


#: Who made a request: a remote guest, or None for the in-process guest.
Owner = RemoteGuest | None


class OpenState(enum.Enum):
    """Where an offer's channel is in its open/close cycle."""

    CLOSED = "closed"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"


class ServerGpadl:
    """A GPADL: its request, its parsed ranges, the memory and guest it belongs to, and how many
    rings map it."""

    def __init__(self, request: GpadlRequest, ranges: MultiPagedRange, channel_id: int,
                 memory: GuestMemory, owner: Owner) -> None:
        self.request = request
        self.ranges = ranges
        self.channel_id = channel_id
        #: The memory the GPADL's pages are in, and the guest that created it.
        self.memory = memory
        self.owner = owner
        self.map_count = 0
        self.teardown_requested = False
        self.unmapped: anyio.Event | None = None

    @property
    def key(self) -> tuple[Owner, int]:
        return (self.owner, self.request.id)

    def unmap(self) -> None:
        self.map_count -= 1
        if self.map_count == 0 and self.unmapped is not None:
            self.unmapped.set()


class ChannelHandle:
    """The device side's handle on one offer."""

    def __init__(self, server: VmbusServer, params: OfferParams, device: ChannelDevice,
                 channel_id: int) -> None:
        self.server = server
        self.params = params
        self.device = device
        self._assign(channel_id)
        self.state = OpenState.CLOSED
        self.open_request: OpenRequest | None = None
        self.channel: RawChannel | None = None
        self.gpadl_id: int | None = None
        #: The ring GPADL the open channel maps (it says whose memory and which guest).
        self._ring: ServerGpadl | None = None
        #: The guest's end of the channel's signal while open (the client picks it up).
        self.guest_signal: Signal | None = None
        self._host_signal: Signal | None = None
        self._saved: SavedChannel | None = None

    def _assign(self, channel_id: int) -> None:
        """(Re)offer under ``channel_id``: a fresh offer with a fresh revoke notification."""
        self.channel_id = channel_id
        self.offer = OfferChannel.for_params(self.params, channel_id)
        self.revoked = False
        self.revoked_event = anyio.Event()

    @property
    def key(self) -> OfferKey:
        return self.params.key

    @property
    def is_open(self) -> bool:
        return self.state is OpenState.OPEN

    @property
    def open_resources(self) -> OpenResources | None:
        """The resources of the open channel (None while closed)."""
        if self.channel is None or self.open_request is None or self._ring is None:
            return None
        return OpenResources(self.channel, self._ring.memory, self.open_request)

    def incoming_offer(self) -> IncomingOffer:
        return IncomingOffer(self.offer, self.params.interface_name, self.revoked_event)

    async def request(self, request: ServerRequest) -> RestoreResult | None:
        """Dispatch a :class:`ServerRequest` (Restore or Revoke)."""
        if isinstance(request, RestoreRequest):
            return await self.restore(request.was_open)
        if isinstance(request, RevokeRequest):
            await self.revoke()
            return None
        raise TypeError(f"not a server request: {request!r}")

    async def revoke(self) -> None:
        """Revoke the offer: subchannels first, open channels closed, GPADLs dropped."""
        await self.server._revoke(self)

    async def restore(self, was_open: bool) -> RestoreResult:
        """Restore this offer's saved server state; see the module docstring."""
        return await self.server._restore_channel(self, was_open)

    def rebuild_channel(self) -> OpenResources:
        """Build a fresh host channel over the open channel's ring (same pages, same guest
        signal), for a device whose runner is being rebuilt by ``restore_open``."""
        if self.state is not OpenState.OPEN or self.open_request is None or self._ring is None:
            raise ChannelRequestError(f"channel {self.channel_id} is not open")
        gpadl = self._ring
        assert self._host_signal is not None
        self.channel = self.server._ring_channel(
            gpadl, self.open_request.open_data.ring_offset, self._host_signal
        )
        return OpenResources(self.channel, gpadl.memory, self.open_request)

    def __repr__(self) -> str:
        return f"<ChannelHandle {self.key} id={self.channel_id} {self.state.value}>"
