"""Opening a device the way its guest would, whatever its transport.

:func:`guest_session` is what the conformance suite uses to reach the point where a device's
``open`` hook has run: a local device is opened by the host itself; a VMBus device is opened by
the host's in-process VMBus client (GPADL + open of a channel); a virtio device by the in-process
virtio driver starting every queue; a VMBus client device (``InterceptClaim``) is opened by the
host's intercept relay once a server offers the instance it claims.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

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
            await driver.reset()
        return
    if kind == "devicehost.vmbus.protocol.InterceptClaim":
        # A VMBus client device: the host's intercept relay opens it as soon as a server device
        # offers the claimed instance (the conformance suite serves its ``peers`` beside it).
        wrapper = host.transport_of(device.name).wrapper_of(device)
        while device.runner is None:
            await anyio.sleep(0.005)
        yield wrapper
        return
    raise TypeError(f"the test kit cannot open a device offering {kind}")
