"""What one rx buffer gets when CREDIT_UPDATEs are owed: the order between connections and RSTs,
the fields, and the cases the short path for a CREDIT_UPDATE leaves to the general one."""

from __future__ import annotations

from devicehost_vsock.protocol import HEADER_SIZE, SHUTDOWN_RECEIVE, SHUTDOWN_SEND, Header, Op

from .fakestream import FakeStream
from .harness import Harness, ops


def _fields(packets: list[tuple[Header, bytes]]) -> list[tuple[int, int, int, int, int]]:
    return [(h.op, h.src_port, h.dst_port, h.fwd_cnt, h.buf_alloc) for h, _ in packets]


def _two_connections() -> tuple[Harness, FakeStream, FakeStream]:
    h = Harness()
    first = h.connect(1024, 5000)
    second = h.connect(1025, 5000)
    assert h.rx_all() == []  # both looked for host data: none, so nobody is in line
    return h, first, second


def test_owed_rsts_go_before_credit_updates_which_go_in_line_order() -> None:
    h, first, second = _two_connections()
    h.tx(Op.RW, 1024, 5000, b"abc")
    h.tx(Op.RW, 1025, 5000, b"de")
    h.tx(Op.CREDIT_REQUEST, 7, 9)  # unknown key: an RST is owed
    h.tx(Op.RW, 1024, 5000, b"fghi")  # the first connection keeps its place in line
    assert _fields(h.rx_all()) == [
        (Op.RST, 9, 7, 0, 0),
        (Op.CREDIT_UPDATE, 5000, 1024, 7, 65536),
        (Op.CREDIT_UPDATE, 5000, 1025, 2, 65536),
    ]
    assert bytes(first.outbound) == b"abcfghi" and bytes(second.outbound) == b"de"
    assert h.rx() is None  # fwd_cnt told: nothing more owed


def test_a_served_credit_update_goes_to_the_back_of_the_line() -> None:
    h, _, second = _two_connections()
    h.tx(Op.RW, 1025, 5000, b"xy")
    second.inbound += b"host data"
    h.manager.on_readable(second)
    h.tx(Op.RW, 1024, 5000, b"abc")
    packets = h.rx_all()
    # The second connection's update comes before its data, and the first connection, next in
    # line, is served in between.
    assert _fields(packets) == [
        (Op.CREDIT_UPDATE, 5000, 1025, 2, 65536),
        (Op.CREDIT_UPDATE, 5000, 1024, 3, 65536),
        (Op.RW, 5000, 1025, 2, 65536),
    ]
    assert packets[2][1] == b"host data"


def test_a_credit_update_waits_behind_a_response_of_its_connection() -> None:
    h = Harness()
    h.listening.add(5000)
    h.tx(Op.REQUEST, 1024, 5000)
    h.tx(Op.CREDIT_REQUEST, 1024, 5000)  # the guest asks before its RESPONSE went out
    assert ops(h.rx_all()) == [Op.RESPONSE, Op.CREDIT_UPDATE]


def test_a_connection_shutting_down_still_gets_its_credit_update() -> None:
    # Host EOF on a fully closed socket: SHUTDOWN sent and a graceful deadline pending; a
    # CREDIT_REQUEST before the deadline is still answered, then the deadline resets.
    h = Harness(graceful_timeout=2.0)
    stream = h.connect()
    stream.host_eof = stream.fully_closed = True
    (shut, _), = h.rx_all()
    assert (shut.op, shut.flags) == (Op.SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RECEIVE)
    assert h.manager.next_deadline() == 2.0
    h.tx(Op.CREDIT_REQUEST, 1024, 5000)
    h.now = 1.0
    assert _fields(h.rx_all()) == [(Op.CREDIT_UPDATE, 5000, 1024, 0, 65536)]
    h.now = 2.5
    assert ops(h.rx_all()) == [Op.RST]


def test_a_buffer_too_small_for_a_header_gets_no_credit_update() -> None:
    h = Harness()
    h.connect()
    h.tx(Op.RW, 1024, 5000, b"abc")
    assert h.manager.produce_rx(memoryview(bytearray(HEADER_SIZE - 1)), 0.0) == 0
    assert _fields(h.rx_all()) == [(Op.CREDIT_UPDATE, 5000, 1024, 3, 65536)]


def test_a_header_only_buffer_is_not_used_when_no_host_data_waits() -> None:
    h = Harness()
    stream = h.connect()
    # Established, nothing from the host: the buffer is not used (None), not completed empty.
    assert h.manager.produce_rx(memoryview(bytearray(HEADER_SIZE)), 0.0) is None
    assert "read" in stream.wants and not stream.closed
    # ...so it is there for the next control packet.
    h.tx(Op.CREDIT_REQUEST, 1024, 5000)
    buf = memoryview(bytearray(HEADER_SIZE))
    assert h.manager.produce_rx(buf, 0.0) == HEADER_SIZE
    # End of stream fits a header-only buffer: SHUTDOWN goes out in it.
    stream.host_eof = True
    h.manager.on_readable(stream)
    buf = memoryview(bytearray(HEADER_SIZE))
    assert h.manager.produce_rx(buf, 0.0) == HEADER_SIZE
    assert buf[30] == Op.SHUTDOWN


def test_a_header_only_buffer_is_handed_back_empty_only_when_data_waits() -> None:
    h = Harness()
    stream = h.connect()
    stream.inbound += b"data"
    h.manager.on_readable(stream)
    assert h.manager.produce_rx(memoryview(bytearray(HEADER_SIZE)), 0.0) == 0
    assert [(p.op, d) for p, d in h.rx_all()] == [(Op.RW, b"data")]
    assert h.manager.produce_rx(memoryview(bytearray(HEADER_SIZE)), 0.0) is None
