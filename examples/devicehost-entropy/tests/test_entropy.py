"""Tests of the example entropy device: discovered when installed, conformant, serves bytes."""

from __future__ import annotations

import anyio
import importlib_metadata
import pytest
from devicehost_entropy import EntropyDevice

from devicehost.testing import DeviceConformance, host_with
from devicehost.virtio import VirtioTransport


def test_the_installed_host_discovers_the_plugin() -> None:
    (ep,) = [e for e in importlib_metadata.entry_points(group="devicehost") if e.name == "entropy"]
    assert ep.load() is EntropyDevice


class TestEntropyConformance(DeviceConformance):
    device_class = EntropyDevice


@pytest.mark.anyio
async def test_the_guest_gets_random_bytes_in_every_buffer() -> None:
    async with host_with({"entropy": EntropyDevice}) as host:
        driver = await host.transport(VirtioTransport).connect_driver("entropy")
        queue = driver.queue(0)
        for _ in range(3):
            queue.add(writable=[64])
        queue.kick()
        with anyio.fail_after(5):
            used = [await queue.wait_used() for _ in range(3)]
        assert [u.written for u in used] == [64, 64, 64]
        assert len({u.data for u in used}) == 3, "three requests, three different answers"
        tree = await host.devices["entropy"].inspect()
        assert tree["device"] == {"served_bytes": 192}
        await driver.reset()
