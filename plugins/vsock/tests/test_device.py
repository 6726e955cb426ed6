"""The 21 upstream integration behaviours (facts section 12), through the in-process driver,
real Unix sockets and the real device in a real host."""

from __future__ import annotations

import os
import random
import re
import socket
import struct

import anyio
import pytest
from anyio.abc import UNIXSocketStream

from devicehost_vsock.guest_stack import GuestSockets, GuestStack
from devicehost_vsock.hybrid import TEMPLATE_GUID
from devicehost_vsock.protocol import HEADER_SIZE, SHUTDOWN_RECEIVE, SHUTDOWN_SEND, Op

from .hosted import HostedGuest
from .hostside import listen, raw, read_exactly, read_line, read_to_eof

pytestmark = pytest.mark.anyio


def base(guest: HostedGuest) -> str:
    runner = guest.host.devices["vsock"].runner
    return str(runner.base_path)


async def guest_connect(guest: HostedGuest, local: int, port: int) -> None:
    guest.post_rx(1)
    guest.send(Op.REQUEST, local, port)
    packet = await guest.recv()
    assert packet.header.op == Op.RESPONSE, packet.header
    assert (packet.header.src_port, packet.header.dst_port) == (port, local)


async def test_config_returns_guest_cid(guest: HostedGuest) -> None:
    config = guest.driver.read_config(0, 4) + guest.driver.read_config(4, 4)
    low, high = struct.unpack("<II", config)
    assert low | high << 32 == 3


