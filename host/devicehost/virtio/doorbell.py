"""Doorbells: the notifications of a virtqueue, both ways (driver kick, device interrupt).

A doorbell is rung by one side and waited on by the other. Rings coalesce: any number of rings
before a wait wakes that wait once. :class:`EventDoorbell` stays inside one process (asyncio
futures, or anyio events under other backends); :class:`EventfdDoorbell` rings and waits on a
Linux eventfd, as vhost-user's kick and call file descriptors are.

Fairness: every :meth:`Doorbell.wait` yields to the event loop at least once, even when the
doorbell was already rung, so a peer that rings without pause (a kick storm) costs its own
device one loop turn per notification and never starves another device. An
:class:`EventfdDoorbell` reads its fd once per wake-up (bounded work) and raises
:class:`DoorbellError` when the fd does not behave like an eventfd (a read of other than 8 bytes,
a zero count, an error other than "nothing to read"), instead of spinning or leaking a bare
:class:`OSError`. Transports check a peer's fd kind before they hand it to a doorbell
(:func:`devicehost.fds.require_eventfd`); this is the second line.
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Callable
from typing import Protocol

import anyio
import anyio.lowlevel

from devicehost.waiters import Waiters

__all__ = ["Doorbell", "DoorbellError", "EventDoorbell", "EventfdDoorbell"]


class DoorbellError(Exception):
    """Raised by :meth:`EventfdDoorbell.wait` when its fd is not a working eventfd (the fault of
    whoever supplied the fd)."""


class Doorbell(Protocol):
    """One direction of notification."""

    def ring(self) -> None:
        """Notify the waiting side (never blocks)."""

    async def wait(self) -> None:
        """Wait until the doorbell was rung since the last wait returned."""


class EventDoorbell:
    """An in-process doorbell. ``rings`` counts every ring (for tests and statistics).

    Any number of tasks may wait; each ring wakes them all and lets exactly one return (the
    first to run consumes the ring; the others wait again). A waiter cancelled after a ring
    never consumed it, so the ring stays pending for the next wait. A wait on a doorbell that is
    already rung still yields once (module docstring: fairness). The wake-up is
    :class:`devicehost.waiters.Waiters` (no event object per wait on asyncio: this is on every
    virtqueue notification).
    """

    __slots__ = ("_pending", "_waiters", "rings")

    def __init__(self) -> None:
        self._pending = False
        self._waiters = Waiters()
        self.rings = 0

    def ring(self) -> None:
        self.rings += 1
        self._pending = True
        self._waiters.wake()

    async def wait(self) -> None:
        if self._pending:
            await anyio.lowlevel.checkpoint()  # fairness: one loop turn per wake-up
        while not self._pending:
            await self._waiters.park()
        self._pending = False


class EventfdDoorbell:
    """A doorbell over an eventfd; ``fd`` may be swapped while nobody waits on it. One task at a
    time may wait (anyio allows one reader per fd).

    A ring on a doorbell without an fd (the peer has not given one yet) is dropped; a wait on it
    lasts until an fd is set and signalled. The doorbell closes the fd on ``close`` or when it is
    replaced only if it owns it (``owns_fd``). ``on_fd_change``, if set, is called as
    ``on_fd_change(fd, False)`` after each :meth:`set_fd` and as ``on_fd_change(None, True)`` by
    :meth:`close` (a device in a worker process follows its VMM's doorbells this way,
    :mod:`devicehost.virtio.remote`).
    """

    def __init__(self, fd: int | None = None, *, owns_fd: bool = True) -> None:
        self.fd: int | None = None
        self._owns = owns_fd
        self.rings = 0
        self._fd_set: anyio.Event | None = None
        self._poll: select.poll | None = None  # POLLOUT on fd: the counter has room
        self.on_fd_change: Callable[[int | None, bool], None] | None = None
        if fd is not None:
            self.set_fd(fd, owns_fd=owns_fd)

    def set_fd(self, fd: int | None, *, owns_fd: bool = True) -> None:
        """Use ``fd`` from now on, closing the previous one if owned."""
        self._release()
        self.fd = fd
        self._owns = owns_fd
        if fd is not None:
            os.set_blocking(fd, False)
            self._poll = select.poll()
            self._poll.register(fd, select.POLLOUT)
            if self._fd_set is not None:
                self._fd_set.set()
        if self.on_fd_change is not None:
            self.on_fd_change(fd, False)

    def close(self) -> None:
        self._release()
        if self.on_fd_change is not None:
            self.on_fd_change(None, True)

    def _release(self) -> None:
        if self.fd is not None and self._owns:
            os.close(self.fd)
        self.fd = None
        self._poll = None

    def ring(self) -> None:
        self.rings += 1
        fd = self.fd
        if fd is None:
            return
        # The peer shares this eventfd's open file description: it can clear O_NONBLOCK and fill
        # the counter so that a write would block the host. Write only while the counter has
        # room (POLLOUT); a full counter means the peer has an unread notification anyway.
        # Left open: a peer that fills the counter between this poll and the write (the kernel
        # has no non-blocking write flag for eventfds; docs/security.md).
        if self._poll is None or not self._poll.poll(0):
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(fd, 1)

    async def wait(self) -> None:
        while True:
            fd = self.fd
            if fd is None:
                self._fd_set = event = anyio.Event()
                try:
                    await event.wait()
                finally:
                    self._fd_set = None
                continue
            if self._read_once(fd):
                # Already signalled: still give the loop one turn (a storm of kicks must not
                # keep this task running).
                await anyio.lowlevel.checkpoint()
                return
            await anyio.wait_readable(fd)
            if self._read_once(fd):
                return

    @staticmethod
    def _read_once(fd: int) -> bool:
        """Consume the eventfd's count: True if it was signalled, False if not (yet)."""
        try:
            data = os.read(fd, 8)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise DoorbellError(f"doorbell fd {fd} cannot be read: {exc}") from None
        if len(data) != 8 or data == bytes(8):
            raise DoorbellError(
                f"doorbell fd {fd} is not an eventfd: a read returned {len(data)} bytes"
                + (" of zeros" if data else "")
            )
        return True
