"""The vsock saved state: a connection table saved, encoded, decoded as untrusted, checked and
restored behaves as if it had never left (every byte once, in order, credit continuing); hostile
states are refused with one error naming the field; the decoder is fuzzed."""

from __future__ import annotations

import copy
import json
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost import SavedStateError
from devicehost.savedstate import (
    SavedEntry,
    decode_envelope_untrusted,
    decode_state_untrusted,
    encode_envelope,
    encode_state,
    entry_for,
)
from devicehost_vsock.manager import ConnectionManager
from devicehost_vsock.protocol import HEADER_SIZE, TYPE_SEQPACKET, TYPE_STREAM, Op
from devicehost_vsock.saved import (
    SavedConnection,
    SavedPhase,
    SavedRst,
    VsockSavedState,
    check_untrusted,
    restore_connection,
    save_connection,
)

from .fakestream import FakeStream
from .harness import CID, Harness

BASE = "/tmp/vs-saved/vsock"
TYPES = frozenset({TYPE_STREAM, TYPE_SEQPACKET})


def snapshot(h: Harness) -> tuple[VsockSavedState, list[Any]]:
    """The harness's table as saved (its streams stand for the handed descriptors)."""
    conns, rsts, last = h.manager.saved_view()
    state = VsockSavedState(
        guest_cid=CID, tx_buffer_size=h.manager.tx_buffer_size, base_path=BASE, temp_dir=None,
        stream_listener=10_000, seqpacket_listener=10_001, last_port=last,
        connections=tuple(save_connection(c, i, h.now) for i, c in enumerate(conns)),
        rsts=tuple(SavedRst(*r) for r in rsts), packets_in=7, packets_out=9,
    )
    return state, [c.stream for c in conns]


def through_the_wire(state: VsockSavedState) -> VsockSavedState:
    envelope = encode_envelope([entry_for("vsock0", "vsock", state)])
    decoded = decode_state_untrusted(decode_envelope_untrusted(envelope)[0], VsockSavedState)
    assert isinstance(decoded, VsockSavedState)
    return decoded


def check(state: VsockSavedState, tx_buffer_size: int = 65536) -> None:
    check_untrusted(state, guest_cid=CID, tx_buffer_size=tx_buffer_size, base_path=BASE,
                    seqpacket=True, types=TYPES)


def hand_over(h: Harness) -> None:
    """Replace the harness's table by one restored from its saved state."""
    state, streams = snapshot(h)
    state = through_the_wire(state)
    check(state, h.manager.tx_buffer_size)
    new = ConnectionManager(CID, h._connect, tx_buffer_size=h.manager.tx_buffer_size,
                            stream=True, seqpacket=True)
    new.adopt([restore_connection(s, streams[s.socket], h.manager.tx_buffer_size, h.now)
               for s in state.connections],
              [(r.local_port, r.peer_port, r.sock_type) for r in state.rsts], state.last_port)
    h.manager = new


class GuestModel:
    """The guest's half of one stream connection."""

    def __init__(self, local: int, peer: int, stream: FakeStream) -> None:
        self.local, self.peer, self.stream = local, peer, stream
        self.to_host = b""
        self.sent = 0
        self.to_guest = b""
        self.host_written = 0
        self.received = bytearray()
        self.dev_buf_alloc, self.dev_fwd_cnt = 65536, 0
        self.told = 0


