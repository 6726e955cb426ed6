"""Device traits and feature negotiation."""

from __future__ import annotations

import pytest

from devicehost.virtio.traits import (
    RING_EVENT_IDX,
    RING_INDIRECT_DESC,
    TRANSPORT_FEATURES,
    VERSION_1,
    DeviceTraits,
    FeatureError,
    negotiate,
    offered_features,
)


def test_feature_bit_numbers() -> None:
    assert (VERSION_1, RING_INDIRECT_DESC, RING_EVENT_IDX) == (32, 28, 29)
    assert TRANSPORT_FEATURES == 1 << 32 | 1 << 28 | 1 << 29


def test_offer_adds_transport_features() -> None:
    traits = DeviceTraits(
        device_id=19, device_features=0b11, queue_count=3, config=b"\3" + bytes(7)
    )
    assert offered_features(traits) == 0b11 | TRANSPORT_FEATURES
    assert traits.max_queue_size == 256 and traits.config[0] == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device_id": 0}, "device_id"),
        ({"device_id": 1, "device_features": 1 << 32}, "outside the device-specific"),
        ({"device_id": 1, "queue_count": 0}, "queue_count"),
        ({"device_id": 1, "max_queue_size": 100}, "not a power of two"),
        ({"device_id": 1, "max_queue_size": 65536}, "max_queue_size"),
        ({"device_id": 1, "config": bytes(257)}, "exceeds 256"),
    ],
)
def test_invalid_traits(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeviceTraits(**kwargs)  # type: ignore[arg-type]


def test_negotiate() -> None:
    offered = 0b101 | TRANSPORT_FEATURES
    assert negotiate(offered, 1 << VERSION_1 | 0b1) == 1 << VERSION_1 | 0b1
    with pytest.raises(FeatureError, match="0x2 that were not offered"):
        negotiate(offered, 1 << VERSION_1 | 0b10)
    with pytest.raises(FeatureError, match="VERSION_1"):
        negotiate(offered, 0b1)
