"""The conformance suite run against small devices written here: one that honours the contract
passes; devices that break it are caught."""

from __future__ import annotations

from typing import Any

import anyio
import attrs
import pytest

from devicehost import DeviceContext, LocalOffer, hookimpl, saved_state
from devicehost.testing import DeviceConformance, host_with
from devicehost.testing.registry import DeviceSpec


@attrs.frozen
class TickerConfig:
    period: float = 0.001


class Ticker:
    """A local device whose runner counts ticks while it runs."""

    config_class = TickerConfig

    def __init__(self, config: TickerConfig) -> None:
        self.config = config

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer({"ticker": True})

    @hookimpl
    def open(self, ctx: DeviceContext, resources: Any) -> dict[str, int]:
        return {"ticks": 0}

    @hookimpl
    def run(self, ctx: DeviceContext, runner: dict[str, int]) -> Any:
        async def ticking() -> None:
            while True:
                await anyio.sleep(self.config.period)
                runner["ticks"] += 1

        return ticking()


class TestTickerConformance(DeviceConformance):
    device_class = Ticker


@saved_state("tests.TickerState", 1)
@attrs.frozen
class TickerState:
    ticks: int


class SavingTicker(Ticker):
    """A ticker that saves its count and resumes from it."""

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: dict[str, int]) -> TickerState:
        return TickerState(runner["ticks"])

    @hookimpl
    def restore_open(
        self, ctx: DeviceContext, state: TickerState, resources: Any
    ) -> dict[str, int]:
        return {"ticks": state.ticks, "restored": 1}


class TestSavingTickerConformance(DeviceConformance):
    device_class = SavingTicker


@pytest.mark.anyio
async def test_save_restore_round_trip_resumes_from_the_saved_count() -> None:
    class Check(DeviceConformance):
        device_class = SavingTicker

    async with Check().opened() as (host, device, _guest):
        await anyio.sleep(0.02)
        await device.stop()
        state = await device.save()
        assert isinstance(state, TickerState) and state.ticks > 0
        device.forget_runner()
        await device.restore(state, host.transport_of("dut").resources_for_restore(device))
        assert device.runner == {"ticks": state.ticks, "restored": 1}
        assert await device.start()


class Stubborn(Ticker):
    """Breaks the contract: its run shields itself from cancellation for half a second."""

    @hookimpl
    def run(self, ctx: DeviceContext, runner: dict[str, int]) -> Any:
        async def stubborn() -> None:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.5)

        return stubborn()


@pytest.mark.anyio
async def test_suite_catches_a_run_that_ignores_cancellation() -> None:
    class Check(DeviceConformance):
        device_class = Stubborn

    check = Check()
    async with check.opened() as (_host, device, _guest):
        with pytest.raises(TimeoutError), anyio.fail_after(0.2):
            await device.stop()


@pytest.mark.anyio
async def test_host_with_serves_every_class_by_default() -> None:
    async with host_with({"ticker": Ticker}) as host:
        assert list(host.devices) == ["ticker"]
        await anyio.sleep(0.02)
        assert host.devices["ticker"].runner["ticks"] > 0


@pytest.mark.anyio
async def test_host_with_named_devices_are_independent() -> None:
    specs = [DeviceSpec("a", "ticker", TickerConfig()), DeviceSpec("b", "ticker", TickerConfig())]
    async with host_with({"ticker": Ticker}, specs) as host:
        a, b = host.devices["a"], host.devices["b"]
        await a.stop()
        ticks = b.runner["ticks"]
        await anyio.sleep(0.02)
        assert b.runner["ticks"] > ticks
        assert a.runner is not b.runner
