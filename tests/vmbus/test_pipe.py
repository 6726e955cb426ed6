"""VMBus pipes (facts §4): framing, limits, byte mode, waiting and peer loss."""

from __future__ import annotations

import struct

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.vmbus.channel import RawChannel, connected_channel_pair
from devicehost.vmbus.pipe import (
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
    assert not b.at_eof
    assert b.try_recv(100) == b""
    assert b.at_eof
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
