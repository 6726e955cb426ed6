"""The tracing plugin logs each hook call of each device with its name and duration."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from devicehost import DeviceContext, LocalOffer, hookimpl
from devicehost.lifecycle import Device, DeviceState, new_device_manager
from devicehost.tracing import TracePlugin, tracing_plugins


class Sleeper:
    def __init__(self) -> None:
        self.started = anyio.Event()

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer()

    @hookimpl
    def open(self, ctx: DeviceContext, resources: Any) -> str:
        return "runner"

    @hookimpl
    def run(self, ctx: DeviceContext, runner: str) -> Any:
        return self._run()

    async def _run(self) -> None:
        self.started.set()
        await anyio.sleep_forever()

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: str) -> None:
        raise ValueError("cannot save")

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: Any) -> dict[str, Any]:
        return {"runner": runner}


def context(name: str) -> DeviceContext:
    return DeviceContext(name, "sleeper", None, logging.getLogger(f"test.{name}"))


def trace_records(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    return [
        (r.device, r.hook, r.outcome)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "devicehost.trace"
    ]


@pytest.mark.anyio
async def test_every_hook_call_is_logged_with_device_and_duration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="devicehost.trace")
    tracer = TracePlugin()
    async with anyio.create_task_group() as tg:
        sleeper = Sleeper()
        device = Device(context("disk0"), new_device_manager(sleeper, "disk0", [tracer]), tg)
        other = Device(context("net0"), new_device_manager(Sleeper(), "net0", [tracer]), tg)
        await device.offer()
        await other.offer()
        await device.open(LocalOffer())
        with anyio.fail_after(5):
            await sleeper.started.wait()
        assert device.state is DeviceState.RUNNING
        await device.stop()
        with pytest.raises(Exception, match="cannot save"):
            await device.save()
        await device.close()
        assert (await other.inspect())["device"] == {"runner": None}

    assert trace_records(caplog) == [
        ("disk0", "offer", "returned"),
        ("net0", "offer", "returned"),
        ("disk0", "open", "returned"),
        ("disk0", "run", "returned"),
        ("disk0", "run", "awaitable cancelled"),
        ("disk0", "save_open", "raised ValueError"),
        ("disk0", "close", "returned"),
        ("net0", "inspect", "returned"),
    ]
    first = next(r for r in caplog.records if r.name == "devicehost.trace")
    assert first.getMessage().startswith("device 'disk0': offer returned in ")
    assert first.getMessage().endswith(" ms")
    durations = [getattr(r, "duration", None) for r in caplog.records if r.name.endswith("trace")]
    assert all(isinstance(d, float) and d >= 0 for d in durations)


@pytest.mark.anyio
async def test_traced_awaitable_passes_results_and_errors_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="devicehost.trace")

    class AsyncOpen:
        @hookimpl
        def offer(self, ctx: DeviceContext) -> LocalOffer:
            return LocalOffer()

        @hookimpl
        def open(self, ctx: DeviceContext, resources: Any) -> Any:
            return self._open()

        async def _open(self) -> str:
            await anyio.lowlevel.checkpoint()
            return "opened"

        @hookimpl
        def run(self, ctx: DeviceContext, runner: str) -> Any:
            return self._run()

        async def _run(self) -> None:
            raise RuntimeError("run broke")

    async with anyio.create_task_group() as tg:
        tracers = tracing_plugins({"DEVICEHOST_TRACE": "1"})
        device = Device(context("d"), new_device_manager(AsyncOpen(), "d", tracers), tg)
        await device.offer()
        assert await device.open(LocalOffer(), start=False) == "opened"
        await device.start()
    assert device.state is DeviceState.FAILED
    assert device.failure == "run: RuntimeError: run broke"
    assert trace_records(caplog) == [
        ("d", "offer", "returned"),
        ("d", "open", "returned"),
        ("d", "open", "awaitable finished"),
        ("d", "run", "returned"),
        ("d", "run", "awaitable raised"),
    ]


@pytest.mark.parametrize(
    ("value", "enabled"), [("1", True), ("yes", True), ("0", False), ("", False), (None, False)]
)
def test_enabled_by_environment(value: str | None, enabled: bool) -> None:
    env = {} if value is None else {"DEVICEHOST_TRACE": value}
    plugins = tracing_plugins(env)
    assert [type(p) for p in plugins] == ([TracePlugin] if enabled else [])


def test_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICEHOST_TRACE", "1")
    assert len(tracing_plugins()) == 1
    monkeypatch.delenv("DEVICEHOST_TRACE")
    assert tracing_plugins() == []
