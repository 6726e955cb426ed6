"""Nothing runs between save and restore: after ``Host.save`` a guest's VMBus requests wait at the
host's gate, go on after ``Host.resume`` and fail when the host closes instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from devicehost import DeviceContext, DeviceState, hookimpl
from devicehost.host import open_host
from devicehost.testing import StaticRegistry
from devicehost.testing.registry import DeviceSpec
from devicehost.vmbus.client import VmbusClient
from devicehost.vmbus.server import ChannelRequestError
from devicehost.vmbus.transport import VmbusTransport
from devicehost_vmbfs.client import VmbfsClient
from devicehost_vmbfs.device import VmbfsConfig, VmbfsDevice
from devicehost_vmbfs.runner import VmbfsRunner

pytestmark = pytest.mark.anyio

#: The hooks the recording device ran, in order.
HOOKS: list[str] = []


class RecordingVmbfs(VmbfsDevice):
    """vmbfs, recording when its open, run and close hooks execute."""

    @hookimpl
    def open(self, ctx: DeviceContext, resources: Any) -> VmbfsRunner:
        HOOKS.append("open")
        return super().open(ctx, resources)

    @hookimpl
    def run(self, ctx: DeviceContext, runner: VmbfsRunner) -> Any:
        HOOKS.append("run")
        return super().run(ctx, runner)

    @hookimpl
    def close(self, ctx: DeviceContext, runner: VmbfsRunner, subchannel_index: int) -> None:
        HOOKS.append("close")


@attrs.frozen
class Config:
    devices: tuple[DeviceSpec, ...]


REGISTRY = StaticRegistry({"vmbfs": RecordingVmbfs})


def vmbfs_config(tmp_path: Path) -> Config:
    (tmp_path / "hive").write_bytes(b"hive bytes")
    return Config((DeviceSpec("fs", "vmbfs", VmbfsConfig(file=str(tmp_path / "hive"))),))


async def test_a_guest_open_after_save_waits_until_resume(tmp_path: Path) -> None:
    HOOKS.clear()
    with anyio.fail_after(30):
        async with open_host(REGISTRY, vmbfs_config(tmp_path)) as host:
            client: VmbusClient = host.transport(VmbusTransport).client()
            offer = await client.wait_offer(lambda o: True)
            await host.save()
            opened: list[Any] = []

            async def guest_open() -> None:
                opened.append(await client.open(offer))

            async with anyio.create_task_group() as tg:
                tg.start_soon(guest_open)
                await host.gate.until_waiting(1)
                await anyio.wait_all_tasks_blocked()
                # The guest's open is held: no hook ran, the device is not open.
                assert HOOKS == [] and opened == []
                assert host.devices["fs"].state is DeviceState.OFFERED
                await host.resume()
            assert HOOKS == ["open", "run"]
            assert host.devices["fs"].state is DeviceState.RUNNING
            vmbfs = VmbfsClient(opened[0].message_pipe())
            await vmbfs.negotiate()
            assert await vmbfs.read_file("/imc.hiv") == b"hive bytes"


async def test_a_guest_close_after_save_waits_and_the_running_device_resumes(
    tmp_path: Path,
) -> None:
    HOOKS.clear()
    with anyio.fail_after(30):
        async with open_host(REGISTRY, vmbfs_config(tmp_path)) as host:
            client = host.transport(VmbusTransport).client()
            channel = await client.open(await client.wait_offer(lambda o: True))
            await VmbfsClient(channel.message_pipe()).negotiate()
            await host.save()
            device = host.devices["fs"]
            assert device.state is DeviceState.OPEN  # stopped by the save
            async with anyio.create_task_group() as tg:
                tg.start_soon(channel.close)
                await host.gate.until_waiting(1)
                await anyio.wait_all_tasks_blocked()
                assert HOOKS == ["open", "run"]  # no close hook ran
                await host.resume()
            assert HOOKS == ["open", "run", "run", "close"]
            assert device._state_now() is DeviceState.CLOSED


async def test_a_guest_open_held_at_a_saved_host_fails_when_the_host_closes(
    tmp_path: Path,
) -> None:
    HOOKS.clear()
    errors: list[BaseException] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg, open_host(
            REGISTRY, vmbfs_config(tmp_path)
        ) as host:
            client = VmbusClient(host.transport(VmbusTransport).server,
                                 host.transport(VmbusTransport).allocator)
            offer = await client.wait_offer(lambda o: True)
            await host.save()

            async def guest_open() -> None:
                try:
                    await client.open(offer)
                except ChannelRequestError as exc:
                    errors.append(exc)

            tg.start_soon(guest_open)
            await host.gate.until_waiting(1)
        # The host closed: the held open is refused, and the device never ran.
    assert len(errors) == 1
    assert HOOKS == []
