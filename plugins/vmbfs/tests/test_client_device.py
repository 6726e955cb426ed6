"""The vmbfs client device: its reader core, reading through the intercept wrapper, resuming a
read across a stop taken while a request was in flight, conformance, discovery, config."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost import ConfigError, DeviceContext
from devicehost.host import Host
from devicehost.lifecycle import Device, DeviceState
from devicehost.plugins import list_plugins, load_plugins
from devicehost.testing import DeviceConformance
from devicehost.testing.registry import DeviceSpec, host_with
from devicehost.vmbus import VmbusTransport
from devicehost_vmbfs import VmbfsConfig, VmbfsDevice, client_device
from devicehost_vmbfs.client import VmbfsClientError
from devicehost_vmbfs.client_device import (
    ReadFile,
    ReadPhase,
    VmbfsClientConfig,
    VmbfsClientDevice,
    VmbfsClientSavedState,
    VmbfsReader,
    VmbfsReadRunner,
)
from devicehost_vmbfs.protocol import (
    IMC_INSTANCE_ID,
    MAX_READ_SIZE,
    Status,
    VersionStatus,
    encode_get_file_info_request,
    encode_get_file_info_response,
    encode_read_file_request,
    encode_read_file_response,
    encode_version_request,
    encode_version_response,
)

if TYPE_CHECKING:
    from devicehost_intercept import InterceptWrapper

STEP = 10.0

# -- the reader core (pure) ------------------------------------------------------------------------


def _exchange(reader: VmbfsReader, reply: bytes) -> bytes | None:
    request = reader.next_request()
    reader.sent()
    reader.handle_reply(reply)
    return request


def test_reader_negotiates_asks_size_and_reads_in_chunks() -> None:
    data = os.urandom(25)
    reader = VmbfsReader(VmbfsClientConfig(paths=("/a", "/b"), chunk=10))
    assert _exchange(reader, encode_version_response(VersionStatus.SUPPORTED)) == (
        encode_version_request())
    assert _exchange(reader, encode_get_file_info_response(Status.SUCCESS, 0, 25)) == (
        encode_get_file_info_request("/a"))
    for offset, count in ((0, 10), (10, 10), (20, 5)):
        request = _exchange(reader, encode_read_file_response(
            Status.SUCCESS, data[offset:offset + count]))
        assert request == encode_read_file_request(count, offset, "/a")
    # An empty file needs no read.
    assert _exchange(reader, encode_get_file_info_response(Status.SUCCESS, 0, 0)) == (
        encode_get_file_info_request("/b"))
    assert reader.phase is ReadPhase.DONE and reader.next_request() is None
    assert reader.done == [ReadFile("/a", data), ReadFile("/b", b"")]


def test_reader_resumes_from_saved_progress_after_renegotiating() -> None:
    data = os.urandom(30)
    reader = VmbfsReader(VmbfsClientConfig(paths=("/a",), chunk=12))
    _exchange(reader, encode_version_response(VersionStatus.SUPPORTED))
    _exchange(reader, encode_get_file_info_response(Status.SUCCESS, 0, 30))
    _exchange(reader, encode_read_file_response(Status.SUCCESS, data[:12]))
    state = reader.save()
    assert state == VmbfsClientSavedState((), 0, data[:12])

    again = VmbfsReader(reader.config, state)
    assert _exchange(again, encode_version_response(VersionStatus.SUPPORTED)) == (
        encode_version_request())
    assert _exchange(again, encode_get_file_info_response(Status.SUCCESS, 0, 30)) == (
        encode_get_file_info_request("/a"))
    assert _exchange(again, encode_read_file_response(Status.SUCCESS, data[12:24])) == (
        encode_read_file_request(12, 12, "/a"))
    _exchange(again, encode_read_file_response(Status.SUCCESS, data[24:]))
    assert again.done == [ReadFile("/a", data)]


def test_reader_refusals_are_client_errors() -> None:
    reader = VmbfsReader(VmbfsClientConfig(paths=("/big",), max_bytes=100))
    with pytest.raises(VmbfsClientError, match="does not support"):
        _exchange(reader, encode_version_response(VersionStatus.UNSUPPORTED))
    reader = VmbfsReader(VmbfsClientConfig(paths=("/big",), max_bytes=100))
    _exchange(reader, encode_version_response(VersionStatus.SUPPORTED))
    with pytest.raises(VmbfsClientError, match="more than the 100 left"):
        _exchange(reader, encode_get_file_info_response(Status.SUCCESS, 0, 101))
    reader = VmbfsReader(VmbfsClientConfig(paths=("/dir",)))
    _exchange(reader, encode_version_response(VersionStatus.SUPPORTED))
    with pytest.raises(VmbfsClientError, match="is a directory"):
        _exchange(reader, encode_get_file_info_response(Status.SUCCESS, 1, 0))
    with pytest.raises(VmbfsClientError, match="does not fit"):
        VmbfsReader(VmbfsClientConfig(paths=("/a",)), VmbfsClientSavedState((), 2, b""))
    with pytest.raises(VmbfsClientError, match="reply to no request"):
        VmbfsReader(VmbfsClientConfig()).handle_reply(b"")


@settings(max_examples=250, deadline=None)
@given(st.integers(min_value=0, max_value=2), st.binary(max_size=64))
def test_any_reply_is_handled_or_a_client_error(steps: int, reply: bytes) -> None:
    reader = VmbfsReader(VmbfsClientConfig(paths=("/a",), chunk=8))
    good = [encode_version_response(VersionStatus.SUPPORTED),
            encode_get_file_info_response(Status.SUCCESS, 0, 20)]
    for answer in good[:steps]:
        _exchange(reader, answer)
    reader.next_request()
    reader.sent()
    try:
        reader.handle_reply(reply)
    except VmbfsClientError:
        return
    assert not reader.awaiting


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="chunk"):
        VmbfsClientConfig(chunk=MAX_READ_SIZE + 1)
    with pytest.raises(ConfigError, match="names no file"):
        VmbfsClientConfig(paths=())
    with pytest.raises(ConfigError, match="max_bytes"):
        VmbfsClientConfig(max_bytes=-1)
    assert VmbfsClientConfig().paths == ("/imc.hiv",)


# -- through the host and the intercept wrapper --------------------------------------------------


def test_the_host_discovers_the_client_device() -> None:
    (info,) = [i for i in list_plugins(environ={}) if i.name == "vmbfs-client"]
    assert info.distribution == "devicehost-vmbfs" and info.status == "available"
    registry = load_plugins(["vmbfs-client"],
                            environ={"DEVICEHOST_LOAD_PLUGINS": "vmbfs-client"})
    assert registry.device_classes["vmbfs-client"] is VmbfsClientDevice


@pytest.mark.anyio
async def test_a_client_device_without_the_intercept_plugin_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "devicehost_intercept.transport", None)
    spec = DeviceSpec("reader", "vmbfs-client", VmbfsClientConfig())
    async with host_with({"vmbfs-client": VmbfsClientDevice}, [spec]) as host:
        assert "install 'devicehost-intercept'" in host.failures["reader"]
        assert host.devices["reader"].state is DeviceState.FAILED


@asynccontextmanager
async def _served(hive: Path, client: VmbfsClientConfig) -> AsyncIterator[Host]:
    specs = [DeviceSpec("imc", "vmbfs", VmbfsConfig(file=str(hive))),
             DeviceSpec("reader", "vmbfs-client", client)]
    classes = {"vmbfs": VmbfsDevice, "vmbfs-client": VmbfsClientDevice}
    async with host_with(classes, specs, guest_memory_size=4 << 20) as host:
        assert not host.failures, host.failures
        yield host


async def _until(predicate: Callable[[], object]) -> None:
    with anyio.fail_after(STEP):
        while not predicate():
            await anyio.sleep(0.002)


def _wrapper(host: Host) -> InterceptWrapper:
    from devicehost_intercept import InterceptTransport

    transport = host.transport_of("reader")
    assert isinstance(transport, InterceptTransport)
    return transport.wrapper_of(host.devices["reader"])


def _reader_runner(device: Device) -> VmbfsReadRunner | None:
    """The runner of a vmbfs-client device (None while it is not open)."""
    runner = device.runner
    assert runner is None or isinstance(runner, VmbfsReadRunner)
    return runner


@pytest.mark.anyio
async def test_reads_the_imc_file_through_an_intercepted_channel(tmp_path: Path) -> None:
    content = os.urandom(100_000)
    (tmp_path / "hive").write_bytes(content)
    async with _served(tmp_path / "hive", VmbfsClientConfig()) as host:
        wrapper = _wrapper(host)
        assert wrapper.instance_id == IMC_INSTANCE_ID
        await _until(lambda: host.devices["reader"].runner is not None
                     and host.devices["reader"].runner.finished.is_set())
        (read,) = host.devices["reader"].runner.files
        assert read.data == content
        # 10 pages: 4 data pages per ring, so the vmbfs server's largest reply fits.
        channel = wrapper.channel
        assert channel is not None
        assert len(channel.block.pfns) == 10 and channel.ring_offset == 5
        assert channel.gpadl_id == channel.block.pfns[1]
        assert host.devices["reader"].state is DeviceState.RUNNING  # idles, channel open


@pytest.mark.anyio
async def test_stop_with_a_read_in_flight_then_start_resumes_via_restore_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = os.urandom(150_000)
    (tmp_path / "hive").write_bytes(content)
    chunk = 4096
    # The client's 8th receive is the reply to its 6th READ_FILE (after the version and the
    # file-info replies and five reads): park it there, once, so that the stop comes with a
    # read in flight whatever the scheduling (the request is in the ring, its reply unread).
    parked = anyio.Event()
    receives = 0
    from devicehost_vmbfs.receive import receive_message as real_receive

    async def receive_parking_once(pipe: Any, limit: int) -> bytes:
        nonlocal receives
        receives += 1
        if receives == 8:
            parked.set()
            await anyio.sleep_forever()  # cancelled by the stop, as a real wait would be
        return await real_receive(pipe, limit)

    monkeypatch.setattr(client_device, "receive_message", receive_parking_once)
    async with _served(tmp_path / "hive", VmbfsClientConfig(chunk=chunk)) as host:
        reader, server = host.devices["reader"], host.devices["imc"]
        wrapper = _wrapper(host)
        with anyio.fail_after(STEP):
            await parked.wait()
        first = reader.runner
        assert first is not None and first.reader.awaiting
        in_flight_at = len(first.reader.received)
        assert in_flight_at == 5 * chunk
        with anyio.fail_after(STEP):
            await wrapper.stop()
        assert wrapper.channel is None and _reader_runner(reader) is None
        assert wrapper.stash == VmbfsClientSavedState((), 0, content[:in_flight_at])
        assert server.state is DeviceState.CLOSED  # the server's side was closed too

        with anyio.fail_after(STEP):
            await wrapper.start()
        resumed = _reader_runner(reader)
        assert resumed is not None and resumed is not first
        with anyio.fail_after(STEP):
            await resumed.finished.wait()
        (read,) = resumed.files
        assert read.data == content
        # The fresh server saw: VERSION_REQUEST, GET_FILE_INFO, then only the missing reads.
        remaining = -(-(len(content) - in_flight_at) // chunk)
        assert server.runner.core.messages == 2 + remaining


# -- the conformance suite -------------------------------------------------------------------------

_HIVE_DIR = tempfile.TemporaryDirectory(prefix="devicehost-vmbfs-client-")
atexit.register(_HIVE_DIR.cleanup)
_HIVE = Path(_HIVE_DIR.name) / "imc.hiv"
_HIVE.write_bytes(os.urandom(40_000))


class TestVmbfsClientConformance(DeviceConformance):
    device_class = VmbfsClientDevice
    plugin_name = "vmbfs-client"
    config = VmbfsClientConfig(chunk=1024)
    peers = {"vmbfs": (VmbfsDevice, VmbfsConfig(file=str(_HIVE)))}


def test_the_transport_is_the_intercept_one() -> None:
    from devicehost_intercept import InterceptTransport

    vmbus_transport: type[object] = VmbusTransport
    assert vmbus_transport is not InterceptTransport
    config = VmbfsClientConfig()
    ctx = DeviceContext("reader", "vmbfs-client", config, logging.getLogger("test.vmbfs-client"))
    claim = VmbfsClientDevice().offer(ctx, None)
    from devicehost.transport import transport_class_for

    assert transport_class_for(claim) is InterceptTransport
