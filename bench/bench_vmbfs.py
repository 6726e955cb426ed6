# SPDX-License-Identifier: MIT
"""vmbfs: sequential read of a 64 MiB file through the client, over the full stack.

Rows (MB/s of reading a 64 MiB file with ``VmbfsClient.read_file``: GET_FILE_INFO, then
12276-byte READ_FILE requests, from a vmbfs device serving it with the single-file backing; every
message crosses a message pipe over Hyper-V rings in GPADL pages of the host's guest memory, set
up by the host's in-process VMBus client and server, between the client task and the device's
run loop started by the VMBus transport, all in one anyio event loop on asyncio):

- ``vmbfs_sequential_read``: strict request/reply (one read in flight, as the boot loader does),
  4-page rings, the smallest vmbfs allows;
- ``vmbfs_sequential_read_pipelined``: 8 reads in flight, 32-page rings (the device then serves
  queued requests back to back, several per wake-up);
- ``vmbfs_sequential_read_bytearray`` / ``vmbfs_sequential_read_bytearray_pipelined``: the same
  with ``VmbfsClient.read_file_bytearray``, which appends each reply's data from the ring to one
  bytearray (``read_file`` then copies that into bytes: a second pass over 64 MiB of fresh
  memory, whose page faults cost about as much as the copy out of the ring).

Baseline ``plain_file_read``: the same file read with ``os.pread`` in 12276-byte chunks in the
same run (warm page cache for both). The target is 400 MB/s through the full stack; it is
reported, never asserted.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.vmbus import VmbusTransport
from devicehost_vmbfs.client import VmbfsClient
from devicehost_vmbfs.device import VmbfsConfig, VmbfsDevice
from devicehost_vmbfs.protocol import MAX_READ_SIZE

__all__ = ["run"]

SIZE = 64 << 20
# (row name, ring data pages per direction, reads in flight, read_file_bytearray)
VARIANTS = (
    ("vmbfs_sequential_read", 4, 1, False),
    ("vmbfs_sequential_read_pipelined", 32, 8, False),
    ("vmbfs_sequential_read_bytearray", 4, 1, True),
    ("vmbfs_sequential_read_bytearray_pipelined", 32, 8, True),
)
MB = 1e6


def _plain_read_mb_s(path: Path) -> tuple[float, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.perf_counter()
        total = 0
        while True:
            chunk = os.pread(fd, MAX_READ_SIZE, total)
            if not chunk:
                break
            total += len(chunk)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    return total / elapsed / MB, total


async def _vmbfs_read_mb_s(
    path: Path, expected: bytes, ring_pages: int, window: int, bytearray_: bool
) -> float:
    spec = DeviceSpec("vmbfs", "vmbfs", VmbfsConfig(file=str(path)))
    async with host_with({"vmbfs": VmbfsDevice}, [spec], guest_memory_size=4 << 20) as host:
        transport = host.transport(VmbusTransport)
        key = transport.handle_of(host.devices["vmbfs"]).key
        bus = transport.client()
        offer = await bus.wait_offer(lambda o: o.offer.key == key)
        async with bus.opened(offer, ring_pages=ring_pages) as channel:
            client = VmbfsClient(channel.message_pipe())
            await client.negotiate()
            started = time.perf_counter()
            read = client.read_file_bytearray if bytearray_ else client.read_file
            data = await read("/imc.hiv", window=window)
            elapsed = time.perf_counter() - started
        await bus.aclose()
    if data != expected:
        raise AssertionError("vmbfs returned different bytes than the file holds")
    return len(data) / elapsed / MB


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-vmbfs-") as tmp:
        path = Path(tmp) / "hive"
        content = os.urandom(SIZE)
        path.write_bytes(content)
        _plain_read_mb_s(path)  # warm the page cache
        baseline, _ = _plain_read_mb_s(path)
        for name, ring_pages, window, bytearray_ in VARIANTS:
            value = anyio.run(_vmbfs_read_mb_s, path, content, ring_pages, window, bytearray_)
            rows.append(
                {
                    "name": name,
                    "value": round(value, 1),
                    "unit": "MB/s",
                    "baseline_name": "plain_file_read",
                    "baseline_value": round(baseline, 1),
                    "ratio": round(value / baseline, 4),
                }
            )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
