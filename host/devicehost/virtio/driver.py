"""The guest side of virtio, for tests and the demo: rings and buffers in guest memory.

:class:`VirtioDriver` negotiates features over a :class:`DeviceLink` (the in-process transport
implements it), allocates every queue's descriptor table and rings with a
:class:`devicehost.memory.DmaAllocator`, and starts the queues. Each queue is a
:class:`DriverQueue` (:mod:`devicehost.virtio.driverqueue`): it posts buffers (device-readable
data and device-writable space, as one descriptor per buffer, split into non-contiguous
fragments, or through an indirect table), kicks when the device asked for kicks and collects used
buffers (with the bytes the device wrote).

The device is not trusted by the driver either: a used element naming a head that is not in
flight, or a written length beyond the chain's writable space, raises :class:`DriverError`.

C accelerator: the hot paths of :class:`DriverQueue` (``add_readable``, ``add_segments``,
``add_writable_many``, ``reap``, ``take_used_views``, ``kick``) have optional C versions in
``devicehost.virtio._driverc``, which take the common case and decline everything else to the
pure-Python methods (see :mod:`devicehost.virtio.driverqueue` for what they cover); behaviour,
bytes and errors are the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from devicehost.memory import DmaAllocator, GuestMemory
from devicehost.virtio.doorbell import EventfdDoorbell
from devicehost.virtio.driverqueue import (
    DriverError,
    DriverQueue,
    QueueFull,
    QueueSetup,
    UsedBuffer,
)
from devicehost.virtio.traits import RING_EVENT_IDX, negotiate

__all__ = [
    "DeviceLink",
    "DriverError",
    "DriverQueue",
    "QueueFull",
    "QueueSetup",
    "UsedBuffer",
    "VirtioDriver",
]


class DeviceLink(Protocol):
    """What the driver needs from the device side (a transport's in-process port). A link may
    also have ``eventfd_doorbells = True``: the device runs in another process (a worker), so
    the driver gives every queue eventfd kicks and calls, which can be handed to it."""

    @property
    def offered_features(self) -> int: ...

    @property
    def queue_count(self) -> int: ...

    @property
    def max_queue_size(self) -> int: ...

    def read_config(self, offset: int, size: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    async def start(self, features: int, queues: Sequence[QueueSetup]) -> None: ...

    async def reset(self) -> None: ...


def _eventfd_doorbell() -> EventfdDoorbell:
    return EventfdDoorbell(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))


class VirtioDriver:
    """A guest driver for one virtio device over a :class:`DeviceLink`."""

    def __init__(self, link: DeviceLink, memory: GuestMemory, allocator: DmaAllocator) -> None:
        self.link = link
        self.memory = memory
        self.allocator = allocator
        self.features = 0
        self.queues: list[DriverQueue] = []

    @property
    def offered_features(self) -> int:
        return self.link.offered_features

    async def start(self, *, queue_size: int = 256, features: int | None = None) -> None:
        """Negotiate ``features`` (default: everything offered), set up all queues with
        ``queue_size`` entries (capped at the device's maximum) and start them."""
        if self.queues:
            raise RuntimeError("the driver is already started; reset it first")
        offered = self.link.offered_features
        self.features = negotiate(offered, offered if features is None else features)
        size = min(queue_size, self.link.max_queue_size)
        event_idx = bool(self.features >> RING_EVENT_IDX & 1)
        self.queues = [
            DriverQueue(i, self.memory, self.allocator, size, event_idx=event_idx)
            for i in range(self.link.queue_count)
        ]
        if getattr(self.link, "eventfd_doorbells", False):
            # The device runs in another process (a worker): kicks and calls must be eventfds
            # that can be handed to it (devicehost.virtio.remote).
            for q in self.queues:
                q.kick_doorbell = _eventfd_doorbell()
                q.call_doorbell = _eventfd_doorbell()
        try:
            await self.link.start(self.features, [q.setup() for q in self.queues])
        except BaseException:
            self._release()
            raise

    def queue(self, index: int) -> DriverQueue:
        return self.queues[index]

    def read_config(self, offset: int, size: int) -> bytes:
        return self.link.read_config(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        self.link.write_config(offset, data)

    async def reset(self) -> None:
        """Stop the device (its queues stop, it is closed) and free the rings and buffers."""
        await self.link.reset()
        self._release()

    def _release(self) -> None:
        for q in self.queues:
            q.release()
            for bell in (q.kick_doorbell, q.call_doorbell):
                if isinstance(bell, EventfdDoorbell):
                    bell.close()
        self.queues = []
        self.features = 0

