"""The wrapper around one VMBus client device: claim, ring memory, GPADL, open, stop, revoke.

An :class:`InterceptWrapper` drives one client device (a :class:`devicehost.lifecycle.Device`
whose ``offer`` hook claimed an instance id) through the relay's events, as upstream's
``vmbus_relay_intercept_device`` does (facts §10.3, §10.4):

Offer (only while no channel of this wrapper is open; extra offers are ignored)
    1. ``is_dedicated != 1`` is logged as a warning, nothing more.
    2. The device's ``offer`` hook is handed the :class:`IncomingOffer`; ``IGNORE`` ends here.
    3. Ring memory: ``2 * (1 + n)`` pages from the DMA allocator shared with the host's VMBus
       client (``n`` = the device's ``intercept_ring_pages``, default 1: upstream's 4 pages).
       GPADL id = page number of the second page (u32); one range
       ``[byte_count, pfn0, pfn1, ...]`` at offset 0 — ``[16384, pfn0..pfn3]`` by default.
    4. Open: target VP 0, ring offset ``1 + n`` pages (2), event flag 0xFFFF, connection id
       0xFFFFFFFF, user data zero.
    5. Rings: pages ``[0, 1 + n)`` = outgoing (client -> server), the rest = incoming.
    6. ``restore_open`` with the stashed saved state if there is one and the device implements
       it, else ``open``; the runner starts.
Stop
    Stop the runner, send Close, tear the GPADL down (awaited; if the server refuses, the pages
    stay marked in use for good — :meth:`DmaAllocator.leak` — and an error is logged), stash
    ``save_open(runner)`` if the device saves, drop the runner and call ``close``. The offer is
    kept. Closing on every stop is deliberate: ring pages do not survive servicing.
Start
    Nothing if already started; else redo the offer steps 3-6 with the remembered offer over
    fresh memory.
Revoke (the server revoked the offer)
    Stop the runner, ``close``, free the ring memory (the server dropped the GPADL already) and
    forget the offer.
Save
    The stashed state as a blob (it stays stashed), or a ``NoSavedState`` blob.
Restore(blob)
    Parse the blob as the device's saved-state type (its class attribute
    ``saved_state_class``); a blob of another type is rejected with a logged error and the stash
    is cleared.

Decisions where upstream differs or is silent:

- Ring size: upstream always uses 4 pages (one data page per ring). That cannot carry vmbfs,
  whose server needs a host-to-guest ring of at least 4 data pages (facts §8.6 (a)), so a client
  device may declare ``intercept_ring_pages`` (data pages per ring); the layout rules stay the
  same and the default is upstream's.
- Stop closes the channel whenever a runner exists, also when ``run`` had returned (done) or
  failed; upstream closes only if the task "was running", which would leave a finished device's
  channel open across servicing.
- An offer that arrives while the wrapper is stopped is remembered (if the device answers OPEN)
  and opened on the next Start, so a stopped wrapper never touches the bus.
- The stash is consumed by the ``restore_open`` that uses it; a failing ``restore_open`` is
  logged, the channel closed, and the next Start opens afresh.
- Restore of a ``NoSavedState`` blob (what Save returns with nothing stashed) clears the stash
  and is logged at info level; any other type mismatch is logged as an error.
- Restore that arrives after the wrapper already opened its channel fresh (the host adds client
  devices before it restores the relay device, a local one) closes that channel without saving
  and reopens it with ``restore_open``: the restored progress wins. Upstream restores the relay
  before anything starts, so it never meets this case.
- Every failure is logged and contained here: a device's hook failing moves only that device to
  the failed state (:mod:`devicehost.lifecycle`), and no wrapper method raises into the relay.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import anyio

from devicehost.errors import DeviceError, SavedStateError
from devicehost.lifecycle import Device
from devicehost.savedstate import NoSavedState, SavedEntry, decode_state_untrusted
from devicehost.vmbus.client import ClientChannel, VmbusClient
from devicehost.vmbus.guid import Guid
from devicehost.vmbus.protocol import (
    ClientOpenResources,
    IncomingOffer,
    InterceptClaim,
    OfferAction,
)
from devicehost.vmbus.server import ChannelRequestError
from devicehost_intercept.state import blob_for, no_saved_state_blob

__all__ = [
    "CONNECTION_ID",
    "DEFAULT_RING_PAGES",
    "EVENT_FLAG",
    "TARGET_VP",
    "InterceptWrapper",
]

log = logging.getLogger("devicehost.intercept")

#: The open parameters of every intercepted channel (facts §10.3 step 4).
TARGET_VP: Final = 0
EVENT_FLAG: Final = 0xFFFF
CONNECTION_ID: Final = 0xFFFFFFFF
#: Data pages per ring unless the device says otherwise: 4 pages in all, as upstream.
DEFAULT_RING_PAGES: Final = 1
#: The most data pages per ring a device may ask for (a GPADL of 130 pages).
MAX_RING_PAGES: Final = 64


class InterceptWrapper:
    """Drives one client ``device`` (which made ``claim``) over ``client``'s requests."""

    def __init__(self, device: Device, claim: InterceptClaim, client: VmbusClient) -> None:
        self.device = device
        self.claim = claim
        self.client = client
        instance = device.pm.get_plugin(device.name)
        pages = getattr(instance, "intercept_ring_pages", DEFAULT_RING_PAGES)
        if not isinstance(pages, int) or not 1 <= pages <= MAX_RING_PAGES:
            raise ValueError(
                f"device {device.name!r}: intercept_ring_pages must be 1..{MAX_RING_PAGES}, "
                f"not {pages!r}"
            )
        self.ring_pages: int = pages
        self.saved_state_class: type | None = getattr(instance, "saved_state_class", None)
        self.started = False
        #: The offer this wrapper opens (kept across stops, forgotten on revoke).
        self.offer: IncomingOffer | None = None
        self.channel: ClientChannel | None = None
        #: The device's saved state from the last stop, used by the next open.
        self.stash: Any = None
        self.opens = 0
        self._lock = anyio.Lock()

    @property
    def instance_id(self) -> Guid:
        return self.claim.instance_id

    @property
    def logger(self) -> logging.Logger:
        return self.device.ctx.logger

    def __repr__(self) -> str:
        return f"<InterceptWrapper {self.device.name!r} {self.instance_id}>"

    # -- relay events -----------------------------------------------------------------------------

    async def handle_offer(self, incoming: IncomingOffer) -> None:
        """An offer of the claimed instance id arrived (facts §10.3)."""
        async with self._lock:
            if self.channel is not None:
                self.logger.info("intercept: ignoring offer of channel %d, channel %d is open",
                                 incoming.channel_id, self.channel.channel_id)
                return
            if incoming.offer.is_dedicated != 1:
                self.logger.warning("intercept: offer of channel %d is not dedicated (%d)",
                                    incoming.channel_id, incoming.offer.is_dedicated)
            try:
                action = await self.device.offer(incoming)
            except DeviceError:
                return  # logged by the lifecycle; the device is failed
            if action is OfferAction.IGNORE:
                self.logger.info("intercept: device ignores offer of channel %d",
                                 incoming.channel_id)
                return
            if action is not OfferAction.OPEN:
                self.logger.error("intercept: device %r answered the offer with %r, not an "
                                  "OfferAction", self.device.name, action)
                return
            self.offer = incoming
            if self.started:
                await self._open()

    async def start(self) -> None:
        """Start: open the remembered offer over fresh memory (nothing if started)."""
        async with self._lock:
            if self.started:
                return
            self.started = True
            if self.channel is None:
                await self._open()

    async def stop(self) -> None:
        """Stop: close the channel, tear the GPADL down, stash the saved state; keep the offer."""
        async with self._lock:
            self.started = False
            await self._close(save=True)

    async def revoke(self, incoming: IncomingOffer) -> None:
        """The server revoked ``incoming``: close without saving and forget the offer."""
        async with self._lock:
            if incoming is not self.offer:
                return
            await self._close(save=False)
            self.offer = None

    async def forget(self) -> None:
        """The device leaves the host: close without saving, forget offer and stash."""
        async with self._lock:
            self.started = False
            await self._close(save=False)
            self.offer = None
            self.stash = None

    async def save(self) -> SavedEntry:
        """The stashed state as a blob (still stashed), or a ``NoSavedState`` blob."""
        async with self._lock:
            ctx = self.device.ctx
            if self.stash is None:
                return no_saved_state_blob(ctx.name, ctx.plugin)
            return blob_for(ctx.name, ctx.plugin, self.stash)

    async def restore(self, blob: SavedEntry) -> None:
        """Stash the state held by ``blob`` for the next open; a wrong type clears the stash."""
        async with self._lock:
            self.stash = None
            if self.saved_state_class is None:
                self.logger.error("intercept: device %r declares no saved_state_class; its "
                                  "saved state %r is dropped", self.device.name, blob.type_name)
                return
            try:
                self.stash = decode_state_untrusted(blob, self.saved_state_class)
            except SavedStateError as exc:
                if blob.type_name == "save_restore.NoSavedState":
                    self.logger.info("intercept: device %r had nothing stashed",
                                     self.device.name)
                else:
                    self.logger.error("intercept: saved state of device %r rejected: %s",
                                      self.device.name, exc)
                return
            if self.channel is not None and self.started:
                # Opened fresh before the restore arrived: the restored progress wins.
                self.logger.info("intercept: device %r restored while open; reopening it with "
                                 "restore_open", self.device.name)
                await self._close(save=False)
                await self._open()

    # -- channel setup and teardown ---------------------------------------------------------------

    def _restorable(self) -> bool:
        if self.stash is None or isinstance(self.stash, NoSavedState):
            return False
        return bool(self.device.pm.hook.restore_open.get_hookimpls())

    async def _open(self) -> None:
        offer = self.offer
        if offer is None or (offer.revoked is not None and offer.revoked.is_set()):
            return
        try:
            channel = await self.client.open(
                offer,
                ring_pages=self.ring_pages,
                target_vp=TARGET_VP,
                event_flag=EVENT_FLAG,
                connection_id=CONNECTION_ID,
            )
        except ChannelRequestError as exc:
            self.logger.error("intercept: cannot open channel %d for device %r (GPADL or "
                              "open refused by the server): %s", offer.channel_id,
                              self.device.name, exc)
            return
        except (MemoryError, ValueError) as exc:
            self.logger.error("intercept: cannot set up ring memory for device %r: %s",
                              self.device.name, exc)
            return
        self.channel = channel
        self.opens += 1
        index = offer.offer.subchannel_index
        resources = ClientOpenResources(index, channel.channel)
        try:
            if self._restorable():
                state, self.stash = self.stash, None
                await self.device.restore(state, resources, subchannel_index=index)
                await self.device.start()
            else:
                await self.device.open(resources, subchannel_index=index)
        except DeviceError:
            # Logged by the lifecycle; the device alone is failed. Give the channel back.
            await self.device.close()
            await self._release()

    async def _close(self, *, save: bool) -> None:
        device = self.device
        await device.stop()
        if self.channel is not None:
            await self._release()
        if device.runner is None:
            return
        if save:
            try:
                state = await device.save()
            except DeviceError:
                state = None  # logged by the lifecycle
            if state is not None:
                self.stash = state
        await device.close()

    async def _release(self) -> None:
        """Close the channel and tear its GPADL down; leaked pages are reported."""
        channel, self.channel = self.channel, None
        if channel is None:
            return
        await self.client.close(channel)
        leaked = [pfn for pfn in channel.block.pfns if pfn in self.client.allocator.leaked]
        if leaked:
            self.logger.error(
                "intercept: the server did not tear down GPADL %#x of device %r; its ring pages "
                "%#x..%#x stay in use for good (never reused)", channel.gpadl_id,
                self.device.name, leaked[0], leaked[-1])

    def inspect(self) -> dict[str, Any]:
        channel = self.channel
        return {
            "device": self.device.name,
            "instance_id": str(self.instance_id),
            "started": self.started,
            "offer": None if self.offer is None else self.offer.channel_id,
            "channel": None if channel is None else {
                "channel_id": channel.channel_id,
                "gpadl_id": channel.gpadl_id,
                "pages": [f"{pfn:#x}" for pfn in channel.block.pfns],
            },
            "stashed": None if self.stash is None else type(self.stash).__qualname__,
            "opens": self.opens,
        }
