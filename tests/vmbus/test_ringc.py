"""The C ring accelerator (devicehost.vmbus._ringc) against the pure-Python ring.

The same operations applied to a pure-Python ring pair and an accelerated one, over two buffers
with identical bytes, must give the same return values, the same errors and the same memory
after every operation, whatever the peer scribbles into the control page or the data area.
(Whether a compiler was present but the build failed is checked in tests/test_accel.py.)
"""

from __future__ import annotations

import array
import gc
import struct
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import devicehost.vmbus.ringcontrol as ring_module
from devicehost.memory import GuestMemory
from devicehost.vmbus.ring import (
    MAX_PACKET_SIZE,
    IncomingPacket,
    IncomingRing,
    OutgoingRing,
    RingEmpty,
    RingError,
    RingFull,
    RingMemory,
)

_ringc = pytest.importorskip("devicehost.vmbus._ringc")

CONTROL = 4096


@contextmanager
def implementation(accelerated: bool) -> Iterator[None]:
    """Rings created inside use the C accelerator (even if DEVICEHOST_PURE_PYTHON is set) or not."""
    saved = ring_module._ringc
    ring_module._ringc = _ringc if accelerated else None
    try:
        yield
    finally:
        ring_module._ringc = saved


class Side:
    """A writer and a reader over one buffer, on one implementation."""

    def __init__(self, buf: bytearray, accelerated: bool) -> None:
        self.buf = buf
        self.accelerated = accelerated
        self.mem = RingMemory.from_view(buf)
        self.w = self.new_writer()
        self.r = self.new_reader()
        self.peeked: IncomingPacket | None = None

    def new_writer(self) -> OutgoingRing:
        with implementation(self.accelerated):
            w = OutgoingRing(self.mem)
        assert (w._fast is not None) == self.accelerated
        assert ("write_inband" in w.__dict__) == self.accelerated
        return w

    def new_reader(self) -> IncomingRing:
        with implementation(self.accelerated):
            r = IncomingRing(self.mem)
        assert (r._fast is not None) == self.accelerated
        assert ("read" in r.__dict__ and "commit" in r.__dict__) == self.accelerated
        return r

    @property
    def data(self) -> memoryview:
        assert self.mem.data is not None
        return self.mem.data


# ---- payloads: described by a spec, built separately for each side ----------------------------

_PATTERN = bytes(range(256)) * 2100  # longer than 255 + the largest payload


def content(n: int, seed: int) -> bytes:
    return _PATTERN[seed : seed + n]


class BytesSubclass(bytes):
    """A buffer that is not exactly bytes: ring.py treats it as a sequence of parts."""


def make_payload(spec: tuple[Any, ...], side: Side) -> Any:
    kind = spec[0]
    if kind == "ring_view":
        _, offset, n = spec
        return side.data[offset : offset + n]
    if kind in ("parts_tuple", "parts_list"):
        parts = [make_payload(p, side) for p in spec[1]]
        return tuple(parts) if kind == "parts_tuple" else parts
    _, n, seed = spec
    raw = content(n, seed)
    if kind == "bytes":
        return raw
    if kind == "bytearray":
        return bytearray(raw)
    if kind == "memoryview":
        return memoryview(raw)
    if kind == "strided":  # not contiguous
        return memoryview(bytes(b for b in raw for _ in (0, 1)))[::2]
    if kind == "memoryview_u32":
        return memoryview(array.array("I", raw[: n - n % 4]))
    if kind == "array":
        return array.array("B", raw)
    if kind == "bytes_subclass":
        return BytesSubclass(raw)
    assert kind == "str"
    return raw.decode("latin-1")


# ---- outcomes: return values and errors, in a form that can be compared -----------------------

def normalize(value: object) -> object:
    if isinstance(value, IncomingPacket):
        assert type(value) is IncomingPacket
        return ("packet", *value[:3], type(value.payload).__name__, bytes(value.payload),
                *value[4:])
    if isinstance(value, list):
        return ["list", *(normalize(v) for v in value)]
    if isinstance(value, tuple):
        return ("tuple", *(normalize(v) for v in value))
    return (type(value).__name__, value)


def outcome(call: Any, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    try:
        return ("returned", normalize(call(*args, **kwargs)))
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc), getattr(exc, "kind", None),
                getattr(exc, "needed", None))


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


OMIT: Any = _Omit()


