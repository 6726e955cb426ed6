"""The runner's anyio loop over a real message pipe and ring pair."""

from __future__ import annotations

import errno
import struct
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.vmbus.pipe import MessagePipe
from devicehost_vmbfs.core import FatalError, FatalErrorKind, VmbfsCore
from devicehost_vmbfs.device import VmbfsConfig
from devicehost_vmbfs.protocol import (
    MAX_MESSAGE_SIZE,
    encode_get_file_info_request,
    encode_read_file_request,
    encode_version_request,
)
from devicehost_vmbfs.single_file import SingleFileBacking

from .harness import served

DATA = bytes(range(251)) * 200  # 50200 bytes
SUPPORTED = bytes.fromhex("02000000 00000000 00000000")


@pytest.fixture
def hive(tmp_path: Path) -> VmbfsConfig:
    (tmp_path / "hive").write_bytes(DATA)
    return VmbfsConfig(file=str(tmp_path / "hive"))


async def assert_stopped_without_reply(pipe: MessagePipe, done: anyio.Event) -> None:
    with anyio.fail_after(5):
        await done.wait()
    # The run returned: a later valid request is never answered.
    await pipe.send(encode_version_request())
    with pytest.raises(anyio.WouldBlock):
        pipe.try_recv()


@pytest.mark.anyio
async def test_requests_are_answered_over_the_pipe(hive: VmbfsConfig) -> None:
    async with served(hive) as s:
        with anyio.fail_after(5):
            await s.pipe.send(encode_version_request())
            assert await s.pipe.recv(MAX_MESSAGE_SIZE) == SUPPORTED
            await s.pipe.send(encode_get_file_info_request("/imc.hiv"))
            info = await s.pipe.recv(MAX_MESSAGE_SIZE)
            assert info == struct.pack("<IIIIQ", 4, 0, 0, 0, len(DATA))
            await s.pipe.send(encode_read_file_request(12276, 100, "/imc.hiv"))
            assert await s.pipe.recv(MAX_MESSAGE_SIZE) == (
                struct.pack("<III", 6, 0, 0) + DATA[100 : 100 + 12276]
            )


@pytest.mark.anyio
async def test_client_reads_a_whole_file(hive: VmbfsConfig) -> None:
    async with served(hive) as s:
        with anyio.fail_after(5):
            await s.client.negotiate()
            assert await s.client.read_file("/imc.hiv") == DATA


@pytest.mark.anyio
async def test_fatal_error_stops_processing_and_keeps_the_channel(hive: VmbfsConfig) -> None:
    async with served(hive) as s:
        await s.pipe.send(encode_get_file_info_request("/imc.hiv"))  # before the version
        await assert_stopped_without_reply(s.pipe, s.done)
        assert s.runner.core.fatal is not None
        assert s.runner.core.fatal.kind is FatalErrorKind.UNEXPECTED_MESSAGE
        assert not s.host.closed


@pytest.mark.anyio
async def test_read_too_large_gets_no_response(hive: VmbfsConfig) -> None:
    async with served(hive) as s:
        await s.client.negotiate()
        await s.pipe.send(encode_read_file_request(12277, 0, "/imc.hiv"))
        await assert_stopped_without_reply(s.pipe, s.done)
        assert s.runner.core.fatal is not None
        assert s.runner.core.fatal.kind is FatalErrorKind.READ_TOO_LARGE


@pytest.mark.anyio
async def test_message_above_max_size_is_a_pipe_error(hive: VmbfsConfig) -> None:
    async with served(hive) as s:
        await s.pipe.send(encode_version_request() + bytes(MAX_MESSAGE_SIZE))
        await assert_stopped_without_reply(s.pipe, s.done)
        assert s.runner.core.fatal is not None
        assert s.runner.core.fatal.kind is FatalErrorKind.PIPE
        # Each kind is named once ("Pipe: PacketTooLarge: ...", not "PacketTooLarge" twice).
        assert str(s.runner.core.fatal) == (
            f"Pipe: PacketTooLarge: {MAX_MESSAGE_SIZE + 12} bytes exceed the limit"
            f" {MAX_MESSAGE_SIZE}"
        )


@pytest.mark.anyio
async def test_wrong_pipe_packet_type_is_a_pipe_error(hive: VmbfsConfig) -> None:
    async with served(hive) as s:
        s.guest.outgoing.write_inband(struct.pack("<II", 2, 12) + encode_version_request())
        s.guest.signal_remote()
        await assert_stopped_without_reply(s.pipe, s.done)
        assert s.runner.core.fatal is not None
        assert s.runner.core.fatal.kind is FatalErrorKind.PIPE


@pytest.mark.anyio
async def test_host_to_guest_ring_below_four_pages_fails_before_reading(
    hive: VmbfsConfig,
) -> None:
    async with served(hive, ring_size=3 * 4096) as s:
        with anyio.fail_after(5):
            await s.done.wait()
        assert s.runner.core.fatal is not None
        assert s.runner.core.fatal.kind is FatalErrorKind.PIPE
        await s.pipe.send(encode_version_request())
        # Nothing was read: the request is still in the guest-to-host ring.
        assert not s.host.incoming.is_empty()


@pytest.mark.anyio
async def test_channel_closed_is_a_pipe_error(hive: VmbfsConfig) -> None:
    async with served(hive) as s:
        await s.client.negotiate()
        s.guest.close()
        with anyio.fail_after(5):
            await s.done.wait()
        assert s.runner.core.fatal is not None
        assert s.runner.core.fatal.kind is FatalErrorKind.PIPE


