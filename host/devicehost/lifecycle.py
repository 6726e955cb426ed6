"""The per-device lifecycle: one state machine per device, driven with anyio.

States and transitions (``Device.state``)::

    OFFERED --open--> OPEN --start--> RUNNING --stop--> OPEN --start--> RUNNING ...
                       ^                 |  run returned -> DONE (until close)
                       |                 |  run raised   -> FAILED (until close)
    OFFERED <--close-- OPEN | DONE | FAILED(with runner)
    any --revoke--> REVOKED --offer--> OFFERED

Rules (OpenVMM task_control semantics, facts §6):

- ``run`` executes in a detached task (:mod:`devicehost.detached`); ``stop`` cancels it and waits
  for it to end; ``start`` calls the ``run`` hook again with the same runner.
- A ``run`` that *returns* means the device is done: ``start`` does nothing until the device is
  closed and opened again.
- An exception from any hook of one device is logged with the device's name and moves only that
  device to ``FAILED``; it never propagates into the host loop or another device. Callers that must
  report a failure to a peer (a failed open) get a :class:`DeviceError`. That holds for every
  ``BaseException`` a plugin raises, ``SystemExit`` included (a plugin calling ``sys.exit``), but
  not for the host's own cancellation, ``KeyboardInterrupt`` or ``GeneratorExit``
  (:func:`devicehost.errors.ends_the_host`), which pass through.

Deadlines (:class:`~devicehost.detached.Deadlines`, ``[host] hook_deadline`` and
``stop_deadline``): every hook call (``offer``, ``open``, ``close``, ``save_open``,
``restore_open``, ``inspect``) runs in a detached task, and the host waits for it at most
``hook`` seconds; a cancelled ``run`` has ``stop`` seconds to end. A device that misses a deadline
is *abandoned*: its task is cancelled and left behind (it belongs to no task group, so it cannot
keep the host from stopping), the device is FAILED with a failure naming the hook and the
deadline (``open: no answer within 2 s; the device is abandoned``), logged once, and from then on
every call on it does nothing (``open``, ``offer``, ``save``: :class:`DeviceError`). One device's
deadline is never charged to another: each call waits for its own device only. A plugin that
blocks the event loop itself (``time.sleep``, a busy loop) cannot be preempted here; see
:mod:`devicehost.watchdog`.
"""

from __future__ import annotations

import enum
import inspect as _inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
import anyio.abc
import pluggy

from devicehost import detached, hookspecs
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


def _is_cancellation(exc: BaseException) -> bool:
    return isinstance(exc, anyio.get_cancelled_exc_class())


def _ends_the_caller(exc: BaseException) -> bool:
    """What a hook raised that the caller re-raises (KeyboardInterrupt, GeneratorExit); the
    cancellation of the hook's own task (the end of the event loop) only fails the device."""
    return ends_the_host(exc) and not _is_cancellation(exc)


async def _await_maybe(value: Any) -> Any:
    if _inspect.isawaitable(value):
        return await value
    return value


