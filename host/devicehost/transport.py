"""Transports: what carries a device's offer to a guest and drives its lifecycle.

A device's ``offer`` hook returns an offer value; its type names the transport that serves it:

============================================  ============================================
offer type                                    transport
============================================  ============================================
:class:`devicehost.LocalOffer`                :class:`LocalTransport` (opens right away)
:class:`devicehost.vmbus.OfferParams`         ``devicehost.vmbus.transport.VmbusTransport``
:class:`devicehost.virtio.DeviceTraits`       ``devicehost.virtio.transport.VirtioTransport``
:class:`devicehost.vmbus.InterceptClaim`      ``devicehost_intercept.transport.InterceptTransport``
============================================  ============================================

Transports other than the local one are imported on first use, so a host serving only local
devices never imports the VMBus or virtio code. A transport is built as ``TransportClass(host)``;
the host keeps one instance of each.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final, Protocol

from devicehost.context import LocalOffer
from devicehost.errors import ConfigError

if TYPE_CHECKING:
    from devicehost.lifecycle import Device

__all__ = ["LocalTransport", "Transport", "transport_class_for"]


class Transport(Protocol):
    """What the host needs from a transport."""

    async def add(self, device: Device, offer: Any) -> None:
        """Start serving ``device``, whose ``offer`` hook returned ``offer``."""

    async def remove(self, device: Device) -> None:
        """Stop serving ``device``: revoke its offer and close it if it is open."""

    async def aclose(self) -> None:
        """Release the transport's resources; every device has been removed."""

    # Optional: ``resources_for_restore(device) -> Any`` gives the resources of the device's
    # still-open channel for ``restore_open`` (used by the test kit's save/restore check).


class LocalTransport:
    """Serves devices without a bus: each is opened (with its offer) and started at once."""

    def __init__(self, host: Any) -> None:
        self.host = host

    async def add(self, device: Device, offer: Any) -> None:
        await device.open(offer)

    async def remove(self, device: Device) -> None:
        await device.revoke()

    def resources_for_restore(self, device: Device) -> Any:
        """The resources ``restore_open`` gets: a local device's offer."""
        return device.offer_value

    async def aclose(self) -> None:
        return None


# (offer module, offer class, transport module, transport class, what to install if missing)
_TRANSPORTS: Final = (
    ("devicehost.vmbus.protocol", "OfferParams", "devicehost.vmbus.transport", "VmbusTransport",
     "devicehost"),
    ("devicehost.virtio.traits", "DeviceTraits", "devicehost.virtio.transport", "VirtioTransport",
     "devicehost"),
    ("devicehost.vmbus.protocol", "InterceptClaim", "devicehost_intercept.transport",
     "InterceptTransport", "devicehost-intercept"),
)


def transport_class_for(offer: Any) -> type[Any]:
    """The transport class that serves ``offer``; ConfigError if there is none."""
    if isinstance(offer, LocalOffer):
        return LocalTransport
    offer_type = type(offer)
    for offer_module, offer_name, module, name, package in _TRANSPORTS:
        if offer_type.__module__ != offer_module or offer_type.__qualname__ != offer_name:
            continue
        try:
            return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
        except ImportError as exc:
            raise ConfigError(
                f"a device offers {offer_name}, which needs {module}; install {package!r} "
                f"({exc})"
            ) from exc
    raise ConfigError(
        f"no transport serves an offer of type {offer_type.__module__}.{offer_type.__qualname__}"
    )
