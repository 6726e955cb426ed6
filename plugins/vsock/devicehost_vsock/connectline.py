"""Reading a host connection's ``CONNECT <port>\\n`` line without reading past it.

The line is peeked and only its bytes up to the ``\\n`` are consumed, so data the host sends right
behind the line stays in the socket and is relayed to the guest once the connection is up. At most
:data:`~devicehost_vsock.hybrid.CONNECT_LINE_MAX` bytes are ever buffered. On a SEQPACKET host
connection the line is the connection's whole first message (:func:`read_connect_message`).
"""

from __future__ import annotations

import attrs

from devicehost_vsock.connection import HostStream
from devicehost_vsock.hybrid import CONNECT_LINE_MAX

__all__ = ["LineProgress", "read_connect_line", "read_connect_message"]


@attrs.frozen
class LineProgress:
    """Where reading stands: ``complete`` once the line ends in ``\\n``; ``failure`` says why the
    host connection must be closed (then nothing else matters)."""

    complete: bool = False
    failure: str | None = None


def read_connect_line(stream: HostStream, line: bytearray) -> LineProgress:
    """Append what is available of the CONNECT line to ``line`` (the bytes read so far)."""
    try:
        peeked = stream.peek(CONNECT_LINE_MAX - len(line))
        if peeked is None:
            return LineProgress()
        if not peeked:
            return LineProgress(failure="host connection closed before its CONNECT line")
        end = peeked.find(b"\n")
        take = len(peeked) if end < 0 else end + 1
        got = stream.recv_into(memoryview(bytearray(take)))
    except OSError as exc:
        return LineProgress(failure=f"reading a CONNECT line failed: {exc}")
    line += peeked[: got or 0]
    if end >= 0 and got == take:
        return LineProgress(complete=True)
    if len(line) >= CONNECT_LINE_MAX:
        return LineProgress(failure="host CONNECT line too long")
    return LineProgress()


def read_connect_message(stream: HostStream, line: bytearray) -> LineProgress:
    """SEQPACKET: read the first message, which must be the whole CONNECT line, into ``line``."""
    try:
        size = stream.message_size()
        if size is None:
            return LineProgress()
        if size < 0:
            return LineProgress(failure="host connection closed before its CONNECT message")
        if size > CONNECT_LINE_MAX:
            stream.recv_message_into([memoryview(bytearray(1))])  # discarded
            return LineProgress(failure=f"host CONNECT message of {size} bytes is too long")
        message = bytearray(size)
        got = stream.recv_message_into([memoryview(message)])
    except OSError as exc:
        return LineProgress(failure=f"reading a CONNECT message failed: {exc}")
    line[:] = message[:got]
    return LineProgress(complete=True)
