"""The split virtqueue (device side): chains, indirect tables, event index, lying guests."""

from __future__ import annotations

import ctypes
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.memory import GuestMemory
from devicehost.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    RING_F_NO_INTERRUPT,
    RING_F_NO_NOTIFY,
    DescriptorChain,
    QueueError,
    QueueLayout,
    QueueState,
    SplitQueue,
    need_event,
)

MEM = 1 << 20


pytestmark = pytest.mark.usefixtures("queue_implementation")


SIZE = 8
DESC, AVAIL, USED, DATA = 0x1000, 0x2000, 0x3000, 0x10000


class Guest:
    """Writes rings by hand, including every lie a hostile guest can tell."""

    def __init__(self, size: int = SIZE) -> None:
        self.memory = GuestMemory.anonymous(MEM)
        self.size = size
        self.avail_idx = 0
        self.layout = QueueLayout(size, DESC, AVAIL, USED)

    def queue(self, **kwargs: object) -> SplitQueue:
        return SplitQueue(self.memory, self.layout, **kwargs)  # type: ignore[arg-type]

    def desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
             table: int = DESC) -> None:
        self.memory.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int, *, idx: int | None = None) -> None:
        self.memory.write(AVAIL + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF if idx is None else idx
        self.memory.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def used(self) -> tuple[int, list[tuple[int, int]]]:
        idx = struct.unpack("<H", self.memory.read(USED + 2, 2))[0]
        elems = [struct.unpack("<II", self.memory.read(USED + 4 + 8 * i, 8)) for i in range(idx)]
        return idx, elems

    def u16(self, gpa: int) -> int:
        value: int = struct.unpack("<H", self.memory.read(gpa, 2))[0]
        return value


def test_chain_with_readable_and_writable_parts() -> None:
    g = Guest()
    g.memory.write(DATA, b"hello ")
    g.memory.write(DATA + 0x100, b"world")
    g.desc(3, DATA, 6, DESC_F_NEXT, 5)
    g.desc(5, DATA + 0x100, 5, DESC_F_NEXT, 1)
    g.desc(1, DATA + 0x200, 4, DESC_F_WRITE | DESC_F_NEXT, 0)
    g.desc(0, DATA + 0x300, 8, DESC_F_WRITE)
    g.publish(3)
    q = g.queue()
    assert q.has_available()
    chain = q.pop()
    assert chain is not None and chain.head == 3
    assert (chain.readable_len, chain.writable_len) == (11, 12)
    assert chain.peek(4, 4) == b"o wo"
    assert chain.read(3) == b"hel" and chain.remaining == 8
    assert chain.read() == b"lo world" and chain.read(5) == b""
    assert chain.write_at(2, b"ABCDEFG") == 9
    assert g.memory.read(DATA + 0x200, 4) == b"\0\0AB"
    assert g.memory.read(DATA + 0x300, 8) == b"CDEFG\0\0\0"
    with pytest.raises(ValueError, match="exceeds"):
        chain.write_at(10, b"xyz")
    assert q.pop() is None
    assert q.push(chain.head, 9) is True
    assert g.used() == (1, [(3, 9)])
    assert q.state() == QueueState(1, 1)


def test_indirect_chain() -> None:
    g = Guest()
    table = DATA + 0x1000
    g.memory.write(DATA, b"req")
    g.desc(0, DATA, 3, DESC_F_NEXT, 2, table=table)
    g.desc(2, DATA + 0x100, 16, DESC_F_WRITE, 0, table=table)
    g.desc(4, table, 48, DESC_F_INDIRECT)
    g.publish(4)
    chain = g.queue().pop()
    assert chain is not None and chain.head == 4
    assert chain.read() == b"req" and chain.writable_len == 16


def _lie(g: Guest) -> SplitQueue:
    g.publish(0)
    return g.queue()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda g: (g.desc(0, DATA, 1, DESC_F_NEXT, 1), g.desc(1, DATA, 1, DESC_F_NEXT, 0)),
         "longer than its 8 entries"),
        (lambda g: g.desc(0, DATA, 1, DESC_F_NEXT, 0), "descriptor loop"),
        (lambda g: g.desc(0, DATA, 1, DESC_F_NEXT, 8), "links to 8, outside the 8 entries"),
        (lambda g: g.desc(0, MEM - 4, 8), "points outside guest memory"),
        (lambda g: g.desc(0, 1 << 62, 1), "points outside guest memory"),
        (lambda g: (g.desc(0, DATA, 4, DESC_F_WRITE | DESC_F_NEXT, 1), g.desc(1, DATA, 4)),
         "readable descriptor after a writable one"),
        (lambda g: g.desc(0, DATA, 24, DESC_F_INDIRECT), "invalid length 24"),
        (lambda g: g.desc(0, DATA, 0, DESC_F_INDIRECT), "invalid length 0"),
        (lambda g: g.desc(0, MEM - 16, 32, DESC_F_INDIRECT), "outside guest memory"),
        (lambda g: g.desc(0, DATA, 32, DESC_F_INDIRECT | DESC_F_NEXT, 1),
         "not the chain's only descriptor"),
        (lambda g: (g.desc(0, DATA, 1, DESC_F_NEXT, 1), g.desc(1, DATA, 16, DESC_F_INDIRECT)),
         "not the chain's only descriptor"),
        (lambda g: (g.desc(0, DATA, 16, DESC_F_INDIRECT),
                    g.desc(0, DATA, 16, DESC_F_INDIRECT, table=DATA)), "nested an indirect"),
        (lambda g: (g.desc(0, DATA, 32, DESC_F_INDIRECT),
                    g.desc(0, DATA, 1, DESC_F_NEXT, 1, table=DATA),
                    g.desc(1, DATA, 1, DESC_F_NEXT, 0, table=DATA)),
         "head 0 in the indirect table is longer than its 2 entries"),
        (lambda g: (g.desc(0, DATA, 32, DESC_F_INDIRECT),
                    g.desc(0, DATA, 1, DESC_F_NEXT, 2, table=DATA)),
         "links to 2, outside the 2 entries"),
        (lambda g: (g.desc(0, DATA, 1, DESC_F_NEXT, 1),
                    g.desc(1, DATA, 0xFFFFFFFF, DESC_F_WRITE)), "outside guest memory"),
    ],
)
def test_lying_guest_gets_a_precise_queue_error(setup: object, message: str) -> None:
    g = Guest()
    setup(g)  # type: ignore[operator]
    q = _lie(g)
    with pytest.raises(QueueError, match=message):
        q.pop()
    # The queue is broken for good: the same error again, no progress, no hang.
    with pytest.raises(QueueError, match=message):
        q.pop()
    assert q.last_avail_idx == 0


