"""vhost-user wire format (QEMU ``docs/interop/vhost-user.rst``): messages only, no I/O.

Every message is a 12-byte header followed by ``size`` bytes of payload; file descriptors travel
beside it as SCM_RIGHTS ancillary data. Everything decoded here comes from the VMM and is
untrusted: ``decode_*_untrusted`` raise only :class:`VhostUserError`.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

import attrs

__all__ = [
    "F_NEED_REPLY",
    "F_REPLY",
    "F_VERSION",
    "HEADER",
    "MAX_CONFIG_SIZE",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD",
    "PROTOCOL_F_CONFIG",
    "PROTOCOL_F_MQ",
    "PROTOCOL_F_REPLY_ACK",
    "USER_F_PROTOCOL_FEATURES",
    "VRING_NOFD",
    "ConfigPayload",
    "Header",
    "MemRegion",
    "Request",
    "VhostUserError",
    "VringAddr",
    "VringState",
    "decode_config_untrusted",
    "decode_header_untrusted",
    "decode_mem_table_untrusted",
    "decode_u64_untrusted",
    "decode_vring_addr_untrusted",
    "decode_vring_state_untrusted",
    "encode_config",
    "encode_header",
    "encode_mem_table",
    "encode_message",
    "encode_u64",
    "encode_vring_addr",
    "encode_vring_state",
]


class VhostUserError(Exception):
    """Raised when the VMM (frontend) sent a message that breaks the vhost-user protocol."""


class Request(enum.IntEnum):
    """Frontend request codes this backend understands."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25


#: Header flag bits: version (bits 0..1, must be 1), reply, need-reply.
F_VERSION: Final = 0x1
F_REPLY: Final = 0x4
F_NEED_REPLY: Final = 0x8
_F_VERSION_MASK: Final = 0x3

#: The virtio feature bit that announces protocol features (GET/SET_PROTOCOL_FEATURES).
USER_F_PROTOCOL_FEATURES: Final = 30
PROTOCOL_F_MQ: Final = 0
PROTOCOL_F_REPLY_ACK: Final = 3
PROTOCOL_F_CONFIG: Final = 9

#: In a KICK/CALL/ERR payload: bits 0..7 are the vring index, bit 8 means "no fd".
VRING_NOFD: Final = 0x100
_VRING_INDEX_MASK: Final = 0xFF

MAX_MEM_REGIONS: Final = 8
MAX_CONFIG_SIZE: Final = 256
#: No valid message is larger: a 12-byte config header plus 256 bytes, or 8 + 8 * 32 of regions.
MAX_PAYLOAD: Final = 4096

# byte layout: header = le32 request, le32 flags, le32 size
HEADER: Final = struct.Struct("<III")
# byte layout: le64
U64: Final = struct.Struct("<Q")
# byte layout: vring state = le32 index, le32 num
VRING_STATE: Final = struct.Struct("<II")
# byte layout: vring addr = le32 index, le32 flags, le64 desc, le64 used, le64 avail, le64 log
VRING_ADDR: Final = struct.Struct("<IIQQQQ")
# byte layout: memory table = le32 count, le32 padding, then count regions
MEM_TABLE: Final = struct.Struct("<II")
# byte layout: region = le64 guest address, le64 size, le64 user address, le64 mmap offset
MEM_REGION: Final = struct.Struct("<QQQQ")
# byte layout: config = le32 offset, le32 size, le32 flags, then size bytes
CONFIG: Final = struct.Struct("<III")


@attrs.frozen
class Header:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & F_NEED_REPLY)


@attrs.frozen
class VringState:
    index: int
    num: int


@attrs.frozen
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@attrs.frozen
class MemRegion:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@attrs.frozen
class ConfigPayload:
    offset: int
    size: int
    flags: int
    data: bytes = b""


def decode_header_untrusted(data: bytes) -> Header:
    if len(data) != HEADER.size:
        raise VhostUserError(f"message header is {len(data)} bytes, not {HEADER.size}")
    request, flags, size = HEADER.unpack(data)
    if flags & _F_VERSION_MASK != F_VERSION:
        raise VhostUserError(f"message flags {flags:#x} carry version {flags & 3}, not 1")
    if flags & F_REPLY:
        raise VhostUserError(f"request {request} has the reply flag set")
    if size > MAX_PAYLOAD:
        raise VhostUserError(
            f"request {request} announces a {size}-byte payload (max {MAX_PAYLOAD})"
        )
    return Header(request, flags, size)


