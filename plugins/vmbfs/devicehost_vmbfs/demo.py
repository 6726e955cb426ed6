"""The vmbfs part of ``devicehost demo``: files served through the host's VMBus, read back.

Two hosts run one after the other (both devices offer the same IMC instance, so one VMBus can
carry only one of them): the first serves a temporary 1 MiB file with the single-file backing,
the second a temporary directory tree with the directory backing. Each time the host's own
in-process VMBus client opens the channel (GPADL rings in the host's guest memory), and the vmbfs
client negotiates the version, asks for file info and reads every file back in MAX_READ_SIZE
chunks; the demo compares the bytes and shows that a path climbing out of the root is refused.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from devicehost.demo import DemoResult
from devicehost_vmbfs.client import VmbfsClient, VmbfsClientError
from devicehost_vmbfs.device import VmbfsConfig, VmbfsDevice
from devicehost_vmbfs.protocol import MAX_READ_SIZE

__all__ = ["run_demo"]

_HIVE_SIZE = 1 << 20


def _tree() -> dict[str, bytes]:
    return {
        "boot/loader.cfg": b"timeout=0\ndefault=devicehost\n",
        "boot/kernel.img": os.urandom(300_000),
        "data/blob.bin": os.urandom(64_000),
        "README.txt": "served by devicehost-vmbfs \u2713\n".encode(),
    }


@asynccontextmanager
async def _guest_client(config: VmbfsConfig) -> AsyncIterator[VmbfsClient]:
    """A host serving one vmbfs device, and a vmbfs client on the channel its guest opened."""
    from devicehost.testing import host_with
    from devicehost.testing.registry import DeviceSpec
    from devicehost.vmbus import VmbusTransport

    spec = DeviceSpec("vmbfs", "vmbfs", config)
    async with host_with({"vmbfs": VmbfsDevice}, [spec], guest_memory_size=4 << 20) as host:
        if "vmbfs" in host.failures:
            raise RuntimeError(f"the host could not serve vmbfs: {host.failures['vmbfs']}")
        transport = host.transport(VmbusTransport)
        key = transport.handle_of(host.devices["vmbfs"]).key
        bus = transport.client()
        try:
            offer = await bus.wait_offer(lambda o: o.offer.key == key)
            async with bus.opened(offer) as channel:
                client = VmbfsClient(channel.message_pipe())
                await client.negotiate()
                yield client
        finally:
            await bus.aclose()


def _reads(size: int) -> int:
    return -(-size // MAX_READ_SIZE)


async def run_demo() -> DemoResult:
    """Serve a file and a directory through vmbfs, read them back, report what matched."""
    started = time.perf_counter()
    lines: list[str] = []
    moved = 0
    ok = True
    with tempfile.TemporaryDirectory(prefix="devicehost-vmbfs-demo-") as tmp:
        hive = Path(tmp) / "imc.hiv"
        content = os.urandom(_HIVE_SIZE)
        hive.write_bytes(content)
        async with _guest_client(VmbfsConfig(file=str(hive))) as client:
            info = await client.file_info("/imc.hiv")
            data = await client.read_file("/imc.hiv")
        match = data == content
        ok &= match
        moved += len(data)
        lines.append(
            f"file    /imc.hiv: {info.file_size:,} bytes in {_reads(info.file_size)} reads, "
            f"bytes match: {'yes' if match else 'NO'}"
        )

        root = Path(tmp) / "tree"
        tree = _tree()
        for rel, blob in tree.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(blob)
        (Path(tmp) / "outside.txt").write_bytes(b"not for the guest")
        async with _guest_client(VmbfsConfig(root=str(root))) as client:
            for rel, blob in tree.items():
                path = "\\" + rel.replace("/", "\\")
                data = await client.read_file(path)
                match = data == blob
                ok &= match
                moved += len(data)
                lines.append(
                    f"dir     {path}: {len(data):,} bytes, bytes match: {'yes' if match else 'NO'}"
                )
            boot = await client.file_info("/boot")
            ok &= boot.directory
            kind = "a directory" if boot.directory else "NOT a directory"
            lines.append(f"dir     /boot is {kind}")
            try:
                await client.read_file("/../outside.txt")
            except VmbfsClientError as exc:
                lines.append(f"escape  /../outside.txt refused: {exc}")
            else:
                ok = False
                lines.append("escape  /../outside.txt was served: the root leaked")
    return DemoResult(ok=ok, lines=lines, bytes_moved=moved, seconds=time.perf_counter() - started)
