"""A vmbfs client: what a guest (or the intercept plugin's client device) runs against the device.

Pure parts (:func:`check_version_reply`, :func:`file_info_from_reply`, :func:`data_from_reply`)
check a reply's bytes; :class:`VmbfsClient` is the small async shell that sends requests and
waits for their replies over a message pipe (one at a time, or a window of reads in flight).
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import anyio

from devicehost_vmbfs.backing import FileInfo
from devicehost_vmbfs.protocol import (
    MAX_MESSAGE_SIZE,
    MAX_READ_SIZE,
    VERSION_WIN10,
    FileInfoFlags,
    GetFileInfoResponse,
    ProtocolError,
    ReadFileResponse,
    Response,
    Status,
    VersionResponse,
    VersionStatus,
    decode_read_file_success_untrusted,
    decode_response_untrusted,
    encode_get_file_info_request,
    encode_path,
    encode_read_file_request_wire,
    encode_version_request,
)

_T = TypeVar("_T")

__all__ = [
    "MessagePipeLike",
    "VmbfsClient",
    "VmbfsClientError",
    "check_version_reply",
    "data_from_reply",
    "file_info_from_reply",
]


class VmbfsClientError(Exception):
    """Raised when the device refused a request (``status`` is its wire status) or sent a reply
    that is not one (``status`` is None): the device, or the path asked for, is to blame."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class MessagePipeLike(Protocol):
    """The part of :class:`devicehost.vmbus.MessagePipe` the client uses (``send`` and ``recv``
    must be cancel-safe: a cancelled call sent or took nothing)."""

    channel: Any

    def try_send(self, data: bytes) -> None: ...

    def try_recv(self, max_len: int | None = None) -> bytes: ...

    async def wait_write_ready(self, n: int) -> None: ...

    async def send(self, data: bytes) -> None: ...

    async def recv(self, max_len: int | None = None) -> bytes: ...

    async def recv_parsed(
        self, parse: Callable[[memoryview | bytes], _T], max_len: int | None = None
    ) -> _T: ...


def _decode(reply: bytes | bytearray | memoryview, expected: type[Response]) -> Response:
    try:
        response = decode_response_untrusted(reply)
    except ProtocolError as exc:
        raise VmbfsClientError(f"device sent a malformed reply: {exc}") from None
    if not isinstance(response, expected):
        raise VmbfsClientError(
            f"device answered {type(response).__name__}, expected {expected.__name__}"
        )
    return response


def _status_name(status: int) -> str:
    try:
        return Status(status).name
    except ValueError:
        return f"status {status}"


def check_version_reply(reply: bytes | bytearray | memoryview) -> None:
    """Accept a VERSION_RESPONSE(SUPPORTED); raise :class:`VmbfsClientError` otherwise."""
    response = _decode(reply, VersionResponse)
    assert isinstance(response, VersionResponse)
    if response.status != VersionStatus.SUPPORTED:
        raise VmbfsClientError("device does not support the requested version", response.status)


def file_info_from_reply(reply: bytes | bytearray | memoryview, path: str) -> FileInfo:
    """The FileInfo of a successful GET_FILE_INFO_RESPONSE; raise :class:`VmbfsClientError`."""
    response = _decode(reply, GetFileInfoResponse)
    assert isinstance(response, GetFileInfoResponse)
    if response.status != Status.SUCCESS:
        raise VmbfsClientError(f"{path!r}: {_status_name(response.status)}", response.status)
    return FileInfo(
        directory=bool(response.flags & FileInfoFlags.DIRECTORY), file_size=response.file_size
    )


def data_from_reply(reply: bytes | bytearray | memoryview, path: str, count: int) -> bytes:
    """The data of a successful READ_FILE_RESPONSE, which must be exactly ``count`` bytes."""
    response = _decode(reply, ReadFileResponse)
    assert isinstance(response, ReadFileResponse)
    if response.status != Status.SUCCESS:
        raise VmbfsClientError(f"{path!r}: {_status_name(response.status)}", response.status)
    if len(response.data) != count:
        raise VmbfsClientError(
            f"{path!r}: device returned {len(response.data)} bytes for a read of {count}"
        )
    return response.data


def _data_view(reply: bytes | bytearray | memoryview, path: str, count: int) -> memoryview:
    """:func:`data_from_reply` as a view of ``reply`` (the hot path: the one successful shape is
    checked with a single unpack; anything else goes through the full check, which raises)."""
    data = decode_read_file_success_untrusted(reply)
    if data is None or len(data) != count:
        return memoryview(data_from_reply(reply, path, count))
    return data


