"""Former workaround for a message pipe whose ``recv`` could lose a message to a cancellation.

``MessagePipe.recv`` and ``MessagePipe.send`` are now cancel-safe themselves (a cancelled receive
leaves the message in the ring; a send that returns has sent, a cancelled one has not) and skip
the extra scheduling round, so the device runner and :class:`~devicehost_vmbfs.client.VmbfsClient`
call the pipe directly. These two names only delegate to the pipe, for code written against them;
new code should call ``pipe.recv`` / ``pipe.send``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["receive_message", "send_message"]


async def receive_message(pipe: Any, max_len: int) -> bytes:
    """``pipe.recv(max_len)``: one message of at most ``max_len`` bytes (cancel-safe)."""
    message: bytes = await pipe.recv(max_len)
    return message


async def send_message(pipe: Any, message: bytes | bytearray) -> None:
    """``pipe.send(message)``: waits for ring space only when there is none (cancel-safe)."""
    await pipe.send(message)
