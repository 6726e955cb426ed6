"""The VMBus data model (facts §2, §5.1): offers, opens, GPADLs and the requests between them.

Everything here is a frozen attrs value or a pure function; no I/O. Three groups:

- What a device offers: :class:`OfferParams` with its :class:`ChannelType`, the :class:`OfferKey`
  that names an offer, and the :class:`OfferChannel` body (188 bytes) a guest receives, with the
  offer flags and ``user_defined`` bytes derived from the channel type as the upstream server does.
- What a guest asks of a channel (:class:`ChannelRequest`: Open, Close, Gpadl, TeardownGpadl,
  Modify) and what a device asks of the server (:class:`ServerRequest`: Restore, Revoke).
- What the host hands to device hooks: :class:`OpenResources` (server device),
  :class:`InterceptClaim`, :class:`IncomingOffer`, :class:`OfferAction` and
  :class:`ClientOpenResources` (client device, e.g. the intercept plugin).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs

from devicehost.vmbus.guid import Guid

if TYPE_CHECKING:
    import anyio

    from devicehost.memory import GuestMemory
    from devicehost.vmbus.channel import RawChannel

__all__ = [
    "HVSOCK_VERSION_RS5",
    "MONITOR_ID_INVALID",
    "OFFER_CHANNEL_SIZE",
    "PIPE_FLAG_GPA_DIRECT",
    "STATUS_CONNECTION_REFUSED",
    "STATUS_SUCCESS",
    "STATUS_UNSUCCESSFUL",
    "USER_DEFINED_SIZE",
    "VMBUS_SINT",
    "VP_INDEX_DISABLE_INTERRUPT",
    "ChannelRequest",
    "ChannelType",
    "ClientOpenResources",
    "CloseRequest",
    "DeviceChannel",
    "GpadlChannelRequest",
    "GpadlRequest",
    "HvSocketChannel",
    "IncomingOffer",
    "InterceptClaim",
    "InterfaceChannel",
    "ModifyChannelRequest",
    "ModifyRequest",
    "OfferAction",
    "OfferChannel",
    "OfferFlags",
    "OfferKey",
    "OfferParams",
    "OpenChannelRequest",
    "OpenData",
    "OpenRequest",
    "OpenResources",
    "PipeChannel",
    "PipeType",
    "RestoreRequest",
    "RestoreResult",
    "RestoredGpadl",
    "RevokeRequest",
    "ServerRequest",
    "TeardownGpadlRequest",
    "VmbusProtocolError",
    "connection_id_for",
    "decode_offer_channel_untrusted",
    "encode_offer_channel",
    "offer_flags_for",
    "user_defined_for",
]

# -- constants (facts §2.3) ----------------------------------------------------------------------

STATUS_SUCCESS: Final = 0
#: What a guest sees when a request fails (OpenResult.status of a failed open, GpadlCreated...).
STATUS_UNSUCCESSFUL: Final = 0x8000FFFF
STATUS_CONNECTION_REFUSED: Final = 0xC0000236
VMBUS_SINT: Final = 2
#: ``target_vp`` value meaning "no interrupts".
VP_INDEX_DISABLE_INTERRUPT: Final = 0xFFFFFFFF
MONITOR_ID_INVALID: Final = 0xFF
USER_DEFINED_SIZE: Final = 120
PIPE_USER_DEFINED_SIZE: Final = 112
PIPE_FLAG_GPA_DIRECT: Final = 0x1
HVSOCK_VERSION_RS5: Final = 1
OFFER_CHANNEL_SIZE: Final = 188


class VmbusProtocolError(Exception):
    """Raised when bytes from a peer are not a valid VMBus message; the peer is to blame."""


def connection_id_for(channel_id: int, *, sint: int = VMBUS_SINT, vtl: int = 0) -> int:
    """The connection id a server assigns to a channel: ``channel_id | sint << 12 | vtl << 16``."""
    return channel_id | (sint << 12) | (vtl << 16)


class OfferFlags(enum.IntFlag):
    """OfferChannel.flags (u16, facts §2.5). Reserved bits are kept as they came."""

    ENUMERATE_DEVICE_INTERFACE = 0x1
    CONFIDENTIAL_RING_BUFFER = 0x2
    CONFIDENTIAL_EXTERNAL_MEMORY = 0x4
    REQUIRE_PINNED_EXTERNAL_MEMORY = 0x8
    NAMED_PIPE_MODE = 0x10
    TLNPI_PROVIDER = 0x2000


class PipeType(enum.IntEnum):
    """``pipe_type`` (u32 at user_defined offset 0) of pipe and hvsocket offers."""

    BYTE = 0
    MESSAGE = 4


def _user_defined(size: int) -> Any:
    """An attrs field of opaque bytes of exactly ``size``; shorter input is zero-padded."""

    def convert(value: bytes | bytearray | memoryview) -> bytes:
        data = bytes(value)
        if len(data) > size:
            raise ValueError(f"user_defined holds at most {size} bytes, got {len(data)}")
        return data.ljust(size, b"\0")

    return attrs.field(default=bytes(size), converter=convert, repr=False)


# -- channel types (facts §5.1) ------------------------------------------------------------------


@attrs.frozen
class ChannelType:
    """Base of the four channel types; use ``ChannelType.Device(...)`` or the class names.

    A device's :class:`OfferParams` carries one of :class:`DeviceChannel`,
    :class:`InterfaceChannel`, :class:`PipeChannel` and :class:`HvSocketChannel`; the offer
    flags and ``user_defined`` bytes a guest sees are derived from it by :func:`offer_flags_for`
    and :func:`user_defined_for`.
    """

    Device: ClassVar[type[DeviceChannel]]
    Interface: ClassVar[type[InterfaceChannel]]
    Pipe: ClassVar[type[PipeChannel]]
    HvSocket: ClassVar[type[HvSocketChannel]]


@attrs.frozen
class DeviceChannel(ChannelType):
    """An ordinary device channel; ``pipe_packets`` marks it as carrying pipe (message) packets."""

    pipe_packets: bool = False


@attrs.frozen
class InterfaceChannel(ChannelType):
    """A device interface channel with 120 bytes of interface-defined data."""

    user_defined: bytes = _user_defined(USER_DEFINED_SIZE)


@attrs.frozen
class PipeChannel(ChannelType):
    """A named pipe channel: message or byte mode, 112 bytes of user data and pipe flags.

    [AMBIGUOUS] Older upstream servers carry only ``message_mode`` and fill just ``pipe_type``;
    here ``user_defined`` and ``pipe_flags`` are placed as the facts' pipe parameters say
    (bytes 4..116 and the u32 at 116); with their defaults the offer bytes are the same.
    """

    message_mode: bool = False
    user_defined: bytes = _user_defined(PIPE_USER_DEFINED_SIZE)
    pipe_flags: int = 0


@attrs.frozen
class HvSocketChannel(ChannelType):
    """An hvsocket channel: ``is_connect`` is true for a guest-initiated connection."""

    is_connect: bool = False
    is_for_container: bool = False
    silo_id: Guid = Guid.ZERO


ChannelType.Device = DeviceChannel
ChannelType.Interface = InterfaceChannel
ChannelType.Pipe = PipeChannel
ChannelType.HvSocket = HvSocketChannel


# -- offers --------------------------------------------------------------------------------------


@attrs.frozen
class OfferKey:
    """What names an offer: (interface id, instance id, subchannel index).

    Its text form is ``{<interface_id>}-{<instance_id>}-<subchannel_index>``.
    """

    interface_id: Guid
    instance_id: Guid
    subchannel_index: int = 0

    def __str__(self) -> str:
        return f"{{{self.interface_id}}}-{{{self.instance_id}}}-{self.subchannel_index}"


def _u16(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{attribute.name} must fit in 16 bits, got {value}")


@attrs.frozen
class OfferParams:
    """What a VMBus device offers (its ``offer`` hook returns this)."""

    interface_name: str
    instance_id: Guid
    interface_id: Guid
    mmio_megabytes: int = attrs.field(default=0, validator=_u16)
    mmio_megabytes_optional: int = attrs.field(default=0, validator=_u16)
    channel_type: ChannelType = attrs.field(
        factory=DeviceChannel,
        validator=attrs.validators.instance_of(
            (DeviceChannel, InterfaceChannel, PipeChannel, HvSocketChannel)
        ),
    )
    subchannel_index: int = attrs.field(default=0, validator=_u16)
    mnf_interrupt_latency: float | None = None  # seconds; None = no monitored notifications
    offer_order: int | None = None
    allow_confidential_external_memory: bool = False

    @property
    def key(self) -> OfferKey:
        return OfferKey(self.interface_id, self.instance_id, self.subchannel_index)


# Pipe parameters inside user_defined (120 bytes):
#   off size field
#     0    4 pipe_type   u32 (BYTE=0, MESSAGE=4)
#     4  112 user_defined
#   116    4 pipe_flags  u32 (bit0 gpa_direct)
_PIPE_PARAMS: Final = struct.Struct("<I112sI")
# HvSocket parameters inside user_defined (28 bytes, packed, then zero):
#   off size field
#     0    4 pipe_type              u32 (always BYTE)
#     4    1 is_for_guest_accept    u8
#     5    1 is_for_guest_container u8
#     6    4 version                u32 (unaligned; RS5 = 1)
#    10   16 silo_id                GUID (unaligned)
#    26    2 padding
_HVSOCK_PARAMS: Final = struct.Struct("<IBBI16s2x")


def offer_flags_for(params: OfferParams, *, confidential_channels: bool = True) -> OfferFlags:
    """The offer flags a guest sees for ``params`` (facts §2.6).

    ``confidential_ring_buffer`` is always set unless the guest lacks the confidential-channels
    feature; ``confidential_external_memory`` follows the device's allow flag.
    """
    flags = OfferFlags(0)
    if confidential_channels:
        flags |= OfferFlags.CONFIDENTIAL_RING_BUFFER
    if params.allow_confidential_external_memory:
        flags |= OfferFlags.CONFIDENTIAL_EXTERNAL_MEMORY
    kind = params.channel_type
    if isinstance(kind, DeviceChannel):
        if kind.pipe_packets:
            flags |= OfferFlags.NAMED_PIPE_MODE
    elif isinstance(kind, InterfaceChannel):
        flags |= OfferFlags.ENUMERATE_DEVICE_INTERFACE
    elif isinstance(kind, PipeChannel):
        flags |= OfferFlags.ENUMERATE_DEVICE_INTERFACE | OfferFlags.NAMED_PIPE_MODE
    elif isinstance(kind, HvSocketChannel):
        flags |= (
            OfferFlags.ENUMERATE_DEVICE_INTERFACE
            | OfferFlags.TLNPI_PROVIDER
            | OfferFlags.NAMED_PIPE_MODE
        )
    return flags


def user_defined_for(channel_type: ChannelType) -> bytes:
    """The 120 ``user_defined`` bytes of an offer of ``channel_type`` (facts §2.6)."""
    if isinstance(channel_type, DeviceChannel):
        if channel_type.pipe_packets:
            return struct.pack("<I", PipeType.MESSAGE).ljust(USER_DEFINED_SIZE, b"\0")
        return bytes(USER_DEFINED_SIZE)
    if isinstance(channel_type, InterfaceChannel):
        return channel_type.user_defined
    if isinstance(channel_type, PipeChannel):
        pipe_type = PipeType.MESSAGE if channel_type.message_mode else PipeType.BYTE
        return _PIPE_PARAMS.pack(
            pipe_type, channel_type.user_defined, channel_type.pipe_flags & 0xFFFFFFFF
        )
    if isinstance(channel_type, HvSocketChannel):
        params = _HVSOCK_PARAMS.pack(
            PipeType.BYTE,
            int(channel_type.is_connect),
            int(channel_type.is_for_container),
            HVSOCK_VERSION_RS5,
            channel_type.silo_id.bytes_le,
        )
        return params.ljust(USER_DEFINED_SIZE, b"\0")
    raise TypeError(f"not a channel type: {channel_type!r}")


# OfferChannel body (188 bytes, after the 8-byte message header):
#   off size field
#     0   16 interface_id            GUID
#    16   16 instance_id             GUID
#    32   16 rsvd                    4 x u32, zero
#    48    2 flags                   u16 OfferFlags
#    50    2 mmio_megabytes          u16
#    52  120 user_defined
#   172    2 subchannel_index        u16
#   174    2 mmio_megabytes_optional u16
#   176    4 channel_id              u32
#   180    1 monitor_id              u8 (0xFF = none)
#   181    1 monitor_allocated       u8 (0/1)
#   182    2 is_dedicated            u16 (a server always sends 1)
#   184    4 connection_id           u32
_OFFER_CHANNEL: Final = struct.Struct("<16s16s16xHH120sHHIBBHI")
assert _OFFER_CHANNEL.size == OFFER_CHANNEL_SIZE


@attrs.frozen
class OfferChannel:
    """The OFFER_CHANNEL message body a guest receives for one channel."""

    interface_id: Guid
    instance_id: Guid
    flags: OfferFlags = attrs.field(default=OfferFlags(0), converter=OfferFlags)
    mmio_megabytes: int = 0
    user_defined: bytes = _user_defined(USER_DEFINED_SIZE)
    subchannel_index: int = 0
    mmio_megabytes_optional: int = 0
    channel_id: int = 0
    monitor_id: int = MONITOR_ID_INVALID
    monitor_allocated: bool = False
    is_dedicated: int = 1
    connection_id: int = 0

    @property
    def key(self) -> OfferKey:
        return OfferKey(self.interface_id, self.instance_id, self.subchannel_index)

    @classmethod
    def for_params(
        cls,
        params: OfferParams,
        channel_id: int,
        *,
        monitor_id: int | None = None,
        confidential_channels: bool = True,
    ) -> OfferChannel:
        """The offer a server sends for ``params`` once it assigned ``channel_id``."""
        return cls(
            interface_id=params.interface_id,
            instance_id=params.instance_id,
            flags=offer_flags_for(params, confidential_channels=confidential_channels),
            mmio_megabytes=params.mmio_megabytes,
            user_defined=user_defined_for(params.channel_type),
            subchannel_index=params.subchannel_index,
            mmio_megabytes_optional=params.mmio_megabytes_optional,
            channel_id=channel_id,
            monitor_id=MONITOR_ID_INVALID if monitor_id is None else monitor_id,
            monitor_allocated=monitor_id is not None,
            is_dedicated=1,
            connection_id=connection_id_for(channel_id),
        )


def encode_offer_channel(offer: OfferChannel) -> bytes:
    """The 188-byte body of ``offer``."""
    return _OFFER_CHANNEL.pack(
        offer.interface_id.bytes_le,
        offer.instance_id.bytes_le,
        int(offer.flags) & 0xFFFF,
        offer.mmio_megabytes,
        offer.user_defined,
        offer.subchannel_index,
        offer.mmio_megabytes_optional,
        offer.channel_id,
        offer.monitor_id,
        int(offer.monitor_allocated),
        offer.is_dedicated,
        offer.connection_id,
    )


def decode_offer_channel_untrusted(data: bytes | bytearray | memoryview) -> OfferChannel:
    """Decode an OfferChannel body.

    The body must hold at least 188 bytes; bytes after them are ignored, as the upstream parser
    hands trailing bytes back to its caller. Reserved fields are not checked (a guest must accept
    what a newer host puts there); ``monitor_allocated`` is true for any non-zero byte.
    Raises :class:`VmbusProtocolError` only.
    """
    if len(data) < OFFER_CHANNEL_SIZE:
        raise VmbusProtocolError(
            f"offer message body is {len(data)} bytes, an OfferChannel needs "
            f"{OFFER_CHANNEL_SIZE}"
        )
    (iface, inst, flags, mmio, user_defined, sub, mmio_opt, channel_id, monitor_id,
     monitor_allocated, is_dedicated, connection_id) = _OFFER_CHANNEL.unpack_from(data)
    return OfferChannel(
        interface_id=Guid(iface),
        instance_id=Guid(inst),
        flags=OfferFlags(flags),
        mmio_megabytes=mmio,
        user_defined=user_defined,
        subchannel_index=sub,
        mmio_megabytes_optional=mmio_opt,
        channel_id=channel_id,
        monitor_id=monitor_id,
        monitor_allocated=monitor_allocated != 0,
        is_dedicated=is_dedicated,
        connection_id=connection_id,
    )


# -- opens, GPADLs, modify (facts §5.1) ----------------------------------------------------------


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(values)


def _gpadl_tuple(values: Iterable[RestoredGpadl]) -> tuple[RestoredGpadl, ...]:
    return tuple(values)


@attrs.frozen
class OpenData:
    """What a guest's OpenChannel says.

    ``target_vp`` None means interrupts are disabled; ``ring_offset`` is the page index inside
    the ring GPADL where the host-to-guest ring starts.
    """

    ring_offset: int
    ring_gpadl_id: int
    target_vp: int | None = 0
    event_flag: int = 0
    connection_id: int = 0
    user_data: bytes = _user_defined(USER_DEFINED_SIZE)


@attrs.frozen
class OpenRequest:
    """An open as a device sees it: the open data and the negotiated memory features.

    Each ``use_*``/``is_*`` flag is the guest's feature and the offer's flag together. The
    upstream request also carries the guest interrupt; here signalling is part of the channel.
    """

    open_data: OpenData
    use_confidential_ring: bool = False
    use_confidential_external_memory: bool = False
    is_external_memory_pinned: bool = False


@attrs.frozen
class GpadlRequest:
    """A GPADL a guest creates: its id, its range count and its range buffer (u64 values)."""

    id: int
    count: int
    buf: tuple[int, ...] = attrs.field(converter=_int_tuple)


@attrs.frozen
class ModifyRequest:
    """A guest retargets the channel's interrupt to another virtual processor."""

    target_vp: int


