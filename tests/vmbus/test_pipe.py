"""VMBus pipes (facts §4): framing, limits, byte mode, waiting and peer loss."""

from __future__ import annotations

import struct

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.vmbus.channel import RawChannel, connected_channel_pair
from devicehost.vmbus.pipe import (
    FAIR_EVERY,
    PIPE_DATA,
    PIPE_PARTIAL,
    BytePipe,
    ConnectionReset,
    MessagePipe,
    PacketTooLarge,
    PipeError,
    PipeErrorKind,
)
from devicehost.vmbus.ring import OutgoingPacket, PacketType, RingErrorKind

HEADER = struct.Struct("<II")


# Every test here runs on the C ring accelerator and on the pure-Python ring (conftest.py).
pytestmark = pytest.mark.usefixtures("ring_implementation")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """These tests run on both backends (overrides the directory's asyncio-only fixture)."""
    return str(request.param)


def message_pair(ring_size: int = 16384) -> tuple[MessagePipe, MessagePipe]:
    host, guest = connected_channel_pair(ring_size)
    return MessagePipe(host), MessagePipe(guest)


def byte_pair(ring_size: int = 4096) -> tuple[BytePipe, BytePipe, RawChannel]:
    host, guest = connected_channel_pair(ring_size)
    return BytePipe(host), BytePipe(guest), guest


def test_message_on_the_ring_has_a_pipe_header() -> None:
    host, guest = connected_channel_pair(4096)
    MessagePipe(host).try_send(b"abc")
    packet = guest.incoming.read()
    assert packet.kind == PacketType.IN_BAND and packet.transaction_id == 0
    assert not packet.completion_requested
    assert bytes(packet.payload) == HEADER.pack(PIPE_DATA, 3) + b"abc" + b"\0" * 5


def test_message_round_trip_and_zero_length() -> None:
    a, b = message_pair()
    a.try_send(b"hello")
    a.try_send(b"")
    assert b.try_recv() == b"hello"
    assert b.try_recv() == b""
    with pytest.raises(anyio.WouldBlock):
        b.try_recv()


@pytest.mark.parametrize(("ring_size", "limit"), [(16384, 16344), (4096, 4056), (65536, 16384)])
def test_message_size_limit(ring_size: int, limit: int) -> None:
    a, b = message_pair(ring_size)
    assert a.max_send == limit
    a.try_send(b"m" * limit)
    assert b.try_recv() == b"m" * limit
    with pytest.raises(PacketTooLarge) as info:
        a.try_send(b"m" * (limit + 1))
    assert info.value.kind is PipeErrorKind.PACKET_TOO_LARGE
    assert (info.value.size, info.value.limit) == (limit + 1, limit)


def test_receive_larger_than_buffer_is_refused_and_kept() -> None:
    a, b = message_pair()
    a.try_send(b"x" * 100)
    with pytest.raises(PacketTooLarge):
        b.try_recv(99)
    assert b.try_recv(100) == b"x" * 100


def test_full_ring_would_block() -> None:
    a, _ = message_pair(4096)
    a.try_send(b"x" * 4000)
    with pytest.raises(anyio.WouldBlock):
        a.try_send(b"x" * 4000)


def test_non_in_band_packet_on_a_pipe() -> None:
    host, guest = connected_channel_pair(4096)
    host.outgoing.write(OutgoingPacket(PacketType.COMPLETION, HEADER.pack(PIPE_DATA, 0)))
    with pytest.raises(PipeError) as info:
        MessagePipe(guest).try_recv()
    assert info.value.kind is PipeErrorKind.UNEXPECTED_RING_PACKET_TYPE


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (HEADER.pack(3, 0), PipeErrorKind.INVALID_PIPE_PACKET_TYPE),
        (HEADER.pack(PIPE_DATA, 9) + b"12345678", PipeErrorKind.INVALID_PACKET_LENGTH),
        (b"", PipeErrorKind.INVALID_PACKET_LENGTH),
        (HEADER.pack(PIPE_DATA, 20000) + b"x" * 8, PipeErrorKind.PACKET_TOO_LARGE),
    ],
)
def test_malformed_messages(payload: bytes, kind: PipeErrorKind) -> None:
    host, guest = connected_channel_pair(65536)
    host.outgoing.write_inband(payload)
    with pytest.raises(PipeError) as info:
        MessagePipe(guest).try_recv()
    assert info.value.kind is kind


