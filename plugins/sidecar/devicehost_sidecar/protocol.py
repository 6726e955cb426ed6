"""Sidecar wire formats: the node info struct, the control page, the per-CPU command page, and the
request/response structs that travel in a command page's ``request_data`` (facts §11). The
hypervisor's own definitions (statuses, register names, HvMessage) live in :mod:`hvdef`.

Pure data: no I/O, no threads. Everything read back from a page the sidecar kernel wrote goes
through a ``decode_*_untrusted`` function, which can only raise :class:`SidecarProtocolError`.
All integers are little-endian.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import Final

import attrs

from devicehost_sidecar.errors import SidecarProtocolError
from devicehost_sidecar.hvdef import HV_MESSAGE_SIZE

__all__ = [
    "COMMAND_PAGE_SIZE",
    "CONTROL_PAGE_SIZE",
    "MAX_CPUS_PER_NODE",
    "MAX_GET_SET_VP_REGISTERS",
    "MAX_NODES",
    "MIN_PER_CPU_SHMEM",
    "PAGE_SIZE",
    "REQUEST_DATA_SIZE",
    "TRANSLATE_DEFINED_FLAGS",
    "TRANSLATE_VALIDATE_EXECUTE",
    "TRANSLATE_VALIDATE_READ",
    "TRANSLATE_VALIDATE_WRITE",
    "CommandPage",
    "ControlPageHeader",
    "CpuContext",
    "CpuStatus",
    "GetSetVpRegisterRequest",
    "NodeInfo",
    "RegisterAssoc",
    "SidecarCommand",
    "TranslateGvaRequest",
    "TranslateGvaResponse",
    "TranslateGvaResult",
    "decode_command_error_untrusted",
    "decode_control_page_header_untrusted",
    "decode_cpu_context_untrusted",
    "decode_get_set_request_untrusted",
    "decode_get_set_response_untrusted",
    "decode_node_info_untrusted",
    "decode_run_vp_response_untrusted",
    "decode_translate_gva_request_untrusted",
    "decode_translate_gva_response_untrusted",
    "encode_command_error",
    "encode_control_page_header",
    "encode_cpu_context",
    "encode_get_set_request",
    "encode_node_info",
    "encode_run_vp_response",
    "encode_translate_gva_request",
    "encode_translate_gva_response",
]

PAGE_SIZE: Final = 4096
MAX_NODES: Final = 128
REQUEST_DATA_SIZE: Final = 1024
#: Command page plus hypervisor register page: the least shared memory a CPU may have.
MIN_PER_CPU_SHMEM: Final = 2 * PAGE_SIZE


class SidecarCommand(enum.IntEnum):
    """The ``command`` word of a command page."""

    NONE = 0  # no-op; what ``test`` sends
    RUN_VP = 1
    GET_VP_REGISTERS = 2
    SET_VP_REGISTERS = 3
    TRANSLATE_GVA = 4


class CpuStatus(enum.IntEnum):
    """One byte per CPU in the control page."""

    REMOVED = 0
    IDLE = 1
    RUN = 2
    STOP = 3
    REMOVE = 4


# -- node info (the sidecar_info ioctl's output) -------------------------------------------------
#
#   0  u32 base_cpu        absolute number of the node's first CPU
#   4  u32 cpu_count       CPUs in the node
#   8  u32 per_cpu_shmem   bytes of shared memory per CPU (command page, register page, ...)
NODE_INFO: Final = struct.Struct("<III")
assert NODE_INFO.size == 12


@attrs.frozen
class NodeInfo:
    """What a node reports about itself."""

    base_cpu: int
    cpu_count: int
    per_cpu_shmem: int

    @property
    def cpus(self) -> range:
        return range(self.base_cpu, self.base_cpu + self.cpu_count)


def encode_node_info(info: NodeInfo) -> bytes:
    return NODE_INFO.pack(info.base_cpu, info.cpu_count, info.per_cpu_shmem)


def decode_node_info_untrusted(data: bytes | memoryview) -> NodeInfo:
    """Decode and sanity-check the info struct a node returned."""
    if len(data) != NODE_INFO.size:
        raise SidecarProtocolError(
            f"sidecar info struct is {len(data)} bytes, expected {NODE_INFO.size}"
        )
    base_cpu, cpu_count, per_cpu_shmem = NODE_INFO.unpack(data)
    if not 1 <= cpu_count <= MAX_CPUS_PER_NODE:
        raise SidecarProtocolError(
            f"sidecar node reports {cpu_count} CPUs; a node holds 1 to {MAX_CPUS_PER_NODE}"
        )
    if base_cpu + cpu_count > 1 << 32:
        raise SidecarProtocolError(
            f"sidecar node CPU range {base_cpu}+{cpu_count} overflows a u32 CPU number"
        )
    if per_cpu_shmem < MIN_PER_CPU_SHMEM or per_cpu_shmem % PAGE_SIZE:
        raise SidecarProtocolError(
            f"sidecar node reports {per_cpu_shmem} bytes of shared memory per CPU; "
            f"need a whole number of pages, at least {MIN_PER_CPU_SHMEM}"
        )
    return NodeInfo(base_cpu, cpu_count, per_cpu_shmem)


# -- control page (per node, kernel <-> sidecar kernel; the simulator keeps one per node) ---------
#
#   0  u32 index             node number
#   4  u32 base_cpu
#   8  u32 cpu_count
#  12  u32 request_vector    IPI vector that wakes a sidecar CPU
#  16  u32 response_cpu      APIC id to IPI back
#  20  u32 response_vector   0 = no IPI
#  24  u32 needs_attention   non-zero = a sidecar CPU has news
#  28  36  reserved
#  64  4032 cpu_status[u8]   one CpuStatus per CPU of the node
CONTROL_PAGE_HEADER: Final = struct.Struct("<7I36x")
CONTROL_CPU_STATUS_OFFSET: Final = 64
CONTROL_PAGE_SIZE: Final = 4096
MAX_CPUS_PER_NODE: Final = CONTROL_PAGE_SIZE - CONTROL_CPU_STATUS_OFFSET
assert CONTROL_PAGE_HEADER.size == CONTROL_CPU_STATUS_OFFSET
assert CONTROL_CPU_STATUS_OFFSET + MAX_CPUS_PER_NODE == CONTROL_PAGE_SIZE == PAGE_SIZE


@attrs.frozen
class ControlPageHeader:
    index: int
    base_cpu: int
    cpu_count: int
    request_vector: int = 0
    response_cpu: int = 0
    response_vector: int = 0
    needs_attention: int = 0


def encode_control_page_header(header: ControlPageHeader) -> bytes:
    return CONTROL_PAGE_HEADER.pack(
        header.index,
        header.base_cpu,
        header.cpu_count,
        header.request_vector,
        header.response_cpu,
        header.response_vector,
        header.needs_attention,
    )


def decode_control_page_header_untrusted(data: bytes | memoryview) -> ControlPageHeader:
    if len(data) < CONTROL_PAGE_HEADER.size:
        raise SidecarProtocolError(f"control page of {len(data)} bytes is too short")
    return ControlPageHeader(*CONTROL_PAGE_HEADER.unpack_from(data))


# -- command page (per CPU, 4096 bytes) -----------------------------------------------------------
#
#      0  u32   command            SidecarCommand
#      4  u8    has_error          non-zero = the command failed; cleared by the sidecar kernel
#      5  11    padding
#     16  1024  cpu_context        CpuContextX64
#   1040  256   intercept_message  HvMessage, valid when RUN_VP stopped on an intercept
#   1296  256   error              u8 len, then 255 bytes of UTF-8
#   1552  1024  request_data       input and output of the command
#   2576  1520  reserved
COMMAND_HEADER: Final = struct.Struct("<IB11x")
CPU_CONTEXT_OFFSET: Final = 16
CPU_CONTEXT_SIZE: Final = 1024
INTERCEPT_MESSAGE_OFFSET: Final = 1040
ERROR_OFFSET: Final = 1296
ERROR_SIZE: Final = 256
REQUEST_DATA_OFFSET: Final = 1552
RESERVED_OFFSET: Final = 2576
COMMAND_PAGE_SIZE: Final = 4096
assert COMMAND_HEADER.size == CPU_CONTEXT_OFFSET
assert CPU_CONTEXT_OFFSET + CPU_CONTEXT_SIZE == INTERCEPT_MESSAGE_OFFSET
assert INTERCEPT_MESSAGE_OFFSET + HV_MESSAGE_SIZE == ERROR_OFFSET
assert ERROR_OFFSET + ERROR_SIZE == REQUEST_DATA_OFFSET
assert REQUEST_DATA_OFFSET + REQUEST_DATA_SIZE == RESERVED_OFFSET
assert RESERVED_OFFSET + 190 * 8 == COMMAND_PAGE_SIZE == PAGE_SIZE


class CommandPage:
    """Typed access to one CPU's command page, over a 4096-byte memoryview of shared memory.

    The view is borrowed: whoever mapped the memory releases it with :meth:`release`.
    """

    __slots__ = ("_view",)

    def __init__(self, view: memoryview) -> None:
        if len(view) != COMMAND_PAGE_SIZE:
            raise ValueError(f"a command page is {COMMAND_PAGE_SIZE} bytes, not {len(view)}")
        self._view = view

    @property
    def raw(self) -> memoryview:
        return self._view

    @property
    def command(self) -> int:
        value: int = struct.unpack_from("<I", self._view, 0)[0]
        return value

    @command.setter
    def command(self, value: int) -> None:
        struct.pack_into("<I", self._view, 0, value)

    @property
    def has_error(self) -> bool:
        return self._view[4] != 0

    @has_error.setter
    def has_error(self, value: bool) -> None:
        self._view[4] = 1 if value else 0

    @property
    def cpu_context(self) -> memoryview:
        return self._view[CPU_CONTEXT_OFFSET:INTERCEPT_MESSAGE_OFFSET]

    @property
    def intercept_message(self) -> memoryview:
        return self._view[INTERCEPT_MESSAGE_OFFSET:ERROR_OFFSET]

    @property
    def error(self) -> memoryview:
        return self._view[ERROR_OFFSET:REQUEST_DATA_OFFSET]

    @property
    def request_data(self) -> memoryview:
        return self._view[REQUEST_DATA_OFFSET:RESERVED_OFFSET]

    def release(self) -> None:
        self._view.release()


# -- command error (1296: u8 len, 255 bytes UTF-8) ------------------------------------------------
ERROR_TEXT_MAX: Final = ERROR_SIZE - 1


def encode_command_error(text: str) -> bytes:
    """The error field for ``text``, cut to 255 bytes at a character boundary."""
    data = text.encode("utf-8")
    if len(data) > ERROR_TEXT_MAX:
        data = data[:ERROR_TEXT_MAX].decode("utf-8", errors="ignore").encode("utf-8")
    return bytes([len(data)]) + data.ljust(ERROR_TEXT_MAX, b"\0")


def decode_command_error_untrusted(data: bytes | memoryview) -> str:
    """The kernel's error text: ``len`` bytes (≤ 255, so always in bounds) as lossy UTF-8."""
    if len(data) != ERROR_SIZE:
        raise SidecarProtocolError(f"error field is {len(data)} bytes, expected {ERROR_SIZE}")
    length = data[0]
    return bytes(data[1 : 1 + length]).decode("utf-8", errors="replace")


