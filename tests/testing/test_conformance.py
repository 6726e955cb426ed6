"""The conformance suite run against small devices written here: one that honours the contract
passes; devices that break it are caught."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from devicehost import DeviceContext, LocalOffer, hookimpl, saved_state
from devicehost.host import Host
from devicehost.lifecycle import Device
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


# -- a device that forgets what it saved ---------------------------------------------------------


@saved_state("tests.TokenState", 1)
@attrs.frozen
class TokenState:
    token: str


class Tokened:
    """A local device whose runner holds a random token (saved) and a count (not saved)."""

    def __init__(self, config: Any) -> None:
        self.config = config

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer({"token": True})

    @hookimpl
    def open(self, ctx: DeviceContext, resources: Any) -> dict[str, Any]:
        return {"token": os.urandom(8).hex(), "count": 0}

    @hookimpl
    def run(self, ctx: DeviceContext, runner: dict[str, Any]) -> Any:
        return anyio.sleep_forever()

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: dict[str, Any]) -> TokenState:
        return TokenState(runner["token"])

    @hookimpl
    def restore_open(self, ctx: DeviceContext, state: TokenState, resources: Any
                     ) -> dict[str, Any]:
        return {"token": state.token, "count": 0}


class Forgetful(Tokened):
    """Breaks the contract: its restore_open ignores the saved state and starts afresh."""

    @hookimpl
    def restore_open(self, ctx: DeviceContext, state: TokenState, resources: Any
                     ) -> dict[str, Any]:
        return {"token": os.urandom(8).hex(), "count": 0}


class TestTokenedConformance(DeviceConformance):
    device_class = Tokened


def test_save_restore_check_catches_a_restore_that_ignores_its_state() -> None:
    class Check(DeviceConformance):
        device_class = Forgetful

    with pytest.raises(AssertionError, match="does restore_open ignore its state"):
        Check().test_save_restore_round_trip("asyncio")


def test_save_restore_check_compares_what_the_author_says_must_survive() -> None:
    class Check(DeviceConformance):
        device_class = Tokened  # saves its token, but not its count

        async def exercise(self, host: Host, device: Device, guest: Any) -> None:
            device.runner["count"] = 5

        async def observe_state(self, host: Host, device: Device) -> Any:
            return (device.runner["token"], device.runner["count"])

    with pytest.raises(AssertionError, match="observe_state differs after the restore"):
        Check().test_save_restore_round_trip("trio")


# -- a device that cannot be stopped: the suite fails, naming the step, and does not hang ----------

SWALLOWER = '''
import anyio
import devicehost.testing.conformance as conformance
from devicehost import DeviceContext, LocalOffer, hookimpl
from devicehost.testing import DeviceConformance

conformance.STEP_TIMEOUT = 1.0
conformance._WATCHDOG_GRACE = 1.0


class Swallower:
    """Its run swallows every cancellation: it can never be stopped."""

    def __init__(self, config):
        pass

    @hookimpl
    def offer(self, ctx):
        return LocalOffer({})

    @hookimpl
    def open(self, ctx, resources):
        return {}

    @hookimpl
    def run(self, ctx, runner):
        async def forever():
            while True:
                try:
                    await anyio.sleep(1)
                except anyio.get_cancelled_exc_class():
                    pass

        return forever()


class TestSwallower(DeviceConformance):
    device_class = Swallower
'''


def test_the_suite_fails_naming_the_step_on_a_run_that_swallows_cancellation(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_swallower.py").write_text(SWALLOWER)
    proc = subprocess.run(
        # -rN: no short summary, whose lines repeat the messages counted below only where
        # pytest does not shorten them (under CI=true it does not).
        [sys.executable, "-m", "pytest", "-q", "-rN", "-p", "no:cacheprovider", "-k",
         "open_run_stop_start_close", str(tmp_path / "test_swallower.py")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    for backend in ("asyncio", "trio"):
        assert f"test_open_run_stop_start_close[{backend}]" in proc.stdout
    assert proc.stdout.count(
        "step 'stop' did not finish within 1.0 s; then step 'teardown: stop and close every"
        " device' did not finish within 1.0 s and cannot be stopped") == 2, proc.stdout[-3000:]
    assert "2 failed" in proc.stdout


def test_trio_cases_are_skipped_with_the_reason_when_trio_is_missing(tmp_path: Path) -> None:
    (tmp_path / "test_no_trio.py").write_text(
        "import sys\nsys.modules['trio'] = None  # as if trio were not installed\n"
        "from devicehost.testing import DeviceConformance\n"
        "from tests_ticker import Ticker\n\n"
        "class TestTicker(DeviceConformance):\n    device_class = Ticker\n")
    (tmp_path / "tests_ticker.py").write_text(
        "import anyio\nfrom devicehost import LocalOffer, hookimpl\n\n"
        "class Ticker:\n    def __init__(self, config):\n        pass\n\n"
        "    @hookimpl\n    def offer(self, ctx):\n        return LocalOffer({})\n\n"
        "    @hookimpl\n    def open(self, ctx, resources):\n        return {}\n\n"
        "    @hookimpl\n    def run(self, ctx, runner):\n        return anyio.sleep_forever()\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_no_trio.py"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "trio is not installed: the conformance suite's trio cases need it" in proc.stdout
    assert "pip install \"devicehost[testing]\"" in proc.stdout
    assert "failed" not in proc.stdout


class _Spinner:
    """Its run swallows every cancellation in a loop, so it spins once cancelled."""

    def __init__(self, config: object) -> None:
        pass

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer({})

    @hookimpl
    def open(self, ctx: DeviceContext, resources: object) -> dict[str, int]:
        return {}

    @hookimpl
    def run(self, ctx: DeviceContext, runner: object) -> Any:
        async def forever() -> None:
            while True:
                with contextlib.suppress(anyio.get_cancelled_exc_class()):
                    await anyio.sleep(1)

        return forever()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_abandoned_check_loop_is_parked(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check that had to be abandoned has its event loop parked (its thread blocked), so a
    device spinning there no longer takes the GIL from the test process."""
    import devicehost.testing.conformance as conformance

    monkeypatch.setattr(conformance, "STEP_TIMEOUT", 0.5)
    monkeypatch.setattr(conformance, "_WATCHDOG_GRACE", 0.5)

    class Check(DeviceConformance):
        device_class = _Spinner

    suite = Check()

    async def stop_the_spinner() -> None:
        async with suite.opened() as (_host, device, _guest), suite.step("stop"):
            await device.stop()

    with pytest.raises(pytest.fail.Exception, match="cannot be stopped"):
        suite.run_check(backend, stop_the_spinner)
    assert suite.abandoned is not None
    assert suite.abandoned.parked.wait(30), "the abandoned loop was not parked"


# -- the device in a worker -----------------------------------------------------------------------


class PidTicker(SavingTicker):
    """A saving ticker that says which process runs it."""

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: Any) -> dict[str, Any]:
        return {"pid": os.getpid()}


def test_the_suite_runs_a_local_device_inline_then_in_a_worker() -> None:
    seen: list[int] = []

    class Check(DeviceConformance):
        device_class = PidTicker

        async def observe_state(self, host: Host, device: Device) -> Any:
            seen.append((await device.inspect())["device"]["pid"])
            return None

    Check().test_save_restore_round_trip("asyncio")
    # Before the save and after the restore: inline (this process), then in one worker.
    assert seen[:2] == [os.getpid(), os.getpid()]
    assert len(seen) == 4 and seen[2] == seen[3] != os.getpid()


def test_a_device_that_cannot_cross_runs_inline_only() -> None:
    seen: list[int] = []

    class Local(PidTicker):  # defined in a function: a worker could not import it
        pass

    class Check(DeviceConformance):
        device_class = Local

        async def observe_state(self, host: Host, device: Device) -> Any:
            seen.append((await device.inspect())["device"]["pid"])
            return None

    Check().test_save_restore_round_trip("asyncio")
    assert seen == [os.getpid(), os.getpid()]