async def test_guest_connect_handshake(guest: HostedGuest) -> None:
    listener = await listen(base(guest), 5000)
    guest.post_rx(1)
    guest.send(Op.REQUEST, 1024, 5000)
    with anyio.fail_after(5):
        host = await listener.accept()
    packet = await guest.recv()
    h = packet.header
    assert (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (Op.RESPONSE, 2, 3, 5000, 1024)
    assert (h.buf_alloc, h.fwd_cnt, h.len, packet.written) == (65536, 0, 0, HEADER_SIZE)
    await host.aclose()
    await listener.aclose()


async def test_guest_to_host_data(guest: HostedGuest) -> None:
    listener = await listen(base(guest), 5001)
    await guest_connect(guest, 1024, 5001)
    host = await listener.accept()
    guest.send(Op.RW, 1024, 5001, b"hello from guest")
    assert await read_exactly(host, 16) == b"hello from guest"


async def test_host_to_guest_data(guest: HostedGuest) -> None:
    listener = await listen(base(guest), 5002)
    await guest_connect(guest, 1024, 5002)
    host = await listener.accept()
    await host.send(b"hello from host")
    guest.post_rx(1)
    packet = await guest.recv()
    assert packet.header.op == Op.RW and packet.header.len == 15
    assert packet.data == b"hello from host"
    assert packet.written == HEADER_SIZE + 15


async def test_bidirectional_echo(guest: HostedGuest) -> None:
    listener = await listen(base(guest), 5003)
    await guest_connect(guest, 1024, 5003)
    host = await listener.accept()
    guest.send(Op.RW, 1024, 5003, b"ping")
    await host.send(await read_exactly(host, 4))
    guest.post_rx(4)
    packet = await guest.recv_op(Op.RW)
    assert packet.data == b"ping"


async def test_connect_to_nonexistent_port_gets_rst(guest: HostedGuest) -> None:
    guest.post_rx(1)
    guest.send(Op.REQUEST, 1024, 9999)
    packet = await guest.recv()
    h = packet.header
    assert (h.op, h.src_port, h.dst_port, h.buf_alloc, h.fwd_cnt) == (Op.RST, 9999, 1024, 0, 0)


async def test_guest_connect_falls_back_to_guid_path(guest: HostedGuest) -> None:
    guid = "00001389-facb-11e6-bd58-64006a7986d3"  # port 5001
    listener = await anyio.create_unix_listener(f"{base(guest)}_{guid}")
    await guest_connect(guest, 1024, 5001)
    host = await listener.accept()
    guest.send(Op.RW, 1024, 5001, b"via guid")
    assert await read_exactly(host, 8) == b"via guid"


async def test_multiple_simultaneous_connections(guest: HostedGuest) -> None:
    la, lb = await listen(base(guest), 6000), await listen(base(guest), 6001)
    await guest_connect(guest, 1100, 6000)
    host_a = await la.accept()
    await guest_connect(guest, 1101, 6001)
    host_b = await lb.accept()
    guest.send(Op.RW, 1100, 6000, b"to A")
    guest.send(Op.RW, 1101, 6001, b"to B")
    assert await read_exactly(host_a, 4) == b"to A"
    assert await read_exactly(host_b, 4) == b"to B"
    await host_b.send(b"from B")
    guest.post_rx(4)
    packet = await guest.recv_op(Op.RW)
    assert (packet.header.src_port, packet.header.dst_port, packet.data) == (6001, 1101, b"from B")


async def test_multiple_connections_same_host_port(guest: HostedGuest) -> None:
    listener = await listen(base(guest), 7000)
    await guest_connect(guest, 2000, 7000)
    first = await listener.accept()
    await guest_connect(guest, 2001, 7000)
    second = await listener.accept()
    guest.send(Op.RW, 2001, 7000, b"second")
    guest.send(Op.RW, 2000, 7000, b"first")
    assert await read_exactly(first, 5) == b"first"
    assert await read_exactly(second, 6) == b"second"


@pytest.mark.parametrize(
    ("flags", "eof"),
    [(SHUTDOWN_SEND | SHUTDOWN_RECEIVE, True), (SHUTDOWN_SEND, True), (SHUTDOWN_RECEIVE, False)],
    ids=["guest_shutdown", "guest_shutdown_send_only", "guest_shutdown_receive_only"],
)
async def test_guest_shutdown(guest: HostedGuest, flags: int, eof: bool) -> None:
    listener = await listen(base(guest), 5010)
    await guest_connect(guest, 1024, 5010)
    host = await listener.accept()
    guest.send(Op.SHUTDOWN, 1024, 5010, flags=flags)
    if eof:
        assert await read_to_eof(host) == b""
    else:
        guest.send(Op.RW, 1024, 5010, b"still open")
        assert await read_exactly(host, 10) == b"still open"


async def test_large_payload_guest_to_host(guest: HostedGuest) -> None:
    listener = await listen(base(guest), 5011)
    await guest_connect(guest, 1024, 5011)
    host = await listener.accept()
    payload = os.urandom(4096)
    guest.send(Op.RW, 1024, 5011, payload)
    assert await read_exactly(host, 4096) == payload


async def host_connect(guest: HostedGuest, line: bytes, port: int) -> tuple[UNIXSocketStream, int]:
    stream = await anyio.connect_unix(base(guest))
    await stream.send(line)
    guest.post_rx(1)
    request = await guest.recv()
    h = request.header
    assert (h.op, h.dst_port, h.dst_cid, h.src_cid) == (Op.REQUEST, port, 3, 2)
    assert (h.buf_alloc, h.fwd_cnt) == (65536, 0)
    guest.send(Op.RESPONSE, port, h.src_port)
    return stream, h.src_port


async def test_host_connect_to_guest(guest: HostedGuest) -> None:
    stream, local = await host_connect(guest, b"CONNECT 8080\n", 8080)
    ok = await read_line(stream)
    match = re.fullmatch(rb"OK (\d+)\n", ok)
    assert match and int(match[1]) == local > 0
    await stream.send(b"host says hi")
    guest.post_rx(1)
    packet = await guest.recv()
    assert (packet.header.op, packet.data) == (Op.RW, b"host says hi")
    guest.send(Op.RW, 8080, local, b"guest says hi")
    assert await read_exactly(stream, 13) == b"guest says hi"


async def test_host_connect_to_guest_with_guid(guest: HostedGuest) -> None:
    stream, local = await host_connect(
        guest, b"CONNECT 00001f90-facb-11e6-bd58-64006a7986d3\n", 8080
    )
    ok = await read_line(stream)
    match = re.fullmatch(rb"OK ([0-9a-f]{8})(-[0-9a-f-]{27})\n", ok)
    assert match and match[2].decode() == TEMPLATE_GUID[8:]
    assert int(match[1], 16) == local != 0


async def test_host_connect_two_connections_get_different_ports(guest: HostedGuest) -> None:
    first, port_a = await host_connect(guest, b"CONNECT 9001\n", 9001)
    second, port_b = await host_connect(guest, b"connect 9002\n", 9002)
    ok_a, ok_b = await read_line(first), await read_line(second)
    assert ok_a == f"OK {port_a}\n".encode() and ok_b == f"OK {port_b}\n".encode()
    assert port_a != port_b and {port_a, port_b} == {0x4000_0000, 0x4000_0001}


async def test_guest_send_exercises_ring_buffer(guest: HostedGuest) -> None:
    listener = await listen(base(guest), 5020)
    await guest_connect(guest, 1024, 5020)
    host = await listener.accept()
    raw(host).setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = os.urandom(128 * 1024)
    with anyio.fail_after(5):
        # One packet per device pass: 128 separate 1 KiB socket writes, so the small host
        # buffers fill and the rest waits in the device's ring buffer.
        for i in range(128):
            guest.send(Op.RW, 1024, 5020, payload[i * 1024 : (i + 1) * 1024])
            while guest.txq.in_flight:
                await guest.txq.wait_used()
    guest.post_rx(1)
    first = await guest.recv()
    assert first.header.op == Op.CREDIT_UPDATE
    assert 0 < first.header.fwd_cnt < 131072
    assert await read_exactly(host, len(payload)) == payload
    last = first
    guest.post_rx(8)
    with anyio.fail_after(5):
        while last.header.fwd_cnt != 131072:
            last = await guest.recv()
            assert last.header.op == Op.CREDIT_UPDATE


async def test_host_send_respects_credit(guest: HostedGuest) -> None:
    listener = await listen(base(guest), 5030)
    await guest_connect(guest, 1024, 5030)
    host = await listener.accept()
    guest.post_rx(128)
    payload = os.urandom(16 * 6144)
    async with anyio.create_task_group() as tg:
        async def write_all() -> None:
            for i in range(16):
                await host.send(payload[i * 6144 : (i + 1) * 6144])

        tg.start_soon(write_all)
        got = bytearray()
        while True:
            packet = await guest.recv()
            if packet.header.op == Op.CREDIT_REQUEST:
                break
            assert packet.header.op == Op.RW
            got += packet.data
        assert len(got) == 65536
        await guest.expect_silence(0.1)
        guest.send(Op.CREDIT_UPDATE, 1024, 5030, fwd_cnt=65536)
        while len(got) < len(payload):
            packet = await guest.recv()
            assert packet.header.op == Op.RW
            got += packet.data
    assert bytes(got) == payload
    raw(host).shutdown(socket.SHUT_WR)
    end = await guest.recv()
    assert end.header.op == Op.SHUTDOWN and end.header.flags & SHUTDOWN_SEND
    await guest.expect_silence(0.1)


async def test_bounce_buffer_rx_fragmented_descriptor(guest: HostedGuest) -> None:
    listener = await listen(base(guest), 5040)
    await guest_connect(guest, 1024, 5040)
    host = await listener.accept()
    payload = bytes(range(256))
    await host.send(payload)
    guest.rxq.add(writable=[HEADER_SIZE + 128, 128], fragment=HEADER_SIZE + 128)
    guest.rxq.kick()
    packet = await guest.recv()
    assert packet.header.op == Op.RW and packet.data == payload


async def test_bounce_buffer_tx_fragmented_descriptor(guest: HostedGuest) -> None:
    listener = await listen(base(guest), 5041)
    await guest_connect(guest, 1024, 5041)
    host = await listener.accept()
    payload = os.urandom(256)
    guest.send_raw([guest.header(Op.RW, 1024, 5041, 256), payload[:128], payload[128:]])
    guest.send(Op.RW, 1024, 5041, payload, fragment=100)
    assert await read_exactly(host, 512) == payload + payload


async def test_host_shutdown(guest: HostedGuest) -> None:
    listener = await listen(base(guest), 5030)
    await guest_connect(guest, 1024, 5030)
    host = await listener.accept()
    raw(host).shutdown(socket.SHUT_WR)
    guest.post_rx(4)
    packet = await guest.recv()
    h = packet.header
    assert (h.op, h.src_port, h.dst_port) == (Op.SHUTDOWN, 5030, 1024)
    assert h.flags == SHUTDOWN_SEND
    # Not fully closed: no RST, however long we wait (the graceful timer has not started).
    await guest.expect_silence(0.5)
    raw(host).shutdown(socket.SHUT_RDWR)
    start = anyio.current_time()
    rst = await guest.recv(timeout=5)
    assert (rst.header.op, rst.header.src_port, rst.header.dst_port) == (Op.RST, 5030, 1024)
    assert anyio.current_time() - start >= 1.9


async def test_stress_echo(guest: HostedGuest) -> None:
    sockets = GuestSockets(guest, rx_buffers=64)
    sockets.listen(1234, echo=True)
    rng = random.Random(7)

    async def client() -> None:
        stream = await anyio.connect_unix(base(guest))
        await stream.send(b"CONNECT 1234\n")
        assert (await read_line(stream, timeout=10)).startswith(b"OK ")
        for _ in range(rng.randint(1, 8)):
            chunk = rng.randbytes(16384)
            await stream.send(chunk)
            assert await read_exactly(stream, len(chunk), timeout=10) == chunk
        await stream.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sockets.pump)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as clients:
                for _ in range(10):
                    clients.start_soon(client)
        tg.cancel_scope.cancel()
    assert len(sockets.accepted) == 10


