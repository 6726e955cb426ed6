# SPDX-License-Identifier: MIT
"""virtio-vsock: throughput through the real device, and 1024 concurrent connections.

The device runs in a real host; the guest is the in-process virtio driver with the vsock guest
stack of ``devicehost_vsock.guest_stack`` (it copies every payload into and out of guest memory,
and batches as a guest kernel would: every RW packet the credit and free descriptors allow, then
one kick; tx completions reaped and rx buffers reposted in bulk; a sender that ran out of credit
has its data posted by the receive pass that brings the CREDIT_UPDATE, as a kernel's receive path
wakes a blocked sender); the host side is a real Unix socket in a separate process. The C
accelerators (virtqueue device side, driver side) are used when built, as ``devicehost doctor``
reports; ``DEVICEHOST_PURE_PYTHON=1`` measures the pure-Python paths.

Rows:

- ``vsock_guest_to_host_{64k,1k}``: the guest sends RW packets of that payload size to a host
  Unix listener (``<base>_5000``) in a separate process (as a host application would be), which
  reads everything with ``recv_into`` like the baseline's reader; Gbit/s of payload, timed from
  the guest's first packet to the host holding the last byte.
- ``vsock_host_to_guest_{64k,1k}``: a host process (a separate Python process, as a host
  application would be; it writes with blocking ``sendall`` like the baseline's writer) connects
  with ``CONNECT 1234``, writes the bytes; the guest posts rx buffers of that payload size (+ 44
  header bytes) and consumes them; Gbit/s of payload, timed from the host's first write to the
  guest holding the last byte. The guest advertises buf_alloc = 256 KiB and tells its fwd_cnt
  every 128 KiB.
- ``vsock_guest_to_host_64k_window256k``, ``vsock_host_to_guest_64k_window256k``: the 64 KiB
  rows through a second device configured with ``tx_buffer_size = 262144`` (a devicehost
  extension; the rows above use upstream's 65536). With the upstream window the guest can have
  only one 64 KiB packet in flight, so guest -> host waits a credit round trip per packet; with
  256 KiB it keeps up to four in flight. Host -> guest is bounded by the guest's own buf_alloc
  (256 KiB in every row), so it is shown only for comparison.
- ``vsock_host_to_guest_1k_packets_64k_writes``: the same 1 KiB rx buffers (so 1 KiB packets),
  but the host writes 64 KiB at a time, so one readiness report fills many rx buffers.
- ``vsock_seqpacket_guest_to_host_{64b,4k}``, ``vsock_seqpacket_host_to_guest_{64b,4k}``:
  SEQPACKET messages of that size, messages/s. Guest -> host: the guest sends them (as many as
  credit and descriptors allow per kick) to a host ``SOCK_SEQPACKET`` listener at ``<base>_5100``
  in a separate process, which receives each one; timed from the guest's first message to the host
  holding the last. Host -> guest: a host process connects to ``<base>_seqpacket``, sends
  ``CONNECT 1235`` and then the messages; the guest (rx buffers of 4 KiB + header, as Linux) counts
  whole messages; timed from the host's first send to the guest holding the last. Baseline: a
  ``SOCK_SEQPACKET`` ``socketpair`` moving the same messages (a thread sends, the main thread
  receives each).
- ``vsock_1024_echo_connections``: 1024 host connections at once (``CONNECT``, ``OK``, 1 KiB
  echoed by the guest, held open together); value = connections whose echo came back intact.
- ``vsock_device_bytes_per_connection``: tracemalloc growth of memory allocated by the device
  (connection table, relay, tx buffers: allocations made in ``devicehost_vsock`` outside the guest
  stack) with the 1024 connections open, divided by 1024. Kernel socket buffers are not counted.
- ``vsock_process_bytes_per_connection``: the same for the whole process (includes the guest
  stack's and the host clients' own objects), an upper bound.

Baseline, measured in the same run: a Python ``socket.socketpair()`` moving the same bytes in the
same chunk size (a thread writes with ``sendall``, the main thread reads with ``recv_into``).
For the memory rows the baseline is the target (100 KiB per connection).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import tracemalloc
from typing import Any

import anyio

from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.virtio import VirtioTransport
from devicehost_vsock import VsockConfig, VsockDevice
from devicehost_vsock.guest_stack import GuestSockets, GuestStack
from devicehost_vsock.protocol import HEADER_SIZE, TYPE_SEQPACKET

__all__ = ["run"]

_GUEST_BUF = 256 * 1024
#: The device's ``tx_buffer_size`` for the ``_window256k`` rows.
_WIDE_WINDOW = 256 * 1024
_CONNECTIONS = 1024


def _socketpair_seconds(total: int, chunk: int) -> float:
    a, b = socket.socketpair()
    data = memoryview(os.urandom(chunk))
    buf = memoryview(bytearray(1 << 20))

    def writer() -> None:
        for _ in range(total // chunk):
            a.sendall(data)

    thread = threading.Thread(target=writer)
    start = time.perf_counter()
    thread.start()
    got = 0
    while got < total:
        got += b.recv_into(buf)
    thread.join()
    seconds = time.perf_counter() - start
    a.close()
    b.close()
    return seconds


def _row(name: str, value: float, unit: str, base_name: str, base: float) -> dict[str, Any]:
    return {"name": name, "value": round(value, 3), "unit": unit, "baseline_name": base_name,
            "baseline_value": round(base, 3), "ratio": round(value / base, 4) if base else 0.0}


#: The host application of the guest->host rows, a separate process: listens at the path given
#: (replacing the socket file of an earlier round),
#: prints ``ready``, accepts one connection, reads ``total`` bytes with ``recv_into`` (as the
#: socketpair baseline's reader does), prints the byte count and the ``time.perf_counter()``
#: (CLOCK_MONOTONIC, shared with this process) at which the last byte arrived, and keeps the
#: connection open until its stdin closes.
_HOST_READER = """
import os, socket, sys, time
path, total = sys.argv[1], int(sys.argv[2])
if os.path.exists(path):
    os.unlink(path)  # left by an earlier round
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
listener.listen(1)
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


