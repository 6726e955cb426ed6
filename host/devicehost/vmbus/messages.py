"""VMBus control-plane messages (facts §2) as bytes: what the VMBus socket carries.

Every message is one synic message: an 8-byte header (``message_type u32``, ``padding u32``, zero
when sent) and a body, at most :data:`MAX_MESSAGE_SIZE` (240) bytes in all. Each message is a
frozen attrs value; :func:`encode_message` gives its bytes and :func:`decode_message_untrusted`
reads bytes from a peer, raising :class:`~devicehost.vmbus.protocol.VmbusProtocolError` only.

Pure: no I/O. The body layouts are those of facts §2.6 (byte-layout comments beside each
``struct.Struct``). Decoding rules, as upstream's parser:

- A body shorter than its struct is an error ("too small"); bytes after the struct are accepted
  and ignored, except for GPADL_HEADER/GPADL_BODY, whose trailing bytes are the range data.
- INITIATE_CONTACT is InitiateContact2 (with ``client_id``) when the body has >= 48 bytes;
  VERSION_RESPONSE is VersionResponse3/2/1 by body size; OPEN_CHANNEL is OpenChannel2 when the
  body has >= 148 bytes (its extra fields are decoded, and unused by this server).
- With ``version`` given, a type the negotiated version does not have is an error: UNLOAD_COMPLETE
  needs Win7, MODIFY_CHANNEL Win10Rs3_0, MODIFY_CHANNEL_RESPONSE Iron.
- Types this implementation does not speak (reserved channels, TL connect, modify connection,
  pause/resume) are errors.

One type is devicehost's own: :class:`MemoryTable` (type :data:`MEMORY_TABLE_TYPE`), which a
socket guest sends once before INITIATE_CONTACT with its memory fds (``docs/vmbus-socket.md``).
"""

from __future__ import annotations

import enum
import struct
from typing import ClassVar, Final

import attrs

from devicehost.vmbus.guid import Guid
from devicehost.vmbus.protocol import (
    OFFER_CHANNEL_SIZE,
    USER_DEFINED_SIZE,
    OfferChannel,
    VmbusProtocolError,
    decode_offer_channel_untrusted,
    encode_offer_channel,
)

__all__ = [
    "GPADL_BODY_MAX_WORDS",
    "GPADL_HEADER_MAX_WORDS",
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "MEMORY_TABLE_MAX_REGIONS",
    "MEMORY_TABLE_TYPE",
    "SUPPORTED_VERSIONS",
    "AllOffersDelivered",
    "CloseChannel",
    "GpadlBody",
    "GpadlCreated",
    "GpadlHeader",
    "GpadlTeardown",
    "GpadlTorndown",
    "InitiateContact",
    "MemoryRegionEntry",
    "MemoryTable",
    "Message",
    "MessageType",
    "ModifyChannel",
    "ModifyChannelResponse",
    "OfferChannelMessage",
    "OpenChannel",
    "OpenResult",
    "RelIdReleased",
    "RequestOffers",
    "RescindChannelOffer",
    "Unload",
    "UnloadComplete",
    "Version",
    "VersionResponse",
    "decode_message_untrusted",
    "encode_message",
]

#: Largest synic message payload (HV_MESSAGE_PAYLOAD_SIZE): header + body.
MAX_MESSAGE_SIZE: Final = 240
HEADER_SIZE: Final = 8
#: u64 range words that fit after a GpadlHeader (12 bytes) and after a GpadlBody (8 bytes).
GPADL_HEADER_MAX_WORDS: Final = 27
GPADL_BODY_MAX_WORDS: Final = 28
#: devicehost's memory-table message type (outside Hyper-V's numbers).
MEMORY_TABLE_TYPE: Final = 0x44480001
#: Regions one MemoryTable can describe (one fd each).
MEMORY_TABLE_MAX_REGIONS: Final = 9