async def test_guest_sockets_receive_many_windows_with_batched_credit(guest: HostedGuest) -> None:
    # The guest advertises 64 KiB and tells its fwd_cnt once per receive pass: 1 MiB must still
    # arrive intact, every window reopened by a CREDIT_UPDATE (asked for or not).
    listener = await listen(base(guest), 5020)
    sockets = GuestSockets(guest, rx_buffers=16, rx_size=HEADER_SIZE + 4096)
    payload = os.urandom(1 << 20)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sockets.pump)
        with anyio.fail_after(20):
            conn = await sockets.connect(5020, 1024)
            host = await listener.accept()

            async def host_writes() -> None:
                await host.send(payload)

            tg.start_soon(host_writes)
            assert await conn.recv_exactly(len(payload)) == payload
            sent = bytes(1 << 17)
            tg.start_soon(conn.send_all, sent, 1024)  # and the other way, 1 KiB packets
            assert await read_exactly(host, len(sent), timeout=20) == sent
        tg.cancel_scope.cancel()
    assert conn.rx_cnt == len(payload) and not conn.reset
    await host.aclose()
    await listener.aclose()


# ----------------------------------------------------------------------- device identity


def test_offer_config_space_and_config_validation() -> None:
    from devicehost_vsock import VsockConfig, VsockDevice

    device = VsockDevice(VsockConfig(guest_cid=0x0102_0304))
    traits = device.traits()
    # STREAM | SEQPACKET | NO_IMPLIED_STREAM; without SEQPACKET when configured off.
    assert (traits.device_id, traits.device_features, traits.queue_count) == (19, 0x7, 3)
    off = VsockDevice(VsockConfig(seqpacket=False)).traits()
    assert off.device_features == 0x5
    with pytest.raises(TypeError, match="seqpacket"):
        VsockConfig(seqpacket="yes")  # type: ignore[arg-type]  # wrong types rejected at runtime
    assert traits.config == struct.pack("<Q", 0x0102_0304)
    assert device.virtio_config_read(0, 4) == b"\x04\x03\x02\x01"
    assert device.virtio_config_read(4, 4) == b"\0\0\0\0"
    assert device.virtio_config_read(6, 4) == b"\0\0\0\0"
    assert device.virtio_config_read(8, 4) == b"\0\0\0\0"
    device.virtio_config_write(0, b"\x09")
    assert device.virtio_config_read(0, 1) == b"\x04"
    assert VsockDevice(VsockConfig(vhost_user_socket="/x")).traits().queue_count == 2
    for bad in (0, 1, 2, 2**32 - 1, -3):
        with pytest.raises(ValueError, match="guest_cid"):
            VsockConfig(guest_cid=bad)
    assert VsockConfig().tx_buffer_size == 65536  # upstream's TX_BUF_SIZE
    for good in (4096, 262144, 16 << 20):
        assert VsockConfig(tx_buffer_size=good).tx_buffer_size == good
    for bad_size in (0, 2048, 65535, 65536 + 4096, 32 << 20, True, "65536"):
        with pytest.raises(ValueError, match="tx_buffer_size"):
            VsockConfig(tx_buffer_size=bad_size)  # type: ignore[arg-type]  # wrong types rejected at runtime
    assert VsockConfig().connect_timeout == 2.0  # upstream's CONNECTION_TIMEOUT
    assert VsockConfig(connect_timeout=0.25).connect_timeout == 0.25
    for bad_timeout in (0, -1, 3601, True, "2"):
        with pytest.raises(ValueError, match="connect_timeout must be a number of seconds"):
            VsockConfig(connect_timeout=bad_timeout)  # type: ignore[arg-type]
    # Connections, two listeners, epoll, connections being refused while no driver is there.
    assert VsockDevice.max_fds(VsockConfig()) == 1024 + 3 + 64
    assert VsockDevice.max_fds(VsockConfig(seqpacket=False)) == 1024 + 2 + 64


