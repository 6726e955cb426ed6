"""Host-side Unix socket helpers for the vsock tests (real sockets, waited on with timeouts)."""

from __future__ import annotations

import socket

import anyio
from anyio.abc import SocketStream, UNIXSocketStream

Stream = SocketStream | UNIXSocketStream

__all__ = ["listen", "raw", "read_exactly", "read_line", "read_to_eof"]


async def listen(base: str, port: int) -> anyio.abc.SocketListener:
    return await anyio.create_unix_listener(f"{base}_{port}")


def raw(stream: Stream) -> socket.socket:
    sock: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    return sock


async def read_exactly(stream: Stream, n: int, timeout: float = 5) -> bytes:
    out = bytearray()
    with anyio.fail_after(timeout):
        while len(out) < n:
            out += await stream.receive(n - len(out))
    return bytes(out)


async def read_to_eof(stream: Stream, timeout: float = 5) -> bytes:
    out = bytearray()
    with anyio.fail_after(timeout):
        while True:
            try:
                out += await stream.receive()
            except anyio.EndOfStream:
                return bytes(out)


async def read_line(stream: Stream, timeout: float = 5) -> bytes:
    out = bytearray()
    with anyio.fail_after(timeout):
        while not out.endswith(b"\n"):
            out += await stream.receive(1)
    return bytes(out)