class MessageType(enum.IntEnum):
    """The message types of facts §2.1 that this implementation speaks, and MEMORY_TABLE."""

    OFFER_CHANNEL = 1
    RESCIND_CHANNEL_OFFER = 2
    REQUEST_OFFERS = 3
    ALL_OFFERS_DELIVERED = 4
    OPEN_CHANNEL = 5
    OPEN_CHANNEL_RESULT = 6
    CLOSE_CHANNEL = 7
    GPADL_HEADER = 8
    GPADL_BODY = 9
    GPADL_CREATED = 10
    GPADL_TEARDOWN = 11
    GPADL_TORNDOWN = 12
    REL_ID_RELEASED = 13
    INITIATE_CONTACT = 14
    VERSION_RESPONSE = 15
    UNLOAD = 16
    UNLOAD_COMPLETE = 17
    MODIFY_CHANNEL = 22
    MODIFY_CHANNEL_RESPONSE = 24
    MEMORY_TABLE = MEMORY_TABLE_TYPE


class Version(enum.IntEnum):
    """VMBus protocol versions, ``major << 16 | minor`` (facts §2.2)."""

    V1 = 0x0000000D
    WIN7 = 0x00010001
    WIN8 = 0x00020004
    WIN8_1 = 0x00030000
    WIN10 = 0x00040000
    WIN10_RS3_0 = 0x00040001
    WIN10_RS3_1 = 0x00050000
    WIN10_RS4 = 0x00050001
    WIN10_RS5 = 0x00050002
    IRON = 0x00050003
    COPPER = 0x00060000


#: Every version the socket server accepts (all of §2.2).
SUPPORTED_VERSIONS: Final = tuple(Version)

# Lowest version that has each type (types not listed exist in every version).
_MIN_VERSION: Final = {
    MessageType.UNLOAD_COMPLETE: Version.WIN7,
    MessageType.MODIFY_CHANNEL: Version.WIN10_RS3_0,
    MessageType.MODIFY_CHANNEL_RESPONSE: Version.IRON,
}

# Header (8 bytes): message_type u32 @0, padding u32 @4.
_HEADER: Final = struct.Struct("<II")
# CloseChannel / RelIdReleased / RescindChannelOffer (4): channel_id u32 @0.
# GpadlTorndown (4): gpadl_id u32 @0.
_U32: Final = struct.Struct("<I")
# GpadlHeader (12 + ranges): channel_id u32 @0, gpadl_id u32 @4, len u16 @8, count u16 @10.
_GPADL_HEADER: Final = struct.Struct("<IIHH")
# GpadlBody (8 + ranges): rsvd u32 @0, gpadl_id u32 @4.
# GpadlTeardown (8): channel_id u32 @0, gpadl_id u32 @4.
# ModifyChannel (8): channel_id u32 @0, target_vp u32 @4.
# ModifyChannelResponse (8): channel_id u32 @0, status i32 @4 (carried as u32).
_TWO_U32: Final = struct.Struct("<II")
# GpadlCreated (12): channel_id u32 @0, gpadl_id u32 @4, status i32 @8 (carried as u32).
# OpenResult (12): channel_id u32 @0, open_id u32 @4, status u32 @8.
_THREE_U32: Final = struct.Struct("<III")
# OpenChannel (140): channel_id u32 @0, open_id u32 @4, ring_buffer_gpadl_id u32 @8,
#   target_vp u32 @12, downstream_ring_buffer_page_offset u32 @16, user_data[120] @20.
_OPEN_CHANNEL: Final = struct.Struct("<IIIII120s")
# OpenChannel2 (148): OpenChannel @0, connection_id u32 @140, event_flag u16 @144,
#   flags u16 @146.
_OPEN_CHANNEL2_EXT: Final = struct.Struct("<IHH")
# InitiateContact (32): version_requested u32 @0, target_message_vp u32 @4,
#   interrupt_page_or_target_info u64 @8, parent_to_child_monitor_page_gpa u64 @16,
#   child_to_parent_monitor_page_gpa u64 @24. InitiateContact2 (48): + client_id GUID @32.
_INITIATE_CONTACT: Final = struct.Struct("<IIQQQ")
# VersionResponse (8): version_supported u8 @0, connection_state u8 @1, padding u16 @2,
#   selected_version_or_connection_id u32 @4. VersionResponse2 (12): + supported_features
#   u32 @8. VersionResponse3 (32): + pad u32 @12, parent_to_child_monitor_page_gpa u64 @16,
#   child_to_parent_monitor_page_gpa u64 @24.
_VERSION_RESPONSE: Final = struct.Struct("<BBHI")
_VERSION_RESPONSE2_EXT: Final = struct.Struct("<I")
_VERSION_RESPONSE3_EXT: Final = struct.Struct("<4xQQ")
# MemoryTable (devicehost; 8 + 24 x count): count u32 @0, padding u32 @4, then per region
#   gpa u64, size u64, offset u64 (the region's start inside its fd).
_MEMORY_TABLE: Final = struct.Struct("<II")
_MEMORY_ENTRY: Final = struct.Struct("<QQQ")

