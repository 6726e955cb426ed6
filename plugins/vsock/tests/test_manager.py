"""The connection table, sans I/O: every row of facts section 9.6, credit flow, timeouts,
and hypothesis runs of hostile packets and of interleaved traffic on many connections."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost_vsock.protocol import (
    HEADER,
    HEADER_SIZE,
    SHUTDOWN_RECEIVE,
    SHUTDOWN_SEND,
    Op,
)

from .fakestream import FakeStream
from .harness import CID, Harness, ops

# ----------------------------------------------------------------------- validation and rows


@pytest.mark.parametrize("field", [{"src_cid": 4}, {"dst_cid": 0}, {"type_": 2}])
def test_bad_type_or_cid_gets_rst_and_drops_connection(field: dict[str, int]) -> None:
    h = Harness()
    stream = h.connect()
    h.tx(Op.RW, 1024, 5000, b"x", **field)
    (rst, _), = h.rx_all()
    assert (rst.op, rst.src_port, rst.dst_port) == (Op.RST, 5000, 1024)
    assert (rst.buf_alloc, rst.fwd_cnt) == (0, 0)
    assert stream.closed and len(h.manager) == 0


def test_oversized_or_short_rw_is_dropped_without_rst() -> None:
    h = Harness()
    stream = h.connect()
    h.tx(Op.RW, 1024, 5000, b"x" * 65537)
    h.tx(Op.RW, 1024, 5000, b"abc", length=10)
    assert h.rx_all() == [] and stream.outbound == b"" and len(h.manager) == 1
    h.tx(Op.RW, 1024, 5000, b"abcdef", length=3)  # extra bytes are ignored
    assert stream.outbound == b"abc"


def test_short_header_reads_as_zero_filled() -> None:
    h = Harness()
    h.manager.handle_tx(struct.pack("<Q", CID), [], 0.0)
    (rst, _), = h.rx_all()
    assert (rst.op, rst.src_port, rst.dst_port) == (Op.RST, 0, 0)


def test_request_limits_failures_and_duplicates() -> None:
    h = Harness(max_connections=1)
    h.tx(Op.REQUEST, 1, 9999)  # no listener
    assert ops(h.rx_all()) == [Op.RST]
    first = h.connect(1, 5000)
    h.tx(Op.REQUEST, 2, 5000)  # limit reached
    assert [(p.op, p.dst_port) for p, _ in h.rx_all()] == [(Op.RST, 2)]
    h = Harness()
    first = h.connect(1, 5000)
    h.tx(Op.REQUEST, 1, 5000)  # same key again: both sockets dropped, one RST
    assert ops(h.rx_all()) == [Op.RST]
    assert first.closed and h.streams[5000][-1].closed and len(h.manager) == 0


def test_rst_is_never_answered_and_removes() -> None:
    h = Harness()
    stream = h.connect()
    h.tx(Op.RST, 1024, 5000)
    h.tx(Op.RST, 1, 2)
    assert h.rx_all() == [] and stream.closed and len(h.manager) == 0


@pytest.mark.parametrize(
    "op", [Op.RW, Op.SHUTDOWN, Op.CREDIT_UPDATE, Op.CREDIT_REQUEST, Op.RESPONSE]
)
def test_unknown_key_gets_rst(op: Op) -> None:
    h = Harness()
    h.tx(op, 77, 88, b"x" if op == Op.RW else b"")
    (rst, _), = h.rx_all()
    assert (rst.op, rst.src_port, rst.dst_port) == (Op.RST, 88, 77)


@pytest.mark.parametrize("op", [0, 8, 0xFFFF])
def test_unknown_op_gets_rst_and_removes(op: int) -> None:
    h = Harness()
    stream = h.connect()
    h.tx(op, 1024, 5000)
    assert ops(h.rx_all()) == [Op.RST] and stream.closed


def test_response_on_guest_initiated_connection_is_reset() -> None:
    h = Harness()
    h.connect()
    h.tx(Op.RESPONSE, 1024, 5000)
    assert ops(h.rx_all()) == [Op.RST] and len(h.manager) == 0


def test_rw_before_response_delivered_is_reset() -> None:
    h = Harness()
    h.listening.add(5000)
    h.tx(Op.REQUEST, 1024, 5000)
    h.tx(Op.RW, 1024, 5000, b"early")
    assert ops(h.rx_all()) == [Op.RST]


def test_shutdown_on_unconnected_removes_and_resets() -> None:  # UPSTREAM-BUG path 1
    h = Harness()
    h.listening.add(5000)
    h.tx(Op.REQUEST, 1024, 5000)
    h.tx(Op.SHUTDOWN, 1024, 5000, flags=SHUTDOWN_SEND)
    assert ops(h.rx_all()) == [Op.RST] and len(h.manager) == 0


def test_failing_socket_shutdown_removes_and_resets() -> None:  # UPSTREAM-BUG path 2
    h = Harness()
    stream = h.connect()
    stream.fail_shutdown = True
    h.tx(Op.SHUTDOWN, 1024, 5000, flags=SHUTDOWN_RECEIVE)
    assert ops(h.rx_all()) == [Op.RST] and stream.closed


def test_failing_flush_removes_and_resets() -> None:  # UPSTREAM-BUG path 3
    h = Harness()
    stream = h.connect()
    stream.capacity = 2
    h.tx(Op.RW, 1024, 5000, b"hello")
    assert "write" in stream.wants
    stream.fail_send = True
    h.manager.on_writable(stream)
    assert ops(h.rx_all()) == [Op.CREDIT_UPDATE, Op.RST] or ops(h.rx_all()) == []
    assert stream.closed and len(h.manager) == 0


def test_shutdown_flags() -> None:
    h = Harness()
    stream = h.connect()
    h.tx(Op.SHUTDOWN, 1024, 5000, flags=0)
    assert stream.shut == []
    stream.capacity = 3
    h.tx(Op.RW, 1024, 5000, b"buffered")
    h.tx(Op.SHUTDOWN, 1024, 5000, flags=SHUTDOWN_SEND)
    assert stream.shut == []  # deferred until the buffer drains
    h.tx(Op.RW, 1024, 5000, b"late")  # RW after SHUTDOWN(SEND)
    assert ops(h.rx_all())[-1] == Op.RST and len(h.manager) == 0
    h = Harness()
    stream = h.connect()
    stream.capacity = 3
    h.tx(Op.RW, 1024, 5000, b"buffered")
    h.tx(Op.SHUTDOWN, 1024, 5000, flags=SHUTDOWN_SEND)
    stream.drain()
    stream.capacity = 100
    h.manager.on_writable(stream)
    assert stream.shut == [socket.SHUT_WR] and stream.outbound == b"fered"
    h.tx(Op.SHUTDOWN, 1024, 5000, flags=SHUTDOWN_RECEIVE)
    assert stream.shut == [socket.SHUT_WR, socket.SHUT_RD]
    packets = h.rx_all()
    assert ops(packets)[-1] == Op.RST and len(h.manager) == 0


def test_credit_request_always_answered() -> None:
    h = Harness()
    h.connect()
    h.tx(Op.CREDIT_REQUEST, 1024, 5000)
    (upd, _), = h.rx_all()
    assert (upd.op, upd.fwd_cnt, upd.buf_alloc) == (Op.CREDIT_UPDATE, 0, 65536)


def test_credit_update_after_forwarding_and_overrun() -> None:
    h = Harness()
    stream = h.connect()
    h.tx(Op.RW, 1024, 5000, b"abc")
    (upd, _), = h.rx_all()
    assert (upd.op, upd.fwd_cnt) == (Op.CREDIT_UPDATE, 3)
    stream.capacity = 0
    h.tx(Op.RW, 1024, 5000, b"x" * 65536)
    h.tx(Op.RW, 1024, 5000, b"y")  # beyond the advertised buffer: credit violated
    assert ops(h.rx_all()) == [Op.RST] and stream.closed


@pytest.mark.parametrize("size", [4096, 262144])
def test_configured_tx_buffer_size_sets_buf_alloc_buffer_and_rw_limit(size: int) -> None:
    h = Harness(tx_buffer_size=size)
    h.listening.add(5000)
    h.tx(Op.REQUEST, 1024, 5000)
    (resp, _), = h.rx_all()
    assert (resp.op, resp.buf_alloc) == (Op.RESPONSE, size)
    stream = h.streams[5000][-1]
    h.tx(Op.RW, 1024, 5000, b"x" * (size + 1))  # longer than the configured limit: dropped
    assert h.rx_all() == [] and stream.outbound == b"" and len(h.manager) == 1
    stream.capacity = 0
    h.tx(Op.RW, 1024, 5000, b"x" * size)  # exactly the advertised window: buffered
    conn = h.manager.connection((5000, 1024))
    assert h.rx_all() == [] and conn is not None and conn.buffered == size
    stream.capacity = 1 << 30
    h.manager.on_writable(stream)
    (upd, _), = h.rx_all()
    assert (upd.op, upd.fwd_cnt, upd.buf_alloc) == (Op.CREDIT_UPDATE, size, size)
    assert stream.outbound == b"x" * size
    stream.capacity = 0
    h.tx(Op.RW, 1024, 5000, b"y" * size)
    h.tx(Op.RW, 1024, 5000, b"z")  # beyond the configured window: credit violated
    assert ops(h.rx_all()) == [Op.RST] and stream.closed


def test_large_tx_buffer_stays_unallocated_on_idle_connections() -> None:
    import tracemalloc

    h = Harness(tx_buffer_size=16 << 20)
    h.listening.add(5000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for local in range(1024):
            h.tx(Op.REQUEST, local, 5000)
            h.rx_all()  # RESPONSE (and the previous connection's CREDIT_UPDATE)
            h.tx(Op.RW, local, 5000, b"hello")
        assert len(h.manager) == 1024
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown / 1024 < 8192, grown
    assert all(s.outbound == b"hello" for s in h.streams[5000])


def test_host_data_respects_credit_and_requests_once() -> None:
    h = Harness()
    h.listening.add(5000)
    h.tx(Op.REQUEST, 1024, 5000, buf_alloc=10)
    h.rx()
    stream = h.streams[5000][0]
    stream.inbound += b"0123456789abcdef"
    packets = h.rx_all()
    assert ops(packets) == [Op.RW, Op.CREDIT_REQUEST]
    assert packets[0][1] == b"0123456789"
    h.tx(Op.CREDIT_UPDATE, 1024, 5000, buf_alloc=10, fwd_cnt=0)  # still no credit
    assert ops(h.rx_all()) == [Op.CREDIT_REQUEST]
    h.tx(Op.CREDIT_UPDATE, 1024, 5000, buf_alloc=10, fwd_cnt=4)
    packets = h.rx_all()
    assert [(p.op, d) for p, d in packets] == [(Op.RW, b"abcd"), (Op.CREDIT_REQUEST, b"")]


def test_priority_response_then_credit_update_then_data() -> None:
    h = Harness()
    h.listening.add(5000)
    h.tx(Op.REQUEST, 1024, 5000)
    stream = h.streams[5000][0]
    stream.inbound += b"data"
    assert ops(h.rx_all()) == [Op.RESPONSE, Op.RW]
    stream.inbound += b"more"
    h.manager.on_readable(stream)
    h.tx(Op.RW, 1024, 5000, b"guest")
    assert ops(h.rx_all()) == [Op.CREDIT_UPDATE, Op.RW]


def test_tiny_rx_buffers_are_handed_back_empty() -> None:
    h = Harness()
    stream = h.connect()
    stream.inbound += b"data"
    # No room for data: the buffer is handed back empty, the connection lives on.
    assert h.manager.produce_rx(memoryview(bytearray(HEADER_SIZE)), 0.0) == 0
    assert not stream.closed
    h.tx(Op.CREDIT_REQUEST, 1024, 5000)
    assert h.manager.produce_rx(memoryview(bytearray(HEADER_SIZE)), 0.0) == HEADER_SIZE
    # No room for a header: handed back empty before anything is built; nothing is lost.
    assert h.manager.produce_rx(memoryview(bytearray(10)), 0.0) == 0
    assert not stream.closed
    assert [(p.op, d) for p, d in h.rx_all()] == [(Op.RW, b"data")]


def test_host_eof_shutdown_and_graceful_timeout() -> None:
    h = Harness()
    stream = h.connect()
    stream.host_eof = True
    (sd, _), = h.rx_all()
    assert (sd.op, sd.flags) == (Op.SHUTDOWN, SHUTDOWN_SEND) and "close" in stream.wants
    h.now = 100.0
    assert h.rx_all() == []  # no timer before the socket is fully closed
    stream.fully_closed = True
    h.manager.on_closed(stream, h.now)
    assert h.manager.next_deadline() == 102.0
    h.now = 101.9
    assert h.rx_all() == []
    h.now = 102.0
    assert ops(h.rx_all()) == [Op.RST] and len(h.manager) == 0


def test_eof_on_fully_closed_socket_sets_receive_flag() -> None:
    h = Harness()
    stream = h.connect()
    stream.host_eof = stream.fully_closed = True
    (sd, _), = h.rx_all()
    assert sd.flags == SHUTDOWN_SEND | SHUTDOWN_RECEIVE
    assert h.manager.next_deadline() == 2.0


def test_host_initiated_connect_ok_and_timeouts() -> None:
    h = Harness()
    stream = FakeStream(b"connect 80")
    assert h.manager.accept_host(stream, 0.0)
    assert h.rx_all() == [] and "read" in stream.wants  # incomplete line
    stream.inbound += b"80\nearly data"
    h.manager.on_readable(stream)
    (req, _), = h.rx_all()
    assert (req.op, req.src_port, req.dst_port) == (Op.REQUEST, 0x4000_0000, 8080)
    assert stream.inbound == b"early data"  # nothing after the newline was consumed
    h.tx(Op.RESPONSE, 8080, 0x4000_0000, buf_alloc=65536)
    assert stream.outbound == b"OK 1073741824\n"
    (rw, data), = h.rx_all()
    assert (rw.op, data) == (Op.RW, b"early data")
    h.now = 50.0
    assert len(h.manager) == 1 and h.rx_all() == []  # deadline cleared by RESPONSE
    # A host connection that never sends CONNECT is closed silently after 2 s.
    quiet = FakeStream()
    h.manager.accept_host(quiet, 50.0)
    h.now = 52.0
    assert h.rx_all() == [] and quiet.closed
    # One whose guest never answers gets RST after 2 s, and its port is freed.
    slow = FakeStream(b"CONNECT 9\n")
    h.manager.accept_host(slow, 52.0)
    (req, _), = h.rx_all()
    h.now = 54.5
    (rst, _), = h.rx_all()
    assert (rst.op, rst.src_port) == (Op.RST, req.src_port) and slow.closed


@pytest.mark.parametrize("line", [b"CONNECT x\n", b"HELLO 5\n", b"CONNECT " + b"1" * 40,
                                  b"CONNECT ee59b4bf-0000-0000-0000-000000000000\n"])
def test_bad_connect_lines_close_silently(line: bytes) -> None:
    h = Harness()
    stream = FakeStream(line)
    h.manager.accept_host(stream, 0.0)
    assert h.rx_all() == [] and stream.closed and len(h.manager) == 0


def test_accept_limit_and_port_reuse() -> None:
    h = Harness(max_connections=1)
    first = FakeStream(b"CONNECT 1\n")
    assert h.manager.accept_host(first, 0.0)
    second = FakeStream()
    assert not h.manager.accept_host(second, 0.0)
    assert second.closed
    (req, _), = h.rx_all()
    h.tx(Op.RST, 1, req.src_port)
    third = FakeStream(b"CONNECT 1\n")
    h.manager.accept_host(third, 0.0)
    (req2, _), = h.rx_all()
    assert req2.src_port == 0x4000_0001


# ----------------------------------------------------------------------- hypothesis

_headers = st.builds(
    HEADER.pack,
    st.sampled_from([CID, 0, 2, 2**64 - 1]), st.sampled_from([2, CID, 0]),
    st.sampled_from([1024, 5000, 0x4000_0000, 0]), st.sampled_from([5000, 1024, 0x4000_0000, 9]),
    st.integers(0, 70000), st.sampled_from([1, 2, 0]), st.integers(0, 9),
    st.integers(0, 3), st.sampled_from([0, 1, 65536, 2**32 - 1]), st.integers(0, 2**32 - 1),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(_headers, st.binary(max_size=60)),
                          st.lists(st.binary(max_size=300), max_size=3),
                          st.sampled_from([0, 10, 44, 45, 200, 5000])), max_size=25))
def test_hostile_tx_packets_never_crash(packets: list[tuple[bytes, list[bytes], int]]) -> None:
    h = Harness()
    h.listening.update({5000, 1024})
    for header, payload, rx_size in packets:
        h.manager.handle_tx(header, [memoryview(p) for p in payload], h.now)
        for stream in [s for ss in h.streams.values() for s in ss]:
            stream.inbound += b"z"
        buf = memoryview(bytearray(rx_size))
        n = h.manager.produce_rx(buf, h.now)
        assert n is None or n == 0 or n >= HEADER_SIZE
        h.now += 0.5
    assert len(h.manager) <= 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60))
def test_arbitrary_connect_lines_never_crash(line: bytes) -> None:
    h = Harness()
    stream = FakeStream(line)
    stream.host_eof = True
    h.manager.accept_host(stream, 0.0)
    packets = h.rx_all()
    while not packets and "read" in stream.wants and not stream.closed:
        stream.wants.clear()  # the relay reports the end of stream as readable
        h.manager.on_readable(stream)
        packets = h.rx_all()
    assert ops(packets) in ([], [Op.REQUEST])
    assert stream.closed == (packets == [])


class GuestModel:
    """The guest's half of one connection in the interleaving test."""

    def __init__(self, local: int, peer: int, stream: FakeStream) -> None:
        self.local, self.peer, self.stream = local, peer, stream
        self.to_host = b""  # everything the guest will send
        self.sent = 0
        self.to_guest = b""  # everything the host will write
        self.host_written = 0
        self.received = bytearray()
        self.dev_buf_alloc, self.dev_fwd_cnt = 65536, 0
        self.told = 0


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.binary(min_size=0, max_size=3000), st.binary(min_size=0, max_size=3000)),
             min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(1, 5000)), max_size=120),
    st.integers(2000, 20000),
)
def test_interleaved_traffic_delivers_every_byte_in_order(
    data: list[tuple[bytes, bytes]], steps: list[tuple[int, int, int]], guest_buf: int
) -> None:
    h = Harness()
    conns: list[GuestModel] = []
    for i, (up, down) in enumerate(data):
        port = 6000 + i
        h.listening.add(port)
        h.tx(Op.REQUEST, 100 + i, port, buf_alloc=guest_buf)
        response = h.rx()
        assert response is not None and response[0].op == Op.RESPONSE
        stream = h.streams[port][0]
        stream.capacity = 1500  # the host socket back-pressures
        model = GuestModel(100 + i, port, stream)
        model.to_host, model.to_guest = up * 20, down * 20
        conns.append(model)
    by_key = {(c.local, c.peer): c for c in conns}
    host_got = {c.local: bytearray() for c in conns}

    def rx_once(size: int) -> bool:
        got = h.rx(HEADER_SIZE + size)
        if got is None:
            return False
        hd, payload = got
        c = by_key[(hd.dst_port, hd.src_port)]
        assert hd.op != Op.RST, "no connection may be reset"
        c.dev_buf_alloc, c.dev_fwd_cnt = hd.buf_alloc, hd.fwd_cnt
        if hd.op == Op.RW:
            c.received += payload
            assert len(c.received) - c.told <= guest_buf, "device exceeded the guest's credit"
        elif hd.op == Op.CREDIT_REQUEST:
            c.told = len(c.received)
            h.tx(Op.CREDIT_UPDATE, c.local, c.peer, buf_alloc=guest_buf, fwd_cnt=c.told)
        return True

    def guest_send(c: GuestModel, n: int) -> None:
        credit = c.dev_buf_alloc - (c.sent - c.dev_fwd_cnt)
        n = min(n, credit, len(c.to_host) - c.sent)
        if n > 0:
            h.tx(Op.RW, c.local, c.peer, c.to_host[c.sent : c.sent + n])
            c.sent += n

    def host_step(c: GuestModel, n: int) -> None:
        host_got[c.local] += c.stream.drain(n)
        h.manager.on_writable(c.stream)
        chunk = c.to_guest[c.host_written : c.host_written + n]
        if chunk:
            c.stream.inbound += chunk
            c.host_written += len(chunk)
            h.manager.on_readable(c.stream)

    for kind, which, n in steps:
        c = conns[which % len(conns)]
        if kind == 0:
            guest_send(c, n)
        elif kind in (1, 2):
            host_step(c, n)
        elif kind == 3:
            rx_once(n)
        elif kind == 4:
            c.told = len(c.received)
            h.tx(Op.CREDIT_UPDATE, c.local, c.peer, buf_alloc=guest_buf, fwd_cnt=c.told)
        else:
            rx_once(n)
            rx_once(n)
    # Drain: everything must arrive within a bounded number of rounds (no hang).
    for _ in range(5000):
        progressed = False
        for c in conns:
            before = (c.sent, len(c.received), len(host_got[c.local]), c.host_written)
            guest_send(c, 65536)
            host_step(c, 65536)
            while rx_once(4096):
                pass
            if len(c.received) - c.told >= guest_buf // 2:
                c.told = len(c.received)
                h.tx(Op.CREDIT_UPDATE, c.local, c.peer, buf_alloc=guest_buf, fwd_cnt=c.told)
            progressed |= before != (c.sent, len(c.received), len(host_got[c.local]),
                                     c.host_written)
        if all(bytes(host_got[c.local]) == c.to_host and bytes(c.received) == c.to_guest
               for c in conns):
            break
        if not progressed:
            for c in conns:  # a guest that never tells its credit must be asked for it
                c.told = len(c.received)
                h.tx(Op.CREDIT_UPDATE, c.local, c.peer, buf_alloc=guest_buf, fwd_cnt=c.told)
    for c in conns:
        assert bytes(host_got[c.local]) == c.to_host
        assert bytes(c.received) == c.to_guest
    assert len(h.manager) == len(conns)


