"""Deadlines of the device hooks, inline: a stuck device is abandoned, the others keep serving,
the host stops and names it (asyncio and trio).

The stuck device is tests/thirdparty/src/dh_stuck.py, the plugin the ``devicehost run`` tests
install; beside it an echo device whose ``run`` answers requests shows that the host goes on.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.abc
import attrs
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from devicehost import DeviceContext, LocalOffer, hookimpl
from devicehost.config import HostSettings
from devicehost.detached import Deadlines, abandoned, running
from devicehost.errors import DeviceError
from devicehost.host import Host, open_host
from devicehost.lifecycle import Device, DeviceState
from devicehost.testing import StaticRegistry, host_with
from devicehost.testing.registry import DeviceSpec


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _load_stuck() -> ModuleType:
    name = "devicehost_tests_stuck"
    if name not in sys.modules:
        path = Path(__file__).parent / "thirdparty" / "src" / "dh_stuck.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


stuck = _load_stuck()
#: Short deadlines: the stuck device is given up on quickly (the others are never waited for).
SHORT = HostSettings(hook_deadline=0.5, stop_deadline=0.5)


@attrs.frozen
class EchoConfig:
    requests: MemoryObjectReceiveStream[int]
    replies: MemoryObjectSendStream[int]


class Echo:
    """A device whose ``run`` answers each request with the request plus one."""

    def __init__(self, config: EchoConfig) -> None:
        self.config = config

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer()

    @hookimpl
    def open(self, ctx: DeviceContext, resources: LocalOffer) -> str:
        return "echo"

    @hookimpl
    def run(self, ctx: DeviceContext, runner: str) -> Any:
        return self._run()

    async def _run(self) -> None:
        async for request in self.config.requests:
            await self.config.replies.send(request + 1)


class Pair:
    """The test's end of an echo device."""

    def __init__(self) -> None:
        self.send, requests = anyio.create_memory_object_stream[int](1)
        replies, self.receive = anyio.create_memory_object_stream[int](1)
        self.config = EchoConfig(requests, replies)

    async def round_trip(self, value: int) -> None:
        with anyio.fail_after(30):
            await self.send.send(value)
            assert await self.receive.receive() == value + 1


def state_of(device: Device) -> DeviceState:
    """The state as of now (a call: mypy keeps no narrowing across it)."""
    return device.state


def instance(device: Device) -> Any:
    return device.pm.get_plugin(device.name)


async def release(device: Device) -> None:
    """Let the stuck plugin go, and wait until its abandoned task has ended (so that the event
    loop, trio's in particular, can finish)."""
    plugin = instance(device)
    plugin.released.set()
    plugin.thread_released.set()
    assert device.abandoned_task is not None
    with anyio.fail_after(30):
        await device.abandoned_task.done.wait()


@asynccontextmanager
async def stuck_host(
    hang: str, how: str, pair: Pair, saved: bytes | None = None
) -> AsyncIterator[Host]:
    registry = StaticRegistry({"stuck": stuck.StuckDevice, "echo": Echo})
    config = _Config((DeviceSpec("echo", "echo", pair.config),
                      DeviceSpec("stuck", "stuck", stuck.StuckConfig(hang=hang, how=how))),
                     SHORT)
    async with open_host(registry, config, saved=saved) as host:
        yield host


@attrs.frozen
class _Config:
    devices: tuple[DeviceSpec, ...]
    host: HostSettings


def assert_abandoned(device: Device, hook: str, caplog: pytest.LogCaptureFixture) -> None:
    """``device`` missed the deadline of ``hook``: FAILED for good, named, logged once."""
    assert device.state is DeviceState.FAILED
    assert device.abandoned
    assert device.failure is not None and device.failure.startswith(f"{hook}: ")
    assert "0.5 s" in device.failure and "abandoned" in device.failure
    lines = [r.getMessage() for r in caplog.records
             if r.name == "devicehost.device.stuck" and r.levelno == logging.ERROR]
    assert lines == [f"device 'stuck' failed in {device.failure}"]


