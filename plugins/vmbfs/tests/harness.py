"""A vmbfs device served over an in-process channel pair, for the runner and device tests."""

from __future__ import annotations

import logging
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import attrs

from devicehost import DeviceContext
from devicehost.vmbus.channel import RawChannel, connected_channel_pair
from devicehost.vmbus.pipe import MessagePipe
from devicehost_vmbfs.client import VmbfsClient
from devicehost_vmbfs.core import ProtocolState
from devicehost_vmbfs.device import VmbfsConfig, VmbfsDevice, VmbfsSavedState
from devicehost_vmbfs.runner import VmbfsRunner

RING_SIZE = 4 * 4096  # the smallest host->guest ring vmbfs can use (§8.6 (a))


def context(config: VmbfsConfig) -> DeviceContext:
    return DeviceContext("vmbfs0", "vmbfs", config, logging.getLogger("test.vmbfs"))


def resources(channel: RawChannel) -> object:
    """What the device's open hook reads: the channel (the transport adds memory, request)."""
    return types.SimpleNamespace(channel=channel)


@attrs.define
class Served:
    """A device whose ``run`` executes in ``tg``; ``done`` is set when a run *returns*."""

    device: VmbfsDevice
    ctx: DeviceContext
    runner: VmbfsRunner
    host: RawChannel
    guest: RawChannel
    pipe: MessagePipe
    client: VmbfsClient
    tg: anyio.abc.TaskGroup
    done: anyio.Event = attrs.field(factory=anyio.Event)
    scope: anyio.CancelScope | None = None
    ended: anyio.Event | None = None

    def start(self) -> None:
        scope, ended = anyio.CancelScope(), anyio.Event()
        self.scope, self.ended = scope, ended

        async def run() -> None:
            try:
                with scope:
                    await self.device.run(self.ctx, self.runner)
                    self.done.set()
            finally:
                ended.set()

        self.tg.start_soon(run)

    async def stop(self) -> None:
        assert self.scope is not None and self.ended is not None
        self.scope.cancel()
        await self.ended.wait()


@asynccontextmanager
async def served(
    config: VmbfsConfig, *, ring_size: int = RING_SIZE, state: ProtocolState | None = None
) -> AsyncIterator[Served]:
    """Serve ``config`` over a fresh channel pair (opened, or restored at ``state``)."""
    device = VmbfsDevice(config)
    ctx = context(config)
    host, guest = connected_channel_pair(ring_size)
    if state is None:
        runner = device.open(ctx, resources(host))
    else:
        runner = device.restore_open(ctx, VmbfsSavedState(state), resources(host))
    pipe = MessagePipe(guest)
    async with anyio.create_task_group() as tg:
        s = Served(device, ctx, runner, host, guest, pipe, VmbfsClient(pipe), tg)
        s.start()
        yield s
        tg.cancel_scope.cancel()
