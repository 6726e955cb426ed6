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
                message = await self.pipe.recv(MAX_MESSAGE_SIZE)
                reply = self.core.handle(message)
                self.pipe.try_send(reply)
        except FatalError as exc:
            logger.error("vmbfs: the guest broke the protocol, channel stopped: %s", exc)
        except (PipeError, ChannelClosed, RingError) as exc:
            self.core.fatal = FatalError(FatalErrorKind.PIPE, f"{type(exc).__name__}: {exc}")
            logger.error("vmbfs: pipe failed, channel stopped: %s", self.core.fatal)

    def inspect(self) -> dict[str, Any]:
        return {
            "state": self.core.state.value,
            "messages": self.core.messages,
            "fatal": None if self.core.fatal is None else str(self.core.fatal),
        }