assert _OPEN_CHANNEL.size == 140 and _INITIATE_CONTACT.size == 32
assert HEADER_SIZE + _GPADL_HEADER.size + 8 * GPADL_HEADER_MAX_WORDS <= MAX_MESSAGE_SIZE
assert HEADER_SIZE + 8 + 8 * GPADL_BODY_MAX_WORDS <= MAX_MESSAGE_SIZE
assert (HEADER_SIZE + _MEMORY_TABLE.size + _MEMORY_ENTRY.size * MEMORY_TABLE_MAX_REGIONS
        <= MAX_MESSAGE_SIZE)


def _user_data(value: bytes | bytearray | memoryview) -> bytes:
    data = bytes(value)
    if len(data) > USER_DEFINED_SIZE:
        raise ValueError(f"user_data holds at most {USER_DEFINED_SIZE} bytes")
    return data.ljust(USER_DEFINED_SIZE, b"\0")


@attrs.frozen
class Message:
    """Base of every control message; ``TYPE`` is its message type."""

    TYPE: ClassVar[MessageType]


@attrs.frozen
class _Empty(Message):
    pass


@attrs.frozen
class RequestOffers(_Empty):
    TYPE = MessageType.REQUEST_OFFERS


@attrs.frozen
class AllOffersDelivered(_Empty):
    TYPE = MessageType.ALL_OFFERS_DELIVERED


@attrs.frozen
class Unload(_Empty):
    TYPE = MessageType.UNLOAD


@attrs.frozen
class UnloadComplete(_Empty):
    TYPE = MessageType.UNLOAD_COMPLETE


@attrs.frozen
class _ChannelId(Message):
    channel_id: int


@attrs.frozen
class RescindChannelOffer(_ChannelId):
    TYPE = MessageType.RESCIND_CHANNEL_OFFER


@attrs.frozen
class CloseChannel(_ChannelId):
    TYPE = MessageType.CLOSE_CHANNEL


@attrs.frozen
class RelIdReleased(_ChannelId):
    TYPE = MessageType.REL_ID_RELEASED


@attrs.frozen
class OfferChannelMessage(Message):
    """OFFER_CHANNEL: the 188-byte :class:`OfferChannel` body."""

    TYPE = MessageType.OFFER_CHANNEL
    offer: OfferChannel


@attrs.frozen
class GpadlHeader(Message):
    """GPADL_HEADER: ``range_buflen`` bytes of ranges in all, the first of them in ``data``."""

    TYPE = MessageType.GPADL_HEADER
    channel_id: int
    gpadl_id: int
    range_buflen: int
    range_count: int
    data: bytes = b""


@attrs.frozen
class GpadlBody(Message):
    """GPADL_BODY: more range bytes of GPADL ``gpadl_id``."""

    TYPE = MessageType.GPADL_BODY
    gpadl_id: int
    data: bytes = b""
    rsvd: int = 0


@attrs.frozen
class GpadlCreated(Message):
    TYPE = MessageType.GPADL_CREATED
    channel_id: int
    gpadl_id: int
    status: int


@attrs.frozen
class GpadlTeardown(Message):
    TYPE = MessageType.GPADL_TEARDOWN
    channel_id: int
    gpadl_id: int


@attrs.frozen
class GpadlTorndown(Message):
    TYPE = MessageType.GPADL_TORNDOWN
    gpadl_id: int


@attrs.frozen
class OpenChannel(Message):
    """OPEN_CHANNEL; with ``connection_id`` set it is encoded as OpenChannel2 (148 bytes)."""

    TYPE = MessageType.OPEN_CHANNEL
    channel_id: int
    open_id: int
    ring_buffer_gpadl_id: int
    target_vp: int
    downstream_ring_buffer_page_offset: int
    user_data: bytes = attrs.field(default=bytes(USER_DEFINED_SIZE), converter=_user_data,
                                   repr=False)
    connection_id: int | None = None
    event_flag: int = 0
    flags: int = 0


