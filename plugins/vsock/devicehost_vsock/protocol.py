"""The virtio-vsock wire format: the 44-byte packet header, its ops, flags and limits.

Wire only, no logic: frozen attrs values with :func:`decode_header_untrusted` /
:func:`encode_header` as the pair, and the constants of the device (virtio spec 1.3 section 5.10,
as OpenVMM's ``virtio_vsock`` uses them).
"""

from __future__ import annotations

import enum
import struct
from typing import Final

import attrs

__all__ = [
    "CID_HOST",
    "CID_HYPERVISOR",
    "CONNECTION_TIMEOUT",
    "DEVICE_ID",
    "EVENT_TRANSPORT_RESET",
    "FEATURE_NO_IMPLIED_STREAM",
    "FEATURE_SEQPACKET",
    "FEATURE_STREAM",
    "GRACEFUL_SHUTDOWN_TIMEOUT",
    "HEADER",
    "HEADER_SIZE",
    "MAX_ACTIVE_CONNECTIONS",
    "MAX_TX_BUF_SIZE",
    "MIN_TX_BUF_SIZE",
    "QUEUE_EVENT",
    "QUEUE_RX",
    "QUEUE_TX",
    "SEQ_EOM",
    "SEQ_EOR",
    "SHUTDOWN_RECEIVE",
    "SHUTDOWN_SEND",
    "TX_BUF_SIZE",
    "TYPE_SEQPACKET",
    "TYPE_STREAM",
    "Header",
    "Op",
    "ProtocolError",
    "decode_header_untrusted",
    "encode_header",
]

#: Virtio device id of a socket device.
DEVICE_ID: Final = 19
#: Device-specific feature bits (bank 0).
FEATURE_STREAM: Final = 1 << 0
FEATURE_SEQPACKET: Final = 1 << 1
FEATURE_NO_IMPLIED_STREAM: Final = 1 << 2
#: Queue indices: rx carries device->guest packets, tx guest->device, event device->guest events
#: (only TRANSPORT_RESET, sent after a worker restart).
QUEUE_RX: Final = 0
QUEUE_TX: Final = 1
QUEUE_EVENT: Final = 2

#: The one event of the event queue (``struct virtio_vsock_event { le32 id; }``): the transport
#: was reset; the guest drops every connection and reads its CID again.
EVENT_TRANSPORT_RESET: Final = 0

#: Well-known CIDs.
CID_HYPERVISOR: Final = 0
CID_HOST: Final = 2

#: Socket types of the header's ``type`` field (SEQPACKET only with ``FEATURE_SEQPACKET``).
TYPE_STREAM: Final = 1
TYPE_SEQPACKET: Final = 2

#: RW flag bits of a SEQPACKET connection: the last packet of a message (EOM), and of a record
#: (EOR, the sender's ``MSG_EOR``; Linux guests since 5.16).
SEQ_EOM: Final = 1 << 0
SEQ_EOR: Final = 1 << 1

#: SHUTDOWN flag bits.
SHUTDOWN_RECEIVE: Final = 1 << 0
SHUTDOWN_SEND: Final = 1 << 1

#: Advertised buf_alloc in every non-RST packet to the guest, capacity of the per-connection
#: host-bound buffer, and the largest RW payload accepted from the guest: upstream's value and the
#: default of the device's ``tx_buffer_size`` (a devicehost extension, see ``VsockConfig``).
TX_BUF_SIZE: Final = 65536
#: Smallest and largest ``tx_buffer_size`` a device accepts (it must be a power of two).
MIN_TX_BUF_SIZE: Final = 4096
MAX_TX_BUF_SIZE: Final = 16 << 20
#: Seconds from accepting a host connection to reading its CONNECT line and finishing the handshake.
CONNECTION_TIMEOUT: Final = 2.0
#: Seconds after the host socket closed (and SHUTDOWN was sent) before the device sends RST.
GRACEFUL_SHUTDOWN_TIMEOUT: Final = 2.0
#: Established plus pending host-initiated connections.
MAX_ACTIVE_CONNECTIONS: Final = 1024

# Byte layout of the packet header (packed, little endian, 44 bytes):
#   0  u64 src_cid      8  u64 dst_cid     16  u32 src_port   20  u32 dst_port
#  24  u32 len         28  u16 type        30  u16 op         32  u32 flags
#  36  u32 buf_alloc   40  u32 fwd_cnt
HEADER: Final = struct.Struct("<QQIIIHHIII")
HEADER_SIZE: Final = HEADER.size
assert HEADER_SIZE == 44


class Op(enum.IntEnum):
    """Packet operations. Values outside this set are kept as plain ints by the decoder."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class ProtocolError(Exception):
    """Raised when bytes that should hold a vsock header are malformed (the sender is to blame)."""


@attrs.frozen
class Header:
    """One vsock packet header. ``op`` is an :class:`Op` or, for unknown ops, the raw int."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    op: int
    len: int = 0
    type: int = TYPE_STREAM
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0


def decode_header_untrusted(data: bytes | bytearray | memoryview) -> Header:
    """Decode the first 44 bytes of ``data``; raises :class:`ProtocolError` if there are fewer."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"vsock header needs {HEADER_SIZE} bytes, sender gave {len(data)}")
    src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt = (
        HEADER.unpack_from(data, 0)
    )
    op_value: int = Op(op) if op in _KNOWN_OPS else op
    return Header(
        src_cid=src_cid,
        dst_cid=dst_cid,
        src_port=src_port,
        dst_port=dst_port,
        op=op_value,
        len=length,
        type=type_,
        flags=flags,
        buf_alloc=buf_alloc,
        fwd_cnt=fwd_cnt,
    )


def encode_header(header: Header) -> bytes:
    """Encode ``header`` to its 44 bytes."""
    return HEADER.pack(
        header.src_cid,
        header.dst_cid,
        header.src_port,
        header.dst_port,
        header.len,
        header.type,
        int(header.op),
        header.flags,
        header.buf_alloc,
        header.fwd_cnt,
    )


_KNOWN_OPS: Final = frozenset(int(op) for op in Op)
