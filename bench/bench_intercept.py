# SPDX-License-Identifier: MIT
"""intercept: a vmbfs client device reading through an intercepted channel; stop/start cycles.

Rows (one host serving the vmbfs server with an 8 MiB single-file backing and the ``vmbfs-client``
device intercepting its offer through the intercept wrapper, all in one anyio event loop on
asyncio):

- ``intercept_vmbfs_read``: MB/s of the client device reading the 8 MiB file in 12276-byte
  READ_FILE requests over the wrapper's 10-page GPADL rings (from the wrapper's start to the
  runner's ``finished``); baseline ``plain_file_read``: ``os.pread`` of the same file in the same
  chunks (warm page cache for both).
- ``intercept_stop_start``: stop+start cycles per second of the wrapper (runner stop, Close,
  GPADL teardown, save_open, close; then fresh pages, GPADL, open, restore_open, start);
  baseline ``client_open_close``: the same channel opened and closed with the bare VMBus client
  (GPADL, open, close, teardown), no device lifecycle.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from devicehost.testing.registry import DeviceSpec, host_with
from devicehost.vmbus import VmbusClient, VmbusTransport
from devicehost_intercept import InterceptTransport
from devicehost_vmbfs import VmbfsConfig, VmbfsDevice
from devicehost_vmbfs.client_device import VmbfsClientConfig, VmbfsClientDevice
from devicehost_vmbfs.protocol import MAX_READ_SIZE

__all__ = ["run"]

SIZE = 8 << 20
CYCLES = 200


def _plain_read(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.perf_counter()
        offset = 0
        while offset < SIZE:
            offset += len(os.pread(fd, min(MAX_READ_SIZE, SIZE - offset), offset))
        return SIZE / (time.perf_counter() - started) / 1e6
    finally:
        os.close(fd)


async def _measure(hive: Path) -> dict[str, float]:
    specs = [DeviceSpec("imc", "vmbfs", VmbfsConfig(file=str(hive))),
             DeviceSpec("reader", "vmbfs-client", VmbfsClientConfig(max_bytes=SIZE))]
    classes: dict[str, Any] = {"vmbfs": VmbfsDevice, "vmbfs-client": VmbfsClientDevice}
    async with host_with(classes, specs, guest_memory_size=8 << 20) as host:
        reader = host.devices["reader"]
        wrapper = host.transport(InterceptTransport).wrapper_of(reader)
        # Time a whole read from a fresh open (the first one raced the host's start-up).
        await wrapper.stop()
        wrapper.stash = None
        started = time.perf_counter()
        await wrapper.start()
        while reader.runner is None or not reader.runner.finished.is_set():
            await anyio.sleep(0)
        read_mbs = SIZE / (time.perf_counter() - started) / 1e6
        assert reader.runner.files[0].data == hive.read_bytes()

        started = time.perf_counter()
        for _ in range(CYCLES):
            await wrapper.stop()
            await wrapper.start()
        cycles = CYCLES / (time.perf_counter() - started)

        await wrapper.stop()
        vmbus = host.transport(VmbusTransport)
        # The claimed offer is hidden from ordinary clients: look with the relay's eyes.
        client = VmbusClient(vmbus.server, vmbus.allocator, see_hidden=True)
        offer = await client.wait_offer(lambda o: o.offer.key == vmbus.handle_of(
            host.devices["imc"]).key)
        started = time.perf_counter()
        for _ in range(CYCLES):
            channel = await client.open(offer, ring_pages=4)
            await channel.close()
        bare = CYCLES / (time.perf_counter() - started)
        await client.aclose()
    return {"read": read_mbs, "cycles": cycles, "bare": bare}


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="devicehost-bench-intercept-") as tmp:
        hive = Path(tmp) / "imc.hiv"
        hive.write_bytes(os.urandom(SIZE))
        plain = _plain_read(hive)
        got = anyio.run(_measure, hive)
    return [
        {"name": "intercept_vmbfs_read", "value": round(got["read"], 1), "unit": "MB/s",
         "baseline_name": "plain_file_read", "baseline_value": round(plain, 1),
         "ratio": round(got["read"] / plain, 4)},
        {"name": "intercept_stop_start", "value": round(got["cycles"], 1), "unit": "cycles/s",
         "baseline_name": "client_open_close", "baseline_value": round(got["bare"], 1),
         "ratio": round(got["cycles"] / got["bare"], 4)},
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