# ----------------------------------------------------------------------- credit never wraps


def test_a_window_shrunk_below_what_is_in_flight_gives_no_data_until_credit_returns() -> None:
    h = Harness()
    stream = h.connect()
    stream.inbound += b"a" * 8192
    h.manager.on_readable(stream)
    assert sum(len(d) for p, d in h.rx_all() if p.op == Op.RW) == 8192
    # The guest shrinks its window to 4096 with nothing consumed: 8192 in flight, no credit
    # (modulo 2**32 it would be 2**32 - 4096).
    h.tx(Op.CREDIT_UPDATE, 1024, 5000, buf_alloc=4096, fwd_cnt=0)
    stream.inbound += b"b" * 65536
    h.manager.on_readable(stream)
    assert [p.op for p, _ in h.rx_all()] == [Op.CREDIT_REQUEST]
    h.tx(Op.CREDIT_UPDATE, 1024, 5000, buf_alloc=4096, fwd_cnt=4096)  # still 4096 in flight
    assert [p.op for p, _ in h.rx_all() if p.op == Op.RW] == []
    h.tx(Op.CREDIT_UPDATE, 1024, 5000, buf_alloc=4096, fwd_cnt=7000)  # 1192 in flight
    packets = h.rx_all()
    assert [(p.op, len(d)) for p, d in packets] == [(Op.RW, 2904), (Op.CREDIT_REQUEST, 0)]


