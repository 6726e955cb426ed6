"""A client device whose hooks raise stops only itself: the vmbfs server, the vmbfs client
device and the echo server beside it keep serving, and the relay keeps routing."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from devicehost.lifecycle import DeviceState
from devicehost.testing.registry import DeviceSpec
from devicehost.vmbus import VmbusTransport
from devicehost_intercept import InterceptConfig
from devicehost_vmbfs import VmbfsConfig, VmbfsDevice
from devicehost_vmbfs.client_device import VmbfsClientConfig, VmbfsClientDevice

from .harness import EchoClientConfig, EchoServerConfig, intercept_host, until, wrapper_of

pytestmark = pytest.mark.anyio

CLASSES = {"vmbfs": VmbfsDevice, "vmbfs-client": VmbfsClientDevice}


@pytest.mark.parametrize("hook", ["offer", "open", "run"])
async def test_a_failing_client_device_stops_only_itself(tmp_path: Path, hook: str) -> None:
    content = os.urandom(60_000)
    (tmp_path / "hive").write_bytes(content)
    specs = [
        DeviceSpec("relay", "intercept", InterceptConfig()),
        DeviceSpec("imc", "vmbfs", VmbfsConfig(file=str(tmp_path / "hive"))),
        DeviceSpec("echo", "echo", EchoServerConfig()),
        DeviceSpec("bad", "echo-client", EchoClientConfig(fail_in=hook)),
        DeviceSpec("reader", "vmbfs-client", VmbfsClientConfig(chunk=2048)),
    ]
    async with intercept_host(specs, CLASSES) as (host, _recorder):
        bad, reader = host.devices["bad"], host.devices["reader"]
        await until(lambda: bad.state is DeviceState.FAILED)
        assert hook in (bad.failure or "")
        await until(lambda: reader.runner is not None and reader.runner.finished.is_set())
        assert reader.runner.files[0].data == content
        echo, imc = host.devices["echo"], host.devices["imc"]
        assert echo.failure is None and imc.failure is None
        assert imc.state is DeviceState.RUNNING
        if hook == "open":
            # The wrapper gave the channel back: the echo server was closed, not failed.
            await until(lambda: wrapper_of(host, "bad").channel is None)
            assert echo.state is DeviceState.CLOSED
        elif hook == "run":
            assert echo.state is DeviceState.RUNNING  # its channel stays open, as upstream
        # A stop/start cycle of the relay still works for everyone.
        with anyio.fail_after(10):
            await host.devices["relay"].stop()
            await host.devices["relay"].start()
        await until(lambda: reader.runner is not None and reader.runner.finished.is_set())
        assert reader.runner.files[0].data == content
        handle = host.transport(VmbusTransport).handle_of(imc)
        assert handle.is_open and imc.state is DeviceState.RUNNING
        assert "relay" not in host.failures and host.devices["relay"].failure is None