def test_head_outside_the_table() -> None:
    g = Guest()
    g.publish(8)
    with pytest.raises(QueueError, match="head 8 on the avail ring of a 8-entry queue"):
        g.queue().pop()


def test_avail_index_jumping_past_the_queue_size() -> None:
    g = Guest()
    g.desc(0, DATA, 1)
    g.publish(0, idx=SIZE + 1)
    with pytest.raises(QueueError, match="9 entries past the device's 0"):
        g.queue().pop()


def test_indirect_without_the_feature() -> None:
    g = Guest()
    g.desc(0, DATA, 16, DESC_F_INDIRECT)
    q = _lie(g)
    q.indirect = False
    with pytest.raises(QueueError, match="without RING_INDIRECT_DESC"):
        q.pop()


def test_rings_outside_memory_or_misaligned() -> None:
    g = Guest()
    with pytest.raises(QueueError, match="outside guest memory"):
        SplitQueue(g.memory, QueueLayout(SIZE, MEM - 16, AVAIL, USED))
    with pytest.raises(QueueError, match="misaligned"):
        SplitQueue(g.memory, QueueLayout(SIZE, DESC + 8, AVAIL, USED))
    with pytest.raises(QueueError, match="power of two"):
        SplitQueue(g.memory, QueueLayout(6, DESC, AVAIL, USED))