@pytest.mark.anyio
@pytest.mark.parametrize("hang,how", [
    ("offer", "forever"), ("offer", "swallow"), ("offer", "thread"),
    ("open", "forever"), ("open", "swallow"), ("open", "thread"),
    ("inspect", "swallow"),
])
async def test_a_hook_that_hangs_at_start_is_abandoned_and_the_others_serve(
    hang: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    pair = Pair()
    with anyio.fail_after(30):
        async with stuck_host(hang, how, pair) as host:
            device = host.devices["stuck"]
            if hang == "inspect":
                tree = await host.inspect()
                (entry,) = [d for d in tree["devices"] if d["name"] == "stuck"]
                assert entry["state"] == "failed"
                assert entry["failure"] == device.failure
            assert_abandoned(device, hang, caplog)
            await pair.round_trip(1)
            assert host.devices["echo"].state is DeviceState.RUNNING
        # The host closed although the stuck plugin is still stuck (a plain wait ends when the
        # abandoned task is cancelled).
        assert device.abandoned_task is not None
        assert device.abandoned_task.done.is_set() is (how == "forever")
        assert (f"device 'stuck' {hang}" in abandoned()) is (how != "forever")
        await release(device)
    assert f"device 'stuck' {hang}" not in abandoned()


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["forever", "swallow", "thread"])
async def test_a_close_that_hangs_does_not_keep_the_host_open(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    pair = Pair()
    with anyio.fail_after(30):
        async with stuck_host("close", how, pair) as host:
            device = host.devices["stuck"]
            await pair.round_trip(1)
        assert_abandoned(device, "close", caplog)
        await release(device)


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["swallow", "thread"])
async def test_a_run_that_will_not_stop_is_abandoned_and_the_host_stops(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    pair = Pair()
    with anyio.fail_after(30):
        async with stuck_host("run", how, pair) as host:
            device = host.devices["stuck"]
            with anyio.fail_after(30):
                await instance(device).hanging.wait()
            assert await device.stop() is False
            assert_abandoned(device, "run", caplog)
            assert "did not stop within 0.5 s" in (device.failure or "")
            await pair.round_trip(1)
            assert await device.start() is False
        await release(device)


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["swallow", "thread"])
async def test_a_run_that_will_not_stop_at_shutdown_is_abandoned(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    pair = Pair()
    with anyio.fail_after(30):
        async with stuck_host("run", how, pair) as host:
            device = host.devices["stuck"]
            with anyio.fail_after(30):
                await instance(device).hanging.wait()
            await pair.round_trip(1)
        assert_abandoned(device, "run", caplog)
        await release(device)


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["forever", "swallow"])
async def test_a_save_open_that_hangs_saves_the_others_and_stops(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    pair = Pair()
    with anyio.fail_after(30):
        async with stuck_host("save_open", how, pair) as host:
            device = host.devices["stuck"]
            data = await host.save()
            assert_abandoned(device, "save_open", caplog)
            await host.resume()
            await pair.round_trip(1)
        await release(device)
    from devicehost.savedstate import decode_envelope_untrusted

    entries = {e.device: e.type_name for e in decode_envelope_untrusted(data)}
    assert entries == {"echo": "host.NotSaved", "stuck": "host.NotSaved"}


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["forever", "swallow"])
async def test_a_restore_open_that_hangs_is_abandoned_and_the_others_serve(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    pair = Pair()
    with anyio.fail_after(30):
        async with stuck_host("nothing", how, pair) as host:
            data = await host.save()
        async with stuck_host("restore_open", how, pair, saved=data) as host:
            device = host.devices["stuck"]
            assert_abandoned(device, "restore_open", caplog)
            assert host.restore_report["stuck"].startswith("fresh: restore failed")
            assert "stuck" in host.failures
            await pair.round_trip(2)
        await release(device)


@pytest.mark.anyio
async def test_an_abandoned_device_refuses_every_further_call() -> None:
    pair = Pair()
    with anyio.fail_after(30):
        async with stuck_host("open", "swallow", pair) as host:
            device = host.devices["stuck"]
            assert device.abandoned
            with pytest.raises(DeviceError, match="was abandoned"):
                await device.open(device.offer_value)
            with pytest.raises(DeviceError, match="was abandoned"):
                await device.offer()
            assert await device.start() is False
            await device.close()
            assert device.state is DeviceState.FAILED
        await release(device)


@pytest.mark.anyio
async def test_a_slow_hook_within_its_deadline_is_waited_for() -> None:
    class Slow:
        def __init__(self, config: None) -> None:
            pass

        @hookimpl
        async def offer(self, ctx: DeviceContext) -> LocalOffer:
            await anyio.sleep(0.05)
            return LocalOffer()

        @hookimpl
        def open(self, ctx: DeviceContext, resources: LocalOffer) -> str:
            assert running() == "device 'slow' open"
            return "slow"

        @hookimpl
        def run(self, ctx: DeviceContext, runner: str) -> Any:
            return anyio.sleep_forever()

    settings = HostSettings(hook_deadline=30, stop_deadline=30)
    async with host_with({"slow": Slow}, settings=settings) as host:
        device = host.devices["slow"]
        assert device.deadlines == Deadlines(30, 30)
        assert device.state is DeviceState.RUNNING
    assert state_of(device) is DeviceState.REVOKED
    assert running() is None


def test_deadlines_must_be_positive_and_finite() -> None:
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            Deadlines(hook=bad)
        with pytest.raises(ValueError):
            HostSettings(stop_deadline=bad)


def test_the_readme_deadlines_are_the_defaults_and_bad_ones_are_config_errors() -> None:
    import re

    from devicehost.config import parse_config
    from devicehost.errors import ConfigError

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = re.findall(r"## Deadlines and the watchdog.*?```toml\n(.*?)```", readme, re.DOTALL)
    registry: Any = StaticRegistry({})
    settings = parse_config(block, registry, "README.md").host
    assert settings == HostSettings()
    assert Deadlines(settings.hook_deadline, settings.stop_deadline) == Deadlines()
    for bad in ("0", "-1", "inf", "nan", "3601", '"10"'):
        with pytest.raises(ConfigError, match=r"h.toml: \[host\]: key 'stop_deadline'"):
            parse_config(f"[host]\nstop_deadline = {bad}\n", registry, "h.toml")


def test_a_keyboard_interrupt_in_run_still_ends_the_event_loop() -> None:
    class Interrupting:
        def __init__(self, config: None) -> None:
            pass

        @hookimpl
        def offer(self, ctx: DeviceContext) -> LocalOffer:
            return LocalOffer()

        @hookimpl
        def open(self, ctx: DeviceContext, resources: LocalOffer) -> str:
            return "r"

        @hookimpl
        def run(self, ctx: DeviceContext, runner: str) -> Any:
            return self._run()

        async def _run(self) -> None:
            raise KeyboardInterrupt

    async def main() -> None:
        async with host_with({"interrupting": Interrupting}):
            with anyio.fail_after(30):
                await anyio.sleep_forever()

    with pytest.raises(KeyboardInterrupt):
        anyio.run(main)


@pytest.mark.anyio
async def test_a_device_table_can_set_its_own_deadlines(caplog: pytest.LogCaptureFixture) -> None:
    from devicehost.config import DeviceDeadlines, parse_config

    registry: Any = StaticRegistry({"stuck": stuck.StuckDevice})
    config = parse_config(
        '[host]\nstop_deadline = 20\n\n'
        '[[device]]\nplugin = "stuck"\nname = "stuck"\nhang = "open"\nhow = "swallow"\n'
        'hook_deadline = 0.5\n\n'
        '[[device]]\nplugin = "stuck"\nname = "calm"\nhang = "nothing"\n',
        registry, "own.toml")
    assert config.device("stuck").deadlines == DeviceDeadlines(hook_deadline=0.5)
    assert config.device("calm").deadlines is None
    with anyio.fail_after(30):
        async with open_host(registry, config) as host:
            device = host.devices["stuck"]
            assert device.deadlines == Deadlines(0.5, 20)
            assert host.devices["calm"].deadlines == Deadlines(10, 20)
            assert host.devices["calm"].state is DeviceState.RUNNING
            assert_abandoned(device, "open", caplog)
        await release(device)
