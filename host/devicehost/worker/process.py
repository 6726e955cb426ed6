"""A worker process, from the supervisor's side: start, calls, runs, pings, death, reaping.

:meth:`Worker.start` makes a socketpair, starts ``python -m devicehost.worker`` with only the
child's end passed (``close_fds``; stdin is ``/dev/null``, stdout and stderr one pipe that the
supervisor reads) and sends ``init``. Four tasks in the host's task group serve it until it ends:
the message reader, the stderr reader (each log record is logged again here under its own logger,
within a budget of :data:`LOG_RATE` lines a second and bursts of :data:`LOG_BURST`, so that a
worker flooding its output costs the host neither its CPU nor its log's disk: lines beyond are
counted and one line says how many were dropped; the last :data:`TAIL_LINES` lines, dropped or
not, are kept for the failure's cause), the pinger (a worker whose
event loop has not answered a ping for its device's hook deadline is killed: it stopped
answering) and the reaper, which waits for the exit, composes the cause and wakes everyone waiting
on the worker (:class:`WorkerDied`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

import anyio
import anyio.abc
import attrs

from devicehost.errors import DeviceHostError
from devicehost.excerpt import bounded_message
from devicehost.handoff import HandoffError
from devicehost.worker.channel import Channel, ChannelClosed, close_fds
from devicehost.worker.child import RECORD_MARK
from devicehost.worker.messages import (
    Ended,
    Failure,
    Pong,
    Report,
    Result,
    WorkerProtocolError,
    decode_from_worker_untrusted,
)

__all__ = ["LOG_BURST", "LOG_RATE", "TAIL_LINES", "LogBudget", "Worker", "WorkerDied",
           "relay_logger", "signal_name"]

log = logging.getLogger("devicehost.worker")

#: Lines of a worker's output kept for the cause of its failure.
TAIL_LINES: Final = 8
#: Log lines of one worker relayed per second on average, and at once (module docstring).
LOG_RATE: Final = 200.0
LOG_BURST: Final = 1000
#: Seconds between two "lines dropped" notes of one worker.
_DROP_NOTE_EVERY: Final = 1.0
_MAX_LINE: Final = 4096
#: How long the reaper waits for a dead worker's last output (a grandchild may hold the pipe).
_OUTPUT_GRACE: Final = 2.0
#: Environment variables of the host that a worker does not get.
_HOST_ONLY_ENV: Final = frozenset({"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                                   "WATCHDOG_USEC", "WATCHDOG_PID"})
#: Output lines left out of a cause: the frames of faulthandler's and Python's tracebacks.
_NOT_TAILED: Final = (" ", "\t", "Current thread", "Thread 0x", "Extension modules:",
                      "Traceback (most recent call last):")



class LogBudget:
    """A token bucket for one worker's relayed log lines (sans I/O: the caller gives ``now``).

    :meth:`take` says whether a line may be logged; :meth:`note` how many were dropped since the
    last note, when one is due (at most one per :data:`_DROP_NOTE_EVERY` seconds, or ``final``).
    """

    def __init__(self, now: float, *, rate: float = LOG_RATE, burst: int = LOG_BURST) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now
        self._noted_at = now
        self.dropped = 0  # since the last note
        self.total_dropped = 0

    def take(self, now: float) -> bool:
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.dropped += 1
        self.total_dropped += 1
        return False

    def note(self, now: float, *, final: bool = False) -> int:
        """The lines dropped since the last note if a note is due now (then counted as noted),
        else 0."""
        if not self.dropped or (not final and now - self._noted_at < _DROP_NOTE_EVERY):
            return 0
        dropped, self.dropped, self._noted_at = self.dropped, 0, now
        return dropped

class WorkerDied(DeviceHostError):
    """Raised when a worker is gone (exited, killed, stopped answering); ``cause`` says how."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def relay_logger(device: str, name: str) -> str:
    """The logger that a record of logger ``name`` from ``device``'s worker is logged under:
    its own name, unless that is the host's (``devicehost.*``) and not the device's own: a
    worker does not speak for the host or for another device."""
    own = f"devicehost.device.{device}"
    if name == own or name.startswith(own + ".") or not name.startswith("devicehost"):
        return name
    return f"devicehost.worker.{device}.{name}"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@attrs.define(eq=False)
