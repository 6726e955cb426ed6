"""The connection deadlines of the vsock device: a min-heap of (time, connection).

A connection has at most one live deadline (``Connection.deadline``); setting a new one leaves
the old heap entry behind, and entries whose time no longer matches their connection's deadline,
or whose connection is gone, are skipped lazily. Time is an explicit ``now`` (monotonic seconds).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

from devicehost_vsock.connection import Connection

__all__ = ["Deadlines"]


class Deadlines:
    """Pending connect and graceful-shutdown timeouts."""

    def __init__(self, is_live: Callable[[Connection], bool]) -> None:
        self._heap: list[tuple[float, int, Connection]] = []
        self._seq = 0  # ties break by insertion order; connections are never compared
        self._is_live = is_live

    def set(self, conn: Connection, deadline: float) -> None:
        conn.deadline = deadline
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, conn))

    def due(self, now: float) -> bool:
        """Whether some entry's time has come (it may turn out stale)."""
        return bool(self._heap) and self._heap[0][0] <= now

    def next(self) -> float | None:
        """The earliest live deadline; stale entries in front are dropped."""
        while self._heap:
            deadline, _, conn = self._heap[0]
            if conn.deadline == deadline and self._is_live(conn):
                return deadline
            heapq.heappop(self._heap)
        return None

    def expired(self, now: float) -> Iterator[Connection]:
        """Take every live connection whose deadline is at or before ``now``."""
        while self._heap and self._heap[0][0] <= now:
            deadline, _, conn = heapq.heappop(self._heap)
            if conn.deadline == deadline and self._is_live(conn):
                yield conn

    def clear(self) -> None:
        self._heap.clear()
