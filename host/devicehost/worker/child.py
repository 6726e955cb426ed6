"""The worker process: one device, its hooks called by the supervisor over the socketpair.

``python -m devicehost.worker --fd N --name NAME [--parent PID] [--memory-limit BYTES]``, started
by the supervisor (:mod:`devicehost.worker.process`), never by hand. At its start the worker
applies its limits (:mod:`devicehost.worker.limits`), enables :mod:`faulthandler` (a crash prints
its traceback to stderr, which the supervisor keeps the end of), ignores SIGINT (its supervisor
stops it) and sends its log records to stderr as one JSON line each, which the supervisor logs
under the same logger names.

The first message is ``init``: the worker imports the device class, builds the config from its
table (:func:`devicehost.config.structure`) and the device, and registers it alone in a plugin
manager, as an inline host would. Then each ``call`` runs in a task of its own (``inspect`` may
come while ``open`` runs); ``open`` and ``restore_open`` keep their runner here and answer its id;
``run``/``stop`` start and cancel a runner's ``run``. The worker's :class:`WorkerHost` is the
device's ``ctx.host``: the task group, the host's settings, ``report`` and ``restart``.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import importlib.util
import inspect
import itertools
import json
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from devicehost.context import DeviceContext
from devicehost.errors import ConfigError, ends_the_host
from devicehost.excerpt import bounded_message
from devicehost.worker.channel import Channel, ChannelClosed, close_fds
from devicehost.worker.codec import Decoder, Encoder
from devicehost.worker.limits import apply_limits, exit_with_supervisor
from devicehost.worker.messages import decode_to_worker, encode_message
from devicehost.worker.settings import RestartInfo

__all__ = ["WorkerHost", "main", "serve"]

log = logging.getLogger("devicehost.worker")

#: The first character of a log line the supervisor parses as a JSON log record.
RECORD_MARK = "\x1e"


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return RECORD_MARK + json.dumps({"l": record.levelno, "n": record.name, "m": message})


class WorkerHost:
    """A device's ``ctx.host`` in a worker: what of a host a device may use there.

    ``task_group`` (the worker's), ``settings`` (the host's ``[host]`` table), ``worker`` (True:
    the device runs in a worker), ``restart`` (a :class:`~devicehost.worker.RestartInfo` when this
    worker replaces one that failed, else None) and :meth:`report`.
    """

    worker = True

    def __init__(self, task_group: anyio.abc.TaskGroup, settings: Any,
                 restart: RestartInfo | None,
                 out: MemoryObjectSendStream[tuple[dict[str, Any], list[int]]]) -> None:
        self.task_group = task_group
        self.settings = settings
        self.restart = restart
        self._out = out

    def report(self, key: str, value: Any) -> None:
        """Tell the supervisor ``value`` (JSON-able, at most 64 KiB as JSON) under ``key``; it
        keeps the latest value per key for the device's next worker (:attr:`restart`).
        ``value`` None removes the key."""
        encode_message({"v": value})  # a value JSON cannot hold is the caller's error, here
        self._out.send_nowait(({"op": "report", "key": key, "value": value}, []))


def _import_class(where: dict[str, Any]) -> type[Any]:
    module_name, qualname, path = where["module"], where["qualname"], where.get("file")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        if path is None:
            raise
        # A module pytest imported by path (--import-mode=importlib): load it the same way.
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    value: Any = module
    for part in qualname.split("."):
        value = getattr(value, part)
    if not isinstance(value, type):
        raise TypeError(f"{module_name}.{qualname} is not a class")
    return value


def _release(values: Any) -> None:
    """Release decoded hook arguments (their codecs' ``release``: mappings, descriptors)."""
    from devicehost.worker.codec import release_value

    for value in values:
        release_value(value)


def _describe(exc: BaseException) -> str:
    return bounded_message(f"{type(exc).__name__}: {exc}")


class _Worker:
    def __init__(self, channel: Channel, task_group: anyio.abc.TaskGroup) -> None:
        self.channel = channel
        self.tg = task_group
        self.out, self._queue = anyio.create_memory_object_stream[
            tuple[dict[str, Any], list[int]]](math.inf)
        self.runners: dict[int, Any] = {}
        #: Per runner, the decoded arguments of the open that built it (released at its close).
        self.acquired: dict[int, list[Any]] = {}
        self.runs: dict[int, anyio.CancelScope] = {}
        self._ids = itertools.count(1)
        self.pm: Any = None
        self.ctx: DeviceContext | None = None
        #: Set when everything queued was sent (after ``out`` is closed) or cannot be.
        self.sent = anyio.Event()

    async def sender(self) -> None:
        try:
            async for message, fds in self._queue:
                try:
                    await self.channel.send(message, fds)
                except OSError:
                    return  # the supervisor is gone; the receive loop ends too
                finally:
                    close_fds(fds)
        finally:
            self.sent.set()

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        self.out.send_nowait((message, fds or []))

    def fail(self, ident: int, exc: BaseException) -> None:
        key = exc.key if isinstance(exc, ConfigError) else None
        self.send({"op": "error", "id": ident, "type": type(exc).__name__,
                   "message": bounded_message(str(exc)), "key": key})

    def init(self, message: dict[str, Any]) -> bool:
        from devicehost.config import HostSettings, structure
        from devicehost.lifecycle import new_device_manager

        try:
            for path in message.get("sys_path", []):
                if path not in sys.path:
                    sys.path.append(path)
            logging.getLogger().setLevel(int(message.get("log_level", logging.INFO)))
            cls = _import_class(message["device"])
            name, plugin = message["name"], message["plugin"]
            table = message["config"]
            config_class = getattr(cls, "config_class", None)
            where = f"device {name!r}"
            config = None if config_class is None else structure(config_class, table, where)
            settings = structure(HostSettings, message["settings"], "[host]")
            restart = message.get("restart")
            info = None if restart is None else RestartInfo(
                int(restart["count"]), str(restart["cause"]), dict(restart["reports"]))
            self.pm = new_device_manager(cls(config), name)
            host = WorkerHost(self.tg, settings, info, self.out)
            self.ctx = DeviceContext(name=name, plugin=plugin, config=config,
                                     logger=logging.getLogger(f"devicehost.device.{name}"),
                                     host=host)
        except BaseException as exc:
            if ends_the_host(exc):
                raise
            self.fail(0, exc)
            return False
        self.send({"op": "result", "id": 0, "value": os.getpid()})
        return True

    async def call(self, message: dict[str, Any], fds: list[int]) -> None:
        ident, hook = message["id"], message["hook"]
        ctx = self.ctx
        assert ctx is not None
        kwargs: dict[str, Any] = {}
        try:
            inp = Decoder(fds)
            try:
                for name, raw in dict(message.get("args", {})).items():
                    if name == "runner":
                        kwargs["runner"] = None if raw is None else self.runners[raw]
                    else:
                        kwargs[name] = inp.value(raw)
                stash = message.get("stash")
                if stash is not None:
                    ctx.fds.load({int(h): (inp.fd(i, str(k)), str(k)) for h, k, i in stash})
            finally:
                inp.close_untaken()
            if hook == "save_open":
                ctx.fds.begin_save(carry=bool(message.get("carry_fds")))
            value = await self._call_hook(hook, kwargs)
        except BaseException as exc:
            if ends_the_host(exc) and not isinstance(exc, KeyboardInterrupt):
                raise
            if hook in ("save_open", "restore_open"):
                ctx.fds.discard()
            if hook in ("open", "restore_open"):
                _release(kwargs.values())
            self.fail(ident, exc)
            return
        out = Encoder()
        try:
            if hook in ("open", "restore_open"):
                if hook == "restore_open":
                    ctx.fds.discard()
                if value is not None:
                    rid = next(self._ids)
                    self.runners[rid] = value
                    self.acquired[rid] = [v for k, v in kwargs.items() if k != "runner"]
                    value = rid
                else:
                    _release(kwargs.values())
                data = value
            elif hook == "close":
                rid = message["args"].get("runner")
                self.runners.pop(rid, None)
                _release(self.acquired.pop(rid, ()))
                data = None
            elif hook == "save_open":
                drained = ctx.fds.drain()
                try:
                    data = {"state": out.value(value),
                            "handles": [[h, kind, out.fd(fd)] for h, kind, fd in drained]}
                except BaseException:
                    close_fds([fd for *_, fd in drained])
                    raise
                # The drained descriptors are the stash's duplicates: sent, then closed.
                self.send({"op": "result", "id": ident, "value": data},
                          [fd for *_, fd in drained])
                return
            else:
                data = out.value(value)
        except BaseException as exc:
            if ends_the_host(exc):
                raise
            self.fail(ident, exc)
            return
        self.send({"op": "result", "id": ident, "value": data}, [os.dup(fd) for fd in out.fds])

    async def _call_hook(self, hook: str, kwargs: dict[str, Any]) -> Any:
        caller = getattr(self.pm.hook, hook)
        value = caller(ctx=self.ctx, **kwargs)
        if hook == "close":
            for result in value:
                if inspect.isawaitable(result):
                    await result
            return None
        if inspect.isawaitable(value):
            value = await value
        return value

    def start_run(self, rid: int) -> None:
        if rid in self.runs:
            return
        runner = self.runners.get(rid)
        if runner is None:
            self.send({"op": "ended", "runner": rid, "outcome": "raised",
                       "error": f"no runner {rid} in this worker"})
            return
        scope = self.runs[rid] = anyio.CancelScope()
        self.tg.start_soon(self._run, rid, runner, scope)

    async def _run(self, rid: int, runner: Any, scope: anyio.CancelScope) -> None:
        outcome, error = "returned", None
        try:
            with scope:
                awaitable = self.pm.hook.run(ctx=self.ctx, runner=runner)
                if awaitable is None or not inspect.isawaitable(awaitable):
                    outcome, error = "raised", f"run returned {awaitable!r}, not an awaitable"
                else:
                    await awaitable
            if scope.cancel_called:
                outcome = "stopped"
        except BaseException as exc:
            if ends_the_host(exc) and not scope.cancel_called and not isinstance(
                    exc, KeyboardInterrupt):
                raise  # the worker itself is ending
            outcome, error = "raised", _describe(exc)
        finally:
            self.runs.pop(rid, None)
        self.send({"op": "ended", "runner": rid, "outcome": outcome, "error": error})

    async def loop(self) -> None:
        while True:
            try:
                data, fds = await self.channel.receive()
            except ChannelClosed:
                return
            message = decode_to_worker(data)
            op = message["op"]
            if op == "call":
                self.tg.start_soon(self.call, message, fds)
                continue
            close_fds(fds)
            if op == "run":
                self.start_run(message["runner"])
            elif op == "stop":
                scope = self.runs.get(message["runner"])
                if scope is not None:
                    scope.cancel()
            elif op == "ping":
                self.send({"op": "pong", "id": message["id"]})
            elif op == "exit":
                return


async def serve(sock: socket.socket) -> int:
    """Serve the supervisor on ``sock`` until it says exit or goes away; the exit code."""
    channel = Channel(sock)
    try:
        data, fds = await channel.receive()
    except ChannelClosed:
        return 0
    close_fds(fds)
    message = decode_to_worker(data)
    if message["op"] != "init":
        log.error("the supervisor's first message is %r, not init", message["op"])
        return 2
    code = 0
    async with anyio.create_task_group() as tg:
        worker = _Worker(channel, tg)
        tg.start_soon(worker.sender)
        if worker.init(message):
            await worker.loop()
        else:
            code = 3
        worker.out.close()
        with anyio.move_on_after(5):
            # Let what is queued (the init's failure, the last results) reach the supervisor.
            await worker.sent.wait()
        tg.cancel_scope.cancel()
    # The channel stays open until the process ends: its hang-up is what the supervisor watch
    # (limits.exit_with_supervisor) waits for.
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devicehost.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--parent", type=int)
    parser.add_argument("--memory-limit", type=int)
    args = parser.parse_args(argv)
    apply_limits(memory_limit=args.memory_limit, parent=args.parent)
    os.dup2(2, 1)  # what a plugin prints reaches the supervisor's log too
    faulthandler.enable()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    sock = socket.socket(fileno=args.fd)
    exit_with_supervisor(args.fd)
    return anyio.run(serve, sock)