async def _lines(stream: anyio.abc.ByteReceiveStream, buffered: bytearray, count: int) -> None:
    while buffered.count(b"\n") < count:
        buffered += await stream.receive()


async def _guest_to_host(sockets: GuestSockets, base: str, total: int, chunk: int,
                         port: int) -> float:
    data = os.urandom(chunk) * (total // chunk)
    process = await anyio.open_process(
        [sys.executable, "-c", _HOST_READER, f"{base}_{port}", str(total)])
    async with process:
        try:
            assert process.stdout is not None and process.stdin is not None
            out = bytearray()
            with anyio.fail_after(60):
                await _lines(process.stdout, out, 1)
                conn = await sockets.connect(port, 40000 + port)
                start = time.perf_counter()
                await conn.send_all(data, chunk=chunk)
                await _lines(process.stdout, out, 2)
                await conn.shutdown()
                await process.stdin.aclose()
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
    received, end = out.split(b"\n")[1].split()
    if int(received) != total:
        raise RuntimeError(f"host received {int(received)} of {total} bytes")
    return float(end) - start


#: The host application of the host->guest rows, a separate process (as it would be in real use):
#: connects to the device's listener, asks for port 1234, waits for ``OK``, prints the
#: ``time.perf_counter()`` (CLOCK_MONOTONIC, shared with this process) at which it starts writing,
#: writes ``total`` bytes with ``sendall`` in ``chunk``-byte writes (as the socketpair baseline
#: does), and keeps the connection open until its stdin closes.
_HOST_WRITER = """
import os, socket, sys, time
base, total, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(base)
sock.sendall(b"CONNECT 1234\\n")
line = b""
while not line.endswith(b"\\n"):
    piece = sock.recv(1)
    if not piece:
        sys.exit("device closed the connection")
    line += piece
data = memoryview(os.urandom(chunk))
start = time.perf_counter()
for _ in range(total // chunk):
    sock.sendall(data)
print(repr(start), flush=True)
sys.stdin.read()
"""


async def _host_to_guest(sockets: GuestSockets, base: str, total: int, chunk: int) -> float:
    """``chunk`` is the size of each host socket write (the rx buffers set the packet size)."""
    accepted = len(sockets.accepted)
    process = await anyio.open_process(
        [sys.executable, "-c", _HOST_WRITER, base, str(total), str(chunk)])
    async with process:
        try:
            with anyio.fail_after(60):
                # Connection setup is not timed: poll for the guest's accept.
                while len(sockets.accepted) == accepted and process.returncode is None:
                    await anyio.sleep(0.001)
                if len(sockets.accepted) == accepted:
                    raise RuntimeError("the host writer exited before connecting")
                conn = sockets.accepted[-1]
                got = 0
                while got < total:
                    got += len(conn.received)
                    conn.received.clear()
                    if got < total:
                        await conn.wait_changed()
                end = time.perf_counter()
                assert process.stdout is not None and process.stdin is not None
                out = b""
                while not out.endswith(b"\n"):
                    out += await process.stdout.receive()
                await process.stdin.aclose()
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
    return end - float(out)


async def _throughput(rows: list[dict[str, Any]], base: str, driver_factory: Any,
                      sizes: tuple[tuple[str, int, int], ...], suffix: str = "") -> None:
    for label, chunk, total in sizes:
        driver = await driver_factory()
        stack = GuestStack(driver, cid=3, buf_alloc=_GUEST_BUF)
        sockets = GuestSockets(stack, rx_buffers=128, rx_size=HEADER_SIZE + chunk)
        sockets.listen(1234)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sockets.pump)
            up = await _guest_to_host(sockets, base, total, chunk, 5000)
            down = await _host_to_guest(sockets, base, total, chunk)
            batched = (
                await _host_to_guest(sockets, base, total, 65536)
                if chunk < 65536 and not suffix else 0
            )
            tg.cancel_scope.cancel()
        await driver.reset()
        pair = _socketpair_seconds(total, chunk)
        gbit = total * 8 / 1e9
        rows.append(_row(f"vsock_guest_to_host_{label}{suffix}", gbit / up, "Gbit/s",
                         f"socketpair_{label}", gbit / pair))
        rows.append(_row(f"vsock_host_to_guest_{label}{suffix}", gbit / down, "Gbit/s",
                         f"socketpair_{label}", gbit / pair))
        if batched:
            rows.append(_row(f"vsock_host_to_guest_{label}_packets_64k_writes", gbit / batched,
                             "Gbit/s", f"socketpair_{label}", gbit / pair))