def test_corrupt_ring_surfaces_as_pipe_error() -> None:
    _, guest = connected_channel_pair(4096)
    guest.incoming.mem.words[0] = 3
    with pytest.raises(PipeError) as info:
        MessagePipe(guest).try_recv()
    assert info.value.kind is PipeErrorKind.RING
    assert info.value.__cause__ is not None


def test_raw_message_mode() -> None:
    host, guest = connected_channel_pair(4096)
    a, b = MessagePipe(host, raw=True), MessagePipe(guest, raw=True)
    a.try_send(b"12345")
    assert b.try_recv() == b"12345\0\0\0"  # raw messages are the padded payload
    assert a.max_send == 4096 - 8 - 24


@pytest.mark.anyio
async def test_recv_on_pipe_whose_peer_is_gone() -> None:
    host, guest = connected_channel_pair(4096)
    guest.close()
    with anyio.fail_after(5), pytest.raises(ConnectionReset):
        await MessagePipe(host).recv()


@pytest.mark.anyio
async def test_data_sent_before_close_is_still_received() -> None:
    host, guest = connected_channel_pair(4096)
    MessagePipe(guest).try_send(b"last words")
    guest.close()
    pipe = MessagePipe(host)
    with anyio.fail_after(5):
        assert await pipe.recv() == b"last words"
        with pytest.raises(ConnectionReset):
            await pipe.recv()


@pytest.mark.anyio
async def test_pending_recv_completes_when_peer_sends() -> None:
    a, b = message_pair()
    got: list[bytes] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async def receive() -> None:
                got.append(await b.recv())

            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            assert not b.channel.incoming.interrupt_mask  # unmasked while sleeping
            await a.send(b"abc")
    assert got == [b"abc"]


@pytest.mark.anyio
async def test_second_send_blocks_until_peer_reads() -> None:
    a, b = message_pair(4096)
    events: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async def send_two() -> None:
                await a.send(b"1" * 4000)
                events.append("first sent")
                await a.send(b"2" * 4000)
                events.append("second sent")

            tg.start_soon(send_two)
            await anyio.wait_all_tasks_blocked()
            assert events == ["first sent"]
            # The blocked writer published pending_send_size = max(needed, max_packet / 4).
            assert a.channel.outgoing.pending_send_size == 4032
            assert await b.recv() == b"1" * 4000
            await anyio.wait_all_tasks_blocked()
            assert events == ["first sent", "second sent"]
            assert a.channel.outgoing.pending_send_size == 0
            assert await b.recv() == b"2" * 4000


@pytest.mark.anyio
async def test_pending_send_size_is_at_least_a_quarter_of_the_ring() -> None:
    a, b = message_pair(65536)
    sent = 0
    with pytest.raises(anyio.WouldBlock):
        while True:
            a.try_send(b"z" * 12000 if sent < 5 else b"")
            sent += 1
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.send, b"small")
            await anyio.wait_all_tasks_blocked()
            # max(40, 65528 // 4 = 16382), rounded up to 8.
            assert a.channel.outgoing.pending_send_size == 16384
            for _ in range(sent + 1):
                await b.recv()


@pytest.mark.anyio
async def test_wait_write_ready_fails_at_once_for_impossible_sizes() -> None:
    a, _ = message_pair(4096)
    await a.wait_write_ready(4056)
    with anyio.fail_after(5), pytest.raises(PipeError) as info:
        await a.wait_write_ready(4057)
    assert info.value.kind is PipeErrorKind.RING
    assert getattr(info.value.__cause__, "kind", None) is RingErrorKind.INVALID_MESSAGE_LENGTH


