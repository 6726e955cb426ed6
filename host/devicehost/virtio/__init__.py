"""devicehost.virtio: split virtqueues, device traits, the in-process driver and vhost-user.

A virtio device's ``offer`` hook returns :class:`DeviceTraits`; its ``open`` hook gets
:class:`QueueResources` (started :class:`VirtQueue` s, negotiated features, guest memory) and
returns a runner; its ``run`` hook pops chains from the queues and pushes them back.
"""

from __future__ import annotations

# Registers the codecs that carry DeviceTraits and QueueResources to and from a device worker
# (devicehost.worker), in the supervisor and in every worker that imports a virtio device.
from devicehost.virtio import remote as _remote  # noqa: F401  (import for its effect)
from devicehost.virtio.doorbell import Doorbell, DoorbellError, EventDoorbell, EventfdDoorbell
from devicehost.virtio.driver import (
    DeviceLink,
    DriverError,
    DriverQueue,
    QueueFull,
    QueueSetup,
    UsedBuffer,
    VirtioDriver,
)
from devicehost.virtio.queue import (
    DescriptorChain,
    QueueError,
    QueueLayout,
    QueueState,
    SplitQueue,
)
from devicehost.virtio.traits import (
    RING_EVENT_IDX,
    RING_INDIRECT_DESC,
    VERSION_1,
    DeviceTraits,
    FeatureError,
    negotiate,
)
from devicehost.virtio.transport import (
    QueueResources,
    SavedQueue,
    VirtioSavedState,
    VirtioTransport,
    VirtQueue,
)
from devicehost.virtio.vhost_handover import VhostUserHandover  # registers its saved-state type

__all__ = [
    "RING_EVENT_IDX",
    "RING_INDIRECT_DESC",
    "VERSION_1",
    "DescriptorChain",
    "DeviceLink",
    "DeviceTraits",
    "Doorbell",
    "DoorbellError",
    "DriverError",
    "DriverQueue",
    "EventDoorbell",
    "EventfdDoorbell",
    "FeatureError",
    "QueueError",
    "QueueFull",
    "QueueLayout",
    "QueueResources",
    "QueueSetup",
    "QueueState",
    "SavedQueue",
    "SplitQueue",
    "UsedBuffer",
    "VhostUserHandover",
    "VirtQueue",
    "VirtioDriver",
    "VirtioSavedState",
    "VirtioTransport",
    "negotiate",
]