def _seqpacket_pair_seconds(count: int, size: int) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    message = os.urandom(size)
    buf = memoryview(bytearray(size + 1))

    def writer() -> None:
        for _ in range(count):
            a.send(message)

    thread = threading.Thread(target=writer)
    start = time.perf_counter()
    thread.start()
    for _ in range(count):
        b.recv_into(buf)
    thread.join()
    seconds = time.perf_counter() - start
    a.close()
    b.close()
    return seconds


#: The host application of the SEQPACKET guest -> host rows (a separate process): listens at the
#: path given, prints ``ready``, receives ``count`` messages of ``size`` bytes, prints the count
#: and the ``time.perf_counter()`` of the last one, and stays until its stdin closes.
_SEQ_READER = """
import os, socket, sys, time
path, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if os.path.exists(path):
    os.unlink(path)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
listener.bind(path)
listener.listen(1)
print("ready", flush=True)
sock, _ = listener.accept()
buf = memoryview(bytearray(size + 1))
good = 0
for _ in range(count):
    good += sock.recv_into(buf) == size
print(good, repr(time.perf_counter()), flush=True)
sys.stdin.read()
"""

#: The host application of the SEQPACKET host -> guest rows (a separate process): connects to
#: ``<base>_seqpacket``, sends ``CONNECT 1235`` as its first message, reads the OK message, prints
#: the ``time.perf_counter()`` at which it starts, sends ``count`` messages of ``size`` bytes and
#: stays until its stdin closes.
_SEQ_WRITER = """
import os, socket, sys, time
path, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.connect(path)
sock.send(b"CONNECT 1235\\n")
if not sock.recv(64).startswith(b"OK "):
    sys.exit("no OK from the device")
message = os.urandom(size)
print(repr(time.perf_counter()), flush=True)
for _ in range(count):
    sock.send(message)
sys.stdin.read()
"""


async def _seqpacket(rows: list[dict[str, Any]], base: str, driver_factory: Any) -> None:
    for label, size, count in (("64b", 64, 50_000), ("4k", 4096, 20_000)):
        driver = await driver_factory()
        stack = GuestStack(driver, cid=3, buf_alloc=_GUEST_BUF)
        sockets = GuestSockets(stack, rx_buffers=128, rx_size=HEADER_SIZE + 4096)
        sockets.listen(1235, sock_type=TYPE_SEQPACKET)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sockets.pump)
            # Guest -> host.
            process = await anyio.open_process(
                [sys.executable, "-c", _SEQ_READER, f"{base}_5100", str(count), str(size)])
            async with process:
                try:
                    assert process.stdout is not None and process.stdin is not None
                    out = bytearray()
                    with anyio.fail_after(120):
                        await _lines(process.stdout, out, 1)
                        conn = await sockets.connect(5100, 41000, TYPE_SEQPACKET)
                        message = os.urandom(size)
                        start = time.perf_counter()
                        await conn.send_messages([message] * count)
                        await _lines(process.stdout, out, 2)
                        await process.stdin.aclose()
                        await process.wait()
                finally:
                    if process.returncode is None:
                        process.kill()
            good, end = out.split(b"\n")[1].split()
            if int(good) != count:
                raise RuntimeError(f"host received {int(good)} of {count} whole messages")
            up = float(end) - start
            # Host -> guest.
            accepted = len(sockets.accepted)
            process = await anyio.open_process(
                [sys.executable, "-c", _SEQ_WRITER, f"{base}_seqpacket", str(count), str(size)])
            async with process:
                try:
                    with anyio.fail_after(120):
                        # Connection setup is not timed: poll for the guest's accept.
                        while len(sockets.accepted) == accepted and process.returncode is None:
                            await anyio.sleep(0.001)
                        if len(sockets.accepted) == accepted:
                            raise RuntimeError("the host writer exited before connecting")
                        conn = sockets.accepted[-1]
                        got = 0
                        while got < count:
                            got += sum(len(m) == size for m in conn.messages)
                            conn.messages.clear()
                            if got < count:
                                await conn.wait_changed()
                        end_down = time.perf_counter()
                        assert process.stdout is not None and process.stdin is not None
                        text = b""
                        while not text.endswith(b"\n"):
                            text += await process.stdout.receive()
                        await process.stdin.aclose()
                        await process.wait()
                finally:
                    if process.returncode is None:
                        process.kill()
            down = end_down - float(text)
            tg.cancel_scope.cancel()
        await driver.reset()
        pair = count / _seqpacket_pair_seconds(count, size)
        rows.append(_row(f"vsock_seqpacket_guest_to_host_{label}", count / up, "messages/s",
                         f"socketpair_seqpacket_{label}", pair))
        rows.append(_row(f"vsock_seqpacket_host_to_guest_{label}", count / down, "messages/s",
                         f"socketpair_seqpacket_{label}", pair))


