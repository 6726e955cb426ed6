"""The relay: routes the host VMBus client's offers to the wrappers of the devices that claim them.

One :class:`ChannelRelay` per host holds a VMBus client that sees every offer, including hidden
ones. For each offer it receives:

- if a wrapper claims the offer's instance id, the offer goes to that wrapper only, and when the
  server revokes it the wrapper is told (facts §10.1 Offer + revoke);
- otherwise the offer is forwarded to the relay's own subscribers (:meth:`ChannelRelay.subscribe`),
  the stand-in for the guest the relay serves.

Claimed offers are hidden from everyone else: registering a wrapper asks the server to announce
its instance id's offers only to clients that see hidden offers (the relay's). Offers a client
had already received before the claim stay with it (claims are made when devices are added,
normally before anyone else subscribes).

The relay forwards the host's Start and Stop (awaited) to every wrapper, collects their Save
blobs and hands them Restore blobs. Every wrapper call is guarded: a failure is logged and never
ends the relay's task, which lives in the host's task group.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from devicehost.errors import ConfigError
from devicehost.savedstate import SavedEntry
from devicehost.vmbus.client import VmbusClient
from devicehost.vmbus.guid import Guid
from devicehost.vmbus.protocol import IncomingOffer
from devicehost_intercept.wrapper import InterceptWrapper

__all__ = ["ChannelRelay"]

log = logging.getLogger("devicehost.intercept.relay")


class ChannelRelay:
    """Routes ``client``'s offers by instance id; see the module docstring."""

    def __init__(self, client: VmbusClient) -> None:
        if not client.see_hidden:
            raise ValueError("the relay's VMBus client must see hidden offers")
        self.client = client
        self.wrappers: dict[Guid, InterceptWrapper] = {}
        #: Whether the relay is started: wrappers added while it is start at once.
        self.running = True
        self._live: dict[int, IncomingOffer] = {}
        #: Channel ids of live offers whose routing decision was taken.
        self._routed: set[int] = set()
        self._subscribers: list[MemoryObjectSendStream[IncomingOffer]] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._scope: anyio.CancelScope | None = None
        self._ended = anyio.Event()

    # -- the relay task ---------------------------------------------------------------------------

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Receive offers until :meth:`aclose`; start it with ``task_group.start``."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg, self._scope = tg, tg.cancel_scope
                task_status.started()
                with contextlib.suppress(anyio.ClosedResourceError):
                    async for offer in self.client.offers:
                        self._live[offer.channel_id] = offer
                        # The client frees (not leaks) a revoked channel's pages: it must know.
                        self.client.known[offer.channel_id] = offer
                        tg.start_soon(self._follow, offer)
                tg.cancel_scope.cancel()  # the server closed: stop following offers
        finally:
            self._tg = None
            for stream in self._subscribers:
                stream.close()
            self._ended.set()

    async def _follow(self, offer: IncomingOffer) -> None:
        """Route ``offer``, then wait for its revoke and route that too."""
        wrapper = self.wrappers.get(offer.offer.instance_id)
        # From here on a wrapper registering for this instance is handed the offer by
        # ``register`` (no await between the lookup and this mark: never both, never neither).
        self._routed.add(offer.channel_id)
        if wrapper is not None:
            await _guarded(wrapper.handle_offer, offer, what=f"offer to {wrapper!r}")
        else:
            self._forward(offer)
        if offer.revoked is not None:
            await offer.revoked.wait()
        self._live.pop(offer.channel_id, None)
        self._routed.discard(offer.channel_id)
        wrapper = self.wrappers.get(offer.offer.instance_id)
        if wrapper is not None:
            await _guarded(wrapper.revoke, offer, what=f"revoke to {wrapper!r}")

    def _forward(self, offer: IncomingOffer) -> None:
        for stream in list(self._subscribers):
            try:
                stream.send_nowait(offer)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(stream)

    def subscribe(self) -> MemoryObjectReceiveStream[IncomingOffer]:
        """The offers no device claims: the live ones now, then each new one."""
        send, receive = anyio.create_memory_object_stream[IncomingOffer](math.inf)
        for offer in self._live.values():
            # Offers not routed yet reach the new stream when ``_follow`` forwards them.
            if offer.offer.instance_id not in self.wrappers and offer.channel_id in self._routed:
                send.send_nowait(offer)
        self._subscribers.append(send)
        return receive

    # -- wrappers ---------------------------------------------------------------------------------

    def register(self, wrapper: InterceptWrapper) -> None:
        """Route ``wrapper``'s instance id to it (ConfigError if another device claims it)."""
        other = self.wrappers.get(wrapper.instance_id)
        if other is not None:
            raise ConfigError(
                f"devices {other.device.name!r} and {wrapper.device.name!r} both intercept "
                f"VMBus instance {wrapper.instance_id}; give each instance to one device"
            )
        self.wrappers[wrapper.instance_id] = wrapper
        self.client.server.hide_instance(wrapper.instance_id)
        if self._tg is not None:
            for offer in list(self._live.values()):
                if (offer.offer.instance_id == wrapper.instance_id
                        and offer.channel_id in self._routed):
                    self._tg.start_soon(functools.partial(
                        _guarded, wrapper.handle_offer, offer, what=f"offer to {wrapper!r}"))

    def unregister(self, wrapper: InterceptWrapper) -> None:
        if self.wrappers.get(wrapper.instance_id) is wrapper:
            del self.wrappers[wrapper.instance_id]
            self.client.server.unhide_instance(wrapper.instance_id)

    async def start(self) -> None:
        """Start every wrapper (each opens its remembered offer)."""
        self.running = True
        for wrapper in list(self.wrappers.values()):
            await _guarded(wrapper.start, what=f"start of {wrapper!r}")

    async def stop(self) -> None:
        """Stop every wrapper and wait until each has closed its channel."""
        self.running = False
        with anyio.CancelScope(shield=True):
            for wrapper in list(self.wrappers.values()):
                await _guarded(wrapper.stop, what=f"stop of {wrapper!r}")

    async def save(self) -> dict[Guid, SavedEntry]:
        """Every wrapper's blob, by instance id."""
        return {iid: await wrapper.save() for iid, wrapper in list(self.wrappers.items())}

    async def restore(self, instance_id: Guid, blob: SavedEntry) -> bool:
        """Hand ``blob`` to the wrapper of ``instance_id``; False if no device claims it."""
        wrapper = self.wrappers.get(instance_id)
        if wrapper is None:
            log.warning("intercept: saved state for instance %s, which no device intercepts; "
                        "dropped", instance_id)
            return False
        await wrapper.restore(blob)
        return True

    async def aclose(self) -> None:
        """End the relay task, then close the relay's VMBus client."""
        with anyio.CancelScope(shield=True):
            if self._scope is not None:
                self._scope.cancel()
                await self._ended.wait()
            await self.client.aclose()

    def inspect(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "offers": sorted(self._live),
            "wrappers": [w.inspect() for w in self.wrappers.values()],
        }


async def _guarded(fn: Callable[..., Awaitable[None]], *args: Any, what: str) -> None:
    try:
        await fn(*args)
    except Exception:
        log.exception("intercept: %s failed", what)