_U32 = 0xFFFF_FFFF

credit_steps = st.lists(
    st.one_of(
        st.tuples(st.just("host"), st.integers(1, 20000)),
        st.tuples(st.just("rx"), st.integers(HEADER_SIZE, HEADER_SIZE + 9000)),
        # The guest reports its window and how much of what it was sent it consumed...
        st.tuples(st.just("update"), st.integers(0, _U32), st.integers(0, 1 << 20)),
        # ... or a fwd_cnt of its own choosing (hostile: ahead of what it was sent).
        st.tuples(st.just("hostile"), st.integers(0, _U32), st.integers(0, _U32)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(credit_steps)
def test_data_to_the_guest_never_exceeds_its_credit(steps: list[tuple[int | str, ...]]) -> None:
    """Over any sequence of credit updates, host data and rx buffers, the RW bytes sent since the
    guest's last update never exceed max(0, buf_alloc - (sent - fwd_cnt)) at that update, with
    the in-flight count taken modulo 2**32 and the difference *not* wrapped (as Linux)."""
    h = Harness()
    stream = h.connect()
    sent = 0  # RW bytes the guest got (u32 counter, as the device's tx_cnt)
    allowed = 65536  # the credit at the guest's last update (REQUEST: buf_alloc 65536, fwd 0)
    since = 0  # RW bytes since that update
    for step in steps:
        if step[0] == "host":
            stream.inbound += b"h" * int(step[1])
            h.manager.on_readable(stream)
        elif step[0] == "rx":
            size = int(step[1])
            # A header-only buffer may be handed back empty (data waits for a bigger one).
            packet = h.rx(size) if size > HEADER_SIZE or not stream.inbound else None
            if packet is not None and packet[0].op == Op.RW:
                since += len(packet[1])
                sent = (sent + len(packet[1])) & _U32
                assert since <= allowed, (since, allowed)
        else:
            buf_alloc = int(step[1])
            # "update": fwd_cnt at most what it got (step[2] bytes of it still unread).
            unread = min(int(step[2]), sent)
            fwd = (sent - unread) & _U32 if step[0] == "update" else int(step[2])
            h.tx(Op.CREDIT_UPDATE, 1024, 5000, buf_alloc=buf_alloc, fwd_cnt=fwd)
            allowed = max(0, buf_alloc - ((sent - fwd) & _U32))
            since = 0
    # Liveness: with credit left and data queued, the next buffers carry data.
    stream.inbound += b"z"
    h.manager.on_readable(stream)
    got = [p for p in (h.rx(HEADER_SIZE + 4096) for _ in range(4)) if p is not None]
    rw = sum(len(d) for p, d in got if p.op == Op.RW)
    if allowed - since > 0:
        assert rw > 0
    else:
        assert rw == 0


# ----------------------------------------------------------------------- after a worker restart


def test_known_connections_follow_the_table_and_its_generation() -> None:
    h = Harness()
    assert h.manager.known_connections() == [] and h.manager.table_generation == 0
    h.connect(1024, 5000)
    h.connect(1025, 5000)
    assert sorted(h.manager.known_connections()) == [(5000, 1024, 1), (5000, 1025, 1)]
    moved = h.manager.table_generation
    assert moved >= 2
    h.tx(Op.RST, 1024, 5000)
    assert h.manager.known_connections() == [(5000, 1025, 1)]
    assert h.manager.table_generation > moved
    h.manager.close_all()
    assert h.manager.known_connections() == []


def test_reset_stale_sends_rst_for_each_connection_first() -> None:
    h = Harness()
    live = h.connect(1024, 5000)
    h.manager.on_readable(live)
    live.inbound += b"data for the live one"
    count = h.manager.reset_stale([(5000, 1024, 1), (2000, 6000, 1), (3000, 7000, 2), (1, 2, 9)])
    assert count == 2  # the live connection and an unknown socket type are skipped
    packets = h.rx_all()
    assert [(p.op, p.src_port, p.dst_port, p.type, p.buf_alloc) for p, _ in packets[:2]] == [
        (Op.RST, 2000, 6000, 1, 0), (Op.RST, 3000, 7000, 2, 0)]
    assert len(h.manager) == 1 and not live.closed


def test_owed_rsts_are_bounded_while_the_guest_posts_no_rx_buffers() -> None:
    from devicehost_vsock.owedrsts import MAX_OWED_RSTS

    h = Harness()
    h.manager.reset_stale([(4000, 4001, 1)])  # owed first: survives the flood
    for port in range(MAX_OWED_RSTS + 500):  # each packet to an unknown key owes an RST
        h.tx(Op.RW, 10_000 + port, 7, b"x")
    assert len(h.manager._rsts) == MAX_OWED_RSTS
    assert h.manager._rsts.dropped == 501
    packets = h.rx_all()
    assert len(packets) == MAX_OWED_RSTS and all(p.op == Op.RST for p, _ in packets)
    assert (packets[0][0].src_port, packets[0][0].dst_port) == (4000, 4001)
    h.tx(Op.RW, 99, 7, b"x")  # room again: the next one is answered
    assert [(p.op, p.src_port) for p, _ in h.rx_all()] == [(Op.RST, 7)]
