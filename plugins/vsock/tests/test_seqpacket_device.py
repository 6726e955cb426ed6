"""SEQPACKET end to end through the real device and real SOCK_SEQPACKET Unix sockets, driven by
the in-process virtio driver and by a vhost-user frontend (QEMU 7.2's sequence): messages of 0 and
1 bytes, exactly one rx buffer, many rx buffers and the maximum, both ways; boundaries under
interleaving; every error path; the host-initiated convention at ``<base_path>_seqpacket``."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import attrs
import pytest

from devicehost.memory import GuestMemory
from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.testing.vhost_user import VhostUserFrontend
from devicehost.virtio import VERSION_1, VirtioTransport
from devicehost.virtio.vhost_message import USER_F_PROTOCOL_FEATURES
from devicehost_vsock import VsockConfig, VsockDevice
from devicehost_vsock.guest_stack import GuestConnection, GuestSockets, GuestStack
from devicehost_vsock.protocol import HEADER_SIZE, TYPE_SEQPACKET, TYPE_STREAM

from .hostside import listen, read_to_eof, seq_accept, seq_connect, seq_listen, seq_recv, seq_send

pytestmark = pytest.mark.anyio

SEQ = TYPE_SEQPACKET
#: Linux's rx buffers: 4 KiB of payload after the header.
RX_PAYLOAD = 4096
#: The longest message either way: min(guest buf_alloc, the device's tx_buffer_size) = 64 KiB.
MAXIMUM = 65536
SIZES = [0, 1, RX_PAYLOAD, 5 * RX_PAYLOAD + 7, MAXIMUM]
ALL_FEATURES = 1 << VERSION_1 | 0x7  # STREAM | SEQPACKET | NO_IMPLIED_STREAM


@attrs.define
class Guest:
    sockets: GuestSockets
    base: str


def message(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@asynccontextmanager
async def open_guest(
    kind: str, sock_dir: str, features: int = ALL_FEATURES
) -> AsyncIterator[Guest]:
    base = f"{sock_dir}/vsock"
    vu = f"{sock_dir}/vu.sock" if kind == "vhost-user" else ""
    config = VsockConfig(guest_cid=3, base_path=base, vhost_user_socket=vu)
    async with host_with({"vsock": VsockDevice}, [DeviceSpec("vsock", "vsock", config)]) as host:
        if kind == "in-process":
            driver = await host.transport(VirtioTransport).connect_driver(
                "vsock", queue_size=256, features=features
            )
            stack = GuestStack(driver)
            async with run_pump(stack, base) as guest:
                yield guest
            await driver.reset()
            return
        memory = GuestMemory.memfd(32 << 20)
        try:
            with anyio.fail_after(10):
                frontend = await VhostUserFrontend.connect(vu, memory)
                await frontend.realize()
                await frontend.start(features | 1 << USER_F_PROTOCOL_FEATURES, queue_size=256)
            async with run_pump(GuestStack(frontend), base) as guest:
                yield guest
            # The VMM goes away; the backend sees the end of its stream before the host stops.
            await frontend.stream.aclose()
            with anyio.fail_after(10):
                await host.transport(VirtioTransport).vhost_user_backend("vsock").wait_finished(1)
            await frontend.aclose()
        finally:
            memory.close()


@asynccontextmanager
async def run_pump(stack: GuestStack, base: str) -> AsyncIterator[Guest]:
    sockets = GuestSockets(stack, rx_size=HEADER_SIZE + RX_PAYLOAD)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sockets.pump)
        # One round trip (a connect nobody answers but the device, with RST): the device is
        # open and running, its listeners bound.
        with anyio.fail_after(10), pytest.raises(ConnectionRefusedError):
            await sockets.connect(1, 1)
        yield Guest(sockets, base)
        tg.cancel_scope.cancel()


kinds = pytest.mark.parametrize("kind", ["in-process", "vhost-user"])


@kinds
async def test_messages_of_every_size_both_ways(kind: str, sock_dir: str) -> None:
    async with open_guest(kind, sock_dir) as guest:
        listener = seq_listen(f"{guest.base}_5000")
        with anyio.fail_after(30):
            conn = await guest.sockets.connect(5000, 1024, SEQ)
            host = await seq_accept(listener)
            sent = [message(size, i) for i, size in enumerate(SIZES)]
            await conn.send_messages(sent, chunk=RX_PAYLOAD)
            assert [await seq_recv(host) for _ in sent] == sent
            back = [message(size, 100 + i) for i, size in enumerate(SIZES)]
            for m in back:
                await seq_send(host, m)
            assert [await conn.recv_message() for _ in back] == back
        host.close()
        listener.close()


@kinds
async def test_boundaries_hold_with_interleaved_connections(kind: str, sock_dir: str) -> None:
    rng = random.Random(18)
    count, per_connection = 4, 40
    async with open_guest(kind, sock_dir) as guest:
        listener = seq_listen(f"{guest.base}_5000")
        plans = [[rng.randbytes(rng.choice([0, 1, 17, 4096, 9000, MAXIMUM]))
                  for _ in range(per_connection)] for _ in range(count)]
        with anyio.fail_after(60):
            conns: list[GuestConnection] = []
            hosts: list[socket.socket] = []
            for i in range(count):
                conns.append(await guest.sockets.connect(5000, 2000 + i, SEQ))
                hosts.append(await seq_accept(listener))
            got_host: list[list[bytes | None]] = [[] for _ in range(count)]
            got_guest: list[list[bytes]] = [[] for _ in range(count)]

            async def guest_side(i: int) -> None:
                for m in plans[i]:  # one message per send: they interleave with the others
                    await conns[i].send_messages([m], chunk=rng.choice([512, 4096, 65536]))
                got_guest[i] = [await conns[i].recv_message() for _ in plans[i]]

            async def host_side(i: int) -> None:
                for _ in plans[i]:
                    got_host[i].append(await seq_recv(hosts[i], 60))
                for m in reversed(plans[i]):
                    await seq_send(hosts[i], m)

            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(guest_side, i)
                    tg.start_soon(host_side, i)
        assert got_host == plans
        assert got_guest == [list(reversed(p)) for p in plans]
        for sock in hosts:
            sock.close()
        listener.close()


@kinds
async def test_type_mismatches_are_reset(kind: str, sock_dir: str) -> None:
    async with open_guest(kind, sock_dir) as guest:
        stream_listener = await listen(guest.base, 5000)  # a stream listener at _5000
        seq_listener = seq_listen(f"{guest.base}_5001")
        with anyio.fail_after(10):
            with pytest.raises(ConnectionRefusedError):
                await guest.sockets.connect(5000, 1024, SEQ)
            with pytest.raises(ConnectionRefusedError):
                await guest.sockets.connect(5001, 1025, TYPE_STREAM)
            # A host SEQPACKET CONNECT to a guest port that listens for streams: no OK, closed.
            guest.sockets.listen(7000)
            host = await seq_connect(f"{guest.base}_seqpacket")
            await seq_send(host, b"CONNECT 7000\n")
            assert await seq_recv(host) is None
        host.close()
        await stream_listener.aclose()
        seq_listener.close()


@kinds
async def test_host_initiated_seqpacket_connection(kind: str, sock_dir: str) -> None:
    async with open_guest(kind, sock_dir) as guest:
        guest.sockets.listen(7000, sock_type=SEQ)
        with anyio.fail_after(30):
            host = await seq_connect(f"{guest.base}_seqpacket")
            await seq_send(host, b"CONNECT 7000\n")
            assert await seq_recv(host) == b"OK 1073741824\n"
            conn = guest.sockets.accepted[-1]
            assert (conn.sock_type, conn.local_port, conn.peer_port) == (SEQ, 7000, 0x4000_0000)
            for size in SIZES:
                await seq_send(host, message(size, size))
            assert [await conn.recv_message() for _ in SIZES] == [message(s, s) for s in SIZES]
            await conn.send_messages([message(s, -s) for s in SIZES], chunk=RX_PAYLOAD)
            assert [await seq_recv(host) for _ in SIZES] == [message(s, -s) for s in SIZES]
        host.close()


@kinds
async def test_a_host_message_beyond_the_maximum_resets_the_connection(
    kind: str, sock_dir: str
) -> None:
    async with open_guest(kind, sock_dir) as guest:
        listener = seq_listen(f"{guest.base}_5000")
        with anyio.fail_after(30):
            conn = await guest.sockets.connect(5000, 1024, SEQ)
            host = await seq_accept(listener)
            await seq_send(host, message(MAXIMUM, 1))
            await seq_send(host, message(MAXIMUM + 1, 2))
            assert await conn.recv_message() == message(MAXIMUM, 1)
            while not conn.reset:
                await conn.wait_changed()
            # The device closed its end with the message unread: the host sees a reset.
            with pytest.raises(ConnectionResetError):
                await seq_recv(host)
            # The guest's own limit, as Linux: EMSGSIZE before anything is sent.
            other = await guest.sockets.connect(5000, 1025, SEQ)
            with pytest.raises(OSError, match="exceeds"):
                await other.send_messages([bytes(MAXIMUM + 1)])
        host.close()
        listener.close()


@kinds
async def test_seqpacket_not_negotiated(kind: str, sock_dir: str) -> None:
    async with open_guest(kind, sock_dir, features=1 << VERSION_1 | 0x1) as guest:
        seq_listener = seq_listen(f"{guest.base}_5000")
        with anyio.fail_after(10):
            with pytest.raises(ConnectionRefusedError):
                await guest.sockets.connect(5000, 1024, SEQ)
            guest.sockets.listen(7000, sock_type=SEQ)
            host = await seq_connect(f"{guest.base}_seqpacket")
            await seq_send(host, b"CONNECT 7000\n")
            assert await seq_recv(host) is None  # refused at once
            # Streams still work.
            stream_listener = await listen(guest.base, 5001)
            conn = await guest.sockets.connect(5001, 1025)
            peer = await stream_listener.accept()
            await conn.send_all(b"stream")
            await conn.shutdown()
            assert await read_to_eof(peer) == b"stream"
        host.close()
        seq_listener.close()
        await peer.aclose()
        await stream_listener.aclose()


async def test_seqpacket_false_offers_no_feature_and_no_listener(sock_dir: str) -> None:
    base = f"{sock_dir}/vsock"
    config = VsockConfig(base_path=base, seqpacket=False)
    async with host_with({"vsock": VsockDevice}, [DeviceSpec("vsock", "vsock", config)]) as host:
        driver = await host.transport(VirtioTransport).connect_driver("vsock")
        assert driver.features & 0x7 == 0x5
        assert os.path.exists(base) and not os.path.exists(f"{base}_seqpacket")
        await driver.reset()
