"""The guest-side driver against the device-side split queue (on the C accelerator and on pure
Python: every test runs on both)."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.memory import PAGE_SIZE, DmaAllocator, GuestMemory
from devicehost.virtio.driver import DriverError, DriverQueue, QueueFull, QueueSetup, VirtioDriver
from devicehost.virtio.queue import SplitQueue
from devicehost.virtio.traits import RING_EVENT_IDX, TRANSPORT_FEATURES, VERSION_1

pytestmark = pytest.mark.usefixtures("driver_implementation")


def test_queues_use_the_implementation_under_test(driver_implementation: str) -> None:
    dq, _ = _pair()
    assert dq.accelerated == (driver_implementation == "c")


def _pair(size: int = 16, *, event_idx: bool = False) -> tuple[DriverQueue, SplitQueue]:
    memory = GuestMemory.anonymous(8 << 20)
    dq = DriverQueue(0, memory, DmaAllocator(memory), size, event_idx=event_idx)
    return dq, SplitQueue(memory, dq.layout, event_idx=event_idx)


def test_fragments_land_in_separate_non_contiguous_memory() -> None:
    dq, q = _pair()
    head = dq.add([b"a" * 10000], [3000], fragment=4096, token="t")
    assert dq.free_descriptors == 16 - 4
    chain = q.pop()
    assert chain is not None and chain.head == head
    assert [len(p) for p in chain.readable] == [4096, 4096, 1808]
    assert [len(p) for p in chain.writable] == [3000]
    assert all(bytes(p) == b"a" * len(p) for p in chain.readable)
    chain.write_at(0, b"z" * 3000)
    q.push(chain.head, 3000)
    used = dq.get_used()
    assert used is not None and used.token == "t" and used.data == b"z" * 3000
    assert dq.free_descriptors == 16 and dq.in_flight == 0


def test_fragment_addresses_are_not_contiguous() -> None:
    memory = GuestMemory.anonymous(8 << 20)
    dq = DriverQueue(0, memory, DmaAllocator(memory), 16, event_idx=False)
    head = dq.add([bytes(3 * PAGE_SIZE)], fragment=PAGE_SIZE)
    gpas = []
    index, flags = head, 1
    while flags & 1:  # follow NEXT through the descriptor table in guest memory
        addr, length, flags, index = struct.unpack(
            "<QIHH", memory.read(dq.layout.desc_gpa + 16 * index, 16)
        )
        assert length == PAGE_SIZE
        gpas.append(addr)
    assert len(gpas) == 3
    assert all(b != a + PAGE_SIZE for a, b in itertools.pairwise(gpas))


def test_indirect_uses_one_descriptor() -> None:
    dq, q = _pair(size=2)
    dq.add([b"x" * 100, b"y" * 50], [10, 20], indirect=True, fragment=30)
    dq.add([b"second"], indirect=True)
    assert dq.free_descriptors == 0
    with pytest.raises(QueueFull):
        dq.add([b"third"])
    chain = q.pop()
    assert chain is not None and chain.read() == b"x" * 100 + b"y" * 50
    assert chain.writable_len == 30 and len(chain.writable) == 2
    q.push(chain.head, 30)
    assert dq.get_used() is not None and dq.free_descriptors == 1


def test_device_lies_are_driver_errors() -> None:
    dq, q = _pair()
    dq.add([b"x"], [4])
    chain = q.pop()
    assert chain is not None
    q.push(chain.head, 5)
    with pytest.raises(DriverError, match="wrote 5 bytes into chain 0 of queue 0, which has 4"):
        dq.get_used()
    dq2, q2 = _pair()
    q2.push(7, 0)
    with pytest.raises(DriverError, match="head 7 on queue 0, not in flight"):
        dq2.get_used()


def test_kick_suppression() -> None:
    dq, q = _pair()
    dq.add([b"a"])
    assert dq.kick() is True
    q.disable_notifications()
    dq.add([b"b"])
    assert dq.kick() is False
    q.enable_notifications()
    dq.add([b"c"])
    assert dq.kick() is True


def test_kick_suppression_with_event_idx() -> None:
    dq, q = _pair(event_idx=True)
    q.enable_notifications()  # avail_event = 0: kick when the first buffer arrives
    dq.add([b"a"])
    dq.add([b"b"])
    assert dq.kick() is True and dq.kicks == 1
    assert q.pop() is not None  # avail_event moves to 1; the driver already passed it
    dq.add([b"c"])
    assert dq.kick() is False
    while q.pop() is not None:
        pass
    dq.add([b"d"])
    assert dq.kick() is True


class _Link:
    offered_features = 0b1 | TRANSPORT_FEATURES
    queue_count = 2
    max_queue_size = 64

    def __init__(self) -> None:
        self.started: tuple[int, Sequence[QueueSetup]] | None = None
        self.resets = 0

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(range(offset, offset + size))

    def write_config(self, offset: int, data: bytes) -> None:
        raise AssertionError("not used")

    async def start(self, features: int, queues: Sequence[QueueSetup]) -> None:
        self.started = (features, queues)

    async def reset(self) -> None:
        self.resets += 1


@pytest.mark.anyio
async def test_driver_negotiates_and_caps_the_queue_size() -> None:
    memory = GuestMemory.anonymous(8 << 20)
    alloc = DmaAllocator(memory)
    free = alloc.free_pages
    link = _Link()
    driver = VirtioDriver(link, memory, alloc)
    await driver.start(queue_size=256, features=1 << VERSION_1 | 1 << RING_EVENT_IDX)
    assert link.started is not None
    features, setups = link.started
    assert features == 1 << VERSION_1 | 1 << RING_EVENT_IDX
    assert [s.layout.size for s in setups] == [64, 64]
    assert driver.queue(1).event_idx is True
    assert driver.read_config(2, 3) == b"\2\3\4"
    driver.queue(0).add([b"pending"])
    await driver.reset()
    assert link.resets == 1 and alloc.free_pages == free and driver.queues == []


@settings(max_examples=200, deadline=None)
@given(
    chains=st.lists(
        st.tuples(st.lists(st.binary(max_size=600), max_size=3),
                  st.lists(st.integers(1, 700), max_size=3),
                  st.sampled_from([None, 3, 7, 256]), st.booleans()),
        min_size=1, max_size=12,
    ),
    event_idx=st.booleans(),
)
def test_every_chain_round_trips(
    chains: list[tuple[list[bytes], list[int], int | None, bool]], event_idx: bool
) -> None:
    dq, q = _pair(size=64, event_idx=event_idx)
    expected = {}
    for readable, writable, fragment, indirect in chains:
        if not readable and not writable:
            readable = [b"!"]
        try:
            head = dq.add(readable, writable, fragment=fragment, indirect=indirect)
        except QueueFull:
            assert not indirect or dq.free_descriptors == 0
            continue
        expected[head] = (b"".join(readable), sum(writable))
    got = {}
    while (chain := q.pop()) is not None:
        data = chain.read()
        reply = (data[::-1] * 3)[: chain.writable_len].ljust(chain.writable_len, b".")
        chain.write_at(0, reply)
        got[chain.head] = (data, chain.writable_len)
        q.push(chain.head, len(reply))
    assert got == expected
    while (used := dq.get_used()) is not None:
        data, wlen = expected.pop(used.head)
        assert used.data == (data[::-1] * 3)[:wlen].ljust(wlen, b".")
    assert expected == {} and dq.in_flight == 0 and dq.free_descriptors == 64


def test_receive_buffers_fill_the_queue_and_recycle() -> None:
    dq, q = _pair(size=4)
    heads = [dq.add(writable=[100 + i], token=i) for i in range(4)]
    with pytest.raises(QueueFull):
        dq.add(writable=[1])
    chains = []
    while (chain := q.pop()) is not None:
        assert chain.readable == () and [len(p) for p in chain.writable] == [chain.writable_len]
        chains.append(chain)
    assert [c.head for c in chains] == heads
    assert [c.writable_len for c in chains] == [100, 101, 102, 103]
    for chain in chains:
        chain.write_at(0, bytes([chain.head]) * 50)
        q.push(chain.head, 50)
    for i in range(4):
        used = dq.get_used()
        assert used is not None and used.token == i and used.data == bytes([heads[i]]) * 50
    # Recycled blocks are handed out again for the next buffers.
    dq.add(writable=[100])
    chain = q.pop()
    assert chain is not None and chain.writable_len == 100 and dq.free_descriptors == 3


def test_used_buffers_as_views() -> None:
    dq, q = _pair()
    dq.add(writable=[8], token="one")
    dq.add(writable=[3, 4], token="two")  # two writable descriptors: joined
    assert dq.get_used_view() is None
    for written in (5, 6):
        chain = q.pop()
        assert chain is not None
        chain.write_at(0, b"abcdefg"[:written])
        q.push(chain.head, written)
    used = dq.get_used_view()
    assert used is not None and isinstance(used[2], memoryview)
    assert (used[1], bytes(used[2]), used[3]) == (5, b"abcde", "one")
    used = dq.get_used_view()
    assert used is not None and (used[1], bytes(used[2]), used[3]) == (6, b"abcdef", "two")
    assert dq.in_flight == 0 and dq.free_descriptors == 16
    # The device is checked as for get_used.
    dq.add(writable=[2])
    chain = q.pop()
    assert chain is not None
    q.push(chain.head, 3)
    with pytest.raises(DriverError, match="wrote 3 bytes"):
        dq.get_used_view()


@pytest.mark.parametrize("event_idx", [False, True])
def test_add_readable_chains_pop_intact_and_reap_frees_them(event_idx: bool) -> None:
    dq, q = _pair(size=8, event_idx=event_idx)
    heads = [dq.add_readable(b"h" * 44, b"p" * 1024), dq.add_readable(b"only"),
             dq.add_readable(b"hdr", b"")]  # an empty second buffer: a one-buffer chain
    assert dq.free_descriptors == 8 - 4 and dq.in_flight == 3
    chains = [q.pop() for _ in heads]
    assert [c.head for c in chains if c is not None] == heads
    expected = [[b"h" * 44, b"p" * 1024], [b"only"], [b"hdr"]]
    assert [[bytes(p) for p in c.readable] for c in chains if c is not None] == expected
    assert dq.reap() == 0
    for c in chains:
        assert c is not None and c.writable_len == 0
        q.add_used(c.head, 0)
    assert dq.reap() == 3
    assert dq.free_descriptors == 8 and dq.in_flight == 0 and dq.reap() == 0
    if event_idx:  # the driver asks for an interrupt at the next completion
        assert struct.unpack_from("<H", dq._avail, 4 + 2 * 8)[0] == 3


def test_add_readable_when_full_and_reap_of_lies() -> None:
    dq, q = _pair(size=2)
    dq.add_readable(b"a")
    with pytest.raises(QueueFull, match="2 descriptors needed, 1 free"):
        dq.add_readable(b"a", b"b")
    dq.add_readable(b"b")
    with pytest.raises(QueueFull, match="1 descriptors needed, 0 free"):
        dq.add_readable(b"c")
    chain = q.pop()
    assert chain is not None
    q.push(chain.head, 1)  # a readable-only chain has no room to write into
    with pytest.raises(DriverError, match="wrote 1 bytes into chain 0 of queue 0, which has 0"):
        dq.reap()
    dq2, q2 = _pair()
    q2.push(5, 0)
    with pytest.raises(DriverError, match="head 5 on queue 0, not in flight"):
        dq2.reap()


@pytest.mark.parametrize("event_idx", [False, True])
def test_add_writable_many_and_take_used_views(event_idx: bool) -> None:
    dq, q = _pair(size=4, event_idx=event_idx)
    assert dq.add_writable_many(6, 100) == 4  # as many as there are descriptors
    assert dq.add_writable_many(1, 100) == 0 and dq.in_flight == 4
    chains = [q.pop() for _ in range(4)]
    assert q.pop() is None
    for i, chain in enumerate(chains):
        assert chain is not None and chain.readable_len == 0 and chain.writable_len == 100
        chain.write_at(0, bytes([i]) * (10 * i))
        q.add_used(chain.head, 10 * i)
    views = dq.take_used_views()
    assert [(n, bytes(v)) for n, v in views] == [(10 * i, bytes([i]) * (10 * i)) for i in range(4)]
    assert dq.take_used_views() == [] and dq.free_descriptors == 4 and dq.in_flight == 0
    if event_idx:
        assert struct.unpack_from("<H", dq._avail, 4 + 2 * 4)[0] == 4


def test_take_used_views_rejects_device_lies() -> None:
    dq, q = _pair()
    dq.add_writable_many(1, 8)
    chain = q.pop()
    assert chain is not None
    q.push(chain.head, 9)
    with pytest.raises(DriverError, match="wrote 9 bytes into chain 0 of queue 0, which has 8"):
        dq.take_used_views()
    dq2, q2 = _pair()
    q2.push(3, 0)
    with pytest.raises(DriverError, match="head 3 on queue 0, not in flight"):
        dq2.take_used_views()


def test_a_queue_gives_its_spare_blocks_back_when_memory_runs_out() -> None:
    memory = GuestMemory.anonymous(64 * PAGE_SIZE)
    alloc = DmaAllocator(memory)
    dq = DriverQueue(0, memory, alloc, 16, event_idx=False)
    q = SplitQueue(memory, dq.layout, event_idx=False)
    ring_pages = 64 - alloc.free_pages
    assert dq.add_writable_many(16, 100) == 16
    while (chain := q.pop()) is not None:
        q.push(chain.head, 0)
    assert len(dq.take_used_views()) == 16
    assert alloc.free_pages == 64 - ring_pages - 16  # kept for reuse
    # 50 contiguous pages exist only once the spare blocks are given back.
    head = dq.add(writable=[50 * PAGE_SIZE - 128])
    assert alloc.free_pages == 64 - ring_pages - 50
    chain = q.pop()
    assert chain is not None and chain.head == head and chain.writable_len == 50 * PAGE_SIZE - 128
    with pytest.raises(MemoryError):
        dq.add(writable=[20 * PAGE_SIZE])


@pytest.mark.parametrize("warm", [False, True])
def test_add_segments_posts_header_and_piece_chains_until_descriptors_run_out(warm: bool) -> None:
    dq, q = _pair(size=8)
    if warm:  # blocks in the spare lists (the accelerator's path)
        dq.add_writable_many(8, 2000)
        while (chain := q.pop()) is not None:
            q.push(chain.head, 0)
        assert dq.reap() == 8
    header = bytes(range(44))
    data = bytes(range(256)) * 40  # 10240 bytes: six pieces of 1800, the queue takes four
    assert dq.add_segments(header, memoryview(data), 1800, 24) == 4 * 1800
    assert dq.free_descriptors == 0 and dq.in_flight == 4
    assert dq.add_segments(header, data, 1800, 24) == 0
    for i in range(4):
        chain = q.pop()
        assert chain is not None and chain.writable_len == 0
        first, second = (bytes(p) for p in chain.readable)
        assert first == header[:24] + struct.pack("<I", 1800) + header[28:]
        assert second == data[1800 * i : 1800 * (i + 1)]
        q.push(chain.head, 0)
    assert dq.reap() == 4
    # The last piece is shorter; an empty buffer posts nothing.
    assert dq.add_segments(header, data[:2500], 2000, 40) == 2500
    assert dq.add_segments(header, b"", 2000, 40) == 0
    lengths = []
    while (chain := q.pop()) is not None:
        lengths.append(struct.unpack_from("<I", bytes(chain.readable[0]), 40)[0])
    assert lengths == [2000, 500]


def test_add_segments_refuses_a_bad_segment_or_length_field() -> None:
    dq, _ = _pair()
    with pytest.raises(ValueError, match="segment must be positive"):
        dq.add_segments(bytes(44), b"x", 0, 24)
    with pytest.raises(ValueError, match="a le32 at 41 is not inside a 44-byte header"):
        dq.add_segments(bytes(44), b"x", 10, 41)
    assert dq.in_flight == 0
