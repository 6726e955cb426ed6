"""The writing end of the Hyper-V ring (facts §3): packet bytes written, size limits, batches,
reserved packets, and what the writer refuses."""

from __future__ import annotations

import array
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.memory import GuestMemory
from devicehost.vmbus.ring import (
    MAX_PACKET_SIZE,
    IncomingRing,
    OutgoingPacket,
    OutgoingRing,
    PacketType,
    RingEmpty,
    RingError,
    RingErrorKind,
    RingFull,
    RingMemory,
    in_band_size,
)

from .ringbytes import DESC, packet_bytes, ring_pair, set_word

# Every test here runs on the C ring accelerator and on the pure-Python ring (conftest.py).
pytestmark = pytest.mark.usefixtures("ring_implementation")


@pytest.mark.parametrize("how", ["write_inband", "bytearray", "batch", "reserve", "write"])
def test_packet_length_is_bounded_by_the_u16_length8_on_large_rings(how: str) -> None:
    # On a 1 MiB ring the ring's size allows more than length8 (u16, 8-byte units) can describe:
    # the largest packet is 0xFFFF * 8 + 8 bytes, one unit more is the caller's error, on every
    # write path, and nothing reaches the ring.
    buf, w, r = ring_pair(1 << 20)
    assert w.maximum_packet_size == r.maximum_packet_size == MAX_PACKET_SIZE == 0xFFFF * 8 + 8
    largest = MAX_PACKET_SIZE - 24
    w.write_inband(b"x" * largest)
    packet = r.read()
    assert len(packet.payload) == largest
    assert DESC.unpack_from(buf, 4096)[2] == 0xFFFF
    r.commit()
    before = bytes(buf)
    payload = b"y" * (largest + 1)
    with pytest.raises(RingError) as info:
        if how == "write_inband":
            w.write_inband(payload)
        elif how == "bytearray":
            w.write_inband(bytearray(payload))
        elif how == "batch":
            w.write_inband_batch([payload])
        elif how == "reserve":
            w.reserve_inband(len(payload))
        else:
            w.write(OutgoingPacket(PacketType.IN_BAND, payload))
    assert info.value.kind is RingErrorKind.INVALID_MESSAGE_LENGTH
    assert bytes(buf) == before


def test_any_buffer_is_one_payload_and_any_iterable_a_batch() -> None:
    # array.array, a bytes subclass and mmap-like objects are one buffer; only a tuple or list
    # is a sequence of parts; write_inband_batch takes any iterable of payloads.
    class Tagged(bytes):
        pass

    _, w, r = ring_pair(4096)
    w.write_inband(array.array("B", b"abc"))
    w.write_inband(Tagged(b"tagged"))
    w.write_inband((b"pa", bytearray(b"rt"), memoryview(b"s!")))
    # A generator on purpose: write_inband_batch takes any iterable.
    assert w.write_inband_batch(b"g%d" % i for i in range(3)) == (3, False)
    got = [bytes(r.read().payload) for _ in range(6)]
    assert got == [b"abc" + bytes(5), b"tagged" + bytes(2), b"parts!" + bytes(2),
                   b"g0" + bytes(6), b"g1" + bytes(6), b"g2" + bytes(6)]


def test_writer_validates_the_readers_index() -> None:
    buf, w, _ = ring_pair()
    set_word(buf, 1, 4)
    with pytest.raises(RingError) as info:
        w.write_inband(b"x")
    assert info.value.kind is RingErrorKind.INVALID_RING_POINTER


def test_batch_write_stops_when_full_and_commits_once() -> None:
    _, w, r = ring_pair(4096)
    r.set_interrupt_mask(False)
    count, signal = w.write_inband_batch([b"q" * 1000] * 10)
    assert (count, signal) == (3, True)  # 4 x 1024 > 4088
    with pytest.raises(RingFull):
        w.write_inband_batch([b"q" * 1000])
    assert [bytes(p.payload)[:1000] for p in r.read_batch(10)] == [b"q" * 1000] * 3


def test_batch_write_of_mixed_buffers_and_oversized_packet() -> None:
    _, w, r = ring_pair(4096)
    count, _ = w.write_inband_batch([b"a" * 5, bytearray(b"b" * 6), memoryview(b"c" * 7)])
    assert count == 3
    assert [bytes(p.payload) for p in r.read_batch()] == [b"a" * 5 + b"\0" * 3,
                                                           b"b" * 6 + b"\0" * 2, b"c" * 7 + b"\0"]
    with pytest.raises(RingError):
        w.write_inband_batch([b"x" * 5000])


@pytest.mark.parametrize("scattered", [False, True])
@pytest.mark.parametrize("parts", [(b"a" * 40,), (b"head", b"-" * 30, bytearray(b"tail")),
                                   (memoryview(b"12345678").cast("I"), b"xyz")])
