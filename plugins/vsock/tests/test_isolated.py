"""vsock in a worker process (``isolation = "process"``): the data path stays in the worker, and
a worker that dies mid-stream costs the guest only the connections it held.

Over vhost-user the test kit's front-end drives the device as QEMU 7.2 does (two vrings, the
event queue stays in the "VMM"); in process the driver gives it three queues, and the device
sends TRANSPORT_RESET after a restart instead of one RST per connection.
"""

from __future__ import annotations

import hashlib
import os
import signal
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from devicehost import DeviceState
from devicehost.host import Host
from devicehost.memory import GuestMemory
from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.testing.vhost_user import VhostUserFrontend
from devicehost.virtio import VERSION_1, VirtioTransport
from devicehost.virtio.vhost_message import (
    USER_F_PROTOCOL_FEATURES,
    ConfigPayload,
    Request,
    encode_config,
)
from devicehost.worker import WorkerSettings
from devicehost.worker.proxy import WorkerProxy
from devicehost_vsock import VsockConfig, VsockDevice
from devicehost_vsock.guest_stack import GuestConnection, GuestSockets, GuestStack
from devicehost_vsock.protocol import EVENT_TRANSPORT_RESET, Op

pytestmark = pytest.mark.anyio

CID = 5
#: STREAM | NO_IMPLIED_STREAM: what the guest stack speaks (plus VERSION_1 and the protocol bit).
FEATURES = 1 << VERSION_1 | 1 << USER_F_PROTOCOL_FEATURES | 0b101


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes that differ with ``seed`` and position (a checksum catches any mix-up)."""
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def worker_pid(host: Host) -> int:
    proxy = host.devices["vsock"].pm.get_plugin("vsock")
    assert isinstance(proxy, WorkerProxy) and proxy.worker is not None
    pid = proxy.worker.pid
    assert pid != os.getpid()
    return pid


def spec(sock_dir: str, *, vhost_user: bool) -> DeviceSpec:
    config = VsockConfig(guest_cid=CID, base_path=f"{sock_dir}/vsock", seqpacket=False,
                         vhost_user_socket=f"{sock_dir}/vu.sock" if vhost_user else "")
    return DeviceSpec("vsock", "vsock", config,
                      worker=WorkerSettings(isolation="process", restart="on-failure"))


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.memfd(32 << 20)
    yield mem
    mem.close()


@asynccontextmanager
async def vhost_user_guest(
    host: Host, sock_dir: str, memory: GuestMemory
) -> AsyncIterator[tuple[VhostUserFrontend, GuestSockets]]:
    """The test kit's VMM connected and started, and a guest socket layer pumping its rings."""
    frontend = await VhostUserFrontend.connect(f"{sock_dir}/vu.sock", memory)
    try:
        await frontend.realize()
        assert frontend.queue_count == 2
        await frontend.start(FEATURES, queue_size=256)
        sockets = GuestSockets(GuestStack(frontend, cid=CID), rx_buffers=64)
        async with anyio.create_task_group() as tg:
            tg.start_soon(sockets.pump)
            yield frontend, sockets
            tg.cancel_scope.cancel()
    finally:
        await frontend.aclose()


