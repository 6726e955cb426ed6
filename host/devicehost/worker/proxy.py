"""The proxy: stands in the supervisor where an isolated device's plugin object would be.

A :class:`WorkerProxy` is registered in the device's plugin manager (name and cross-cutting
plugins as for an inline device); its hook implementations have the device contract's signatures
and forward each call to the device's worker, so the lifecycle and the transports do not know
which side of the process seam the device is on. ``open`` and ``restore_open`` answer a
:class:`WorkerRunner`, a handle on the runner that lives in the worker.

Deadlines: each call has ``KILL_MARGIN`` of the device's hook deadline (a cancelled ``run`` of
its stop deadline); a worker that does not answer in time is killed and the call raises
:class:`WorkerDied`, so the lifecycle fails the device with the cause before its own deadline
would abandon it.

Failures while running (the worker exits, is killed by a signal, stops answering pings, or its
``run`` raises): with ``restart = "no"`` the run raises :class:`WorkerFailed` with the cause (or
what the worker's ``run`` raised, named after its type) and the device is FAILED. A worker that
ends while its device is not running is noticed by the next call: a call that needs no runner
(``offer``, ``open``, ``restore_open``) restarts it if the policy allows, else fails with the
cause; ``close`` of a runner whose worker ended does nothing.

With ``restart = "on-failure"`` the run goes on: after the policy's delay
(:mod:`devicehost.worker.restart`) a new worker is started with a
:class:`~devicehost.worker.RestartInfo`, the device is offered again (the offer must be the same)
and opened with the resources the supervisor kept (the descriptors in them are still the
supervisor's, so e.g. a vhost-user connection survives), and its run started; past the burst
limit the run raises :class:`WorkerFailed`. A transport that must do more than reopen (VMBus:
revoke and re-offer) registers a restart handler (:func:`register_restart_handler`).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import anyio.abc
import attrs

from devicehost import hookimpl
from devicehost.context import DeviceContext
from devicehost.detached import Deadlines
from devicehost.errors import ConfigError, DeviceHostError
from devicehost.excerpt import excerpt
from devicehost.worker.channel import close_fds
from devicehost.worker.codec import CodecError, Decoder, Encoder, decode_value
from devicehost.worker.messages import Failure
from devicehost.worker.process import Worker, WorkerDied
from devicehost.worker.restart import RestartPolicy
from devicehost.worker.settings import RestartInfo, WorkerSettings, config_table

__all__ = [
    "KILL_MARGIN",
    "START_DEADLINE",
    "Restart",
    "WorkerFailed",
    "WorkerHookError",
    "WorkerProxy",
    "WorkerRunner",
    "register_failure_handler",
    "register_restart_handler",
]

log = logging.getLogger("devicehost.worker")

#: Seconds a worker has to start and build its device (its interpreter, the host's and the
#: plugin's imports, the constructor), or the device's hook deadline if that is longer.
START_DEADLINE: Final = 30.0
#: The share of a deadline a worker gets before the proxy kills it (the rest lets the kill and
#: its report happen before the lifecycle's own deadline).
KILL_MARGIN: Final = 0.9


class WorkerHookError(DeviceHostError):
    """A hook raised in the worker; subclasses are named after what it raised (``ValueError``),
    so a failure reads as it would inline."""


class WorkerFailed(DeviceHostError):
    """Raised when a device's worker failed for good (no restart, or past the burst limit)."""


_REMOTE: dict[str, type[WorkerHookError]] = {}


def _remote_error(type_name: str, message: str, key: str | None = None) -> DeviceHostError:
    # The log line of a failure shows the message only: an empty one (MemoryError) says what.
    message = message or f"{excerpt(type_name)} without a message"
    if type_name == "ConfigError" and key is not None:
        return ConfigError(message, key=key)
    cls = _REMOTE.get(type_name)
    if cls is None:
        if not (type_name.isidentifier() and len(type_name) <= 64 and len(_REMOTE) < 256):
            return WorkerHookError(f"{excerpt(type_name)}: {message}")
        cls = _REMOTE[type_name] = type(type_name, (WorkerHookError,), {})
    return cls(message)


