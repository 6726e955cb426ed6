"""The fixed-capacity byte FIFO that holds guest data the host socket has not accepted yet.

Head index plus length over one bytearray, allocated lazily on first write (most connections never
back-pressure, and 64 KiB per connection would dominate host memory). Writing more than the free
space is a programming error of the caller (:class:`TxBufferOverflow`); the connection checks the
space first and turns a guest that exceeds its credit into an RST.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["TxBuffer", "TxBufferOverflow"]

Buffer = bytes | bytearray | memoryview


class TxBufferOverflow(Exception):
    """Raised when a write exceeds the free space (the caller is to blame: it must check first)."""


class TxBuffer:
    """A byte FIFO of ``capacity`` bytes."""

    __slots__ = ("_buf", "_capacity", "_head", "_len")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._buf: bytearray | None = None
        self._head = 0
        self._len = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return self._len

    @property
    def available(self) -> int:
        """Free space in bytes."""
        return self._capacity - self._len

    def write(self, slices: Sequence[Buffer], offset: int = 0) -> int:
        """Append the concatenation of ``slices``, skipping its first ``offset`` bytes.

        Returns the number of bytes appended.
        """
        total = sum(len(s) for s in slices) - offset
        if total <= 0:
            return 0
        if total > self.available:
            raise TxBufferOverflow(
                f"write of {total} bytes exceeds available space of {self.available}"
            )
        if self._buf is None:
            self._buf = bytearray(self._capacity)
        buf = self._buf
        for piece in slices:
            view = memoryview(piece).cast("B")
            if offset >= len(view):
                offset -= len(view)
                continue
            view = view[offset:]
            offset = 0
            while len(view):
                tail = (self._head + self._len) % self._capacity
                n = min(len(view), self._capacity - tail)
                buf[tail : tail + n] = view[:n]
                self._len += n
                view = view[n:]
        return total

    def drain(self, sink: Callable[[memoryview], int]) -> int:
        """Hand the oldest bytes to ``sink`` (which returns how many it took, 0 when it would block)
        until the buffer is empty or the sink stops taking; returns the bytes removed. Exceptions of
        the sink propagate with the buffer unchanged past the bytes already taken."""
        taken = 0
        while self._len and self._buf is not None:
            n = min(self._len, self._capacity - self._head)
            view = memoryview(self._buf)[self._head : self._head + n]
            accepted = sink(view)
            if accepted <= 0:
                break
            accepted = min(accepted, n)
            self._head = (self._head + accepted) % self._capacity
            self._len -= accepted
            taken += accepted
            if accepted < n:
                break
        if self._len == 0:
            self._head = 0
        return taken

    def views(self, n: int) -> list[memoryview]:
        """The oldest ``n`` bytes (at most ``len(self)``) as one or two views, left in place."""
        n = min(n, self._len)
        if n == 0 or self._buf is None:
            return []
        first = min(n, self._capacity - self._head)
        view = memoryview(self._buf)
        out = [view[self._head : self._head + first]]
        if n > first:
            out.append(view[: n - first])
        return out

    def consume(self, n: int) -> None:
        """Remove the oldest ``n`` bytes (at most ``len(self)``)."""
        n = min(n, self._len)
        self._head = (self._head + n) % self._capacity if self._capacity else 0
        self._len -= n
        if self._len == 0:
            self._head = 0

    def drop_tail(self, n: int) -> None:
        """Forget the newest ``n`` bytes (at most ``len(self)``)."""
        self._len -= min(n, self._len)
        if self._len == 0:
            self._head = 0

    def read(self, max_len: int) -> bytes:
        """Remove and return up to ``max_len`` of the oldest bytes."""
        out = bytearray()

        def sink(view: memoryview) -> int:
            n = min(len(view), max_len - len(out))
            out.extend(view[:n])
            return n

        self.drain(sink)
        return bytes(out)

    def release(self) -> None:
        """Free the backing storage when empty (idle connections keep no 64 KiB buffer)."""
        if self._len == 0:
            self._buf = None
            self._head = 0
