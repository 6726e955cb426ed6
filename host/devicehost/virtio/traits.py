"""What a virtio device offers: device id, feature bits, queues and config space.

Feature bits are one 64-bit mask. Bits 0..23 are device-specific, 24..40 are transport and ring
features (virtio 1.x §6). The transport adds ``VERSION_1`` and the ring features it implements
(``RING_INDIRECT_DESC``, ``RING_EVENT_IDX``) to whatever the device offers; the driver picks a
subset; :func:`negotiate` checks that subset.
"""

from __future__ import annotations

from typing import Final

import attrs

__all__ = [
    "DEVICE_FEATURE_MASK",
    "RING_EVENT_IDX",
    "RING_INDIRECT_DESC",
    "TRANSPORT_FEATURES",
    "VERSION_1",
    "DeviceTraits",
    "FeatureError",
    "negotiate",
    "offered_features",
]

RING_INDIRECT_DESC: Final = 28
RING_EVENT_IDX: Final = 29
VERSION_1: Final = 32

#: Bits a device may offer itself (device-specific feature bits 0..23).
DEVICE_FEATURE_MASK: Final = (1 << 24) - 1
#: What every virtio transport here adds to a device's own features.
TRANSPORT_FEATURES: Final = (1 << VERSION_1) | (1 << RING_INDIRECT_DESC) | (1 << RING_EVENT_IDX)


class FeatureError(Exception):
    """Raised when a driver accepts features that were not offered, or refuses VERSION_1."""


def _check_config(instance: DeviceTraits, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    if len(value) > 256:
        raise ValueError(f"config space of {len(value)} bytes exceeds 256")


@attrs.frozen
class DeviceTraits:
    """A virtio device's offer.

    ``device_id`` is the virtio device type (vsock 19, net 1, block 2, ...). ``device_features``
    holds only device-specific bits (0..23); the transport adds :data:`TRANSPORT_FEATURES`.
    ``queue_count`` queues of at most ``max_queue_size`` entries. ``config`` is the device's config
    space as the driver first reads it; a device whose config changes implements the plain method
    ``virtio_config_read(offset, size) -> bytes`` instead, and the transport asks it.
    """

    device_id: int = attrs.field(validator=attrs.validators.and_(
        attrs.validators.instance_of(int), attrs.validators.ge(1)))
    device_features: int = attrs.field(default=0, validator=attrs.validators.instance_of(int))
    queue_count: int = attrs.field(default=1, validator=attrs.validators.and_(
        attrs.validators.instance_of(int), attrs.validators.ge(1), attrs.validators.le(64)))
    max_queue_size: int = attrs.field(default=256, validator=attrs.validators.and_(
        attrs.validators.instance_of(int), attrs.validators.ge(1),
        attrs.validators.le(32768)))
    config: bytes = attrs.field(default=b"", converter=bytes, validator=_check_config)

    def __attrs_post_init__(self) -> None:
        if self.device_features & ~DEVICE_FEATURE_MASK:
            raise ValueError(
                f"device features {self.device_features:#x} use bits outside the device-specific"
                " range 0..23; the transport offers the ring and version bits itself"
            )
        if self.max_queue_size & (self.max_queue_size - 1):
            raise ValueError(f"max queue size {self.max_queue_size} is not a power of two")


def offered_features(traits: DeviceTraits) -> int:
    """The full feature mask a transport offers for ``traits``."""
    return traits.device_features | TRANSPORT_FEATURES


def negotiate(offered: int, accepted: int) -> int:
    """Check a driver's accepted features against the offer and return them.

    Raises :class:`FeatureError` (the driver's fault) if it accepts a bit that was not offered
    or does not accept ``VERSION_1`` (legacy devices are not supported).
    """
    extra = accepted & ~offered
    if extra:
        raise FeatureError(f"driver accepted features {extra:#x} that were not offered")
    if not accepted >> VERSION_1 & 1:
        raise FeatureError("driver did not accept VERSION_1; legacy virtio is not supported")
    return accepted