# -- CpuContextX64 (1024 bytes) -------------------------------------------------------------------
#
#     0  16 x u64  gps: RAX RCX RDX RBX *CR2* RBP RSI RDI R8..R15 (CR2 sits in the RSP slot)
#   128  512       fx_state (FXSAVE image)
#   640  384       reserved
CPU_CONTEXT: Final = struct.Struct("<16Q512s384x")
assert CPU_CONTEXT.size == CPU_CONTEXT_SIZE
#: Index of CR2 in ``CpuContext.gps`` (the slot RSP would have).
GPS_CR2_INDEX: Final = 4


@attrs.frozen
class CpuContext:
    gps: tuple[int, ...] = (0,) * 16
    fx_state: bytes = bytes(512)

    def __attrs_post_init__(self) -> None:
        if len(self.gps) != 16 or len(self.fx_state) != 512:
            raise ValueError("a CPU context has 16 general-purpose slots and a 512-byte FXSAVE")


def encode_cpu_context(context: CpuContext) -> bytes:
    return CPU_CONTEXT.pack(*context.gps, context.fx_state)


def decode_cpu_context_untrusted(data: bytes | memoryview) -> CpuContext:
    if len(data) != CPU_CONTEXT.size:
        raise SidecarProtocolError(f"CPU context is {len(data)} bytes, expected {CPU_CONTEXT.size}")
    *gps, fx_state = CPU_CONTEXT.unpack(data)
    return CpuContext(tuple(gps), fx_state)


