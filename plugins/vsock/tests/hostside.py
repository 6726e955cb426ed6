"""Host-side Unix socket helpers for the vsock tests (real sockets, waited on with timeouts)."""

from __future__ import annotations

import socket

import anyio
from anyio.abc import SocketStream, UNIXSocketStream

Stream = SocketStream | UNIXSocketStream

__all__ = [
    "listen", "raw", "read_exactly", "read_line", "read_to_eof", "seq_accept", "seq_connect",
    "seq_listen", "seq_recv", "seq_send",
]


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




# SOCK_SEQPACKET host sockets: anyio has no stream type for them, so these are plain non-blocking
# sockets waited on with anyio.wait_readable / wait_writable.


def seq_listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(path)
    sock.listen(16)
    sock.setblocking(False)
    return sock


async def seq_accept(listener: socket.socket, timeout: float = 10) -> socket.socket:
    with anyio.fail_after(timeout):
        while True:
            await anyio.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                continue
            sock.setblocking(False)
            return sock


async def seq_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    sock.setblocking(False)
    return sock


async def seq_send(sock: socket.socket, message: bytes, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while True:
            try:
                sock.send(message)
                return
            except BlockingIOError:
                await anyio.wait_writable(sock)


async def seq_recv(sock: socket.socket, timeout: float = 10) -> bytes | None:
    """The next whole message (its length peeked first); None at end of stream."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    with anyio.fail_after(timeout):
        while True:
            try:
                size, anc, _, _ = sock.recvmsg_into(
                    (), socket.CMSG_SPACE(12), socket.MSG_PEEK | socket.MSG_TRUNC)
            except BlockingIOError:
                await anyio.wait_readable(sock)
                continue
            if not anc:
                return None
            return sock.recv(max(size, 1))
