"""The per-device lifecycle, driven with a fake device on asyncio and trio."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest

from devicehost import DeviceContext, LocalOffer, hookimpl
from devicehost.errors import DeviceError, LifecycleError
from devicehost.lifecycle import Device, DeviceState, new_device_manager


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Runner:
    """Per-open state; ``runs`` counts the run calls that used it."""

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.runs = 0


class Fake:
    """A local device whose hooks record what happened and fail on demand.

    ``run_mode``: ``forever`` (until cancelled), ``return`` (done at once), ``raise``, or
    ``swallow`` (catches the cancellation and returns, as a misbehaving device might).
    """

    def __init__(self, run_mode: str = "forever", fail: frozenset[str] = frozenset()) -> None:
        self.run_mode = run_mode
        self.fail = set(fail)
        self.events: list[str] = []
        self.opens = 0
        self.started = anyio.Event()

    def _maybe_fail(self, hook: str) -> None:
        if hook in self.fail:
            raise RuntimeError(f"{hook} exploded")

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        self._maybe_fail("offer")
        self.events.append("offer")
        return LocalOffer({"name": ctx.name})

    @hookimpl
    def open(self, ctx: DeviceContext, resources: LocalOffer) -> Runner:
        self._maybe_fail("open")
        self.opens += 1
        self.events.append(f"open {self.opens}")
        return Runner(self.opens)

    @hookimpl
    def run(self, ctx: DeviceContext, runner: Runner) -> Any:
        return self._run(runner)

    async def _run(self, runner: Runner) -> None:
        runner.runs += 1
        self.events.append(f"run {runner.serial}.{runner.runs}")
        self.started.set()
        if self.run_mode == "return":
            return
        if self.run_mode == "raise":
            await anyio.lowlevel.checkpoint()
            raise RuntimeError("run exploded")
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.events.append(f"cancelled {runner.serial}.{runner.runs}")
            if self.run_mode == "swallow":
                return
            raise

    @hookimpl
    def close(
        self, ctx: DeviceContext, runner: Runner, subchannel_index: int
    ) -> Awaitable[None] | None:
        """Synchronous here; the host also awaits a ``close`` that returns an awaitable."""
        self._maybe_fail("close")
        self.events.append(f"close {runner.serial} sub{subchannel_index}")
        return None

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: Runner) -> dict[str, int]:
        self._maybe_fail("save_open")
        return {"serial": runner.serial}

    @hookimpl
    def restore_open(self, ctx: DeviceContext, state: dict[str, int], resources: Any) -> Runner:
        self.events.append(f"restore {state['serial']}")
        return Runner(state["serial"] + 100)

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: Runner | None) -> dict[str, Any]:
        self._maybe_fail("inspect")
        return {"serial": None if runner is None else runner.serial}

    async def wait_started(self) -> None:
        with anyio.fail_after(5):
            await self.started.wait()
        self.started = anyio.Event()


def make(tg: anyio.abc.TaskGroup, fake: Fake, name: str = "dev") -> Device:
    ctx = DeviceContext(name, "fake", None, logging.getLogger(f"test.device.{name}"))
    return Device(ctx, new_device_manager(fake, name), tg)


def state_of(device: Device) -> DeviceState:
    """The device's state as of now: a call, so that mypy does not carry an earlier narrowing
    of ``device.state`` past the awaits that change it."""
    return device.state


@asynccontextmanager
async def group() -> AsyncIterator[anyio.abc.TaskGroup]:
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            yield tg
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_stop_during_run_and_restart_on_the_same_runner() -> None:
    fake = Fake()
    async with group() as tg:
        device = make(tg, fake)
        assert device.state is DeviceState.NEW
        assert await device.offer() == LocalOffer({"name": "dev"})
        assert state_of(device) is DeviceState.OFFERED
        runner = await device.open(LocalOffer())
        await fake.wait_started()
        assert state_of(device) is DeviceState.RUNNING
        assert await device.start() is True  # already running
        assert await device.stop() is True
        assert state_of(device) is DeviceState.OPEN
        assert await device.stop() is False  # not running any more
        assert await device.start() is True
        await fake.wait_started()
        assert device.runner is runner and runner.runs == 2
        assert device.run_count == 2
        await device.close()
        assert state_of(device) is DeviceState.CLOSED and device.runner is None
    assert fake.events == [
        "offer", "open 1", "run 1.1", "cancelled 1.1", "run 1.2", "cancelled 1.2", "close 1 sub0"
    ]


@pytest.mark.anyio
async def test_run_returning_means_done_until_reopened() -> None:
    fake = Fake(run_mode="return")
    async with group() as tg:
        device = make(tg, fake)
        await device.offer()
        await device.open(LocalOffer())
        await fake.wait_started()
        with anyio.fail_after(5):
            while device.state is DeviceState.RUNNING:
                await anyio.sleep(0)
        assert device.state is DeviceState.DONE
        assert await device.stop() is False
        assert await device.start() is False
        await device.close()
        assert state_of(device) is DeviceState.CLOSED
        await device.open(LocalOffer(), subchannel_index=2)
        await fake.wait_started()
        await device.close()
    assert fake.events == [
        "offer", "open 1", "run 1.1", "close 1 sub0", "open 2", "run 2.1", "close 2 sub2"
    ]


@pytest.mark.anyio
async def test_run_exception_fails_only_that_device(caplog: pytest.LogCaptureFixture) -> None:
    bad, good = Fake(run_mode="raise"), Fake()
    async with group() as tg:
        bad_device, good_device = make(tg, bad, "bad"), make(tg, good, "good")
        for device in (bad_device, good_device):
            await device.offer()
            await device.open(LocalOffer())
        await bad.wait_started()
        await good.wait_started()
        with anyio.fail_after(5):
            while bad_device.state is DeviceState.RUNNING:
                await anyio.sleep(0)
        assert bad_device.state is DeviceState.FAILED
        assert bad_device.failure == "run: RuntimeError: run exploded"
        assert await bad_device.start() is False
        assert good_device.state is DeviceState.RUNNING
        assert await good_device.stop() is True
        await bad_device.close()
        assert state_of(bad_device) is DeviceState.CLOSED
        await bad_device.open(LocalOffer())  # a failed device can be opened afresh
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failures] == ["device 'bad' failed in run: run exploded"]
    assert failures[0].name == "test.device.bad"


@pytest.mark.anyio
async def test_open_failure_is_reported_and_the_device_can_open_again() -> None:
    fake = Fake(fail=frozenset({"open"}))
    async with group() as tg:
        device = make(tg, fake)
        await device.offer()
        with pytest.raises(DeviceError, match="device 'dev' failed in open: open exploded"):
            await device.open(LocalOffer())
        assert device.state is DeviceState.FAILED and device.runner is None
        fake.fail.clear()
        await device.open(LocalOffer())
        await fake.wait_started()
        assert state_of(device) is DeviceState.RUNNING
        with pytest.raises(LifecycleError, match="already open"):
            await device.open(LocalOffer())
        await device.close()


@pytest.mark.anyio
async def test_hook_exceptions_never_escape_into_the_caller_loop() -> None:
    fake = Fake(fail=frozenset({"offer", "close", "inspect", "save_open"}))
    async with group() as tg:
        device = make(tg, fake)
        with pytest.raises(DeviceError, match="failed in offer"):
            await device.offer()
        assert device.state is DeviceState.FAILED
        fake.fail.discard("offer")
        await device.offer()
        await device.open(LocalOffer())
        await fake.wait_started()
        tree = await device.inspect()
        assert tree["inspect_error"] == "RuntimeError: inspect exploded"
        await device.stop()
        with pytest.raises(DeviceError, match="failed in save_open"):
            await device.save()
        await device.close()  # close raising is logged, never raised
        assert device.state is DeviceState.FAILED
        assert device.failure == "close: RuntimeError: close exploded"
        assert device.runner is None


@pytest.mark.anyio
async def test_revoke_closes_and_forgets_the_offer() -> None:
    fake = Fake()
    async with group() as tg:
        device = make(tg, fake)
        await device.offer()
        await device.open(LocalOffer())
        await fake.wait_started()
        await device.revoke()
        assert device.state is DeviceState.REVOKED
        assert device.offer_value is None and device.runner is None
        with pytest.raises(LifecycleError, match="cannot open while revoked"):
            await device.open(LocalOffer())
        await device.offer()
        assert state_of(device) is DeviceState.OFFERED
        await device.open(LocalOffer())
        await fake.wait_started()
        await device.revoke()
    assert fake.events == [
        "offer", "open 1", "run 1.1", "cancelled 1.1", "close 1 sub0",
        "offer", "open 2", "run 2.1", "cancelled 2.1", "close 2 sub0",
    ]


@pytest.mark.anyio
async def test_save_and_restore() -> None:
    fake = Fake()
    async with group() as tg:
        device = make(tg, fake)
        await device.offer()
        await device.open(LocalOffer())
        await fake.wait_started()
        with pytest.raises(LifecycleError, match="must be stopped before saving"):
            await device.save()
        await device.stop()
        state = await device.save()
        assert state == {"serial": 1}
        device.forget_runner()
        runner = await device.restore(state, LocalOffer())
        assert runner.serial == 101
        assert device.state is DeviceState.OPEN  # restored stopped; runs on the next start
        assert await device.start() is True
        await fake.wait_started()
        assert (await device.inspect())["device"] == {"serial": 101}
        await device.close()
    assert fake.events[-4:] == ["restore 1", "run 101.1", "cancelled 101.1", "close 101 sub0"]


@pytest.mark.anyio
async def test_calls_for_one_device_never_reach_another() -> None:
    first, second = Fake(), Fake()
    async with group() as tg:
        a, b = make(tg, first, "a"), make(tg, second, "b")
        await a.offer()
        await a.open(LocalOffer())
        await first.wait_started()
        await a.close()
    assert first.events == ["offer", "open 1", "run 1.1", "cancelled 1.1", "close 1 sub0"]
    assert second.events == []
    assert b.state is DeviceState.NEW


@pytest.mark.anyio
async def test_run_hook_that_returns_no_awaitable_fails_the_device() -> None:
    class NotAsync(Fake):
        @hookimpl
        def run(self, ctx: DeviceContext, runner: Runner) -> Any:
            return 42

    async with group() as tg:
        device = make(tg, NotAsync())
        await device.offer()
        await device.open(LocalOffer())
        assert device.state is DeviceState.FAILED
        assert device.failure == "run: LifecycleError: run returned 42, not an awaitable"


@pytest.mark.anyio
async def test_async_close_hook_is_awaited() -> None:
    class AsyncClose(Fake):
        @hookimpl
        def close(
            self, ctx: DeviceContext, runner: Runner, subchannel_index: int
        ) -> Awaitable[None]:
            return self._close(runner)

        async def _close(self, runner: Runner) -> None:
            await anyio.lowlevel.checkpoint()
            self.events.append(f"async close {runner.serial}")

    fake = AsyncClose()
    async with group() as tg:
        device = make(tg, fake)
        await device.offer()
        await device.open(LocalOffer(), start=False)
        await device.close()
        assert device.state is DeviceState.CLOSED
    assert fake.events == ["offer", "open 1", "async close 1"]


@pytest.mark.anyio
async def test_run_that_swallows_cancellation_is_stopped_not_done() -> None:
    fake = Fake(run_mode="swallow")
    async with group() as tg:
        device = make(tg, fake)
        await device.offer()
        await device.open(LocalOffer())
        await fake.wait_started()
        assert await device.stop() is True
        assert device.state is DeviceState.OPEN
        assert await device.start() is True
        await fake.wait_started()
        await device.close()
    assert fake.events[2:5] == ["run 1.1", "cancelled 1.1", "run 1.2"]


class Exiting(Fake):
    """Fails the hooks in ``fail`` with SystemExit, as a plugin calling sys.exit() would."""

    def _maybe_fail(self, hook: str) -> None:
        if hook in self.fail:
            raise SystemExit(f"{hook} called sys.exit")


@pytest.mark.anyio
@pytest.mark.parametrize("hook", ["offer", "open", "close", "save_open", "inspect"])
async def test_system_exit_from_any_hook_fails_only_the_device(hook: str) -> None:
    async with group() as tg:
        device = make(tg, Exiting(fail=frozenset({hook})))
        if hook == "offer":
            with pytest.raises(DeviceError, match=r"offer called sys\.exit"):
                await device.offer()
            assert device.failure == "offer: SystemExit: offer called sys.exit"
            return
        await device.offer()
        if hook == "open":
            with pytest.raises(DeviceError, match=r"open called sys\.exit"):
                await device.open(device.offer_value)
            assert state_of(device) is DeviceState.FAILED
            return
        await device.open(device.offer_value)
        if hook == "close":
            await device.close()
            assert state_of(device) is DeviceState.FAILED
            assert device.failure == "close: SystemExit: close called sys.exit"
        elif hook == "save_open":
            await device.stop()
            with pytest.raises(DeviceError, match=r"save_open called sys\.exit"):
                await device.save()
        else:
            tree = await device.inspect()
            assert tree["inspect_error"] == "SystemExit: inspect called sys.exit"


@pytest.mark.anyio
async def test_keyboard_interrupt_from_a_hook_still_ends_the_caller() -> None:
    class Interrupting(Fake):
        def _maybe_fail(self, hook: str) -> None:
            if hook in self.fail:
                raise KeyboardInterrupt

    async with group() as tg:
        device = make(tg, Interrupting(fail=frozenset({"offer"})))
        with pytest.raises(KeyboardInterrupt):
            await device.offer()