async def _connections(rows: list[dict[str, Any]], base: str, driver_factory: Any) -> None:
    driver = await driver_factory()
    stack = GuestStack(driver, cid=3, buf_alloc=65536)
    sockets = GuestSockets(stack, rx_buffers=128, rx_size=HEADER_SIZE + 4096)
    sockets.listen(1234, echo=True)
    intact = 0
    ready = 0
    all_ready = anyio.Event()
    release = anyio.Event()

    async def client(i: int) -> None:
        nonlocal intact, ready
        stream = await anyio.connect_unix(base)
        async with stream:
            await stream.send(b"CONNECT 1234\n")
            line = bytearray()
            while not line.endswith(b"\n"):
                line += await stream.receive(1)
            payload = i.to_bytes(4, "little") * 256
            await stream.send(payload)
            echo = bytearray()
            while len(echo) < len(payload):
                echo += await stream.receive()
            intact += bytes(echo) == payload and line.startswith(b"OK ")
            ready += 1
            if ready == _CONNECTIONS:
                all_ready.set()
            await release.wait()

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sockets.pump)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as clients:
                for i in range(_CONNECTIONS):
                    clients.start_soon(client, i)
                await all_ready.wait()
                after = tracemalloc.take_snapshot()
                release.set()
        tg.cancel_scope.cancel()
    tracemalloc.stop()
    await driver.reset()

    def device_only(snapshot: tracemalloc.Snapshot) -> int:
        filt = [tracemalloc.Filter(True, "*devicehost_vsock*"),
                tracemalloc.Filter(False, "*guest_stack*")]
        return sum(s.size for s in snapshot.filter_traces(filt).statistics("filename"))

    device = (device_only(after) - device_only(before)) / _CONNECTIONS
    process = (sum(s.size for s in after.statistics("filename"))
               - sum(s.size for s in before.statistics("filename"))) / _CONNECTIONS
    rows.append(_row("vsock_1024_echo_connections", intact, "connections intact",
                     "connections_opened", _CONNECTIONS))
    rows.append(_row("vsock_device_bytes_per_connection", device, "bytes",
                     "target_100KiB", 100 * 1024))
    rows.append(_row("vsock_process_bytes_per_connection", process, "bytes",
                     "target_100KiB", 100 * 1024))


async def _main() -> list[dict[str, Any]]:
    workdir = tempfile.mkdtemp(prefix="dh-bv-")
    base = os.path.join(workdir, "vsock")
    wide_base = os.path.join(workdir, "wide")
    rows: list[dict[str, Any]] = []
    try:
        specs = [
            DeviceSpec("vsock", "vsock", VsockConfig(guest_cid=3, base_path=base)),
            DeviceSpec("vsock-wide", "vsock", VsockConfig(
                guest_cid=3, base_path=wide_base, tx_buffer_size=_WIDE_WINDOW)),
        ]
        async with host_with({"vsock": VsockDevice}, specs) as host:
            transport = host.transport(VirtioTransport)

            async def driver_factory() -> Any:
                return await transport.connect_driver("vsock", queue_size=256)

            async def wide_driver_factory() -> Any:
                return await transport.connect_driver("vsock-wide", queue_size=256)

            await _throughput(rows, base, driver_factory,
                              (("64k", 65536, 64 << 20), ("1k", 1024, 4 << 20)))
            await _throughput(rows, wide_base, wide_driver_factory, (("64k", 65536, 64 << 20),),
                              suffix=f"_window{_WIDE_WINDOW // 1024}k")
            await _seqpacket(rows, base, driver_factory)
            await _connections(rows, base, driver_factory)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def run() -> list[dict[str, Any]]:
    return anyio.run(_main)


if __name__ == "__main__":
    for row in run():
        print(row)
