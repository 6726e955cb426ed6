"""Waiters: tasks parked until the next wake-up, the cheapest way each backend allows.

The in-process notifications of both transports (a VMBus channel's signal, a virtqueue's
doorbell) are on every message's or packet's path, so their wake-up must be cheap. On asyncio
each parked task sleeps on a bare future of the running loop (what ``anyio.Event`` ends up
awaiting, without its two wrapping layers: about half the cost); cancelling the task cancels its
future, which then leaves the list. On other anyio backends (trio) the parked tasks share one
``anyio.Event``, whose class is remembered from the first one (``anyio.Event()`` looks the
backend up each time).

A :class:`Waiters` holds no flag: a wake-up with nobody parked is lost. The doorbells built on it
keep their own "rung" flag and park only while it is clear.

Fairness: :meth:`Waiters.park` always suspends the task (it never returns without a turn of the
event loop). A doorbell whose flag is already set does not park, so it must yield by itself
(``anyio.lowlevel.checkpoint()``) before it returns: otherwise a peer ringing without pause would
keep one task running and starve every other device. Every wait built on this module does.
"""

from __future__ import annotations

import asyncio
import contextlib

import anyio

__all__ = ["Waiters"]


class Waiters:
    """Tasks parked in :meth:`park` until the next :meth:`wake`."""

    __slots__ = ("_event", "_event_type", "_futures")

    def __init__(self) -> None:
        #: The asyncio tasks parked now, one future each.
        self._futures: list[asyncio.Future[None]] = []
        #: The event the tasks of another backend share, while any is parked.
        self._event: anyio.Event | None = None
        self._event_type: type[anyio.Event] | None = None

    @property
    def parked(self) -> int:
        """How many asyncio tasks are parked now (tasks of other backends share one event and
        are not counted)."""
        return len(self._futures)

    def wake(self) -> None:
        """Let every task parked now return from :meth:`park` (never blocks)."""
        futures = self._futures
        if futures:
            self._futures = []
            for future in futures:
                if not future.done():
                    future.set_result(None)
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def park(self) -> None:
        """Return after the next :meth:`wake` (cancellable)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on asyncio
            await self._shared_event().wait()
            return
        future = loop.create_future()
        self._futures.append(future)
        try:
            await future
        finally:
            # Woken: the list was already replaced. Cancelled: drop this future from it.
            if future.cancelled() or not future.done():
                with contextlib.suppress(ValueError):
                    self._futures.remove(future)

    def _shared_event(self) -> anyio.Event:
        event = self._event
        if event is None:
            make = self._event_type
            if make is None:
                event = anyio.Event()
                self._event_type = type(event)
            else:
                event = make()
            self._event = event
        return event
