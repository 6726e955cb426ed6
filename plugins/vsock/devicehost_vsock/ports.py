"""Allocation of the device's local ports for host-initiated connections (facts section 9.10).

Ports come from 0x40000000..0x7FFFFFFF in increasing order, wrapping back to 0x40000000 and
skipping ports still in use. Guest-initiated connections use the guest's own port numbers and
never allocate here.
"""

from __future__ import annotations

from typing import Final

__all__ = ["FIRST_PORT", "LAST_PORT", "PortAllocator", "PortsExhausted"]

FIRST_PORT: Final = 0x4000_0000
LAST_PORT: Final = 0x7FFF_FFFF


class PortsExhausted(Exception):
    """Raised when every host-side port is in use (cannot happen below 2**30 connections)."""


class PortAllocator:
    """Hands out free ports of the host-side range; ``free`` returns one."""

    __slots__ = ("_in_use", "_last")

    def __init__(self) -> None:
        # Invariant: _last is the most recently handed-out port (initially one below the range).
        self._last = FIRST_PORT - 1
        self._in_use: set[int] = set()

    def allocate(self) -> int:
        for _ in range(LAST_PORT - FIRST_PORT + 1):
            port = ((self._last + 1) & ~(1 << 31)) | (1 << 30)
            self._last = port
            if port not in self._in_use:
                self._in_use.add(port)
                return port
        raise PortsExhausted("every host-side vsock port is in use")

    @property
    def last(self) -> int:
        """The most recently handed-out port (one below the range before the first)."""
        return self._last

    @classmethod
    def resume(cls, last: int, in_use: set[int]) -> PortAllocator:
        """An allocator that continues after ``last`` with ``in_use`` taken (a restore)."""
        ports = cls()
        ports._last = last
        ports._in_use = set(in_use)
        return ports

    def free(self, port: int) -> None:
        self._in_use.discard(port)

    def __contains__(self, port: object) -> bool:
        return port in self._in_use

    def __len__(self) -> int:
        return len(self._in_use)