@attrs.frozen
class OpenResult(Message):
    TYPE = MessageType.OPEN_CHANNEL_RESULT
    channel_id: int
    open_id: int
    status: int


@attrs.frozen
class ModifyChannel(Message):
    TYPE = MessageType.MODIFY_CHANNEL
    channel_id: int
    target_vp: int


@attrs.frozen
class ModifyChannelResponse(Message):
    TYPE = MessageType.MODIFY_CHANNEL_RESPONSE
    channel_id: int
    status: int


@attrs.frozen
class InitiateContact(Message):
    """INITIATE_CONTACT; with ``client_id`` set it is InitiateContact2 (48 bytes).

    For versions from Win10Rs3_1 on, ``interrupt_page_or_target_info`` holds the message SINT
    (bits 0-7), the VTL (bits 8-15) and the requested feature flags (bits 32-63).
    """

    TYPE = MessageType.INITIATE_CONTACT
    version_requested: int
    target_message_vp: int = 0
    interrupt_page_or_target_info: int = 0
    parent_to_child_monitor_page_gpa: int = 0
    child_to_parent_monitor_page_gpa: int = 0
    client_id: Guid | None = None

    @property
    def feature_flags(self) -> int:
        return self.interrupt_page_or_target_info >> 32

    @property
    def sint(self) -> int:
        return self.interrupt_page_or_target_info & 0xFF


@attrs.frozen
class VersionResponse(Message):
    """VERSION_RESPONSE; VersionResponse2 with ``supported_features``, VersionResponse3 with
    the monitor pages too."""

    TYPE = MessageType.VERSION_RESPONSE
    version_supported: bool
    connection_state: int = 0
    selected_version_or_connection_id: int = 0
    supported_features: int | None = None
    monitor_pages: tuple[int, int] | None = None


@attrs.frozen
class MemoryRegionEntry:
    """One region of a :class:`MemoryTable`: ``size`` bytes at guest address ``gpa``, starting
    ``offset`` bytes into the region's fd."""

    gpa: int
    size: int
    offset: int = 0


def _entries(value: tuple[MemoryRegionEntry, ...] | list[MemoryRegionEntry]
             ) -> tuple[MemoryRegionEntry, ...]:
    return tuple(value)


@attrs.frozen
class MemoryTable(Message):
    """devicehost's MEMORY_TABLE: the guest's memory regions, one fd each (in order)."""

    TYPE = MessageType.MEMORY_TABLE
    regions: tuple[MemoryRegionEntry, ...] = attrs.field(converter=_entries)


# -- encoding --------------------------------------------------------------------------------------


def _body(message: Message) -> bytes:
    if isinstance(message, _Empty):
        return b""
    if isinstance(message, _ChannelId):
        return _U32.pack(message.channel_id)
    if isinstance(message, OfferChannelMessage):
        return encode_offer_channel(message.offer)
    if isinstance(message, GpadlHeader):
        return _GPADL_HEADER.pack(message.channel_id, message.gpadl_id, message.range_buflen,
                                  message.range_count) + message.data
    if isinstance(message, GpadlBody):
        return _TWO_U32.pack(message.rsvd, message.gpadl_id) + message.data
    if isinstance(message, GpadlCreated):
        return _THREE_U32.pack(message.channel_id, message.gpadl_id, message.status)
    if isinstance(message, GpadlTeardown):
        return _TWO_U32.pack(message.channel_id, message.gpadl_id)
    if isinstance(message, GpadlTorndown):
        return _U32.pack(message.gpadl_id)
    if isinstance(message, OpenChannel):
        body = _OPEN_CHANNEL.pack(message.channel_id, message.open_id,
                                  message.ring_buffer_gpadl_id, message.target_vp,
                                  message.downstream_ring_buffer_page_offset, message.user_data)
        if message.connection_id is not None:
            body += _OPEN_CHANNEL2_EXT.pack(message.connection_id, message.event_flag,
                                            message.flags)
        return body
    if isinstance(message, OpenResult):
        return _THREE_U32.pack(message.channel_id, message.open_id, message.status)
    if isinstance(message, (ModifyChannel, ModifyChannelResponse)):
        second = message.target_vp if isinstance(message, ModifyChannel) else message.status
        return _TWO_U32.pack(message.channel_id, second)
    if isinstance(message, InitiateContact):
        body = _INITIATE_CONTACT.pack(message.version_requested, message.target_message_vp,
                                      message.interrupt_page_or_target_info,
                                      message.parent_to_child_monitor_page_gpa,
                                      message.child_to_parent_monitor_page_gpa)
        if message.client_id is not None:
            body += message.client_id.bytes_le
        return body
    if isinstance(message, VersionResponse):
        body = _VERSION_RESPONSE.pack(int(message.version_supported), message.connection_state,
                                      0, message.selected_version_or_connection_id)
        if message.supported_features is not None or message.monitor_pages is not None:
            body += _VERSION_RESPONSE2_EXT.pack(message.supported_features or 0)
        if message.monitor_pages is not None:
            body += _VERSION_RESPONSE3_EXT.pack(*message.monitor_pages)
        return body
    if isinstance(message, MemoryTable):
        return _MEMORY_TABLE.pack(len(message.regions), 0) + b"".join(
            _MEMORY_ENTRY.pack(r.gpa, r.size, r.offset) for r in message.regions)
    raise TypeError(f"not a VMBus message: {message!r}")


