# SPDX-License-Identifier: MIT
"""vmbfs through the VMBus socket: a guest process vs the in-process guest, same run.

One host (in this process) serves a 64 MiB file with vmbfs (single-file backing) and its VMBus
on a socket (``[host] vmbus_socket``). Each row reads the whole file with
``VmbfsClient.read_file_bytearray`` (GET_FILE_INFO, then 12276-byte READ_FILE requests) and is
reported next to its same-run baseline, the same read by the host's in-process VMBus client:

- ``vmbfs_socket_sequential_read`` vs ``vmbfs_inprocess_sequential_read``: strict request/reply
  (one read in flight), 4-page rings;
- ``vmbfs_socket_sequential_read_pipelined`` vs ``vmbfs_inprocess_sequential_read_pipelined``:
  8 reads in flight, 32-page rings.

The socket rows run the guest as a separate process (``python -m devicehost_vmbfs.socketguest``,
which times its read after the version negotiation); its data crosses the shared rings in its
own sealed memfd, and only control messages and eventfd signals cross the socket. Each figure is
the best of ``ROUNDS`` reads, socket and in-process alternating, because the 2-vCPU development
VM is shared. The target (issue 19) is a ratio >= 0.8; it is reported, never asserted.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from devicehost.config import HostSettings
from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.vmbus import VmbusTransport
from devicehost_vmbfs.client import VmbfsClient
from devicehost_vmbfs.device import VmbfsConfig, VmbfsDevice

__all__ = ["run"]

SIZE = 64 << 20
ROUNDS = 3
MB = 1e6
# (row suffix, ring data pages per direction, reads in flight)
VARIANTS = (("sequential_read", 4, 1), ("sequential_read_pipelined", 32, 8))


async def _inprocess_mb_s(host: Any, expected: int, ring_pages: int, window: int) -> float:
    transport = host.transport(VmbusTransport)
    key = transport.handle_of(host.devices["vmbfs"]).key
    bus = transport.client()
    offer = await bus.wait_offer(lambda o: o.offer.key == key)
    async with bus.opened(offer, ring_pages=ring_pages) as channel:
        client = VmbfsClient(channel.message_pipe())
        await client.negotiate()
        started = time.perf_counter()
        data = await client.read_file_bytearray("/imc.hiv", window=window)
        elapsed = time.perf_counter() - started
    await bus.aclose()
    if len(data) != expected:
        raise AssertionError("the in-process read returned the wrong size")
    return len(data) / elapsed / MB


async def _socket_mb_s(socket_path: Path, expected: int, ring_pages: int, window: int) -> float:
    proc = await anyio.run_process(
        [sys.executable, "-m", "devicehost_vmbfs.socketguest", str(socket_path), "/imc.hiv",
         "--window", str(window), "--ring-pages", str(ring_pages)],
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"the socket guest failed: {proc.stderr.decode()[-2000:]}")
    result = json.loads(proc.stdout.decode().splitlines()[-1])
    if result["size"] != expected:
        raise AssertionError("the socket guest read the wrong size")
    return float(result["mb_s"])


async def _measure(file: Path, socket_path: Path) -> list[dict[str, Any]]:
    spec = DeviceSpec("vmbfs", "vmbfs", VmbfsConfig(file=str(file)))
    settings = HostSettings(vmbus_socket=socket_path)
    rows = []
    async with host_with({"vmbfs": VmbfsDevice}, [spec], guest_memory_size=4 << 20,
                         settings=settings) as host:
        for suffix, ring_pages, window in VARIANTS:
            socket_best = inprocess_best = 0.0
            for _ in range(ROUNDS):
                socket_best = max(socket_best,
                                  await _socket_mb_s(socket_path, SIZE, ring_pages, window))
                inprocess_best = max(inprocess_best,
                                     await _inprocess_mb_s(host, SIZE, ring_pages, window))
            rows.append({
                "name": f"vmbfs_socket_{suffix}",
                "value": round(socket_best, 1),
                "unit": "MB/s",
                "baseline_name": f"vmbfs_inprocess_{suffix}",
                "baseline_value": round(inprocess_best, 1),
                "ratio": round(socket_best / inprocess_best, 4),
            })
    return rows


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench-vmbfs-socket-") as tmp:
        file = Path(tmp) / "hive"
        file.write_bytes(os.urandom(SIZE))
        return anyio.run(_measure, file, Path(tmp) / "vmbus.sock")


if __name__ == "__main__":
    for row in run():
        print(row)