@attrs.define(eq=False)
class WorkerRunner:
    """The supervisor's handle on a runner in a worker: the worker and the runner's id there
    (both replaced when the worker is restarted)."""

    worker: Worker
    id: int

    def __repr__(self) -> str:
        return f"<runner {self.id} in worker pid {self.worker.pid}>"


@attrs.frozen
class Restart:
    """What a restart handler gets: the device's ``ctx``, the resources of its last open, the
    restart's information, and :meth:`reopen`, the default restart (offer again, open with
    ``resources``, run)."""

    ctx: DeviceContext
    resources: Any
    info: RestartInfo
    reopen: Callable[[Any], Awaitable[None]]


_RESTART_HANDLERS: dict[type, Callable[[Restart], Awaitable[bool | None]]] = {}


def register_restart_handler(resources_type: type,
                             handler: Callable[[Restart], Awaitable[bool | None]]) -> None:
    """Restart devices opened with ``resources_type`` through ``handler`` instead of the default
    reopen. ``handler`` runs in the supervisor once the new worker is up; it calls
    ``await restart.reopen(resources)`` to open the device in it (the run then goes on), or
    returns True when its transport takes the restart over (the run ends, the device is done
    until opened again: VMBus revokes and re-offers it), or returns without either (the run ends
    with :class:`WorkerFailed`)."""
    _RESTART_HANDLERS[resources_type] = handler


_FAILURE_HANDLERS: dict[type, Callable[[DeviceContext, str], None]] = {}


def register_failure_handler(resources_type: type,
                             handler: Callable[[DeviceContext, str], None]) -> None:
    """Tell the transport of devices opened with ``resources_type`` when a worker died for good
    while its device was open (no restart, or past the burst limit): ``handler(ctx, cause)``
    runs in the supervisor just before the device's run fails (VMBus revokes the offer, so the
    guest's channel closes instead of waiting on a device that is gone). It must not block."""
    _FAILURE_HANDLERS[resources_type] = handler


def _where(cls: type) -> dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if "<locals>" in cls.__qualname__:
        raise WorkerFailed(f"{cls.__qualname__} is defined in a function: a worker can only"
                           " import a device class defined at a module's top level")
    return {"module": cls.__module__, "qualname": cls.__qualname__, "file": path}


