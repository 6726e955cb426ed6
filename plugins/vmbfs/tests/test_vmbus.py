"""End to end through the host's in-process VMBus server and client: GPADL rings in guest memory,
the VMBus transport driving the device's lifecycle, and the vmbfs client as the guest."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.lifecycle import DeviceState
from devicehost.testing import DeviceConformance
from devicehost.testing.vmbus import vmbus_guest
from devicehost_vmbfs.client import VmbfsClient, VmbfsClientError
from devicehost_vmbfs.core import ProtocolState
from devicehost_vmbfs.device import VmbfsConfig, VmbfsDevice, VmbfsSavedState
from devicehost_vmbfs.protocol import (
    MAX_MESSAGE_SIZE,
    encode_get_file_info_request,
    encode_version_request,
)


class TestVmbfsConformance(DeviceConformance):
    device_class = VmbfsDevice


@pytest.mark.anyio
async def test_file_and_directory_through_the_vmbus(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    (tmp_path / "hive").write_bytes(data)
    async with vmbus_guest(VmbfsDevice, VmbfsConfig(file=str(tmp_path / "hive"))) as guest:
        client = VmbfsClient(guest.pipe)
        with anyio.fail_after(10):
            await client.negotiate()
            assert await client.read_file("/imc.hiv") == data
    (tmp_path / "tree" / "d").mkdir(parents=True)
    (tmp_path / "tree" / "d" / "f").write_bytes(data[:5000])
    async with vmbus_guest(VmbfsDevice, VmbfsConfig(root=str(tmp_path / "tree"))) as guest:
        client = VmbfsClient(guest.pipe)
        with anyio.fail_after(10):
            await client.negotiate()
            assert (await client.file_info("\\d")).directory
            assert await client.read_file("\\d\\f") == data[:5000]
            with pytest.raises(VmbfsClientError):
                await client.read_file("/../hive")


@pytest.mark.anyio
async def test_close_and_reopen_after_a_fatal_error_processes_again(tmp_path: Path) -> None:
    (tmp_path / "hive").write_bytes(b"hive")
    async with vmbus_guest(VmbfsDevice, VmbfsConfig(file=str(tmp_path / "hive"))) as guest:
        with anyio.fail_after(10):
            await guest.pipe.send(encode_get_file_info_request("/imc.hiv"))  # before the version
            while guest.device.state is not DeviceState.DONE:
                await anyio.sleep(0.005)
            await guest.pipe.send(encode_version_request())
            with pytest.raises(anyio.WouldBlock):
                guest.pipe.try_recv()
            await guest.close()
            await guest.open()
            client = VmbfsClient(guest.pipe)
            await client.negotiate()
            assert await client.read_file("/imc.hiv") == b"hive"


@pytest.mark.anyio
async def test_rings_below_four_pages_stop_the_device_before_reading(tmp_path: Path) -> None:
    async with vmbus_guest(VmbfsDevice, ring_pages=3) as guest:
        with anyio.fail_after(10):
            while guest.device.state is not DeviceState.DONE:
                await anyio.sleep(0.005)
            await guest.pipe.send(encode_version_request())
            with pytest.raises(anyio.WouldBlock):
                guest.pipe.try_recv(MAX_MESSAGE_SIZE)


_GARBAGE = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.builds(
            lambda t, body: struct.pack("<II", t, 0) + body,
            st.sampled_from([1, 3, 5]),
            st.binary(max_size=40),
        ),
    ),
    min_size=1,
    max_size=3,
)


async def _garbage_then_reopen(config: VmbfsConfig, messages: list[bytes]) -> None:
    async with vmbus_guest(VmbfsDevice, config) as guest:
        with anyio.fail_after(10):
            for message in messages:
                await guest.pipe.send(message)
            # Whatever happened, the device is running or done (never failed), and a fresh
            # channel serves again.
            await guest.close()
            assert guest.device.failure is None
            assert guest.device.state is DeviceState.CLOSED
            await guest.open()
            client = VmbfsClient(guest.pipe)
            await client.negotiate()
            assert await client.read_file("/imc.hiv") == b"hive"


@settings(max_examples=60, deadline=None)
@given(_GARBAGE)
def test_any_bytes_never_crash_the_device_or_the_host(
    tmp_path_factory: pytest.TempPathFactory, messages: list[bytes]
) -> None:
    path = tmp_path_factory.getbasetemp() / "vmbus-fuzz-hive"
    if not path.exists():
        path.write_bytes(b"hive")
    anyio.run(_garbage_then_reopen, VmbfsConfig(file=str(path)), messages)


@pytest.mark.anyio
async def test_save_while_ready_restore_then_get_file_info_over_the_vmbus(tmp_path: Path) -> None:
    from devicehost.savedstate import (
        decode_envelope_untrusted,
        decode_state_untrusted,
        encode_envelope,
        entry_for,
    )

    (tmp_path / "hive").write_bytes(b"hive bytes")
    async with vmbus_guest(VmbfsDevice, VmbfsConfig(file=str(tmp_path / "hive"))) as guest:
        device = guest.device
        with anyio.fail_after(10):
            client = VmbfsClient(guest.pipe)
            await client.negotiate()
            assert await device.stop()
            state = await device.save()
            blob = encode_envelope([entry_for(device.name, device.ctx.plugin, state)])
            (entry,) = decode_envelope_untrusted(blob)
            restored = decode_state_untrusted(entry, VmbfsSavedState)
            assert restored == VmbfsSavedState(ProtocolState.READY)
            resources = guest.transport.resources_for_restore(device)
            device.forget_runner()
            await device.restore(restored, resources)
            assert await device.start()
            # No new version exchange: the next GET_FILE_INFO is answered at once.
            await guest.pipe.send(encode_get_file_info_request("/imc.hiv"))
            assert await guest.pipe.recv(MAX_MESSAGE_SIZE) == struct.pack(
                "<IIIIQ", 4, 0, 0, 0, 10
            )
            assert await client.read_file("/imc.hiv") == b"hive bytes"
