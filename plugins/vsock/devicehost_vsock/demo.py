"""The vsock part of ``devicehost demo``: the real device, its in-process guest, real sockets.

Two legs, each echoing data and timing it:

1. guest -> host: the guest connects to host port 5000, served by a host Unix listener at
   ``<base_path>_5000`` that echoes what it reads;
2. host -> guest: a host process connects to the device's listener at ``<base_path>``, writes
   ``CONNECT 1234``, reads ``OK <port>`` and echoes through the guest's echo listener on port 1234.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import anyio
from anyio.abc import SocketStream

from devicehost.demo import DemoResult
from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.virtio import VirtioTransport
from devicehost_vsock.device import VsockConfig, VsockDevice
from devicehost_vsock.guest_stack import GuestSockets, GuestStack

__all__ = ["run_demo"]

_PAYLOAD = 16 * 1024 * 1024
_CHUNK = 64 * 1024


async def _host_echo(stream: SocketStream) -> None:
    async with stream:
        try:
            while True:
                await stream.send(await stream.receive(1 << 20))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


async def _guest_to_host(sockets: GuestSockets, base: str, data: bytes) -> float:
    listener = await anyio.create_unix_listener(f"{base}_5000")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, _host_echo)
        conn = await sockets.connect(5000, 49152)
        start = time.perf_counter()
        async with anyio.create_task_group() as io:
            io.start_soon(conn.send_all, data)
            echoed = await conn.recv_exactly(len(data))
        seconds = time.perf_counter() - start
        if echoed != data:
            raise AssertionError("guest -> host echo returned different bytes")
        await conn.shutdown()
        tg.cancel_scope.cancel()
    return seconds


async def _host_to_guest(base: str, data: bytes) -> tuple[bytes, float]:
    stream = await anyio.connect_unix(base)
    async with stream:
        await stream.send(b"CONNECT 1234\n")
        ok = bytearray()
        while not ok.endswith(b"\n"):
            ok += await stream.receive(1)
        start = time.perf_counter()
        got = bytearray()

        async def writer() -> None:
            for i in range(0, len(data), _CHUNK):
                await stream.send(data[i : i + _CHUNK])

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            while len(got) < len(data):
                got += await stream.receive(1 << 20)
        seconds = time.perf_counter() - start
    if bytes(got) != data:
        raise AssertionError("host -> guest echo returned different bytes")
    return bytes(ok), seconds


async def run_demo() -> DemoResult:
    """Run both legs; ``bytes_moved`` counts the bytes echoed end to end (both ways)."""
    workdir = tempfile.mkdtemp(prefix="dh-vsock-")
    base = os.path.join(workdir, "vsock")
    lines: list[str] = []
    data = os.urandom(_PAYLOAD)
    started = time.perf_counter()
    try:
        config = VsockConfig(guest_cid=3, base_path=base)
        spec = DeviceSpec("vsock", "vsock", config)
        async with host_with({"vsock": VsockDevice}, [spec]) as host:
            driver = await host.transport(VirtioTransport).connect_driver("vsock")
            stack = GuestStack(driver, cid=3, buf_alloc=256 * 1024)
            sockets = GuestSockets(stack, rx_buffers=64)
            sockets.listen(1234, echo=True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(sockets.pump)
                with anyio.fail_after(60):
                    up = await _guest_to_host(sockets, base, data)
                    ok, down = await _host_to_guest(base, data)
                tg.cancel_scope.cancel()
            await driver.reset()
        mib = _PAYLOAD / (1 << 20)
        lines.append(f"guest CID 3, device listener {base}")
        lines.append(
            f"guest -> host port 5000 ({base}_5000): {mib:.0f} MiB echoed in {up:.2f} s"
            f" ({2 * _PAYLOAD * 8 / up / 1e9:.2f} Gbit/s both ways)"
        )
        lines.append(
            f"host CONNECT 1234 -> {ok.decode().strip()}: {mib:.0f} MiB echoed by the guest in"
            f" {down:.2f} s ({2 * _PAYLOAD * 8 / down / 1e9:.2f} Gbit/s both ways)"
        )
        return DemoResult(
            ok=True, lines=lines, bytes_moved=4 * _PAYLOAD,
            seconds=time.perf_counter() - started,
        )  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
