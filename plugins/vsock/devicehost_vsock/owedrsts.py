"""The RSTs the device owes the guest for keys that have no connection (any more).

Every such RST waits for an rx buffer the guest posts. A guest that keeps sending packets to
ports it has no connection on (each one owes it an RST) while posting no rx buffers would make
that queue grow without bound in the host's memory; so it is bounded (:data:`MAX_OWED_RSTS`).

**[DECISION]** Once full, a further RST is dropped (and counted), not an older one: the oldest
include the resets owed for connections a dead worker held (``reset_stale``), which the guest
needs most, while the newest are answers to a flood the guest itself is sending. An RST answers
a packet for a key the device does not know; the guest that missed one learns the same from the
next packet it sends on that key, which is answered again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Final

__all__ = ["MAX_OWED_RSTS", "OwedRsts"]

#: At most this many RSTs wait for rx buffers (the same limit bounds a saved state's).
MAX_OWED_RSTS: Final = 4096

Rst = tuple[int, int, int]  # (device port, guest port, socket type)


class OwedRsts(deque[Rst]):
    """A FIFO of owed RSTs holding at most ``limit``; ``dropped`` counts those refused."""

    def __init__(self, items: Iterable[Rst] = (), limit: int = MAX_OWED_RSTS) -> None:
        super().__init__()
        self.limit = limit
        self.dropped = 0
        self.extend(items)

    def append(self, rst: Rst) -> None:
        if len(self) < self.limit:
            super().append(rst)
        else:
            self.dropped += 1

    def extend(self, rsts: Iterable[Rst]) -> None:
        for rst in rsts:
            self.append(rst)
