"""Accepting connections when the host runs short of file descriptors or kernel memory.

``accept()`` fails with EMFILE (this process is at its ``RLIMIT_NOFILE``), ENFILE (the system's
file table is full), ENOBUFS or ENOMEM (kernel memory) when the *host*, not the peer, is short of
resources. Nothing is lost: the connection the kernel could not hand over stays queued in the
listener's backlog until a descriptor is free. So an accept loop that meets one of these must not
end (that would take every device behind the listener down, or the whole host with it); it waits
and tries again. Every accept loop of devicehost goes through this module:

- :class:`AcceptBackoff` is one listener's exhaustion *episode*, without I/O: the first failure
  logs one warning and starts the episode; each failure returns the delay to wait before the next
  try (doubling from :data:`FIRST_DELAY` up to :data:`MAX_DELAY`, so a recovered host picks
  its queue up within a second); the episode ends, with one info line, once the listener's
  backlog is drained (a later success with connections still queued does not end it, so a host
  hovering at its limit logs one episode, not one per freed descriptor).
- :func:`accept_stream` accepts one connection from an anyio listener (anyio reports these
  failures as ``BrokenResourceError`` caused by the ``OSError``).
- :func:`accept_socket` accepts one connection from a raw non-blocking listening socket.

Errors that concern one connection only (:data:`PEER_ERRNOS`: aborted before it was accepted,
protocol errors Linux passes on from the network) are skipped: the next connection is taken at
once. Any other error ends the loop as before (e.g. the listener was closed).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from typing import Final, Protocol, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel

__all__ = [
    "FIRST_DELAY",
    "MAX_DELAY",
    "PEER_ERRNOS",
    "RESOURCE_ERRNOS",
    "AcceptBackoff",
    "Acceptor",
    "accept_socket",
    "accept_stream",
    "resource_errno",
]

#: The host is short of a resource; the connection stays queued, so wait and try again.
RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: One connection failed before it was accepted (accept(2), Linux notes); take the next one.
PEER_ERRNOS: Final = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
    errno.EINTR,
})
#: Seconds before the first retry of an episode; each further failure doubles it ...
FIRST_DELAY: Final = 0.01
#: ... up to this bound.
MAX_DELAY: Final = 1.0

_Stream = TypeVar("_Stream", covariant=True)
_T = TypeVar("_T")


class Acceptor(Protocol[_Stream]):
    """What :func:`accept_stream` accepts from: any anyio socket listener, for one."""

    async def accept(self) -> _Stream: ...


def _oserror(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, anyio.BrokenResourceError) and isinstance(exc.__cause__, OSError):
        return exc.__cause__
    return None


def resource_errno(exc: BaseException) -> int | None:
    """The errno of ``exc`` if it says the host is short of a resource (see
    :data:`RESOURCE_ERRNOS`), looking through anyio's ``BrokenResourceError``; else None."""
    error = _oserror(exc)
    if error is not None and error.errno in RESOURCE_ERRNOS:
        return error.errno
    return None


def _peer_errno(exc: BaseException) -> bool:
    error = _oserror(exc)
    return error is not None and error.errno in PEER_ERRNOS


class AcceptBackoff:
    """The exhaustion episodes of one listener, described by ``what`` in log lines."""

    def __init__(
        self, what: str, logger: logging.Logger, *, first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
    ) -> None:
        self.what = what
        self.logger = logger
        self.first_delay = first_delay
        self.max_delay = max_delay
        #: Episodes started so far, and accept attempts that failed for want of a resource.
        self.episodes = 0
        self.failures = 0
        self._next_delay: float | None = None  # None: not in an episode
        self._started = 0.0
        self._episode_failures = 0

    @property
    def in_episode(self) -> bool:
        return self._next_delay is not None

    def failed(self, err: int) -> float:
        """An accept failed with ``err`` (one of :data:`RESOURCE_ERRNOS`); returns the seconds
        to wait before the next try. Logs a warning when this starts an episode."""
        self.failures += 1
        self._episode_failures += 1
        delay = self._next_delay
        if delay is None:
            self.episodes += 1
            self._started = time.monotonic()
            delay = self.first_delay
            self.logger.warning(
                "%s: cannot accept connections: %s (%s); retrying, waiting connections stay"
                " queued (raise the file descriptor limit if this recurs)",
                self.what, os.strerror(err), errno.errorcode.get(err, err),
            )
        self._next_delay = min(delay * 2, self.max_delay)
        return delay

    def accepted(self, *, more_queued: bool) -> None:
        """An accept succeeded; ``more_queued``: connections are still waiting in the backlog
        (then an episode goes on until they are all taken)."""
        if self._next_delay is None:
            return
        if more_queued:
            self._next_delay = self.first_delay  # descriptors are coming free: retry soon
            return
        self.logger.info(
            "%s: accepting connections again (%d attempts failed over %.1f s)",
            self.what, self._episode_failures, time.monotonic() - self._started,
        )
        self._next_delay = None
        self._episode_failures = 0


def _queued(sock: socket.socket | None) -> bool:
    """Whether the listening socket has a connection waiting (False if it cannot tell)."""
    if sock is None or sock.fileno() < 0:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


async def accept_stream(listener: Acceptor[_T], backoff: AcceptBackoff) -> _T:
    """Accept one connection from ``listener``, waiting out resource shortages (see the module
    docstring); other errors propagate."""
    while True:
        try:
            stream = await listener.accept()
        except (OSError, anyio.BrokenResourceError) as exc:
            err = resource_errno(exc)
            if err is not None:
                await anyio.sleep(backoff.failed(err))
                continue
            if _peer_errno(exc):
                continue
            raise
        if backoff.in_episode:
            raw = None
            if isinstance(listener, anyio.TypedAttributeProvider):
                raw = listener.extra(anyio.abc.SocketAttribute.raw_socket, None)
            backoff.accepted(more_queued=_queued(raw))
        return stream


async def accept_socket(listener: socket.socket, backoff: AcceptBackoff) -> socket.socket:
    """Accept one connection from the non-blocking listening socket ``listener``, waiting for
    one to arrive and out resource shortages; other errors propagate. Always passes through the
    event loop at least once, so a flood of connections cannot starve other tasks."""
    await anyio.lowlevel.checkpoint()
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            await anyio.wait_readable(listener)
            continue
        except OSError as exc:
            err = resource_errno(exc)
            if err is not None:
                await anyio.sleep(backoff.failed(err))
                continue
            if _peer_errno(exc):
                continue
            raise
        if backoff.in_episode:
            backoff.accepted(more_queued=_queued(listener))
        return sock
