"""The vmbfs client: reply checks (pure) and whole-file reads over a real pipe."""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.vmbus.channel import connected_channel_pair
from devicehost.vmbus.pipe import MessagePipe
from devicehost_vmbfs.backing import FileInfo
from devicehost_vmbfs.client import (
    VmbfsClient,
    VmbfsClientError,
    check_version_reply,
    data_from_reply,
    file_info_from_reply,
)
from devicehost_vmbfs.device import VmbfsConfig
from devicehost_vmbfs.protocol import (
    MAX_MESSAGE_SIZE,
    MAX_READ_SIZE,
    ReadFileRequest,
    decode_request_untrusted,
    encode_get_file_info_response,
    encode_read_file_request,
    encode_read_file_response,
    encode_version_response,
)

from .harness import served


def test_check_version_reply() -> None:
    check_version_reply(encode_version_response(0))
    with pytest.raises(VmbfsClientError) as info:
        check_version_reply(encode_version_response(1))
    assert info.value.status == 1


def test_file_info_from_reply() -> None:
    assert file_info_from_reply(encode_get_file_info_response(0, 0, 7), "/f") == FileInfo(False, 7)
    assert file_info_from_reply(encode_get_file_info_response(0, 3, 0), "/d") == FileInfo(True, 0)
    with pytest.raises(VmbfsClientError, match="NOT_FOUND") as info:
        file_info_from_reply(encode_get_file_info_response(1), "/x")
    assert info.value.status == 1


def test_data_from_reply() -> None:
    assert data_from_reply(encode_read_file_response(0, b"abc"), "/f", 3) == b"abc"
    with pytest.raises(VmbfsClientError, match="2 bytes for a read of 3"):
        data_from_reply(encode_read_file_response(0, b"ab"), "/f", 3)
    with pytest.raises(VmbfsClientError, match="END_OF_FILE") as info:
        data_from_reply(encode_read_file_response(2), "/f", 3)
    assert info.value.status == 2


@pytest.mark.parametrize(
    "reply",
    [b"", b"\x02\x00\x00\x00", encode_version_response(0), struct.pack("<II", 9, 0)],
)
def test_wrong_or_malformed_replies_are_client_errors(reply: bytes) -> None:
    with pytest.raises(VmbfsClientError):
        data_from_reply(reply, "/f", 0)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_any_reply_is_accepted_or_a_client_error(reply: bytes) -> None:
    for check in (
        lambda: check_version_reply(reply),
        lambda: file_info_from_reply(reply, "/f"),
        lambda: data_from_reply(reply, "/f", 4),
    ):
        with contextlib.suppress(VmbfsClientError):
            check()


@pytest.mark.anyio
async def test_read_rejects_counts_above_max_read_size() -> None:
    _host, guest = connected_channel_pair(16384)
    with pytest.raises(ValueError):
        await VmbfsClient(MessagePipe(guest)).read("/f", 0, MAX_READ_SIZE + 1)