async def test_configured_tx_buffer_size_through_the_device(sock_dir: str) -> None:
    from devicehost.testing import host_with
    from devicehost.testing.registry import DeviceSpec
    from devicehost.virtio import VirtioTransport
    from devicehost_vsock import VsockConfig, VsockDevice

    size = 256 * 1024
    config = VsockConfig(base_path=f"{sock_dir}/vsock", tx_buffer_size=size)
    async with host_with({"vsock": VsockDevice}, [DeviceSpec("vsock", "vsock", config)]) as host:
        driver = await host.transport(VirtioTransport).connect_driver("vsock", queue_size=256)
        guest = GuestStack(driver)
        listener = await listen(f"{sock_dir}/vsock", 5000)
        guest.post_rx(1)
        guest.send(Op.REQUEST, 1024, 5000)
        response = (await guest.recv()).header
        assert (response.op, response.buf_alloc) == (Op.RESPONSE, size)
        host_side = await listener.accept()
        payload = os.urandom(size)  # one RW as long as the configured window
        guest.post_rx(4)
        guest.send(Op.RW, 1024, 5000, payload)
        assert await read_exactly(host_side, size) == payload
        update = (await guest.recv_op(Op.CREDIT_UPDATE)).header
        while update.fwd_cnt != size:  # the socket may have taken the payload in two writes
            assert update.buf_alloc == size
            update = (await guest.recv_op(Op.CREDIT_UPDATE)).header
        assert update.buf_alloc == size
        info = await host.devices["vsock"].inspect()
        assert info["device"]["tx_buffer_size"] == size
        await host_side.aclose()
        await listener.aclose()
        await driver.reset()