@settings(max_examples=120, deadline=None)
@given(
    st.lists(st.tuples(st.binary(min_size=1, max_size=2000), st.binary(min_size=1, max_size=2000)),
             min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 2), st.integers(1, 5000)), max_size=100),
    st.integers(2000, 20000),
)
def test_handovers_at_any_point_deliver_every_byte_once_in_order(
    data: list[tuple[bytes, bytes]], steps: list[tuple[int, int, int]], guest_buf: int
) -> None:
    h = Harness(seqpacket=True)
    conns: list[GuestModel] = []
    for i, (up, down) in enumerate(data):
        port = 6000 + i
        h.listening.add(port)
        h.tx(Op.REQUEST, 100 + i, port, buf_alloc=guest_buf)
        response = h.rx()
        assert response is not None and response[0].op == Op.RESPONSE
        stream = h.streams[port][0]
        stream.capacity = 1500  # the host socket back-pressures: bytes wait in the tx buffer
        model = GuestModel(100 + i, port, stream)
        model.to_host, model.to_guest = up * 10, down * 10
        conns.append(model)
    by_key = {(c.local, c.peer): c for c in conns}
    host_got = {c.local: bytearray() for c in conns}
    handovers = 0

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
            hand_over(h)
            handovers += 1
    hand_over(h)
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
            for c in conns:
                c.told = len(c.received)
                h.tx(Op.CREDIT_UPDATE, c.local, c.peer, buf_alloc=guest_buf, fwd_cnt=c.told)
    for c in conns:
        assert bytes(host_got[c.local]) == c.to_host
        assert bytes(c.received) == c.to_guest
        assert not c.stream.closed
    assert len(h.manager) == len(conns)


def test_seqpacket_boundaries_and_a_half_sent_message_survive() -> None:
    h = Harness(seqpacket=True)
    h.listening.add(7000)
    h.listening_type[7000] = TYPE_SEQPACKET
    h.tx(Op.REQUEST, 100, 7000, type_=TYPE_SEQPACKET)
    assert h.rx() is not None
    stream = h.streams[7000][0]
    stream.message_capacity = 0  # the host takes no message yet: they wait in the tx buffer
    h.tx(Op.RW, 100, 7000, b"one", type_=TYPE_SEQPACKET, flags=1)
    h.tx(Op.RW, 100, 7000, b"", type_=TYPE_SEQPACKET, flags=1)
    h.tx(Op.RW, 100, 7000, b"thr", type_=TYPE_SEQPACKET)  # no EOM yet
    stream.messages_in.append(b"x" * 6000)  # bigger than the rx buffer: relayed in pieces
    h.manager.on_readable(stream)
    first = h.rx(HEADER_SIZE + 4000)
    assert first is not None and first[0].op == Op.RW and first[0].flags == 0
    state, _ = snapshot(h)
    saved = state.connections[0]
    assert (saved.msg_lens, saved.msg_partial, saved.txbuf) == ((3, 0), 3, b"onethr")
    assert saved.rx_message == b"x" * 6000 and saved.rx_offset == 4000
    hand_over(h)
    rest = h.rx(HEADER_SIZE + 4000)
    assert rest is not None and rest[1] == b"x" * 2000 and rest[0].flags == 1  # EOM
    h.tx(Op.RW, 100, 7000, b"ee", type_=TYPE_SEQPACKET, flags=1)
    stream.message_capacity = 10
    h.manager.on_writable(stream)
    assert stream.messages_out == [b"one", b"", b"three"]


def test_a_host_connection_mid_connect_line_and_its_deadline_survive() -> None:
    h = Harness(connection_timeout=2.0)
    h.now = 100.0
    stream = FakeStream(b"CONNE")
    h.manager.accept_host(stream, h.now)
    assert h.rx() is None  # the line is not complete
    h.now = 101.5
    state, _ = snapshot(h)
    assert state.connections[0].phase is SavedPhase.PENDING_CONNECT
    assert state.connections[0].deadline_us == 500_000
    hand_over(h)
    assert h.manager.next_silent_deadline() == pytest.approx(102.0)
    stream.inbound += b"CT 5000\n"
    h.manager.on_readable(stream)
    request = h.rx()
    assert request is not None and request[0].op == Op.REQUEST and request[0].dst_port == 5000
    assert request[0].src_port == 0x4000_0000
    h.tx(Op.RESPONSE, 5000, 0x4000_0000)
    assert stream.drain() == b"OK 1073741824\n"
    # The port allocator continues after the restored one.
    second = FakeStream(b"CONNECT 5000\n")
    h.manager.accept_host(second, h.now)
    assert h.rx()[0].src_port == 0x4000_0001  # type: ignore[index]