@pytest.mark.anyio
async def test_blocked_sender_sees_connection_reset() -> None:
    a, b = message_pair(4096)
    a.try_send(b"x" * 4000)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async def send() -> None:
                with pytest.raises(ConnectionReset):
                    await a.send(b"y" * 4000)

            tg.start_soon(send)
            await anyio.wait_all_tasks_blocked()
            b.channel.close()


@pytest.mark.anyio
async def test_byte_pipe_moves_20000_bytes_through_a_4k_ring() -> None:
    a, b, _ = byte_pair(4096)
    data = bytes(i * 7 % 251 for i in range(20000))
    got = bytearray()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            async def read_all() -> None:
                while chunk := await b.recv(1500):
                    got.extend(chunk)

            tg.start_soon(read_all)
            await a.send(data)
            await a.send_eof()
    assert bytes(got) == data
    assert b.at_eof


def test_byte_pipe_chunks_writes() -> None:
    a, _, guest = byte_pair(16384)
    assert a.try_send(b"c" * 5000) == 5000
    sizes = [HEADER.unpack_from(p.payload)[1] for p in guest.incoming.read_batch()]
    assert sizes == [2048, 2048, 904]


def test_partial_read_rewrites_the_header_in_place() -> None:
    a, b, guest = byte_pair()
    a.try_send(b"0123456789")
    assert b.try_recv(4) == b"0123"
    packet = guest.incoming.peek()
    assert HEADER.unpack_from(packet.payload) == (PIPE_PARTIAL, 10 | 4 << 16)
    assert b.try_recv(3) == b"456"
    assert HEADER.unpack_from(guest.incoming.peek().payload) == (PIPE_PARTIAL, 10 | 7 << 16)
    assert b.try_recv(100) == b"789"
    with pytest.raises(anyio.WouldBlock):
        b.try_recv(100)


def test_partial_state_survives_a_new_reader() -> None:
    a, b, guest = byte_pair()
    a.try_send(b"abcdef")
    assert b.try_recv(2) == b"ab"
    assert BytePipe(guest).try_recv(10) == b"cdef"


def test_read_spans_several_packets() -> None:
    a, b, _ = byte_pair()
    a.try_send(b"one")
    a.try_send(b"two")
    a.try_send(b"three")
    assert b.try_recv(8) == b"onetwoth"
    assert b.try_recv(8) == b"ree"


def test_eof_is_consumed_only_by_a_read_returning_nothing_else() -> None:
    a, b, _ = byte_pair()
    a.try_send(b"tail")
    a.try_send_eof()
    assert b.try_recv(100) == b"tail"
    eof_before = b.at_eof
    assert b.try_recv(100) == b""
    assert (eof_before, b.at_eof) == (False, True)
    a.try_send(b"after eof")
    assert b.try_recv(100) == b""


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (HEADER.pack(PIPE_PARTIAL, 4 | 4 << 16) + b"abcd", PipeErrorKind.INVALID_PACKET_LENGTH),
        (HEADER.pack(4, 0), PipeErrorKind.INVALID_PIPE_PACKET_TYPE),
        (HEADER.pack(PIPE_DATA, 100) + b"short", PipeErrorKind.INVALID_PACKET_LENGTH),
    ],
)
def test_malformed_byte_packets(payload: bytes, kind: PipeErrorKind) -> None:
    host, guest = connected_channel_pair(4096)
    host.outgoing.write_inband(payload)
    with pytest.raises(PipeError) as info:
        BytePipe(guest).try_recv(100)
    assert info.value.kind is kind


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=6), st.integers(1, 80))
def test_arbitrary_packets_raise_only_pipe_errors(payloads: list[bytes], max_len: int) -> None:
    for pipe_class in (MessagePipe, BytePipe):
        host, guest = connected_channel_pair(4096)
        for payload in payloads:
            host.outgoing.write_inband(payload)
        pipe = pipe_class(guest)
        try:
            for _ in range(len(payloads) + 1):
                pipe.try_recv(max_len)
        except (PipeError, anyio.WouldBlock):
            pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=5000), max_size=8), st.integers(1, 6000))