def apply(side: Side, op: tuple[Any, ...]) -> object:
    name = op[0]
    w, r = side.w, side.r
    if name == "write":
        _, spec, tid, completion = op
        kwargs = {}
        if tid is not OMIT:
            kwargs["transaction_id"] = tid
        if completion is not OMIT:
            kwargs["completion_requested"] = completion
        return outcome(w.write_inband, make_payload(spec, side), **kwargs)
    if name == "batch":
        _, specs, container = op
        payloads = [make_payload(s, side) for s in specs]
        return outcome(w.write_inband_batch, tuple(payloads) if container == "tuple" else payloads)
    if name in ("fill", "fill_batch"):
        # Packets sized from the free space: exactly full, one byte too many, a bit less...
        try:
            free = w.free_bytes()
        except RingError:
            free = 0
        if name == "fill":
            _, delta, kind, to_end = op
            if to_end:  # ...or ending exactly at the ring's end (or crossing it)
                free = w.data_len - w._in
            return outcome(w.write_inband, make_payload((kind, max(0, free - 24 + delta), 7),
                                                        side))
        _, count, delta = op
        n = max(0, free // count - 24 + delta)
        return outcome(w.write_inband_batch, [content(n, i) for i in range(count + 1)])
    if name == "read":
        return outcome(r.read)
    if name == "read_batch":
        return outcome(r.read_batch, op[1])
    if name == "peek":
        result = outcome(r.peek)
        try:
            side.peeked = r.peek()
        except (RingEmpty, RingError):
            side.peeked = None
        return result
    if name == "consume":
        return None if side.peeked is None else outcome(r.consume, side.peeked)
    if name == "commit":
        return outcome(r.commit)
    if name == "rollback":
        return outcome(r.rollback)
    if name == "mask":
        return outcome(r.set_interrupt_mask, op[1])
    if name == "pss":
        return outcome(w.set_pending_send_size, op[1])
    if name == "is_empty":
        return outcome(r.is_empty)
    if name == "free_bytes":
        return outcome(w.free_bytes)
    if name == "reopen_writer":
        result = outcome(side.new_writer)
        if result[0] == "returned":
            side.w = side.new_writer()
        return result[0], result[1] if result[0] == "raised" else None
    if name == "reopen_reader":
        result = outcome(side.new_reader)
        if result[0] == "returned":
            side.r = side.new_reader()
            side.peeked = None
        return result[0], result[1] if result[0] == "raised" else None
    # Peer corruption, the same on both sides.
    if name == "word":
        _, index, value = op
        struct.pack_into("<I", side.buf, 4 * index, value)
    elif name == "word_moved":
        _, index, delta = op
        value = struct.unpack_from("<I", side.buf, 4 * index)[0]
        struct.pack_into("<I", side.buf, 4 * index, (value + delta) % 2**32)
    elif name == "data":
        _, offset, raw = op
        side.buf[CONTROL + offset : CONTROL + offset + len(raw)] = raw
    else:
        # One u16 field (type, data_offset8, length8, flags) of the next packet to read
        # (written first if there is none, or if the ring is drained first), which is then read.
        assert name == "field"
        _, index, value, relative, n, drain = op
        drained = (outcome(r.read_batch, 1000), outcome(r.commit)) if drain else None
        wrote = outcome(w.write_inband, content(n, 5)) if outcome(r.is_empty)[1] == (
            "bool", True) else None
        at = CONTROL + r._cursor + 2 * index
        if relative:
            value = (value + struct.unpack_from("<H", side.buf, at)[0]) % 2**16
        struct.pack_into("<H", side.buf, at, value)
        return drained, wrote, outcome(r.read)
    return None


# ---- the operations ----------------------------------------------------------------------------

SIMPLE_KINDS = ["bytes", "bytearray", "memoryview", "strided", "memoryview_u32", "array",
                "bytes_subclass", "str"]
TIDS = st.one_of(st.just(OMIT), st.integers(0, 2**64 - 1),
                 st.sampled_from([0, 2**64 - 1, -1, 2**64, -(2**63), True, 1.5]))
COMPLETIONS = st.one_of(st.just(OMIT), st.sampled_from([False, True, 0, 1, 2, "", "yes", None]))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, int, list[tuple[Any, ...]]]:
    # 1 MiB: larger than the largest packet the u16 length8 can describe (MAX_PACKET_SIZE).
    data_len = draw(st.sampled_from([4096, 8192, 16384, 65536, 1 << 20]))
    largest = min(data_len, MAX_PACKET_SIZE + 8)
    lengths = st.one_of(st.integers(0, 40), st.integers(0, 40), st.integers(0, 1500),
                        st.integers(largest - 48, largest))  # around the largest packet
    seeds = st.integers(0, 255)
    simple = st.tuples(st.sampled_from(SIMPLE_KINDS[:-1]), st.integers(0, 300), seeds)
    ring_view = st.integers(0, data_len - 1).flatmap(
        lambda off: st.tuples(st.just("ring_view"), st.just(off),
                              st.integers(0, min(data_len - off, 2000))))
    any_kind = st.tuples(st.sampled_from(SIMPLE_KINDS), lengths, seeds)
    payloads = st.one_of(
        any_kind, any_kind, any_kind,
        st.tuples(st.just("bytes"), lengths, seeds),
        ring_view,
        st.tuples(st.sampled_from(["parts_tuple", "parts_list"]),
                  st.lists(st.one_of(simple, ring_view), max_size=4)),
    )
    index = st.integers(0, data_len // 8 - 1).map(lambda i: i * 8)
    u32 = st.integers(0, 2**32 - 1)
    writes = st.one_of(
        st.tuples(st.just("write"), payloads, TIDS, COMPLETIONS),
        st.tuples(st.just("write"), st.tuples(st.just("bytes"), lengths, seeds), TIDS,
                  COMPLETIONS),
        st.tuples(st.just("batch"), st.lists(payloads, max_size=8),
                  st.sampled_from(["list", "tuple"])),
        st.tuples(st.just("batch"), st.lists(st.tuples(st.just("bytes"), lengths, seeds),
                                             max_size=8), st.just("list")),
    )
    reads = st.one_of(
        st.tuples(st.sampled_from(["read", "peek", "consume", "commit", "rollback"])),
        st.tuples(st.just("read_batch"), st.one_of(st.integers(-1, 12), st.just(64))),
    )
    others = st.one_of(
        st.tuples(st.just("mask"), st.booleans()),
        st.tuples(st.just("pss"), st.one_of(st.integers(-8, data_len + 8), u32,
                                            st.sampled_from([1, 7, 8, 9, 16, 24]))),
        st.tuples(st.sampled_from(["is_empty", "free_bytes", "reopen_writer",
                                   "reopen_reader"])),
    )
    small_moves = st.sampled_from([-16, -8, -1, 1, 4, 8, 16])
    fields = st.tuples(st.one_of(
        st.tuples(st.just("field"), st.just(0), st.sampled_from([6, 11, 7, 9, 1, 0, 0xFFFF]),
                  st.just(False)),
        st.tuples(st.just("field"), st.just(1), st.sampled_from([0, 1, 2, 3, 4, 0xFFFF]),
                  st.just(False)),
        st.tuples(st.just("field"), st.just(2), st.one_of(st.integers(0, 300), st.sampled_from(
                      [0, 1, 2, 3, 0xFFFF, 0x8000])),
                  st.just(False)),
        st.tuples(st.just("field"), st.just(2), st.sampled_from([-2, -1, 1, 2, 8]),
                  st.just(True)),
        st.tuples(st.just("field"), st.just(2), st.sampled_from([-1, 1]), st.just(True)),
        st.tuples(st.just("field"), st.just(3), st.sampled_from([0, 1, 2, 3, 0x8000]),
                  st.just(False)),
    ), st.integers(0, 100), st.booleans()).map(lambda t: (*t[0], t[1], t[2]))
    corruptions = st.one_of(
        st.tuples(st.just("word"), st.integers(0, 3),
                  st.one_of(u32, index, st.integers(0, data_len + 16),
                            st.sampled_from([4, data_len - 8, data_len, data_len + 8]))),
        st.tuples(st.just("word_moved"), st.integers(0, 1), small_moves),
        st.tuples(st.just("data"), st.integers(0, data_len - 32), st.binary(max_size=32)),
        fields,
    )
    fills = st.one_of(
        st.tuples(st.just("fill"), st.sampled_from([-16, -8, -1, 0, 1, 8, 9]),
                  st.sampled_from(["bytes", "bytearray", "memoryview"]), st.booleans()),
        st.tuples(st.just("fill_batch"), st.integers(1, 5), st.sampled_from([-8, 0, 8, 16])),
    )
    ops = st.one_of(writes, writes, fills, reads, reads, others, corruptions, fields, fields)
    # A ring that may already be under way (in == out anywhere), over a zero or 0xAA data area.
    start = draw(st.one_of(st.just(0), index))
    fill = draw(st.sampled_from([0, 0xAA]))
    return data_len, start, fill, draw(st.lists(ops, min_size=10, max_size=60))


def initial_bytes(data_len: int, start: int, fill: int) -> bytes:
    initial = bytearray([fill]) * (CONTROL + data_len)
    initial[:CONTROL] = bytes(CONTROL)
    struct.pack_into("<II", initial, 0, start, start)
    return bytes(initial)


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_both_implementations_give_the_same_results_and_bytes(
        scenario: tuple[int, int, int, list[tuple[Any, ...]]]) -> None:
    data_len, start, fill, ops = scenario
    initial = initial_bytes(data_len, start, fill)
    pure = Side(bytearray(initial), accelerated=False)
    fast = Side(bytearray(initial), accelerated=True)
    assert pure.buf == fast.buf
    for step, op in enumerate(ops):
        expected = apply(pure, op)
        got = apply(fast, op)
        assert got == expected, f"step {step}: {op!r}"
        assert fast.buf == pure.buf, f"memory differs after step {step}: {op!r}"
        assert (fast.w._in, fast.r._cursor, fast.r._out) == (
            pure.w._in, pure.r._cursor, pure.r._out), f"step {step}: {op!r}"


# ---- explicit cases ----------------------------------------------------------------------------

@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the calls that reach the pure-Python write_inband / read of rings created after."""
    calls: Counter[str] = Counter()

    def spy(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def counted(self: object, *args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)

    spy(OutgoingRing, "write_inband")
    spy(IncomingRing, "read")
    return calls


def test_signalling_on_the_c_path(fallbacks: Counter[str]) -> None:
    side = Side(bytearray(CONTROL + 4096), accelerated=True)
    w, r = side.w, side.r
    r.set_interrupt_mask(False)
    assert w.write_inband(b"one") is True  # empty and unmasked
    assert w.write_inband(bytearray(b"two"), transaction_id=7) is False  # not empty
    assert [bytes(r.read().payload)[:3] for _ in range(2)] == [b"one", b"two"]
    assert r.commit() is False  # the writer asked for nothing
    assert w.write_inband(memoryview(b"three"), completion_requested=True) is True
    r.set_interrupt_mask(True)
    packet = r.read()
    assert (packet.transaction_id, packet.completion_requested) == (0, True)
    r.commit()
    assert w.write_inband(b"four") is False  # empty but masked
    assert fallbacks == Counter()  # all of it in C
    # A packet that would cross the ring's end is declined to ring.py, which wraps it.
    r.read()
    r.commit()
    r.set_interrupt_mask(False)
    assert w.write_inband(b"x" * 4000) is True
    assert fallbacks == Counter({"write_inband": 1})
    assert bytes(r.read().payload)[:4000] == b"x" * 4000
    assert fallbacks == Counter({"write_inband": 1, "read": 1})


def test_commit_signals_exactly_when_it_crosses_pending_send_size() -> None:
    for accelerated in (True, False):
        side = Side(bytearray(CONTROL + 4096), accelerated)
        w, r = side.w, side.r
        assert w.write_inband_batch([b"p" * 1000] * 4) == (3, False)  # 3 x 1024 bytes
        assert w.free_bytes() == 4088 - 3 * 1024
        w.set_pending_send_size(2000)
        signals = []
        for _ in range(3):
            r.read()
            before = w.free_bytes()
            signals.append(r.commit())
            assert signals[-1] == (before < 2000 <= w.free_bytes())
        assert signals == [True, False, False]
        assert r.commit() is False  # nothing read since
        w.set_pending_send_size(0)
        w.write_inband(b"q" * 2000)
        r.read()
        assert r.commit() is False  # nobody waits
        # The smallest request, 8 bytes, on a ring with no byte free: the first commit signals.
        w.set_pending_send_size(1)
        assert w.pending_send_size == 8
        while True:
            try:
                w.write_inband(b"f" * 40)
            except RingFull:
                break
        w.write_inband(b"f" * (w.free_bytes() - 24))
        assert w.free_bytes() == 0
        r.read()
        assert [r.commit(), r.commit()] == [True, False]
        r.read()
        assert r.commit() is False


def test_payload_that_is_a_view_of_the_ring_itself() -> None:
    sides = [Side(bytearray(CONTROL + 4096), accelerated) for accelerated in (True, False)]
    for side in sides:
        side.w.write_inband(b"0123456789abcdef")
        # A packet's payload sent again from where it lies in the ring.
        side.w.write_inband(side.data[16:32])
        # A payload taken from the very bytes the next packet overwrites (its source starts 8
        # bytes into the packet, where its transaction id lands first).
        side.buf[CONTROL + 80 : CONTROL + 216] = content(136, 1)
        assert side.w._in == 80
        side.w.write_inband(side.data[88:128], transaction_id=0x1122334455667788)
    fast, pure = sides
    assert fast.buf == pure.buf
    for side in sides:
        assert [bytes(p.payload) for p in side.r.read_batch()] == [
            b"0123456789abcdef", b"0123456789abcdef",
            struct.pack("<Q", 0x1122334455667788) + content(136, 1)[16:48]]


def test_accelerated_rings_are_garbage_collected() -> None:
    # The C object holds the ring's __dict__ and bound methods, which hold the C object.
    buf = bytearray(CONTROL + 4096)
    side = Side(buf, accelerated=True)
    side.w.write_inband(b"x")
    assert bytes(side.r.read().payload) == b"x" + bytes(7)
    refs: list[weakref.ref[Any]] = [weakref.ref(side.w), weakref.ref(side.r)]
    with pytest.raises(BufferError):  # the ring's views hold the buffer
        buf.append(0)
    del side
    gc.collect()
    assert [ref() for ref in refs] == [None, None]
    buf.append(0)  # every view, the C objects' included, was released


def test_ring_refuses_bad_constructor_arguments() -> None:
    control = memoryview(bytearray(CONTROL))
    data = memoryview(bytearray(4096))
    with pytest.raises(TypeError, match="memoryview"):
        _ringc.Ring(control, bytearray(4096), IncomingPacket)
    with pytest.raises(TypeError, match="tuple subclass"):
        _ringc.Ring(control, data, list)
    with pytest.raises(ValueError, match="control page"):
        _ringc.Ring(memoryview(bytearray(64)), data, IncomingPacket)
    for size in (0, 12):
        with pytest.raises(ValueError, match="size"):
            _ringc.Ring(control, memoryview(bytearray(size)), IncomingPacket)
    with pytest.raises(BufferError, match="not writable"):
        _ringc.Ring(control, memoryview(bytes(4096)), IncomingPacket)
    with pytest.raises(BufferError, match="not writable"):
        _ringc.Ring(memoryview(bytes(CONTROL)), data, IncomingPacket)
    with pytest.raises(BufferError, match="contiguous"):
        _ringc.Ring(control, memoryview(bytearray(8192))[::2], IncomingPacket)
    fast = _ringc.Ring(control, data, IncomingPacket)
    with pytest.raises(RuntimeError, match="once"):
        fast.__init__(control, data, IncomingPacket)
    calls: list[Callable[[], object]] = [
        fast.read, fast.commit, fast.read_batch, lambda: fast.write_inband(b"x"),
        lambda: fast.write_inband_batch([b"x"]),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="not bound"):
            call()
    with pytest.raises(TypeError, match="bind"):
        fast.bind(print, 1, None)
    with pytest.raises(TypeError, match="bind"):
        fast.bind(print, print)


def _packet_image(payload: bytes) -> bytearray:
    """A ring holding one in-band packet with ``payload``."""
    buf = bytearray(CONTROL + 4096)
    with implementation(False):
        OutgoingRing(RingMemory.from_view(buf)).write_inband(payload, transaction_id=3)
    return buf


@pytest.mark.parametrize("layout", ["read-only data", "scattered"])
def test_memory_the_accelerator_cannot_take_runs_on_pure_python(layout: str) -> None:
    image = _packet_image(b"payload!")
    control = memoryview(bytearray(image[:CONTROL]))
    pages: Sequence[memoryview]
    if layout == "read-only data":
        pages = [memoryview(bytes(image[CONTROL:]))]
    else:
        memory = GuestMemory.anonymous(4 * 4096)
        memory.write(0, bytes(image[:CONTROL]))
        memory.write(3 * 4096, bytes(image[CONTROL:]))
        control = memory.page_view(0)
        pages = [memory.page_view(3), memory.page_view(1)]
    mem = RingMemory(control, pages)
    with implementation(True):
        r = IncomingRing(mem)
        w = OutgoingRing(mem)
    assert r._fast is None and w._fast is None
    assert "read" not in r.__dict__ and "write_inband" not in w.__dict__
    packet = r.read()
    assert (packet.transaction_id, bytes(packet.payload)) == (3, b"payload!")
    if layout == "read-only data":
        with pytest.raises(TypeError):
            w.write_inband(b"x")
    else:
        w.write_inband(b"again")
        assert bytes(r.read().payload) == b"again\0\0\0"
