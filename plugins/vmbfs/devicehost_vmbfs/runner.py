"""The per-open state of a vmbfs channel and the small anyio loop that drives its core.

The loop, per message (facts §8.6): (a) wait until the outgoing ring has room for a reply of the
largest size, so a reply never waits for the guest; (b) receive one message of at most
MAX_MESSAGE_SIZE bytes; (c)+(d) hand it to the pure core; send the reply without awaiting.
READ_FILE data is read by the backing straight into the outgoing ring's free space
(``MessagePipe.reserve``), or, when the reply would wrap around the ring's end, into a reused
buffer that is copied into the ring once. Decision: if a read into the ring then fails, the
failure reply is sent instead and the bytes already read stay in the ring's unpublished free
space, which the guest can see; they are bytes of a file served to this guest, at offsets it may
read, so nothing leaks that a smaller read would not return.
Requests are parsed where they lie in the incoming ring (``MessagePipe.recv_parsed``), which is
guest memory: the core reads each fixed field once and copies the path before checking it, so a
guest changing the bytes meanwhile only changes which valid or invalid request it sent.
A fatal error (the guest broke the protocol, or its pipe failed) is logged and the loop returns:
the device is then *done* until the channel is closed and opened again.

Cancel safety: the only awaits are (a), (b) and a periodic yield; ``MessagePipe.recv`` either
returns one whole message or, cancelled, leaves the ring untouched, and the reply is sent
synchronously after the core ran, so a stop never loses or duplicates a request.

When requests are already queued and the ring has room, the loop serves them without awaiting;
it yields every :data:`YIELD_EVERY` messages so a busy channel cannot starve other tasks.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.lowlevel

from devicehost_vmbfs.core import FatalError, FatalErrorKind, ProtocolState, VmbfsCore
from devicehost_vmbfs.protocol import MAX_MESSAGE_SIZE

if TYPE_CHECKING:
    from devicehost.vmbus import MessagePipe

__all__ = ["YIELD_EVERY", "VmbfsRunner"]

#: Messages served back to back before the loop yields to other tasks even if more are queued.
YIELD_EVERY: Final = 16
# Ring bytes a MAX_MESSAGE_SIZE reply takes: in-band descriptor 16 + pipe header 8 + message,
# padded to 8, + footer 8 (facts §4, §8.6 (a)): 12320.
_REPLY_ROOM: Final = 16 + ((8 + MAX_MESSAGE_SIZE + 7) & ~7) + 8


class VmbfsRunner:
    """One open channel: its message pipe and its protocol core."""

    def __init__(self, pipe: MessagePipe, core: VmbfsCore) -> None:
        self.pipe = pipe
        self.core = core

    @property
    def state(self) -> ProtocolState:
        return self.core.state

    async def run(self, logger: logging.Logger) -> None:
        """Serve requests until a fatal error; cancel-safe at every await."""
        from devicehost.vmbus import ChannelClosed, PipeError, RingError

        if self.core.fatal is not None:
            return
        pipe = self.pipe
        outgoing = pipe.channel.outgoing
        # The request is parsed in the incoming ring, the READ_FILE reply built in the outgoing
        # one (pipe.reserve): the file data is read straight into the ring and sending it copies
        # nothing (unless it wraps).
        handle = functools.partial(self.core.handle, reply_buffer=pipe.reserve)

        budget = YIELD_EVERY
        try:
            while True:
                # (a) room for the largest reply; only await when there is none (a ring too
                # small to ever hold it fails here, before any message is read).
                if not outgoing.can_write(_REPLY_ROOM):
                    await pipe.wait_write_ready(MAX_MESSAGE_SIZE)
                # (b) one request (taken at once if queued), parsed and answered in the ring.
                reply = await pipe.recv_parsed(handle, MAX_MESSAGE_SIZE)
                pipe.try_send(reply)  # never blocks: the room was there before receiving
                budget -= 1
                if budget == 0:
                    # A guest that keeps the ring full must not starve the host's other tasks.
                    budget = YIELD_EVERY
                    await anyio.lowlevel.checkpoint()
        except FatalError as exc:
            logger.error("vmbfs: the guest broke the protocol, channel stopped: %s", exc)
        except (PipeError, ChannelClosed, RingError, anyio.WouldBlock) as exc:
            self.core.fatal = FatalError(FatalErrorKind.PIPE, _pipe_failure(exc))
            logger.error("vmbfs: pipe failed, channel stopped: %s", self.core.fatal)

    def inspect(self) -> dict[str, Any]:
        return {
            "state": self.core.state.value,
            "messages": self.core.messages,
            "fatal": None if self.core.fatal is None else str(self.core.fatal),
            "backing_errors": self.core.backing_errors,
            "last_backing_error": self.core.last_backing_error,
        }


def _pipe_failure(exc: Exception) -> str:
    """What went wrong with the pipe, each kind named once: a ``PipeError``'s text already starts
    with its kind (``"PacketTooLarge: ..."``); other errors are named by their type."""
    from devicehost.vmbus import PipeError

    if isinstance(exc, PipeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".rstrip(": ")