def test_byte_stream_preserves_order(writes: list[bytes], read_size: int) -> None:
    a, b, _ = byte_pair(65536)
    data = b"".join(writes)
    for w in writes:
        assert a.try_send(w) == len(w)
    got = bytearray()
    while len(got) < len(data):
        got.extend(b.try_recv(read_size))
    assert bytes(got) == data


# -- cancellation -------------------------------------------------------------------------------
#
# Each test runs one operation in a task and cancels it after ``steps`` scheduling rounds of the
# test's task, for every ``steps`` from 0 (cancelled before it starts) until the operation
# finishes on its own: that lands the cancellation at every await the operation has.

CANCEL_STEPS = range(12)


async def _run_cancelled(operation: object, steps: int, *, midway: object = None) -> list[object]:
    """Run ``operation()`` and cancel it after ``steps`` rounds; ``midway()`` (sync) runs after
    the first round. Returns [result] if it finished, [] if it was cancelled."""
    outcome: list[object] = []

    async def task() -> None:
        outcome.append(await operation())  # type: ignore[operator]

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(task)
            for step in range(steps):
                await anyio.lowlevel.checkpoint()
                if step == 0 and midway is not None:
                    midway()  # type: ignore[operator]
            tg.cancel_scope.cancel()
    return outcome


def _drain(pipe: MessagePipe) -> list[bytes]:
    left = []
    while not pipe.channel.incoming.is_empty():
        left.append(pipe.try_recv())
    return left


@pytest.mark.anyio
@pytest.mark.parametrize("already_there", [True, False], ids=["queued", "arrives"])
async def test_cancelled_message_recv_never_loses_a_message(already_there: bool) -> None:
    a, b = message_pair()
    for steps in CANCEL_STEPS:
        message = b"m%d" % steps
        if already_there:
            a.try_send(message)
        outcome = await _run_cancelled(
            b.recv, steps, midway=None if already_there else lambda m=message: a.try_send(m))
        left = _drain(b)
        if steps >= 1 or already_there:
            # Either the receiver returned it or it is still in the ring: exactly once.
            assert outcome + left == [message], steps
        else:
            assert outcome == [] and left == []
    assert b.channel.incoming.is_empty()


@pytest.mark.anyio
async def test_receives_in_a_cancelled_scope_stop_within_fair_every_and_lose_nothing() -> None:
    a, b = message_pair()
    got: list[bytes] = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        for i in range(FAIR_EVERY + 1):
            a.try_send(b"m%d" % i)
            got.append(await b.recv())
    assert scope.cancelled_caught
    assert len(got) < FAIR_EVERY
    assert got + _drain(b) == [b"m%d" % i for i in range(len(got) + 1)]


@pytest.mark.anyio
@pytest.mark.parametrize("ring_full", [True, False], ids=["full", "room"])
async def test_cancelled_message_send_sent_iff_it_returned(ring_full: bool) -> None:
    a, b = message_pair(4096)
    for steps in CANCEL_STEPS:
        if ring_full:
            a.try_send(b"f" * 3000)  # the next 3000-byte message has to wait for room
        message = bytes([48 + steps]) * 3000
        outcome = await _run_cancelled(
            lambda m=message: a.send(m), steps,
            midway=(lambda: b.try_recv()) if ring_full else None)
        left = _drain(b)
        if ring_full and steps == 0:
            left = left[1:]  # the filler was never read
        # A send that returned has sent; a cancelled one has not (and never both).
        assert left == ([message] if outcome else []), steps
        assert a.channel.outgoing.pending_send_size == 0


