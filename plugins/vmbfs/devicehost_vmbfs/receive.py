"""Waiting for one message on a message pipe without ever losing it to a cancellation.

``MessagePipe.recv`` may be cancelled at its final checkpoint *after* it consumed a message, which
would drop a request (device) or a reply (client). :func:`receive_message` takes the message with
the synchronous ``try_recv`` right after a wait and returns without awaiting again: cancellation
can only land while nothing was consumed. It also skips that extra scheduling round, which is a
large share of a small message's cost.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel

__all__ = ["receive_message", "send_message"]


async def receive_message(pipe: Any, max_len: int) -> bytes:
    """One message of at most ``max_len`` bytes from ``pipe`` (a ``MessagePipe``).

    Raises what the pipe raises (``PipeError``, ``ChannelClosed``, ``RingError``).
    """
    channel = pipe.channel
    ring = channel.incoming
    while True:
        ring.set_interrupt_mask(True)
        try:
            message: bytes = pipe.try_recv(max_len)
            return message
        except anyio.WouldBlock:
            pass
        # Unmask, then re-check before sleeping, so a signal cannot be missed.
        ring.set_interrupt_mask(False)
        if ring.is_empty():
            await channel.wait_for_signal()
        else:
            await anyio.lowlevel.checkpoint()


async def send_message(pipe: Any, message: bytes | bytearray) -> None:
    """Send ``message``, waiting for ring space only when there is none (no extra checkpoint)."""
    while True:
        try:
            pipe.try_send(message)
            return
        except anyio.WouldBlock:
            await pipe.wait_write_ready(len(message))
