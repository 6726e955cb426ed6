"""Save and restore of a device in a worker: the saved state crosses as a saved-state value, and
the descriptors it declares (``ctx.fds``) cross both ways with it."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import anyio
import attrs
import pytest

from devicehost.config import HostSettings
from devicehost.handoff import Handoff
from devicehost.host import open_host
from devicehost.lifecycle import DeviceState
from devicehost.testing import StaticRegistry, host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.worker import WorkerSettings

pytestmark = pytest.mark.anyio


def _load(module: str) -> ModuleType:
    name = f"devicehost_tests_{module}"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "thirdparty" / "src" / f"{module}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        spec.loader.exec_module(loaded)
    return sys.modules[name]


keeper = _load("dh_keeper")


async def test_a_saved_descriptor_crosses_to_the_supervisor_and_back() -> None:
    specs = [DeviceSpec("k", "keeper", None, WorkerSettings(isolation="process"))]
    with anyio.fail_after(60):
        async with host_with({"keeper": keeper.KeeperDevice}, specs) as host:
            device = host.devices["k"]
            before = (await device.inspect())["device"]
            assert before["pid"] != os.getpid()
            assert await device.stop()
            device.ctx.fds.begin_save(carry=True)
            state = await device.save()
            assert isinstance(state, keeper.KeeperState) and state.token == before["token"]
            drained = device.ctx.fds.drain()
            assert [(h, kind) for h, kind, _fd in drained] == [(state.handle, "socket")]
            (_, _, fd) = drained[0]
            # The supervisor holds the very socket the worker's runner holds.
            assert os.fstat(fd).st_ino == before["inode"]
            device.forget_runner()
            device.ctx.fds.load({state.handle: (fd, "socket")})
            await device.restore(state, device.offer_value)
            after = (await device.inspect())["device"]
            assert after["inode"] == before["inode"] and after["token"] == state.token
            assert device.ctx.fds.discard() == []  # the worker took it
            assert await device.start()


@attrs.frozen
class _Config:
    devices: tuple[DeviceSpec, ...]
    host: HostSettings = attrs.field(factory=HostSettings)


class _InProcessTakeover:
    """The takeover client's interface, over a handoff made in this process."""

    def __init__(self, handoff: Handoff) -> None:
        self.handoff = handoff
        self.confirmed = False

    async def request(self) -> Handoff:
        return self.handoff

    async def confirm(self) -> None:
        self.confirmed = True

    async def refuse(self, why: str) -> None:
        raise AssertionError(f"the takeover was refused: {why}")


async def test_a_device_in_a_worker_is_taken_over_by_a_new_host_with_its_descriptor() -> None:
    spec = DeviceSpec("k", "keeper", None, WorkerSettings(isolation="process"))
    with anyio.fail_after(60):
        async with host_with({"keeper": keeper.KeeperDevice}, [spec]) as old:
            before = (await old.devices["k"].inspect())["device"]
            handoff = await old.save_for_handoff()
            takeover = _InProcessTakeover(handoff)
            registry = StaticRegistry({"keeper": keeper.KeeperDevice})
            async with open_host(registry, _Config((spec,)), takeover=takeover) as new:
                device = new.devices["k"]
                after = (await device.inspect())["device"]
                assert takeover.confirmed and new.restore_report == {"k": "restored"}
                assert after["pid"] not in (before["pid"], os.getpid())
                assert after["inode"] == before["inode"] and after["token"] == before["token"]
                assert device.state is DeviceState.RUNNING
            old.abandon_devices = True  # handed over: the old host closes nothing
