"""Hypervisor definitions the sidecar protocol carries: HvStatus, x64 register names, the 256-byte
HvMessage, and the x64 I/O port intercept payload the simulator puts inside one.

Pure data; every ``decode_*_untrusted`` function can only raise :class:`SidecarProtocolError`.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

import attrs

from devicehost_sidecar.errors import SidecarProtocolError

__all__ = [
    "HV_MESSAGE_PAYLOAD_SIZE",
    "HV_MESSAGE_SIZE",
    "HV_MESSAGE_TYPE_X64_IO_PORT_INTERCEPT",
    "HvMessage",
    "HvStatus",
    "HvX64RegisterName",
    "IoPortIntercept",
    "decode_hv_message_untrusted",
    "decode_io_port_intercept_untrusted",
    "encode_hv_message",
    "encode_io_port_intercept",
    "hv_status_name",
]

HV_MESSAGE_SIZE: Final = 256


class HvStatus(enum.IntEnum):
    """The hypervisor statuses the client names in its errors (others are shown as numbers)."""

    SUCCESS = 0x0000
    INVALID_HYPERCALL_CODE = 0x0002
    INVALID_HYPERCALL_INPUT = 0x0003
    INVALID_ALIGNMENT = 0x0004
    INVALID_PARAMETER = 0x0005
    ACCESS_DENIED = 0x0006
    INVALID_PARTITION_STATE = 0x0007
    OPERATION_DENIED = 0x0008
    INSUFFICIENT_MEMORY = 0x000B
    INVALID_VP_INDEX = 0x000E


def hv_status_name(status: int) -> str:
    """``HV_STATUS_<NAME>`` for a known status, ``HV_STATUS_<hex>`` otherwise."""
    try:
        return f"HV_STATUS_{HvStatus(status).name}"
    except ValueError:
        return f"HV_STATUS_{status:#06x}"


class HvX64RegisterName(enum.IntEnum):
    """The x64 register names the simulated VPs model (hypervisor register namespace)."""

    RAX = 0x00020000
    RCX = 0x00020001
    RDX = 0x00020002
    RBX = 0x00020003
    RSP = 0x00020004
    RBP = 0x00020005
    RSI = 0x00020006
    RDI = 0x00020007
    R8 = 0x00020008
    R9 = 0x00020009
    R10 = 0x0002000A
    R11 = 0x0002000B
    R12 = 0x0002000C
    R13 = 0x0002000D
    R14 = 0x0002000E
    R15 = 0x0002000F
    RIP = 0x00020010
    RFLAGS = 0x00020011
    XMM0 = 0x00030000
    XMM1 = 0x00030001
    XMM2 = 0x00030002
    XMM3 = 0x00030003
    XMM4 = 0x00030004
    XMM5 = 0x00030005
    XMM6 = 0x00030006
    XMM7 = 0x00030007
    XMM8 = 0x00030008
    XMM9 = 0x00030009
    XMM10 = 0x0003000A
    XMM11 = 0x0003000B
    XMM12 = 0x0003000C
    XMM13 = 0x0003000D
    XMM14 = 0x0003000E
    XMM15 = 0x0003000F
    CR0 = 0x00040000
    CR2 = 0x00040001
    CR3 = 0x00040002
    CR4 = 0x00040003
    CR8 = 0x00040004
    ES = 0x00060000
    CS = 0x00060001
    SS = 0x00060002
    DS = 0x00060003
    FS = 0x00060004
    GS = 0x00060005
    LDTR = 0x00060006
    TR = 0x00060007


# -- HvMessage (256 bytes) ------------------------------------------------------------------------
#
#   0  u32 message_type
#   4  u8  payload_size     bytes of payload in use (≤ 240)
#   5  u8  flags            bit 0: message_pending
#   6  u16 reserved
#   8  u64 id               sender / port id
#  16  240 payload
HV_MESSAGE_HEADER: Final = struct.Struct("<IBBHQ")
HV_MESSAGE_PAYLOAD_SIZE: Final = HV_MESSAGE_SIZE - HV_MESSAGE_HEADER.size
assert HV_MESSAGE_HEADER.size == 16 and HV_MESSAGE_PAYLOAD_SIZE == 240
HV_MESSAGE_TYPE_X64_IO_PORT_INTERCEPT: Final = 0x80010000


@attrs.frozen
class HvMessage:
    message_type: int
    payload: bytes = b""
    message_pending: bool = False
    id: int = 0


def encode_hv_message(message: HvMessage) -> bytes:
    if len(message.payload) > HV_MESSAGE_PAYLOAD_SIZE:
        raise ValueError(f"HvMessage payload of {len(message.payload)} bytes exceeds 240")
    header = HV_MESSAGE_HEADER.pack(
        message.message_type, len(message.payload), int(message.message_pending), 0, message.id
    )
    return header + message.payload.ljust(HV_MESSAGE_PAYLOAD_SIZE, b"\0")


def decode_hv_message_untrusted(data: bytes | memoryview) -> HvMessage:
    if len(data) != HV_MESSAGE_SIZE:
        raise SidecarProtocolError(f"HvMessage is {len(data)} bytes, expected {HV_MESSAGE_SIZE}")
    message_type, size, flags, _reserved, ident = HV_MESSAGE_HEADER.unpack_from(data)
    if size > HV_MESSAGE_PAYLOAD_SIZE:
        raise SidecarProtocolError(
            f"intercept message claims a {size}-byte payload; an HvMessage holds at most 240"
        )
    payload = bytes(data[HV_MESSAGE_HEADER.size : HV_MESSAGE_HEADER.size + size])
    return HvMessage(message_type, payload, bool(flags & 1), ident)


# -- x64 I/O port intercept payload (inside an HvMessage) -----------------------------------------
#
# Not part of facts §11: the layout follows the hypervisor's published I/O port intercept message.
# Only the simulator produces it and only the demo decodes it; the client treats the payload as
# opaque bytes.
#
#    0  u32 vp_index
#    4  u8  instruction_length (bits 0-3) | cr8 (bits 4-7)
#    5  u8  intercept_access_type   0 read (IN), 1 write (OUT)
#    6  u16 execution_state
#    8  16  cs segment
#   24  u64 rip
#   32  u64 rflags
#   40  u16 port_number
#   42  u8  access_info             bits 0-2: access size in bytes
#   43  u8  instruction_byte_count
#   44  u32 reserved
#   48  u64 rax
#   56  16  instruction_bytes
#   72  16  ds segment
#   88  16  es segment
#  104  u64 rcx
#  112  u64 rsi
#  120  u64 rdi
IO_PORT_INTERCEPT: Final = struct.Struct("<IBBH16sQQHBBIQ16s16s16sQQQ")
assert IO_PORT_INTERCEPT.size == 128


@attrs.frozen
class IoPortIntercept:
    vp_index: int
    rip: int
    rflags: int
    port: int
    access_size: int
    is_write: bool
    rax: int
    instruction_length: int = 1


def encode_io_port_intercept(msg: IoPortIntercept) -> bytes:
    return IO_PORT_INTERCEPT.pack(
        msg.vp_index,
        msg.instruction_length & 0xF,
        int(msg.is_write),
        0,
        b"",
        msg.rip,
        msg.rflags,
        msg.port,
        msg.access_size & 0x7,
        0,
        0,
        msg.rax,
        b"",
        b"",
        b"",
        0,
        0,
        0,
    )


def decode_io_port_intercept_untrusted(payload: bytes) -> IoPortIntercept:
    if len(payload) < IO_PORT_INTERCEPT.size:
        raise SidecarProtocolError(
            f"I/O port intercept payload is {len(payload)} bytes, expected {IO_PORT_INTERCEPT.size}"
        )
    (vp, ilen, access, _es, _cs, rip, rflags, port, info, _n, _r, rax, *_rest) = (
        IO_PORT_INTERCEPT.unpack_from(payload)
    )
    return IoPortIntercept(vp, rip, rflags, port, info & 0x7, access == 1, rax, ilen & 0xF)
