"""The per-device lifecycle: one state machine per device, driven with anyio.

States and transitions (``Device.state``)::

    OFFERED --open--> OPEN --start--> RUNNING --stop--> OPEN --start--> RUNNING ...
                       ^                 |  run returned -> DONE (until close)
                       |                 |  run raised   -> FAILED (until close)
    OFFERED <--close-- OPEN | DONE | FAILED(with runner)
    any --revoke--> REVOKED --offer--> OFFERED

Rules (OpenVMM task_control semantics, facts §6):

- ``run`` executes in a task of the host's task group; ``stop`` cancels it and waits for it to end;
  ``start`` calls the ``run`` hook again with the same runner.
- A ``run`` that *returns* means the device is done: ``start`` does nothing until the device is
  closed and opened again.
- An exception from any hook of one device is logged with the device's name and moves only that
  device to ``FAILED``; it never propagates into the host loop or another device. Callers that must
  report a failure to a peer (a failed open) get a :class:`DeviceError`. That holds for every
  ``BaseException`` a plugin raises, ``SystemExit`` included (a plugin calling ``sys.exit``), but
  not for the host's own cancellation, ``KeyboardInterrupt`` or ``GeneratorExit``
  (:func:`devicehost.errors.ends_the_host`), which pass through.
"""

from __future__ import annotations

import enum
import inspect as _inspect
import logging
from collections.abc import Iterable
from typing import Any

import anyio
import anyio.abc
import pluggy

from devicehost import hookspecs
from devicehost.context import DeviceContext
from devicehost.errors import ConfigError, DeviceError, LifecycleError, ends_the_host

__all__ = ["Device", "DeviceState", "new_device_manager"]

log = logging.getLogger("devicehost.lifecycle")


class DeviceState(enum.Enum):
    """Where a device is in its lifecycle."""

    NEW = "new"
    OFFERED = "offered"
    OPEN = "open"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CLOSED = "closed"
    REVOKED = "revoked"


def new_device_manager(
    device: object, name: str, cross_cutting: Iterable[object] = ()
) -> pluggy.PluginManager:
    """Build the plugin manager that dispatches one device's hooks.

    The device object is registered alone, so a call made for it reaches no other device; the
    cross-cutting plugins (wrappers) are registered beside it. pluggy validates every
    implementation against the specs here; a hook that has no spec is an error too.
    """
    pm = pluggy.PluginManager("devicehost")
    pm.add_hookspecs(hookspecs)
    pm.register(device, name=name)
    for plugin in cross_cutting:
        pm.register(plugin)
    pm.check_pending()
    return pm


