"""The device conformance suite: does a device honour the lifecycle contract?

Subclass :class:`DeviceConformance` in a test module of your plugin::

    from devicehost.testing import DeviceConformance
    from my_device import MyDevice

    class TestMyDeviceConformance(DeviceConformance):
        device_class = MyDevice

pytest then runs every ``test_*`` method below against a real host serving one instance of the
device, opened the way its guest would open it, on asyncio and on trio (trio cases are skipped,
saying why, when trio is not installed: ``pip install "devicehost[testing]"``).

Every step (open, stop, start, close, save, restore, the host's teardown) has
:data:`STEP_TIMEOUT` seconds. A step that overruns fails the test naming the step, also when the
device cannot be stopped at all (a ``run`` that swallows cancellation): each check runs its event
loop in a worker thread watched by the test, which gives up on a loop that overruns and fails
instead of hanging. The abandoned loop is then parked: a callback scheduled into it blocks its
thread for good, so a device that spins there (a ``run`` swallowing cancellation in a loop) stops
competing for the GIL and the test process exits promptly (a device that spins without ever
yielding to its loop cannot be parked; the daemon thread ends with the process).

Save/restore: the suite saves the stopped device, restores it from the decoded state and checks
that the restored device saves the *same* state again, so a ``restore_open`` that ignores its
state is caught. Say what else must survive by overriding :meth:`DeviceConformance.observe_state`
(compared before the save and after the restore), and give the device some state worth saving by
overriding :meth:`DeviceConformance.exercise`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import anyio
import pytest

from devicehost.context import DeviceContext
from devicehost.host import Host
from devicehost.lifecycle import Device, DeviceState, new_device_manager
from devicehost.testing.guest import guest_session
from devicehost.testing.registry import DeviceSpec, host_with
from devicehost.transport import transport_class_for

__all__ = ["STEP_TIMEOUT", "DeviceConformance"]

#: Seconds any single lifecycle step may take before the suite calls it a hang.
STEP_TIMEOUT = 10.0
#: Extra seconds the watchdog gives a step beyond :data:`STEP_TIMEOUT` before abandoning its loop
#: (the step's own timeout normally reports first, from inside the loop).
_WATCHDOG_GRACE = 5.0
_TRIO_MISSING = ("trio is not installed: the conformance suite's trio cases need it"
                 ' (pip install "devicehost[testing]")')


class _Steps:
    """The step a check is in and since when; shared by the check's thread and the watchdog."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.name = "start the host"
        self.started = time.monotonic()
        self.done = False
        self.error: BaseException | None = None
        self.first_failure: str | None = None
        self.schedule: Callable[[Callable[[], None]], Any] | None = None
        #: Set once an abandoned check's loop thread is parked.
        self.parked = threading.Event()

    def enter(self, name: str) -> None:
        with self.cond:
            self.name = name
            self.started = time.monotonic()
            self.cond.notify_all()

    def loop_started(self, backend: str) -> None:
        """Called in the check's event loop: remember how to schedule into it from outside."""
        if backend == "trio":
            import trio

            self.schedule = trio.lowlevel.current_trio_token().run_sync_soon
        else:
            import asyncio

            self.schedule = asyncio.get_running_loop().call_soon_threadsafe

    def park(self) -> None:
        """Block the abandoned check's loop thread for good (module docstring)."""
        if self.schedule is None:
            return

        def block() -> None:
            self.parked.set()
            threading.Event().wait()

        # RuntimeError (trio: RunFinishedError): the loop ended meanwhile, nothing to park.
        with contextlib.suppress(RuntimeError):
            self.schedule(block)

    def finish(self, error: BaseException | None) -> None:
        with self.cond:
            self.error = error
            self.done = True
            self.cond.notify_all()


