"""The watchdog of ``devicehost run``: the host stays stoppable when a plugin blocks the event loop.

Deadlines (:mod:`devicehost.lifecycle`) end any plugin code that *awaits*; code that never yields
(``time.sleep``, a busy loop, a blocking call) holds the one event loop every inline device shares,
and nothing in the process can preempt it. The watchdog is a thread that watches the loop from
outside:

- A heartbeat task (:meth:`Watchdog.watch`) marks every turn of the loop, ``interval`` apart. When
  the loop has not turned for ``stall`` seconds, the thread logs once, naming what runs: the
  detached task whose step holds the loop (:func:`devicehost.detached.running`, e.g. ``device
  'x' run``).
- :meth:`Watchdog.watch` chains a handler in front of the event loop's own SIGINT/SIGTERM handlers
  (the Python-level handler runs in the main thread even while a plugin sleeps or spins there; the
  loop's handler is still called, so a responsive loop stops exactly as without the watchdog).
  Once a stop was asked for, a loop that then stays blocked for ``stop_deadline`` seconds ends the
  process: the thread logs which device holds it and calls ``os._exit`` with
  :data:`devicehost.exitcodes.ABANDONED`. The same happens when the host has stopped but the
  process cannot end because an abandoned plugin task never does (a thread blocked for ever, a
  task that swallows the event loop's final cancellation).
- :meth:`Watchdog.finish` ends the process at once, with the host's exit code, when a device was
  abandoned during the run (a thread it started would keep the interpreter from exiting).

Inline plugins share the host's fate: the watchdog makes the host stoppable and names the culprit,
but the other devices stop with it. Isolating a device in its own process is the real fix.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any, Final

import anyio

from devicehost import detached, exitcodes

__all__ = ["DEFAULT_INTERVAL", "Watchdog"]

log = logging.getLogger("devicehost.watchdog")

#: Seconds between two heartbeats of the event loop.
DEFAULT_INTERVAL: Final = 0.1


def _end_process(code: int) -> None:
    logging.shutdown()  # flush the log: os._exit skips every cleanup
    sys.stderr.flush()
    os._exit(code)


class Watchdog:
    """Watches one event loop from a thread; see the module docstring.

    ``end`` is how the process is ended (``os._exit`` after flushing the log); tests replace it.
    """

    def __init__(
        self,
        stop_deadline: float,
        *,
        stall: float | None = None,
        interval: float = DEFAULT_INTERVAL,
        end: Callable[[int], None] = _end_process,
    ) -> None:
        self.stop_deadline = stop_deadline
        self.stall = stop_deadline if stall is None else stall
        self.interval = interval
        self._end = end
        self._beat = time.monotonic()
        self._stop_asked: float | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._abandoned_before = 0
        self._loop_thread: int | None = None
        #: What the watchdog said last (for tests and ``inspect``-like diagnostics).
        self.last_report: str | None = None

    # -- the thread ------------------------------------------------------------------------------

    def __enter__(self) -> Watchdog:
        # Only what is abandoned from now on is this run's (:meth:`finish`).
        self._abandoned_before = len(detached.abandoned(ended_too=True))
        self._thread = threading.Thread(target=self._watch, name="devicehost-watchdog",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread (the process goes on)."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _watch(self) -> None:
        stalled = False
        while not self._closed.wait(self.interval):
            now = time.monotonic()
            quiet = now - self._beat
            if quiet >= self.stall and not stalled:
                stalled = True
                self.last_report = (f"the event loop has not turned for {quiet:.1f} s;"
                                    f" running: {self._culprit()}")
                log.warning("%s", self.last_report)
            elif quiet < self.stall:
                stalled = False
            asked = self._stop_asked
            if asked is not None and now - max(asked, self._beat) >= self.stop_deadline:
                self.last_report = (f"the host did not stop within {self.stop_deadline:g} s of"
                                    f" being asked to: {self._culprit()}; ending the process")
                log.critical("%s", self.last_report)
                self._closed.set()
                self._end(exitcodes.ABANDONED)
                return

    def _culprit(self) -> str:
        step = None if self._loop_thread is None else detached.running(self._loop_thread)
        if step is not None:
            return f"{step} blocks the event loop"
        left = detached.abandoned()
        if left:
            return "abandoned, still running: " + ", ".join(left)
        return "no device code is running (the host itself)"

    # -- in the event loop -----------------------------------------------------------------------

    def _signalled(self) -> None:
        if self._stop_asked is None:
            self._stop_asked = time.monotonic()

    @asynccontextmanager
    async def watch(
        self, signums: Iterable[int] = (signal.SIGINT, signal.SIGTERM)
    ) -> AsyncIterator[None]:
        """Beat in the current event loop and chain the stop signals' handlers, until the block
        exits. Enter it inside the loop's own signal handling (``anyio.open_signal_receiver``),
        from the main thread."""
        self._loop_thread = threading.get_ident()
        chained = self._chain(signums)
        # A detached task rather than a task group: what the block raises stays as it is.
        heartbeat = detached.spawn("the watchdog's heartbeat", self._heartbeat)
        try:
            yield
        finally:
            heartbeat.scope.cancel()
            for signum, (previous, ours) in chained.items():
                if signal.getsignal(signum) is ours:
                    signal.signal(signum, previous)

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await anyio.sleep(self.interval)

    def _chain(self, signums: Iterable[int]) -> dict[int, tuple[Any, Any]]:
        chained: dict[int, tuple[Any, Any]] = {}
        for signum in signums:
            previous = signal.getsignal(signum)
            if not callable(previous):
                continue  # nobody handles it in Python: the default action ends the process

            def handler(num: int, frame: FrameType | None, previous: Any = previous) -> None:
                self._signalled()
                previous(num, frame)

            signal.signal(signum, handler)
            chained[signum] = (previous, handler)
        return chained

    def finish(self, code: int) -> int:
        """After the host has stopped with exit code ``code``: end the process at once if a
        device was abandoned (its task, or a thread it started, might never let the process
        exit), else stop the thread and return ``code``."""
        left = detached.abandoned(ended_too=True)[self._abandoned_before:]
        if left:
            self._closed.set()
            log.error("ending the process: what abandoned device tasks started may never end:"
                      " %s", ", ".join(left))
            self._end(code)
        self.close()
        return code