def test_indices_wrap_around_16_bits() -> None:
    g = Guest()
    g.avail_idx = 0xFFFE
    q = g.queue(state=QueueState(0xFFFE, 0xFFFF))
    for i in range(4):
        g.desc(i, DATA, 1)
        g.publish(i)
    heads = []
    while (chain := q.pop()) is not None:
        heads.append(chain.head)
        q.push(chain.head, 1)
    assert heads == [0, 1, 2, 3]
    assert q.state() == QueueState(2, 3)
    assert g.u16(USED + 2) == 3


def test_notifications_without_event_idx() -> None:
    g = Guest()
    q = g.queue()
    q.disable_notifications()
    assert g.u16(USED) & RING_F_NO_NOTIFY
    assert q.enable_notifications() is False
    assert not g.u16(USED) & RING_F_NO_NOTIFY
    g.desc(0, DATA, 1)
    g.publish(0)
    assert q.enable_notifications() is True
    chain = q.pop()
    assert chain is not None
    g.memory.write(AVAIL, struct.pack("<H", RING_F_NO_INTERRUPT))
    assert q.push(chain.head, 0) is False
    g.memory.write(AVAIL, struct.pack("<H", 0))
    g.publish(0)
    chain = q.pop()
    assert chain is not None and q.push(chain.head, 0) is True


def test_event_idx_both_ways() -> None:
    g = Guest()
    q = g.queue(event_idx=True)
    avail_event = AVAIL + 4 + 2 * SIZE
    used_avail_event = USED + 4 + 8 * SIZE
    for i in range(4):
        g.desc(i, DATA, 1)
        g.publish(i)
    # The driver asks for an interrupt only once used idx passes 2.
    g.memory.write(avail_event, struct.pack("<H", 2))
    interrupts = []
    for _ in range(4):
        chain = q.pop()
        assert chain is not None
        # Popping keeps avail_event at the device's position: the guest kicks on the next buffer.
        assert g.u16(used_avail_event) == q.last_avail_idx
        interrupts.append(q.push(chain.head, 0))
    assert interrupts == [False, False, True, False]
    q.disable_notifications()
    g.publish(0)
    assert q.pop() is not None
    assert g.u16(used_avail_event) == 4  # not advanced while notifications are disabled
    assert q.enable_notifications() is False
    assert g.u16(used_avail_event) == 5


def test_need_event_wraps() -> None:
    assert need_event(0xFFFF, 0, 0xFFFF)
    assert not need_event(5, 5, 4)
    assert need_event(4, 5, 4)
    assert need_event(3, 10, 0)
    assert not need_event(11, 10, 0)


@settings(max_examples=250, deadline=None)
@given(
    table=st.lists(
        st.tuples(st.integers(0, MEM + 64) | st.integers(0, 2**64 - 1), st.integers(0, 5000),
                  st.integers(0, 7), st.integers(0, SIZE + 1) | st.integers(0, 0xFFFF)),
        min_size=SIZE, max_size=SIZE,
    ).map(lambda ds: b"".join(struct.pack("<QIHH", *d) for d in ds)),
    ring=st.lists(st.integers(0, SIZE) | st.integers(0, 0xFFFF), min_size=SIZE, max_size=SIZE)
    .map(lambda heads: struct.pack(f"<{SIZE}H", *heads)),
    avail_idx=st.integers(0, SIZE + 2) | st.integers(0, 0xFFFF),
    indirect=st.binary(max_size=256),
    event_idx=st.booleans(),
)
def test_arbitrary_rings_never_crash_or_hang(
    table: bytes, ring: bytes, avail_idx: int, indirect: bytes, event_idx: bool
) -> None:
    g = Guest()
    g.memory.write(DESC, table)
    g.memory.write(AVAIL + 4, ring)
    g.memory.write(AVAIL + 2, struct.pack("<H", avail_idx))
    # Plant an indirect table and small addresses so that some chains are valid.
    g.memory.write(0, indirect)
    q = g.queue(event_idx=event_idx)
    popped = 0
    for _ in range(SIZE + 2):  # every pop is bounded work; at most SIZE chains are pending
        try:
            chain = q.pop()
        except QueueError:
            with pytest.raises(QueueError):
                q.pop()
            return
        if chain is None:
            break
        popped += 1
        assert chain.readable_len + chain.writable_len <= 0xFFFFFFFF
        chain.read()
        q.push(chain.head, 0)
    assert popped <= SIZE


