"""A raw VMBus channel: an incoming ring, an outgoing ring, and a signal to and from the peer.

Signals are edge notifications: :meth:`RawChannel.signal_remote` wakes the peer's
:meth:`RawChannel.wait_for_signal`. A wait may return spuriously; callers re-check their ring.
Two kinds of signal:

- :class:`InProcessSignal` (from :func:`connected_signals`): anyio events, for a peer in the same
  event loop (the in-process VMBus server and client, the test kit). Closing one end makes the
  other end's waits raise :class:`ChannelClosed`.
- :class:`EventfdSignal`: two eventfds (one per direction) for a peer in another process. A
  closed eventfd peer is not detected (close arrives through the control plane, as for GPADL
  rings upstream); waits re-poll every :data:`EVENTFD_BACKSTOP` seconds because CPython gives no
  cross-process memory fence for the ring's mask/index handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
from typing import Final, Protocol

import anyio

from devicehost.vmbus.ring import IncomingRing, OutgoingRing, RingMemory
from devicehost.waiters import Waiters

__all__ = [
    "EVENTFD_BACKSTOP",
    "ChannelClosed",
    "EventfdSignal",
    "InProcessSignal",
    "RawChannel",
    "Signal",
    "connected_channel_pair",
    "connected_signals",
    "drain_eventfd",
    "raw_channel_from_rings",
]

EVENTFD_BACKSTOP: Final = 0.05


class ChannelClosed(Exception):
    """Raised when waiting on a channel that was closed, at this end or by the peer."""


class Signal(Protocol):
    """One end of a bidirectional notification."""

    def notify_remote(self) -> None:
        """Wake the peer's :meth:`wait` (never blocks; a no-op once closed)."""

    async def wait(self) -> None:
        """Return once the peer notified (or spuriously); raise ChannelClosed once closed."""

    def close(self) -> None:
        """Close this end; its waits and the peer's in-process waits raise ChannelClosed."""

    @property
    def closed(self) -> bool:
        """Whether this end or a connected in-process peer is closed."""


class _Doorbell:
    """A notification flag plus a wake-up for every current waiter (:class:`Waiters`: a wake-up
    is most of a small message's round trip)."""

    __slots__ = ("_waiters", "closed", "pending")

    def __init__(self) -> None:
        self.pending = False
        self.closed = False
        self._waiters = Waiters()

    def ring(self) -> None:
        self.pending = True
        self._waiters.wake()

    def close(self) -> None:
        self.closed = True
        self._waiters.wake()

    async def wait(self) -> None:
        if self.closed:
            raise ChannelClosed("the channel is closed")
        if self.pending:
            self.pending = False
            await anyio.lowlevel.checkpoint()
            return
        await self._waiters.park()
        self.pending = False
        if self.closed:
            raise ChannelClosed("the channel is closed")


class InProcessSignal:
    """An in-process signal end: waits on its own doorbell, rings the peer's."""

    def __init__(self, local: _Doorbell, remote: _Doorbell) -> None:
        self._local = local
        self._remote = remote
        # The doorbell's own wait, with no forwarding coroutine in between (one layer less on
        # every wake-up).
        self.wait = local.wait  # type: ignore[method-assign]

    def notify_remote(self) -> None:
        if not self._local.closed:
            self._remote.ring()

    async def wait(self) -> None:
        await self._local.wait()

    def close(self) -> None:
        self._local.close()
        self._remote.close()

    @property
    def closed(self) -> bool:
        return self._local.closed


def connected_signals() -> tuple[InProcessSignal, InProcessSignal]:
    """Two connected in-process signal ends."""
    a, b = _Doorbell(), _Doorbell()
    return InProcessSignal(a, b), InProcessSignal(b, a)


_NOWAIT_READ = [hasattr(os, "RWF_NOWAIT")]


def drain_eventfd(fd: int) -> bool:
    """Reset eventfd ``fd``'s counter; whether it was non-zero. Never blocks.

    The read is ``preadv2(RWF_NOWAIT)``, which does not block whatever the fd's O_NONBLOCK flag
    says: a peer holding the same eventfd (a VMBus socket guest) can clear that flag on the
    shared open file description, and a plain read of a zero counter would then block the host.
    (Kernels whose eventfd refuses RWF_NOWAIT fall back to a plain non-blocking read.)
    """
    if _NOWAIT_READ[0]:
        try:
            os.preadv(fd, [bytearray(8)], -1, os.RWF_NOWAIT)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _NOWAIT_READ[0] = False
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True