# -- GetSetVpRegisterRequest (request_data + 0, 16 bytes) then count x HvRegisterAssoc ------------
#
#   0  u16 count
#   2  u8  target_vtl   bits 0-3 vtl, bit 4 use_target_vtl
#   3  u8  reserved
#   4  u16 status       HvStatus, output; 0 = success
#   6  10  reserved
# HvRegisterAssoc (32 bytes, at request_data + 16 + 32 x i):
#   0  u32 name
#   4  12  padding
#  16  u128 value
GET_SET_HEADER: Final = struct.Struct("<HBBH10x")
REGISTER_ASSOC: Final = struct.Struct("<I12x16s")
assert GET_SET_HEADER.size == 16 and REGISTER_ASSOC.size == 32
MAX_GET_SET_VP_REGISTERS: Final = (REQUEST_DATA_SIZE - GET_SET_HEADER.size) // REGISTER_ASSOC.size
assert MAX_GET_SET_VP_REGISTERS == 31


@attrs.frozen
class RegisterAssoc:
    name: int
    value: int = 0  # u128


@attrs.frozen
class GetSetVpRegisterRequest:
    count: int
    target_vtl: int = 0  # HvInputVtl byte
    status: int = 0


def encode_get_set_request(
    request: GetSetVpRegisterRequest, assocs: Sequence[RegisterAssoc]
) -> bytes:
    """The request header followed by the register-assoc array (at most 31 entries)."""
    if request.count != len(assocs) or request.count > MAX_GET_SET_VP_REGISTERS:
        raise ValueError(f"bad register request: count {request.count}, {len(assocs)} entries")
    out = bytearray(GET_SET_HEADER.pack(request.count, request.target_vtl, 0, request.status))
    for assoc in assocs:
        out += REGISTER_ASSOC.pack(assoc.name, assoc.value.to_bytes(16, "little"))
    return bytes(out)


