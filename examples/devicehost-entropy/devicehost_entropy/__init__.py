"""A virtio entropy device (virtio-rng, device id 4): fills the guest's buffers with random bytes.

The whole device: one queue; the guest posts writable buffers; the device fills each with bytes
from the host's ``os.urandom`` and hands it back.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from devicehost import DeviceContext, hookimpl
from devicehost.virtio import DeviceTraits, QueueResources, VirtQueue

__all__ = ["VIRTIO_ID_ENTROPY", "EntropyConfig", "EntropyDevice", "EntropyRunner"]

VIRTIO_ID_ENTROPY = 4


@attrs.frozen
class EntropyConfig:
    """``max_bytes_per_request``: the most bytes put into one guest buffer."""

    max_bytes_per_request: int = attrs.field(default=4096, validator=attrs.validators.gt(0))


@attrs.define
class EntropyRunner:
    """Per-open state: the request queue and how many bytes were served."""

    queue: VirtQueue
    served: int = 0

    async def serve(self, limit: int) -> None:
        while True:
            # Cancel-safe: the only await is before a chain is taken off the queue.
            chain = await self.queue.pop_wait()
            n = min(chain.writable_len, limit)
            chain.write_at(0, os.urandom(n))
            self.queue.push(chain, n)
            self.served += n


class EntropyDevice:
    """The device type the entry point names; the host builds one per configured device."""

    config_class = EntropyConfig

    def __init__(self, config: EntropyConfig) -> None:
        self.config = config

    @hookimpl
    def offer(self, ctx: DeviceContext) -> DeviceTraits:
        return DeviceTraits(device_id=VIRTIO_ID_ENTROPY, queue_count=1)

    @hookimpl
    def open(self, ctx: DeviceContext, resources: QueueResources) -> EntropyRunner:
        return EntropyRunner(resources.queues[0])

    @hookimpl
    def run(self, ctx: DeviceContext, runner: EntropyRunner) -> Any:
        return runner.serve(self.config.max_bytes_per_request)

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: EntropyRunner | None) -> dict[str, Any]:
        return {"served_bytes": runner.served if runner else 0}
