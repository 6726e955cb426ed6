"""Opening a device the way its guest would, whatever its transport.

:func:`guest_session` is what the conformance suite uses to reach the point where a device's
``open`` hook has run: a local device is opened by the host itself; a VMBus device is opened by
the host's in-process VMBus client (GPADL + open of a channel); a virtio device by the in-process
virtio driver starting every queue.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from devicehost.context import LocalOffer
from devicehost.host import Host
from devicehost.lifecycle import Device

__all__ = ["guest_session"]


@asynccontextmanager
async def guest_session(host: Host, device: Device) -> AsyncIterator[Any]:
    """Open ``device`` as its guest would; yields the guest-side handle (None for local)."""
    offer = device.offer_value
    if isinstance(offer, LocalOffer):
        yield None
        return
    kind = f"{type(offer).__module__}.{type(offer).__qualname__}"
    if kind == "devicehost.vmbus.protocol.OfferParams":
        from devicehost.testing.vmbus import guest_open_channel

        async with guest_open_channel(host, device) as channel:
            yield channel
        return
    if kind == "devicehost.virtio.traits.DeviceTraits":
        from devicehost.virtio.transport import VirtioTransport

        driver = await host.transport(VirtioTransport).connect_driver(device.name)
        try:
            yield driver
        finally:
            if device.runner is not None:
                await driver.reset()
        return
    raise TypeError(f"the test kit cannot open a device offering {kind}")
