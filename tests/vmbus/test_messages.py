"""VMBus control messages: byte-exact against the layouts of facts §2.6, and fuzzed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.vmbus.guid import Guid
from devicehost.vmbus.messages import (
    MAX_MESSAGE_SIZE,
    AllOffersDelivered,
    CloseChannel,
    GpadlBody,
    GpadlCreated,
    GpadlHeader,
    GpadlTeardown,
    GpadlTorndown,
    InitiateContact,
    MemoryRegionEntry,
    MemoryTable,
    Message,
    MessageType,
    ModifyChannel,
    ModifyChannelResponse,
    OfferChannelMessage,
    OpenChannel,
    OpenResult,
    RelIdReleased,
    RequestOffers,
    RescindChannelOffer,
    Unload,
    UnloadComplete,
    Version,
    VersionResponse,
    decode_message_untrusted,
    encode_message,
)
from devicehost.vmbus.protocol import OfferChannel, OfferFlags, VmbusProtocolError

IFACE = Guid.parse("c376c1c3-d276-48d2-90a9-c04748072c60")
INST = Guid.parse("c4e5e7d1-d748-4afc-979d-683167910a55")


def header(kind: int) -> bytes:
    return struct.pack("<II", kind, 0)


def u32(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def test_upstream_examples() -> None:
    # facts §2.6: the encodings upstream's tests check.
    assert encode_message(CloseChannel(5)) == bytes.fromhex("07000000 00000000 05000000")
    assert encode_message(Unload()) == bytes.fromhex("10000000 00000000")
    assert encode_message(GpadlHeader(5, 1, 7, 6, bytes.fromhex("0a0b0c0d"))) == bytes.fromhex(
        "08000000 00000000 05000000 01000000 0700 0600 0a0b0c0d")


OPEN_USER = bytes(range(120))
OFFER = OfferChannel(IFACE, INST, flags=OfferFlags.NAMED_PIPE_MODE, mmio_megabytes=2,
                     user_defined=b"\x04", subchannel_index=1, mmio_megabytes_optional=3,
                     channel_id=7, monitor_id=0xFF, monitor_allocated=False, is_dedicated=1,
                     connection_id=0x2007)

# (message, the bytes facts §2.6 lays it out as)
EXACT: list[tuple[Message, bytes]] = [
    (RequestOffers(), header(3)),
    (AllOffersDelivered(), header(4)),
    (Unload(), header(16)),
    (UnloadComplete(), header(17)),
    (RescindChannelOffer(9), header(2) + u32(9)),
    (CloseChannel(0x01020304), header(7) + bytes([4, 3, 2, 1])),
    (RelIdReleased(11), header(13) + u32(11)),
    (GpadlBody(0xAB, struct.pack("<2Q", 1, 2)),
     header(9) + u32(0, 0xAB) + struct.pack("<2Q", 1, 2)),
    (GpadlCreated(3, 0xE1E10, 0x8000FFFF), header(10) + u32(3, 0xE1E10, 0x8000FFFF)),
    (GpadlTeardown(3, 0xE1E10), header(11) + u32(3, 0xE1E10)),
    (GpadlTorndown(0xE1E10), header(12) + u32(0xE1E10)),
    (OpenChannel(7, 8, 9, 0xFFFFFFFF, 5, OPEN_USER),
     header(5) + u32(7, 8, 9, 0xFFFFFFFF, 5) + OPEN_USER),
    (OpenChannel(7, 8, 9, 1, 5, OPEN_USER, connection_id=0x2007, event_flag=3, flags=1),
     header(5) + u32(7, 8, 9, 1, 5) + OPEN_USER + u32(0x2007) + struct.pack("<HH", 3, 1)),
    (OpenResult(7, 8, 0), header(6) + u32(7, 8, 0)),
    (ModifyChannel(7, 2), header(22) + u32(7, 2)),
    (ModifyChannelResponse(7, 0xC0000001), header(24) + u32(7, 0xC0000001)),
    (InitiateContact(0x00060000, 1, 0x0000000500000102, 0x1000, 0x2000),
     header(14) + u32(0x00060000, 1) + struct.pack("<QQQ", 0x0000000500000102, 0x1000, 0x2000)),
    (InitiateContact(0x00050002, client_id=IFACE),
     header(14) + u32(0x00050002, 0) + bytes(24) + IFACE.bytes_le),
    (VersionResponse(True, 0, 0x12345678),
     header(15) + bytes([1, 0, 0, 0]) + u32(0x12345678)),
    (VersionResponse(False, 2, 0, supported_features=0x5),
     header(15) + bytes([0, 2, 0, 0]) + u32(0, 5)),
    (VersionResponse(True, 0, 1, supported_features=0, monitor_pages=(0x3000, 0x4000)),
     header(15) + bytes([1, 0, 0, 0]) + u32(1, 0, 0) + struct.pack("<QQ", 0x3000, 0x4000)),
    (MemoryTable((MemoryRegionEntry(0x100000, 0x200000, 0x1000),)),
     header(0x44480001) + u32(1, 0) + struct.pack("<QQQ", 0x100000, 0x200000, 0x1000)),
]


@pytest.mark.parametrize(("message", "wire"), EXACT, ids=lambda v: type(v).__name__)
def test_byte_exact(message: Message, wire: bytes) -> None:
    assert encode_message(message) == wire
    assert decode_message_untrusted(wire) == message


def test_offer_channel_is_the_188_byte_offer_body() -> None:
    wire = encode_message(OfferChannelMessage(OFFER))
    assert len(wire) == 8 + 188 and wire[:8] == header(1)
    body = wire[8:]
    assert body[0:16] == IFACE.bytes_le and body[16:32] == INST.bytes_le
    assert body[32:48] == bytes(16)
    assert struct.unpack_from("<HH", body, 48) == (0x10, 2)
    assert body[52:56] == b"\x04\0\0\0"
    assert struct.unpack_from("<HHIBBHI", body, 172) == (1, 3, 7, 0xFF, 0, 1, 0x2007)
    assert decode_message_untrusted(wire) == OfferChannelMessage(OFFER)


def test_gpadl_header_and_body_capacity_fill_one_synic_message() -> None:
    header_msg = GpadlHeader(1, 2, 8 * 27, 1, bytes(8 * 27))
    body_msg = GpadlBody(2, bytes(8 * 28))
    assert len(encode_message(header_msg)) == 236
    assert len(encode_message(body_msg)) == MAX_MESSAGE_SIZE
    with pytest.raises(ValueError, match="at most 240"):
        encode_message(GpadlBody(2, bytes(8 * 29)))


def test_field_out_of_range_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="CloseChannel"):
        encode_message(CloseChannel(1 << 32))


@pytest.mark.parametrize(
    ("kind", "size"),
    [(2, 4), (5, 140), (6, 12), (7, 4), (8, 12), (9, 8), (10, 12), (11, 8), (12, 4), (13, 4),
     (14, 32), (15, 8), (22, 8), (24, 8), (1, 188), (0x44480001, 8)],
)
def test_short_bodies_are_refused(kind: int, size: int) -> None:
    decode_message_untrusted(header(kind) + bytes(size))  # exactly enough is fine
    with pytest.raises(VmbusProtocolError, match="too small"):
        decode_message_untrusted(header(kind) + bytes(size - 1))


def test_trailing_bytes_are_ignored_except_gpadl_ranges() -> None:
    assert decode_message_untrusted(header(7) + u32(5) + b"junk") == CloseChannel(5)
    msg = decode_message_untrusted(header(8) + u32(1, 2) + struct.pack("<HH", 8, 1) + bytes(8))
    assert msg == GpadlHeader(1, 2, 8, 1, bytes(8))


@pytest.mark.parametrize("raw", [0, 18, 19, 20, 21, 23, 25, 26, 27, 28, 29, 30, 0xFFFFFFFF])
def test_unknown_and_unsupported_types_are_refused(raw: int) -> None:
    with pytest.raises(VmbusProtocolError, match="message type"):
        decode_message_untrusted(header(raw) + bytes(64))


def test_message_sizes_outside_the_synic_payload_are_refused() -> None:
    with pytest.raises(VmbusProtocolError, match="header"):
        decode_message_untrusted(b"\x07\0\0")
    with pytest.raises(VmbusProtocolError, match="at most 240"):
        decode_message_untrusted(header(3) + bytes(233))


def test_types_newer_than_the_negotiated_version_are_refused() -> None:
    modify = encode_message(ModifyChannel(1, 0))
    assert decode_message_untrusted(modify, Version.WIN10_RS3_0) == ModifyChannel(1, 0)
    with pytest.raises(VmbusProtocolError, match="not allowed"):
        decode_message_untrusted(modify, Version.WIN10)
    with pytest.raises(VmbusProtocolError, match="not allowed"):
        decode_message_untrusted(encode_message(UnloadComplete()), Version.V1)
    with pytest.raises(VmbusProtocolError, match="not allowed"):
        decode_message_untrusted(encode_message(ModifyChannelResponse(1, 0)), Version.WIN10_RS5)


def test_memory_table_region_count_is_bounded() -> None:
    with pytest.raises(VmbusProtocolError, match="at most 9"):
        decode_message_untrusted(header(0x44480001) + u32(10, 0) + bytes(200))
    with pytest.raises(VmbusProtocolError, match="too small"):
        decode_message_untrusted(header(0x44480001) + u32(2, 0) + bytes(24))


def test_initiate_contact_target_info() -> None:
    msg = InitiateContact(Version.COPPER, interrupt_page_or_target_info=(0x41 << 32) | 2)
    assert msg.feature_flags == 0x41 and msg.sint == 2


KINDS = [int(k) for k in MessageType]


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.binary(max_size=260),
    st.builds(lambda k, body: header(k) + body, st.sampled_from(KINDS), st.binary(max_size=240)),
), st.sampled_from([None, *[int(v) for v in Version]]))
def test_decoder_raises_only_its_error(data: bytes, version: int | None) -> None:
    try:
        message = decode_message_untrusted(data, version)
    except VmbusProtocolError:
        return
    # Whatever decodes re-encodes to a prefix-compatible message of the same type.
    again = encode_message(message)
    assert again[:4] == data[:4]
    assert decode_message_untrusted(again, version) == message
