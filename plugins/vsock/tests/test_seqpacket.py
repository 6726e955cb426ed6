"""SEQPACKET in the connection table, sans I/O: types and their RSTs, message boundaries both
ways over any split into packets and rx buffers, credit, limits, the host-initiated CONNECT
message, and hypothesis runs of interleaved messages and of hostile packets."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost_vsock.protocol import (
    HEADER,
    HEADER_SIZE,
    SEQ_EOM,
    SEQ_EOR,
    SHUTDOWN_SEND,
    TYPE_SEQPACKET,
    TYPE_STREAM,
    Header,
    Op,
)

from .fakestream import FakeStream
from .harness import CID, Harness, ops

SEQ = TYPE_SEQPACKET


def seq_harness(**kwargs: object) -> Harness:
    h = Harness(seqpacket=True, **kwargs)  # type: ignore[arg-type]
    return h


def seq_connect(h: Harness, local: int = 1024, port: int = 5000) -> FakeStream:
    h.listening.add(port)
    h.listening_type[port] = SEQ
    h.tx(Op.REQUEST, local, port, type_=SEQ)
    packet = h.rx()
    assert packet is not None
    assert (packet[0].op, packet[0].type) == (Op.RESPONSE, SEQ)
    return h.streams[port][-1]


def rw(h: Harness, data: bytes, flags: int, local: int = 1024, port: int = 5000) -> None:
    h.tx(Op.RW, local, port, data, type_=SEQ, flags=flags)


# ----------------------------------------------------------------------- types and their RSTs


def test_type_mismatch_with_the_host_listener_gets_rst_of_the_requested_type() -> None:
    h = seq_harness()
    h.listening.update({5000, 5001})
    h.listening_type[5001] = SEQ
    h.tx(Op.REQUEST, 1024, 5000, type_=SEQ)  # the host listener at 5000 is a stream one
    h.tx(Op.REQUEST, 1025, 5001)  # the one at 5001 is a SEQPACKET one
    assert [(p.op, p.type, p.dst_port) for p, _ in h.rx_all()] == [
        (Op.RST, SEQ, 1024), (Op.RST, TYPE_STREAM, 1025)]
    assert len(h.manager) == 0


def test_a_type_not_negotiated_gets_rst() -> None:
    h = Harness()  # SEQPACKET not negotiated
    h.listening.add(5000)
    h.listening_type[5000] = SEQ
    h.tx(Op.REQUEST, 1024, 5000, type_=SEQ)
    assert [(p.op, p.type) for p, _ in h.rx_all()] == [(Op.RST, SEQ)]
    assert h.streams == {}  # never connected to the host
    only_seq = Harness(stream=False, seqpacket=True)  # NO_IMPLIED_STREAM without STREAM
    only_seq.listening.add(5000)
    only_seq.tx(Op.REQUEST, 1024, 5000)
    assert [(p.op, p.type) for p, _ in only_seq.rx_all()] == [(Op.RST, TYPE_STREAM)]
    # A host SEQPACKET connection is refused when the driver did not negotiate SEQPACKET: its
    # CONNECT message is read, then the socket closed without OK (as when no guest listens).
    stream = FakeStream()
    stream.messages_in.append(b"CONNECT 5\n")
    assert h.manager.accept_host(stream, 0.0, SEQ)
    assert h.rx_all() == [] and stream.closed and stream.messages_in == []
    assert stream.messages_out == [] and len(h.manager) == 0


def test_a_packet_of_the_other_type_resets_the_connection_with_its_own_type() -> None:
    h = seq_harness()
    stream = seq_connect(h)
    h.tx(Op.RW, 1024, 5000, b"stream bytes")  # type STREAM on a SEQPACKET connection
    assert [(p.op, p.type) for p, _ in h.rx_all()] == [(Op.RST, SEQ)]
    assert stream.closed and stream.messages_out == [] and len(h.manager) == 0


def test_device_packets_carry_the_connection_type() -> None:
    h = seq_harness()
    stream = seq_connect(h)
    rw(h, b"m", SEQ_EOM)
    h.tx(Op.CREDIT_REQUEST, 1024, 5000, type_=SEQ)
    stream.host_eof = True
    h.manager.on_readable(stream)
    packets = h.rx_all()
    assert ops(packets) == [Op.CREDIT_UPDATE, Op.SHUTDOWN]
    assert {p.type for p, _ in packets} == {SEQ}


# ----------------------------------------------------------------------- guest -> host


def test_guest_messages_reach_the_host_whole_over_any_split() -> None:
    h = seq_harness()
    stream = seq_connect(h)
    rw(h, b"hel", 0)
    rw(h, b"", 0)
    rw(h, b"lo", SEQ_EOM)
    rw(h, b"", SEQ_EOM)  # an empty message
    rw(h, b"x", SEQ_EOM | SEQ_EOR)  # EOR has no Unix counterpart: the boundary is kept
    assert stream.messages_out == [b"hello", b"", b"x"]
    (upd, _), = h.rx_all()
    assert (upd.op, upd.fwd_cnt, upd.type) == (Op.CREDIT_UPDATE, 6, SEQ)


def test_guest_messages_wait_in_order_while_the_host_socket_is_full() -> None:
    h = seq_harness()
    stream = seq_connect(h)
    stream.message_capacity = 0
    rw(h, b"one", SEQ_EOM)
    rw(h, b"tw", 0)
    rw(h, b"o", SEQ_EOM)
    rw(h, b"thr", 0)  # the start of a third, not complete yet
    assert stream.messages_out == [] and "write" in stream.wants
    assert h.rx_all() == []  # nothing forwarded: fwd_cnt unchanged
    stream.message_capacity = 1
    h.manager.on_writable(stream)
    assert stream.messages_out == [b"one"]
    stream.message_capacity = 10
    h.manager.on_writable(stream)
    assert stream.messages_out == [b"one", b"two"]
    (upd, _), = h.rx_all()
    assert upd.fwd_cnt == 6  # "thr" is not forwarded until its message is complete
    rw(h, b"ee", SEQ_EOM)
    assert stream.messages_out == [b"one", b"two", b"three"]


def test_a_message_left_unfinished_by_shutdown_is_not_delivered() -> None:
    h = seq_harness()
    stream = seq_connect(h)
    rw(h, b"whole", SEQ_EOM)
    rw(h, b"half of a mess", 0)
    h.tx(Op.SHUTDOWN, 1024, 5000, type_=SEQ, flags=SHUTDOWN_SEND)
    assert stream.messages_out == [b"whole"]
    assert stream.shut == [socket.SHUT_WR]  # the host sees the end, not half a message


def test_a_guest_message_beyond_its_credit_is_reset() -> None:
    h = seq_harness(tx_buffer_size=4096)
    stream = seq_connect(h)
    rw(h, b"a" * 4096, 0)
    rw(h, b"b", SEQ_EOM)  # 4097 bytes in flight on a 4096-byte window
    assert ops(h.rx_all()) == [Op.RST] and stream.closed and stream.messages_out == []


def test_the_largest_guest_message_is_the_advertised_window() -> None:
    h = seq_harness(tx_buffer_size=4096)
    stream = seq_connect(h)
    stream.message_capacity = 0
    for i in range(4):
        rw(h, bytes([i]) * 1024, SEQ_EOM if i == 3 else 0)
    stream.message_capacity = 1
    h.manager.on_writable(stream)
    assert stream.messages_out == [b"".join(bytes([i]) * 1024 for i in range(4))]


# ----------------------------------------------------------------------- host -> guest


def rx_messages(h: Harness, size: int = HEADER_SIZE + 4096) -> list[tuple[Header, bytes]]:
    out = []
    while (packet := h.rx(size)) is not None:
        out.append(packet)
    return out


def test_host_messages_reach_the_guest_with_eom_on_the_last_piece() -> None:
    h = seq_harness()
    stream = seq_connect(h)
    stream.messages_in += [b"", b"a", b"b" * 100, b"c" * 4096, b"d" * 4097, b"e" * 10000]
    h.manager.on_readable(stream)
    packets = rx_messages(h)
    assert all(p.op == Op.RW and p.type == SEQ for p, _ in packets)
    assert [(len(d), p.flags) for p, d in packets] == [
        (0, SEQ_EOM), (1, SEQ_EOM), (100, SEQ_EOM), (4096, SEQ_EOM),
        (4096, 0), (1, SEQ_EOM), (4096, 0), (4096, 0), (1808, SEQ_EOM),
    ]
    assert b"".join(d for _, d in packets) == b"ab" + b"b" * 99 + b"c" * 4096 + b"d" * 4097 + (
        b"e" * 10000)


def test_an_empty_host_message_fits_a_header_only_buffer() -> None:
    h = seq_harness()
    stream = seq_connect(h)
    stream.messages_in += [b"", b"data"]
    h.manager.on_readable(stream)
    buf = memoryview(bytearray(HEADER_SIZE))
    assert h.manager.produce_rx(buf, 0.0) == HEADER_SIZE
    header = HEADER.unpack(buf)
    assert (header[6], header[4], header[7]) == (Op.RW, 0, SEQ_EOM)
    # The next message has data and this buffer no room: handed back empty (data waits).
    assert h.manager.produce_rx(memoryview(bytearray(HEADER_SIZE)), 0.0) == 0
    (packet, data), = rx_messages(h)
    assert (data, packet.flags) == (b"data", SEQ_EOM)


def test_a_host_message_beyond_the_credit_goes_in_pieces_as_credit_returns() -> None:
    h = seq_harness()
    h.listening.add(5000)
    h.listening_type[5000] = SEQ
    h.tx(Op.REQUEST, 1024, 5000, type_=SEQ, buf_alloc=3000)
    h.rx()
    stream = h.streams[5000][-1]
    stream.messages_in.append(bytes(range(256)) * 10)  # 2560 bytes
    stream.messages_in.append(b"next")
    h.manager.on_readable(stream)
    h.tx(Op.CREDIT_UPDATE, 1024, 5000, type_=SEQ, buf_alloc=3000, fwd_cnt=0)
    packets = rx_messages(h, HEADER_SIZE + 1000)
    assert [(p.op, len(d), p.flags) for p, d in packets] == [
        (Op.RW, 1000, 0), (Op.RW, 1000, 0), (Op.RW, 560, SEQ_EOM), (Op.RW, 4, SEQ_EOM)]
    # The guest shrinks its window to 1000 with nothing read: 2564 in flight, no credit.
    stream.messages_in.append(b"x" * 900)
    h.manager.on_readable(stream)
    h.tx(Op.CREDIT_UPDATE, 1024, 5000, type_=SEQ, buf_alloc=1000, fwd_cnt=0)
    assert ops(rx_messages(h)) == [Op.CREDIT_REQUEST]
    h.tx(Op.CREDIT_UPDATE, 1024, 5000, type_=SEQ, buf_alloc=1000, fwd_cnt=2164)  # 600 free
    packets = rx_messages(h)
    assert [(p.op, len(d), p.flags) for p, d in packets] == [
        (Op.RW, 600, 0), (Op.CREDIT_REQUEST, 0, 0)]
    h.tx(Op.CREDIT_UPDATE, 1024, 5000, type_=SEQ, buf_alloc=1000, fwd_cnt=2564)
    (last, data), = rx_messages(h)
    assert (len(data), last.flags) == (300, SEQ_EOM)


@pytest.mark.parametrize(("buf_alloc", "tx_buffer_size"), [(1000, 65536), (1 << 20, 4096)])
def test_a_host_message_the_guest_could_never_hold_resets_the_connection(
    buf_alloc: int, tx_buffer_size: int
) -> None:
    """Linux refuses such a send with EMSGSIZE; the host's send already succeeded, so the
    connection is reset (the host sees it closed, the guest gets RST)."""
    h = seq_harness(tx_buffer_size=tx_buffer_size)
    h.listening.add(5000)
    h.listening_type[5000] = SEQ
    h.tx(Op.REQUEST, 1024, 5000, type_=SEQ, buf_alloc=buf_alloc)
    h.rx()
    stream = h.streams[5000][-1]
    limit = min(buf_alloc, tx_buffer_size)
    stream.messages_in += [b"k" * limit, b"k" * (limit + 1)]
    h.manager.on_readable(stream)
    packets = rx_messages(h, HEADER_SIZE + 1 << 20)
    assert [(p.op, len(d), p.flags) for p, d in packets] == [
        (Op.RW, limit, SEQ_EOM), (Op.RST, 0, 0)]
    assert stream.closed and len(h.manager) == 0


# ----------------------------------------------------------------------- host-initiated


def test_host_initiated_seqpacket_connect_message_and_ok_message() -> None:
    h = seq_harness()
    stream = FakeStream()
    assert h.manager.accept_host(stream, 0.0, SEQ)
    assert h.rx_all() == [] and "read" in stream.wants
    stream.messages_in += [b"CONNECT 8080\n", b"early message"]
    h.manager.on_readable(stream)
    (req, _), = h.rx_all()
    assert (req.op, req.type, req.src_port, req.dst_port) == (Op.REQUEST, SEQ, 0x4000_0000, 8080)
    assert stream.messages_in == [b"early message"]
    h.tx(Op.RESPONSE, 8080, 0x4000_0000, type_=SEQ)
    assert stream.messages_out == [b"OK 1073741824\n"]
    (msg, data), = h.rx_all()
    assert (msg.op, data, msg.flags) == (Op.RW, b"early message", SEQ_EOM)
    h.tx(Op.RW, 8080, 0x4000_0000, b"reply", type_=SEQ, flags=SEQ_EOM)
    assert stream.messages_out == [b"OK 1073741824\n", b"reply"]


@pytest.mark.parametrize("message", [b"CONNECT 1", b"", b"CONNECT 1\nmore", b"C" * 46,
                                     b"CONNECT x\n"])
def test_bad_connect_messages_close_silently(message: bytes) -> None:
    h = seq_harness()
    stream = FakeStream()
    stream.messages_in.append(message)
    h.manager.accept_host(stream, 0.0, SEQ)
    assert h.rx_all() == [] and stream.closed and len(h.manager) == 0


def test_host_seqpacket_connect_to_a_guest_stream_port_is_refused_by_the_guest() -> None:
    h = seq_harness()
    stream = FakeStream()
    stream.messages_in.append(b"CONNECT 80\n")
    h.manager.accept_host(stream, 0.0, SEQ)
    (req, _), = h.rx_all()
    # A Linux guest whose listener on 80 is a stream socket answers RST of the request's type.
    h.tx(Op.RST, 80, req.src_port, type_=SEQ)
    assert stream.closed and stream.messages_out == [] and len(h.manager) == 0


# ----------------------------------------------------------------------- hypothesis

_message = st.binary(max_size=5000)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), _message, st.integers(1, 3000)), max_size=12),
    st.lists(st.tuples(st.integers(0, 2), _message), max_size=12),
    st.lists(st.integers(1, 3000), min_size=1, max_size=8),
)
def test_interleaved_messages_keep_their_boundaries_both_ways(
    guest_messages: list[tuple[int, bytes, int]],
    host_messages: list[tuple[int, bytes]],
    rx_sizes: list[int],
) -> None:
    """Three connections; the guest sends each message split into packets of a chosen size, the
    packets of different connections interleaved; the host's messages come back through rx
    buffers of changing sizes. Both sides see exactly their messages, in order."""
    h = seq_harness()
    streams = [seq_connect(h, 1024 + i, 5000) for i in range(3)]
    queues: list[list[bytes]] = [[] for _ in range(3)]
    for conn, message, _ in guest_messages:
        queues[conn].append(message)
    # Interleave packet by packet: round robin over the connections' packet lists.
    packet_lists: list[list[tuple[bytes, int]]] = []
    for conn in range(3):
        packets: list[tuple[bytes, int]] = []
        for c, message, piece in guest_messages:
            if c != conn:
                continue
            chunks = [message[i : i + piece] for i in range(0, len(message), piece)] or [b""]
            packets += [(chunk, SEQ_EOM if j == len(chunks) - 1 else 0)
                        for j, chunk in enumerate(chunks)]
        packet_lists.append(packets)
    while any(packet_lists):
        for conn in range(3):
            if packet_lists[conn]:
                data, flags = packet_lists[conn].pop(0)
                rw(h, data, flags, local=1024 + conn)
    for conn in range(3):
        assert streams[conn].messages_out == queues[conn]
    # Host -> guest.
    expected: list[list[bytes]] = [[] for _ in range(3)]
    for conn, message in host_messages:
        streams[conn].messages_in.append(message)
        expected[conn].append(message)
    for stream in streams:
        h.manager.on_readable(stream)
    got: list[list[bytes]] = [[] for _ in range(3)]
    partial = [bytearray() for _ in range(3)]
    idle = 0
    turn = 0
    while idle < len(rx_sizes) + 2:
        size = HEADER_SIZE + rx_sizes[turn % len(rx_sizes)]
        turn += 1
        buf = memoryview(bytearray(size))
        n = h.manager.produce_rx(buf, 0.0)
        if not n:
            idle += 1
            continue
        idle = 0
        fields = HEADER.unpack_from(buf)
        if fields[6] == Op.RW:
            conn = fields[3] - 1024
            partial[conn] += buf[HEADER_SIZE:n]
            if fields[7] & SEQ_EOM:
                got[conn].append(bytes(partial[conn]))
                partial[conn].clear()
            # The guest reads at once and tells its fwd_cnt: credit stays open.
            h.tx(Op.CREDIT_UPDATE, 1024 + conn, 5000, type_=SEQ,
                 fwd_cnt=h.manager.connection((5000, 1024 + conn)).tx_cnt)  # type: ignore[union-attr]
    assert got == expected and all(not p for p in partial)


_headers = st.builds(
    HEADER.pack,
    st.sampled_from([CID, 2]), st.sampled_from([2, CID]),
    st.sampled_from([1024, 0x4000_0000]), st.sampled_from([5000, 5001]),
    st.integers(0, 70000), st.sampled_from([1, 2, 3]), st.integers(0, 8),
    st.integers(0, 3), st.sampled_from([0, 1, 65536, 2**32 - 1]), st.integers(0, 2**32 - 1),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_headers, st.lists(st.binary(max_size=300), max_size=3),
                          st.sampled_from([0, 44, 45, 200, 5000]),
                          st.lists(st.binary(max_size=400), max_size=2)), max_size=25))
def test_hostile_packets_on_seqpacket_connections_never_crash(
    packets: list[tuple[bytes, list[bytes], int, list[bytes]]],
) -> None:
    h = seq_harness()
    h.listening.update({5000, 5001})
    h.listening_type[5001] = SEQ
    for header, payload, rx_size, host_messages in packets:
        h.manager.handle_tx(header, [memoryview(p) for p in payload], h.now)
        for stream in [s for ss in h.streams.values() for s in ss]:
            stream.messages_in += host_messages
            stream.inbound += b"z"
            h.manager.on_readable(stream)
        n = h.manager.produce_rx(memoryview(bytearray(rx_size)), h.now)
        assert n is None or n == 0 or n >= HEADER_SIZE
        h.now += 0.5
    assert len(h.manager) <= 4


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=3), st.booleans())
def test_arbitrary_connect_messages_never_crash(messages: list[bytes], eof: bool) -> None:
    h = seq_harness()
    stream = FakeStream()
    stream.messages_in += messages
    stream.host_eof = eof
    h.manager.accept_host(stream, 0.0, SEQ)
    packets = h.rx_all()
    assert ops(packets) in ([], [Op.REQUEST])
    # A REQUEST only for a first message that is exactly a valid CONNECT line.
    valid = bool(messages) and messages[0].endswith(b"\n") and len(messages[0]) <= 45
    if packets:
        assert valid and packets[0][0].type == SEQ
        assert stream.messages_in == messages[1:]  # nothing after the first message was read
    elif messages or eof:
        assert stream.closed