def encode_header(header: Header) -> bytes:
    return HEADER.pack(header.request, header.flags, header.size)


def encode_message(request: int, payload: bytes = b"", *, flags: int = F_VERSION) -> bytes:
    """A whole message: header then payload."""
    return HEADER.pack(request, flags, len(payload)) + payload


def _expect(payload: bytes, size: int, what: str) -> None:
    if len(payload) != size:
        raise VhostUserError(f"{what} payload is {len(payload)} bytes, not {size}")


def decode_u64_untrusted(payload: bytes, what: str) -> int:
    _expect(payload, U64.size, what)
    return U64.unpack(payload)[0]  # type: ignore[no-any-return]


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


def decode_vring_state_untrusted(payload: bytes, what: str) -> VringState:
    _expect(payload, VRING_STATE.size, what)
    return VringState(*VRING_STATE.unpack(payload))


def encode_vring_state(state: VringState) -> bytes:
    return VRING_STATE.pack(state.index, state.num)


def decode_vring_addr_untrusted(payload: bytes) -> VringAddr:
    _expect(payload, VRING_ADDR.size, "SET_VRING_ADDR")
    return VringAddr(*VRING_ADDR.unpack(payload))


def encode_vring_addr(addr: VringAddr) -> bytes:
    return VRING_ADDR.pack(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)


def decode_mem_table_untrusted(payload: bytes) -> tuple[MemRegion, ...]:
    if len(payload) < MEM_TABLE.size:
        raise VhostUserError(f"SET_MEM_TABLE payload is {len(payload)} bytes, too short")
    count, _padding = MEM_TABLE.unpack_from(payload)
    if not 1 <= count <= MAX_MEM_REGIONS:
        raise VhostUserError(f"SET_MEM_TABLE has {count} regions (1..{MAX_MEM_REGIONS})")
    # QEMU sends the full 8-region array; accept exactly the announced regions or the full array.
    if len(payload) not in (MEM_TABLE.size + count * MEM_REGION.size,
                            MEM_TABLE.size + MAX_MEM_REGIONS * MEM_REGION.size):
        raise VhostUserError(
            f"SET_MEM_TABLE payload is {len(payload)} bytes for {count} regions"
        )
    regions = tuple(
        MemRegion(*MEM_REGION.unpack_from(payload, MEM_TABLE.size + i * MEM_REGION.size))
        for i in range(count)
    )
    for r in regions:
        if r.size == 0 or r.guest_addr + r.size > 1 << 64 or r.user_addr + r.size > 1 << 64:
            raise VhostUserError(f"SET_MEM_TABLE region {r} is empty or wraps around")
    return regions


def encode_mem_table(regions: tuple[MemRegion, ...] | list[MemRegion]) -> bytes:
    out = MEM_TABLE.pack(len(regions), 0)
    for r in regions:
        out += MEM_REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset)
    return out


def decode_config_untrusted(payload: bytes, what: str, *, with_data: bool) -> ConfigPayload:
    """GET_CONFIG carries ``size`` bytes of (ignored) data too; SET_CONFIG carries the data."""
    if len(payload) < CONFIG.size:
        raise VhostUserError(f"{what} payload is {len(payload)} bytes, too short")
    offset, size, flags = CONFIG.unpack_from(payload)
    if size > MAX_CONFIG_SIZE or offset + size > MAX_CONFIG_SIZE:
        raise VhostUserError(f"{what} range {offset}+{size} exceeds the 256-byte config space")
    _expect(payload, CONFIG.size + size, what)
    data = payload[CONFIG.size :] if with_data else b""
    return ConfigPayload(offset, size, flags, bytes(data))


def encode_config(config: ConfigPayload) -> bytes:
    return CONFIG.pack(config.offset, config.size, config.flags) + config.data


def vring_file_index(value: int, queue_count: int, what: str) -> tuple[int, bool]:
    """The vring index and whether an fd comes with a KICK/CALL/ERR payload."""
    if value & ~(_VRING_INDEX_MASK | VRING_NOFD):
        raise VhostUserError(f"{what} payload {value:#x} sets reserved bits")
    index = value & _VRING_INDEX_MASK
    if index >= queue_count:
        raise VhostUserError(f"{what} names vring {index}; the device has {queue_count}")
    return index, not value & VRING_NOFD
