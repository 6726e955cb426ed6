# SPDX-License-Identifier: MIT
"""virtio-vsock in a worker process (``isolation = "process"``) against the same device inline.

Every party is its own process, as in real use: the "VMM" is a separate Python process per device
(the test kit's vhost-user front-end, :mod:`devicehost.testing.vhost_user`, with the guest socket
layer of ``devicehost_vsock.guest_stack`` over its rings: QEMU's message sequence, memfd guest
memory, eventfd kicks and calls); devicehost serves the devices over vhost-user from this process
(inline) or from one worker process per device (the supervisor only holds the VMM connection);
the host application is a separate process per device reading the guest's bytes from
``<base>_5000`` with ``recv_into``. Guest -> host, RW packets of 64 KiB, ``_TOTAL`` bytes per
device; timed from the guest's first packet to the host application holding the last byte.

Rows (the baseline is the same traffic with the devices inline, measured in the same run,
alternating with the worker measurement, best of ``_ROUNDS`` each):

- ``vsock_worker_guest_to_host_64k``: one device; Gbit/s. Target >= 0.9x inline.
- ``vsock_2workers_guest_to_host_64k_aggregate``: two devices, each with its own VMM and host
  application, both moving their bytes at once; the aggregate Gbit/s (both totals over the time
  from the first start to the last byte). Target >= 1.6x inline on a 2-core machine: inline both
  devices share one event loop; in workers each has its own process.
- ``vsock_worker_restart_to_new_connection``: seconds from SIGKILL of a device's worker to a
  new guest connection through the restarted worker (the guest's first connect attempt after the
  kill, retried until the new worker answers; restart delay 0.1 s). Baseline: the same device's
  first start, from ``devicehost`` starting the worker to the first connection (s).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Final

import anyio
import anyio.abc

from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.worker import WorkerSettings
from devicehost.worker.proxy import WorkerProxy
from devicehost_vsock import VsockConfig, VsockDevice

__all__ = ["run"]

_TOTAL: Final = 128 << 20
_CHUNK: Final = 65536
_ROUNDS: Final = 3

#: The VMM of one device, a separate process: connects the test kit's vhost-user front-end to
#: the socket given, starts the rings (32 MiB of memfd guest memory), pumps the guest socket layer,
#: prints ``ready``; then for each line on stdin: ``send PORT BYTES`` connects to host port PORT
#: and sends BYTES bytes in 64 KiB RW packets, printing the ``time.perf_counter()`` of the first
#: packet; ``connect PORT`` retries a connection to PORT until it is accepted and prints the time.
_GUEST = """
import sys, time, os
import anyio
from devicehost.memory import GuestMemory
from devicehost.testing.vhost_user import VhostUserFrontend
from devicehost_vsock.guest_stack import GuestSockets, GuestStack
from devicehost_vsock.protocol import HEADER_SIZE

