"""The vmbfs protocol state machine of one open channel (facts §8.6), without any I/O.

Feed each received message to :meth:`VmbfsCore.handle`; it returns the reply to send, or raises
:class:`FatalError` when the guest broke the protocol. A fatal error means: no reply, no close,
and no further processing on this channel until it is closed and reopened; the core remembers
it and raises it again for anything fed afterwards.

Rules (rows of the §8.6 table):

======================  ==============================  ============================  ===========
state                   message                         reply                         next
======================  ==============================  ============================  ===========
VERSION_REQUEST         VERSION_REQUEST(WIN10)          VERSION_RESPONSE(SUPPORTED)   READY
VERSION_REQUEST         VERSION_REQUEST(other)          VERSION_RESPONSE(UNSUPPORTED) unchanged
VERSION_REQUEST         GET_FILE_INFO / READ_FILE       fatal UNEXPECTED_MESSAGE
READY                   GET_FILE_INFO(path)             GET_FILE_INFO_RESPONSE        READY
READY                   READ_FILE(count <= 12276)       READ_FILE_RESPONSE            READY
READY                   READ_FILE(count > 12276)        fatal READ_TOO_LARGE
READY                   VERSION_REQUEST                 fatal UNEXPECTED_MESSAGE
any                     type not in {1, 3, 5}           fatal INVALID_MESSAGE_TYPE
any                     short message / fixed part      fatal TOO_SHORT
any                     bad path (§8.5)                 fatal UNALIGNED / NULL_... / INVALID_UTF16
======================  ==============================  ============================  ===========

The message is parsed before the state is looked at, so a malformed request is reported by its
parse error whatever the state. Pipe and ring failures are the I/O loop's (kind PIPE).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Final

from devicehost_vmbfs.backing import Backing, FileError, status_for_error
from devicehost_vmbfs.protocol import (
    MAX_READ_SIZE,
    VERSION_WIN10,
    FileInfoFlags,
    GetFileInfoRequest,
    MessageType,
    PathCache,
    ProtocolError,
    ProtocolErrorKind,
    Status,
    VersionRequest,
    VersionStatus,
    decode_read_file_request_fields_untrusted,
    decode_request_untrusted,
    encode_get_file_info_response,
    encode_read_file_response,
    encode_version_response,
)

__all__ = ["FatalError", "FatalErrorKind", "ProtocolState", "VmbfsCore"]


class ProtocolState(enum.Enum):
    """Where the channel is in the protocol; the only thing vmbfs saves."""

    VERSION_REQUEST = "version_request"
    READY = "ready"


class FatalErrorKind(enum.Enum):
    TOO_SHORT = "TooShort"
    INVALID_MESSAGE_TYPE = "InvalidMessageType"
    UNALIGNED = "Unaligned"
    NULL_TERMINATOR_IN_PATH = "NullTerminatorInPath"
    INVALID_UTF16_PATH = "InvalidUtf16Path"
    UNEXPECTED_MESSAGE = "UnexpectedMessage"
    READ_TOO_LARGE = "ReadTooLarge"
    PIPE = "Pipe"


class FatalError(Exception):
    """Raised when the guest broke the protocol (or its pipe failed); the channel stops here.

    The guest is to blame; the host and other channels are unaffected.
    """

    def __init__(self, kind: FatalErrorKind, message: str) -> None:
        super().__init__(f"{kind.value}: {message}")
        self.kind = kind
        self.detail = message

    @classmethod
    def from_protocol(cls, exc: ProtocolError) -> FatalError:
        """The fatal error of a request that failed to decode: same kind, same detail (the
        kind is said once: ``"TooShort: message of 4 bytes ..."``)."""
        return cls(_FROM_PROTOCOL[exc.kind], exc.detail)


# The decode errors a request can raise, as fatal errors of the same name.
_FROM_PROTOCOL: Final = {
    ProtocolErrorKind.TOO_SHORT: FatalErrorKind.TOO_SHORT,
    ProtocolErrorKind.INVALID_MESSAGE_TYPE: FatalErrorKind.INVALID_MESSAGE_TYPE,
    ProtocolErrorKind.UNALIGNED: FatalErrorKind.UNALIGNED,
    ProtocolErrorKind.NULL_TERMINATOR_IN_PATH: FatalErrorKind.NULL_TERMINATOR_IN_PATH,
    ProtocolErrorKind.INVALID_UTF16_PATH: FatalErrorKind.INVALID_UTF16_PATH,
}

# READ_FILE_RESPONSE: type u32 @0, reserved u32 @4, status u32 @8, data @12.
_READ_REPLY_HEADER: Final = struct.Struct("<III")
_READ_REPLY_PREFIX: Final = _READ_REPLY_HEADER.size
# Plain values for the hot path (an enum member lookup costs more than the compare).
_READ_FILE_RESPONSE_TYPE: Final = int(MessageType.READ_FILE_RESPONSE)
_SUCCESS: Final = int(Status.SUCCESS)
_READY: Final = ProtocolState.READY


class VmbfsCore:
    """One channel's protocol state over a backing."""

    def __init__(
        self, backing: Backing, state: ProtocolState = ProtocolState.VERSION_REQUEST
    ) -> None:
        self.backing = backing
        self.state = state
        #: The fatal error that stopped the channel, or None while it is processing.
        self.fatal: FatalError | None = None
        self.messages = 0
        #: Requests answered ERROR because the backing failed (an OS error: EIO, EACCES, EMFILE
        #: ...), and the last such failure; both shown by ``inspect``.
        self.backing_errors = 0
        self.last_backing_error: str | None = None
        # READ_FILE requests of one file repeat one path: decode each path once per channel.
        self._paths = PathCache()

    def handle(
        self,
        message: bytes | bytearray | memoryview,
        reply_buffer: Callable[[int], bytearray | memoryview] = bytearray,
    ) -> bytes | bytearray | memoryview:
        """Process one received message and return the reply; raise :class:`FatalError`.

        ``reply_buffer(n)`` gives the writable n-byte buffer a READ_FILE reply is built in (the
        file data is read straight into it); a successful READ_FILE returns that very buffer,
        so a caller that hands out a view of its outgoing ring sends the reply without a copy.
        """
        if self.fatal is not None:
            raise self.fatal
        try:
            # The hot path: a READ_FILE_REQUEST, decoded without building a request value
            # (same checks, same order: parse, then state, then size).
            try:
                fields = decode_read_file_request_fields_untrusted(message, self._paths)
            except ProtocolError as exc:
                raise FatalError.from_protocol(exc) from None
            if fields is None:
                return self._handle(message, reply_buffer)
            self.messages += 1
            if self.state is not _READY:
                raise FatalError(
                    FatalErrorKind.UNEXPECTED_MESSAGE, "ReadFileRequest before the version"
                )
            count, offset, path = fields
            return self._read_file(count, offset, path, reply_buffer)
        except FatalError as exc:
            self.fatal = exc
            raise

    def _handle(
        self,
        message: bytes | bytearray | memoryview,
        reply_buffer: Callable[[int], bytearray | memoryview],
    ) -> bytes | bytearray | memoryview:
        try:
            request = decode_request_untrusted(message)
        except ProtocolError as exc:
            raise FatalError.from_protocol(exc) from None
        self.messages += 1
        if isinstance(request, VersionRequest):
            if self.state is not ProtocolState.VERSION_REQUEST:
                raise FatalError(FatalErrorKind.UNEXPECTED_MESSAGE, "VERSION_REQUEST when ready")
            if request.requested_version == VERSION_WIN10:
                self.state = ProtocolState.READY
                return encode_version_response(VersionStatus.SUPPORTED)
            return encode_version_response(VersionStatus.UNSUPPORTED)
        if self.state is not ProtocolState.READY:
            raise FatalError(
                FatalErrorKind.UNEXPECTED_MESSAGE, f"{type(request).__name__} before the version"
            )
        if isinstance(request, GetFileInfoRequest):
            return self._file_info(request)
        return self._read_file(request.byte_count, request.offset, request.path, reply_buffer)

    def _file_info(self, request: GetFileInfoRequest) -> bytes:
        try:
            info = self.backing.file_info(request.path)
        except (FileError, OSError) as exc:
            return encode_get_file_info_response(self._failed(exc))
        flags = FileInfoFlags.DIRECTORY if info.directory else FileInfoFlags(0)
        return encode_get_file_info_response(Status.SUCCESS, flags, info.file_size)

    def _read_file(
        self,
        count: int,
        offset: int,
        path: str,
        reply_buffer: Callable[[int], bytearray | memoryview],
    ) -> bytes | bytearray | memoryview:
        if count > MAX_READ_SIZE:
            raise FatalError(
                FatalErrorKind.READ_TOO_LARGE, f"read of {count} bytes > {MAX_READ_SIZE}"
            )
        # Build the reply in place: header, status 0 (SUCCESS), then the data read into it.
        reply = reply_buffer(_READ_REPLY_PREFIX + count)
        _READ_REPLY_HEADER.pack_into(reply, 0, _READ_FILE_RESPONSE_TYPE, 0, _SUCCESS)
        try:
            self.backing.read_file(path, offset, memoryview(reply)[_READ_REPLY_PREFIX:])
        except (FileError, OSError) as exc:
            # No data at all with a failure status, not even what was read before it failed.
            return encode_read_file_response(self._failed(exc))
        return reply

    def _failed(self, exc: FileError | OSError) -> Status:
        """A request the backing could not serve: its wire status (the channel goes on)."""
        status = status_for_error(exc)
        if status is Status.ERROR:
            self.backing_errors += 1
            self.last_backing_error = str(exc)
        return status
