"""The host's guest gate: nothing a guest asks for runs a device between save and restore.

The servicing contract (``DESIGN.md``, "Quiesce") is that once the host has saved, no device
code runs until the host is resumed or closed: whatever the guest does meanwhile waits. Every
transport's guest-facing path that reaches a device (a VMBus guest opening, closing or
retargeting a channel) runs inside :meth:`GuestGate.passage`:

- while the gate is **open** a passage enters at once (and is counted);
- :meth:`GuestGate.quiesce` **closes** it: new passages wait, and it returns once every passage
  already inside has left, so that the host can stop and save its devices with none of their
  hooks half-run;
- :meth:`GuestGate.resume` opens it again: the waiting requests go on;
- :meth:`GuestGate.shut` ends it for good (the host is closing): waiting and later passages raise
  :class:`GateShutError`, which the transport reports to the guest as a failed request.

A passage entered inside another (closing a primary channel closes its subchannels), and the
host's own operations run inside :meth:`GuestGate.bypass` (revoking an offer while closing), never
wait: only a request that comes from a guest does.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio

from devicehost.errors import LifecycleError

__all__ = ["GateShutError", "GuestGate"]

#: The gates the current task (and the tasks it starts) holds a passage or a bypass of.
_HOLDING: contextvars.ContextVar[tuple[GuestGate, ...]] = contextvars.ContextVar(
    "devicehost_gates_held", default=()
)


class GateShutError(LifecycleError):
    """Raised to a guest request that waited at (or reached) the gate of a host that is closing."""


class GuestGate:
    """Holds guest requests while the host is quiesced; see the module docstring."""

    def __init__(self) -> None:
        self._opened = anyio.Event()
        self._opened.set()
        self._shut = False
        self._inside = 0
        self._waiting = 0
        self._arrived = anyio.Event()
        self._idle: anyio.Event | None = None

    @property
    def is_open(self) -> bool:
        """True while guest requests go through at once."""
        return self._opened.is_set() and not self._shut

    @property
    def inside(self) -> int:
        """How many guest requests are inside the gate now."""
        return self._inside

    @property
    def waiting(self) -> int:
        """How many guest requests wait at the closed gate now."""
        return self._waiting

    async def until_waiting(self, count: int) -> None:
        """Return once at least ``count`` guest requests wait at the gate (for ``inspect``
        and for tests that hold a guest at the gate)."""
        while self._waiting < count:
            await self._arrived.wait()

    @asynccontextmanager
    async def passage(self, what: str) -> AsyncIterator[None]:
        """Enter for guest request ``what`` (waits while the gate is closed); raises
        :class:`GateShutError` if the host is closing."""
        held = _HOLDING.get()
        if self in held:
            yield
            return
        if not self._opened.is_set():
            self._waiting += 1
            self._arrived.set()
            self._arrived = anyio.Event()
            try:
                while not self._opened.is_set():
                    await self._opened.wait()
            finally:
                self._waiting -= 1
        if self._shut:
            raise GateShutError(f"{what}: the host is closing")
        self._inside += 1
        token = _HOLDING.set((*held, self))
        try:
            yield
        finally:
            _HOLDING.reset(token)
            self._inside -= 1
            if self._inside == 0 and self._idle is not None:
                self._idle.set()

    @contextmanager
    def bypass(self) -> Iterator[None]:
        """Run a host operation that may call through a guest-facing path (it never waits)."""
        token = _HOLDING.set((*_HOLDING.get(), self))
        try:
            yield
        finally:
            _HOLDING.reset(token)

    async def quiesce(self) -> None:
        """Close the gate and wait until no guest request is inside."""
        if self._shut:
            return
        if self._opened.is_set():
            self._opened = anyio.Event()
        while self._inside:
            self._idle = anyio.Event()
            await self._idle.wait()
        self._idle = None

    def resume(self) -> None:
        """Open the gate: the waiting guest requests go on."""
        self._opened.set()

    def shut(self) -> None:
        """End the gate: every waiting and later guest request fails with GateShutError."""
        self._shut = True
        self._opened.set()