def test_wrappingpacket_bytes_land_modulo_the_ring(scattered: bool,
                                                    parts: tuple[bytes, ...]) -> None:
    if scattered:
        memory = GuestMemory.anonymous(8 * 4096)
        mem = RingMemory.from_pages(memory, [0, 5, 2])
    else:
        mem = RingMemory.from_view(bytearray(3 * 4096))
    size = mem.data_len
    w, r = OutgoingRing(mem), IncomingRing(mem)
    for _ in range(2):  # move both indices to 32 bytes before the end
        w.write_inband(b"f" * (size // 2 - 40))
        r.read()
        r.commit()
    start = size - 32
    assert mem.words[0] == mem.words[1] == start
    payload = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    w.write_inband(parts, transaction_id=7)
    expected = packet_bytes(start, payload, 7)
    assert mem.read(start, len(expected)) == expected
    packet = r.read()
    assert bytes(packet.payload)[: len(payload)] == payload
    assert packet.next_offset == (start + len(expected)) % size


def test_reserved_packet_is_published_in_place() -> None:
    buf, w, r = ring_pair(8192)
    view = w.reserve_inband(13)
    assert view is not None and len(view) == 13
    view[:] = b"hello, world!"
    with pytest.raises(RingEmpty):
        r.read()  # nothing is visible before publishing
    assert w.publish_inband(13, transaction_id=5, completion_requested=True) is False
    assert bytes(buf[4096 : 4096 + 40]) == (
        DESC.pack(6, 2, 4, 1, 5) + b"hello, world!" + bytes(3) + struct.pack("<Q", 0))
    packet = r.read()
    assert packet.completion_requested and packet.transaction_id == 5
    assert bytes(packet.payload) == b"hello, world!\0\0\0"


def test_reserve_signals_like_write_and_refuses_what_write_refuses() -> None:
    _, w, r = ring_pair(4096)
    r.set_interrupt_mask(False)
    assert w.reserve_inband(8) is not None
    assert w.publish_inband(8) is True  # the reader was unmasked and the ring empty
    with pytest.raises(RingError) as info:
        w.reserve_inband(4096)
    assert info.value.kind is RingErrorKind.INVALID_MESSAGE_LENGTH
    with pytest.raises(RingFull):
        w.reserve_inband(4096 - 8 - 24 - 8)  # would fit an empty ring, not this one


@pytest.mark.parametrize("scattered", [False, True])
def test_reserved_packet_that_wraps_or_is_scattered_is_written_whole(scattered: bool) -> None:
    if scattered:
        memory = GuestMemory.anonymous(4 * 4096)
        mem = RingMemory.from_pages(memory, [0, 3, 1])
    else:
        mem = RingMemory.from_view(bytearray(3 * 4096))
    size = mem.data_len
    w, r = OutgoingRing(mem), IncomingRing(mem)
    w.write_inband(b"x" * (size - 56))
    r.read()
    r.commit()
    start = mem.words[0]
    assert start == size - 32
    view = w.reserve_inband(100)  # from 32 bytes before the end: it wraps
    assert view.obj is not (mem.data.obj if mem.data is not None else None)
    view[:] = bytes(range(100))
    with pytest.raises(RingEmpty):
        r.read()
    w.publish_inband(100, transaction_id=3)
    expected = packet_bytes(start, bytes(range(100)), 3)
    assert mem.read(start, len(expected)) == expected
    packet = r.read()
    assert bytes(packet.payload)[:100] == bytes(range(100))
    r.commit()
    assert bytes(w.reserve_inband(4)) is not None  # the next one, in place or aside again


def test_publish_blames_a_reader_that_took_back_reserved_space() -> None:
    buf, w, r = ring_pair(4096)
    w.write_inband(b"x" * 2000)
    r.read()
    r.commit()  # out = 2024
    assert w.reserve_inband(1000) is not None
    set_word(buf, 1, 2048)  # out moves backwards past the reservation: a lying reader
    with pytest.raises(RingError) as info:
        w.publish_inband(1000)
    assert info.value.kind is RingErrorKind.INVALID_RING_POINTER


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([1, 2, 3]), st.booleans(),
       st.lists(st.tuples(st.sampled_from(["bytes", "parts", "reserve"]),
                          st.integers(0, 3000), st.integers(0, 255)), max_size=30))
def test_reserved_and_written_packets_round_trip(pages: int, scattered: bool,
                                                 writes: list[tuple[str, int, int]]) -> None:
    if scattered:
        memory = GuestMemory.anonymous((2 * pages + 2) * 4096)
        mem = RingMemory.from_pages(memory, [0, *range(2 * pages, 0, -2)])
    else:
        mem = RingMemory.from_view(bytearray(4096 * (pages + 1)))
    w, r = OutgoingRing(mem), IncomingRing(mem)
    size = mem.data_len
    for mode, n, fill in writes:
        payload = bytes([fill]) * n
        if in_band_size(n) > w.maximum_packet_size:
            continue
        if mode == "bytes":
            w.write_inband(payload, transaction_id=n)
        elif mode == "parts":
            w.write_inband((payload[:7], bytearray(payload[7:])), transaction_id=n)
        else:
            w.reserve_inband(n)[:] = payload
            w.publish_inband(n, transaction_id=n)
        packet = r.read()
        assert packet.transaction_id == n
        assert bytes(packet.payload) == payload + bytes(-n % 8)
        # The footer names where the packet starts, wherever the packet wrapped.
        footer = mem.read((packet.next_offset - 8) % size, 8)
        assert bytes(footer) == struct.pack("<Q", packet.offset << 32)
        r.commit()