class _Slot:
    event: anyio.Event = attrs.field(factory=anyio.Event)
    reply: Result | Failure | None = None
    fds: list[int] = attrs.field(factory=list)


class Worker:
    """One worker process of device ``name``; built by :meth:`start`."""

    def __init__(self, name: str, process: anyio.abc.Process, channel: Channel, *,
                 unresponsive_after: float, on_report: Callable[[str, Any], None]) -> None:
        self.name = name
        self.process = process
        self.pid = process.pid
        self.channel = channel
        self.started = time.monotonic()
        self.unresponsive_after = unresponsive_after
        self._on_report = on_report
        self._ids = itertools.count(1)
        self._pending: dict[int, _Slot] = {0: _Slot()}
        self._runs: dict[int, _Slot] = {}
        self._ended: dict[int, Ended] = {}
        self._last_pong = time.monotonic()
        self._kill_reason: str | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._output_done = anyio.Event()
        self._exited = anyio.Event()
        #: Set once the process has been reaped; :attr:`cause` then says how it ended.
        self.dead = anyio.Event()
        self.cause: str | None = None
        self.returncode: int | None = None
        self._logger = logging.getLogger(f"devicehost.worker.{name}")
        self._budget = LogBudget(time.monotonic())

    @classmethod
    async def start(
        cls, task_group: anyio.abc.TaskGroup, name: str, init: dict[str, Any], *,
        memory_limit: int | None, deadline: float, unresponsive_after: float,
        on_report: Callable[[str, Any], None], pids: list[int] | None = None,
    ) -> Worker:
        """Start a worker and initialise its device with ``init`` (the init message); the
        worker once its device is built. :class:`WorkerDied` if it fails to (it is reaped).
        ``pids``: the new worker's pid is appended to it as soon as it runs."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [sys.executable, "-m", "devicehost.worker", "--fd", str(child.fileno()),
                   "--name", name, "--parent", str(os.getpid())]
        # Not the service manager's sockets: a worker must not speak for the host (sd_notify) or
        # take its socket-activated listeners.
        env = {k: v for k, v in os.environ.items() if k not in _HOST_ONLY_ENV}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        if memory_limit is not None:
            command += ["--memory-limit", str(memory_limit)]
            env["MALLOC_ARENA_MAX"] = "1"
        try:
            process = await anyio.open_process(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=[child.fileno()], env=env)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        worker = cls(name, process, Channel(parent), unresponsive_after=unresponsive_after,
                     on_report=on_report)
        if pids is not None:
            pids.append(worker.pid)
        task_group.start_soon(worker._read_output)
        task_group.start_soon(worker._read_messages)
        task_group.start_soon(worker._reap)
        try:
            with anyio.fail_after(deadline):
                reply, fds = await worker._request(0, init, [])
            close_fds(fds)
            if isinstance(reply, Failure):
                with anyio.CancelScope(shield=True):
                    await worker.shutdown(deadline)
                raise WorkerDied(f"the worker (pid {worker.pid}) could not build the device:"
                                 f" {reply.type}: {reply.message}")
        except TimeoutError:
            worker.kill(f"its device was not built within {deadline:g} s")
            raise await worker.died() from None
        except WorkerDied:
            raise
        except BaseException:
            with anyio.CancelScope(shield=True):
                worker.kill("the supervisor gave up on its start")
                await worker.died()
            raise
        task_group.start_soon(worker._ping)
        return worker

    # -- calls ----------------------------------------------------------------------------------

    async def request(self, message: dict[str, Any], fds: Sequence[int] = ()
                      ) -> tuple[Result | Failure, list[int]]:
        """Send a call (``message`` without its id) and wait for its answer and descriptors.
        :class:`WorkerDied` if the worker is gone first. A caller that gives up (a deadline, a
        cancellation) kills the worker: what it was doing is then unknown."""
        ident = next(self._ids)
        self._pending[ident] = _Slot()
        return await self._request(ident, {**message, "id": ident}, fds)

    async def _request(self, ident: int, message: dict[str, Any], fds: Sequence[int]
                       ) -> tuple[Result | Failure, list[int]]:
        slot = self._pending[ident]
        try:
            if self.dead.is_set():
                raise WorkerDied(self.cause or "the worker has ended")
            try:
                await self.channel.send(message, fds)
            except OSError:
                raise await self.died() from None
            await slot.event.wait()
            if slot.reply is None:
                raise await self.died()
            return slot.reply, slot.fds
        finally:
            self._pending.pop(ident, None)

    async def begin_run(self, runner: int) -> None:
        """Start ``runner``'s run (:meth:`wait_ended` waits for its end); :class:`WorkerDied` if
        the worker is gone."""
        if self.dead.is_set():
            raise WorkerDied(self.cause or "the worker has ended")
        self._runs[runner] = _Slot()
        try:
            await self.channel.send({"op": "run", "runner": runner})
        except OSError:
            raise await self.died() from None

    async def wait_ended(self, runner: int) -> Ended:
        """Wait until ``runner``'s run ends (a cancelled wait can be resumed);
        :class:`WorkerDied` if the worker is gone first."""
        slot = self._runs.get(runner)
        if slot is None:
            raise WorkerDied(self.cause or f"runner {runner} is not running")
        await slot.event.wait()
        self._runs.pop(runner, None)
        ended = self._ended.pop(runner, None)
        if ended is None:
            raise await self.died()
        return ended

    async def stop(self, runner: int) -> None:
        """Ask the worker to cancel ``runner``'s run (its :meth:`wait_ended` then returns)."""
        with contextlib.suppress(OSError):
            await self.channel.send({"op": "stop", "runner": runner})

    # -- the end --------------------------------------------------------------------------------

    @property
    def gone(self) -> bool:
        """True once the worker has exited or was killed (it may not be reaped yet)."""
        return self._exited.is_set() or self._kill_reason is not None

    def kill(self, reason: str) -> None:
        """SIGKILL the worker, with ``reason`` as the cause (the first reason given is kept)."""
        if self._exited.is_set():
            return
        if self._kill_reason is None:
            self._kill_reason = reason
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def died(self) -> WorkerDied:
        """Wait until the worker is reaped; the :class:`WorkerDied` describing its end."""
        await self.dead.wait()
        return WorkerDied(self.cause or "the worker has ended")

    async def shutdown(self, deadline: float) -> None:
        """Ask the worker to exit; kill it if it has not within ``deadline`` seconds; reaped."""
        if not self.dead.is_set():
            with contextlib.suppress(OSError):
                with anyio.move_on_after(deadline):
                    await self.channel.send({"op": "exit"})
            with anyio.move_on_after(deadline):
                await self.dead.wait()
            self.kill(f"it did not exit within {deadline:g} s of being asked to")
        await self.dead.wait()

    def _describe_exit(self, code: int) -> str:
        pid = self.pid
        if self._kill_reason is not None:
            text = f"{self._kill_reason}; the worker (pid {pid}) was killed"
            if code >= 0:  # it ended on its own meanwhile
                text = f"{self._kill_reason}; the worker (pid {pid}) exited with code {code}"
        elif code < 0:
            text = f"the worker (pid {pid}) was killed by {signal_name(-code)}"
        else:
            text = f"the worker (pid {pid}) exited with code {code}"
        if self.tail:
            text += "; its last output: " + " | ".join(self.tail)
        return bounded_message(text, 2000)

    # -- tasks ----------------------------------------------------------------------------------

    async def _reap(self) -> None:
        with anyio.CancelScope(shield=True):
            code = await self.process.wait()
            self._exited.set()
            with anyio.move_on_after(_OUTPUT_GRACE):
                await self._output_done.wait()
            self.returncode = code
            self.cause = self._describe_exit(code)
            self.dead.set()
            for slot in [*self._pending.values(), *self._runs.values()]:
                slot.event.set()
            self.channel.close()
            with contextlib.suppress(Exception):
                await self.process.aclose()

    async def _read_messages(self) -> None:
        try:
            while True:
                data, fds = await self.channel.receive()
                try:
                    message = decode_from_worker_untrusted(data)
                except WorkerProtocolError as exc:
                    close_fds(fds)
                    self.kill(f"it sent a malformed message ({exc})")
                    return
                self._dispatch(message, fds)
        except ChannelClosed:
            # Usually the worker has ended: the reaper says how. One that lives on without its
            # channel is of no use.
            with anyio.move_on_after(_OUTPUT_GRACE):
                await self._exited.wait()
            self.kill("it closed its channel to the supervisor")
        except (HandoffError, OSError) as exc:
            self.kill(f"it sent a malformed frame ({exc})")

    def _dispatch(self, message: Any, fds: list[int]) -> None:
        if isinstance(message, Result | Failure):
            slot = self._pending.get(message.id)
            if slot is None or slot.event.is_set():
                close_fds(fds)
                self.kill(f"it answered call {message.id}, which it was not asked")
                return
            slot.reply, slot.fds = message, fds
            slot.event.set()
            return
        close_fds(fds)
        if isinstance(message, Ended):
            run = self._runs.get(message.runner)
            if run is not None:
                self._ended[message.runner] = message
                run.event.set()
        elif isinstance(message, Report):
            self._on_report(message.key, message.value)
        elif isinstance(message, Pong):
            self._last_pong = time.monotonic()

    async def _read_output(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        buffer = b""
        try:
            async for chunk in stream:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._relay(line)
                if len(buffer) > _MAX_LINE:
                    self._relay(buffer)
                    buffer = b""
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            if buffer:
                self._relay(buffer)
            self._note_dropped(final=True)
            self._output_done.set()

    def _note_dropped(self, *, final: bool = False) -> None:
        dropped = self._budget.note(time.monotonic(), final=final)
        if dropped:
            self._logger.warning("worker of device %r: %d log lines dropped (it logs more than"
                                 " %g lines a second)", self.name, dropped, self._budget.rate)

    def _relay(self, raw: bytes) -> None:
        text = raw[:_MAX_LINE].decode("utf-8", errors="replace").rstrip()
        if not text:
            return
        if text.startswith(RECORD_MARK):
            try:
                record = json.loads(text[1:])
                level, name, message = int(record["l"]), str(record["n"]), str(record["m"])
            except (ValueError, KeyError, TypeError):
                pass
            else:
                if self._within_budget():
                    logging.getLogger(relay_logger(self.name, name)).log(level, "%s", message)
                self.tail.append(f"{logging.getLevelName(level)} {name}: "
                                 f"{message.splitlines()[0] if message else ''}"[:300])
                return
        if self._within_budget():
            self._logger.warning("%s", text)
        if not text.startswith(_NOT_TAILED):  # a crash's stack: its first line says enough
            self.tail.append(text[:300])

    def _within_budget(self) -> bool:
        allowed = self._budget.take(time.monotonic())
        if allowed:
            self._note_dropped()
        return allowed

    async def _ping(self) -> None:
        interval = min(1.0, self.unresponsive_after / 4)
        ident = itertools.count(1)
        self._last_pong = last_turn = time.monotonic()
        while not self.dead.is_set():
            await anyio.sleep(interval)
            self._note_dropped()  # a flood that stopped is said too, not only at the next line
            now = time.monotonic()
            if now - last_turn > interval + self.unresponsive_after / 4:
                # This process's own event loop was held up (an inline plugin blocked it): the
                # worker's answers may wait unread. Its silence counts from now.
                self._last_pong = now
            last_turn = now
            silent = now - self._last_pong
            if silent > self.unresponsive_after:
                self.kill(f"it stopped answering (its event loop did not turn for"
                          f" {silent:.1f} s)")
                return
            with contextlib.suppress(OSError), anyio.move_on_after(interval):
                await self.channel.send({"op": "ping", "id": next(ident)})
