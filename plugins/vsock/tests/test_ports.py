"""Host-side port allocation (facts section 9.10)."""

from __future__ import annotations

from devicehost_vsock.ports import FIRST_PORT, LAST_PORT, PortAllocator


def test_sequence_reuse_and_wrap() -> None:
    ports = PortAllocator()
    assert [ports.allocate() for _ in range(3)] == [FIRST_PORT, FIRST_PORT + 1, FIRST_PORT + 2]
    ports.free(FIRST_PORT)
    assert ports.allocate() == FIRST_PORT + 3  # no immediate reuse
    ports._last = LAST_PORT - 1
    assert ports.allocate() == LAST_PORT
    assert ports.allocate() == FIRST_PORT  # wrapped, and free again
    assert ports.allocate() == FIRST_PORT + 4  # 1..3 still in use are skipped
    assert FIRST_PORT + 1 in ports and len(ports) == 6