def test_indirect_table_size_is_bounded() -> None:
    g = Guest()
    table = 0x40000
    count = 32768
    entries = b"".join(
        struct.pack("<QIHH", DATA, 1, DESC_F_NEXT if i + 1 < count else 0, i + 1)
        for i in range(count)
    )
    g.memory.write(table, entries)
    g.desc(0, table, 16 * count, DESC_F_INDIRECT)
    g.desc(1, table, 16 * (count + 1), DESC_F_INDIRECT)
    g.publish(0)
    g.publish(1)
    q = g.queue()
    chain = q.pop()
    assert chain is not None and len(chain.readable) == count and chain.readable_len == count
    with pytest.raises(QueueError, match=f"invalid length {16 * (count + 1)}"):
        q.pop()


def test_batched_used_entries_with_one_interrupt_decision() -> None:
    g = Guest()
    q = g.queue(event_idx=True)
    for i in range(4):
        g.desc(i, DATA, 1)
        g.publish(i)
    # The driver wants an interrupt once used idx passes 1: a batch that crosses it signals once.
    g.memory.write(AVAIL + 4 + 2 * SIZE, struct.pack("<H", 1))
    assert q.needs_interrupt() is False  # nothing added yet
    for written in (5, 6, 7):
        chain = q.pop()
        assert chain is not None
        q.add_used(chain.head, written)
    assert g.used() == (3, [(0, 5), (1, 6), (2, 7)])
    assert q.needs_interrupt() is True
    assert q.needs_interrupt() is False  # decided already; nothing new
    chain = q.pop()
    assert chain is not None
    q.add_used(chain.head, 0)
    assert q.needs_interrupt() is False  # used_event 1 was passed before this batch
    with pytest.raises(ValueError):
        q.add_used(SIZE, 0)


def test_batched_used_entries_without_event_idx_follow_the_ring_flag() -> None:
    g = Guest()
    q = g.queue()
    for i in range(2):
        g.desc(i, DATA, 1)
        g.publish(i)
    g.memory.write(AVAIL, struct.pack("<H", RING_F_NO_INTERRUPT))
    chain = q.pop()
    assert chain is not None
    q.add_used(chain.head, 0)
    assert q.needs_interrupt() is False
    g.memory.write(AVAIL, struct.pack("<H", 0))
    chain = q.pop()
    assert chain is not None
    q.add_used(chain.head, 3)
    assert q.needs_interrupt() is True
    assert g.used() == (2, [(0, 0), (1, 3)])


def test_add_used_many_writes_entries_in_order_and_publishes_once() -> None:
    g = Guest()
    q = g.queue(event_idx=True)
    heads = []
    for i in range(3):
        g.desc(i, DATA, 1)
        g.publish(i)
        chain = q.pop()
        assert chain is not None
        heads.append(chain.head)
    q.add_used_many(heads, 0)
    assert g.used() == (3, [(0, 0), (1, 0), (2, 0)])
    assert q.needs_interrupt() is True  # used_event 0 was passed by the batch
    q.add_used_many([], 0)
    assert g.used()[0] == 3 and q.needs_interrupt() is False
    with pytest.raises(ValueError, match="head 8 is not a descriptor"):
        q.add_used_many([SIZE], 0)
    with pytest.raises(ValueError, match="does not fit in le32"):
        q.add_used_many([0], 1 << 32)
    assert g.used()[0] == 3  # nothing published by a failed batch