@pytest.mark.anyio
class DeviceConformance:
    """Lifecycle contract checks, run against ``device_class`` built with ``config``."""

    device_class: ClassVar[type[Any]]
    #: The config value; None means ``device_class.config_class()`` (or None without one).
    config: ClassVar[Any] = None
    plugin_name: ClassVar[str] = "device-under-test"
    #: Devices served beside the device under test, by plugin name: (device class, config).
    #: A VMBus client device needs the server device whose offer it intercepts.
    peers: ClassVar[Mapping[str, tuple[type[Any], Any]]] = {}

    #: Where the checks run the device: None (the default) runs every check inline, then again
    #: in a worker process (``isolation = "process"``) when the device can run in one (its
    #: class is importable, its config and its offer can cross: see ``docs/workers.md``);
    #: ``("inline",)`` only inline (e.g. when ``exercise`` or ``observe_state`` read
    #: ``device.runner``, which is a handle in a worker); ``("inline", "process")`` both, always.
    isolations: ClassVar[tuple[str, ...] | None] = None

    _steps: _Steps | None = None
    _isolation: str = "inline"
    #: After an inline check: why the device cannot run in a worker (None: it can).
    _isolatable: str | None = None
    #: The steps of the last check that had to be abandoned (its loop parked), if any.
    abandoned: _Steps | None = None

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(self, request: pytest.FixtureRequest) -> str:
        if request.param == "trio" and importlib.util.find_spec("trio") is None:
            pytest.skip(_TRIO_MISSING)
        return str(request.param)

    def make_config(self) -> Any:
        if self.config is not None:
            return self.config
        config_class = getattr(self.device_class, "config_class", None)
        return None if config_class is None else config_class()

    # -- hooks for device authors --------------------------------------------------------------

    async def exercise(self, host: Host, device: Device, guest: Any) -> None:
        """Drive the open, running device so it has state worth saving (default: nothing).

        ``guest`` is what :func:`devicehost.testing.guest.guest_session` yields for the device's
        transport (None for a local device)."""

    async def observe_state(self, host: Host, device: Device) -> Any:
        """What of the stopped device must survive a save/restore (default: None, nothing
        beyond the saved state itself). Called before the save and after the restore; the two
        values must be equal. Read it from ``device.runner`` or ``await device.inspect()``."""
        return None

    # -- steps ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def step(self, name: str) -> AsyncIterator[None]:
        """Run a block as the step ``name``: it fails the test, naming the step, if it takes
        longer than :data:`STEP_TIMEOUT`."""
        if self._steps is not None:
            self._steps.enter(name)
        try:
            with anyio.fail_after(STEP_TIMEOUT):
                yield
        except TimeoutError:
            message = f"step {name!r} did not finish within {STEP_TIMEOUT} s"
            if self._steps is not None and self._steps.first_failure is None:
                self._steps.first_failure = message
            pytest.fail(message, pytrace=False)

    def run_check(self, backend: str, check: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``check`` on ``backend`` with the device inline, then (see :attr:`isolations`)
        with the device in a worker process; the inline run's value."""
        self._isolation = "inline"
        self._isolatable = None
        value = self._run_check_once(backend, check)
        wanted = self.isolations
        if (wanted is None and self._isolatable is None) or (
                wanted is not None and "process" in wanted):
            self._isolation = "process"
            try:
                self._run_check_once(backend, check)
            except BaseException as exc:
                exc.add_note("(this check ran the device in a worker process:"
                             " isolation = \"process\")")
                raise
            finally:
                self._isolation = "inline"
        return value

    def _run_check_once(self, backend: str, check: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``check`` on ``backend`` in a worker thread, failing (never hanging) when a step
        overruns :data:`STEP_TIMEOUT` even if its event loop cannot be stopped."""
        steps = self._steps = _Steps()
        result: list[Any] = []

        async def watched() -> Any:
            steps.loop_started(backend)
            return await check()

        def body() -> None:
            try:
                result.append(anyio.run(watched, backend=backend))
            except BaseException as exc:
                steps.finish(exc)
            else:
                steps.finish(None)

        thread = threading.Thread(target=body, name=f"conformance {type(self).__name__}",
                                  daemon=True)
        thread.start()
        with steps.cond:
            while not steps.done:
                left = steps.started + STEP_TIMEOUT + _WATCHDOG_GRACE - time.monotonic()
                if left <= 0:
                    where = (f"step {steps.name!r} did not finish within {STEP_TIMEOUT} s and"
                             " cannot be stopped (does the device's run swallow cancellation?)")
                    first = steps.first_failure
                    steps.park()
                    self.abandoned = steps
                    pytest.fail(f"{first}; then {where}" if first else where, pytrace=False)
                steps.cond.wait(left)
        self._steps = None
        if steps.error is not None:
            raise _leaf(steps.error)
        return result[0]

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[tuple[Host, Device, Any]]:
        """A host serving the device, opened by its guest; yields (host, device, guest)."""
        specs = [DeviceSpec(name, name, config) for name, (_cls, config) in self.peers.items()]
        worker = None
        if self._isolation == "process":
            from devicehost.worker import WorkerSettings

            worker = WorkerSettings(isolation="process")
        specs.append(DeviceSpec("dut", self.plugin_name, self.make_config(), worker))
        classes = {name: cls for name, (cls, _config) in self.peers.items()}
        classes[self.plugin_name] = self.device_class
        try:
            async with host_with(classes, specs) as host:
                assert "dut" not in host.failures, f"the device was not served: {host.failures}"
                device = host.devices["dut"]
                if self._isolation == "inline":
                    self._isolatable = _why_not_isolatable(self.device_class, self.make_config(),
                                                           device.offer_value)
                async with self.step("open: the guest opens the device"):
                    session = guest_session(host, device)
                    guest = await session.__aenter__()
                    await _wait_for(lambda: _state(device) is DeviceState.RUNNING)
                try:
                    yield host, device, guest
                finally:
                    async with self.step("teardown: the guest closes the device"):
                        await session.__aexit__(None, None, None)
                    if self._steps is not None:
                        self._steps.enter("teardown: stop and close every device")
        finally:
            if self._steps is not None:
                self._steps.enter("finish")

    # -- the checks --------------------------------------------------------------------------------

    def test_hookimpls_match_specs(self) -> None:
        new_device_manager(self.device_class, self.plugin_name).check_pending()

    def test_offer_is_valid_and_stable(self, anyio_backend: str) -> None:
        self.run_check(anyio_backend, self._offer_is_valid_and_stable)

    async def _offer_is_valid_and_stable(self) -> None:
        async with self.opened() as (_host, device, _guest):
            first = device.offer_value
            transport_class_for(first)  # raises if no transport serves it
            async with self.step("offer again"):
                again = device.pm.hook.offer(ctx=device.ctx, incoming=None)
                if inspect.isawaitable(again):
                    again = await again
            assert again == first, "offer must describe the same thing every time it is called"

    def test_open_run_stop_start_close(self, anyio_backend: str) -> None:
        self.run_check(anyio_backend, self._open_run_stop_start_close)

    async def _open_run_stop_start_close(self) -> None:
        async with self.opened() as (_host, device, _guest):
            runner = device.runner
            assert runner is not None
            assert device.run_count == 1
            async with self.step("stop"):
                assert await device.stop(), "stop of a running device must report it was running"
            assert _state(device) is DeviceState.OPEN
            assert device.runner is runner, "stop must keep the runner"
            async with self.step("start"):
                assert await device.start()
            assert _state(device) is DeviceState.RUNNING
            assert device.run_count == 2 and device.runner is runner
            async with self.step("close"):
                await device.close()
            assert _state(device) is DeviceState.CLOSED and device.runner is None

    def test_stop_cancels_run_promptly(self, anyio_backend: str) -> None:
        self.run_check(anyio_backend, self._stop_cancels_run_promptly)

    async def _stop_cancels_run_promptly(self) -> None:
        async with self.opened() as (_host, device, _guest):
            for attempt in range(1, 6):
                await anyio.sleep(0)
                async with self.step(f"stop #{attempt}"):
                    await device.stop()
                assert _state(device) is DeviceState.OPEN, device.failure
                async with self.step(f"start #{attempt}"):
                    await device.start()
            assert device.failure is None

    def test_transport_close_and_reopen(self, anyio_backend: str) -> None:
        self.run_check(anyio_backend, self._transport_close_and_reopen)

    async def _transport_close_and_reopen(self) -> None:
        """The transport's own contract: the guest closes the device and opens it again."""
        instance = self.device_class(self.make_config())
        pm = new_device_manager(instance, self.plugin_name)
        kind = type(pm.hook.offer(ctx=_bare_ctx(self.plugin_name, self.make_config()),
                                  incoming=None)).__qualname__
        if kind == "OfferParams":
            from devicehost.testing.vmbus import check_vmbus_device

            async with self.step("VMBus close and reopen"):
                await check_vmbus_device(self.device_class, self.make_config())
            return
        async with self.opened() as (host, device, guest):
            if kind == "DeviceTraits":
                from devicehost.virtio.transport import VirtioTransport

                async with self.step("guest reset"):
                    await guest.reset()
                assert _state(device) is DeviceState.CLOSED and device.runner is None
                async with self.step("reopen by a new driver, then reset"):
                    driver = await host.transport(VirtioTransport).connect_driver(device.name)
                    await _wait_for(lambda: _state(device) is DeviceState.RUNNING)
                    await driver.reset()
                assert _state(device) is DeviceState.CLOSED
            else:
                async with self.step("revoke"):
                    await host.remove_device(device.name)
                assert _state(device) is DeviceState.REVOKED and device.runner is None

    def test_save_restore_round_trip(self, anyio_backend: str) -> None:
        supported = self.run_check(anyio_backend, self._save_restore_round_trip)
        if not supported:
            pytest.skip("the device does not support save/restore (save_open returned None)")

    async def _save_restore_round_trip(self) -> bool:
        async with self.opened() as (host, device, guest):
            async with self.step("exercise"):
                await self.exercise(host, device, guest)
            async with self.step("stop"):
                await device.stop()
            async with self.step("observe the state before saving"):
                before = await self.observe_state(host, device)
            async with self.step("save"):
                state = await device.save()
            if state is None:
                return False
            await self._check_round_trip(host, device, state, before)
        return True

    async def _check_round_trip(self, host: Host, device: Device, state: Any,
                                before: Any) -> None:
        from devicehost.savedstate import (
            decode_envelope_untrusted,
            decode_state_untrusted,
            encode_envelope,
            entry_for,
        )

        blob = encode_envelope([entry_for(device.name, device.ctx.plugin, state)])
        (entry,) = decode_envelope_untrusted(blob)
        restored = decode_state_untrusted(entry, type(state))
        assert restored == state, "a saved state must survive encoding unchanged"
        reopen = getattr(host.transport_of(device.name), "resources_for_restore", None)
        if reopen is None:
            return
        resources = reopen(device)
        device.forget_runner()
        async with self.step("restore"):
            await device.restore(restored, resources)
        async with self.step("observe the state after restoring"):
            after = await self.observe_state(host, device)
        assert after == before, (
            f"observe_state differs after the restore: {before!r} was saved, {after!r} came back")
        async with self.step("save the restored device"):
            again = await device.save()
        assert again == state, (
            f"the restored device saves {again!r}, not the {state!r} it was restored from:"
            " does restore_open ignore its state?")
        async with self.step("start the restored device"):
            assert await device.start()
        assert _state(device) is DeviceState.RUNNING


def _why_not_isolatable(cls: type, config: Any, offer: Any) -> str | None:
    """Why a device of ``cls`` with ``config`` and ``offer`` cannot run in a worker, or None."""
    from devicehost.worker.codec import codec_for
    from devicehost.worker.settings import config_table

    if "<locals>" in cls.__qualname__:
        return "its class is defined in a function"
    try:
        config_table(config)
    except TypeError as exc:
        return str(exc)
    if codec_for(type(offer)) is None:
        return f"its offer, a {type(offer).__qualname__}, has no codec"
    return None


def _leaf(error: BaseException) -> BaseException:
    """The one exception inside (nested) groups of one, so that pytest reports it plainly."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _bare_ctx(name: str, config: Any) -> DeviceContext:
    return DeviceContext(name=name, plugin=name, config=config,
                         logger=logging.getLogger(f"devicehost.device.{name}"))


async def _wait_for(predicate: Any, interval: float = 0.005) -> None:
    while not predicate():
        await anyio.sleep(interval)


def _state(device: Device) -> DeviceState:
    # Read afresh: the state changes across awaits, which type narrowing does not know.
    return device.state
