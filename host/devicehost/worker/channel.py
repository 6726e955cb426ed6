"""One end of a supervisor-worker socketpair: messages (:mod:`devicehost.worker.messages`) framed
and carried with their descriptors by :mod:`devicehost.handoff` (no second SCM_RIGHTS framing)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from typing import Any

import anyio

from devicehost.fds import fd_kind
from devicehost.handoff import Handoff, HandoffFd, receive_handoff, send_handoff
from devicehost.worker.messages import encode_message

__all__ = ["Channel", "ChannelClosed", "close_fds"]


class ChannelClosed(Exception):
    """Raised when the other end closed the socketpair (between two messages)."""


class Channel:
    """Sends and receives whole messages; one sender at a time (a lock), one receiver."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._lock = anyio.Lock()

    async def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send ``message`` with ``fds`` (duplicated into the peer; still the caller's).
        OSError (e.g. BrokenPipeError) if the peer is gone."""
        table = tuple(HandoffFd("worker", index, fd_kind(fd), fd)
                      for index, fd in enumerate(fds))
        async with self._lock:
            await send_handoff(self.sock, Handoff(encode_message(message), table))

    async def receive(self) -> tuple[bytes, list[int]]:
        """The next message's JSON bytes and its descriptors (now the caller's).
        :class:`ChannelClosed` at a clean end; :class:`~devicehost.handoff.HandoffError` for a
        malformed frame."""
        while True:
            try:
                peeked = self.sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                await anyio.wait_readable(self.sock)
                continue
            except ConnectionResetError as exc:
                raise ChannelClosed("the peer reset the connection") from exc
            if not peeked:
                raise ChannelClosed("the peer closed the connection")
            break
        handoff = await receive_handoff(self.sock)
        return handoff.envelope, [item.fd for item in handoff.fds]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def close_fds(fds: Sequence[int]) -> None:
    """Close received descriptors nobody took."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)