class VmbfsClient:
    """Talks vmbfs over ``pipe``, one request at a time (or ``window`` reads in flight).

    The protocol has no request ids: replies come in request order. A request interrupted by a
    cancellation or an error leaves replies unaccounted for, so the client then refuses further
    requests (:class:`VmbfsClientError`); open a new channel to go on.
    """

    def __init__(self, pipe: MessagePipeLike) -> None:
        self.pipe = pipe
        self._broken: str | None = None
        # The last path read and its wire form: a file is read with one path many times.
        self._wire_path: tuple[str, bytes] = ("", b"")

    def _wire_path_of(self, path: str) -> bytes:
        if self._wire_path[0] != path:
            self._wire_path = (path, encode_path(path))
        return self._wire_path[1]

    @asynccontextmanager
    async def _exchange(self) -> AsyncIterator[None]:
        if self._broken is not None:
            raise VmbfsClientError(f"client out of step with the device: {self._broken}")
        try:
            yield
        except BaseException as exc:
            self._broken = f"a request failed or was cancelled ({type(exc).__name__})"
            raise

    async def _request(self, message: bytes) -> bytes:
        async with self._exchange():
            await self.pipe.send(message)
            return await self.pipe.recv(MAX_MESSAGE_SIZE)

    async def negotiate(self, version: int = VERSION_WIN10) -> None:
        """Ask for ``version``; raise :class:`VmbfsClientError` if the device refuses it."""
        check_version_reply(await self._request(encode_version_request(version)))

    async def file_info(self, path: str) -> FileInfo:
        return file_info_from_reply(await self._request(encode_get_file_info_request(path)), path)

    async def read(self, path: str, offset: int, count: int) -> bytes:
        """Read exactly ``count`` (at most MAX_READ_SIZE) bytes of ``path`` at ``offset``."""
        if not 0 <= count <= MAX_READ_SIZE:
            raise ValueError(f"a vmbfs read is 0..{MAX_READ_SIZE} bytes, not {count}")
        async with self._exchange():
            request = encode_read_file_request_wire(count, offset, self._wire_path_of(path))
            await self.pipe.send(request)
            # The reply is checked in the ring and only its data copied out.
            return await self.pipe.recv_parsed(
                lambda reply: bytes(_data_view(reply, path, count)), MAX_MESSAGE_SIZE
            )

    async def read_file(self, path: str, *, window: int = 1) -> bytes:
        """Read all of ``path`` (the size GET_FILE_INFO reports) in MAX_READ_SIZE chunks.

        ``window`` is how many READ_FILE requests may be in flight at once; 1 is strict
        request/reply. More saves round trips, and the device serves queued requests as fast as
        its host-to-guest ring has room for their replies. :meth:`read_file_bytearray` saves
        the final copy into bytes.
        """
        return bytes(await self.read_file_bytearray(path, window=window))

    async def read_file_bytearray(self, path: str, *, window: int = 1) -> bytearray:
        """:meth:`read_file`, returning the file in a new bytearray: each reply's data is
        copied from the ring straight onto its end, and that is the only copy (for a large
        file, fresh memory is written once, not twice)."""
        buffer = bytearray()
        # Appending (rather than allocating the file's size up front) writes each fresh page
        # once: bytearray(size) would zero every page first; growing a large buffer remaps its
        # pages rather than copying them.
        await self._read_whole(path, window, buffer.extend)
        return buffer

    async def _read_whole(
        self, path: str, window: int, store: Callable[[memoryview], object]
    ) -> None:
        """GET_FILE_INFO, then READ_FILE requests (``window`` in flight) over the size it
        reports, calling ``store(data)`` for each reply in file order, ``data`` a view of the
        checked reply in the ring (valid during the call only)."""
        if window < 1:
            raise ValueError("window must be at least 1")
        info = await self.file_info(path)
        if info.directory:
            raise VmbfsClientError(f"{path!r} is a directory")
        size = info.file_size
        in_flight: collections.deque[int] = collections.deque()  # byte counts, in file order
        offset = 0
        pipe = self.pipe
        wire_path = self._wire_path_of(path)

        def take(reply: bytes | memoryview) -> None:
            count = in_flight[0]
            data = decode_read_file_success_untrusted(reply)
            if data is None or len(data) != count:
                data = memoryview(data_from_reply(reply, path, count))  # raises
            store(data)

        async with self._exchange():
            while offset < size or in_flight:
                while offset < size and len(in_flight) < window:
                    count = min(MAX_READ_SIZE, size - offset)
                    request = encode_read_file_request_wire(count, offset, wire_path)
                    try:
                        pipe.try_send(request)  # no await while the ring has room
                    except anyio.WouldBlock:
                        await pipe.send(request)
                    in_flight.append(count)
                    offset += count
                await pipe.recv_parsed(take, MAX_MESSAGE_SIZE)
                in_flight.popleft()
