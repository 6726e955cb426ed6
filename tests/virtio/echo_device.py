"""A small virtio loopback device for the tests: queue 0 carries requests, queue 1 replies.

Every chain popped from queue 0 is read whole; its bytes are written, reversed, into the next
chain popped from queue 1 (which must have enough writable space), and both are pushed back.
Config space: ``le32 magic`` then ``le32 requests handled`` (dynamic, via virtio_config_read).
"""

from __future__ import annotations

import struct
from typing import Any

import anyio
import attrs

from devicehost import DeviceContext, hookimpl, saved_state
from devicehost.virtio import DeviceTraits, QueueResources

MAGIC = 0x4F484345  # "ECHO"


@attrs.frozen
class EchoConfig:
    vhost_user_socket: str = ""
    savable: bool = True


@saved_state("echo_test.Saved", 1)
@attrs.frozen
class EchoSaved:
    handled: int


@attrs.define
class EchoRunner:
    resources: QueueResources
    handled: int = 0


class EchoDevice:
    config_class = EchoConfig

    def __init__(self, config: EchoConfig) -> None:
        self.config = config
        self.runner: EchoRunner | None = None
        self.closed = 0
        self.config_writes: list[tuple[int, bytes]] = []

    @hookimpl
    def offer(self, ctx: DeviceContext) -> DeviceTraits:
        return DeviceTraits(device_id=0x7E, device_features=0b101, queue_count=2,
                            max_queue_size=128, config=struct.pack("<II", MAGIC, 0))

    @hookimpl
    def open(self, ctx: DeviceContext, resources: QueueResources) -> EchoRunner:
        self.runner = EchoRunner(resources)
        return self.runner

    @hookimpl
    def run(self, ctx: DeviceContext, runner: EchoRunner) -> Any:
        return self._run(runner)

    async def _run(self, runner: EchoRunner) -> None:
        requests, replies = runner.resources.queues
        while True:
            request = await requests.pop_wait()
            data = request.read()
            reply = await replies.pop_wait()
            n = min(len(data), reply.writable_len)
            reply.write_at(0, data[::-1][:n])
            requests.push(request, 0)
            replies.push(reply, n)
            runner.handled += 1
            await anyio.lowlevel.checkpoint()

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: EchoRunner) -> EchoSaved | None:
        return EchoSaved(runner.handled) if self.config.savable else None

    @hookimpl
    def restore_open(
        self, ctx: DeviceContext, state: EchoSaved, resources: QueueResources
    ) -> EchoRunner:
        self.runner = EchoRunner(resources, state.handled)
        return self.runner

    @hookimpl
    def close(self, ctx: DeviceContext, runner: EchoRunner, subchannel_index: int) -> None:
        self.closed += 1
        self.runner = None

    def virtio_config_read(self, offset: int, size: int) -> bytes:
        handled = self.runner.handled if self.runner is not None else 0
        return struct.pack("<II", MAGIC, handled)[offset : offset + size]

    def virtio_config_write(self, offset: int, data: bytes) -> None:
        self.config_writes.append((offset, data))