@pytest.mark.anyio
async def test_sends_in_a_cancelled_scope_stop_within_fair_every() -> None:
    a, b = message_pair()
    returned = 0
    with anyio.CancelScope() as scope:
        scope.cancel()
        for i in range(FAIR_EVERY + 1):
            await a.send(b"s%d" % i)
            returned += 1
    assert scope.cancelled_caught
    assert returned < FAIR_EVERY
    # Exactly the sends that returned were sent.
    assert _drain(b) == [b"s%d" % i for i in range(returned)]


@pytest.mark.anyio
async def test_cancelled_byte_recv_never_loses_bytes() -> None:
    a, b, _ = byte_pair(4096)
    sent = bytearray()
    got = bytearray()
    for steps in CANCEL_STEPS:
        piece = bytes([65 + steps]) * (100 + steps)
        sent += piece
        outcome = await _run_cancelled(
            lambda: b.recv(50), steps, midway=lambda p=piece: a.try_send(p))
        if steps == 0:
            a.try_send(piece)  # midway never ran
        for data in outcome:
            got += data  # type: ignore[arg-type]
    while True:
        try:
            got += b.try_recv(1 << 16)
        except anyio.WouldBlock:
            break
    assert got == sent


@pytest.mark.anyio
async def test_cancelled_byte_send_sent_a_prefix_or_everything() -> None:
    a, b, _ = byte_pair(4096)
    for steps in CANCEL_STEPS:
        data = bytes(range(256)) * 24  # 6144 bytes: 3 chunks, more than the ring holds
        a.try_send(b"x" * 2048)  # a full chunk already waits in the ring
        outcome = await _run_cancelled(lambda d=data: a.send(d), steps,
                                       midway=lambda: b.try_recv(2048))
        if steps == 0:
            assert b.try_recv(2048) == b"x" * 2048
        got = bytearray()
        while True:
            try:
                got += b.try_recv(1 << 16)
            except anyio.WouldBlock:
                break
        if outcome:
            assert got == data, steps
        else:
            # Cancelled: whole chunks from the start (possibly none) went out, nothing else.
            assert data.startswith(got) and len(got) % 2048 == 0, steps
        assert a.channel.outgoing.pending_send_size == 0


@pytest.mark.anyio
async def test_repeated_cancelled_receives_lose_no_message() -> None:
    a, b = message_pair()
    taken: list[bytes] = []

    async def take() -> None:
        taken.append(await b.recv(64))

    sent = [b"m%d" % i for i in range(60)]
    for i, message in enumerate(sent):
        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            for _ in range(i % 2):
                await anyio.sleep(0)
            if i % 4 == 0:
                tg.cancel_scope.cancel()  # the receiver is waiting, with nothing to take
            else:
                await a.send(message)
                for _ in range(i % 3):
                    await anyio.sleep(0)
                tg.cancel_scope.cancel()  # lands before, during or after the receive
        if i % 4 == 0:
            await a.send(message)
    left = _drain(b)
    # Every message was either returned to a receiver or is still in the ring, exactly once.
    assert sorted(taken + left) == sorted(sent)
    assert taken and left


@pytest.mark.anyio
async def test_messages_arrive_in_order_while_the_sender_waits_for_room() -> None:
    a, b = message_pair(4096)
    messages = [bytes([i]) * 1500 for i in range(10)]  # two fit in a one-page ring
    got: list[bytes] = []

    async def drain() -> None:
        for _ in messages:
            got.append(await b.recv(4096))

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain)
        with anyio.fail_after(5):
            for message in messages:
                await a.send(message)
    assert got == messages


@pytest.mark.anyio
async def test_a_busy_pipe_still_lets_other_tasks_run() -> None:
    a, b = message_pair(1 << 16)
    others = 0

    async def other() -> None:
        nonlocal others
        while True:
            others += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        await anyio.lowlevel.checkpoint()
        before = others
        for _ in range(4 * FAIR_EVERY):
            await a.send(b"x")  # never waits: the ring has room
            await b.recv()  # never waits: the message is there
        assert others - before >= 4
        tg.cancel_scope.cancel()


# -- reserve: building a message right in the ring ----------------------------------------------