@pytest.mark.anyio
async def test_read_file_uses_max_read_size_chunks() -> None:
    """Play the device by hand: the requests the client sends are exact."""
    data = os.urandom(2 * MAX_READ_SIZE + 5)
    host, guest = connected_channel_pair(16384)
    device_pipe = MessagePipe(host)
    client = VmbfsClient(MessagePipe(guest))
    seen: list[object] = []

    async def device() -> None:
        await device_pipe.recv(MAX_MESSAGE_SIZE)
        await device_pipe.send(encode_get_file_info_response(0, 0, len(data)))
        for _ in range(3):
            request = decode_request_untrusted(await device_pipe.recv(MAX_MESSAGE_SIZE))
            seen.append(request)
            assert isinstance(request, ReadFileRequest)
            offset, count = request.offset, request.byte_count
            await device_pipe.send(encode_read_file_response(0, data[offset : offset + count]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(device)
        with anyio.fail_after(5):
            assert await client.read_file("/f") == data
    assert [decode_request_untrusted(encode_read_file_request(c, o, "/f")) for o, c in [
        (0, MAX_READ_SIZE), (MAX_READ_SIZE, MAX_READ_SIZE), (2 * MAX_READ_SIZE, 5)
    ]] == seen


@pytest.mark.anyio
async def test_against_the_device(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "d").mkdir()
    async with served(VmbfsConfig(root=str(tmp_path))) as s:
        with anyio.fail_after(5):
            await s.client.negotiate()
            assert await s.client.read_file("/empty") == b""
            assert await s.client.file_info("/d") == FileInfo(True, 0)
            with pytest.raises(VmbfsClientError, match="is a directory"):
                await s.client.read_file("/d")
            with pytest.raises(VmbfsClientError) as info:
                await s.client.read_file("/missing")
            assert info.value.status == 1


@pytest.mark.anyio
async def test_unsupported_version(tmp_path: Path) -> None:
    async with served(VmbfsConfig(root=str(tmp_path))) as s:
        with anyio.fail_after(5):
            with pytest.raises(VmbfsClientError) as info:
                await s.client.negotiate(0x00020000)
            assert info.value.status == 1
            await s.client.negotiate()


@pytest.mark.anyio
@pytest.mark.parametrize(("ring_pages", "window"), [(4, 2), (8, 3), (32, 8)])
async def test_pipelined_reads_return_the_same_bytes(
    tmp_path: Path, ring_pages: int, window: int
) -> None:
    data = os.urandom(10 * MAX_READ_SIZE + 123)
    (tmp_path / "hive").write_bytes(data)
    async with served(VmbfsConfig(file=str(tmp_path / "hive")), ring_size=ring_pages * 4096) as s:
        with anyio.fail_after(10):
            await s.client.negotiate()
            assert await s.client.read_file("/imc.hiv", window=window) == data
            assert await s.client.file_info("/imc.hiv") == FileInfo(False, len(data))


@pytest.mark.anyio
async def test_a_failed_read_leaves_the_client_refusing_further_requests(tmp_path: Path) -> None:
    data = os.urandom(3 * MAX_READ_SIZE)
    (tmp_path / "hive").write_bytes(data)
    async with served(VmbfsConfig(file=str(tmp_path / "hive"))) as s:
        with anyio.fail_after(10):
            await s.client.negotiate()
            with anyio.CancelScope() as scope:
                scope.cancel()
                await s.client.read_file("/imc.hiv", window=3)
            with pytest.raises(VmbfsClientError, match="out of step"):
                await s.client.file_info("/imc.hiv")


def test_window_must_be_positive() -> None:
    _host, guest = connected_channel_pair(16384)
    client = VmbfsClient(MessagePipe(guest))
    with pytest.raises(ValueError):
        anyio.run(lambda: client.read_file("/f", window=0))


@pytest.mark.anyio
@pytest.mark.parametrize(("ring_pages", "window"), [(4, 1), (8, 3), (32, 8)])
async def test_read_file_bytearray_returns_the_file_in_a_bytearray(
    tmp_path: Path, ring_pages: int, window: int
) -> None:
    data = os.urandom(7 * MAX_READ_SIZE + 11)
    (tmp_path / "hive").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    async with served(VmbfsConfig(root=str(tmp_path)), ring_size=ring_pages * 4096) as s:
        with anyio.fail_after(10):
            await s.client.negotiate()
            got = await s.client.read_file_bytearray("/hive", window=window)
            assert type(got) is bytearray and got == data
            assert await s.client.read_file_bytearray("\\empty") == bytearray()
            with pytest.raises(VmbfsClientError, match="is a directory"):
                await s.client.read_file_bytearray("/")
            with pytest.raises(VmbfsClientError) as info:
                await s.client.read_file_bytearray("/missing")
            assert info.value.status == 1


@pytest.mark.anyio
async def test_a_short_read_reply_fails_the_whole_file_read() -> None:
    """Play a device that answers a read with fewer bytes than asked: a client error."""
    host, guest = connected_channel_pair(16384)
    device_pipe = MessagePipe(host)
    client = VmbfsClient(MessagePipe(guest))

    async def device() -> None:
        await device_pipe.recv(MAX_MESSAGE_SIZE)
        await device_pipe.send(encode_get_file_info_response(0, 0, 10))
        await device_pipe.recv(MAX_MESSAGE_SIZE)
        await device_pipe.send(encode_read_file_response(0, b"123456789"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(device)
        with anyio.fail_after(5), pytest.raises(VmbfsClientError, match="9 bytes for a read of 10"):
            await client.read_file_bytearray("/f")
