"""An in-memory :class:`HostStream` for driving the connection table without sockets."""

from __future__ import annotations

import socket
from collections.abc import Sequence

__all__ = ["FakeStream"]


class FakeStream:
    """Host socket double: ``inbound`` is what the host wrote (the device reads it), ``outbound``
    what the device wrote; ``capacity`` bounds unread outbound bytes (back-pressure). As a
    SEQPACKET socket it uses ``messages_in``/``messages_out`` instead."""

    def __init__(self, inbound: bytes = b"", capacity: int = 1 << 30) -> None:
        self.inbound = bytearray(inbound)
        self.outbound = bytearray()
        self.capacity = capacity
        self.host_eof = False  # the host shut its write side
        self.fully_closed = False  # POLLHUP
        self.closed = False
        self.shut: list[int] = []
        self.fail_send = False
        self.fail_shutdown = False
        self.wants: set[str] = set()
        self.scatter_reads = 0
        # SEQPACKET: messages the host wrote (the device reads them), messages the device wrote,
        # and how many unread ones the host takes before it would block.
        self.messages_in: list[bytes] = []
        self.messages_out: list[bytes] = []
        self.message_capacity = 1 << 30

    def recv_into(self, buf: memoryview) -> int | None:
        if self.closed:
            raise OSError("recv on a closed fake stream")
        if not self.inbound:
            return 0 if self.host_eof or socket.SHUT_RD in self.shut else None
        n = min(len(buf), len(self.inbound))
        buf[:n] = self.inbound[:n]
        del self.inbound[:n]
        return n

    def recv_into_many(self, bufs: Sequence[memoryview]) -> int | None:
        self.scatter_reads += 1
        total = 0
        for buf in bufs:
            n = self.recv_into(buf)
            if n is None or n == 0:
                return total if total else n
            total += n
            if n < len(buf):
                break
        return total

    def queued(self) -> int:
        if self.closed:
            raise OSError("ioctl on a closed fake stream")
        return len(self.inbound)

    def peek(self, max_len: int) -> bytes | None:
        if not self.inbound:
            return b"" if self.host_eof else None
        return bytes(self.inbound[:max_len])

    def message_size(self) -> int | None:
        if self.closed:
            raise OSError("peek on a closed fake stream")
        if self.messages_in:
            return len(self.messages_in[0])
        return -1 if self.host_eof or socket.SHUT_RD in self.shut else None

    def recv_message_into(self, bufs: Sequence[memoryview]) -> int:
        message = self.messages_in.pop(0)
        offset = 0
        for buf in bufs:
            n = min(len(buf), len(message) - offset)
            buf[:n] = message[offset : offset + n]
            offset += n
        return offset

    def send_message(self, buffers: Sequence[bytes | bytearray | memoryview]) -> bool:
        if self.fail_send or self.fully_closed:
            raise BrokenPipeError("fake host socket is gone")
        if len(self.messages_out) >= self.message_capacity:
            return False
        self.messages_out.append(b"".join(bytes(b) for b in buffers))
        return True

    def send(self, buffers: Sequence[bytes | bytearray | memoryview]) -> int:
        if self.fail_send or self.fully_closed:
            raise BrokenPipeError("fake host socket is gone")
        room = self.capacity
        taken = 0
        for b in buffers:
            n = min(len(b), room - taken)
            self.outbound += bytes(b[:n])
            taken += n
        self.capacity -= taken
        return taken

    def shutdown(self, how: int) -> None:
        if self.fail_shutdown:
            raise OSError("fake shutdown failure")
        self.shut.append(how)

    def close(self) -> None:
        self.closed = True

    def is_closed(self) -> bool:
        return self.fully_closed

    def want_read(self) -> None:
        self.wants.add("read")

    def want_write(self) -> None:
        self.wants.add("write")

    def want_close(self) -> None:
        self.wants.add("close")

    def drain(self, n: int = 1 << 30) -> bytes:
        """The host reads up to ``n`` bytes the device wrote (making room again)."""
        out = bytes(self.outbound[:n])
        del self.outbound[:n]
        self.capacity += len(out)
        return out