@attrs.frozen
class RestoredGpadl:
    """A GPADL that existed when the server was saved, and whether the device accepted it."""

    request: GpadlRequest
    accepted: bool = True


@attrs.frozen
class RestoreResult:
    """What the server tells a device being restored: its open request (None = it was closed)
    and the GPADLs of its channel."""

    open_request: OpenRequest | None
    gpadls: tuple[RestoredGpadl, ...] = attrs.field(default=(), converter=_gpadl_tuple)


# -- requests ------------------------------------------------------------------------------------


@attrs.frozen
class ChannelRequest:
    """Base of what a guest (client) asks of one channel; see the five subclasses."""

    Open: ClassVar[type[OpenChannelRequest]]
    Close: ClassVar[type[CloseRequest]]
    Gpadl: ClassVar[type[GpadlChannelRequest]]
    TeardownGpadl: ClassVar[type[TeardownGpadlRequest]]
    Modify: ClassVar[type[ModifyChannelRequest]]


@attrs.frozen
class OpenChannelRequest(ChannelRequest):
    """Open the channel over a ring GPADL."""

    request: OpenRequest


@attrs.frozen
class CloseRequest(ChannelRequest):
    """Close the open channel."""


@attrs.frozen
class GpadlChannelRequest(ChannelRequest):
    """Create a GPADL owned by the channel."""

    request: GpadlRequest


