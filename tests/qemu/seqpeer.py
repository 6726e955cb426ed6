# SPDX-License-Identifier: MIT
"""The host side of the guest's ``vsockctl seqtest``: SOCK_SEQPACKET Unix sockets only.

- :class:`SeqMessages` is the message generator both sides agree on (``vsockctl.c`` has the same
  code): xorshift64* seeded with ``seed * 2 + 1`` fills a 196608-byte block, then message k is
  ``1 + next % 65536`` bytes from offset ``next % 131072`` of it. A lost, duplicated, reordered,
  merged or split message changes the length or the bytes expected at its index.
- :class:`SeqReceiver` listens at ``<base_path>_<port>`` (where the device relays a guest's
  SEQPACKET connect), accepts one connection, receives ``n`` messages on a thread, checks each
  against the generator, then closes (the guest waits for that end of stream).
- :class:`SeqSender` connects to the device's SEQPACKET listener ``<base_path>_seqpacket``, sends
  ``CONNECT <port>\\n`` as its first message, reads the ``OK`` message, sends ``n`` messages on a
  thread and waits for the guest to close.
"""

from __future__ import annotations

import abc
import contextlib
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import attrs

__all__ = ["SEQ_MAX", "SeqMessages", "SeqReceiver", "SeqResult", "SeqSender"]

SEQ_BLOCK = 196608
SEQ_MAX = 65536
_M64 = (1 << 64) - 1


class SeqMessages:
    """The deterministic message sequence of one direction of ``vsockctl seqtest``."""

    def __init__(self, seed: int) -> None:
        self._state = (seed * 2 + 1) & _M64
        words = [self._next() for _ in range(SEQ_BLOCK // 8)]
        self.block = memoryview(struct.pack(f"<{len(words)}Q", *words))

    def _next(self) -> int:
        x = self._state
        x ^= x >> 12
        x ^= (x << 25) & _M64
        x ^= x >> 27
        self._state = x
        return (x * 0x2545F4914F6CDD1D) & _M64

    def next_message(self) -> memoryview:
        length = 1 + self._next() % SEQ_MAX
        offset = self._next() % (SEQ_BLOCK - SEQ_MAX)
        return self.block[offset : offset + length]


@attrs.frozen
class SeqResult:
    """What one direction moved: messages seen, how many were exactly as expected, the first
    wrong one, and the chained CRC-32 of every message in order (vsockctl prints the same)."""

    count: int
    good: int
    first_bad: int | None
    total_bytes: int
    crc: int
    first_at: float  # time.monotonic() of the first message
    done_at: float


class _Peer(abc.ABC):
    """One direction's peer, run in a thread: a subclass's ``_run`` sends or receives."""

    def __init__(self, name: str, n: int, seed: int, timeout: float) -> None:
        self._n = n
        self._seed = seed
        self._timeout = timeout
        self.result: SeqResult | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._guarded, name=name, daemon=True)

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by join(), which the test calls
            self.error = exc

    @abc.abstractmethod
    def _run(self) -> None:
        """Move this direction's messages and set :attr:`result`."""

    def join(self, timeout: float) -> SeqResult:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"{self._thread.name}: not finished within {timeout} s")
        if self.error is not None:
            raise AssertionError(f"{self._thread.name}: {self.error!r}") from self.error
        assert self.result is not None
        return self.result


class SeqReceiver(_Peer):
    """Receives the guest's messages at ``<base_path>_<port>``."""

    def __init__(self, path: Path, *, n: int, seed: int, timeout: float) -> None:
        super().__init__(f"seq-receiver-{path.name}", n, seed, timeout)
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.bind(str(path))
        self._sock.listen(1)
        self._sock.settimeout(timeout)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self._sock.accept()
        finally:
            self._sock.close()
        expected = SeqMessages(self._seed)
        good, total, crc, first_bad = 0, 0, 0, None
        buf = bytearray(SEQ_MAX + 1)
        first_at = 0.0
        count = 0
        with conn:
            conn.settimeout(self._timeout)
            for k in range(self._n):
                got = conn.recv_into(buf)
                if k == 0:
                    first_at = time.monotonic()
                if got == 0:
                    break  # the guest closed early: the rest are missing
                count += 1
                message = memoryview(buf)[:got]
                if message == expected.next_message():
                    good += 1
                elif first_bad is None:
                    first_bad = k
                crc = zlib.crc32(message, crc)
                total += got
            done_at = time.monotonic()
        self.result = SeqResult(count, good, first_bad, total, crc, first_at, done_at)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        self._thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class SeqSender(_Peer):
    """Sends messages to the guest's SEQPACKET port ``port`` through ``<base_path>_seqpacket``;
    :attr:`ok_line` is the device's answer to the CONNECT message."""

    def __init__(self, listener: Path, port: int, *, n: int, seed: int, timeout: float) -> None:
        super().__init__(f"seq-sender-{port}", n, seed, timeout)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(listener))
            self._sock.send(f"CONNECT {port}\n".encode())
            self.ok_line = self._sock.recv(64)
        except BaseException:
            self._sock.close()
            raise
        self._thread.start()

    def _run(self) -> None:
        messages = SeqMessages(self._seed)
        crc, total = 0, 0
        with self._sock as sock:
            first_at = time.monotonic()
            for _ in range(self._n):
                message = messages.next_message()
                sock.send(message)
                crc = zlib.crc32(message, crc)
                total += len(message)
            done_at = time.monotonic()
            sock.recv(1)  # the guest closes once it has every message
        self.result = SeqResult(self._n, self._n, None, total, crc, first_at, done_at)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        self._thread.join(5)