def decode_get_set_request_untrusted(
    data: bytes | memoryview,
) -> tuple[GetSetVpRegisterRequest, list[RegisterAssoc]]:
    """Decode a request as the sidecar kernel sees it; a count that does not fit is an error."""
    if len(data) != REQUEST_DATA_SIZE:
        raise SidecarProtocolError(f"request data is {len(data)} bytes")
    count, vtl, _r, status = GET_SET_HEADER.unpack_from(data)
    if count > MAX_GET_SET_VP_REGISTERS:
        raise SidecarProtocolError(f"invalid register count: {count}")
    assocs = []
    for i in range(count):
        offset = GET_SET_HEADER.size + i * REGISTER_ASSOC.size
        name, value = REGISTER_ASSOC.unpack_from(data, offset)
        assocs.append(RegisterAssoc(name, int.from_bytes(value, "little")))
    return GetSetVpRegisterRequest(count, vtl, status), assocs


def decode_get_set_response_untrusted(
    data: bytes | memoryview, count: int
) -> tuple[int, list[int]]:
    """The output status and the ``count`` register values the kernel left in the assoc array."""
    if len(data) != REQUEST_DATA_SIZE or count > MAX_GET_SET_VP_REGISTERS:
        raise SidecarProtocolError(f"register response of {len(data)} bytes for {count} registers")
    status: int = GET_SET_HEADER.unpack_from(data)[3]
    values = []
    for i in range(count):
        offset = GET_SET_HEADER.size + i * REGISTER_ASSOC.size
        _name, value = REGISTER_ASSOC.unpack_from(data, offset)
        values.append(int.from_bytes(value, "little"))
    return status, values