class WorkerProxy:
    """The supervisor's side of one isolated device (module docstring)."""

    def __init__(self, task_group: anyio.abc.TaskGroup, name: str, plugin: str,
                 device_class: type, config: Any, settings: WorkerSettings,
                 host_settings: Any, deadlines: Deadlines) -> None:
        self.task_group = task_group
        self.name = name
        self.plugin = plugin
        self.device_class = device_class
        self.settings = settings
        self.deadlines = deadlines
        self.policy = RestartPolicy(settings)
        self.worker: Worker | None = None
        self.offer_value: Any = None
        self.resources: Any = None
        #: The latest report per key, from every worker of this device.
        self.reports: dict[str, Any] = {}
        #: Why the last worker failed, if one did.
        self.last_failure: str | None = None
        #: The pid of every worker started for this device, in order.
        self.pids: list[int] = []
        self._closed = False
        try:
            table = config_table(config)
        except TypeError as exc:
            raise WorkerFailed(str(exc)) from exc
        self._init = {"op": "init", "id": 0, "device": _where(device_class), "name": name,
                      "plugin": plugin, "config": table,
                      "settings": config_table(host_settings),
                      "sys_path": [p for p in sys.path if p],
                      "log_level": logging.getLogger().getEffectiveLevel(), "restart": None}

    # -- workers --------------------------------------------------------------------------------

    def _report(self, key: str, value: Any) -> None:
        if value is None:
            self.reports.pop(key, None)
        elif key in self.reports or len(self.reports) < 1024:
            self.reports[key] = value

    async def _start(self, restart: RestartInfo | None) -> Worker:
        if self._closed:
            raise WorkerFailed("the host is stopping: no new worker is started")
        init = dict(self._init)
        if restart is not None:
            init["restart"] = {"count": restart.count, "cause": restart.cause,
                               "reports": restart.reports}
        started = time.monotonic()
        self.worker = await Worker.start(
            self.task_group, self.name, init, memory_limit=self.settings.memory_limit,
            deadline=max(START_DEADLINE, self.deadlines.hook),
            unresponsive_after=self.deadlines.hook, on_report=self._report, pids=self.pids)
        log.debug("device %r: worker pid %d started in %.3f s", self.name, self.worker.pid,
                  time.monotonic() - started)
        return self.worker

    async def start(self) -> None:
        """Start the device's first worker (the host calls it before the first ``offer``, so
        that an interpreter's start and the plugin's import are not charged to a hook's
        deadline); :class:`WorkerDied` if it cannot build the device."""
        if self.worker is None:
            await self._start(None)

    async def _live_worker(self) -> Worker:
        """The worker for a call that needs no runner: the current one, a first one, or (after
        a failure while idle) a restarted one if the policy allows."""
        worker = self.worker
        if worker is not None and not worker.gone:
            return worker
        if worker is None:
            return await self._start(None)
        cause = (await worker.died()).cause
        self.last_failure = cause
        delay = self.policy.next_delay(time.monotonic())
        if delay is None:
            raise WorkerFailed(self._final(cause))
        log.warning("device %r: %s; restarting it (restart %d)", self.name, cause,
                    self.policy.restarts)
        await anyio.sleep(delay)
        return await self._start(self._restart_info(cause))

    def _restart_info(self, cause: str) -> RestartInfo:
        return RestartInfo(self.policy.restarts, cause, dict(self.reports))

    def _final(self, cause: str) -> str:
        if self.settings.restart == "no":
            return cause
        return f"{cause}; {self.policy.summary()}"

    async def aclose(self) -> None:
        """Stop for good: ask the worker to exit, kill it after the stop deadline; reaped."""
        self._closed = True
        if self.worker is not None:
            await self.worker.shutdown(self.deadlines.stop)

    # -- calls ----------------------------------------------------------------------------------

    async def _request(self, worker: Worker, hook: str, args: dict[str, Any],
                       **extra: Any) -> tuple[Any, list[int]]:
        out = Encoder()
        encoded = {k: (v if k == "runner" else out.value(v)) for k, v in args.items()}
        stash = extra.pop("stash", None)
        if stash is not None:
            extra["stash"] = [[h, kind, out.fd(fd)] for h, (fd, kind) in stash.items()]
        deadline = self.deadlines.hook
        try:
            with anyio.fail_after(deadline * KILL_MARGIN):
                reply, fds = await worker.request(
                    {"op": "call", "hook": hook, "args": encoded, **extra}, out.fds)
        except TimeoutError:
            worker.kill(f"{hook}: no answer within {deadline:g} s")
            raise WorkerDied(f"{hook}: no answer within {deadline:g} s; the worker (pid"
                             f" {worker.pid}) was killed") from None
        except WorkerDied:
            raise
        except BaseException:
            worker.kill(f"its {hook} was given up on")
            raise
        if isinstance(reply, Failure):
            close_fds(fds)
            raise _remote_error(reply.type, reply.message, reply.key)
        return reply.value, fds

    async def _call(self, worker: Worker, hook: str, args: dict[str, Any],
                    **extra: Any) -> Any:
        value, fds = await self._request(worker, hook, args, **extra)
        try:
            return decode_value(value, fds)
        except CodecError as exc:
            worker.kill(f"it answered {hook} with a malformed value ({exc})")
            raise WorkerFailed(f"the worker answered {hook} with a malformed value: {exc}"
                               ) from exc

    # -- the device contract --------------------------------------------------------------------

    @hookimpl
    async def offer(self, ctx: DeviceContext, incoming: Any) -> Any:
        if incoming is not None:
            raise WorkerFailed("a VMBus client device cannot run in a worker")
        value = await self._call(await self._live_worker(), "offer", {"incoming": None})
        self.offer_value = value
        return value

    @hookimpl
    async def open(self, ctx: DeviceContext, resources: Any) -> WorkerRunner | None:
        worker = await self._live_worker()
        rid = await self._call(worker, "open", {"resources": resources})
        return self._runner(worker, rid, resources)

    def _runner(self, worker: Worker, rid: Any, resources: Any) -> WorkerRunner | None:
        if rid is None:
            return None
        if type(rid) is not int:
            worker.kill("it answered open with no runner id")
            raise WorkerFailed(f"the worker answered open with {excerpt(rid)}, not a runner id")
        self.resources = resources
        return WorkerRunner(worker, rid)

    @hookimpl
    async def restore_open(self, ctx: DeviceContext, state: Any, resources: Any
                           ) -> WorkerRunner | None:
        worker = await self._live_worker()
        stash = ctx.fds.take_all()
        try:
            rid = await self._call(worker, "restore_open",
                                   {"state": state, "resources": resources}, stash=stash)
        finally:
            close_fds([fd for fd, _kind in stash.values()])  # the worker has its duplicates
        return self._runner(worker, rid, resources)

    @hookimpl
    async def close(self, ctx: DeviceContext, runner: WorkerRunner | None,
                    subchannel_index: int) -> None:
        self.resources = None
        if runner is None or runner.worker.gone:
            return  # the runner ended with its worker
        try:
            await self._call(runner.worker, "close",
                             {"runner": runner.id, "subchannel_index": subchannel_index})
        except WorkerDied as exc:
            # Closing is what its end did anyway; the worker's failure is the news.
            log.warning("device %r: its worker ended while closing it: %s", self.name, exc.cause)

    @hookimpl
    async def save_open(self, ctx: DeviceContext, runner: WorkerRunner) -> Any:
        worker = runner.worker
        if worker.gone:
            raise WorkerDied(worker.cause or "the worker has ended")
        value, fds = await self._request(worker, "save_open", {"runner": runner.id},
                                         carry_fds=ctx.fds.carries_fds)
        inp = Decoder(fds)
        try:
            fields = inp.fields(value, "state", "handles")
            state = inp.value(fields["state"])
            handles = fields["handles"]
            if not isinstance(handles, list):
                raise CodecError("save_open: the handles are not a list")
            for row in handles:
                if not (isinstance(row, list) and len(row) == 3 and isinstance(row[1], str)):
                    raise CodecError(f"save_open: a handle row {excerpt(row)}")
                fd = inp.fd(row[2], row[1])
                try:
                    if ctx.fds.put(fd) != row[0]:
                        raise CodecError(f"save_open: handle {excerpt(row[0])} out of order")
                finally:
                    close_fds([fd])
        except CodecError as exc:
            worker.kill(f"it answered save_open with a malformed value ({exc})")
            raise WorkerFailed(f"the worker answered save_open with a malformed value: {exc}"
                               ) from exc
        finally:
            inp.close_untaken()
        return state

    @hookimpl
    def run(self, ctx: DeviceContext, runner: WorkerRunner) -> Awaitable[None]:
        return self._run(ctx, runner)

    @hookimpl
    async def inspect(self, ctx: DeviceContext, runner: WorkerRunner | None) -> dict[str, Any]:
        worker = self.worker
        info: dict[str, Any] = {
            "pid": None if worker is None else worker.pid,
            "alive": worker is not None and not worker.gone,
            "restarts": self.policy.restarts,
            "started": len(self.pids),
            "restart": self.settings.restart,
            "memory_limit": self.settings.memory_limit,
        }
        if self.last_failure is not None:
            info["last_failure"] = self.last_failure
        if worker is not None and worker.gone:
            info["ended"] = worker.cause or "killed"
        tree: dict[str, Any] = {}
        if info["alive"] and worker is not None and (runner is None or runner.worker is worker):
            try:
                value = await self._call(worker, "inspect",
                                         {"runner": None if runner is None else runner.id})
            except DeviceHostError as exc:
                info["inspect_error"] = str(exc)
            else:
                if isinstance(value, dict):
                    tree.update(value)
        tree["worker"] = info
        return tree

    # -- running and restarting -------------------------------------------------------------------

    async def _run(self, ctx: DeviceContext, runner: WorkerRunner) -> None:
        cause: str | None = None
        while True:
            if cause is None and runner.worker.gone:
                cause = (await runner.worker.died()).cause
            if cause is not None:
                if await self._recover(ctx, runner, cause):
                    return
                cause = None
            try:
                ended = await self._run_once(runner)
            except WorkerDied as exc:
                cause = exc.cause
                continue
            if ended.outcome != "raised":
                return
            error = ended.error or "an error"
            if self.settings.restart == "no":
                type_name, _, message = error.partition(": ")
                raise _remote_error(type_name, message)
            cause = f"its run raised {error}"

    async def _run_once(self, runner: WorkerRunner) -> Any:
        worker, rid = runner.worker, runner.id
        await worker.begin_run(rid)
        try:
            return await worker.wait_ended(rid)
        except WorkerDied:
            raise
        except BaseException:
            # Cancelled: the device is being stopped. The worker cancels its run; one that does
            # not end within the stop deadline is killed (the device fails with that cause).
            with anyio.CancelScope(shield=True):
                await worker.stop(rid)
                limit = self.deadlines.stop
                ended = None
                with anyio.move_on_after(limit * KILL_MARGIN):
                    ended = await worker.wait_ended(rid)
                if ended is None:
                    worker.kill(f"its run did not stop within {limit:g} s of its cancel")
                    raise WorkerFailed(f"run did not stop within {limit:g} s of its cancel; the"
                                       f" worker (pid {worker.pid}) was killed") from None
                if ended.outcome == "raised":
                    type_name, _, message = (ended.error or "").partition(": ")
                    raise _remote_error(type_name, message) from None
            raise

    async def _reopen(self, worker: Worker, into: list[WorkerRunner], resources: Any) -> None:
        rid = await self._call(worker, "open", {"resources": resources})
        new = self._runner(worker, rid, resources)
        if new is None:
            raise WorkerFailed("the restarted device's open returned no runner")
        into.append(new)

    async def _recover(self, ctx: DeviceContext, runner: WorkerRunner, cause: str) -> bool:
        """Replace the failed worker of ``runner`` (module docstring) or raise WorkerFailed.
        True if a restart handler took the restart over (the run then ends)."""
        while True:
            self.last_failure = cause
            old = runner.worker
            if not old.dead.is_set():
                await old.shutdown(self.deadlines.stop * KILL_MARGIN)
            delay = self.policy.next_delay(time.monotonic())
            if delay is None or self._closed:
                failed = _FAILURE_HANDLERS.get(type(self.resources))
                if failed is not None and not self._closed:
                    failed(ctx, self._final(cause))
                raise WorkerFailed(self._final(cause))
            log.warning("device %r: %s; restarting it in %.2g s (restart %d of at most %d within"
                        " %g s)", self.name, cause, delay, self.policy.restarts,
                        self.settings.restart_burst, self.settings.restart_interval)
            await anyio.sleep(delay)
            info = self._restart_info(cause)
            try:
                worker = await self._start(info)
                offer = await self._call(worker, "offer", {"incoming": None})
                if offer != self.offer_value:
                    raise WorkerFailed(f"the restarted device offers {excerpt(offer)}, not"
                                       f" {excerpt(self.offer_value)}")
                reopened: list[WorkerRunner] = []
                reopen = functools.partial(self._reopen, worker, reopened)
                handler = _RESTART_HANDLERS.get(type(self.resources))
                if handler is None:
                    await reopen(self.resources)
                elif await handler(Restart(ctx, self.resources, info, reopen)) is True:
                    # The transport took the restart over (VMBus: revoke, re-offer, and the
                    # guest opens again): this run ends; the new worker serves the next open.
                    log.info("device %r: worker pid %d is up; its transport re-offers it",
                             self.name, worker.pid)
                    return True
                if not reopened:
                    raise WorkerFailed(f"{cause}; its restart handler did not reopen it")
            except WorkerDied as exc:
                cause = f"its restart failed: {exc.cause}"
                continue
            except WorkerFailed:
                raise
            except DeviceHostError as exc:
                cause = f"its restart failed: {type(exc).__name__}: {exc}"
                continue
            runner.worker, runner.id = reopened[0].worker, reopened[0].id
            log.info("device %r: restarted in worker pid %d", self.name, worker.pid)
            return False
