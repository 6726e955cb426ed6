"""The intercept part of ``devicehost demo``: a vmbfs client device intercepting the IMC channel.

One host serves three devices: the vmbfs server offering a temporary 256 KiB IMC hive, the
``vmbfs-client`` device that intercepts that offer through its wrapper (GPADL + open from the
host's DMA memory) and reads the hive back, and the ``intercept`` relay device. The demo then
stops the relay while a read is in flight (the wrapper closes the channel and stashes the
client's progress), starts it again (fresh ring memory, ``restore_open`` continues the read) and
compares the bytes, and finally revokes the server's offer (the wrapper closes and forgets it).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import attrs

from devicehost.demo import DemoResult
from devicehost.lifecycle import Device

__all__ = ["run_demo"]

_HIVE_SIZE = 256 * 1024
_STEP_TIMEOUT = 20.0


@attrs.frozen
class _DeviceSpec:
    name: str
    plugin: str
    config: Any


@attrs.frozen
class _HostConfig:
    devices: tuple[_DeviceSpec, ...]


class _Registry:
    """The device classes the demo's host needs, given directly."""

    cross_cutting: tuple[object, ...] = ()

    def __init__(self, classes: dict[str, Any]) -> None:
        self.classes = classes

    def create_device(self, plugin: str, config: Any) -> object:
        return self.classes[plugin](config)


async def _until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(_STEP_TIMEOUT):
        while not predicate():
            await anyio.sleep(0.002)


def _closed(wrapper: Any) -> bool:
    return wrapper.channel is None


def _runner(device: Device) -> Any:
    return device.runner


async def run_demo() -> DemoResult:
    """Intercept the vmbfs IMC channel, read the hive, stop/start mid-read, revoke."""
    from devicehost.host import open_host
    from devicehost.vmbus import VmbusTransport
    from devicehost_intercept.device import InterceptConfig, InterceptRelay
    from devicehost_intercept.transport import InterceptTransport
    from devicehost_vmbfs import VmbfsConfig, VmbfsDevice
    from devicehost_vmbfs.client_device import VmbfsClientConfig, VmbfsClientDevice

    started = time.perf_counter()
    lines: list[str] = []
    ok = True
    moved = 0
    with tempfile.TemporaryDirectory(prefix="devicehost-intercept-demo-") as tmp:
        hive = Path(tmp) / "imc.hiv"
        content = os.urandom(_HIVE_SIZE)
        hive.write_bytes(content)
        registry = _Registry({"vmbfs": VmbfsDevice, "vmbfs-client": VmbfsClientDevice,
                              "intercept": InterceptRelay})
        config = _HostConfig((
            _DeviceSpec("imc", "vmbfs", VmbfsConfig(file=str(hive))),
            _DeviceSpec("relay", "intercept", InterceptConfig()),
            _DeviceSpec("reader", "vmbfs-client", VmbfsClientConfig(chunk=4096)),
        ))
        async with open_host(registry, config, guest_memory_size=4 << 20) as host:
            if host.failures:
                raise RuntimeError(f"the demo host could not serve: {host.failures}")
            server = host.transport(VmbusTransport)
            wrapper = host.transport(InterceptTransport).wrapper_of(host.devices["reader"])
            reader, relay = host.devices["reader"], host.devices["relay"]
            handle = server.handle_of(host.devices["imc"])
            lines.append(f"offer   vmbfs server offers IMC instance {handle.key.instance_id} "
                         f"as channel {handle.channel_id}")
            await _until(lambda: wrapper.channel is not None)
            channel = wrapper.channel
            assert channel is not None
            pfns = channel.block.pfns
            lines.append(f"claim   vmbfs-client intercepts it: GPADL {channel.gpadl_id:#x} over "
                         f"pages {pfns[0]:#x}..{pfns[-1]:#x}, ring offset {channel.ring_offset}")
            # Stop the relay (and so the wrapper) while the client is mid-file.
            await _until(lambda: _runner(reader) is not None
                         and len(_runner(reader).reader.received) >= _HIVE_SIZE // 4)
            with anyio.fail_after(_STEP_TIMEOUT):
                await relay.stop()
            stash = wrapper.stash
            kept = 0 if stash is None else len(stash.received)
            ok &= stash is not None and _closed(wrapper)
            lines.append(f"stop    relay stopped mid-read: channel closed, GPADL torn down, "
                         f"progress stashed at {kept:,} of {_HIVE_SIZE:,} bytes")
            with anyio.fail_after(_STEP_TIMEOUT):
                await relay.start()
            await _until(lambda: wrapper.channel is not None)
            assert wrapper.channel is not None
            lines.append(f"start   relay started: reopened with GPADL "
                         f"{wrapper.channel.gpadl_id:#x}, client renegotiated and resumed via "
                         f"restore_open")
            await _until(lambda: _runner(reader) is not None and _runner(reader).finished.is_set())
            (read,) = _runner(reader).files
            match = read.data == content
            ok &= match
            moved += len(read.data)
            lines.append(f"read    {read.path}: {len(read.data):,} bytes, sha256 "
                         f"{read.sha256[:16]}..., bytes match: {'yes' if match else 'NO'}")
            current = wrapper.channel
            assert current is not None
            with anyio.fail_after(_STEP_TIMEOUT):
                await handle.revoke()
                await _until(lambda: wrapper.offer is None)
            freed = not any(server.allocator.in_use(pfn) for pfn in current.block.pfns)
            ok &= _closed(wrapper) and reader.runner is None and freed
            lines.append(f"revoke  server revoked the offer: wrapper closed the channel, "
                         f"{'freed' if freed else 'FAILED TO FREE'} its pages and forgot the "
                         f"offer")
    return DemoResult(ok=ok, lines=lines, bytes_moved=moved,
                      seconds=time.perf_counter() - started)
