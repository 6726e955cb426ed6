"""The host: devices built from config, failures isolated per device, graceful shutdown."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import anyio
import attrs
import pytest

from devicehost import DeviceContext, DeviceState, LocalOffer, hookimpl
from devicehost.host import Host
from devicehost.serving import run_host
from devicehost.testing import StaticRegistry, host_with
from devicehost.testing.registry import DeviceSpec


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Echo:
    """A local device whose runner records what happened to it."""

    def __init__(self, config: Any = None) -> None:
        self.events: list[str] = []

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer({"name": ctx.name})

    @hookimpl
    def open(self, ctx: DeviceContext, resources: LocalOffer) -> list[str]:
        self.events.append(f"open {resources.description['name']}")
        return self.events

    @hookimpl
    def run(self, ctx: DeviceContext, runner: list[str]) -> Any:
        runner.append("run")
        return anyio.sleep_forever()

    @hookimpl
    def close(self, ctx: DeviceContext, runner: list[str], subchannel_index: int) -> None:
        runner.append(f"close {subchannel_index}")


class BrokenConstructor(Echo):
    def __init__(self, config: Any = None) -> None:
        raise RuntimeError("constructor exploded")


class BrokenOffer(Echo):
    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        raise ValueError("offer exploded")


class BrokenRun(Echo):
    @hookimpl
    def run(self, ctx: DeviceContext, runner: list[str]) -> Any:
        async def boom() -> None:
            await anyio.sleep(0)
            raise OSError("run exploded")

        return boom()


class UnknownOffer(Echo):
    # Deliberately not an offer type (hence the ignore): the host must fail the device.
    @hookimpl
    def offer(self, ctx: DeviceContext) -> object:  # type: ignore[override]
        return object()


CLASSES = {
    "echo": Echo,
    "ctor": BrokenConstructor,
    "offer": BrokenOffer,
    "run": BrokenRun,
    "unknown": UnknownOffer,
}


@pytest.mark.anyio
async def test_broken_devices_never_take_down_the_host_or_each_other() -> None:
    specs = [DeviceSpec(n, n) for n in CLASSES] + [DeviceSpec("echo2", "echo")]
    async with host_with(CLASSES, specs) as host:
        await anyio.sleep(0.01)
        assert host.devices["echo"].state is DeviceState.RUNNING
        assert host.devices["echo2"].state is DeviceState.RUNNING
        assert "ctor" not in host.devices
        assert "constructor exploded" in host.failures["ctor"]
        assert host.devices["offer"].state is DeviceState.FAILED
        assert "offer exploded" in host.failures["offer"]
        assert host.devices["run"].state is DeviceState.FAILED
        assert "run exploded" in (host.devices["run"].failure or "")
        assert "no transport serves an offer of type builtins.object" in host.failures["unknown"]
        echo = host.devices["echo"]
        events = echo.runner
        tree = await host.inspect()
        states = {d["name"]: d["state"] for d in tree["devices"]}
        assert states["echo"] == "running" and states["run"] == "failed"
    # Leaving the host closed every device, last added first, with the close hook called.
    assert events == ["open echo", "run", "close 0"]


@pytest.mark.anyio
async def test_remove_device_revokes_it() -> None:
    async with host_with({"echo": Echo}) as host:
        device = host.devices["echo"]
        events = device.runner
        await host.remove_device("echo")
        assert device.state is DeviceState.REVOKED
        assert events[-1] == "close 0"
        assert "echo" not in host.devices


@pytest.mark.anyio
async def test_duplicate_device_name_is_refused() -> None:
    async with host_with({"echo": Echo}) as host:
        with pytest.raises(Exception, match="already exists"):
            await host.add_device("echo", "echo", None)


@pytest.mark.anyio
async def test_guest_memory_is_shared_memfd_made_on_first_use() -> None:
    async with anyio.create_task_group() as tg:
        host = Host(StaticRegistry({}), tg, guest_memory_size=1 << 20)
        assert host._guest_memory is None
        memory = host.guest_memory
        assert memory.size == 1 << 20 and memory.regions[0].fd is not None
        await host.aclose()


@attrs.frozen
class _Config:
    devices: tuple[DeviceSpec, ...]


@pytest.mark.anyio
async def test_run_host_serves_until_sigterm_then_closes_gracefully() -> None:
    seen: list[Host] = []

    def ready(host: Host) -> None:
        seen.append(host)
        os.kill(os.getpid(), signal.SIGTERM)

    registry = StaticRegistry({"echo": Echo})
    with anyio.fail_after(10):
        status = await run_host(registry, _Config((DeviceSpec("echo", "echo"),)), ready=ready)
    assert status == 0
    assert seen and seen[0].devices == {}


@pytest.mark.anyio
async def test_run_host_fails_when_no_device_can_be_served() -> None:
    registry = StaticRegistry({"ctor": BrokenOffer})
    with anyio.fail_after(10):
        status = await run_host(registry, _Config((DeviceSpec("x", "ctor"),)))
    assert status == 3  # exitcodes.NOT_STARTED


class ExitingConstructor(Echo):
    def __init__(self, config: Any = None) -> None:
        sys.exit(7)


class ExitingOffer(Echo):
    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        raise SystemExit("offer called sys.exit")


class ExitingOpen(Echo):
    @hookimpl
    def open(self, ctx: DeviceContext, resources: LocalOffer) -> list[str]:
        sys.exit(8)


class ExitingRun(Echo):
    @hookimpl
    def run(self, ctx: DeviceContext, runner: list[str]) -> Any:
        async def leave() -> None:
            await anyio.sleep(0)
            raise SystemExit(9)

        return leave()


class ExitingRunInGroup(Echo):
    """A run whose own task group ends with SystemExit (an exception group of it)."""

    @hookimpl
    def run(self, ctx: DeviceContext, runner: list[str]) -> Any:
        async def leave() -> None:
            raise SystemExit(10)

        async def group() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(leave)
                await anyio.sleep_forever()

        return group()


EXITING = {
    "echo": Echo,
    "ctor": ExitingConstructor,
    "offer": ExitingOffer,
    "open": ExitingOpen,
    "run": ExitingRun,
}


@pytest.mark.anyio
async def test_system_exit_from_a_plugin_fails_only_its_device() -> None:
    specs = [DeviceSpec("echo", "echo"), *(DeviceSpec(n, n) for n in EXITING if n != "echo"),
             DeviceSpec("echo2", "echo")]
    with anyio.fail_after(30):
        async with host_with(EXITING, specs) as host:
            await anyio.wait_all_tasks_blocked()  # the failing run tasks have ended
            assert host.devices["echo"].state is DeviceState.RUNNING
            assert host.devices["echo2"].state is DeviceState.RUNNING
            assert "ctor" not in host.devices
            assert host.failures["ctor"] == "cannot build device: SystemExit: 7"
            assert host.devices["offer"].state is DeviceState.FAILED
            assert "SystemExit: offer called sys.exit" in (host.devices["offer"].failure or "")
            assert host.devices["open"].failure == "open: SystemExit: 8"
            assert host.devices["run"].failure == "run: SystemExit: 9"
            events = host.devices["echo"].runner
    # The host stopped cleanly, closing the devices that were still serving.
    assert events == ["open echo", "run", "close 0"]


@pytest.mark.anyio
async def test_system_exit_in_a_plugins_own_task_fails_only_its_device(
    anyio_backend: str,
) -> None:
    if anyio_backend == "asyncio":
        # asyncio re-raises SystemExit from any task straight out of the event loop
        # (Task.__step), before any code of the host can see it: documented in
        # docs/security.md as not contained in process.
        pytest.skip("asyncio ends the loop on SystemExit in a task the plugin spawned")
    specs = [DeviceSpec("echo", "echo"), DeviceSpec("group", "group")]
    classes = {"echo": Echo, "group": ExitingRunInGroup}
    with anyio.fail_after(30):
        async with host_with(classes, specs) as host:
            await anyio.wait_all_tasks_blocked()
            device = host.devices["group"]
            assert device.state is DeviceState.FAILED
            assert "[SystemExit: 10]" in (device.failure or "")
            assert host.devices["echo"].state is DeviceState.RUNNING


@pytest.mark.anyio
async def test_run_host_keeps_serving_beside_a_plugin_that_calls_sys_exit() -> None:
    seen: list[Host] = []

    def ready(host: Host) -> None:
        seen.append(host)
        os.kill(os.getpid(), signal.SIGTERM)

    registry = StaticRegistry(EXITING)
    specs = (DeviceSpec("echo", "echo"), DeviceSpec("ctor", "ctor"), DeviceSpec("open", "open"))
    with anyio.fail_after(30):
        status = await run_host(registry, _Config(specs), ready=ready)
    assert status == 1  # exitcodes.FAILED: echo was served until the stop, two devices failed
    assert seen[0].failures["ctor"] == "cannot build device: SystemExit: 7"


@pytest.mark.anyio
async def test_the_hosts_own_cancellation_still_ends_a_plugin_call() -> None:
    class Slow(Echo):
        @hookimpl
        def open(self, ctx: DeviceContext, resources: LocalOffer) -> Any:
            return anyio.sleep_forever()

    with anyio.fail_after(30):
        with anyio.move_on_after(0.05) as scope:
            async with host_with({"slow": Slow}):
                pass
    assert scope.cancelled_caught