async def main() -> None:
    path = sys.argv[1]
    memory = GuestMemory.memfd(32 << 20)
    frontend = await VhostUserFrontend.connect(path, memory)
    await frontend.realize()
    await frontend.start((1 << 32) | (1 << 30) | 0b101, queue_size=256)
    stack = GuestStack(frontend, cid=3, buf_alloc=256 * 1024)
    sockets = GuestSockets(stack, rx_buffers=128, rx_size=HEADER_SIZE + 65536)
    stdin = anyio.wrap_file(sys.stdin)
    local = 1000
    async with anyio.create_task_group() as tg:
        tg.start_soon(sockets.pump)
        print("ready", flush=True)
        while line := (await stdin.readline()).split():
            local += 1
            if line[0] == "send":
                port, total = int(line[1]), int(line[2])
                data = os.urandom(65536) * (total // 65536)
                conn = await sockets.connect(port, local)
                start = time.perf_counter()
                await conn.send_all(data, chunk=65536)
                print(repr(start), flush=True)
            else:
                while True:
                    try:
                        conn = await sockets.connect(int(line[1]), local)
                        break
                    except ConnectionRefusedError:
                        local += 1
                        await anyio.sleep(0.01)
                print(repr(time.perf_counter()), flush=True)
        tg.cancel_scope.cancel()
    await frontend.aclose()
    memory.close()

anyio.run(main)
"""

#: The host application of one device (a separate process): listens at the path given, prints
#: ``ready``, accepts one connection, reads ``total`` bytes, prints the count and the
#: ``time.perf_counter()`` of the last byte; then waits for stdin to close.
_READER = """
import os, socket, sys, time
path, total = sys.argv[1], int(sys.argv[2])
if os.path.exists(path):
    os.unlink(path)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
listener.listen(4)
print("ready", flush=True)
sock, _ = listener.accept()
buf = memoryview(bytearray(1 << 20))
got = 0
while got < total:
    n = sock.recv_into(buf)
    if n == 0:
        break
    got += n
print(got, repr(time.perf_counter()), flush=True)
sys.stdin.read()
"""


class _Line:
    """Line reader over a process's stdout."""

    def __init__(self, process: anyio.abc.Process) -> None:
        assert process.stdout is not None
        self.stream = process.stdout
        self.buffered = bytearray()

    async def next(self) -> str:
        while b"\n" not in self.buffered:
            chunk = await self.stream.receive()
            if not chunk:
                raise RuntimeError("the process ended")
            self.buffered += chunk
        line, _, rest = bytes(self.buffered).partition(b"\n")
        self.buffered = bytearray(rest)
        return line.decode()


async def _start(argv: list[str]) -> tuple[anyio.abc.Process, _Line]:
    process = await anyio.open_process(argv)
    lines = _Line(process)
    if await lines.next() != "ready":
        raise RuntimeError(f"{argv[:3]} did not start")
    return process, lines


async def _stop(process: anyio.abc.Process) -> None:
    if process.stdin is not None:
        await process.stdin.aclose()
    with anyio.move_on_after(10):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


async def _transfer(guests: list[tuple[anyio.abc.Process, _Line]], bases: list[str],
                    port: int) -> float:
    """Every guest sends _TOTAL bytes to its own host reader at once; aggregate Gbit/s."""
    readers = [await _start([sys.executable, "-c", _READER, f"{base}_{port}", str(_TOTAL)])
               for base in bases]
    try:
        for process, _ in guests:
            assert process.stdin is not None
            await process.stdin.send(f"send {port} {_TOTAL}\n".encode())
        starts = [float(await lines.next()) for _, lines in guests]
        ends = []
        for _, lines in readers:
            got, end = (await lines.next()).split()
            if int(got) != _TOTAL:
                raise RuntimeError(f"a host application received {got} of {_TOTAL} bytes")
            ends.append(float(end))
    finally:
        for process, _ in readers:
            await _stop(process)
    return len(guests) * _TOTAL * 8 / 1e9 / (max(ends) - min(starts))


async def _serve(workdir: str, count: int, isolated: bool, rounds: int, port0: int
                 ) -> tuple[list[float], list[tuple[float, float]]]:
    """Serve ``count`` devices, connect one VMM each, run ``rounds`` transfers; returns their
    Gbit/s, and for a single isolated device (restart, first start) times."""
    tag = "w" if isolated else "i"
    bases = [os.path.join(workdir, f"{tag}{i}") for i in range(count)]
    settings = WorkerSettings(isolation="process" if isolated else "inline",
                              restart="on-failure")
    specs = [DeviceSpec(f"vsock{i}", "vsock", VsockConfig(
        guest_cid=3, base_path=bases[i], seqpacket=False,
        vhost_user_socket=os.path.join(workdir, f"{tag}{i}.vu")), worker=settings)
        for i in range(count)]
    results: list[float] = []
    restarts: list[tuple[float, float]] = []
    started = time.perf_counter()
    async with host_with({"vsock": VsockDevice}, specs) as host:
        guests = [await _start([sys.executable, "-c", _GUEST,
                                os.path.join(workdir, f"{tag}{i}.vu")])
                  for i in range(count)]
        try:
            with anyio.fail_after(300):
                if isolated and count == 1:
                    first = await _connect_time(guests[0], bases[0], port0 - 1) - started
                for r in range(rounds):
                    results.append(await _transfer(guests, bases, port0 + r))
                if isolated and count == 1:
                    proxy = host.devices["vsock0"].pm.get_plugin("vsock0")
                    assert isinstance(proxy, WorkerProxy) and proxy.worker is not None
                    killed = time.perf_counter()
                    os.kill(proxy.worker.pid, signal.SIGKILL)
                    restarts.append((await _connect_time(guests[0], bases[0], port0 - 2)
                                     - killed, first))
        finally:
            for process, _ in guests:
                await _stop(process)
    return results, restarts


async def _connect_time(guest: tuple[anyio.abc.Process, _Line], base: str, port: int) -> float:
    process, lines = guest
    async with await anyio.create_unix_listener(f"{base}_{port}") as listener:
        assert process.stdin is not None
        await process.stdin.send(f"connect {port}\n".encode())
        when = float(await lines.next())
        peer = await listener.accept()
        await peer.aclose()
    return when


def _row(name: str, value: float, unit: str, base_name: str, base: float) -> dict[str, Any]:
    return {"name": name, "value": round(value, 3), "unit": unit, "baseline_name": base_name,
            "baseline_value": round(base, 3), "ratio": round(value / base, 4) if base else 0.0}


async def _main() -> list[dict[str, Any]]:
    workdir = tempfile.mkdtemp(prefix="dh-bw-")
    try:
        one_worker: list[float] = []
        one_inline: list[float] = []
        two_worker: list[float] = []
        two_inline: list[float] = []
        restart = first = 0.0
        for r in range(_ROUNDS):
            # Alternating, so that a change of the machine's speed hits both sides alike.
            got, _ = await _serve(workdir, 1, False, 1, 5000 + 10 * r)
            one_inline += got
            got, times = await _serve(workdir, 1, True, 1, 5000 + 10 * r)
            one_worker += got
            if times:
                restart, first = times[0] if r == 0 else (min(restart, times[0][0]),
                                                          min(first, times[0][1]))
            got, _ = await _serve(workdir, 2, False, 1, 6000 + 10 * r)
            two_inline += got
            got, _ = await _serve(workdir, 2, True, 1, 6000 + 10 * r)
            two_worker += got
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return [
        _row("vsock_worker_guest_to_host_64k", max(one_worker), "Gbit/s",
             "vsock_inline_guest_to_host_64k", max(one_inline)),
        _row("vsock_2workers_guest_to_host_64k_aggregate", max(two_worker), "Gbit/s",
             "vsock_2inline_guest_to_host_64k_aggregate", max(two_inline)),
        _row("vsock_worker_restart_to_new_connection", restart, "s",
             "vsock_worker_first_start_to_connection", first),
    ]


def run() -> list[dict[str, Any]]:
    return anyio.run(_main)


if __name__ == "__main__":
    for row in run():
        print(row)