@pytest.mark.anyio
async def test_reply_waits_for_guest_to_make_room(hive: VmbfsConfig) -> None:
    async with served(hive) as s:
        with anyio.fail_after(5):
            await s.client.negotiate()
            # Two full-size reads do not fit in a 4-page ring at once: the second request is read
            # only after the guest drained the first reply.
            await s.pipe.send(encode_read_file_request(12276, 0, "/imc.hiv"))
            await s.pipe.send(encode_read_file_request(12276, 12276, "/imc.hiv"))
            first = await s.pipe.recv(MAX_MESSAGE_SIZE)
            second = await s.pipe.recv(MAX_MESSAGE_SIZE)
            assert first[12:] == DATA[:12276]
            assert second[12:] == DATA[12276:24552]


@pytest.mark.anyio
async def test_stop_and_restart_loses_no_request(hive: VmbfsConfig) -> None:
    async with served(hive) as s:
        with anyio.fail_after(5):
            await s.client.negotiate()
            for i in range(20):
                # Stop while the request may be in flight; start again; the answer still comes.
                await s.pipe.send(encode_get_file_info_request("/imc.hiv"))
                for _ in range(i % 4):
                    await anyio.sleep(0)
                await s.stop()
                s.start()
                assert await s.pipe.recv(MAX_MESSAGE_SIZE) == (
                    struct.pack("<IIIIQ", 4, 0, 0, 0, len(DATA))
                )
            assert not s.done.is_set()


# -- the device over a pipe behaves exactly as the pure core --------------------------------------

_MESSAGES = st.one_of(
    st.binary(max_size=60),
    st.builds(
        lambda t, body: struct.pack("<II", t, 0) + body,
        st.sampled_from([1, 3, 5]),
        st.binary(max_size=60),
    ),
)


async def _scenario(config: VmbfsConfig, messages: list[bytes]) -> None:
    backing = SingleFileBacking.open(config.name, config.file)
    model = VmbfsCore(backing)
    async with served(config) as s:
        with anyio.fail_after(5):
            for message in [encode_version_request(), *messages, encode_version_request()]:
                await s.pipe.send(message)
                try:
                    expected = model.handle(message)
                except FatalError as exc:
                    await s.done.wait()
                    assert s.runner.core.fatal is not None
                    assert s.runner.core.fatal.kind is exc.kind
                    break
                assert await s.pipe.recv(MAX_MESSAGE_SIZE) == expected
    backing.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(_MESSAGES, max_size=3))
def test_any_bytes_as_messages_never_crash_the_device(
    tmp_path_factory: pytest.TempPathFactory, messages: list[bytes]
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-hive"
    if not path.exists():
        path.write_bytes(DATA)
    anyio.run(_scenario, VmbfsConfig(file=str(path)), messages)


@pytest.mark.anyio
async def test_file_data_is_read_straight_into_the_outgoing_ring(
    hive: VmbfsConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with served(hive) as s:
        backing = s.device.backing
        ring_memory = s.host.outgoing.mem.data
        assert ring_memory is not None
        targets: list[object] = []
        read_file = backing.read_file

        def spy(path: str, offset: int, buf: bytearray | memoryview) -> None:
            targets.append(memoryview(buf).obj)
            read_file(path, offset, buf)

        monkeypatch.setattr(backing, "read_file", spy)
        with anyio.fail_after(5):
            await s.client.negotiate()
            assert await s.client.read("/imc.hiv", 7, 1000) == DATA[7:1007]
        assert targets == [ring_memory.obj]


class EioBacking:
    """A backing on a failing disk: every read fails with EIO; descriptions still work."""

    def __init__(self, inner: SingleFileBacking) -> None:
        self.inner = inner

    def file_info(self, path: str) -> Any:
        return self.inner.file_info(path)

    def read_file(self, path: str, offset: int, buf: bytearray | memoryview) -> None:
        raise OSError(errno.EIO, "Input/output error")

    def describe(self) -> dict[str, object]:
        return {"kind": "eio"}


@pytest.mark.anyio
async def test_a_failing_backing_gets_error_replies_and_the_device_goes_on(
    hive: VmbfsConfig,
) -> None:
    async with served(hive) as s:
        inner = s.runner.core.backing
        assert isinstance(inner, SingleFileBacking)
        s.runner.core.backing = EioBacking(inner)
        with anyio.fail_after(5):
            await s.client.negotiate()
            for _ in range(3):
                await s.pipe.send(encode_read_file_request(100, 0, "/imc.hiv"))
                assert await s.pipe.recv(MAX_MESSAGE_SIZE) == struct.pack("<III", 6, 0, 3)
            assert (await s.client.file_info("/imc.hiv")).file_size == len(DATA)
        assert not s.done.is_set() and s.runner.core.fatal is None
        assert s.runner.inspect()["backing_errors"] == 3
        assert s.runner.inspect()["last_backing_error"] == "[Errno 5] Input/output error"


@pytest.mark.anyio
async def test_the_fatal_error_log_line_names_its_kind_once(
    hive: VmbfsConfig, caplog: pytest.LogCaptureFixture
) -> None:
    async with served(hive) as s:
        await s.pipe.send(b"\x01\x00\x00\x00")
        with anyio.fail_after(5):
            await s.done.wait()
    assert [r.getMessage() for r in caplog.records if r.name == "test.vmbfs"] == [
        "vmbfs: the guest broke the protocol, channel stopped:"
        " TooShort: message of 4 bytes has no 8-byte header"
    ]