def test_avail_index_is_read_again_once_everything_seen_was_popped() -> None:
    g = Guest()
    q = g.queue()
    for i in range(SIZE):
        g.desc(i, DATA + 16 * i, 1)
    g.publish(0)
    g.publish(1)
    assert [q.pop().head, q.pop().head] == [0, 1]  # type: ignore[union-attr]
    assert q.pop() is None
    g.publish(2)  # published after the device caught up: seen by the next pop
    chain = q.pop()
    assert chain is not None and chain.head == 2 and q.pop() is None
    g.publish(3, idx=(3 + SIZE + 1) & 0xFFFF)  # a jump past the queue size is still caught
    with pytest.raises(QueueError, match="9 entries past the device's 3"):
        q.pop()


def test_add_used_many_with_a_length_per_head() -> None:
    g = Guest()
    q = g.queue()
    q.add_used_many([2, 0, 1], [30, 0, 7])
    assert g.used() == (3, [(2, 30), (0, 0), (1, 7)])
    with pytest.raises(ValueError, match="2 heads but 1 written lengths"):
        q.add_used_many([0, 1], [5])
    with pytest.raises(ValueError, match="does not fit in le32"):
        q.add_used_many([0], [-1])
    assert g.used()[0] == 3


def _offsets(chain: DescriptorChain) -> list[tuple[int, int]]:
    """(offset in the memory region, length) of every part of a chain, readable parts first."""
    return [(_address(part) - _address(memoryview(part.obj)), len(part))
            for part in (*chain.readable, *chain.writable)]


def _address(view: memoryview) -> int:
    return ctypes.addressof((ctypes.c_char * 0).from_buffer(view))


@pytest.mark.parametrize("event_idx", [False, True])
def test_pop_many_returns_what_repeated_pops_return(event_idx: bool) -> None:
    states = []
    results = []
    for many in (False, True):
        g = Guest()
        for i in range(6):
            g.desc(i, DATA + 0x100 * i, 10 + i, DESC_F_WRITE if i % 2 else 0)
        g.desc(6, DATA, 32, DESC_F_INDIRECT)
        g.desc(0, DATA + 0x800, 3, DESC_F_NEXT, 1, table=DATA)
        g.desc(1, DATA + 0x900, 4, DESC_F_WRITE, table=DATA)
        for head in (0, 1, 6, 2, 3):
            g.publish(head)
        q = g.queue(event_idx=event_idx)
        if many:
            chains = q.pop_many()
            assert q.pop_many() == []
        else:
            chains = []
            while (chain := q.pop()) is not None:
                chains.append(chain)
        results.append([(c.head, c.readable_len, c.writable_len, _offsets(c)) for c in chains])
        states.append((q.state(), g.memory.read(0, 0x4000)))
    assert results[0] == results[1]
    assert [r[0] for r in results[1]] == [0, 1, 6, 2, 3]
    assert results[1][2] == (6, 3, 4, [(DATA + 0x800, 3), (DATA + 0x900, 4)])
    assert states[0] == states[1]
    assert states[1][0] == QueueState(5, 0, (0, 1, 6, 2, 3))  # all five in flight
    if event_idx:
        assert g.u16(USED + 4 + 8 * SIZE) == 5


def test_pop_many_limit_and_queue_size_bound() -> None:
    g = Guest()
    for i in range(SIZE):
        g.desc(i, DATA, 1)
        g.publish(i)
    q = g.queue(event_idx=True)
    assert q.pop_many(0) == []
    assert g.u16(USED + 4 + 8 * SIZE) == 0  # nothing popped, nothing written
    assert [c.head for c in q.pop_many(3)] == [0, 1, 2]
    assert g.u16(USED + 4 + 8 * SIZE) == 3
    assert [c.head for c in q.pop_many(100)] == [3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="negative"):
        q.pop_many(-1)
    # A guest that keeps publishing: one call never takes more than the queue size.
    q.add_used_many(list(range(SIZE)), 0)
    for i in range(SIZE):
        g.publish(i)
    assert len(q.pop_many()) == SIZE
    for i in range(3):
        g.publish(i)
    assert [c.head for c in q.pop_many()] == [0, 1, 2]


