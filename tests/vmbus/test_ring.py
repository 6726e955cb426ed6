"""The Hyper-V ring buffer (facts §3): layout, signalling, corruption checks, fuzzing."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.memory import GuestMemory
from devicehost.vmbus.gpadl import GpaRangeError, MultiPagedRange, PagedRange
from devicehost.vmbus.ring import (
    IncomingRing,
    OutgoingPacket,
    OutgoingRing,
    PacketType,
    RingEmpty,
    RingError,
    RingErrorKind,
    RingFull,
    RingMemory,
    TransferPageRange,
    TransferPages,
    in_band_size,
)

from .ringbytes import DESC, put_descriptor, ring_pair, set_word, words

# Every test here runs on the C ring accelerator and on the pure-Python ring (conftest.py).
pytestmark = pytest.mark.usefixtures("ring_implementation")


def test_endpoints_initialise_their_control_words() -> None:
    buf = bytearray(b"\xff" * 8192)
    struct.pack_into("<II", buf, 0, 0, 0)
    mem = RingMemory.from_view(buf)
    OutgoingRing(mem)
    assert struct.unpack_from("<I", buf, 12) == (0,)  # pending_send_size
    assert struct.unpack_from("<I", buf, 64) == (1,)  # feature bit
    IncomingRing(mem)
    assert struct.unpack_from("<I", buf, 8) == (1,)  # interrupt mask


def test_in_bandpacket_bytes_on_the_ring() -> None:
    buf, w, r = ring_pair()
    w.write_inband(b"hello", transaction_id=0x1122, completion_requested=True)
    assert words(buf)[0] == in_band_size(5) == 32
    ring = bytes(buf[4096:4096 + 32])
    assert DESC.unpack_from(ring) == (6, 2, 3, 1, 0x1122)
    assert ring[16:24] == b"hello\0\0\0"
    assert struct.unpack_from("<II", ring, 24) == (0, 0)  # footer: reserved, start offset 0
    w.write_inband(b"")
    assert struct.unpack_from("<II", buf, 4096 + 48) == (0, 32)
    packet = r.read()
    assert (packet.kind, packet.transaction_id, packet.completion_requested) == (6, 0x1122, True)
    assert bytes(packet.payload) == b"hello\0\0\0"  # the padding belongs to the payload
    assert bytes(r.read().payload) == b""


def test_ring_signal_rules() -> None:
    # upstream test_ring: an unmasked reader is signalled; the reader then need not signal.
    buf, w, r = ring_pair()
    r.set_interrupt_mask(False)
    assert w.write_inband(b"12345678") is True
    packet = r.read()
    assert bytes(packet.payload) == b"12345678"
    assert r.commit() is False
    assert words(buf)[1] == 32


def test_interrupt_mask() -> None:
    _, w, r = ring_pair()
    assert r.interrupt_mask
    assert w.write_inband(b"a") is False
    r.read()
    r.commit()
    r.set_interrupt_mask(False)
    assert w.write_inband(b"b") is True
    # Not empty any more: no signal for the second packet.
    assert w.write_inband(b"c") is False


def test_no_signal_when_ring_was_not_empty_even_if_unmasked() -> None:
    _, w, r = ring_pair()
    r.set_interrupt_mask(False)
    assert w.write_batch([OutgoingPacket(PacketType.IN_BAND, b"x")] * 2) is True
    r.read()
    r.commit()
    assert w.write_inband(b"y") is False


def test_pending_send_size() -> None:
    # upstream test_pending_send_size: 16 KiB ring, 4000-byte packets, pss = 2 x 4024.
    _, w, r = ring_pair(16384)
    for _ in range(4):
        w.write_inband(b"p" * 4000)
    with pytest.raises(RingFull) as full:
        w.write_inband(b"p" * 4000)
    assert full.value.needed == 4024
    w.set_pending_send_size(2 * 4024)
    signals = []
    for _ in range(3):
        r.read()
        signals.append(r.commit())
    assert signals == [False, True, False]


def test_pending_send_size_ignores_low_bits() -> None:
    _, w, r = ring_pair(16384)
    for _ in range(4):
        w.write_inband(b"p" * 4000)
    # A peer that sets size - 1: 8048 - 1 is masked down to 8040, still crossed by read 2.
    w.mem.words[3] = 2 * 4024 - 1
    r.read()
    assert r.commit() is False
    r.read()
    assert r.commit() is True


def test_pending_send_size_limits_and_rounding() -> None:
    buf, w, _ = ring_pair(4096)
    w.set_pending_send_size(13)
    assert words(buf)[3] == 16
    w.set_pending_send_size(4088)
    with pytest.raises(RingError) as info:
        w.set_pending_send_size(4089)
    assert info.value.kind is RingErrorKind.INVALID_MESSAGE_LENGTH


def test_commit_without_reads_does_not_signal() -> None:
    _, w, r = ring_pair()
    w.set_pending_send_size(8)
    assert r.commit() is False


def test_message_length_limits() -> None:
    # A packet of exactly data_len - 8 bytes fits an empty ring; one more 8-byte unit never.
    _, w, r = ring_pair(4096)
    assert w.maximum_packet_size == 4088
    w.write_inband(b"m" * (4088 - 24))
    assert len(r.read().payload) == 4064
    r.commit()
    with pytest.raises(RingError) as info:
        w.write_inband(b"m" * (4088 - 23))
    assert info.value.kind is RingErrorKind.INVALID_MESSAGE_LENGTH
    assert "caller's fault" in str(info.value)


def test_empty_and_full() -> None:
    _, w, r = ring_pair(4096)
    with pytest.raises(RingEmpty):
        r.read()
    written = 0
    with pytest.raises(RingFull) as info:
        while True:
            w.write_inband(b"z" * 100)
            written += 1
    assert info.value.needed == in_band_size(100) == 128
    assert written == 4088 // 128
    assert w.free_bytes() == 4088 - written * 128
    assert len(r.read_batch(1000)) == written
    with pytest.raises(RingEmpty):
        r.read()


def test_packets_wrap_around_the_end() -> None:
    buf, w, r = ring_pair(4096)
    sent = []
    for i in range(200):
        payload = bytes([i]) * (i % 300 + 1)
        w.write_inband(payload, transaction_id=i)
        sent.append(payload)
        packet = r.read()
        assert packet.transaction_id == i
        assert bytes(packet.payload)[: len(payload)] == payload
        r.commit()
    assert words(buf)[0] == words(buf)[1]


def test_gpa_direct_packet_round_trip() -> None:
    _, w, r = ring_pair()
    ranges = MultiPagedRange((PagedRange(5000, 8, (1, 2)), PagedRange(10, 0, (3,))))
    w.write(OutgoingPacket(PacketType.GPA_DIRECT, b"data", transaction_id=7, gpa_ranges=ranges))
    packet = r.read()
    assert packet.kind == PacketType.GPA_DIRECT
    assert packet.completion_requested  # always requested for GPA-direct packets
    assert packet.gpa_ranges() == ranges
    assert bytes(packet.payload)[:4] == b"data"


def test_transfer_page_packet_round_trip() -> None:
    _, w, r = ring_pair()
    tp = TransferPages(3, (TransferPageRange(100, 0), TransferPageRange(50, 4096)))
    w.write(OutgoingPacket(PacketType.TRANSFER_PAGES, b"tp", transaction_id=9, transfer_pages=tp))
    packet = r.read()
    assert packet.kind == PacketType.TRANSFER_PAGES and packet.completion_requested
    assert packet.transfer_pages() == tp


def test_completion_packet() -> None:
    _, w, r = ring_pair()
    w.write_completion(0xDEAD, b"ok")
    packet = r.read()
    assert (packet.kind, packet.transaction_id, packet.completion_requested) == (11, 0xDEAD, False)


def test_malformed_gpa_range_in_packet_is_reported_when_parsed() -> None:
    buf, _, r = ring_pair()
    put_descriptor(buf, 0, 9, 4, 4)
    struct.pack_into("<IIQ", buf, 4096 + 16, 0, 1, 0 | 0x1000 << 32)  # offset too large
    set_word(buf, 0, 40)
    with pytest.raises(GpaRangeError):
        r.read().gpa_ranges()


@pytest.mark.parametrize("kind", [9, 7])
def test_malformed_gpa_direct_and_transfer_page_packets(kind: int) -> None:
    # upstream test_malformed_*_packet: data_offset8 = 2 leaves no room for the extension.
    buf, _, r = ring_pair()
    put_descriptor(buf, 0, kind, 2, 2)
    set_word(buf, 0, 24)
    with pytest.raises(RingError) as info:
        r.read()
    assert info.value.kind is RingErrorKind.INVALID_DESCRIPTOR_LENGTHS


def test_gpa_direct_without_ranges_and_transfer_ranges_overflowing() -> None:
    buf, _, r = ring_pair()
    put_descriptor(buf, 0, 9, 3, 3)
    struct.pack_into("<II", buf, 4096 + 16, 0, 0)
    set_word(buf, 0, 32)
    with pytest.raises(RingError) as info:
        r.read()
    assert info.value.kind is RingErrorKind.INVALID_DESCRIPTOR_LENGTHS
    put_descriptor(buf, 0, 7, 3, 3)
    struct.pack_into("<HHI", buf, 4096 + 16, 0, 0, 1)  # one range, no room for it
    with pytest.raises(RingError) as info:
        r.read()
    assert info.value.kind is RingErrorKind.INVALID_DESCRIPTOR_LENGTHS


@pytest.mark.parametrize(
    ("in_index", "descriptor", "kind"),
    [
        (12, None, RingErrorKind.INVALID_RING_POINTER),
        (4096, None, RingErrorKind.INVALID_RING_POINTER),
        (8, None, RingErrorKind.INVALID_DATA_AVAILABLE),
        (32, (6, 3, 2, 0), RingErrorKind.INVALID_DESCRIPTOR_LENGTHS),  # length8 < data_offset8
        (32, (6, 1, 3, 0), RingErrorKind.INVALID_DESCRIPTOR_LENGTHS),  # data_offset8 < 2
        (32, (6, 2, 5, 0), RingErrorKind.INVALID_DESCRIPTOR_LENGTHS),  # longer than available
        (24, (6, 2, 3, 0), RingErrorKind.INVALID_DESCRIPTOR_LENGTHS),  # footer not available
        (32, (6, 2, 3, 2), RingErrorKind.INVALID_DESCRIPTOR_FLAGS),
        (32, (5, 2, 3, 0), RingErrorKind.INVALID_DESCRIPTOR_TYPE),
    ],
)
def test_reader_corruption_checks(in_index: int, descriptor: tuple[int, int, int, int] | None,
                                  kind: RingErrorKind) -> None:
    buf, _, r = ring_pair()
    if descriptor is not None:
        put_descriptor(buf, 0, *descriptor)
    set_word(buf, 0, in_index)
    with pytest.raises(RingError) as info:
        r.read()
    assert info.value.kind is kind
    assert "peer's fault" in str(info.value)


def test_endpoint_refuses_corrupt_own_index_at_creation() -> None:
    buf = bytearray(8192)
    set_word(buf, 1, 5000)
    with pytest.raises(RingError) as info:
        IncomingRing(RingMemory.from_view(buf))
    assert info.value.kind is RingErrorKind.INVALID_RING_POINTER


def test_ring_memory_must_be_whole_pages() -> None:
    with pytest.raises(RingError) as info:
        RingMemory.from_view(bytearray(4096 + 100))
    assert info.value.kind is RingErrorKind.INVALID_RING_MEMORY
    with pytest.raises(RingError):
        RingMemory.from_view(bytearray(4096))
    memory = GuestMemory.anonymous(4 * 4096)
    with pytest.raises(RingError) as info:
        RingMemory.from_pages(memory, [0, 99])
    assert info.value.kind is RingErrorKind.INVALID_RING_MEMORY


def test_restored_endpoints_continue_where_the_ring_was() -> None:
    buf, w, r = ring_pair()
    w.write_inband(b"one")
    w.write_inband(b"two")
    r.read()
    r.commit()
    mem = RingMemory.from_view(buf)
    w2, r2 = OutgoingRing(mem), IncomingRing(mem)
    assert bytes(r2.read().payload)[:3] == b"two"
    w2.write_inband(b"three")
    assert bytes(r2.read().payload)[:5] == b"three"


def test_peek_consume_rollback_and_overwrite() -> None:
    _, w, r = ring_pair()
    w.write_inband(b"abcdefgh")
    w.write_inband(b"second!!")
    packet = r.peek()
    assert r.peek() == packet
    r.overwrite(packet, 0, b"AB")
    r.consume(packet)
    assert bytes(r.read().payload) == b"second!!"
    r.rollback()
    assert bytes(r.read().payload) == b"ABcdefgh"
    with pytest.raises(ValueError):
        r.overwrite(packet, 7, b"xy")


def test_scattered_pages_behave_like_contiguous_memory() -> None:
    memory = GuestMemory.anonymous(16 * 4096)
    mem = RingMemory.from_pages(memory, [3, 9, 4, 12])
    assert mem.data is None and mem.data_len == 3 * 4096
    w, r = OutgoingRing(mem), IncomingRing(mem)
    w.write_inband(b"first")
    # The data area starts at page 9, then page 4, then page 12.
    assert memory.read(9 * 4096 + 16, 5) == b"first"
    w.write_inband(b"x" * (4096 - 48) + b"second")  # its payload starts at data offset 48
    assert memory.read(4 * 4096, 6) == b"second"
    r.read_batch()
    r.commit()
    for i in range(50):
        payload = bytes([i % 256]) * (1000 + 37 * i)
        w.write_inband(payload, transaction_id=i)
        packet = r.read()
        assert bytes(packet.payload)[: len(payload)] == payload
        r.commit()
    # Contiguous pages take the fast path.
    assert RingMemory.from_pages(memory, [0, 1, 2]).data is not None


PACKETS = st.lists(
    st.tuples(st.sampled_from(["inband", "completion", "gpa", "xfer"]),
              st.binary(max_size=700), st.integers(0, 2**64 - 1)),
    max_size=40,
)


def outgoing(kind: str, payload: bytes, tid: int) -> OutgoingPacket:
    if kind == "gpa":
        return OutgoingPacket(PacketType.GPA_DIRECT, payload, tid,
                              gpa_ranges=MultiPagedRange((PagedRange(100, 5, (tid % 1000,)),)))
    if kind == "xfer":
        return OutgoingPacket(PacketType.TRANSFER_PAGES, payload, tid,
                              transfer_pages=TransferPages(1, (TransferPageRange(1, 2),)))
    k = PacketType.IN_BAND if kind == "inband" else PacketType.COMPLETION
    return OutgoingPacket(k, payload, tid, completion_requested=kind == "inband" and tid % 2 == 1)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([1, 2, 3, 5, 8]), st.booleans(), PACKETS, st.integers(1, 7))
def test_random_packet_sequences_round_trip(pages: int, scattered: bool,
                                            packets: list[tuple[str, bytes, int]],
                                            burst: int) -> None:
    if scattered:
        memory = GuestMemory.anonymous((2 * pages + 2) * 4096)
        mem = RingMemory.from_pages(memory, [0, *range(2 * pages, 0, -2)])
    else:
        mem = RingMemory.from_view(bytearray(4096 * (pages + 1)))
    w, r = OutgoingRing(mem), IncomingRing(mem)
    pending = list(packets)
    received: list[tuple[int, bytes, int, bool]] = []
    expected = [(outgoing(*p).kind, p[1], p[2]) for p in packets]
    while pending or len(received) < len(packets):
        batch = []
        for p in pending[:burst]:
            op = outgoing(*p)
            size = in_band_size(len(p[1]) + len(op.extension()))
            if size > w.maximum_packet_size:
                with pytest.raises(RingError):
                    w.write(op)
                expected.remove((op.kind, p[1], p[2]))
                pending.remove(p)
                continue
            batch.append(p)
        try:
            for p in batch:
                w.write(outgoing(*p))
                pending.remove(p)
        except RingFull:
            pass
        for packet in r.read_batch(burst) if not r.is_empty() else []:
            received.append((packet.kind, bytes(packet.payload), packet.transaction_id,
                             packet.completion_requested))
        r.commit()
    assert [(k, p[: len(e)], t) for (k, p, t, _), (_, e, _) in zip(received, expected,
                                                                     strict=True)] == expected
    assert all(len(p) % 8 == 0 for _, p, _, _ in received)


# Plausible indices and descriptors, so that fuzzing gets past the first checks.
INDICES = st.one_of(st.none(), st.integers(0, 1023).map(lambda i: i * 8))
DESCRIPTORS = st.lists(
    st.tuples(st.integers(0, 1023), st.sampled_from([6, 7, 9, 11, 5, 0xFFFF]),
              st.integers(0, 6), st.integers(0, 700), st.integers(0, 3), st.integers(0, 3)),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=128, max_size=128), st.binary(min_size=0, max_size=8192),
       st.sampled_from([4096, 8192]), st.binary(max_size=300), INDICES, INDICES, DESCRIPTORS)
def test_arbitrary_ring_memory_is_contained(
    control: bytes, data: bytes, data_len: int, payload: bytes, in_index: int | None,
    out_index: int | None, descriptors: list[tuple[int, int, int, int, int, int]],
) -> None:
    guard = b"\xa5" * 4096
    buf = bytearray(guard + control + bytes(4096 - 128) + data[:data_len].ljust(data_len, b"\0")
                    + guard)
    if out_index is not None and descriptors:
        descriptors[0] = (out_index // 8, *descriptors[0][1:])  # a packet where reading starts
    for slot, kind, doff8, len8, flags, count in descriptors:
        offset = 4096 + 4096 + slot * 8 % data_len
        if offset + 24 <= 8192 + data_len:
            DESC.pack_into(buf, offset, kind, doff8, len8, flags, 0)
            struct.pack_into("<II", buf, offset + 16, 0, count)
    if in_index is not None:
        struct.pack_into("<I", buf, 4096, in_index % data_len)
    if out_index is not None:
        struct.pack_into("<I", buf, 4100, out_index % data_len)
    mem = RingMemory.from_view(memoryview(buf)[4096 : 4096 + 4096 + data_len])
    ok = (RingError, RingEmpty, RingFull)
    try:
        r = IncomingRing(mem)
        for _ in range(20):
            packet = r.read()
            if packet.kind == PacketType.GPA_DIRECT:
                with contextlib.suppress(GpaRangeError):
                    packet.gpa_ranges()
            elif packet.kind == PacketType.TRANSFER_PAGES:
                packet.transfer_pages()
            if len(packet.payload) >= 2:
                r.overwrite(packet, 0, b"PP")
        r.commit()
    except ok:
        pass
    try:
        w = OutgoingRing(mem)
        for _ in range(5):
            w.write_inband(payload)
        w.write_inband_batch([payload] * 3)
    except ok:
        pass
    assert buf[:4096] == guard and buf[-4096:] == guard


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=128, max_size=128), st.binary(max_size=8192), st.binary(max_size=300))
def test_arbitrary_scattered_ring_memory_is_contained(control: bytes, data: bytes,
                                                      payload: bytes) -> None:
    data = data.ljust(8192, b"\0")
    # Ring pages 5 (control), 2 and 7 (data) of an 8-page memory; every other page is a guard.
    memory = GuestMemory.anonymous(8 * 4096)
    memory.fill(0, 8 * 4096, 0xA5)
    memory.write(5 * 4096, control.ljust(4096, b"\0"))
    memory.write(2 * 4096, data[:4096])
    memory.write(7 * 4096, data[4096:])
    mem = RingMemory.from_pages(memory, [5, 2, 7])
    try:
        r = IncomingRing(mem)
        for packet in r.read_batch(20):
            if len(packet.payload) >= 2:
                r.overwrite(packet, len(packet.payload) - 2, b"PP")
        r.commit()
    except (RingError, RingEmpty, RingFull):
        pass
    with contextlib.suppress(RingError, RingEmpty, RingFull):
        w = OutgoingRing(mem)
        for _ in range(5):
            w.write_inband(payload)
    for guard in (0, 1, 3, 4, 6):
        assert memory.read(guard * 4096, 4096) == b"\xa5" * 4096
