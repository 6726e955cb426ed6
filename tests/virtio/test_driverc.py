"""The C driver accelerator (devicehost.virtio._driverc) against the pure-Python DriverQueue.

Two queues over two guest memories with identical bytes, one accelerated and one not, get the
same operations: posting chains of every kind, kicks, a device completing chains in any order
(and lying: heads not in flight, lengths beyond the writable space), and every way of
collecting. After each step the return values, the errors (type and message), every byte of
guest memory and the queue's state must be the same.
"""

from __future__ import annotations

import array
import gc
import struct
import sys
import tracemalloc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import devicehost.virtio.driverqueue as dq_module
from devicehost.memory import DmaAllocator, GuestMemory
from devicehost.virtio.driverqueue import DriverQueue
from devicehost.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESCRIPTOR

_driverc = pytest.importorskip("devicehost.virtio._driverc")

MEMORY = 1 << 20
_PATTERN = bytes(range(256)) * 40


@contextmanager
def implementation(accelerated: bool) -> Iterator[None]:
    """Queues created inside use the C accelerator (even if DEVICEHOST_PURE_PYTHON is set) or
    not."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dq_module, "_driverc", _driverc if accelerated else None)
        yield


class Side:
    """A driver queue over its own memory, and a device model that completes its chains."""

    def __init__(self, accelerated: bool, size: int, event_idx: bool, start: int,
                 warm: bool = False) -> None:
        self.memory = GuestMemory.anonymous(MEMORY)
        self.allocator = DmaAllocator(self.memory)
        with implementation(accelerated):
            self.q = DriverQueue(0, self.memory, self.allocator, size, event_idx=event_idx)
        assert self.q.accelerated == accelerated
        assert ("add_readable" in self.q.__dict__) == accelerated
        # Start both indices at `start` (to cross the u16 wrap early).
        self.q.avail_idx = self.q.last_used = self.q._kicked_at = start
        struct.pack_into("<H", self.q._avail, 2, start)
        struct.pack_into("<H", self.q._used, 2, start)
        self.seen = start  # the device's next avail index
        self.used_idx = start
        self.pending: list[int] = []  # heads the device took and has not returned
        if warm:  # blocks of 1, 2 and 3 pages in the spare lists, so the C paths can post
            for pages in (3, 2, 1):
                self.q.add_writable_many(size // 2, pages * 4096 - 128)
                self.take_avail()
                for head in self.pending:
                    self.push_used(head, 0)
                self.pending.clear()
                self.q.reap()

    # -- the device ------------------------------------------------------------------------------

    def take_avail(self) -> None:
        avail_idx = struct.unpack_from("<H", self.q._avail, 2)[0]
        while self.seen != avail_idx:
            slot = 4 + 2 * (self.seen % self.q.size)
            self.pending.append(struct.unpack_from("<H", self.q._avail, slot)[0])
            self.seen = (self.seen + 1) & 0xFFFF

    def writable_parts(self, head: int) -> list[tuple[int, int]]:
        table, base, index, parts = self.q._desc, 0, head, []
        for _ in range(64):
            addr, length, flags, nxt = DESCRIPTOR.unpack_from(table, base + 16 * index)
            if flags & DESC_F_INDIRECT:
                table, base, index = self.memory.view(addr, length), 0, 0
                continue
            if flags & DESC_F_WRITE:
                parts.append((addr, length))
            if not flags & DESC_F_NEXT:
                break
            index = nxt
        return parts

    def push_used(self, head: int, written: int) -> None:
        struct.pack_into("<II", self.q._used, 4 + 8 * (self.used_idx % self.q.size), head,
                         written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.q._used, 2, self.used_idx)

    def complete(self, choice: int, mode: str, seed: int) -> None:
        self.take_avail()
        if not self.pending:
            return
        head = self.pending.pop(choice % len(self.pending))
        parts = self.writable_parts(head)
        total = sum(n for _, n in parts)
        written = {"zero": 0, "all": total, "half": total // 2, "over": total + 1}[mode]
        left = written
        for addr, n in parts:
            piece = min(n, left)
            self.memory.write(addr, (_PATTERN[seed:] * (piece // 256 + 2))[:piece])
            left -= piece
        self.push_used(head, written)


# ---- operations and their outcomes -------------------------------------------------------------

def make_buffer(spec: tuple[str, int, int] | None) -> Any:
    if spec is None:
        return None
    kind, n, seed = spec
    raw = (_PATTERN[seed:] * (n // 256 + 2))[:n]
    if kind == "bytes":
        return raw
    if kind == "bytearray":
        return bytearray(raw)
    if kind == "memoryview":
        return memoryview(raw)
    if kind == "memoryview_slice":
        return memoryview(b"xx" + raw + b"yy")[2 : 2 + n]
    if kind == "strided":
        return memoryview(bytes(b for b in raw for _ in (0, 1)))[::2]
    if kind == "memoryview_u32":
        return memoryview(array.array("I", raw[: n - n % 4]))
    if kind == "array":
        return array.array("B", raw)
    assert kind == "str"
    return raw.decode("latin-1")


def normalize(value: object) -> object:
    if isinstance(value, memoryview):
        return ("view", bytes(value))
    if isinstance(value, list):
        return ["list", *(normalize(v) for v in value)]
    if isinstance(value, tuple):
        return ("tuple", *(normalize(v) for v in value))
    if isinstance(value, dq_module.UsedBuffer):
        return ("used", value.head, value.written, value.data, value.token)
    return (type(value).__name__, value)


def outcome(call: Any, *args: Any, **kwargs: Any) -> object:
    try:
        return ("returned", normalize(call(*args, **kwargs)))
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


def apply(side: Side, op: tuple[Any, ...]) -> object:
    q, name = side.q, op[0]
    if name == "add_readable":
        _, first, second, token, style = op
        a, b = make_buffer(first), make_buffer(second)
        if style == "positional":
            return outcome(q.add_readable, a, b, token)
        if style == "keywords":
            return outcome(q.add_readable, a, second=b, token=token)
        if style == "one":
            return outcome(q.add_readable, a)
        return outcome(q.add_readable, a, b, token, "extra")
    if name == "add_segments":
        _, header, data, segment, length_at = op
        return outcome(q.add_segments, make_buffer(header), make_buffer(data), segment, length_at)
    if name == "add":
        _, readable, writable, fragment, indirect = op
        return outcome(q.add, [make_buffer(s) for s in readable], writable, fragment=fragment,
                       indirect=indirect, token="t")
    if name == "add_writable_many":
        return outcome(q.add_writable_many, op[1], op[2])
    if name == "kick":
        return outcome(q.kick)
    if name == "complete":
        side.complete(op[1], op[2], op[3])
        return None
    if name == "complete_all":
        side.take_avail()
        while side.pending:
            side.complete(op[1], op[2], op[3])
        return None
    if name == "lie_head":
        side.push_used(op[1], 0)
        return None
    if name == "device_flags":
        _, flags, avail_event = op
        struct.pack_into("<H", q._used, 0, flags)
        struct.pack_into("<H", q._used, 4 + 8 * q.size, (side.seen + avail_event) & 0xFFFF)
        return None
    if name in ("take_used_views", "reap", "get_used", "get_used_view"):
        return outcome(getattr(q, name))
    raise AssertionError(name)


def state(side: Side) -> object:
    q = side.q

    def parts(p: Any) -> object:
        if p is dq_module._NO_VIEWS:
            return "none"
        if isinstance(p, memoryview):
            return ("view", len(p))
        return [len(v) for v in p]

    return (
        list(q._free),
        {head: (buf[0].pfns, buf[1], buf[3], descs, parts(p), wlen, token)
         for head, (buf, descs, p, wlen, token) in q._in_flight.items()},
        {pages: [b[0].pfns for b in bufs] for pages, bufs in q._spare.items()},
        q._spare_pages, q.avail_idx, q.last_used, q._kicked_at, q.kicks,
        bytes(side.allocator._used), q.free_descriptors, q.in_flight,
    )


# ---- strategies ---------------------------------------------------------------------------------

_KINDS = ["bytes", "bytes", "bytearray", "memoryview", "memoryview_slice", "strided",
          "memoryview_u32", "array", "str"]
buffers = st.tuples(st.sampled_from(_KINDS),
                    st.sampled_from([0, 1, 44, 100, 1024, 1024, 4000, 5000]),
                    st.integers(0, 255))
ops = st.one_of(
    st.tuples(st.just("add_readable"), buffers, st.none() | buffers, st.sampled_from([None, 7]),
              st.sampled_from(["positional", "positional", "keywords", "one", "too_many"])),
    st.tuples(st.just("add"), st.lists(buffers.filter(lambda b: b[0] != "str"), max_size=2),
              st.lists(st.integers(1, 3000), max_size=2), st.sampled_from([None, 700]),
              st.booleans()),
    st.tuples(st.just("add_segments"),
              st.tuples(st.sampled_from(["bytes", "bytes", "bytearray", "memoryview", "strided",
                                         "str"]),
                        st.sampled_from([44, 44, 44, 3]), st.integers(0, 9)),
              buffers, st.sampled_from([100, 1024, 1024, 3000, 1, 0, -5, True]),
              st.sampled_from([24, 24, 0, 40, 41, -1])),
    st.tuples(st.just("add_writable_many"),
              st.sampled_from([0, 1, 3, 8, 100, -1, True]),
              st.sampled_from([0, 1, 100, 1068, 4033, 9000, -1, 2**32])),
    st.tuples(st.just("kick")),
    st.tuples(st.just("complete"), st.integers(0, 15),
              st.sampled_from(["zero", "all", "all", "half", "over"]), st.integers(0, 255)),
    st.tuples(st.just("complete"), st.integers(0, 15),
              st.sampled_from(["zero", "all", "all", "half", "over"]), st.integers(0, 255)),
    st.tuples(st.just("complete_all"), st.integers(0, 15),
              st.sampled_from(["zero", "all", "half"]), st.integers(0, 255)),
    st.tuples(st.just("lie_head"), st.sampled_from([0, 3, 15, 16, 2**32 - 1])),
    st.tuples(st.just("device_flags"), st.integers(0, 1), st.integers(0, 3)),
    st.tuples(st.sampled_from(["take_used_views", "take_used_views", "reap", "reap", "get_used",
                               "get_used_view"])),
)


@settings(max_examples=300, deadline=None)
@given(
    size=st.sampled_from([4, 8, 16]),
    event_idx=st.booleans(),
    start=st.sampled_from([0, 0xFFF0]),
    spare_max=st.sampled_from([1024, 1024, 5, 1]),
    warm=st.booleans(),
    steps=st.lists(ops, min_size=1, max_size=60),
)
def test_both_implementations_give_the_same_results_bytes_and_state(
    size: int, event_idx: bool, start: int, spare_max: int, warm: bool,
    steps: list[tuple[Any, ...]],
) -> None:
    run_both(size, event_idx, start, spare_max, warm, steps)


# The hot paths with valid arguments on warm queues, so most calls take the C path (and the rest
# of a batch falls back when the spare blocks of a size run out).
_GOOD = st.tuples(st.sampled_from(["bytes", "bytearray", "memoryview", "memoryview_slice"]),
                  st.sampled_from([1, 44, 1024, 3000, 5000, 9000]), st.integers(0, 255))
hot_ops = st.one_of(
    st.tuples(st.just("add_readable"), _GOOD, st.none() | _GOOD, st.sampled_from([None, 7]),
              st.just("positional")),
    st.tuples(st.just("add_segments"), st.tuples(st.just("bytes"), st.just(44), st.just(1)),
              _GOOD, st.sampled_from([100, 1024, 4000]), st.just(24)),
    st.tuples(st.just("add_writable_many"), st.sampled_from([1, 4, 100]),
              st.sampled_from([100, 1068, 5000, 12000])),
    st.tuples(st.just("complete_all"), st.integers(0, 15),
              st.sampled_from(["zero", "all", "half"]), st.integers(0, 255)),
    st.tuples(st.just("complete"), st.integers(0, 15), st.sampled_from(["all", "over"]),
              st.integers(0, 255)),
    st.tuples(st.sampled_from(["take_used_views", "reap", "kick"])),
)


@settings(max_examples=200, deadline=None)
@given(size=st.sampled_from([8, 16]), event_idx=st.booleans(),
       steps=st.lists(hot_ops, min_size=1, max_size=40))
def test_both_implementations_agree_on_the_hot_paths(
    size: int, event_idx: bool, steps: list[tuple[Any, ...]]
) -> None:
    run_both(size, event_idx, 0xFFF8, 1024, True, steps)


def run_both(size: int, event_idx: bool, start: int, spare_max: int, warm: bool,
             steps: list[tuple[Any, ...]]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dq_module, "_SPARE_PAGES", spare_max)
        c = Side(True, size, event_idx, start, warm)
        py = Side(False, size, event_idx, start, warm)
        try:
            for step, op in enumerate(steps):
                got_c, got_py = apply(c, op), apply(py, op)
                assert got_c == got_py, (step, op)
                assert c.memory.read(0, MEMORY) == py.memory.read(0, MEMORY), (step, op)
                assert state(c) == state(py), (step, op)
            c.q.release()
            py.q.release()
            assert c.allocator.free_pages == py.allocator.free_pages
        finally:
            c.memory.close()
            py.memory.close()


# ---- the C path is the one taken, and it keeps no references ------------------------------------

def _side(accelerated: bool = True, size: int = 16) -> Side:
    return Side(accelerated, size, True, 0)


def test_the_common_case_never_reaches_python(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, int] = {}
    for name in dq_module._ACCELERATED:
        original = getattr(DriverQueue, name)

        def counted(self: DriverQueue, *args: Any, _name: str = name, _f: Any = original,
                    **kwargs: Any) -> Any:
            calls[_name] = calls.get(_name, 0) + 1
            return _f(self, *args, **kwargs)

        monkeypatch.setattr(DriverQueue, name, counted)
    side = _side()
    q = side.q
    for _ in range(2):  # the first round allocates (Python); the second reuses blocks (C)
        calls.clear()
        for i in range(4):
            q.add_readable(b"h" * 44, b"p" * 1024, token=i)
        assert q.add_segments(b"h" * 44, memoryview(b"p" * 4000), 1024, 24) == 4000
        q.kick()
        side.take_avail()
        for head in list(side.pending):
            side.push_used(head, 0)
        side.pending.clear()
        assert q.reap() == 8
        assert q.add_writable_many(8, 1068) == 8
        side.take_avail()
        for head in side.pending:
            side.push_used(head, 100)
        side.pending.clear()
        assert [n for n, _ in q.take_used_views()] == [100] * 8
    assert calls == {}
    side.memory.close()


def test_collecting_declines_a_lying_device_to_python_after_the_good_entries() -> None:
    c, py = _side(True), _side(False)
    for side in (c, py):
        side.q.add_writable_many(4, 100)
        side.q.take_used_views()  # nothing yet
        side.take_avail()
        side.push_used(side.pending[0], 10)
        side.push_used(side.pending[1], 101)  # one byte beyond the buffer
        with pytest.raises(dq_module.DriverError, match="wrote 101 bytes into chain 1"):
            side.q.take_used_views()
    assert state(c) == state(py) and c.q.last_used == 2
    c.memory.close()
    py.memory.close()


def test_no_references_are_kept_or_leaked() -> None:
    side = _side()
    q = side.q
    token, header, payload = object(), b"h" * 44, bytes(1024)
    before = (sys.getrefcount(token), sys.getrefcount(header), sys.getrefcount(payload))

    def cycle() -> None:
        for _ in range(6):
            q.add_readable(header, payload, token)
        assert q.add_segments(header, payload, 512, 0) == 1024
        side.take_avail()
        for head in side.pending:
            side.push_used(head, 0)
        side.pending.clear()
        assert q.reap() == 8
        q.add_writable_many(8, 1068)
        side.take_avail()
        for head in side.pending:
            side.push_used(head, 1068)
        side.pending.clear()
        assert len(q.take_used_views()) == 8
        q.kick()

    for _ in range(20):
        cycle()
    assert (sys.getrefcount(token), sys.getrefcount(header), sys.getrefcount(payload)) == before
    tracemalloc.start()
    try:
        first = tracemalloc.get_traced_memory()[0]
        for _ in range(500):
            cycle()
        grown = tracemalloc.get_traced_memory()[0] - first
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024
    side.memory.close()


def test_accelerated_queues_are_garbage_collected_and_release_detaches() -> None:
    def alive() -> int:
        return sum(type(o) is _driverc.Queue for o in gc.get_objects())

    gc.collect()
    before = alive()
    side = _side()
    assert alive() == before + 1
    queue_ref = weakref.ref(side.q)
    del side.q
    gc.collect()
    assert queue_ref() is None and alive() == before
    side.memory.close()
    other = _side()
    fast = other.q._fast
    other.q.release()
    assert not other.q.accelerated and "add_readable" not in other.q.__dict__
    # A stale bound method passes its calls to Python (whose state was released too).
    assert fast.reap() == 0
    other.memory.close()


def test_a_subclass_keeps_its_own_methods() -> None:
    class Counting(DriverQueue):
        def add_readable(self, first: Any, second: Any = None, token: Any = None) -> int:
            self.counted = True
            return super().add_readable(first, second, token)

    memory = GuestMemory.anonymous(MEMORY)
    with implementation(True):
        q = Counting(0, memory, DmaAllocator(memory), 8, event_idx=False)
    assert not q.accelerated
    q.add_readable(b"x")
    assert q.counted
    memory.close()


def test_queue_refuses_bad_constructor_arguments() -> None:
    state: dict[str, Any] = {"_free": [], "_in_flight": {}, "_spare": {}}
    ring = memoryview(bytearray(4096))
    fallbacks = (print,) * 6
    with pytest.raises(TypeError):
        _driverc.Queue(state, ring, ring, ring, 4, True, 8, [], (1,) * 6)
    with pytest.raises(ValueError):
        _driverc.Queue(state, ring, ring, ring, 0, True, 8, [], fallbacks)
    with pytest.raises(ValueError):
        _driverc.Queue(state, ring, ring, ring, 4, True, 8, [], fallbacks[:5])
    with pytest.raises(ValueError):
        _driverc.Queue(state, ring[:10], ring, ring, 4, True, 8, [], fallbacks)
    with pytest.raises(ValueError):
        _driverc.Queue(state, ring, ring[1:], ring, 4, True, 8, [], fallbacks)
    with pytest.raises(BufferError):
        _driverc.Queue(state, memoryview(bytes(4096)), ring, ring, 4, True, 8, [], fallbacks)
    with pytest.raises(TypeError):
        _driverc.Queue({"_free": ()}, ring, ring, ring, 4, True, 8, [], fallbacks)
    fast = _driverc.Queue(state, ring, ring, ring, 4, True, 8, [], fallbacks)
    with pytest.raises(RuntimeError):
        fast.__init__(state, ring, ring, ring, 4, True, 8, [], fallbacks)