def test_pop_many_returns_the_chains_before_a_lie_then_raises() -> None:
    g = Guest()
    g.desc(0, DATA, 4)
    g.desc(1, DATA, 4)
    g.desc(2, DATA, 1, DESC_F_NEXT, 2)  # a loop
    for head in (0, 1, 2, 0):
        g.publish(head)
    q = g.queue(event_idx=True)
    assert [c.head for c in q.pop_many()] == [0, 1]
    assert q.broken is not None and q.last_avail_idx == 2
    assert g.u16(USED + 4 + 8 * SIZE) == 2
    with pytest.raises(QueueError, match="descriptor loop"):
        q.pop_many()
    with pytest.raises(QueueError, match="descriptor loop"):
        q.pop()
    assert q.last_avail_idx == 2


def test_pop_many_raises_when_the_first_chain_is_bad() -> None:
    g = Guest()
    g.publish(9)
    q = g.queue()
    with pytest.raises(QueueError, match="head 9 on the avail ring"):
        q.pop_many()
    g2 = Guest()
    g2.publish(0, idx=SIZE + 2)
    with pytest.raises(QueueError, match="10 entries past the device's 0"):
        g2.queue().pop_many()


def test_pop_many_reads_the_avail_index_again_after_the_seen_entries() -> None:
    g = Guest()
    for i in range(4):
        g.desc(i, DATA, 1)
    g.publish(0)
    g.publish(1)
    q = g.queue()
    assert q.pop() is not None  # reads avail idx 2, pops one
    g.publish(2)
    g.publish(3)
    assert [c.head for c in q.pop_many()] == [1, 2, 3]


# -- chains in flight: carried by the state, replayed once ----------------------------------------


def _published(count: int) -> Guest:
    g = Guest()
    for i in range(count):
        g.desc(i, DATA + 0x100 * i, 8 + i)
        g.publish(i)
    return g


def test_chains_popped_and_not_pushed_are_replayed_once_before_new_ones() -> None:
    g = _published(5)
    q = g.queue()
    popped = [q.pop() for _ in range(3)]
    assert [c.head for c in popped if c is not None] == [0, 1, 2]
    q.push(1, 0)
    state = q.state()
    assert state == QueueState(3, 1, (0, 2))
    restored = g.queue(state=state)
    assert restored.has_available()
    replayed = [restored.pop() for _ in range(2)]
    assert [(c.head, c.readable_len) for c in replayed if c is not None] == [(0, 8), (2, 10)]
    assert restored.last_avail_idx == 3  # replays are not new pops
    nxt = restored.pop()
    assert nxt is not None and nxt.head == 3  # then the new ones, the 2 never again
    assert restored.state() == QueueState(4, 1, (0, 2, 3))
    restored.add_used_many([2, 0], 0)
    restored.push(3, 0)
    last = restored.pop()
    assert last is not None and last.head == 4
    assert restored.pop() is None
    assert restored.state() == QueueState(5, 4, (4,))


def test_pop_many_replays_first_within_its_limit() -> None:
    g = _published(6)
    q = g.queue()
    assert [c.head for c in q.pop_many(4)] == [0, 1, 2, 3]
    q.add_used_many([0, 2], 0)
    restored = g.queue(state=q.state())
    assert [c.head for c in restored.pop_many(1)] == [1]
    assert restored.state() == QueueState(4, 2, (1, 3))  # pop order: 3 is still to replay
    assert [c.head for c in restored.pop_many()] == [3, 4, 5]
    assert restored.pop_many() == []
    assert restored.state() == QueueState(6, 2, (1, 3, 4, 5))


def test_a_replayed_chain_is_validated_again() -> None:
    g = _published(2)
    q = g.queue()
    q.pop()
    state = q.state()
    g.desc(0, MEM - 4, 16)  # the guest rewrote the table: the chain now points outside memory
    restored = g.queue(state=state)
    with pytest.raises(QueueError, match="outside guest memory"):
        restored.pop()
    assert restored.broken is not None


@pytest.mark.parametrize("inflight", [(0, 0), (SIZE,), (-1,)])
def test_a_state_with_bad_chains_in_flight_is_refused(inflight: tuple[int, ...]) -> None:
    with pytest.raises(QueueError, match="not distinct heads"):
        Guest().queue(state=QueueState(0, 0, inflight))
