"""The per-open state of a vmbfs channel and the small anyio loop that drives its core.

The loop, per message (facts §8.6): (a) wait until the outgoing ring has room for a reply of the
largest size, so a reply never waits for the guest; (b) receive one message of at most
MAX_MESSAGE_SIZE bytes; (c)+(d) hand it to the pure core; send the reply without awaiting.
A fatal error (the guest broke the protocol, or its pipe failed) is logged and the loop returns:
the device is then *done* until the channel is closed and opened again.

Cancel safety: the only awaits are (a) and (b); a receive either completes, consuming one whole
message, or leaves the ring untouched, and the reply is sent synchronously after the core ran,
so a stop never loses or duplicates a request.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import anyio.lowlevel

from devicehost_vmbfs.core import FatalError, FatalErrorKind, ProtocolState, VmbfsCore
from devicehost_vmbfs.protocol import MAX_MESSAGE_SIZE

__all__ = ["VmbfsRunner"]


class VmbfsRunner:
    """One open channel: its message pipe and its protocol core."""

    def __init__(self, pipe: Any, core: VmbfsCore) -> None:
        self.pipe = pipe
        self.core = core

    @property
    def state(self) -> ProtocolState:
        return self.core.state

    async def run(self, logger: logging.Logger) -> None:
        """Serve requests until a fatal error; cancel-safe at every await."""
        from devicehost.vmbus.channel import ChannelClosed
        from devicehost.vmbus.pipe import PipeError
        from devicehost.vmbus.ring import RingError

        if self.core.fatal is not None:
            return
        try:
            while True:
                await self.pipe.wait_write_ready(MAX_MESSAGE_SIZE)
                message = await self._receive()
                reply = self.core.handle(message)
                self.pipe.try_send(reply)  # never blocks: the space was waited for above
        except FatalError as exc:
            logger.error("vmbfs: the guest broke the protocol, channel stopped: %s", exc)
        except (PipeError, ChannelClosed, RingError, anyio.WouldBlock) as exc:
            self.core.fatal = FatalError(
                FatalErrorKind.PIPE, f"{type(exc).__name__}: {exc}".rstrip(": ")
            )
            logger.error("vmbfs: pipe failed, channel stopped: %s", self.core.fatal)

    async def _receive(self) -> bytes:
        """One message. Cancellation can only land while nothing was consumed: the message is
        taken with the synchronous ``try_recv`` right after a wait, never before an await."""
        channel = self.pipe.channel
        ring = channel.incoming
        while True:
            ring.set_interrupt_mask(True)
            try:
                message: bytes = self.pipe.try_recv(MAX_MESSAGE_SIZE)
                return message
            except anyio.WouldBlock:
                pass
            # Unmask, then re-check before sleeping, so a signal cannot be missed.
            ring.set_interrupt_mask(False)
            if ring.is_empty():
                await channel.wait_for_signal()
            else:
                await anyio.lowlevel.checkpoint()

    def inspect(self) -> dict[str, Any]:
        return {
            "state": self.core.state.value,
            "messages": self.core.messages,
            "fatal": None if self.core.fatal is None else str(self.core.fatal),
        }
