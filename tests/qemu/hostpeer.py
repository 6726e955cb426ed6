# SPDX-License-Identifier: MIT
"""The host side of guest vsock connections: Unix sockets only, never AF_VSOCK.

- :func:`pattern` is the known byte stream both sides agree on (the guest's vsockctl computes the
  same bytes): the little-endian u64 words ``seed, seed+1, ...`` truncated to the length, so a lost,
  duplicated or reordered chunk changes the bytes at its offset, not only the checksum.
- :class:`PortListener` listens at ``<base_path>_<port>`` (where the vsock device relays a guest's
  connect to host port ``port``), accepts one connection, reads exactly ``expect_len`` bytes, then
  writes a reply and closes.
- :func:`connect_to_guest` is the host-initiated leg: connect to the device's listener at
  ``base_path``, write ``CONNECT <port>\\n``, read the ``OK <local port>\\n`` line.
"""

from __future__ import annotations

import array
import contextlib
import re
import socket
import sys
import threading
import time
import zlib
from pathlib import Path

import attrs

__all__ = [
    "EchoResult",
    "PortListener",
    "ReceivedData",
    "connect_to_guest",
    "connect_without_guest_listener",
    "echo_through",
    "pattern",
    "send_to_sink",
]

OK_LINE = re.compile(rb"OK ([0-9]+)\n")
MAX_OK_LINE = 64


def pattern(seed: int, length: int) -> bytes:
    """``length`` bytes of the little-endian u64 words seed, seed+1, ... (as vsockctl writes)."""
    words = array.array("Q", range(seed, seed + (length + 7) // 8))
    if sys.byteorder != "little":
        words.byteswap()
    return words.tobytes()[:length]


@attrs.frozen
class ReceivedData:
    """What a host peer received on one connection."""

    length: int
    crc: int
    intact: bool  # equal to the expected pattern, byte for byte
    first_byte_at: float  # time.monotonic() when the first byte arrived
    done_at: float


def _recv_exactly(sock: socket.socket, length: int) -> tuple[bytearray, float]:
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    first = 0.0
    while got < length:
        n = sock.recv_into(view[got:], min(length - got, 1 << 20))
        if n == 0:
            break
        if got == 0:
            first = time.monotonic()
        got += n
    del buf[got:]
    return buf, first


class PortListener:
    """A one-connection Unix listener at ``<base_path>_<port>`` run on a thread."""

    def __init__(self, path: Path, *, expect: bytes, reply: bytes, timeout: float) -> None:
        self.path = path
        self._expect = expect
        self._reply = reply
        self._timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(1)
        self._sock.settimeout(timeout)
        self.accepted_at = 0.0
        self.received: ReceivedData | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._serve, name=f"listener-{path.name}", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._sock.accept()
            self.accepted_at = time.monotonic()
            with conn:
                conn.settimeout(self._timeout)
                data, first = _recv_exactly(conn, len(self._expect))
                self.received = ReceivedData(
                    length=len(data),
                    crc=zlib.crc32(data),
                    intact=data == self._expect,
                    first_byte_at=first,
                    done_at=time.monotonic(),
                )
                if self._reply:
                    conn.sendall(self._reply)
        except BaseException as exc:  # reported by the test, which owns the failure message
            self.error = exc
        finally:
            self._sock.close()

    def join(self, timeout: float) -> ReceivedData:
        """Wait for the connection to finish; return what arrived or raise what went wrong."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"host listener {self.path}: no complete exchange in {timeout} s")
        if self.error is not None:
            raise AssertionError(f"host listener {self.path}: {self.error!r}") from self.error
        assert self.received is not None
        return self.received

    def close(self) -> None:
        """Stop listening and remove the socket file, so the port can be listened on again."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def connect_to_guest(base_path: Path, port: int, timeout: float) -> tuple[socket.socket, int]:
    """Connect to the device's listener, send ``CONNECT <port>``; return (socket, OK port)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(base_path))
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n") and len(line) < MAX_OK_LINE:
            chunk = sock.recv(1)  # byte by byte: data from the guest may follow the OK line
            if not chunk:
                raise AssertionError(f"device closed the CONNECT {port} socket after {line!r}")
            line += chunk
        match = OK_LINE.fullmatch(line)
        if match is None:
            raise AssertionError(f"device answered CONNECT {port} with {line!r}, not OK <port>")
    except BaseException:
        sock.close()
        raise
    return sock, int(match.group(1))


def connect_without_guest_listener(
    base_path: Path, port: int, timeout: float
) -> tuple[bytes, float]:
    """``CONNECT`` to a guest port nobody listens on; return (bytes read before EOF, seconds)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(base_path))
        started = time.monotonic()
        sock.sendall(f"CONNECT {port}\n".encode())
        got = b""
        while chunk := sock.recv(MAX_OK_LINE):
            got += chunk
            if len(got) >= MAX_OK_LINE:
                break
        return got, time.monotonic() - started


@attrs.frozen
class EchoResult:
    """A host-initiated echo exchange: what came back, and how fast."""

    received: ReceivedData
    sent_at: float


def echo_through(sock: socket.socket, data: bytes) -> EchoResult:
    """Send ``data`` on a thread while reading the same number of bytes back (the guest echoes)."""
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(data)
        except BaseException as exc:
            errors.append(exc)

    sent_at = time.monotonic()
    sender = threading.Thread(target=send, name="echo-sender", daemon=True)
    sender.start()
    echoed, first = _recv_exactly(sock, len(data))
    done = time.monotonic()
    sender.join(10)
    if errors:
        raise AssertionError(f"sending to the guest failed: {errors[0]!r}") from errors[0]
    return EchoResult(
        received=ReceivedData(
            length=len(echoed),
            crc=zlib.crc32(echoed),
            intact=echoed == data,
            first_byte_at=first,
            done_at=done,
        ),
        sent_at=sent_at,
    )


def send_to_sink(sock: socket.socket, data: bytes) -> tuple[float, int]:
    """Send ``data`` to a guest ``vsockctl sink``; return (seconds until its end mark, its CRC).

    The sink answers with the CRC-32 of what it read (4 bytes, little-endian) once it has read
    everything, so the time covers the whole transfer into the guest's memory.
    """
    started = time.monotonic()
    sock.sendall(data)
    mark, _ = _recv_exactly(sock, 4)
    elapsed = time.monotonic() - started
    if len(mark) != 4:
        raise AssertionError(f"guest sink closed after {len(mark)} of its 4 end-mark bytes")
    return elapsed, int.from_bytes(mark, "little")