async def _read_exactly(stream: anyio.abc.ByteStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        data += await stream.receive(min(1 << 20, size - len(data)))
    return bytes(data)


async def _move_both_ways(sockets: GuestSockets, sock_dir: str, port: int, local: int,
                          size: int) -> None:
    """Open a guest connection to host port ``port`` and move ``size`` checksummed bytes each
    way through it."""
    async with await anyio.create_unix_listener(f"{sock_dir}/vsock_{port}") as listener:
        conn = await sockets.connect(port, local)
        host_side = await listener.accept()
        async with host_side:
            up, down = pattern(local, size), pattern(local + 1, size)
            got: list[bytes] = []

            async def host_reads() -> None:
                got.append(await _read_exactly(host_side, size))

            async with anyio.create_task_group() as tg:
                tg.start_soon(host_reads)
                tg.start_soon(conn.send_all, up)
                await host_side.send(down)
                back = await conn.recv_exactly(size)
            assert hashlib.sha256(got[0]).digest() == hashlib.sha256(up).digest()
            assert hashlib.sha256(back).digest() == hashlib.sha256(down).digest()


async def test_data_moves_both_ways_with_the_device_in_a_worker(
    sock_dir: str, memory: GuestMemory
) -> None:
    async with host_with({"vsock": VsockDevice}, [spec(sock_dir, vhost_user=True)]) as host:
        with anyio.fail_after(60):
            async with vhost_user_guest(host, sock_dir, memory) as (_, sockets):
                pid = worker_pid(host)
                await _move_both_ways(sockets, sock_dir, 5000, 1024, 4 << 20)
                # Host-initiated: a host program connects through the device's listener, which
                # lives in the worker.
                sockets.listen(6000)
                client = await anyio.connect_unix(f"{sock_dir}/vsock")
                await client.send(b"CONNECT 6000\n")
                ok = await client.receive()
                assert ok.startswith(b"OK ")
                await client.aclose()
                tree = await host.devices["vsock"].inspect()
                assert tree["device"]["worker"]["pid"] == pid and tree["device"]["worker"]["alive"]
                assert tree["device"]["guest_cid"] == CID and tree["device"]["open"]


async def _stream_until_reset(conn: GuestConnection, sent: list[int]) -> None:
    chunk = pattern(99, 256 << 10)
    try:
        while True:
            await conn.send_all(chunk)
            sent[0] += len(chunk)
    except ConnectionResetError:
        return


async def test_a_worker_killed_mid_stream_resets_the_guest_connections_only(
    sock_dir: str, memory: GuestMemory
) -> None:
    """SIGKILL the worker while a guest connection streams to the host: the VMM connection
    stays, the guest gets an RST for that connection (and for an idle one), and a new connection
    moves data intact through the restarted worker."""
    async with host_with({"vsock": VsockDevice}, [spec(sock_dir, vhost_user=True)]) as host:
        backend = host.transport(VirtioTransport).vhost_user_backend("vsock")
        with anyio.fail_after(90):
            async with vhost_user_guest(host, sock_dir, memory) as (frontend, sockets):
                listener = await anyio.create_unix_listener(f"{sock_dir}/vsock_5000")
                idle = await sockets.connect(5000, 2000)
                idle_peer = await listener.accept()
                busy = await sockets.connect(5000, 2001)
                busy_peer = await listener.accept()
                pid = worker_pid(host)
                sent = [0]
                received = 0
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_stream_until_reset, busy, sent)
                    while received < 1 << 20:  # mid-stream: the host has taken 1 MiB
                        received += len(await busy_peer.receive())
                    os.kill(pid, signal.SIGKILL)
                    # The host side of the dead worker's connections ends with the worker.
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        while True:
                            await busy_peer.receive()
                # The streaming send ended with a reset: the restarted worker sent RSTs.
                assert busy.reset and sent[0] >= 0
                while not idle.reset:
                    await idle.wait_changed()
                assert (2000, 5000) not in sockets.connections
                assert (2001, 5000) not in sockets.connections
                await idle_peer.aclose()
                await busy_peer.aclose()
                await listener.aclose()
                # Same VMM connection: never dropped, no new one.
                assert backend.connections == 1 and backend.finished == 0
                assert backend.session is not None
                assert worker_pid(host) != pid
                assert host.devices["vsock"].state is DeviceState.RUNNING
                await _move_both_ways(sockets, sock_dir, 5001, 3000, 8 << 20)
                tree = await host.devices["vsock"].inspect()
                assert tree["device"]["worker"]["restarts"] == 1
                assert "SIGKILL" in tree["device"]["worker"]["last_failure"]
                # The front-end's connection is still served: a config read is answered.
                cfg = await frontend.call(Request.GET_CONFIG,
                                          encode_config(ConfigPayload(0, 8, 0, bytes(8))))
                assert cfg[12:] == CID.to_bytes(8, "little")


async def test_in_process_driver_with_a_worker_gets_transport_reset(sock_dir: str) -> None:
    """The in-process driver (three queues, the device owns the event queue) with the device in
    a worker: eventfd doorbells, and after a SIGKILL one TRANSPORT_RESET event, then new
    connections work."""
    async with host_with({"vsock": VsockDevice}, [spec(sock_dir, vhost_user=False)]) as host:
        with anyio.fail_after(60):
            transport = host.transport(VirtioTransport)
            driver = await transport.connect_driver("vsock", features=(1 << VERSION_1) | 0b101)
            assert len(driver.queues) == 3
            stack = GuestStack(driver, cid=CID)
            stack.post_events(2)
            sockets = GuestSockets(stack, rx_buffers=64)
            async with anyio.create_task_group() as tg:
                tg.start_soon(sockets.pump)
                await _move_both_ways(sockets, sock_dir, 5000, 1024, 1 << 20)
                listener = await anyio.create_unix_listener(f"{sock_dir}/vsock_5002")
                held = await sockets.connect(5002, 4000)
                peer = await listener.accept()
                os.kill(worker_pid(host), signal.SIGKILL)
                assert await stack.recv_event(timeout=30) == EVENT_TRANSPORT_RESET
                sockets.reset_all()  # what the guest kernel does on the event
                assert held.reset
                await peer.aclose()
                await listener.aclose()
                await _move_both_ways(sockets, sock_dir, 5001, 1100, 1 << 20)
                tg.cancel_scope.cancel()
            await driver.reset()