@attrs.frozen
class TeardownGpadlRequest(ChannelRequest):
    """Tear a GPADL down; completes once no ring maps it any more."""

    id: int


@attrs.frozen
class ModifyChannelRequest(ChannelRequest):
    """Change the channel's interrupt target."""

    request: ModifyRequest


ChannelRequest.Open = OpenChannelRequest
ChannelRequest.Close = CloseRequest
ChannelRequest.Gpadl = GpadlChannelRequest
ChannelRequest.TeardownGpadl = TeardownGpadlRequest
ChannelRequest.Modify = ModifyChannelRequest


@attrs.frozen
class ServerRequest:
    """Base of what a device's side asks of the server: Restore or Revoke."""

    Restore: ClassVar[type[RestoreRequest]]
    Revoke: ClassVar[type[RevokeRequest]]


@attrs.frozen
class RestoreRequest(ServerRequest):
    """Restore the channel's server state; ``was_open`` says whether the device saved it open.
    Answered with a :class:`RestoreResult`."""

    was_open: bool


@attrs.frozen
class RevokeRequest(ServerRequest):
    """Revoke the offer (subchannels first)."""


ServerRequest.Restore = RestoreRequest
ServerRequest.Revoke = RevokeRequest


# -- what device hooks receive -------------------------------------------------------------------


