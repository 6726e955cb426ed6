"""vsock served over vhost-user to a frontend written here (QEMU 7.2's message sequence): real
Unix socket, memfd guest memory, eventfd kicks and calls, two vrings (rx, tx), the CID from
GET_CONFIG, and data moving both ways through the device's Unix sockets."""

from __future__ import annotations

import os
import struct

import anyio
import pytest
from anyio.abc import UNIXSocketStream

from devicehost import DeviceState
from devicehost.memory import DmaAllocator, GuestMemory
from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.virtio import VERSION_1, DriverQueue, EventfdDoorbell, VirtioTransport
from devicehost.virtio.vhost_message import (
    F_NEED_REPLY,
    F_REPLY,
    F_VERSION,
    HEADER,
    USER_F_PROTOCOL_FEATURES,
    ConfigPayload,
    MemRegion,
    Request,
    VringAddr,
    VringState,
    encode_config,
    encode_mem_table,
    encode_message,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from devicehost_vsock import VsockConfig, VsockDevice
from devicehost_vsock.guest_stack import GuestStack
from devicehost_vsock.protocol import Op

pytestmark = pytest.mark.anyio

USER_BASE = 0x7F00_0000_0000


class MiniFrontend:
    """Just enough of a VMM: realize, start two vrings, stop."""

    def __init__(self, stream: UNIXSocketStream, memory: GuestMemory) -> None:
        self.stream = stream
        self.memory = memory
        self.allocator = DmaAllocator(memory)
        self.fds: list[int] = []
        self.queues: list[DriverQueue] = []

    def queue(self, index: int) -> DriverQueue:  # what GuestStack needs of a driver
        return self.queues[index]

    async def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None,
                   flags: int = F_VERSION) -> None:
        message = encode_message(request, payload, flags=flags)
        if fds:
            await self.stream.send_fds(message, fds)
        else:
            await self.stream.send(message)

    async def reply(self, request: int) -> bytes:
        raw = b""
        while len(raw) < HEADER.size:
            raw += await self.stream.receive(HEADER.size - len(raw))
        code, flags, size = HEADER.unpack(raw)
        assert (code, flags) == (request, F_VERSION | F_REPLY)
        data = b""
        while len(data) < size:
            data += await self.stream.receive(size - len(data))
        return data

    async def u64(self, request: int) -> int:
        await self.send(request)
        value: int = struct.unpack("<Q", await self.reply(request))[0]
        return value

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fds.append(fd)
        return fd

    async def realize(self) -> tuple[int, int, bytes]:
        features = await self.u64(Request.GET_FEATURES)
        protocol = await self.u64(Request.GET_PROTOCOL_FEATURES)
        await self.send(Request.SET_PROTOCOL_FEATURES, encode_u64(protocol))
        queue_num = await self.u64(Request.GET_QUEUE_NUM)
        await self.send(Request.SET_OWNER)
        await self.send(Request.GET_CONFIG, encode_config(ConfigPayload(0, 8, 0, bytes(8))))
        config = (await self.reply(Request.GET_CONFIG))[12:]
        return features, queue_num, config

    async def start(self, features: int) -> None:
        await self.send(Request.SET_FEATURES, encode_u64(features))
        (region,) = self.memory.regions
        assert region.fd is not None
        table = encode_mem_table([MemRegion(region.gpa, region.size, USER_BASE, region.offset)])
        await self.send(Request.SET_MEM_TABLE, table, [region.fd], F_VERSION | F_NEED_REPLY)
        assert await self.reply(Request.SET_MEM_TABLE) == encode_u64(0)
        self.queues = [DriverQueue(i, self.memory, self.allocator, 128, event_idx=False)
                       for i in range(2)]
        call_fds: list[int] = []
        for q in self.queues:
            kick_fd, call_fd = self.eventfd(), self.eventfd()
            q.kick_doorbell = EventfdDoorbell(kick_fd)
            q.call_doorbell = EventfdDoorbell(call_fd)
            call_fds.append(call_fd)
            lay = q.layout
            await self.send(Request.SET_VRING_NUM, encode_vring_state(VringState(q.index, 128)))
            await self.send(Request.SET_VRING_BASE, encode_vring_state(VringState(q.index, 0)))
            await self.send(Request.SET_VRING_ADDR, encode_vring_addr(VringAddr(
                q.index, 0, USER_BASE + lay.desc_gpa, USER_BASE + lay.used_gpa,
                USER_BASE + lay.avail_gpa, 0)))
            await self.send(Request.SET_VRING_KICK, encode_u64(q.index), [kick_fd])
        for q, call_fd in zip(self.queues, call_fds, strict=True):
            await self.send(Request.SET_VRING_ENABLE, encode_vring_state(VringState(q.index, 1)))
            await self.send(Request.SET_VRING_CALL, encode_u64(q.index), [call_fd])

    async def aclose(self) -> None:
        await self.stream.aclose()
        for fd in self.fds:
            os.close(fd)


async def test_vsock_over_vhost_user(sock_dir: str) -> None:
    base = f"{sock_dir}/vsock"
    config = VsockConfig(guest_cid=7, base_path=base, vhost_user_socket=f"{sock_dir}/vu.sock")
    memory = GuestMemory.memfd(8 * 1024 * 1024)
    try:
        spec = DeviceSpec("vsock", "vsock", config)
        async with host_with({"vsock": VsockDevice}, [spec]) as host:
            with anyio.fail_after(10):
                frontend = MiniFrontend(await anyio.connect_unix(f"{sock_dir}/vu.sock"), memory)
                features, queue_num, cid = await frontend.realize()
                assert queue_num == 2 and struct.unpack("<Q", cid) == (7,)
                assert features & 0x7 == 0x5  # STREAM | NO_IMPLIED_STREAM
                await frontend.start(1 << VERSION_1 | 1 << USER_F_PROTOCOL_FEATURES | 0x1)
                guest = GuestStack(frontend, cid=7)
                listener = await anyio.create_unix_listener(f"{base}_5000")
                guest.post_rx(4)
                guest.send(Op.REQUEST, 1024, 5000)
                assert (await guest.recv()).header.op == Op.RESPONSE
                peer = await listener.accept()
                guest.send(Op.RW, 1024, 5000, b"over vhost-user")
                received = b""
                while len(received) < 15:
                    received += await peer.receive()
                assert received == b"over vhost-user"
                await peer.send(b"and back")
                packet = await guest.recv_op(Op.RW)
                assert (packet.header.dst_cid, packet.data) == (7, b"and back")
                await peer.aclose()
                await listener.aclose()
                await frontend.stream.aclose()  # the VMM goes away: the device is closed
                backend = host.transport(VirtioTransport).vhost_user_backend("vsock")
                await backend.wait_finished(1)
                assert host.devices["vsock"].state is DeviceState.CLOSED
                assert not os.path.exists(base)
                await frontend.aclose()
    finally:
        memory.close()
