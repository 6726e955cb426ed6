"""Detached tasks: plugin code the host waits for with a deadline and can leave behind.

Every device hook call and every ``run`` executes in a :class:`Detached` task, outside every task
group. A task group waits for all its tasks; a plugin task that swallows its cancellation (a
shielded wait, a ``while True`` that catches ``Cancelled``, a thread that never returns) would
keep the host's task group, and so the host, open for ever. A detached task belongs to no task
group: the host cancels it, waits for it at most the hook's deadline (:class:`Deadlines`) and then
*abandons* it, and its own shutdown never waits for it.

How a task is detached depends on the event loop:

- asyncio: a plain ``loop.create_task`` (a strong reference is kept here until it ends, since
  asyncio holds only weak ones). At the end of ``asyncio.run`` the runner cancels what is left.
- trio: ``trio.lowlevel.spawn_system_task``, with the caller's context variables. Trio cancels
  system tasks when the main task ends and waits for them, so an abandoned trio task that never
  ends keeps ``trio.run`` from returning: in a process, the watchdog (:mod:`devicehost.watchdog`)
  ends it; in a test, the test releases the stuck plugin.

While a detached task's step runs, :func:`running` names it (``device 'x' run``), from the
frames of the thread's stack: that is how the watchdog names the device whose code blocks the
event loop.
:func:`abandoned` lists the tasks given up on that still run.
"""

from __future__ import annotations

import contextvars
import logging
import math
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import attrs

__all__ = [
    "DEFAULT_HOOK_DEADLINE",
    "DEFAULT_STOP_DEADLINE",
    "Deadlines",
    "Detached",
    "abandoned",
    "running",
    "spawn",
]

log = logging.getLogger("devicehost.detached")

#: Seconds a hook (offer, open, close, save_open, restore_open, inspect) has to return.
DEFAULT_HOOK_DEADLINE: Final = 10.0
#: Seconds a cancelled ``run`` has to end.
DEFAULT_STOP_DEADLINE: Final = 5.0


@attrs.frozen
class Deadlines:
    """How long the host waits for a device's plugin code: ``hook`` for a hook call, ``stop``
    for a cancelled ``run`` to end (``[host] hook_deadline`` and ``stop_deadline``)."""

    hook: float = DEFAULT_HOOK_DEADLINE
    stop: float = DEFAULT_STOP_DEADLINE

    def __attrs_post_init__(self) -> None:
        for value in (self.hook, self.stop):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"a deadline must be a positive number of seconds, not {value}")


_abandoned: list[Detached] = []  # a process abandons a few at most: kept for good
_alive: set[Any] = set()  # asyncio tasks: the loop holds only weak references


def running(thread_id: int | None = None) -> str | None:
    """The label of the detached task whose step runs right now in thread ``thread_id`` (default:
    this one), or None (host code runs, or the thread is idle).

    Read from the frames of that thread's stack, so it costs the tasks nothing: the watchdog
    reads it from another thread while a plugin blocks the event loop's thread."""
    frame = sys._getframe() if thread_id is None else sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_code is _BODY_CODE:
            task = frame.f_locals.get("self")
            return task.label if isinstance(task, Detached) else None
        frame = frame.f_back
    return None


def abandoned(*, ended_too: bool = False) -> list[str]:
    """The labels of the detached tasks abandoned in this process that have not ended (yet),
    oldest first; ``ended_too``: also those that ended since (what they started, a thread for
    instance, may still run)."""
    return [task.label for task in _abandoned if ended_too or not task.done.is_set()]


@attrs.define(eq=False)
class Detached:
    """One detached task: ``done`` is set when it has ended, ``scope`` cancels it; ``value`` and
    ``error`` are what its function returned or raised (cancellation included)."""

    label: str
    scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)
    done: anyio.Event = attrs.field(factory=anyio.Event)
    value: Any = None
    error: BaseException | None = None
    abandoned: bool = False

    async def wait(self, deadline: float) -> bool:
        """Wait until the task ends, at most ``deadline`` seconds; True if it ended."""
        with anyio.move_on_after(deadline):
            await self.done.wait()
        return self.done.is_set()

    def abandon(self) -> None:
        """Cancel the task and stop caring whether it ends (recorded for :func:`abandoned`)."""
        self.scope.cancel()
        if not self.abandoned:
            self.abandoned = True
            _abandoned.append(self)

    async def _body(self, function: Callable[[], Awaitable[Any]], interrupts: bool) -> None:
        try:
            with self.scope:
                self.value = await function()
        except BaseException as exc:  # nobody above a detached task could take it...
            self.error = exc
            if interrupts and isinstance(exc, KeyboardInterrupt):
                raise  # ... but an interrupt ends the event loop, as it would anywhere else
        finally:
            self.done.set()


def _in_trio() -> bool:
    """True inside a trio run (else anyio runs on asyncio, its only other backend)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def spawn(
    label: str, function: Callable[[], Awaitable[Any]], *, interrupts: bool = False
) -> Detached:
    """Run ``function()`` in a new detached task named ``label``; it starts on the next turn.

    What it raises is kept in :attr:`Detached.error` for whoever waits for it; with
    ``interrupts``, a ``KeyboardInterrupt`` is raised on out of the task too, for a task nobody
    waits for (a device's ``run``): on asyncio it ends the event loop, on trio it crashes the run
    (``TrioInternalError``)."""
    task = Detached(label)
    if not _in_trio():
        import asyncio

        loop = asyncio.get_running_loop()
        handle = loop.create_task(task._body(function, interrupts), name=label)
        _alive.add(handle)
        handle.add_done_callback(_alive.discard)
    else:
        import trio

        trio.lowlevel.spawn_system_task(task._body, function, interrupts, name=label,
                                        context=contextvars.copy_context())
    return task


_BODY_CODE: Final = Detached._body.__code__