class EventfdSignal:
    """A signal over two eventfds: this end waits on ``wait_fd`` and writes ``notify_fd``.

    The peer (usually another process) holds the same two eventfds the other way round (the
    VMBus socket's guest end waits on a pipe instead: ``socketclient.PipeWaitSignal``). With
    ``owns_fds`` the signal closes both fds on :meth:`close`. Several tasks may wait at once: one
    of them polls the fd and wakes the others.

    On asyncio the wait fd stays registered with the event loop from the first wait to
    :meth:`close` (its callback drains the counter, so the level-triggered poll does not spin):
    a wait then costs one future and one backstop timer, not a poller registration and removal
    and a cancel scope. Other backends wait with ``anyio.wait_readable``.
    """

    def __init__(self, wait_fd: int, notify_fd: int, *, owns_fds: bool = False) -> None:
        self.wait_fd = wait_fd
        self.notify_fd = notify_fd
        self._owns = owns_fds
        self._closed = False
        self._polling = False
        self._wake: anyio.Event | None = None
        # asyncio fast path: the loop the wait fd is registered with, the waiting future, and
        # whether the registered callback consumed a signal nobody was waiting for yet.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._future: asyncio.Future[None] | None = None
        self._pending = False

    def _drain(self) -> bool:
        """Consume the notifications pending on ``wait_fd``; whether there were any."""
        return drain_eventfd(self.wait_fd)

    @staticmethod
    def new_fds() -> tuple[int, int]:
        """Two fresh non-blocking eventfds (one per direction), inheritable by a child."""
        flags = os.EFD_NONBLOCK
        a = os.eventfd(0, flags)
        try:
            b = os.eventfd(0, flags)
        except BaseException:
            os.close(a)
            raise
        os.set_inheritable(a, True)
        os.set_inheritable(b, True)
        return a, b

    @classmethod
    def pair(cls) -> tuple[EventfdSignal, EventfdSignal]:
        """Two connected ends over new eventfds; the first end owns (closes) them."""
        a, b = cls.new_fds()
        return cls(a, b, owns_fds=True), cls(b, a)

    @property
    def closed(self) -> bool:
        return self._closed

    def notify_remote(self) -> None:
        if self._closed:
            return
        # BlockingIOError: the counter is saturated; the peer has notifications pending anyway.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.notify_fd, 1)

    async def wait(self) -> None:
        if self._closed:
            raise ChannelClosed("the channel is closed")
        if self._polling:
            if self._wake is None:
                self._wake = anyio.Event()
            await self._wake.wait()
        else:
            self._polling = True
            try:
                if self._pending or self._drain():
                    # Signalled already: no poller registration, no timer.
                    self._pending = False
                    await anyio.lowlevel.checkpoint()
                elif (loop := _asyncio_loop()) is not None:
                    await self._asyncio_wait(loop)
                else:
                    with anyio.move_on_after(EVENTFD_BACKSTOP):
                        await anyio.wait_readable(self.wait_fd)
                    self._drain()
            except (anyio.ClosedResourceError, OSError) as exc:
                raise ChannelClosed("the channel is closed") from exc
            finally:
                self._polling = False
                wake, self._wake = self._wake, None
                if wake is not None:
                    wake.set()
        if self._closed:
            raise ChannelClosed("the channel is closed")

    async def _asyncio_wait(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:
            loop.add_reader(self.wait_fd, self._readable)
            self._loop = loop
        future: asyncio.Future[None] = loop.create_future()
        self._future = future
        timer = loop.call_later(EVENTFD_BACKSTOP, _resolve, future)
        try:
            await future
        finally:
            timer.cancel()
            self._future = None
        self._pending = False

    def _readable(self) -> None:
        """The loop's callback while the wait fd is registered: consume and wake the waiter."""
        try:
            self._drain()
        except OSError:
            self._unregister()
        future = self._future
        if future is None:
            self._pending = True
        else:
            _resolve(future)

    def _unregister(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.wait_fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.set()
        self._unregister()
        if self._future is not None:
            _resolve(self._future)
        if self._owns:
            for fd in (self.wait_fd, self.notify_fd):
                # RuntimeError: no event loop is running, so nobody can be waiting.
                with contextlib.suppress(RuntimeError):
                    anyio.notify_closing(fd)
                os.close(fd)


def _asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or None on another backend (trio runs no asyncio loop)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RawChannel:
    """The host's (or guest's) end of a channel: read ``incoming``, write ``outgoing``."""

    def __init__(self, incoming: IncomingRing, outgoing: OutgoingRing, signal: Signal) -> None:
        self.incoming = incoming
        self.outgoing = outgoing
        self.signal = signal

    @property
    def closed(self) -> bool:
        return self.signal.closed

    def signal_remote(self) -> None:
        """Notify the peer (after a write that asked for it, or a commit that did)."""
        self.signal.notify_remote()

    async def wait_for_signal(self) -> None:
        """Wait until the peer signals (may return spuriously); ChannelClosed once closed."""
        await self.signal.wait()

    def close(self) -> None:
        self.signal.close()


def raw_channel_from_rings(incoming_mem: RingMemory, outgoing_mem: RingMemory,
                           signal_pair: Signal) -> RawChannel:
    """A channel over existing ring memory (e.g. a GPADL's pages split at the ring offset)."""
    return RawChannel(IncomingRing(incoming_mem), OutgoingRing(outgoing_mem), signal_pair)


def connected_channel_pair(ring_size: int) -> tuple[RawChannel, RawChannel]:
    """Two connected in-process channels (host end, guest end) whose rings each have
    ``ring_size`` bytes of data (rounded up to whole pages) in fresh memory."""
    if ring_size <= 0:
        raise ValueError("ring_size must be positive")
    data = math.ceil(ring_size / 4096) * 4096
    host_to_guest = RingMemory.from_view(bytearray(4096 + data))
    guest_to_host = RingMemory.from_view(bytearray(4096 + data))
    host_sig, guest_sig = connected_signals()
    host_out = OutgoingRing(host_to_guest)
    guest_out = OutgoingRing(guest_to_host)
    host = RawChannel(IncomingRing(guest_to_host), host_out, host_sig)
    guest = RawChannel(IncomingRing(host_to_guest), guest_out, guest_sig)
    return host, guest