def encode_message(message: Message) -> bytes:
    """The bytes of ``message`` (header + body). ValueError if it exceeds 240 bytes or a field
    does not fit its width (struct.error is converted)."""
    try:
        data = _HEADER.pack(int(message.TYPE), 0) + _body(message)
    except struct.error as exc:
        raise ValueError(f"{type(message).__name__}: {exc}") from exc
    if len(data) > MAX_MESSAGE_SIZE:
        raise ValueError(f"{type(message).__name__} is {len(data)} bytes, at most "
                         f"{MAX_MESSAGE_SIZE} fit one synic message")
    return data


# -- decoding --------------------------------------------------------------------------------------


def _need(body: memoryview, size: int, kind: MessageType) -> None:
    if len(body) < size:
        raise VmbusProtocolError(
            f"{kind.name} body is {len(body)} bytes, its struct needs {size} (message too small)")


def _decode_body(kind: MessageType, body: memoryview) -> Message:
    if kind in (MessageType.REQUEST_OFFERS, MessageType.ALL_OFFERS_DELIVERED,
                MessageType.UNLOAD, MessageType.UNLOAD_COMPLETE):
        return {MessageType.REQUEST_OFFERS: RequestOffers,
                MessageType.ALL_OFFERS_DELIVERED: AllOffersDelivered,
                MessageType.UNLOAD: Unload, MessageType.UNLOAD_COMPLETE: UnloadComplete}[kind]()
    if kind in (MessageType.RESCIND_CHANNEL_OFFER, MessageType.CLOSE_CHANNEL,
                MessageType.REL_ID_RELEASED):
        _need(body, 4, kind)
        (channel_id,) = _U32.unpack_from(body)
        cls = {MessageType.RESCIND_CHANNEL_OFFER: RescindChannelOffer,
               MessageType.CLOSE_CHANNEL: CloseChannel,
               MessageType.REL_ID_RELEASED: RelIdReleased}[kind]
        return cls(channel_id)
    if kind is MessageType.OFFER_CHANNEL:
        _need(body, OFFER_CHANNEL_SIZE, kind)
        return OfferChannelMessage(decode_offer_channel_untrusted(body))
    if kind is MessageType.GPADL_HEADER:
        _need(body, _GPADL_HEADER.size, kind)
        channel_id, gpadl_id, buflen, count = _GPADL_HEADER.unpack_from(body)
        return GpadlHeader(channel_id, gpadl_id, buflen, count,
                           bytes(body[_GPADL_HEADER.size:]))
    if kind is MessageType.GPADL_BODY:
        _need(body, 8, kind)
        rsvd, gpadl_id = _TWO_U32.unpack_from(body)
        return GpadlBody(gpadl_id, bytes(body[8:]), rsvd)
    if kind in (MessageType.GPADL_CREATED, MessageType.OPEN_CHANNEL_RESULT):
        _need(body, 12, kind)
        a, b, c = _THREE_U32.unpack_from(body)
        return GpadlCreated(a, b, c) if kind is MessageType.GPADL_CREATED else OpenResult(a, b, c)
    if kind in (MessageType.GPADL_TEARDOWN, MessageType.MODIFY_CHANNEL,
                MessageType.MODIFY_CHANNEL_RESPONSE):
        _need(body, 8, kind)
        a, b = _TWO_U32.unpack_from(body)
        if kind is MessageType.GPADL_TEARDOWN:
            return GpadlTeardown(a, b)
        return ModifyChannel(a, b) if kind is MessageType.MODIFY_CHANNEL else (
            ModifyChannelResponse(a, b))
    if kind is MessageType.GPADL_TORNDOWN:
        _need(body, 4, kind)
        return GpadlTorndown(_U32.unpack_from(body)[0])
    if kind is MessageType.OPEN_CHANNEL:
        _need(body, _OPEN_CHANNEL.size, kind)
        channel_id, open_id, gpadl_id, target_vp, ring_offset, user_data = (
            _OPEN_CHANNEL.unpack_from(body))
        open_channel = OpenChannel(channel_id, open_id, gpadl_id, target_vp, ring_offset,
                                   user_data)
        if len(body) >= _OPEN_CHANNEL.size + _OPEN_CHANNEL2_EXT.size:
            connection_id, event_flag, flags = _OPEN_CHANNEL2_EXT.unpack_from(
                body, _OPEN_CHANNEL.size)
            open_channel = attrs.evolve(open_channel, connection_id=connection_id,
                                        event_flag=event_flag, flags=flags)
        return open_channel
    if kind is MessageType.INITIATE_CONTACT:
        _need(body, _INITIATE_CONTACT.size, kind)
        version, vp, target_info, p2c, c2p = _INITIATE_CONTACT.unpack_from(body)
        client_id = None
        if len(body) >= _INITIATE_CONTACT.size + 16:
            client_id = Guid(bytes(body[_INITIATE_CONTACT.size:_INITIATE_CONTACT.size + 16]))
        return InitiateContact(version, vp, target_info, p2c, c2p, client_id)
    if kind is MessageType.VERSION_RESPONSE:
        _need(body, _VERSION_RESPONSE.size, kind)
        supported, state, _pad, selected = _VERSION_RESPONSE.unpack_from(body)
        features = monitor = None
        if len(body) >= 12:
            (features,) = _VERSION_RESPONSE2_EXT.unpack_from(body, 8)
        if len(body) >= 32:
            monitor = _VERSION_RESPONSE3_EXT.unpack_from(body, 12)
        return VersionResponse(supported != 0, state, selected, features, monitor)
    if kind is MessageType.MEMORY_TABLE:
        _need(body, _MEMORY_TABLE.size, kind)
        count, _pad = _MEMORY_TABLE.unpack_from(body)
        if count > MEMORY_TABLE_MAX_REGIONS:
            raise VmbusProtocolError(f"MEMORY_TABLE lists {count} regions, at most "
                                     f"{MEMORY_TABLE_MAX_REGIONS}")
        _need(body, _MEMORY_TABLE.size + count * _MEMORY_ENTRY.size, kind)
        return MemoryTable(tuple(
            MemoryRegionEntry(*_MEMORY_ENTRY.unpack_from(body, 8 + i * _MEMORY_ENTRY.size))
            for i in range(count)))
    raise AssertionError(kind)  # pragma: no cover - every MessageType is handled


def decode_message_untrusted(data: bytes | bytearray | memoryview,
                             version: int | None = None) -> Message:
    """Decode one message from a peer (rules: module docstring). ``version``: the negotiated
    version, or None before negotiation (every type allowed). Raises VmbusProtocolError only."""
    view = memoryview(data).cast("B")
    if len(view) > MAX_MESSAGE_SIZE:
        raise VmbusProtocolError(f"a message is {len(view)} bytes, at most {MAX_MESSAGE_SIZE}")
    if len(view) < HEADER_SIZE:
        raise VmbusProtocolError(f"a message is {len(view)} bytes, shorter than its header")
    raw_type, _padding = _HEADER.unpack_from(view)
    try:
        kind = MessageType(raw_type)
    except ValueError:
        raise VmbusProtocolError(f"unknown or unsupported message type {raw_type}") from None
    needed = _MIN_VERSION.get(kind)
    if needed is not None and version is not None and version < needed:
        raise VmbusProtocolError(
            f"{kind.name} is not allowed at protocol version {version:#010x}")
    return _decode_body(kind, view[HEADER_SIZE:])