# ----------------------------------------------------------------------- hostile states


def valid_state() -> VsockSavedState:
    h = Harness(seqpacket=True)
    stream = h.connect(1024, 5000)
    stream.capacity = 3
    h.tx(Op.RW, 1024, 5000, b"hello")
    h.manager.accept_host(FakeStream(b"CONNECT 6000\n"), h.now)
    h.rx_all()
    h.tx(Op.RST, 9, 9)
    h.tx(Op.RW, 77, 5000, b"z")  # no such connection: an RST owed
    state, _ = snapshot(h)
    return through_the_wire(state)


def test_the_valid_state_passes() -> None:
    state = valid_state()
    assert len(state.connections) == 2 and len(state.rsts) == 1
    assert [c.phase for c in state.connections] == [SavedPhase.CONNECTED,
                                                    SavedPhase.HOST_CONNECTING]
    check(state)


CONN0 = "connections[0]"


@pytest.mark.parametrize(("change", "blame"), [
    ({"guest_cid": 4}, "guest_cid"),
    ({"tx_buffer_size": 4096}, "tx_buffer_size"),
    ({"base_path": "/elsewhere/vsock"}, "base_path"),
    ({"temp_dir": "/tmp/devicehost-vsock-x"}, "temp_dir"),
    ({"seqpacket_listener": None}, "seqpacket_listener"),
    ({"seqpacket_listener": 10_000}, "seqpacket_listener"),
    ({"last_port": 5}, "last_port"),
    ({"rsts": (SavedRst(1, 2, 3),)}, "rsts[0]"),
    ({"rsts": (SavedRst(1 << 32, 2, 1),)}, "rsts[0].local_port"),
    ({"packets_in": -1}, "packets_in"),
])
def test_hostile_state_fields_are_refused(change: dict[str, Any], blame: str) -> None:
    with pytest.raises(SavedStateError, match=f"vsock saved state: {blame.replace('[', '.')}"):
        check(attrs.evolve(valid_state(), **change))


@pytest.mark.parametrize(("change", "blame"), [
    ({"sock_type": 3}, "not negotiated"),
    ({"tx_cnt": 1 << 32}, "tx_cnt"),
    ({"local_port": None}, "ports must be given"),
    ({"phase": SavedPhase.PENDING_CONNECT}, "ports must be given"),
    ({"phase": SavedPhase.GUEST_CONNECTING}, "RESPONSE"),
    ({"phase": SavedPhase.HOST_CONNECTING}, "host-connecting"),
    ({"connect_line": b"CONNECT 5000\n"}, "no CONNECT line"),
    ({"ok_pending": b"OK 1\n"}, "OK line"),
    ({"deadline_us": -1}, "deadline"),
    ({"txbuf": bytes(65537)}, "exceed the window"),
    ({"msg_lens": (1,)}, "message boundaries"),
    ({"rx_message": b"x"}, "message boundaries"),
    ({"write_shut": True}, "write side"),
    ({"socket": 10_000}, "used twice"),
])
def test_hostile_connection_fields_are_refused(change: dict[str, Any], blame: str) -> None:
    state = valid_state()
    first = attrs.evolve(state.connections[0], **change)
    with pytest.raises(SavedStateError, match=blame):
        check(attrs.evolve(state, connections=(first, *state.connections[1:])))


def test_a_host_connection_without_its_connect_deadline_is_refused() -> None:
    state = valid_state()
    host = next(c for c in state.connections if c.host_initiated)
    with pytest.raises(SavedStateError, match="no deadline while host-connecting"):
        check(attrs.evolve(state, connections=(attrs.evolve(host, deadline_us=None),)))