@attrs.frozen
class OpenResources:
    """What a VMBus server device's ``open`` and ``restore_open`` hooks get."""

    channel: RawChannel = attrs.field(eq=False)
    memory: GuestMemory = attrs.field(eq=False, repr=False)
    request: OpenRequest


@attrs.frozen
class InterceptClaim:
    """What a VMBus client device's ``offer`` hook returns when called with ``incoming=None``:
    the instance id of the offers it intercepts."""

    instance_id: Guid


class OfferAction(enum.Enum):
    """A VMBus client device's answer to an incoming offer."""

    OPEN = "open"
    IGNORE = "ignore"


@attrs.frozen
class IncomingOffer:
    """An offer as a VMBus client sees it.

    ``offer`` is the OfferChannel the server sent; ``interface_name`` is the server's
    informational name; ``revoked`` is set when the server revokes the offer (the client then
    frees its ring memory; the server has already closed the channel and dropped its GPADLs).
    """

    offer: OfferChannel
    interface_name: str = ""
    revoked: anyio.Event | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def channel_id(self) -> int:
        return self.offer.channel_id


@attrs.frozen
class ClientOpenResources:
    """What a VMBus client device's ``open`` and ``restore_open`` hooks get."""

    subchannel_index: int
    channel: RawChannel = attrs.field(eq=False)