# -- TranslateGva ---------------------------------------------------------------------------------
#
# request (request_data + 0):
#   0  u64 gvn             guest virtual page number
#   8  u64 control_flags   bit 0 validate_read, 1 validate_write, 2 validate_execute, ...
# response (request_data + 0, 80 bytes):
#   0  u16 status          HvStatus of the translate hypercall
#   2  14  reserved
#  16  u64 result          bits 0-31 result_code, 32-39 cache_type, bit 40 overlay_page
#  24  u64 reserved
#  32  32  event_info
#  64  u64 gpa_page
#  72  u64 reserved
TRANSLATE_GVA_REQUEST: Final = struct.Struct("<QQ")
TRANSLATE_GVA_RESPONSE: Final = struct.Struct("<H14xQ8x32sQ8x")
assert TRANSLATE_GVA_REQUEST.size == 16 and TRANSLATE_GVA_RESPONSE.size == 80


TRANSLATE_VALIDATE_READ: Final = 1 << 0
TRANSLATE_VALIDATE_WRITE: Final = 1 << 1
TRANSLATE_VALIDATE_EXECUTE: Final = 1 << 2
#: Control flag bits 0-10 are defined; the rest are reserved.
TRANSLATE_DEFINED_FLAGS: Final = (1 << 11) - 1


class TranslateGvaResult(enum.IntEnum):
    SUCCESS = 0
    PAGE_NOT_PRESENT = 1
    PRIVILEGE_VIOLATION = 2
    INVALID_PAGE_TABLE_FLAGS = 3
    GPA_UNMAPPED = 4


@attrs.frozen
class TranslateGvaRequest:
    gvn: int
    control_flags: int = 0


@attrs.frozen
class TranslateGvaResponse:
    status: int
    result_code: int = 0
    cache_type: int = 0
    overlay_page: bool = False
    event_info: bytes = bytes(32)
    gpa_page: int = 0


def encode_translate_gva_request(request: TranslateGvaRequest) -> bytes:
    return TRANSLATE_GVA_REQUEST.pack(request.gvn, request.control_flags)


def decode_translate_gva_request_untrusted(data: bytes | memoryview) -> TranslateGvaRequest:
    if len(data) < TRANSLATE_GVA_REQUEST.size:
        raise SidecarProtocolError("translate request is too short")
    return TranslateGvaRequest(*TRANSLATE_GVA_REQUEST.unpack_from(data))


def encode_translate_gva_response(response: TranslateGvaResponse) -> bytes:
    result = (
        (response.result_code & 0xFFFFFFFF)
        | (response.cache_type & 0xFF) << 32
        | int(response.overlay_page) << 40
    )
    return TRANSLATE_GVA_RESPONSE.pack(
        response.status, result, response.event_info, response.gpa_page
    )


def decode_translate_gva_response_untrusted(data: bytes | memoryview) -> TranslateGvaResponse:
    if len(data) < TRANSLATE_GVA_RESPONSE.size:
        raise SidecarProtocolError(f"translate response is {len(data)} bytes, expected 80")
    status, result, event_info, gpa_page = TRANSLATE_GVA_RESPONSE.unpack_from(data)
    return TranslateGvaResponse(
        status,
        result & 0xFFFFFFFF,
        (result >> 32) & 0xFF,
        bool(result >> 40 & 1),
        event_info,
        gpa_page,
    )


# -- RunVpResponse (request_data + 0, 1 byte) -----------------------------------------------------
#
#   0  u8 intercept   non-zero = stopped by an intercept (message in intercept_message)
RUN_VP_RESPONSE: Final = struct.Struct("<B")


def encode_run_vp_response(intercept: bool) -> bytes:
    return RUN_VP_RESPONSE.pack(int(intercept))


def decode_run_vp_response_untrusted(data: bytes | memoryview) -> bool:
    if len(data) < RUN_VP_RESPONSE.size:
        raise SidecarProtocolError("run response is empty")
    return bool(RUN_VP_RESPONSE.unpack_from(data)[0])
