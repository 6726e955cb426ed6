"""Fixtures of the vsock tests: the real device in a real host, driven by the in-process driver.

Harness as upstream's integration tests: guest CID 3, 256-entry split queues, guest buf_alloc
65536, the device listener at ``<tmp>/vsock`` (= base_path), host listeners at
``<tmp>/vsock_<port>``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.virtio import VirtioTransport
from devicehost_vsock import VsockConfig, VsockDevice

from .hosted import HostedGuest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Short paths: Unix socket names are limited to 107 bytes and the GUID form adds 37.
    path = tempfile.mkdtemp(prefix="vs")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def guest(sock_dir: str) -> AsyncIterator[HostedGuest]:
    config = VsockConfig(guest_cid=3, base_path=f"{sock_dir}/vsock")
    async with host_with(
        {"vsock": VsockDevice}, [DeviceSpec("vsock", "vsock", config)]
    ) as host:
        driver = await host.transport(VirtioTransport).connect_driver("vsock", queue_size=256)
        stack = HostedGuest(driver, host, cid=3, buf_alloc=65536)
        yield stack
        await driver.reset()
