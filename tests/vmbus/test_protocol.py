"""The VMBus data model: offer flags and user_defined per channel type, the OfferChannel body."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.vmbus.guid import Guid
from devicehost.vmbus.protocol import (
    OFFER_CHANNEL_SIZE,
    ChannelRequest,
    ChannelType,
    DeviceChannel,
    GpadlRequest,
    HvSocketChannel,
    InterfaceChannel,
    OfferChannel,
    OfferFlags,
    OfferKey,
    OfferParams,
    OpenChannelRequest,
    PipeChannel,
    RestoredGpadl,
    RestoreResult,
    ServerRequest,
    VmbusProtocolError,
    connection_id_for,
    decode_offer_channel_untrusted,
    encode_offer_channel,
    offer_flags_for,
    user_defined_for,
)

IFACE = Guid.parse("c376c1c3-d276-48d2-90a9-c04748072c60")
INST = Guid.parse("c4e5e7d1-d748-4afc-979d-683167910a55")
SILO = Guid.parse("cf127acc-c960-41e4-9b1e-513e8a89147d")


def params(channel_type: ChannelType, **kw: object) -> OfferParams:
    return OfferParams("test", INST, IFACE, channel_type=channel_type, **kw)  # type: ignore[arg-type]


def test_offer_key_text_form() -> None:
    key = params(DeviceChannel(), subchannel_index=3).key
    assert key == OfferKey(IFACE, INST, 3)
    assert str(key) == (
        "{c376c1c3-d276-48d2-90a9-c04748072c60}-{c4e5e7d1-d748-4afc-979d-683167910a55}-3"
    )


def test_variant_aliases() -> None:
    assert ChannelType.Device(pipe_packets=True) == DeviceChannel(pipe_packets=True)
    assert ChannelType.Pipe is PipeChannel and ChannelType.HvSocket is HvSocketChannel
    assert ChannelType.Interface is InterfaceChannel
    assert ChannelRequest.Open is OpenChannelRequest
    assert ServerRequest.Restore(was_open=True).was_open


def test_plain_device() -> None:
    p = params(DeviceChannel())
    assert offer_flags_for(p) == OfferFlags.CONFIDENTIAL_RING_BUFFER
    assert user_defined_for(p.channel_type) == bytes(120)


def test_device_with_pipe_packets_is_message_pipe_mode() -> None:
    p = params(DeviceChannel(pipe_packets=True))
    assert int(offer_flags_for(p)) == 0x10 | 0x2
    assert user_defined_for(p.channel_type) == b"\x04\0\0\0" + bytes(116)


def test_confidential_flags() -> None:
    p = params(DeviceChannel(), allow_confidential_external_memory=True)
    assert int(offer_flags_for(p)) == 0x2 | 0x4
    assert int(offer_flags_for(p, confidential_channels=False)) == 0x4


def test_interface_copies_user_defined() -> None:
    data = bytes(range(120))
    p = params(InterfaceChannel(user_defined=data))
    assert int(offer_flags_for(p)) == 0x1 | 0x2
    assert user_defined_for(p.channel_type) == data
    assert InterfaceChannel(user_defined=b"ab").user_defined == b"ab" + bytes(118)
    with pytest.raises(ValueError):
        InterfaceChannel(user_defined=bytes(121))


@pytest.mark.parametrize(("message_mode", "pipe_type"), [(True, 4), (False, 0)])
def test_pipe_params(message_mode: bool, pipe_type: int) -> None:
    user = bytes(range(1, 113))
    p = params(PipeChannel(message_mode=message_mode, user_defined=user, pipe_flags=1))
    assert int(offer_flags_for(p)) == 0x1 | 0x10 | 0x2
    data = user_defined_for(p.channel_type)
    assert len(data) == 120
    assert struct.unpack_from("<I", data, 0)[0] == pipe_type
    assert data[4:116] == user
    assert struct.unpack_from("<I", data, 116)[0] == 1


def test_hvsocket_params() -> None:
    p = params(HvSocketChannel(is_connect=True, is_for_container=False, silo_id=SILO))
    assert int(offer_flags_for(p)) == 0x1 | 0x2000 | 0x10 | 0x2
    data = user_defined_for(p.channel_type)
    assert data[0:4] == b"\0\0\0\0"  # BYTE pipe
    assert data[4] == 1 and data[5] == 0
    assert data[6:10] == b"\x01\0\0\0"  # version RS5, unaligned
    assert data[10:26] == SILO.bytes_le
    assert data[26:] == bytes(94)
    container = user_defined_for(HvSocketChannel(is_connect=False, is_for_container=True))
    assert container[4] == 0 and container[5] == 1


def test_offer_params_validation() -> None:
    with pytest.raises(ValueError):
        params(DeviceChannel(), mmio_megabytes=0x10000)
    with pytest.raises(TypeError):
        OfferParams("x", INST, IFACE, channel_type=ChannelType())


def test_offer_channel_layout() -> None:
    p = params(DeviceChannel(pipe_packets=True), mmio_megabytes=7, mmio_megabytes_optional=9,
               subchannel_index=2)
    offer = OfferChannel.for_params(p, channel_id=5)
    body = encode_offer_channel(offer)
    assert len(body) == OFFER_CHANNEL_SIZE == 188
    assert body[0:16] == IFACE.bytes_le
    assert body[16:32] == INST.bytes_le
    assert body[32:48] == bytes(16)
    assert struct.unpack_from("<HH", body, 48) == (0x12, 7)
    assert body[52:172] == b"\x04" + bytes(119)
    assert struct.unpack_from("<HHIBBHI", body, 172) == (
        2, 9, 5, 0xFF, 0, 1, 5 | (2 << 12)
    )
    assert offer.connection_id == connection_id_for(5)
    assert decode_offer_channel_untrusted(body) == offer
    assert offer.key == p.key


def test_decode_keeps_reserved_flag_bits_and_ignores_trailing_bytes() -> None:
    offer = OfferChannel(IFACE, INST, flags=OfferFlags(0xFFFF), monitor_id=3,
                         monitor_allocated=True, channel_id=9)
    body = encode_offer_channel(offer)
    assert body[48:50] == b"\xff\xff" and body[180:182] == b"\x03\x01"
    decoded = decode_offer_channel_untrusted(body + b"trailing")
    assert int(decoded.flags) == 0xFFFF and decoded == offer


@pytest.mark.parametrize("size", [0, 1, 187])
def test_decode_short_body_fails(size: int) -> None:
    with pytest.raises(VmbusProtocolError, match="188"):
        decode_offer_channel_untrusted(bytes(size))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=260))
def test_decode_arbitrary_bodies(data: bytes) -> None:
    try:
        offer = decode_offer_channel_untrusted(data)
    except VmbusProtocolError:
        assert len(data) < 188
        return
    body = encode_offer_channel(offer)
    # Everything but the reserved words and a non-0/1 monitor_allocated byte survives re-encoding.
    assert body[:32] == data[:32] and body[48:181] == data[48:181]
    assert body[182:188] == data[182:188]
    assert body[181] == (data[181] != 0)


@settings(max_examples=200, deadline=None)
@given(
    st.builds(
        OfferChannel,
        interface_id=st.binary(min_size=16, max_size=16).map(Guid.from_bytes),
        instance_id=st.binary(min_size=16, max_size=16).map(Guid.from_bytes),
        flags=st.integers(0, 0xFFFF).map(OfferFlags),
        mmio_megabytes=st.integers(0, 0xFFFF),
        user_defined=st.binary(min_size=120, max_size=120),
        subchannel_index=st.integers(0, 0xFFFF),
        mmio_megabytes_optional=st.integers(0, 0xFFFF),
        channel_id=st.integers(0, 0xFFFFFFFF),
        monitor_id=st.integers(0, 0xFF),
        monitor_allocated=st.booleans(),
        is_dedicated=st.integers(0, 0xFFFF),
        connection_id=st.integers(0, 0xFFFFFFFF),
    )
)
def test_offer_channel_round_trip(offer: OfferChannel) -> None:
    assert decode_offer_channel_untrusted(encode_offer_channel(offer)) == offer


def test_request_values() -> None:
    gpadl = GpadlRequest(id=7, count=1, buf=[4096, 10])
    assert gpadl.buf == (4096, 10)
    result = RestoreResult(open_request=None, gpadls=[RestoredGpadl(gpadl)])
    assert result.gpadls == (RestoredGpadl(gpadl, accepted=True),)