def test_reserved_message_is_built_in_the_ring_and_sent_as_is() -> None:
    host, guest = connected_channel_pair(4096)
    pipe = MessagePipe(host)
    view = pipe.reserve(5)
    assert view.obj is not None and len(view) == 5
    view[:] = b"hello"
    pipe.try_send(view)
    packet = guest.incoming.read()
    assert bytes(packet.payload) == HEADER.pack(PIPE_DATA, 5) + b"hello" + b"\0" * 3
    guest.incoming.rollback()
    assert MessagePipe(guest).try_recv() == b"hello"


def test_reserved_message_across_the_ring_end_arrives_whole() -> None:
    host, guest = connected_channel_pair(4096)
    a, b = MessagePipe(host), MessagePipe(guest)
    a.try_send(b"x" * 3900)
    assert b.try_recv() == b"x" * 3900  # both indices now near the end of the ring
    view = a.reserve(200)
    ring = host.outgoing.mem.data
    assert ring is not None and view.obj is not ring.obj  # built aside, written on send
    view[:] = bytes(range(200))
    a.try_send(view)
    assert b.try_recv() == bytes(range(200))


def test_another_send_discards_the_reservation() -> None:
    a, b = message_pair()
    view = a.reserve(5)
    view[:] = b"stale"
    a.try_send(b"other")  # written where the reservation was; the reservation is gone
    assert b.try_recv() == b"other"
    with pytest.raises(anyio.WouldBlock):
        b.try_recv()  # the reserved bytes were never published


def test_raw_reserve_and_limits() -> None:
    host, guest = connected_channel_pair(4096)
    pipe = MessagePipe(host, raw=True)
    view = pipe.reserve(8)
    view[:] = b"rawbytes"
    pipe.try_send(view)
    assert MessagePipe(guest, raw=True).try_recv() == b"rawbytes"
    with pytest.raises(PacketTooLarge):
        MessagePipe(host).reserve(4057)


@pytest.mark.anyio
async def test_reserved_message_waits_like_any_other_when_the_ring_is_full() -> None:
    a, b = message_pair(4096)
    a.try_send(b"f" * 3000)
    view = a.reserve(3000)  # no room: a private buffer
    view[:] = b"r" * 3000
    with pytest.raises(anyio.WouldBlock):
        a.try_send(view)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.send, view)
        with anyio.fail_after(5):
            assert await b.recv() == b"f" * 3000
            assert await b.recv() == b"r" * 3000


def test_recv_parsed_hands_the_message_in_the_ring_to_parse() -> None:
    a, b = message_pair()
    a.try_send(b"parse me")
    seen: list[object] = []

    def parse(message: memoryview | bytes) -> bytes:
        seen.append(type(message))
        return bytes(message).upper()

    assert b.try_recv_parsed(parse) == b"PARSE ME"
    assert seen == [memoryview]
    with pytest.raises(anyio.WouldBlock):
        b.try_recv_parsed(parse)


def test_recv_parsed_consumes_the_message_even_if_parse_fails_but_not_if_too_large() -> None:
    a, b = message_pair()
    a.try_send(b"x" * 100)
    a.try_send(b"bad")
    with pytest.raises(PacketTooLarge):
        b.try_recv_parsed(bytes, 50)  # too large: stays
    assert b.try_recv_parsed(bytes, 100) == b"x" * 100

    def fail(message: memoryview | bytes) -> None:
        raise ValueError(bytes(message))

    with pytest.raises(ValueError):
        b.try_recv_parsed(fail)
    with pytest.raises(anyio.WouldBlock):
        b.try_recv()


@pytest.mark.anyio
async def test_cancelled_recv_parsed_never_loses_a_message() -> None:
    a, b = message_pair()
    for steps in CANCEL_STEPS:
        message = b"p%d" % steps
        a.try_send(message)
        outcome = await _run_cancelled(lambda: b.recv_parsed(bytes), steps)
        assert outcome + _drain(b) == [message], steps
