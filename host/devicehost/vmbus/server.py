"""The in-process VMBus server (the ParentBus of facts §5): offers, GPADLs, opens, revokes.

Two sides talk to it:

- the **device side** (a transport) offers a channel with :meth:`VmbusServer.add_child`, passing
  a :class:`ChannelDevice` the server calls when the guest opens, closes or modifies the channel,
  and keeps the returned :class:`ChannelHandle` to revoke the offer or restore it;
- the **guest side** (a :class:`devicehost.vmbus.client.VmbusClient`) subscribes to offers with
  :meth:`VmbusServer.subscribe` and sends :class:`ChannelRequest` values with
  :meth:`VmbusServer.request`.

Rules (what a guest may and may not do):

- Every guest request is validated; a bad one is refused with :class:`ChannelRequestError`
  (carrying the status the guest would see, ``STATUS_UNSUCCESSFUL``) and changes nothing. No
  guest request can raise anything else into the host; a device that fails its open is reported
  to the guest the same way.
- GPADL ids are unique per server; a GPADL belongs to the channel it was created on and every
  page it names must be inside guest memory.
- An open maps its ring GPADL (map count + 1) and builds the host's channel over its pages split
  at ``ring_offset``: pages ``[0, ring_offset)`` are the ring the host reads, ``[ring_offset, n)``
  the ring the host writes. The GPADL must be one range at byte offset 0 of whole pages and
  ``0 < ring_offset < n``. Close unmaps it; a teardown of a mapped GPADL completes only when the
  last map is gone.
- Closing subchannel 0 closes the open subchannels first (highest index first); revoking a
  primary offer revokes its subchannels first. Channel ids are never reused by one server.

Save/restore (facts §5.2, §5.3): :meth:`VmbusServer.save` records every offer's channel id, its
GPADLs and its open request. A fresh server given that state with :meth:`VmbusServer.restore`
*before* the offers are added again hands each re-added offer its old channel id;
:meth:`ChannelHandle.restore` then re-creates the GPADLs and, if the device saved its channel
open, rebuilds the channel over the same ring pages (the rings continue where they were). A
device that could not save its open channel (``was_open=False`` for a channel saved open) is
revoked and offered anew under a new channel id.

Decisions where upstream differs or is silent:

- Revoke: upstream rescinds the offer and waits for the guest to close, tear its GPADLs down and
  release the channel id. Here the server closes the channel and drops its GPADLs itself, then
  sets the offer's ``revoked`` event; the guest only frees its memory. A pending teardown of a
  dropped GPADL completes.
- GPADL ids are unique per guest (as upstream: per guest connection). The in-process guest
  (every :class:`devicehost.vmbus.client.VmbusClient` of this server) is one guest over the
  server's ``memory``; each :class:`RemoteGuest` (a VMBus socket guest) is another, over its own
  memory, passed as ``guest=`` to :meth:`VmbusServer.request`. A GPADL records the memory it was
  created over and the guest that owns it; a channel is open for the guest whose GPADL its ring
  is, and only that guest may close or modify it. A remote guest sees no hidden offer and may not
  use one. :meth:`VmbusServer.disconnect` closes a remote guest's channels and drops its GPADLs.
- A remote guest's GPADLs and opens are not saved: its memory does not survive the host. A live
  handover (:mod:`devicehost.vmbus.handover`) moves them with the guest's memory instead:
  :meth:`VmbusServer.remote_gpadls` and :meth:`VmbusServer.remote_opens` say what the guest has,
  and :meth:`VmbusServer.restore_remote` gives it to the new server, whose offers' restores
  rebuild it (anything that does not fit its channel fails the handover, never half-restores).
- Modify has no device hook: :class:`ChannelDevice.modify` answers it (the transport accepts it,
  since in-process signalling has no virtual processor to retarget).
- A teardown whose requester stops waiting still completes when the ring is closed.
- A saved state is untrusted: a saved open whose ring GPADL is missing or invalid is not
  restored; the offer is revoked and made anew, as for a device that saved nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any, Final

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from devicehost.memory import PAGE_SIZE, GuestMemory, GuestMemoryError
from devicehost.vmbus.channel import RawChannel, Signal, connected_signals, raw_channel_from_rings
from devicehost.vmbus.gpadl import GpaRangeError, MultiPagedRange, decode_gpa_ranges_untrusted
from devicehost.vmbus.guid import Guid
from devicehost.vmbus.handle import (
    ChannelDevice,
    ChannelHandle,
    ChannelRequestError,
    OpenState,
    Owner,
    RemoteGuest,
    ServerGpadl,
)
from devicehost.vmbus.protocol import (
    STATUS_SUCCESS,
    USER_DEFINED_SIZE,
    ChannelRequest,
    CloseRequest,
    GpadlChannelRequest,
    GpadlRequest,
    IncomingOffer,
    ModifyChannelRequest,
    ModifyRequest,
    OfferFlags,
    OfferKey,
    OfferParams,
    OpenChannelRequest,
    OpenData,
    OpenRequest,
    OpenResources,
    RestoredGpadl,
    RestoreResult,
    TeardownGpadlRequest,
)
from devicehost.vmbus.ring import RingError, RingMemory
from devicehost.vmbus.serverstate import SavedChannel, SavedGpadl, SavedOpen, ServerSavedState

__all__ = [
    "ChannelDevice",
    "ChannelHandle",
    "ChannelRequestError",
    "OfferError",
    "RemoteChannelState",
    "RemoteGuest",
    "RemoteOpen",
    "SavedChannel",
    "SavedGpadl",
    "SavedOpen",
    "ServerSavedState",
    "VmbusServer",
]

log = logging.getLogger("devicehost.vmbus.server")

_U16: Final = 0xFFFF
_U32: Final = 0xFFFFFFFF
#: Most u64 words a range buffer may hold (GpadlHeader.len is a u16 byte count).
MAX_GPADL_WORDS: Final = _U16 // 8


@attrs.frozen
class RemoteOpen:
    """A remote guest's open channel, handed over: its open data and the host's signal end."""

    data: OpenData
    signal: Signal


@attrs.frozen
class RemoteChannelState:
    """What a handed-over remote guest has on one channel: its GPADLs and, if open, the open."""

    guest: RemoteGuest
    gpadls: tuple[GpadlRequest, ...]
    open: RemoteOpen | None


class OfferError(Exception):
    """Raised when the device side makes an invalid offer (duplicate key, missing primary)."""


class VmbusServer:
    """An in-process VMBus server over ``memory`` (the guest's memory)."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self._channels: dict[int, ChannelHandle] = {}
        self._by_key: dict[OfferKey, ChannelHandle] = {}
        self._gpadls: dict[tuple[Owner, int], ServerGpadl] = {}
        self._next_channel_id = 1
        self._saved: dict[OfferKey, SavedChannel] = {}
        self._subscribers: list[MemoryObjectSendStream[IncomingOffer]] = []
        # Instance ids whose offers only subscribers that see hidden offers receive (an
        # intercepting relay); every stream listed in _sees_hidden is also in _subscribers.
        self._hidden: set[Guid] = set()
        self._sees_hidden: set[MemoryObjectSendStream[IncomingOffer]] = set()
        #: A handed-over remote guest's GPADLs and opens per channel id, restored with the
        #: channel's offer (:meth:`restore_remote`).
        self._remote_saved: dict[int, RemoteChannelState] = {}

    # -- device side -------------------------------------------------------------------------------

    def add_child(self, params: OfferParams, device: ChannelDevice) -> ChannelHandle:
        """Offer a channel; returns the device side's handle. Raises :class:`OfferError`."""
        key = params.key
        if key in self._by_key:
            raise OfferError(f"offer {key} already exists")
        if params.subchannel_index and OfferKey(key.interface_id, key.instance_id) not in (
            self._by_key
        ):
            raise OfferError(f"subchannel offer {key} has no primary channel offered")
        saved = self._saved.pop(key, None)
        if saved is not None and saved.channel_id not in self._channels:
            channel_id = saved.channel_id
        else:
            saved = None
            channel_id = self._allocate_channel_id()
        handle = ChannelHandle(self, params, device, channel_id)
        handle._saved = saved
        self._register(handle)
        return handle

    def _register(self, handle: ChannelHandle) -> None:
        self._channels[handle.channel_id] = handle
        self._by_key[handle.key] = handle
        self._announce(handle)

    async def _reoffer(self, handle: ChannelHandle) -> None:
        """Revoke the offer and offer it again under a new channel id."""
        await self._revoke(handle)
        handle._assign(self._allocate_channel_id())
        self._register(handle)

    def _allocate_channel_id(self) -> int:
        channel_id = self._next_channel_id
        while channel_id in self._channels or any(
            s.channel_id == channel_id for s in self._saved.values()
        ):
            channel_id += 1
        self._next_channel_id = channel_id + 1
        return channel_id

    def _announce(self, handle: ChannelHandle) -> None:
        offer = handle.incoming_offer()
        for stream in list(self._subscribers):
            if not self._visible(handle, stream):
                continue
            try:
                stream.send_nowait(offer)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(stream)
                self._sees_hidden.discard(stream)

    def handles(self) -> Iterator[ChannelHandle]:
        """Every current offer, in channel id order."""
        return iter(sorted(self._channels.values(), key=lambda h: h.channel_id))

    def handle_for(self, key: OfferKey) -> ChannelHandle | None:
        return self._by_key.get(key)

    def _subchannels(self, handle: ChannelHandle) -> list[ChannelHandle]:
        """Subchannels of a primary offer, highest index first."""
        if handle.key.subchannel_index:
            return []
        subs = [
            h for h in self._channels.values()
            if h.key.subchannel_index
            and (h.key.interface_id, h.key.instance_id)
            == (handle.key.interface_id, handle.key.instance_id)
        ]
        return sorted(subs, key=lambda h: -h.key.subchannel_index)

    async def _revoke(self, handle: ChannelHandle) -> None:
        if handle.revoked:
            return
        for sub in self._subchannels(handle):
            await self._revoke(sub)
        handle.revoked = True
        if handle.state in (OpenState.OPEN, OpenState.CLOSING):
            await self._close(handle)
        for key, gpadl in list(self._gpadls.items()):
            if gpadl.channel_id == handle.channel_id:
                del self._gpadls[key]
                if gpadl.unmapped is not None:
                    gpadl.unmapped.set()
        del self._channels[handle.channel_id]
        del self._by_key[handle.key]
        handle.revoked_event.set()

    # -- guest side --------------------------------------------------------------------------------

    def subscribe(self, *, see_hidden: bool = False) -> MemoryObjectReceiveStream[IncomingOffer]:
        """A stream of every current offer, then of each new offer as it is made.

        Offers of a hidden instance id (:meth:`hide_instance`) reach only streams subscribed
        with ``see_hidden`` (the intercept relay).
        """
        send, receive = anyio.create_memory_object_stream[IncomingOffer](math.inf)
        if see_hidden:
            self._sees_hidden.add(send)
        for handle in self.handles():
            if self._visible(handle, send):
                send.send_nowait(handle.incoming_offer())
        self._subscribers.append(send)
        return receive

    def hide_instance(self, instance_id: Guid) -> None:
        """Announce offers of ``instance_id`` from now on only to streams that see hidden
        offers (an intercept relay claimed them); offers already announced stay announced."""
        self._hidden.add(instance_id)

    def unhide_instance(self, instance_id: Guid) -> None:
        """Announce offers of ``instance_id`` to every subscriber again."""
        self._hidden.discard(instance_id)

    def _visible(self, handle: ChannelHandle, stream: MemoryObjectSendStream[IncomingOffer]
                 ) -> bool:
        return handle.key.instance_id not in self._hidden or stream in self._sees_hidden

    async def request(self, channel_id: int, request: ChannelRequest, *,
                      guest: RemoteGuest | None = None, signal: Signal | None = None
                      ) -> Signal | None:
        """Carry out a guest's request on channel ``channel_id``.

        ``guest``: the remote guest making it (None: the in-process guest); an open of a remote
        guest needs ``signal``, the host's end of the channel signal, which the server owns from
        then on (it closes it when the open fails or the channel closes).
        Returns the in-process guest's end of the channel signal for its open, else None. Raises
        :class:`ChannelRequestError` (and only that) when the request is refused.
        """
        handle = self._channels.get(channel_id) if isinstance(channel_id, int) else None
        if handle is None or handle.revoked or (
            guest is not None and handle.key.instance_id in self._hidden
        ):
            if signal is not None:
                signal.close()
            raise ChannelRequestError(f"channel {channel_id!r} is not offered")
        try:
            return await self._dispatch(handle, request, guest, signal)
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            # A request whose fields are not even of the right types: refused like any other.
            raise ChannelRequestError(f"malformed {type(request).__name__}: {exc}") from exc

    async def _dispatch(self, handle: ChannelHandle, request: ChannelRequest, guest: Owner,
                        signal: Signal | None) -> Signal | None:
        channel_id = handle.channel_id
        if isinstance(request, OpenChannelRequest):
            return await self._open(handle, request.request, guest, signal)
        if signal is not None:
            signal.close()
        if isinstance(request, GpadlChannelRequest):
            self._create_gpadl(handle, request.request, guest)
        elif isinstance(request, TeardownGpadlRequest):
            await self._teardown_gpadl(handle, request.id, guest)
        elif isinstance(request, CloseRequest):
            if handle.state is not OpenState.OPEN:
                raise ChannelRequestError(
                    f"channel {channel_id} cannot close while {handle.state.value}"
                )
            self._check_opener(handle, guest)
            await self._close(handle)
        elif isinstance(request, ModifyChannelRequest):
            if handle.state is OpenState.OPEN:
                self._check_opener(handle, guest)
            await self._modify(handle, request.request)
        else:
            raise ChannelRequestError(f"unknown channel request {type(request).__name__}")
        return None

    def _check_opener(self, handle: ChannelHandle, guest: Owner) -> None:
        if handle._ring is not None and handle._ring.owner is not guest:
            raise ChannelRequestError(f"channel {handle.channel_id} was opened by another guest")

    async def disconnect(self, guest: RemoteGuest) -> None:
        """A remote guest is gone: close the channels it opened (subchannels first) and drop
        its GPADLs (pending teardowns complete). Nothing of it remains afterwards."""
        for handle in sorted(self._channels.values(), key=lambda h: -h.key.subchannel_index):
            ring = handle._ring
            if ring is not None and ring.owner is guest and handle.state is OpenState.OPEN:
                await self._close(handle)
        for key, gpadl in list(self._gpadls.items()):
            if gpadl.owner is guest:
                del self._gpadls[key]
                if gpadl.unmapped is not None:
                    gpadl.unmapped.set()

    def guest_signal(self, channel_id: int) -> Signal:
        """The guest's end of open channel ``channel_id``'s signal (e.g. after a restore)."""
        handle = self._channels.get(channel_id)
        if handle is None or handle.guest_signal is None or not handle.is_open:
            raise ChannelRequestError(f"channel {channel_id} is not open")
        return handle.guest_signal

    # -- GPADLs ------------------------------------------------------------------------------------

    def _parse_gpadl(self, request: GpadlRequest, memory: GuestMemory, owner: Owner
                     ) -> MultiPagedRange:
        if not 0 <= request.id <= _U32:
            raise ChannelRequestError(f"GPADL id {request.id!r} is not a u32")
        if (owner, request.id) in self._gpadls:
            raise ChannelRequestError(f"GPADL id {request.id:#x} is already in use")
        if not 1 <= request.count <= _U16:
            raise ChannelRequestError(f"GPADL range count {request.count!r} is not 1..65535")
        if len(request.buf) > MAX_GPADL_WORDS:
            raise ChannelRequestError(
                f"GPADL range buffer has {len(request.buf)} words, at most {MAX_GPADL_WORDS}"
            )
        try:
            ranges = decode_gpa_ranges_untrusted(request.buf, request.count)
        except (GpaRangeError, ValueError, TypeError) as exc:
            raise ChannelRequestError(f"GPADL {request.id:#x}: {exc}") from exc
        for paged in ranges.ranges:
            for gpa, length in paged.segments():
                try:
                    memory.view(gpa, length)
                except GuestMemoryError as exc:
                    raise ChannelRequestError(
                        f"GPADL {request.id:#x} names memory outside the guest: {exc}"
                    ) from exc
        return ranges

    def _create_gpadl(self, handle: ChannelHandle, request: GpadlRequest, owner: Owner = None
                      ) -> None:
        memory = self.memory if owner is None else owner.memory
        ranges = self._parse_gpadl(request, memory, owner)
        self._gpadls[(owner, request.id)] = ServerGpadl(request, ranges, handle.channel_id, memory,
                                                   owner)

    def _channel_gpadl(self, handle: ChannelHandle, gpadl_id: int, owner: Owner = None
                       ) -> ServerGpadl:
        gpadl = self._gpadls.get((owner, gpadl_id)) if isinstance(gpadl_id, int) else None
        if gpadl is None or gpadl.channel_id != handle.channel_id:
            raise ChannelRequestError(
                f"GPADL {gpadl_id!r} does not exist on channel {handle.channel_id}"
            )
        return gpadl

    async def _teardown_gpadl(self, handle: ChannelHandle, gpadl_id: int, owner: Owner) -> None:
        gpadl = self._channel_gpadl(handle, gpadl_id, owner)
        if gpadl.teardown_requested:
            raise ChannelRequestError(f"GPADL {gpadl_id:#x} is already being torn down")
        gpadl.teardown_requested = True
        if gpadl.map_count:
            # Deferred: completes when the ring that maps it is closed.
            gpadl.unmapped = anyio.Event()
            await gpadl.unmapped.wait()
        if self._gpadls.get(gpadl.key) is gpadl:
            del self._gpadls[gpadl.key]

    # -- open / close / modify ---------------------------------------------------------------------

    def _ring_channel(self, gpadl: ServerGpadl, ring_offset: int, signal: Signal) -> RawChannel:
        """The host's channel over a ring GPADL split at ``ring_offset`` (ChannelRequestError)."""
        ranges = gpadl.ranges.ranges
        if len(ranges) != 1:
            raise ChannelRequestError(f"ring GPADL {gpadl.request.id:#x} must be one range")
        (paged,) = ranges
        if paged.byte_offset != 0 or paged.byte_count % PAGE_SIZE:
            raise ChannelRequestError(
                f"ring GPADL {gpadl.request.id:#x} must be whole pages at offset 0"
            )
        pfns = paged.gpns
        if not 0 < ring_offset < len(pfns):
            raise ChannelRequestError(
                f"ring offset {ring_offset} is outside the GPADL's {len(pfns)} pages"
            )
        try:
            incoming = RingMemory.from_pages(gpadl.memory, pfns[:ring_offset])
            outgoing = RingMemory.from_pages(gpadl.memory, pfns[ring_offset:])
            return raw_channel_from_rings(incoming, outgoing, signal)
        except RingError as exc:
            raise ChannelRequestError(f"ring GPADL {gpadl.request.id:#x}: {exc}") from exc

    def _check_open_data(self, data: OpenData) -> None:
        if data.target_vp is not None and not 0 <= data.target_vp <= _U32:
            raise ChannelRequestError(f"target_vp {data.target_vp!r} is not a u32")
        if not 0 <= data.event_flag <= _U16 or not 0 <= data.connection_id <= _U32:
            raise ChannelRequestError("event_flag or connection_id out of range")
        if len(data.user_data) != USER_DEFINED_SIZE:
            raise ChannelRequestError("open user data must be 120 bytes")

    def _negotiate(self, handle: ChannelHandle, request: OpenRequest) -> OpenRequest:
        flags = handle.offer.flags
        return OpenRequest(
            request.open_data,
            use_confidential_ring=request.use_confidential_ring
            and OfferFlags.CONFIDENTIAL_RING_BUFFER in flags,
            use_confidential_external_memory=request.use_confidential_external_memory
            and OfferFlags.CONFIDENTIAL_EXTERNAL_MEMORY in flags,
            is_external_memory_pinned=request.is_external_memory_pinned
            and OfferFlags.REQUIRE_PINNED_EXTERNAL_MEMORY in flags,
        )

    async def _open(self, handle: ChannelHandle, request: OpenRequest, guest: Owner,
                    signal: Signal | None) -> Signal | None:
        try:
            if handle.state is not OpenState.CLOSED:
                raise ChannelRequestError(
                    f"channel {handle.channel_id} cannot open while {handle.state.value}"
                )
            data = request.open_data
            self._check_open_data(data)
            gpadl = self._channel_gpadl(handle, data.ring_gpadl_id, guest)
            if gpadl.teardown_requested:
                raise ChannelRequestError(f"GPADL {data.ring_gpadl_id:#x} is being torn down")
            host_signal: Signal
            guest_signal: Signal | None
            if guest is None:
                host_signal, guest_signal = connected_signals()
            elif signal is None:
                raise ChannelRequestError("a remote guest's open needs the host's signal end")
            else:
                host_signal, guest_signal = signal, None
            channel = self._ring_channel(gpadl, data.ring_offset, host_signal)
        except BaseException:
            if signal is not None:
                signal.close()
            raise
        request = self._negotiate(handle, request)
        gpadl.map_count += 1
        handle.state = OpenState.OPENING
        handle.open_request, handle.channel, handle.gpadl_id = request, channel, gpadl.request.id
        handle._ring = gpadl
        try:
            await handle.device.open(OpenResources(channel, gpadl.memory, request))
        except Exception as exc:
            log.warning("device of %s failed to open: %s", handle.key, exc)
            self._drop_open(handle)
            host_signal.close()
            raise ChannelRequestError(f"the device failed to open: {exc}") from exc
        except BaseException:
            self._drop_open(handle)
            host_signal.close()
            raise
        if handle.revoked:
            # Revoked while the device was opening: undo the open.
            await self._close(handle)
            raise ChannelRequestError(f"channel {handle.channel_id} was revoked while opening")
        handle.state = OpenState.OPEN
        handle._host_signal, handle.guest_signal = host_signal, guest_signal
        return guest_signal

    def _drop_open(self, handle: ChannelHandle) -> None:
        gpadl = handle._ring
        if gpadl is not None and self._gpadls.get(gpadl.key) is gpadl:
            gpadl.unmap()
            if gpadl.map_count == 0 and gpadl.teardown_requested:
                # The deferred teardown completes now, even if its requester stopped waiting.
                del self._gpadls[gpadl.key]
        if handle.channel is not None:
            handle.channel.close()
        handle.state = OpenState.CLOSED
        handle.open_request = handle.channel = handle.gpadl_id = handle._ring = None
        handle.guest_signal = handle._host_signal = None

    async def _close(self, handle: ChannelHandle) -> None:
        if not handle.key.subchannel_index:
            for sub in self._subchannels(handle):
                if sub.state is OpenState.OPEN:
                    await self._close(sub)
        handle.state = OpenState.CLOSING
        try:
            with anyio.CancelScope(shield=True):
                await handle.device.close()
        except Exception:
            log.exception("device of %s failed to close", handle.key)
        finally:
            self._drop_open(handle)

    async def _modify(self, handle: ChannelHandle, request: ModifyRequest) -> None:
        if handle.state is not OpenState.OPEN:
            raise ChannelRequestError(f"channel {handle.channel_id} is not open")
        if not 0 <= request.target_vp <= _U32:
            raise ChannelRequestError(f"target_vp {request.target_vp!r} is not a u32")
        try:
            status = await handle.device.modify(request)
        except Exception as exc:
            raise ChannelRequestError(f"the device failed to modify: {exc}") from exc
        if status != STATUS_SUCCESS:
            raise ChannelRequestError("the device refused the modify", status & _U32)

    # -- save / restore ----------------------------------------------------------------------------

    def save(self) -> ServerSavedState:
        """Record every offer's channel id, GPADLs and open data."""
        channels = []
        for handle in self.handles():
            gpadls = tuple(
                SavedGpadl(g.request.id, g.request.count, g.request.buf)
                for g in self._gpadls.values()
                if g.channel_id == handle.channel_id and g.owner is None
            )
            saved_open = None
            ring = handle._ring
            if (handle.state is OpenState.OPEN and handle.open_request is not None
                    and ring is not None and ring.owner is None):
                d = handle.open_request.open_data
                saved_open = SavedOpen(d.ring_gpadl_id, d.ring_offset, d.target_vp,
                                       d.event_flag, d.connection_id, d.user_data)
            key = handle.key
            channels.append(SavedChannel(str(key.interface_id), str(key.instance_id),
                                         key.subchannel_index, handle.channel_id, gpadls,
                                         saved_open))
        return ServerSavedState(tuple(channels), self._next_channel_id)

    def restore(self, state: ServerSavedState) -> None:
        """Take a saved state; call before the offers are added again. Raises ValueError if
        this server already has offers or the state repeats a key or a channel id."""
        if self._channels:
            raise ValueError("restore a server before offering channels")
        saved: dict[OfferKey, SavedChannel] = {}
        ids: set[int] = set()
        for channel in state.channels:
            if channel.key in saved or channel.channel_id in ids or channel.channel_id <= 0:
                raise ValueError(f"saved state repeats offer {channel.key} or its channel id")
            saved[channel.key] = channel
            ids.add(channel.channel_id)
        self._saved = saved
        self._next_channel_id = max(state.next_channel_id, max(ids, default=0) + 1)

    # -- a remote guest handed over from another process (devicehost.vmbus.handover) ------------

    def remote_gpadls(self, guest: RemoteGuest) -> list[ServerGpadl]:
        """Every GPADL of remote guest ``guest`` (by channel id, then GPADL id)."""
        return sorted((g for g in self._gpadls.values() if g.owner is guest),
                      key=lambda g: (g.channel_id, g.request.id))

    def remote_opens(self, guest: RemoteGuest) -> list[tuple[ChannelHandle, Signal]]:
        """Every channel remote guest ``guest`` has open, with the host's end of its signal."""
        return [(h, h._host_signal) for h in self.handles()
                if h._ring is not None and h._ring.owner is guest and h.state is OpenState.OPEN
                and h._host_signal is not None]

    def in_process_opens(self) -> list[ChannelHandle]:
        """Every channel the in-process guest (or a client inside the host) has open."""
        return [h for h in self.handles() if h._ring is not None and h._ring.owner is None
                and h.state is not OpenState.CLOSED]

    def restore_remote(self, states: dict[int, RemoteChannelState]) -> None:
        """Take a handed-over remote guest's GPADLs and opens per channel id, after
        :meth:`restore` and before the offers are added again: each offer's restore rebuilds
        them (ChannelRequestError if they do not fit its channel). The server owns the signals
        from now on."""
        if self._channels:
            raise ValueError("restore a server before offering channels")
        self._remote_saved = dict(states)

    def unclaimed_remote(self) -> list[int]:
        """Channel ids of handed-over remote state that no restored offer took (their signals
        are closed)."""
        left, self._remote_saved = self._remote_saved, {}
        for state in left.values():
            if state.open is not None:
                state.open.signal.close()
        return sorted(left)

    def _restore_remote_channel(self, handle: ChannelHandle, remote: RemoteChannelState,
                                was_open: bool) -> tuple[OpenRequest | None, list[RestoredGpadl]]:
        """Rebuild a remote guest's GPADLs and open on ``handle``; ChannelRequestError (nothing
        is done by halves that matters: the handover fails as a whole)."""
        guest = remote.guest
        if remote.open is not None and not was_open:
            remote.open.signal.close()
            raise ChannelRequestError(
                f"channel {handle.channel_id} is open by {guest.name}, but its device saved no"
                " state for it")
        restored = []
        try:
            for request in remote.gpadls:
                self._create_gpadl(handle, request, guest)
                restored.append(RestoredGpadl(request, accepted=True))
            if remote.open is None:
                return None, restored
            if handle.state is not OpenState.CLOSED:
                raise ChannelRequestError(f"channel {handle.channel_id} is open twice")
            data = remote.open.data
            self._check_open_data(data)
            gpadl = self._channel_gpadl(handle, data.ring_gpadl_id, guest)
            channel = self._ring_channel(gpadl, data.ring_offset, remote.open.signal)
        except BaseException:
            if remote.open is not None:
                remote.open.signal.close()
            raise
        open_request = self._negotiate(handle, OpenRequest(data))
        gpadl.map_count += 1
        handle.state = OpenState.OPEN
        handle.open_request, handle.channel = open_request, channel
        handle.gpadl_id = data.ring_gpadl_id
        handle._ring = gpadl
        handle._host_signal, handle.guest_signal = remote.open.signal, None
        return open_request, restored

    async def _restore_channel(self, handle: ChannelHandle, was_open: bool) -> RestoreResult:
        saved, handle._saved = handle._saved, None
        if saved is None:
            return RestoreResult(None, ())
        remote = self._remote_saved.pop(handle.channel_id, None)
        if remote is not None:
            if saved.gpadls or saved.open is not None:
                # The in-process guest's memory does not travel with a remote guest's.
                if remote.open is not None:
                    remote.open.signal.close()
                raise ChannelRequestError(f"channel {handle.channel_id} has state of both the"
                                          " in-process guest and a remote one")
            open_request, restored = self._restore_remote_channel(handle, remote, was_open)
            return RestoreResult(open_request, tuple(restored))
        if saved.open is not None and not was_open:
            # The device could not keep its open channel: revoke it and offer it anew.
            await self._reoffer(handle)
            return RestoreResult(None, ())
        restored = []
        for g in saved.gpadls:
            request = GpadlRequest(g.id, g.count, g.buf)
            try:
                self._create_gpadl(handle, request)
            except ChannelRequestError as exc:
                log.warning("saved GPADL %#x of %s is invalid: %s", g.id, handle.key, exc)
                restored.append(RestoredGpadl(request, accepted=False))
            else:
                restored.append(RestoredGpadl(request, accepted=True))
        if saved.open is None:
            return RestoreResult(None, tuple(restored))
        o = saved.open
        try:
            open_request = OpenRequest(OpenData(o.ring_offset, o.ring_gpadl_id, o.target_vp,
                                                o.event_flag, o.connection_id, o.user_data))
            self._check_open_data(open_request.open_data)
            gpadl = self._channel_gpadl(handle, o.ring_gpadl_id)
            host_signal, guest_signal = connected_signals()
            channel = self._ring_channel(gpadl, o.ring_offset, host_signal)
        except (ChannelRequestError, ValueError, TypeError) as exc:
            # A saved state is untrusted: an open that cannot be rebuilt is offered anew.
            log.warning("saved open channel of %s cannot be restored: %s", handle.key, exc)
            await self._reoffer(handle)
            return RestoreResult(None, ())
        gpadl.map_count += 1
        handle.state = OpenState.OPEN
        handle.open_request, handle.channel = open_request, channel
        handle.gpadl_id = o.ring_gpadl_id
        handle._ring = gpadl
        handle._host_signal, handle.guest_signal = host_signal, guest_signal
        return RestoreResult(open_request, tuple(restored))

    # -- teardown ----------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Revoke every offer (primaries revoke their subchannels first) and end the streams."""
        for handle in sorted(self._channels.values(), key=lambda h: -h.channel_id):
            await self._revoke(handle)
        for stream in self._subscribers:
            stream.close()
        self._subscribers.clear()
        self._sees_hidden.clear()

    def inspect(self) -> dict[str, Any]:
        """Every offer and every GPADL, keyed ``"<id>"`` for the in-process guest and
        ``"<guest>/<id>"`` (with a ``"guest"`` entry, as on channels a remote guest opened) for a
        remote guest."""
        return {
            "channels": [
                {"key": str(h.key), "channel_id": h.channel_id, "state": h.state.value,
                 "name": h.params.interface_name, **_opener(h._ring)}
                for h in self.handles()
            ],
            "gpadls": {
                _gpadl_name(owner, gid): {"channel_id": g.channel_id, "mapped": g.map_count,
                                          **({} if owner is None else {"guest": owner.name})}
                for (owner, gid), g in self._gpadls.items()
            },
        }


def _opener(ring: ServerGpadl | None) -> dict[str, str]:
    """``{"guest": name}`` for a channel a remote guest opened, else nothing."""
    return {} if ring is None or ring.owner is None else {"guest": ring.owner.name}


def _gpadl_name(owner: Owner, gpadl_id: int) -> str:
    return f"{gpadl_id:#x}" if owner is None else f"{owner.name}/{gpadl_id:#x}"
