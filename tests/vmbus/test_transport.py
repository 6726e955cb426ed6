"""The VMBus transport: channel events drive the device lifecycle; save/restore; the test kit."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import attrs
import pytest

from devicehost import DeviceContext, hookimpl
from devicehost.errors import ConfigError, LifecycleError
from devicehost.lifecycle import Device, DeviceState, new_device_manager
from devicehost.memory import GuestMemory
from devicehost.savedstate import saved_state
from devicehost.testing import DeviceConformance
from devicehost.testing.vmbus import check_vmbus_device, vmbus_guest
from devicehost.vmbus import (
    ConnectionReset,
    DeviceChannel,
    Guid,
    MessagePipe,
    OfferParams,
    OpenResources,
)
from devicehost.vmbus.server import ChannelRequestError
from devicehost.vmbus.transport import VmbusTransport

pytestmark = pytest.mark.anyio

IFACE = Guid.parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
INST = Guid.parse("12345678-9abc-4def-8123-456789abcdef")


@saved_state("vmbustest.EchoState", 1)
@attrs.frozen
class EchoState:
    count: int


@attrs.frozen
class EchoConfig:
    prefix: bytes = b"echo:"
    saves: bool = True


class EchoRunner:
    def __init__(self, resources: OpenResources, count: int = 0) -> None:
        self.resources = resources
        self.pipe = MessagePipe(resources.channel)
        self.count = count


class Echo:
    """A VMBus device: answers each pipe message with prefix + count + message."""

    config_class = EchoConfig

    def __init__(self, config: EchoConfig) -> None:
        self.config = config
        self.fail_open = False
        self.closed: list[int] = []

    @hookimpl
    def offer(self, ctx: DeviceContext) -> OfferParams:
        return OfferParams("echo", INST, IFACE, channel_type=DeviceChannel(pipe_packets=True))

    @hookimpl
    def open(self, ctx: DeviceContext, resources: OpenResources) -> EchoRunner:
        if self.fail_open:
            raise RuntimeError("cannot open now")
        return EchoRunner(resources)

    @hookimpl
    def run(self, ctx: DeviceContext, runner: EchoRunner) -> Any:
        async def echo() -> None:
            try:
                while True:
                    message = await runner.pipe.recv()
                    runner.count += 1
                    await runner.pipe.send(self.config.prefix + b"%d:" % runner.count + message)
            except ConnectionReset:
                return

        return echo()

    @hookimpl
    def close(self, ctx: DeviceContext, runner: EchoRunner, subchannel_index: int) -> None:
        self.closed.append(subchannel_index)

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: EchoRunner) -> EchoState | None:
        return EchoState(runner.count) if self.config.saves else None

    @hookimpl
    def restore_open(self, ctx: DeviceContext, state: EchoState,
                     resources: OpenResources) -> EchoRunner:
        return EchoRunner(resources, state.count)


class TestEchoConformance(DeviceConformance):
    device_class = Echo


class FakeHost:
    """The attributes of devicehost.host.Host the transport uses."""

    def __init__(self, memory: GuestMemory, task_group: anyio.abc.TaskGroup) -> None:
        self.guest_memory = memory
        self.task_group = task_group
        self.logger = logging.getLogger("test")


def make_device(tg: anyio.abc.TaskGroup, config: EchoConfig | None = None,
                name: str = "echo") -> Device:
    config = config or EchoConfig()
    ctx = DeviceContext(name, "echo", config, logging.getLogger(name))
    return Device(ctx, new_device_manager(Echo(config), name), tg)


@asynccontextmanager
async def fake_host(memory: GuestMemory | None = None) -> AsyncIterator[FakeHost]:
    own = memory is None
    mem = GuestMemory.memfd(4 * 1024 * 1024) if memory is None else memory
    try:
        async with anyio.create_task_group() as tg:
            yield FakeHost(mem, tg)
            tg.cancel_scope.cancel()
    finally:
        if own:
            mem.close()


def state(device: Device) -> DeviceState:
    # Read afresh: the state changes across awaits, which type narrowing does not know.
    return device.state


def echo_of(device: Device) -> Echo:
    (plugin,) = [p for p in device.pm.get_plugins() if isinstance(p, Echo)]
    return plugin


async def test_guest_open_close_drive_the_lifecycle() -> None:
    async with fake_host() as host:
        transport = VmbusTransport(host)
        device = make_device(host.task_group)
        await transport.add(device, await device.offer())
        assert state(device) is DeviceState.OFFERED
        client = transport.client()
        offer = await client.wait_offer(lambda o: o.offer.key == transport.handle_of(device).key)
        with anyio.fail_after(5):
            channel = await client.open(offer)
            assert state(device) is DeviceState.RUNNING
            runner = device.runner
            assert isinstance(runner, EchoRunner)
            assert runner.resources.memory is host.guest_memory
            assert runner.resources.request.open_data.ring_gpadl_id == channel.gpadl_id
            pipe = channel.message_pipe()
            await pipe.send(b"hi")
            assert await pipe.recv() == b"echo:1:hi"
            await channel.close()
        assert state(device) is DeviceState.CLOSED and device.runner is None
        assert echo_of(device).closed == [0]
        await transport.aclose()


async def test_failing_open_is_reported_to_the_guest() -> None:
    async with fake_host() as host:
        transport = VmbusTransport(host)
        device = make_device(host.task_group)
        await transport.add(device, await device.offer())
        echo_of(device).fail_open = True
        client = transport.client()
        offer = await client.wait_offer(lambda o: True)
        with pytest.raises(ChannelRequestError, match="cannot open now") as info:
            await client.open(offer)
        assert info.value.status == 0x8000FFFF
        assert state(device) is DeviceState.FAILED and "cannot open now" in (device.failure or "")
        echo_of(device).fail_open = False
        with anyio.fail_after(5):
            channel = await client.open(offer)
        assert state(device) is DeviceState.RUNNING
        await channel.close()
        await transport.aclose()


async def test_wrong_offer_and_double_add_are_config_errors() -> None:
    async with fake_host() as host:
        transport = VmbusTransport(host)
        device = make_device(host.task_group)
        with pytest.raises(ConfigError, match="needs OfferParams"):
            await transport.add(device, object())
        await transport.add(device, await device.offer())
        with pytest.raises(ConfigError, match="already offered"):
            await transport.add(device, await device.offer())
        await transport.aclose()


async def test_remove_revokes_an_open_device() -> None:
    async with fake_host() as host:
        transport = VmbusTransport(host)
        device = make_device(host.task_group)
        await transport.add(device, await device.offer())
        client = transport.client()
        offer = await client.wait_offer(lambda o: True)
        with anyio.fail_after(5):
            channel = await client.open(offer)
            await transport.remove(device)
        assert state(device) is DeviceState.REVOKED and echo_of(device).closed == [0]
        assert offer.revoked is not None and offer.revoked.is_set()
        assert transport.inspect() == {"channels": [], "gpadls": {}}
        await channel.close()
        await transport.aclose()


async def restore_round_trip(config: EchoConfig) -> tuple[Any, Any, int]:
    """Open, exchange, save on one transport; restore on a fresh one over the same memory."""
    memory = GuestMemory.memfd(4 * 1024 * 1024)
    async with fake_host(memory) as host:
        transport = VmbusTransport(host)
        device = make_device(host.task_group, config)
        await transport.add(device, await device.offer())
        client = transport.client()
        offer = await client.wait_offer(lambda o: True)
        with anyio.fail_after(5):
            channel = await client.open(offer)
            pipe = channel.message_pipe()
            await pipe.send(b"one")
            assert await pipe.recv() == config.prefix + b"1:one"
            saved = await transport.save()
            assert state(device) is DeviceState.RUNNING  # started again after saving
            await device.stop()
    async with fake_host(memory) as host2:
        transport2 = VmbusTransport(host2)
        transport2.restore(saved)
        device2 = make_device(host2.task_group, config)
        await transport2.add(device2, await device2.offer())
        with pytest.raises(LifecycleError):
            transport2.restore(saved)
        with anyio.fail_after(5):
            await client.reconnect(transport2.server)
            result = (saved, offer, transport2.handle_of(device2).channel_id)
            if config.saves:
                assert state(device2) is DeviceState.RUNNING
                pipe = channel.message_pipe()
                await pipe.send(b"two")
                assert await pipe.recv() == config.prefix + b"2:two"
            else:
                # The old channel is gone; the new offer opens afresh (the count starts over).
                assert state(device2) is DeviceState.OFFERED and client.channels == {}
                fresh = await client.wait_offer(lambda o: o.channel_id == result[2])
                channel = await client.open(fresh)
                pipe = channel.message_pipe()
                await pipe.send(b"two")
                assert await pipe.recv() == config.prefix + b"1:two"
            await client.aclose()
            await transport2.aclose()
    memory.close()
    return result


async def test_save_restore_keeps_the_open_channel() -> None:
    saved, offer, channel_id = await restore_round_trip(EchoConfig())
    assert saved.devices == {"echo": EchoState(1)}
    assert saved.server.channels[0].open is not None
    assert channel_id == offer.channel_id == 1


async def test_device_without_save_support_is_offered_anew() -> None:
    saved, offer, channel_id = await restore_round_trip(EchoConfig(saves=False))
    assert saved.devices == {"echo": None}
    assert channel_id == 2 and offer.revoked is not None and offer.revoked.is_set()


async def test_resources_for_restore_rebuild_the_runner_in_process() -> None:
    async with fake_host() as host:
        transport = VmbusTransport(host)
        device = make_device(host.task_group)
        await transport.add(device, await device.offer())
        client = transport.client()
        with anyio.fail_after(5):
            channel = await client.open(await client.wait_offer(lambda o: True))
            pipe = channel.message_pipe()
            await pipe.send(b"a")
            assert await pipe.recv() == b"echo:1:a"
            await device.stop()
            state = await device.save()
            resources = transport.resources_for_restore(device)
            device.forget_runner()
            await device.restore(state, resources)
            await device.start()
            await pipe.send(b"b")
            assert await pipe.recv() == b"echo:2:b"
        await client.aclose()
        await transport.aclose()


async def test_vmbus_guest_helper() -> None:
    with anyio.fail_after(10):
        async with vmbus_guest(Echo) as guest:
            await guest.pipe.send(b"x")
            assert await guest.pipe.recv() == b"echo:1:x"
            assert state(guest.device) is DeviceState.RUNNING
            await guest.close()
            assert state(guest.device) is DeviceState.CLOSED
            with pytest.raises(RuntimeError, match="not open"):
                guest.pipe  # noqa: B018
            await guest.open()
            await guest.pipe.send(b"y")
            assert await guest.pipe.recv() == b"echo:1:y"
        async with vmbus_guest(Echo, EchoConfig(prefix=b">"), open_channel=False) as guest:
            assert guest.channel is None and state(guest.device) is DeviceState.OFFERED
            await guest.open()
            await guest.pipe.send(b"z")
            assert await guest.pipe.recv() == b">1:z"
        assert state(guest.device) is DeviceState.REVOKED


async def test_check_vmbus_device_passes_a_good_device() -> None:
    await check_vmbus_device(Echo)


class Quitter(Echo):
    """Breaks the contract: its run returns at once, so the guest's open leaves it done."""

    @hookimpl
    def run(self, ctx: DeviceContext, runner: EchoRunner) -> Any:
        async def quit_now() -> None:
            return None

        return quit_now()


class Unstable(Echo):
    """Breaks the contract: a different instance id at every offer."""

    @hookimpl
    def offer(self, ctx: DeviceContext) -> OfferParams:
        return OfferParams("unstable", Guid.new_random(), IFACE)


@pytest.mark.parametrize(("device_class", "match"),
                         [(Quitter, "must run the device"), (Unstable, "same channel")])
async def test_check_vmbus_device_catches_broken_devices(device_class: type[Any],
                                                         match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        await check_vmbus_device(device_class)