class Device:
    """One device instance and its lifecycle.

    ``task_group`` is accepted for the callers that have one; the device's tasks are detached
    (module docstring) and belong to none. ``deadlines``: how long each hook call and each stop
    may take (:class:`~devicehost.detached.Deadlines`; the host passes its ``[host]`` settings).
    """

    def __init__(
        self,
        ctx: DeviceContext,
        pm: pluggy.PluginManager,
        task_group: anyio.abc.TaskGroup | None = None,
        *,
        deadlines: detached.Deadlines | None = None,
    ) -> None:
        self.ctx = ctx
        self.pm = pm
        self.deadlines = deadlines if deadlines is not None else detached.Deadlines()
        self.state = DeviceState.NEW
        self.offer_value: Any = None
        self.runner: Any = None
        self.subchannel_index = 0
        self.failure: str | None = None
        self.run_count = 0
        #: The detached task given up on (a hook or ``run`` that missed its deadline), if any.
        self.abandoned_task: detached.Detached | None = None
        self._run: detached.Detached | None = None

    @property
    def name(self) -> str:
        return self.ctx.name

    @property
    def abandoned(self) -> bool:
        """True once the device missed a deadline: it is FAILED for good."""
        return self.abandoned_task is not None

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

    def _abandon(self, task: detached.Detached, hook: str, why: str) -> DeviceError:
        """Give up on ``task`` (the device's ``hook`` that missed its deadline): FAILED for good,
        logged once."""
        task.abandon()
        self.abandoned_task = task
        self.runner = None
        self.failure = f"{hook}: {why}; the device is abandoned"
        self.state = DeviceState.FAILED
        self.ctx.logger.error("device %r failed in %s: %s", self.name, hook,
                              self.failure.partition(": ")[2])
        return DeviceError(f"device {self.name!r} failed in {self.failure}")

    def _refuse_if_abandoned(self, hook: str) -> None:
        if self.abandoned:
            raise DeviceError(f"device {self.name!r} was abandoned ({self.failure}); no {hook}")

    async def _bounded(
        self, hook: str, function: Callable[[], Awaitable[Any]]
    ) -> detached.Detached:
        """Run ``function`` (a call of ``hook``) in a detached task and wait for it to end; the
        ended task. DeviceError if it misses the hook deadline: the device is then abandoned."""
        self._refuse_if_abandoned(hook)
        limit = self.deadlines.hook
        task = detached.spawn(f"device {self.name!r} {hook}", function)
        try:
            ended = await task.wait(limit)
        except BaseException:
            # The caller is cancelled: so is the hook, which gets its deadline to unwind.
            task.scope.cancel()
            with anyio.CancelScope(shield=True):
                if not await task.wait(limit):
                    self._abandon(task, hook, f"did not end within {limit:g} s of its cancel")
            raise
        if not ended:
            raise self._abandon(task, hook, f"no answer within {limit:g} s")
        return task

    async def _call(self, hook: str, **kwargs: Any) -> Any:
        """Call ``hook`` with a deadline; its value, or DeviceError (the device is FAILED)."""
        caller = getattr(self.pm.hook, hook)
        task = await self._bounded(hook, lambda: _await_maybe(caller(ctx=self.ctx, **kwargs)))
        if task.error is not None:
            if _ends_the_caller(task.error):
                raise task.error
            raise self._fail(hook, task.error) from task.error
        return task.value

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
        self._refuse_if_abandoned("open")
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
        self._refuse_if_abandoned("restore_open")
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
        if self.state is not DeviceState.OPEN or self.runner is None or self.abandoned:
            return False
        awaitable = self._call_run_hook()
        if awaitable is None:
            return False
        self.state = DeviceState.RUNNING
        self.run_count += 1
        # A KeyboardInterrupt in ``run`` ends the host (module docstring); nobody waits for the
        # run's task to hand it on, so the task raises it on itself.
        self._run = detached.spawn(f"device {self.name!r} run",
                                   lambda: self._run_body(awaitable), interrupts=True)
        return True

    def _call_run_hook(self) -> Any:
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

    async def _run_body(self, awaitable: Any) -> None:
        """The detached run task: runs until the run returns, raises or is stopped."""
        task = self._run
        assert task is not None
        try:
            await awaitable
            # A run that returns after a stop was requested (it swallowed the cancellation)
            # was stopped, not done: it runs again on the next start.
            if not task.scope.cancel_called:
                # The run returned by itself: the device is done until closed and reopened.
                self.state = DeviceState.DONE
                log.info("device %r finished running", self.name)
        except BaseException as exc:
            if _ends_the_caller(exc):
                raise
            if not (task.scope.cancel_called and _is_cancellation(exc)):
                if not task.abandoned:
                    self._fail("run", exc)
                raise
        finally:
            if task.scope.cancel_called and self.state is DeviceState.RUNNING:
                self.state = DeviceState.OPEN
            if _inspect.iscoroutine(awaitable):
                awaitable.close()

    async def stop(self) -> bool:
        """Cancel ``run`` and wait for it to end; True iff it was running (and not done).

        The run has the stop deadline to end; one that does not is abandoned (the device is
        FAILED) and this returns False."""
        if self.state is not DeviceState.RUNNING:
            return False
        task = self._run
        assert task is not None
        task.scope.cancel()
        # A caller that gives up waiting (a timeout, a cancelled host) gets its cancellation;
        # the run task is cancelled already and finishes on its own.
        if not await task.wait(self.deadlines.stop):
            self._abandon(task, "run", f"did not stop within {self.deadlines.stop:g} s of its"
                          " cancel")
            return False
        self._run = None
        return self._state_now() is DeviceState.OPEN

    async def close(self) -> None:
        """Stop, call ``close`` and drop the runner. A failure in ``close`` is logged only."""
        await self.stop()
        if self.runner is None or self.abandoned:
            return
        runner, self.runner = self.runner, None

        async def call_close() -> None:
            # ``close`` is not firstresult: pluggy returns every implementation's result, and an
            # async implementation's awaitable is among them.
            results = self.pm.hook.close(
                ctx=self.ctx, runner=runner, subchannel_index=self.subchannel_index
            )
            for result in results:
                await _await_maybe(result)

        try:
            task = await self._bounded("close", call_close)
        except DeviceError:
            return
        if task.error is not None:
            if _ends_the_caller(task.error):
                raise task.error
            self._fail("close", task.error)
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
        """Stop and close the device, then forget its offer (an abandoned device stays
        FAILED)."""
        await self.close()
        self.offer_value = None
        if not self.abandoned:
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
        if self.abandoned:
            return tree
        try:
            task = await self._bounded("inspect", lambda: _await_maybe(
                self.pm.hook.inspect(ctx=self.ctx, runner=self.runner)))
        except DeviceError:
            tree.update(state=self.state.value, failure=self.failure)
            return tree
        if task.error is not None:
            if _ends_the_caller(task.error):
                raise task.error
            tree["inspect_error"] = f"{type(task.error).__name__}: {task.error}"
        elif task.value:
            tree["device"] = task.value
        return tree