def _describe(exc: BaseException) -> str:
    """``Type: message``; for an exception group, also what it holds (its first three leaves)."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[BaseException] = []
        stack: list[BaseException] = [exc]
        while stack and len(leaves) < 3:
            node = stack.pop(0)
            if isinstance(node, BaseExceptionGroup):
                stack[:0] = list(node.exceptions)
            else:
                leaves.append(node)
        text += " [" + "; ".join(f"{type(e).__name__}: {e}" for e in leaves) + "]"
    return text


async def _await_maybe(value: Any) -> Any:
    if _inspect.isawaitable(value):
        return await value
    return value


class Device:
    """One device instance and its lifecycle.

    ``task_group`` is where ``run`` tasks are spawned; it belongs to the host (or to the test kit)
    and outlives the device's opens.
    """

    def __init__(
        self,
        ctx: DeviceContext,
        pm: pluggy.PluginManager,
        task_group: anyio.abc.TaskGroup,
    ) -> None:
        self.ctx = ctx
        self.pm = pm
        self._tg = task_group
        self.state = DeviceState.NEW
        self.offer_value: Any = None
        self.runner: Any = None
        self.subchannel_index = 0
        self.failure: str | None = None
        self.run_count = 0
        self._scope: anyio.CancelScope | None = None
        self._finished: anyio.Event | None = None

    @property
    def name(self) -> str:
        return self.ctx.name

    def __repr__(self) -> str:
        return f"<Device {self.name!r} ({self.ctx.plugin}) {self.state.value}>"

    def _state_now(self) -> DeviceState:
        # The run task changes the state while stop() waits; read it afresh (and un-narrowed).
        return self.state

    # -- hook calls ------------------------------------------------------------------------------

    def _fail(self, hook: str, exc: BaseException) -> DeviceError:
        self.failure = f"{hook}: {_describe(exc)}"
        self.state = DeviceState.FAILED
        if isinstance(exc, ConfigError) and exc.key is not None:
            # A configured value the device refused: whoever called (the host) reports it as
            # one line naming the config file, the device and the key (the DeviceError's cause).
            self.failure = f"{hook}: {exc.keyed()}"
            self.ctx.logger.debug("device %r failed in %s: %s", self.name, hook, exc.keyed())
            return DeviceError(f"device {self.name!r} failed in {hook}: {exc.keyed()}")
        self.ctx.logger.error(
            "device %r failed in %s: %s", self.name, hook, exc, exc_info=exc
        )
        return DeviceError(f"device {self.name!r} failed in {hook}: {exc}")

    async def _call(self, hook: str, **kwargs: Any) -> Any:
        caller = getattr(self.pm.hook, hook)
        try:
            return await _await_maybe(caller(ctx=self.ctx, **kwargs))
        except BaseException as exc:
            if ends_the_host(exc):
                raise
            raise self._fail(hook, exc) from exc

    # -- transitions -----------------------------------------------------------------------------

    async def offer(self, incoming: Any = None) -> Any:
        """Call ``offer``; for a server device this moves NEW/REVOKED/CLOSED to OFFERED."""
        value = await self._call("offer", incoming=incoming)
        if incoming is None:
            if value is None:
                raise self._fail("offer", LifecycleError("offer returned nothing"))
            self.offer_value = value
            self.state = DeviceState.OFFERED
        return value

    async def open(self, resources: Any, *, subchannel_index: int = 0, start: bool = True) -> Any:
        """Call ``open`` and, unless ``start`` is false, start running the new runner.

        Raises :class:`DeviceError` if the hook fails (the device is then FAILED with no runner,
        and may be opened again) and :class:`LifecycleError` if the device is already open.
        """
        if self.runner is not None:
            raise LifecycleError(f"device {self.name!r} is already open")
        if self.state not in (DeviceState.OFFERED, DeviceState.CLOSED, DeviceState.FAILED):
            raise LifecycleError(f"device {self.name!r} cannot open while {self.state.value}")
        runner = await self._call("open", resources=resources)
        if runner is None:
            raise self._fail("open", LifecycleError("open returned no runner"))
        self._insert(runner, subchannel_index)
        if start:
            await self.start()
        return runner

    async def restore(
        self, state: Any, resources: Any, *, subchannel_index: int = 0
    ) -> Any:
        """Call ``restore_open``; the runner is inserted stopped and runs on the next start."""
        if self.runner is not None:
            raise LifecycleError(f"device {self.name!r} is already open")
        runner = await self._call("restore_open", state=state, resources=resources)
        if runner is None:
            raise self._fail("restore_open", LifecycleError("restore_open returned no runner"))
        self._insert(runner, subchannel_index)
        return runner

    def _insert(self, runner: Any, subchannel_index: int) -> None:
        self.runner = runner
        self.subchannel_index = subchannel_index
        self.failure = None
        self.state = DeviceState.OPEN

    async def start(self) -> bool:
        """Run the runner; True if the device is now running (also if it already was)."""
        if self.state is DeviceState.RUNNING:
            return True
        if self.state is not DeviceState.OPEN or self.runner is None:
            return False
        awaitable = await self._call_run_hook()
        if awaitable is None:
            return False
        finished = anyio.Event()
        scope = anyio.CancelScope()
        self._scope, self._finished = scope, finished
        self.state = DeviceState.RUNNING
        self.run_count += 1
        self._tg.start_soon(self._run_task, awaitable, scope, finished, name=f"run {self.name}")
        return True

    async def _call_run_hook(self) -> Any:
        try:
            awaitable = self.pm.hook.run(ctx=self.ctx, runner=self.runner)
        except BaseException as exc:
            if ends_the_host(exc):
                raise
            self._fail("run", exc)
            return None
        if awaitable is None or not _inspect.isawaitable(awaitable):
            self._fail("run", LifecycleError(f"run returned {awaitable!r}, not an awaitable"))
            return None
        return awaitable

    async def _run_task(
        self, awaitable: Any, scope: anyio.CancelScope, finished: anyio.Event
    ) -> None:
        try:
            with scope:
                await awaitable
                # A run that returns after a stop was requested (it swallowed the cancellation)
                # was stopped, not done: it runs again on the next start.
                if not scope.cancel_called:
                    # The run returned by itself: the device is done until closed and reopened.
                    self.state = DeviceState.DONE
                    log.info("device %r finished running", self.name)
        except BaseException as exc:
            if ends_the_host(exc):
                raise
            self._fail("run", exc)
        finally:
            if scope.cancel_called and self.state is DeviceState.RUNNING:
                self.state = DeviceState.OPEN
            if _inspect.iscoroutine(awaitable):
                awaitable.close()
            finished.set()

    async def stop(self) -> bool:
        """Cancel ``run`` and wait for it to end; True iff it was running (and not done)."""
        if self.state is not DeviceState.RUNNING:
            return False
        assert self._scope is not None and self._finished is not None
        self._scope.cancel()
        # Not shielded: a caller that gives up waiting (a timeout, a cancelled host) gets its
        # cancellation; the run task is cancelled already and finishes on its own.
        await self._finished.wait()
        self._scope = self._finished = None
        return self._state_now() is DeviceState.OPEN

    async def close(self) -> None:
        """Stop, call ``close`` and drop the runner. A failure in ``close`` is logged only."""
        await self.stop()
        if self.runner is None:
            return
        runner, self.runner = self.runner, None
        try:
            # ``close`` is not firstresult: pluggy returns every implementation's result, and an
            # async implementation's awaitable is among them.
            results = self.pm.hook.close(
                ctx=self.ctx, runner=runner, subchannel_index=self.subchannel_index
            )
            for result in results:
                await _await_maybe(result)
        except BaseException as exc:
            if ends_the_host(exc):
                raise
            self._fail("close", exc)
            return
        self.state = DeviceState.CLOSED

    async def save(self) -> Any:
        """Call ``save_open`` on the stopped, open device; None = not supported."""
        if self.state is DeviceState.RUNNING:
            raise LifecycleError(f"device {self.name!r} must be stopped before saving")
        if self.runner is None:
            return None
        return await self._call("save_open", runner=self.runner)

    def forget_runner(self) -> None:
        """Drop the stopped runner without calling ``close``, as a process restart would.

        This is what happens to a device's runner across a save/restore cycle: the saved state
        and the guest's memory survive, the runner does not; ``restore`` builds a new one.
        """
        if self.state is DeviceState.RUNNING:
            raise LifecycleError(f"device {self.name!r} must be stopped first")
        self.runner = None
        self.state = DeviceState.OFFERED

    async def revoke(self) -> None:
        """Stop and close the device, then forget its offer."""
        await self.close()
        self.offer_value = None
        self.state = DeviceState.REVOKED

    async def inspect(self) -> dict[str, Any]:
        """The device's state and whatever its ``inspect`` hook adds."""
        tree: dict[str, Any] = {
            "name": self.name,
            "plugin": self.ctx.plugin,
            "state": self.state.value,
            "runs": self.run_count,
        }
        if self.failure:
            tree["failure"] = self.failure
        try:
            extra = await _await_maybe(self.pm.hook.inspect(ctx=self.ctx, runner=self.runner))
        except BaseException as exc:
            if ends_the_host(exc):
                raise
            tree["inspect_error"] = f"{type(exc).__name__}: {exc}"
        else:
            if extra:
                tree["device"] = extra
        return tree