def _worker_fds_and_maps(pid: int) -> tuple[int, int]:
    return (len(os.listdir(f"/proc/{pid}/fd")),
            sum(1 for line in open(f"/proc/{pid}/maps") if "memfd:" in line))


async def test_the_worker_releases_the_queues_of_a_closed_device(
    sock_dir: str, memory: GuestMemory
) -> None:
    """A VMM that stops and starts its device again and again (vhost-user GET_VRING_BASE, then
    the rings anew) leaves the worker with no more descriptors or guest memory mappings than
    after the first time: what each open's queues held is released at the device's close."""
    async with host_with({"vsock": VsockDevice}, [spec(sock_dir, vhost_user=True)]) as host:
        backend = host.transport(VirtioTransport).vhost_user_backend("vsock")
        with anyio.fail_after(60):
            frontend = await VhostUserFrontend.connect(f"{sock_dir}/vu.sock", memory)
            try:
                await frontend.realize()
                counts: list[tuple[int, int]] = []
                device = host.devices["vsock"]
                for _ in range(4):
                    await frontend.start(FEATURES, queue_size=64)
                    await frontend.get_u64(Request.GET_FEATURES)  # every message applied
                    assert device.state.value == "running"
                    await frontend.stop()
                    await frontend.get_u64(Request.GET_FEATURES)  # the close has been applied
                    assert device.state.value == "closed"
                    counts.append(_worker_fds_and_maps(worker_pid(host)))
                assert counts[1:] == counts[:1] * 3, counts
                assert counts[0][1] == 0  # no guest memory mapped in the worker while closed
                assert backend.connections == 1
            finally:
                await frontend.aclose()


async def test_get_vring_base_answers_where_the_worker_stopped(
    sock_dir: str, memory: GuestMemory
) -> None:
    """QEMU stops the device (GET_VRING_BASE) and starts it again at the bases it got: with the
    device in a worker those are the used indexes in guest memory (the worker's own position is
    never taken from it), and the device resumes there: no old chain is seen again."""
    async with host_with({"vsock": VsockDevice}, [spec(sock_dir, vhost_user=True)]) as host:
        with anyio.fail_after(60):
            frontend = await VhostUserFrontend.connect(f"{sock_dir}/vu.sock", memory)
            try:
                await frontend.realize()
                await frontend.start(FEATURES, queue_size=64)
                stack = GuestStack(frontend, cid=CID)
                async with await anyio.create_unix_listener(f"{sock_dir}/vsock_5000") as listener:
                    stack.post_rx(8)
                    stack.send(Op.REQUEST, 1024, 5000)
                    assert (await stack.recv()).header.op == Op.RESPONSE
                    peer = await listener.accept()
                    for word in (b"one", b"two", b"three"):
                        stack.send(Op.RW, 1024, 5000, word)
                    assert await _read_exactly(peer, 11) == b"onetwothree"
                    await peer.aclose()
                    bases = await frontend.stop()
                    used = tuple(struct.unpack("<H", memory.read(q.layout.used_gpa + 2, 2))[0]
                                 for q in frontend.queues)
                    # rx: the RESPONSE and what followed (credit, the host's close); tx: four
                    assert bases == used and bases[0] >= 1 and bases[1] == 4
                    while stack.try_recv() is not None:  # what the device sent before the stop
                        pass
                    await frontend.start(FEATURES, queue_size=64, bases=bases)
                    await frontend.get_u64(Request.GET_FEATURES)
                    assert host.devices["vsock"].state.value == "running"
                    stack.send(Op.REQUEST, 1025, 5000)
                    # The first packet after the restart answers the new REQUEST: no old tx chain
                    # (the first REQUEST, the RWs) was handled again.
                    response = await stack.recv()
                    assert (response.header.op, response.header.dst_port) == (Op.RESPONSE, 1025)
                    peer = await listener.accept()
                    stack.send(Op.RW, 1025, 5000, b"after the restart")
                    assert await _read_exactly(peer, 17) == b"after the restart"
                    await peer.aclose()
            finally:
                await frontend.aclose()
