"""The vmbfs wire format (facts §8.1-§8.5): constants, message values and their codecs.

Wire only, no behaviour. Every vmbfs message is one VMBus pipe message (message mode) made of an
8-byte header and a type-specific body; all integers are little-endian. Functions that read
bytes from the peer end in ``_untrusted`` and raise only :class:`ProtocolError`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Final

import attrs

from devicehost.vmbus import Guid

__all__ = [
    "BOOT_INSTANCE_ID",
    "HEADER_SIZE",
    "IMC_INSTANCE_ID",
    "INTERFACE_ID",
    "INTERFACE_NAME",
    "MAX_MESSAGE_SIZE",
    "MAX_READ_SIZE",
    "VERSION_WIN10",
    "FileInfoFlags",
    "GetFileInfoRequest",
    "GetFileInfoResponse",
    "Message",
    "MessageType",
    "PathCache",
    "ProtocolError",
    "ProtocolErrorKind",
    "ReadFileRdmaRequest",
    "ReadFileRdmaResponse",
    "ReadFileRequest",
    "ReadFileResponse",
    "Request",
    "Response",
    "Status",
    "VersionRequest",
    "VersionResponse",
    "VersionStatus",
    "decode_message_untrusted",
    "decode_path_untrusted",
    "decode_read_file_request_fields_untrusted",
    "decode_read_file_success_untrusted",
    "decode_request_untrusted",
    "decode_response_untrusted",
    "encode_get_file_info_request",
    "encode_get_file_info_response",
    "encode_message",
    "encode_path",
    "encode_read_file_rdma_request",
    "encode_read_file_rdma_response",
    "encode_read_file_request",
    "encode_read_file_request_wire",
    "encode_read_file_response",
    "encode_version_request",
    "encode_version_response",
]

INTERFACE_NAME: Final = "vmbfs"
INTERFACE_ID: Final = Guid.parse("c376c1c3-d276-48d2-90a9-c04748072c60")
#: The instance the device offers: the initial machine configuration (IMC) hive.
IMC_INSTANCE_ID: Final = Guid.parse("c4e5e7d1-d748-4afc-979d-683167910a55")
#: Defined upstream for a boot-files instance; never offered.
BOOT_INSTANCE_ID: Final = Guid.parse("c63c9bdf-5fa5-4208-b03f-6b458b365592")

#: The largest message either side sends; the device's receive buffer size.
MAX_MESSAGE_SIZE: Final = 12288
#: The largest READ_FILE byte count: MAX_MESSAGE_SIZE - header (8) - ReadFileResponse status (4).
MAX_READ_SIZE: Final = MAX_MESSAGE_SIZE - 8 - 4
#: The only protocol version (major 1, minor 0).
VERSION_WIN10: Final = 0x00010000


class MessageType(enum.IntEnum):
    INVALID = 0
    VERSION_REQUEST = 1
    VERSION_RESPONSE = 2
    GET_FILE_INFO_REQUEST = 3
    GET_FILE_INFO_RESPONSE = 4
    READ_FILE_REQUEST = 5
    READ_FILE_RESPONSE = 6
    READ_FILE_RDMA_REQUEST = 7
    READ_FILE_RDMA_RESPONSE = 8


class Status(enum.IntEnum):
    SUCCESS = 0
    NOT_FOUND = 1
    END_OF_FILE = 2
    ERROR = 3


class VersionStatus(enum.IntEnum):
    SUPPORTED = 0
    UNSUPPORTED = 1


class FileInfoFlags(enum.IntFlag):
    """GET_FILE_INFO_RESPONSE flags; bits 2-31 are reserved. The device never sets RDMA_CAPABLE."""

    DIRECTORY = 1 << 0
    RDMA_CAPABLE = 1 << 1


# Plain ints for the hot paths (an enum member lookup costs more than the compare).
_READ_FILE_REQUEST_TYPE: Final = int(MessageType.READ_FILE_REQUEST)
_READ_FILE_RESPONSE_TYPE: Final = int(MessageType.READ_FILE_RESPONSE)
_SUCCESS: Final = int(Status.SUCCESS)


# Byte layouts (little-endian; offsets from the start of the message).
#   header                      0 message_type u32 | 4 reserved u32 (sent 0, ignored)
#   VERSION_REQUEST body        8 requested_version u32
#   VERSION_RESPONSE body       8 status u32                                      (12 bytes total)
#   GET_FILE_INFO_REQUEST body  8 path: UTF-16LE to the end of the message
#   GET_FILE_INFO_RESPONSE body 8 status u32 | 12 flags u32 | 16 file_size u64    (24 bytes total)
#   READ_FILE_REQUEST body      8 byte_count u32 | 12 offset u64 (packed, unaligned) | 20 path
#   READ_FILE_RESPONSE body     8 status u32 | 12 data (only on SUCCESS)
#   READ_FILE_RDMA_REQUEST body 8 handle u32 | 12 byte_count u32 | 16 file_offset u64
#                               | 24 token_offset u64 | 32 path
#   READ_FILE_RDMA_RESPONSE     8 status u32 | 12 byte_count u32
_HEADER: Final = struct.Struct("<II")
_U32: Final = struct.Struct("<I")
_FILE_INFO_RESPONSE: Final = struct.Struct("<IIQ")
_READ_FILE_FIXED: Final = struct.Struct("<IQ")  # 12 bytes: the packed fixed part
_RDMA_REQUEST_FIXED: Final = struct.Struct("<IIQQ")
_RDMA_RESPONSE: Final = struct.Struct("<II")
# The hot paths: header + READ_FILE fixed part (20 bytes), header + status (12 bytes).
_READ_FILE_REQUEST_PREFIX: Final = struct.Struct("<IIIQ")
_STATUS_PREFIX: Final = struct.Struct("<III")

HEADER_SIZE: Final = _HEADER.size


class ProtocolErrorKind(enum.Enum):
    """Why a vmbfs message was rejected (the upstream error names)."""

    TOO_SHORT = "TooShort"  # shorter than the header or than its body's fixed part
    INVALID_MESSAGE_TYPE = "InvalidMessageType"  # not a type this side accepts
    UNALIGNED = "Unaligned"  # path of an odd number of bytes
    NULL_TERMINATOR_IN_PATH = "NullTerminatorInPath"  # a 0x0000 unit in the path
    INVALID_UTF16_PATH = "InvalidUtf16Path"  # unpaired surrogate in the path
    DATA_WITHOUT_SUCCESS = "DataWithoutSuccess"  # (client side) read data after a failure status


class ProtocolError(Exception):
    """Raised when bytes from the peer are not a valid vmbfs message; the peer is to blame."""

    def __init__(self, kind: ProtocolErrorKind, message: str) -> None:
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        #: The message without its kind (``str()`` is ``"<kind>: <detail>"``).
        self.detail = message


# -- values ---------------------------------------------------------------------------------------


@attrs.frozen
class VersionRequest:
    requested_version: int


@attrs.frozen
class VersionResponse:
    status: int  # a VersionStatus, kept as received


@attrs.frozen
class GetFileInfoRequest:
    path: str  # decoded per §8.5: backslashes already turned into slashes


@attrs.frozen
class GetFileInfoResponse:
    status: int
    flags: int
    file_size: int


@attrs.frozen
class ReadFileRequest:
    byte_count: int
    offset: int
    path: str


@attrs.frozen
class ReadFileResponse:
    status: int
    data: bytes = b""


@attrs.frozen
class ReadFileRdmaRequest:
    """Defined by the protocol; the device does not handle it (InvalidMessageType)."""

    handle: int
    byte_count: int
    file_offset: int
    token_offset: int
    path: str


@attrs.frozen
class ReadFileRdmaResponse:
    """Defined by the protocol; never sent by the device."""

    status: int
    byte_count: int


Request = VersionRequest | GetFileInfoRequest | ReadFileRequest
Response = VersionResponse | GetFileInfoResponse | ReadFileResponse


# -- paths ----------------------------------------------------------------------------------------


def decode_path_untrusted(data: bytes | bytearray | memoryview) -> str:
    """Decode a wire path (§8.5): UTF-16LE units, no NUL anywhere, valid UTF-16, ``\\`` -> ``/``.

    The checks run in this order: odd length (UNALIGNED), any 0x0000 unit, even a trailing
    terminator (NULL_TERMINATOR_IN_PATH), unpaired surrogates (INVALID_UTF16_PATH). The empty path
    is valid and decodes to ``""``.
    """
    return _decode_path(bytes(data))


def _decode_path(raw: bytes) -> str:
    if len(raw) % 2:
        raise ProtocolError(ProtocolErrorKind.UNALIGNED, f"path of odd length {len(raw)}")
    # Native-order units: a zero unit is zero in either byte order.
    if 0 in memoryview(raw).cast("H"):
        raise ProtocolError(ProtocolErrorKind.NULL_TERMINATOR_IN_PATH, "NUL unit in path")
    try:
        text = raw.decode("utf-16-le")
    except UnicodeDecodeError as exc:
        raise ProtocolError(ProtocolErrorKind.INVALID_UTF16_PATH, str(exc)) from None
    return text.replace("\\", "/")


class PathCache:
    """:func:`decode_path_untrusted` with a memory of the paths it decoded lately, by their exact
    wire bytes: a guest reading a file sends the same path in every request.

    The bytes are copied before anything else, so the peer cannot change them between check and
    use. Only paths that passed every check are remembered, and only short ones; the memory is
    emptied when it holds ``size`` paths, so a guest sending ever new paths cannot grow it. A hit
    returns exactly what decoding the bytes again would (the text is a function of the bytes).
    """

    def __init__(self, size: int = 64, max_bytes: int = 512) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self._paths: dict[bytes, str] = {}

    def decode_untrusted(self, data: bytes | bytearray | memoryview) -> str:
        raw = bytes(data)
        text = self._paths.get(raw)
        if text is not None:
            return text
        text = _decode_path(raw)
        if len(raw) <= self.max_bytes:
            if len(self._paths) >= self.size:
                self._paths.clear()
            self._paths[raw] = text
        return text


def decode_read_file_request_fields_untrusted(
    data: bytes | bytearray | memoryview, paths: PathCache | None = None
) -> tuple[int, int, str] | None:
    """``(byte_count, offset, path)`` of a READ_FILE_REQUEST, the device's hot path, or None if
    ``data`` is not one with its whole fixed part (then :func:`decode_request_untrusted` tells
    what it is, or why it is invalid). The path is checked as :func:`decode_path_untrusted`
    does (through ``paths`` if given), raising :class:`ProtocolError` the same way."""
    if len(data) < _READ_FILE_REQUEST_PREFIX.size:
        return None
    message_type, _reserved, count, offset = _READ_FILE_REQUEST_PREFIX.unpack_from(data)
    if message_type != _READ_FILE_REQUEST_TYPE:
        return None
    path = data[_READ_FILE_REQUEST_PREFIX.size :]
    if paths is None:
        return count, offset, decode_path_untrusted(path)
    return count, offset, paths.decode_untrusted(path)


def encode_path(path: str) -> bytes:
    """The wire form of ``path`` (UTF-16LE, no terminator). Raises ValueError for NUL or lone
    surrogates: the device would reject such a path as fatal."""
    if "\0" in path:
        raise ValueError("a vmbfs path cannot contain NUL")
    try:
        return path.encode("utf-16-le")
    except UnicodeEncodeError as exc:
        raise ValueError(f"path is not valid Unicode: {exc}") from None


# -- encoders -------------------------------------------------------------------------------------


def encode_message(message_type: int, body: bytes = b"") -> bytes:
    """Header (reserved sent as 0) + body."""
    return _HEADER.pack(message_type, 0) + body


def encode_version_request(version: int = VERSION_WIN10) -> bytes:
    return encode_message(MessageType.VERSION_REQUEST, _U32.pack(version))


def encode_version_response(status: int) -> bytes:
    return encode_message(MessageType.VERSION_RESPONSE, _U32.pack(status))


def encode_get_file_info_request(path: str) -> bytes:
    return encode_message(MessageType.GET_FILE_INFO_REQUEST, encode_path(path))


def encode_get_file_info_response(status: int, flags: int = 0, file_size: int = 0) -> bytes:
    return encode_message(
        MessageType.GET_FILE_INFO_RESPONSE, _FILE_INFO_RESPONSE.pack(status, flags, file_size)
    )


def encode_read_file_request(byte_count: int, offset: int, path: str) -> bytes:
    return encode_message(
        MessageType.READ_FILE_REQUEST, _READ_FILE_FIXED.pack(byte_count, offset) + encode_path(path)
    )


def encode_read_file_request_wire(byte_count: int, offset: int, wire_path: bytes) -> bytes:
    """:func:`encode_read_file_request` for a path already encoded by :func:`encode_path`."""
    return (
        _READ_FILE_REQUEST_PREFIX.pack(_READ_FILE_REQUEST_TYPE, 0, byte_count, offset)
        + wire_path
    )


def encode_read_file_response(status: int, data: bytes | bytearray | memoryview = b"") -> bytes:
    return encode_message(MessageType.READ_FILE_RESPONSE, _U32.pack(status) + bytes(data))


def encode_read_file_rdma_request(
    handle: int, byte_count: int, file_offset: int, token_offset: int, path: str
) -> bytes:
    fixed = _RDMA_REQUEST_FIXED.pack(handle, byte_count, file_offset, token_offset)
    return encode_message(MessageType.READ_FILE_RDMA_REQUEST, fixed + encode_path(path))


def encode_read_file_rdma_response(status: int, byte_count: int) -> bytes:
    return encode_message(
        MessageType.READ_FILE_RDMA_RESPONSE, _RDMA_RESPONSE.pack(status, byte_count)
    )


# -- decoders -------------------------------------------------------------------------------------


def _split_untrusted(data: bytes | bytearray | memoryview) -> tuple[int, memoryview]:
    view = memoryview(data)
    if len(view) < HEADER_SIZE:
        raise ProtocolError(
            ProtocolErrorKind.TOO_SHORT, f"message of {len(view)} bytes has no 8-byte header"
        )
    message_type, _reserved = _HEADER.unpack_from(view)
    return message_type, view[HEADER_SIZE:]


def _fixed_untrusted(body: memoryview, layout: struct.Struct, what: str) -> tuple[int, ...]:
    if len(body) < layout.size:
        raise ProtocolError(
            ProtocolErrorKind.TOO_SHORT,
            f"{what} body of {len(body)} bytes, its fixed part needs {layout.size}",
        )
    return layout.unpack_from(body)


def _version_request(body: memoryview) -> VersionRequest:
    (version,) = _fixed_untrusted(body, _U32, "VERSION_REQUEST")
    return VersionRequest(version)


def _version_response(body: memoryview) -> VersionResponse:
    (status,) = _fixed_untrusted(body, _U32, "VERSION_RESPONSE")
    return VersionResponse(status)


def _get_file_info_request(body: memoryview) -> GetFileInfoRequest:
    return GetFileInfoRequest(decode_path_untrusted(body))


def _get_file_info_response(body: memoryview) -> GetFileInfoResponse:
    status, flags, size = _fixed_untrusted(body, _FILE_INFO_RESPONSE, "GET_FILE_INFO_RESPONSE")
    return GetFileInfoResponse(status, flags, size)


def _read_file_request(body: memoryview) -> ReadFileRequest:
    count, offset = _fixed_untrusted(body, _READ_FILE_FIXED, "READ_FILE_REQUEST")
    return ReadFileRequest(count, offset, decode_path_untrusted(body[_READ_FILE_FIXED.size :]))


def _read_file_response(body: memoryview) -> ReadFileResponse:
    (status,) = _fixed_untrusted(body, _U32, "READ_FILE_RESPONSE")
    payload = bytes(body[_U32.size :])
    if status != Status.SUCCESS and payload:
        raise ProtocolError(
            ProtocolErrorKind.DATA_WITHOUT_SUCCESS,
            f"READ_FILE_RESPONSE with status {status} carries {len(payload)} data bytes",
        )
    return ReadFileResponse(status, payload)


def _read_file_rdma_request(body: memoryview) -> ReadFileRdmaRequest:
    fixed = _fixed_untrusted(body, _RDMA_REQUEST_FIXED, "READ_FILE_RDMA_REQUEST")
    handle, count, file_offset, token_offset = fixed
    path = decode_path_untrusted(body[_RDMA_REQUEST_FIXED.size :])
    return ReadFileRdmaRequest(handle, count, file_offset, token_offset, path)


def _read_file_rdma_response(body: memoryview) -> ReadFileRdmaResponse:
    status, count = _fixed_untrusted(body, _RDMA_RESPONSE, "READ_FILE_RDMA_RESPONSE")
    return ReadFileRdmaResponse(status, count)


Message = (
    VersionRequest
    | VersionResponse
    | GetFileInfoRequest
    | GetFileInfoResponse
    | ReadFileRequest
    | ReadFileResponse
    | ReadFileRdmaRequest
    | ReadFileRdmaResponse
)

# Body decoders by message type (the header is already split off).
_BODY_DECODERS: Final[dict[int, Callable[[memoryview], Message]]] = {
    MessageType.VERSION_REQUEST: _version_request,
    MessageType.VERSION_RESPONSE: _version_response,
    MessageType.GET_FILE_INFO_REQUEST: _get_file_info_request,
    MessageType.GET_FILE_INFO_RESPONSE: _get_file_info_response,
    MessageType.READ_FILE_REQUEST: _read_file_request,
    MessageType.READ_FILE_RESPONSE: _read_file_response,
    MessageType.READ_FILE_RDMA_REQUEST: _read_file_rdma_request,
    MessageType.READ_FILE_RDMA_RESPONSE: _read_file_rdma_response,
}
_REQUEST_TYPES: Final = frozenset(
    {MessageType.VERSION_REQUEST, MessageType.GET_FILE_INFO_REQUEST, MessageType.READ_FILE_REQUEST}
)
_RESPONSE_TYPES: Final = frozenset(
    {
        MessageType.VERSION_RESPONSE,
        MessageType.GET_FILE_INFO_RESPONSE,
        MessageType.READ_FILE_RESPONSE,
    }
)


def _decode_untrusted(
    data: bytes | bytearray | memoryview, accepted: frozenset[int] | None, what: str
) -> Message:
    message_type, body = _split_untrusted(data)
    # The type is checked before the body: an unaccepted type is INVALID_MESSAGE_TYPE whatever
    # its body holds.
    decoder = _BODY_DECODERS.get(message_type)
    if decoder is None or (accepted is not None and message_type not in accepted):
        raise ProtocolError(
            ProtocolErrorKind.INVALID_MESSAGE_TYPE, f"message type {message_type} is not {what}"
        )
    return decoder(body)


def decode_read_file_success_untrusted(data: bytes | bytearray | memoryview) -> memoryview | None:
    """The data of a READ_FILE_RESPONSE with status SUCCESS, as a view of ``data`` (the client's
    hot path), or None if ``data`` is anything else (then :func:`decode_response_untrusted`
    tells what it is, or why it is invalid)."""
    if len(data) < _STATUS_PREFIX.size:
        return None
    message_type, _reserved, status = _STATUS_PREFIX.unpack_from(data)
    if message_type != _READ_FILE_RESPONSE_TYPE or status != _SUCCESS:
        return None
    return memoryview(data)[_STATUS_PREFIX.size :]


def decode_message_untrusted(data: bytes | bytearray | memoryview) -> Message:
    """Parse any of the eight defined message types (types 1-8)."""
    return _decode_untrusted(data, None, "a vmbfs message")


def decode_request_untrusted(data: bytes | bytearray | memoryview) -> Request:
    """Parse a message the device receives: VERSION_REQUEST, GET_FILE_INFO or READ_FILE.

    Bytes after a fixed-size body are ignored (VERSION_REQUEST); paths run to the end of the
    message. Any other message type, including the RDMA request, is INVALID_MESSAGE_TYPE.
    """
    message = _decode_untrusted(data, _REQUEST_TYPES, "a request")
    assert isinstance(message, VersionRequest | GetFileInfoRequest | ReadFileRequest)
    return message


def decode_response_untrusted(data: bytes | bytearray | memoryview) -> Response:
    """Parse a message the client receives: VERSION, GET_FILE_INFO or READ_FILE response.

    A READ_FILE_RESPONSE carries data only with SUCCESS; data after another status is an error.
    """
    message = _decode_untrusted(data, _RESPONSE_TYPES, "a response")
    assert isinstance(message, VersionResponse | GetFileInfoResponse | ReadFileResponse)
    return message