def test_two_connections_with_one_key_are_refused() -> None:
    state = valid_state()
    conn = state.connections[0]
    twin = attrs.evolve(conn, socket=99)
    with pytest.raises(SavedStateError, match="appears twice"):
        check(attrs.evolve(state, connections=(conn, twin)))


def test_a_host_connection_whose_line_names_another_port_is_refused() -> None:
    state = valid_state()
    host = next(c for c in state.connections if c.host_initiated)
    other = attrs.evolve(host, connect_line=b"CONNECT 6001\n")
    with pytest.raises(SavedStateError, match="another port"):
        check(attrs.evolve(state, connections=(other,)))


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                        st.text(max_size=20), st.sampled_from(["", "AAAA", "connected"]))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


VALID_PAYLOAD = encode_state(valid_state())


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzzed_states_are_refused_with_saved_state_error_or_restore_cleanly(
    data: st.DataObject,
) -> None:
    payload = copy.deepcopy(VALID_PAYLOAD)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(payload) if p]
        path = data.draw(st.sampled_from(paths))
        target = payload
        for key in path[:-1]:
            target = target[key]
        if data.draw(st.booleans()) and isinstance(target, dict):
            del target[path[-1]]
        else:
            target[path[-1]] = data.draw(_json_values())
    json.dumps(payload)  # still a JSON document
    entry = SavedEntry("vsock0", "vsock", "vsock.SavedState", 1, payload)
    try:
        state = decode_state_untrusted(entry, VsockSavedState)
        check(state)
    except SavedStateError:
        return
    # Accepted: it must restore and serve without error.
    h = Harness(seqpacket=True)
    h.manager.adopt([restore_connection(s, FakeStream(), 65536, 0.0)
                     for s in state.connections],
                    [(r.local_port, r.peer_port, r.sock_type) for r in state.rsts],
                    state.last_port)
    h.rx_all()


@settings(max_examples=200, deadline=None)
@given(st.builds(
    SavedConnection, socket=st.integers(0, 100), sock_type=st.sampled_from([1, 2]),
    host_initiated=st.booleans(), phase=st.sampled_from(list(SavedPhase)),
    local_port=st.none() | st.integers(0, 1 << 32), peer_port=st.none() | st.integers(0, 1 << 32),
    connect_line=st.binary(max_size=50), deadline_us=st.none() | st.integers(-5, 1 << 33),
    request_pending=st.booleans(), response_pending=st.booleans(),
    ok_pending=st.binary(max_size=50), peer_buf_alloc=st.integers(0, 1 << 33),
    peer_fwd_cnt=st.integers(0, 1 << 33), tx_cnt=st.integers(0, 1 << 33),
    fwd_cnt=st.integers(0, 1 << 33), last_told_fwd_cnt=st.integers(0, 1 << 33),
    credit_update_requested=st.booleans(), credit_request_pending=st.booleans(),
    waiting_for_credit=st.booleans(), txbuf=st.binary(max_size=100),
    msg_lens=st.lists(st.integers(-2, 60), max_size=4).map(tuple),
    msg_partial=st.integers(-2, 60), rx_message=st.none() | st.binary(max_size=30),
    rx_offset=st.integers(-2, 40), host_eof=st.booleans(), host_closed=st.booleans(),
    shutdown_sent=st.booleans(), peer_shut_send=st.booleans(), peer_shut_recv=st.booleans(),
    write_shut=st.booleans(),
))
def test_random_connections_are_refused_or_serve_without_error(conn: SavedConnection) -> None:
    state = attrs.evolve(valid_state(), connections=(conn,), rsts=())
    try:
        check(state)
    except SavedStateError:
        return
    h = Harness(seqpacket=True)
    stream = FakeStream(b"data")
    stream.messages_in.append(b"message")
    h.manager.adopt([restore_connection(conn, stream, 65536, 0.0)], [], state.last_port)
    h.rx_all()
    h.manager.on_writable(stream)
    h.now = 10.0
    h.rx_all()
