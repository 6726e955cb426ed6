"""The fixed-capacity FIFO (upstream ring.rs tests)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost_vsock.txbuffer import TxBuffer, TxBufferOverflow


def sink_of(out: bytearray, limit: int = 1 << 30) -> Callable[[memoryview], int]:
    def sink(view: memoryview) -> int:
        n = min(len(view), limit)
        out.extend(view[:n])
        return n
    return sink


def test_empty() -> None:
    buf = TxBuffer(8)
    assert (len(buf), buf.available, buf.capacity) == (0, 8, 8)
    assert buf.drain(lambda v: len(v)) == 0


def test_write_read_and_wrap() -> None:
    buf = TxBuffer(8)
    assert buf.write([b"hello"]) == 5
    assert buf.available == 3
    assert buf.read(3) == b"hel"
    buf.write([b"abcdef"])  # fills the buffer, wrapping around the end
    out = bytearray()
    calls: list[int] = []

    def sink(view: memoryview) -> int:
        calls.append(len(view))
        out.extend(view)
        return len(view)

    assert buf.drain(sink) == 8 and bytes(out) == b"loabcdef" and calls == [5, 3]


def test_overflow() -> None:
    buf = TxBuffer(4)
    with pytest.raises(TxBufferOverflow, match="write of 6 bytes exceeds available space of 4"):
        buf.write([b"abcdef"])
    buf.write([b"abcd"])
    with pytest.raises(TxBufferOverflow):
        buf.write([b"x"])


def test_multi_slice_and_offsets() -> None:
    buf = TxBuffer(16)
    assert buf.write([b"ab", b"cd", b"ef"]) == 6
    assert buf.write([b"12", b"345"], offset=1) == 4
    assert buf.write([b"12", b"345"], offset=3) == 2
    assert buf.write([b"12"], offset=2) == 0
    assert buf.read(100) == b"abcdef234545"


def test_partial_sink() -> None:
    buf = TxBuffer(8)
    buf.write([b"abcdef"])
    out = bytearray()
    assert buf.drain(sink_of(out, 2)) == 2
    assert len(buf) == 4 and bytes(out) == b"ab"
    assert buf.drain(lambda v: 0) == 0 and len(buf) == 4


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=20), st.integers(0, 25)), max_size=40))
def test_fifo_order(ops: list[tuple[bytes, int]]) -> None:
    buf = TxBuffer(32)
    model = bytearray()
    out = bytearray()
    for data, take in ops:
        if len(data) <= buf.available:
            buf.write([data])
            model += data
        got = buf.read(take)
        out += got
        assert got == bytes(model[: len(got)])
        del model[: len(got)]
        assert len(buf) == len(model)


def test_views_consume_and_drop_tail_across_the_wrap() -> None:
    buf = TxBuffer(8)
    assert buf.views(4) == []
    buf.write([b"abcdef"])
    buf.consume(4)  # head at 4: "ef"
    buf.write([b"ghijk"])  # wraps: "efghijk"
    assert [bytes(v) for v in buf.views(7)] == [b"efgh", b"ijk"]
    assert [bytes(v) for v in buf.views(3)] == [b"efg"] and len(buf) == 7
    buf.drop_tail(2)  # forget "jk"
    assert [bytes(v) for v in buf.views(99)] == [b"efgh", b"i"]
    buf.consume(5)
    assert len(buf) == 0 and buf.views(1) == []
    buf.write([b"xy"])
    assert [bytes(v) for v in buf.views(2)] == [b"xy"]