async def refused_promptly(path: str, line: bytes) -> None:
    """A CONNECT through ``path`` is read and closed without OK well before the 2 s connect
    timeout would have closed it."""
    with anyio.fail_after(1.5):
        stream = await anyio.connect_unix(path)
        await stream.send(line)
        assert await read_to_eof(stream) == b""
        await stream.aclose()


async def test_stream_feature_rule_and_restart(sock_dir: str) -> None:
    from devicehost import DeviceError, DeviceState
    from devicehost.testing import host_with
    from devicehost.testing.registry import DeviceSpec
    from devicehost.virtio import VERSION_1, VirtioTransport
    from devicehost_vsock import VsockConfig, VsockDevice

    config = VsockConfig(base_path=f"{sock_dir}/vsock")
    async with host_with({"vsock": VsockDevice}, [DeviceSpec("vsock", "vsock", config)]) as host:
        transport = host.transport(VirtioTransport)
        # The listener exists as soon as the device is served; with no driver a CONNECT is
        # refused promptly, as when no guest listens (issue 17 item 4).
        await refused_promptly(f"{sock_dir}/vsock", b"CONNECT 1\n")
        with pytest.raises(DeviceError, match="does not support stream sockets"):
            await transport.connect_driver("vsock", features=1 << VERSION_1 | 0x4)
        await refused_promptly(f"{sock_dir}/vsock", b"CONNECT 1\n")
        device = host.devices["vsock"]
        for _ in range(2):  # each start gets a fresh table: port allocation starts over
            driver = await transport.connect_driver("vsock", features=1 << VERSION_1)
            guest = GuestStack(driver)
            stream = await anyio.connect_unix(f"{sock_dir}/vsock")
            await stream.send(b"CONNECT 1\n")
            guest.post_rx(1)
            assert (await guest.recv()).header.src_port == 0x4000_0000
            info = await device.inspect()
            assert info["device"]["connections"] == 1 and info["device"]["guest_cid"] == 3
            await driver.reset()
            assert device.state is DeviceState.CLOSED
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await stream.receive()
            # The listener stays, refusing again until the next driver starts the device.
            await refused_promptly(f"{sock_dir}/vsock", b"CONNECT 1\n")
    assert not os.path.exists(f"{sock_dir}/vsock")  # removed when the host stopped


async def test_header_only_rx_buffer_waits_for_a_control_packet(guest: HostedGuest) -> None:
    """Issue 14 (13): with a connection established and no host data, a 44-byte rx buffer is
    not completed empty; it carries the next control packet."""
    listener = await listen(base(guest), 5050)
    await guest_connect(guest, 1024, 5050)
    with anyio.fail_after(5):
        host = await listener.accept()
    guest.post_rx(1, size=HEADER_SIZE)
    await guest.expect_silence(0.3)
    guest.send(Op.CREDIT_REQUEST, 1024, 5050)
    packet = await guest.recv()
    assert (packet.header.op, packet.written) == (Op.CREDIT_UPDATE, HEADER_SIZE)
    await host.aclose()
    await listener.aclose()


def test_stale_connections_keep_only_well_formed_entries() -> None:
    from devicehost_vsock.device import stale_connections

    assert stale_connections(None) == []
    assert stale_connections({"a": 1}) == []
    good = [[5000, 1024, 1], [0x4000_0000, 7000, 2]]
    bad = [[1, 2], [1, 2, 3], [-1, 2, 1], [1 << 32, 2, 1], ["1", 2, 1], [1, 2, True], 7]
    assert stale_connections([*bad, *good]) == [(5000, 1024, 1), (0x4000_0000, 7000, 2)]
    assert len(stale_connections([[1, 2, 1]] * 5000)) == 1024
