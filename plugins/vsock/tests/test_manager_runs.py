"""The connection table's batching, sans I/O: runs of rx buffers filled by one scatter read,
and runs of guest RW packets coalesced into one host write, against packet-by-packet handling."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost_vsock.protocol import (
    HEADER,
    HEADER_SIZE,
    SHUTDOWN_SEND,
    Op,
)

from .harness import CID, Harness

# ----------------------------------------------------------------------- runs of rx buffers


def _packets_one_by_one(h: Harness, sizes: list[int]) -> list[bytes]:
    out = []
    for size in sizes:
        buf = memoryview(bytearray(size))
        n = h.manager.produce_rx(buf, h.now)
        if n is None:
            break
        out.append(bytes(buf[:n]))
    return out


def _packets_in_runs(h: Harness, sizes: list[int]) -> tuple[list[bytes], int]:
    """Like the worker: the first buffer of each call, then the lent ones it filled; lent
    buffers that were not filled are offered again. Returns the packets and how many calls."""
    queue = [memoryview(bytearray(size)) for size in sizes]
    out: list[bytes] = []
    calls = 0
    lent: list[memoryview] = []

    def more() -> memoryview | None:
        if not queue or len(queue[0]) <= HEADER_SIZE:
            return None
        lent.append(queue.pop(0))
        return lent[-1]

    while queue:
        first = queue.pop(0)
        lent.clear()
        n = h.manager.produce_rx(first, h.now, more)
        calls += 1
        filled = h.manager.extra_sizes
        queue[:0] = lent[len(filled) :]
        if n is None:
            assert filled == []
            break
        out.append(bytes(first[:n]))
        out.extend(bytes(buf[:size]) for buf, size in zip(lent, filled, strict=False))
    return out, calls


@settings(max_examples=200, deadline=None)
@given(
    data_len=st.integers(0, 20000),
    credit=st.integers(0, 12000),
    sizes=st.lists(st.integers(HEADER_SIZE, HEADER_SIZE + 3000), min_size=1, max_size=40),
    eof=st.booleans(),
)
def test_a_run_of_buffers_gets_exactly_the_packets_of_successive_calls(
    data_len: int, credit: int, sizes: list[int], eof: bool
) -> None:
    payload = bytes(i % 251 for i in range(data_len))
    results = []
    for runs in (False, True):
        h = Harness()
        h.listening.add(5000)
        h.tx(Op.REQUEST, 1024, 5000, buf_alloc=credit)
        response = h.rx()
        assert response is not None and response[0].op == Op.RESPONSE
        stream = h.streams[5000][-1]
        stream.inbound += payload
        stream.host_eof = eof
        packets = _packets_in_runs(h, sizes)[0] if runs else _packets_one_by_one(h, sizes)
        conn = h.manager.connection((5000, 1024))
        results.append((packets, bytes(stream.inbound), conn and conn.tx_cnt))
    assert results[0] == results[1]


def test_runs_use_one_scatter_read_and_only_for_a_lone_connection() -> None:
    h = Harness()
    stream = h.connect(1024, 5000)
    stream.inbound += b"a" * 5000
    packets, calls = _packets_in_runs(h, [HEADER_SIZE + 1000] * 8)
    assert [len(p) - HEADER_SIZE for p in packets] == [1000] * 5 and calls == 2
    assert stream.scatter_reads == 1  # the second sees nothing queued: a plain read (would block)
    assert b"".join(p[HEADER_SIZE:] for p in packets) == b"a" * 5000
    # Two connections with data: served round robin, one buffer each, no runs.
    other = h.connect(1025, 5000)
    stream.inbound += b"b" * 3000
    other.inbound += b"c" * 3000
    h.manager.on_readable(stream)
    h.manager.on_readable(other)
    packets, calls = _packets_in_runs(h, [HEADER_SIZE + 1000] * 4)
    assert stream.scatter_reads == 1 and other.scatter_reads == 0
    assert [(HEADER.unpack_from(p)[3], p[HEADER_SIZE:HEADER_SIZE + 1]) for p in packets] == [
        (1025, b"c"), (1024, b"b"), (1025, b"c"), (1024, b"b")
    ]


def test_runs_borrow_only_the_buffers_the_queued_bytes_need() -> None:
    h = Harness()
    h.listening.add(5000)
    h.tx(Op.REQUEST, 1024, 5000, buf_alloc=4500)
    h.rx()
    stream = h.streams[5000][-1]
    stream.inbound += b"a" * 3500
    borrowed = []

    def more() -> memoryview:
        borrowed.append(memoryview(bytearray(HEADER_SIZE + 1000)))
        return borrowed[-1]

    first = memoryview(bytearray(HEADER_SIZE + 1000))
    assert h.manager.produce_rx(first, h.now, more) == HEADER_SIZE + 1000
    assert len(borrowed) == 3 and h.manager.extra_sizes == [HEADER_SIZE + 1000] * 2 + [
        HEADER_SIZE + 500
    ]
    stream.inbound += b"b" * 3000  # queued beyond the credit left (1000): one buffer's worth
    borrowed.clear()
    assert h.manager.produce_rx(first, h.now, more) == HEADER_SIZE + 1000
    assert borrowed == [] and h.manager.extra_sizes == []
    assert bytes(first[HEADER_SIZE:]) == b"b" * 1000


# ----------------------------------------------------------------------- coalesced host writes

_TX_STEP = st.tuples(
    st.sampled_from(["rw", "rw", "rw", "rw_long_len", "rw_bad_cid", "shutdown", "credit_request",
                     "credit_update", "response", "rst", "request"]),
    st.integers(0, 1),  # which connection
    st.integers(0, 40000),  # payload length
)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(_TX_STEP, max_size=30),
    capacities=st.tuples(st.integers(0, 200000), st.integers(0, 200000)),
    fail=st.tuples(st.booleans(), st.booleans()),
    flush_every=st.integers(1, 40),
)
def test_coalesced_rw_packets_match_packet_by_packet_handling(
    steps: list[tuple[str, int, int]], capacities: tuple[int, int], fail: tuple[bool, bool],
    flush_every: int,
) -> None:
    results = []
    for coalesce in (False, True):
        h = Harness()
        streams = [h.connect(1024, 5000), h.connect(1025, 5000)]
        for stream, capacity, failing in zip(streams, capacities, fail, strict=True):
            stream.capacity = capacity
            stream.fail_send = failing
        for i, (kind, which, length) in enumerate(steps):
            local = 1024 + which
            data = bytes([i % 256]) * length
            if kind == "rw":
                h.manager.handle_tx(
                    HEADER.pack(CID, 2, local, 5000, length, 1, Op.RW, 0, 65536, 0),
                    [memoryview(data)], h.now, coalesce=coalesce)
            elif kind == "rw_long_len":
                h.manager.handle_tx(
                    HEADER.pack(CID, 2, local, 5000, length + 1, 1, Op.RW, 0, 65536, 0),
                    [memoryview(data)], h.now, coalesce=coalesce)
            elif kind == "rw_bad_cid":
                h.manager.handle_tx(
                    HEADER.pack(CID + 1, 2, local, 5000, length, 1, Op.RW, 0, 65536, 0),
                    [memoryview(data)], h.now, coalesce=coalesce)
            else:
                op = {"shutdown": Op.SHUTDOWN, "credit_request": Op.CREDIT_REQUEST,
                      "credit_update": Op.CREDIT_UPDATE, "response": Op.RESPONSE,
                      "rst": Op.RST, "request": Op.REQUEST}[kind]
                h.manager.handle_tx(
                    HEADER.pack(CID, 2, local, 5000, 0, 1, op, SHUTDOWN_SEND, 65536, 0),
                    [], h.now, coalesce=coalesce)
            if (i + 1) % flush_every == 0:
                h.manager.flush_tx()
        h.manager.flush_tx()
        conns = [h.manager.connection((5000, local)) for local in (1024, 1025)]
        results.append((
            [(bytes(s.outbound), s.closed, s.shut, s.wants) for s in streams],
            [None if c is None else (c.fwd_cnt, c.buffered) for c in conns],
            h.rx_all(),
        ))
    assert results[0] == results[1]


def test_coalesced_rw_packets_go_out_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    stream = h.connect(1024, 5000)
    sends: list[int] = []
    real_send = stream.send

    def counting_send(buffers: Sequence[bytes | bytearray | memoryview]) -> int:
        sends.append(len(buffers))
        return real_send(buffers)

    monkeypatch.setattr(stream, "send", counting_send)
    for i in range(10):
        h.manager.handle_tx(HEADER.pack(CID, 2, 1024, 5000, 1000, 1, Op.RW, 0, 65536, 0),
                            [memoryview(bytes([i]) * 1000)], h.now, coalesce=True)
    assert stream.outbound == b"" and sends == []
    h.manager.flush_tx()
    assert sends == [10] and stream.outbound == b"".join(bytes([i]) * 1000 for i in range(10))
    (update, _), = h.rx_all()
    assert (update.op, update.fwd_cnt) == (Op.CREDIT_UPDATE, 10000)
