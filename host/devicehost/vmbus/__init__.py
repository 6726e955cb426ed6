"""devicehost.vmbus: the VMBus transport's public API.

Device authors import from here: the offer model (:class:`OfferParams`, the channel types,
:class:`Guid`), what their hooks receive (:class:`OpenResources` with its :class:`RawChannel`),
the pipes that frame messages over a channel (:class:`MessagePipe`, :class:`BytePipe`) and their
errors, and for tests :func:`connected_channel_pair`. The in-process bus itself
(:class:`VmbusServer`, :class:`VmbusClient`, :class:`VmbusTransport`) is here for hosts, the
intercept plugin and the test kit; :class:`SocketVmbusClient` drives a host's VMBus devices from
another process over the VMBus socket (``docs/vmbus-socket.md``). Submodules are imported on
first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

__all__ = [
    "MAXIMUM_PIPE_PACKET_SIZE",
    "STATUS_SUCCESS",
    "STATUS_UNSUCCESSFUL",
    "VP_INDEX_DISABLE_INTERRUPT",
    "BytePipe",
    "ChannelClosed",
    "ChannelHandle",
    "ChannelRequest",
    "ChannelRequestError",
    "ChannelType",
    "ClientChannel",
    "ClientOpenResources",
    "ConnectionReset",
    "DeviceChannel",
    "EventfdSignal",
    "GpaRangeError",
    "GpaRangeErrorKind",
    "GpadlRequest",
    "Guid",
    "GuidError",
    "GuidErrorKind",
    "HvSocketChannel",
    "InProcessSignal",
    "IncomingOffer",
    "IncomingPacket",
    "IncomingRing",
    "InterceptClaim",
    "InterfaceChannel",
    "MessagePipe",
    "ModifyRequest",
    "MultiPagedRange",
    "OfferAction",
    "OfferChannel",
    "OfferError",
    "OfferFlags",
    "OfferKey",
    "OfferParams",
    "OpenData",
    "OpenRequest",
    "OpenResources",
    "OutgoingRing",
    "PacketTooLarge",
    "PacketType",
    "PagedRange",
    "PipeChannel",
    "PipeError",
    "PipeErrorKind",
    "PipeType",
    "RawChannel",
    "RestoreResult",
    "RestoredGpadl",
    "RingEmpty",
    "RingError",
    "RingErrorKind",
    "RingFull",
    "RingMemory",
    "ServerRequest",
    "ServerSavedState",
    "SocketClientError",
    "SocketVmbusClient",
    "VmbusClient",
    "VmbusProtocolError",
    "VmbusSavedState",
    "VmbusServer",
    "VmbusSocketServer",
    "VmbusTransport",
    "connected_channel_pair",
    "connected_signals",
    "decode_gpa_ranges_untrusted",
    "decode_offer_channel_untrusted",
    "encode_gpa_ranges",
    "encode_offer_channel",
    "in_band_size",
    "raw_channel_from_rings",
]

_LAZY: Final = {
    "Guid": "devicehost.vmbus.guid",
    "GuidError": "devicehost.vmbus.guid",
    "GuidErrorKind": "devicehost.vmbus.guid",
    "STATUS_SUCCESS": "devicehost.vmbus.protocol",
    "STATUS_UNSUCCESSFUL": "devicehost.vmbus.protocol",
    "VP_INDEX_DISABLE_INTERRUPT": "devicehost.vmbus.protocol",
    "ChannelRequest": "devicehost.vmbus.protocol",
    "ChannelType": "devicehost.vmbus.protocol",
    "ClientOpenResources": "devicehost.vmbus.protocol",
    "DeviceChannel": "devicehost.vmbus.protocol",
    "GpadlRequest": "devicehost.vmbus.protocol",
    "HvSocketChannel": "devicehost.vmbus.protocol",
    "IncomingOffer": "devicehost.vmbus.protocol",
    "InterceptClaim": "devicehost.vmbus.protocol",
    "InterfaceChannel": "devicehost.vmbus.protocol",
    "ModifyRequest": "devicehost.vmbus.protocol",
    "OfferAction": "devicehost.vmbus.protocol",
    "OfferChannel": "devicehost.vmbus.protocol",
    "OfferFlags": "devicehost.vmbus.protocol",
    "OfferKey": "devicehost.vmbus.protocol",
    "OfferParams": "devicehost.vmbus.protocol",
    "OpenData": "devicehost.vmbus.protocol",
    "OpenRequest": "devicehost.vmbus.protocol",
    "OpenResources": "devicehost.vmbus.protocol",
    "PipeChannel": "devicehost.vmbus.protocol",
    "PipeType": "devicehost.vmbus.protocol",
    "RestoreResult": "devicehost.vmbus.protocol",
    "RestoredGpadl": "devicehost.vmbus.protocol",
    "ServerRequest": "devicehost.vmbus.protocol",
    "VmbusProtocolError": "devicehost.vmbus.protocol",
    "decode_offer_channel_untrusted": "devicehost.vmbus.protocol",
    "encode_offer_channel": "devicehost.vmbus.protocol",
    "ChannelClosed": "devicehost.vmbus.channel",
    "EventfdSignal": "devicehost.vmbus.channel",
    "InProcessSignal": "devicehost.vmbus.channel",
    "RawChannel": "devicehost.vmbus.channel",
    "connected_channel_pair": "devicehost.vmbus.channel",
    "connected_signals": "devicehost.vmbus.channel",
    "raw_channel_from_rings": "devicehost.vmbus.channel",
    "MAXIMUM_PIPE_PACKET_SIZE": "devicehost.vmbus.pipe",
    "BytePipe": "devicehost.vmbus.pipe",
    "ConnectionReset": "devicehost.vmbus.pipe",
    "MessagePipe": "devicehost.vmbus.pipe",
    "PacketTooLarge": "devicehost.vmbus.pipe",
    "PipeError": "devicehost.vmbus.pipe",
    "PipeErrorKind": "devicehost.vmbus.pipe",
    "IncomingPacket": "devicehost.vmbus.ring",
    "IncomingRing": "devicehost.vmbus.ring",
    "OutgoingRing": "devicehost.vmbus.ring",
    "PacketType": "devicehost.vmbus.ring",
    "RingEmpty": "devicehost.vmbus.ring",
    "RingError": "devicehost.vmbus.ring",
    "RingErrorKind": "devicehost.vmbus.ring",
    "RingFull": "devicehost.vmbus.ring",
    "RingMemory": "devicehost.vmbus.ring",
    "in_band_size": "devicehost.vmbus.ring",
    "GpaRangeError": "devicehost.vmbus.gpadl",
    "GpaRangeErrorKind": "devicehost.vmbus.gpadl",
    "MultiPagedRange": "devicehost.vmbus.gpadl",
    "PagedRange": "devicehost.vmbus.gpadl",
    "decode_gpa_ranges_untrusted": "devicehost.vmbus.gpadl",
    "encode_gpa_ranges": "devicehost.vmbus.gpadl",
    "ChannelHandle": "devicehost.vmbus.server",
    "ChannelRequestError": "devicehost.vmbus.server",
    "OfferError": "devicehost.vmbus.server",
    "ServerSavedState": "devicehost.vmbus.server",
    "VmbusServer": "devicehost.vmbus.server",
    "ClientChannel": "devicehost.vmbus.client",
    "VmbusClient": "devicehost.vmbus.client",
    "VmbusSavedState": "devicehost.vmbus.transport",
    "VmbusTransport": "devicehost.vmbus.transport",
    "SocketClientError": "devicehost.vmbus.socketclient",
    "SocketVmbusClient": "devicehost.vmbus.socketclient",
    "VmbusSocketServer": "devicehost.vmbus.socketserver",
}

if TYPE_CHECKING:
    from devicehost.vmbus.channel import ChannelClosed as ChannelClosed
    from devicehost.vmbus.channel import EventfdSignal as EventfdSignal
    from devicehost.vmbus.channel import InProcessSignal as InProcessSignal
    from devicehost.vmbus.channel import RawChannel as RawChannel
    from devicehost.vmbus.channel import connected_channel_pair as connected_channel_pair
    from devicehost.vmbus.channel import connected_signals as connected_signals
    from devicehost.vmbus.channel import raw_channel_from_rings as raw_channel_from_rings
    from devicehost.vmbus.client import ClientChannel as ClientChannel
    from devicehost.vmbus.client import VmbusClient as VmbusClient
    from devicehost.vmbus.gpadl import GpaRangeError as GpaRangeError
    from devicehost.vmbus.gpadl import GpaRangeErrorKind as GpaRangeErrorKind
    from devicehost.vmbus.gpadl import MultiPagedRange as MultiPagedRange
    from devicehost.vmbus.gpadl import PagedRange as PagedRange
    from devicehost.vmbus.gpadl import decode_gpa_ranges_untrusted as decode_gpa_ranges_untrusted
    from devicehost.vmbus.gpadl import encode_gpa_ranges as encode_gpa_ranges
    from devicehost.vmbus.guid import Guid as Guid
    from devicehost.vmbus.guid import GuidError as GuidError
    from devicehost.vmbus.guid import GuidErrorKind as GuidErrorKind
    from devicehost.vmbus.pipe import MAXIMUM_PIPE_PACKET_SIZE as MAXIMUM_PIPE_PACKET_SIZE
    from devicehost.vmbus.pipe import BytePipe as BytePipe
    from devicehost.vmbus.pipe import ConnectionReset as ConnectionReset
    from devicehost.vmbus.pipe import MessagePipe as MessagePipe
    from devicehost.vmbus.pipe import PacketTooLarge as PacketTooLarge
    from devicehost.vmbus.pipe import PipeError as PipeError
    from devicehost.vmbus.pipe import PipeErrorKind as PipeErrorKind
    from devicehost.vmbus.protocol import STATUS_SUCCESS as STATUS_SUCCESS
    from devicehost.vmbus.protocol import STATUS_UNSUCCESSFUL as STATUS_UNSUCCESSFUL
    from devicehost.vmbus.protocol import VP_INDEX_DISABLE_INTERRUPT as VP_INDEX_DISABLE_INTERRUPT
    from devicehost.vmbus.protocol import ChannelRequest as ChannelRequest
    from devicehost.vmbus.protocol import ChannelType as ChannelType
    from devicehost.vmbus.protocol import ClientOpenResources as ClientOpenResources
    from devicehost.vmbus.protocol import DeviceChannel as DeviceChannel
    from devicehost.vmbus.protocol import GpadlRequest as GpadlRequest
    from devicehost.vmbus.protocol import HvSocketChannel as HvSocketChannel
    from devicehost.vmbus.protocol import IncomingOffer as IncomingOffer
    from devicehost.vmbus.protocol import InterceptClaim as InterceptClaim
    from devicehost.vmbus.protocol import InterfaceChannel as InterfaceChannel
    from devicehost.vmbus.protocol import ModifyRequest as ModifyRequest
    from devicehost.vmbus.protocol import OfferAction as OfferAction
    from devicehost.vmbus.protocol import OfferChannel as OfferChannel
    from devicehost.vmbus.protocol import OfferFlags as OfferFlags
    from devicehost.vmbus.protocol import OfferKey as OfferKey
    from devicehost.vmbus.protocol import OfferParams as OfferParams
    from devicehost.vmbus.protocol import OpenData as OpenData
    from devicehost.vmbus.protocol import OpenRequest as OpenRequest
    from devicehost.vmbus.protocol import OpenResources as OpenResources
    from devicehost.vmbus.protocol import PipeChannel as PipeChannel
    from devicehost.vmbus.protocol import PipeType as PipeType
    from devicehost.vmbus.protocol import RestoredGpadl as RestoredGpadl
    from devicehost.vmbus.protocol import RestoreResult as RestoreResult
    from devicehost.vmbus.protocol import ServerRequest as ServerRequest
    from devicehost.vmbus.protocol import VmbusProtocolError as VmbusProtocolError
    from devicehost.vmbus.protocol import (
        decode_offer_channel_untrusted as decode_offer_channel_untrusted,
    )
    from devicehost.vmbus.protocol import encode_offer_channel as encode_offer_channel
    from devicehost.vmbus.ring import IncomingPacket as IncomingPacket
    from devicehost.vmbus.ring import IncomingRing as IncomingRing
    from devicehost.vmbus.ring import OutgoingRing as OutgoingRing
    from devicehost.vmbus.ring import PacketType as PacketType
    from devicehost.vmbus.ring import RingEmpty as RingEmpty
    from devicehost.vmbus.ring import RingError as RingError
    from devicehost.vmbus.ring import RingErrorKind as RingErrorKind
    from devicehost.vmbus.ring import RingFull as RingFull
    from devicehost.vmbus.ring import RingMemory as RingMemory
    from devicehost.vmbus.ring import in_band_size as in_band_size
    from devicehost.vmbus.server import ChannelHandle as ChannelHandle
    from devicehost.vmbus.server import ChannelRequestError as ChannelRequestError
    from devicehost.vmbus.server import OfferError as OfferError
    from devicehost.vmbus.server import ServerSavedState as ServerSavedState
    from devicehost.vmbus.server import VmbusServer as VmbusServer
    from devicehost.vmbus.socketclient import SocketClientError as SocketClientError
    from devicehost.vmbus.socketclient import SocketVmbusClient as SocketVmbusClient
    from devicehost.vmbus.socketserver import VmbusSocketServer as VmbusSocketServer
    from devicehost.vmbus.transport import VmbusSavedState as VmbusSavedState
    from devicehost.vmbus.transport import VmbusTransport as VmbusTransport


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'devicehost.vmbus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
