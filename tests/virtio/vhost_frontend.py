"""A vhost-user frontend written for the tests: what QEMU 7.2 does, over a real Unix socket.

Guest memory is a memfd shared with the backend through SET_MEM_TABLE; the rings are laid out by
the guest-side :class:`DriverQueue`; kicks and calls are real eventfds. The VMM's "virtual
address" of guest memory is a made-up base, so the backend must translate SET_VRING_ADDR.
"""

from __future__ import annotations

import os
import struct

import anyio
import anyio.abc

from devicehost.memory import DmaAllocator, GuestMemory
from devicehost.virtio import DriverQueue, EventfdDoorbell
from devicehost.virtio.vhost_message import (
    F_NEED_REPLY,
    F_REPLY,
    F_VERSION,
    HEADER,
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

USER_BASE = 0x7F12_3400_0000
MEMORY_SIZE = 8 * 1024 * 1024


class Frontend:
    def __init__(
        self, stream: anyio.abc.SocketStream, memory: GuestMemory,
        allocator: DmaAllocator | None = None,
    ) -> None:
        self.stream = stream
        self.memory = memory
        self.allocator = allocator or DmaAllocator(memory)
        self.queues: list[DriverQueue] = []
        self.own_fds: list[int] = []

    @classmethod
    async def connect(
        cls, path: str, memory: GuestMemory, allocator: DmaAllocator | None = None
    ) -> Frontend:
        return cls(await anyio.connect_unix(path), memory, allocator)

    def user_addr(self, gpa: int) -> int:
        """The VMM's virtual address of ``gpa``: the memfd is mapped whole at USER_BASE."""
        for r in self.memory.regions:
            if r.gpa <= gpa < r.end:
                return USER_BASE + r.offset + gpa - r.gpa
        raise AssertionError(f"gpa {gpa:#x} is not guest memory")

    async def aclose(self) -> None:
        await self.stream.aclose()
        for q in self.queues:
            assert isinstance(q.kick_doorbell, EventfdDoorbell)
            q.kick_doorbell.close()
            assert isinstance(q.call_doorbell, EventfdDoorbell)
            q.call_doorbell.close()
        for fd in self.own_fds:
            os.close(fd)
        self.own_fds.clear()

    async def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            data += await self.stream.receive(n - len(data))
        return data

    async def send(
        self, request: int, payload: bytes = b"", fds: list[int] | None = None, *,
        flags: int = F_VERSION,
    ) -> None:
        message = encode_message(request, payload, flags=flags)
        if fds:
            await self.stream.send_fds(message, fds)  # type: ignore[attr-defined]
        else:
            await self.stream.send(message)

    async def reply(self, request: int) -> bytes:
        code, flags, size = HEADER.unpack(await self._recv_exact(HEADER.size))
        assert (code, flags) == (request, F_VERSION | F_REPLY)
        return await self._recv_exact(size)

    async def call(self, request: int, payload: bytes = b"") -> bytes:
        await self.send(request, payload)
        return await self.reply(request)

    async def get_u64(self, request: int) -> int:
        value: int = struct.unpack("<Q", await self.call(request))[0]
        return value

    async def realize(self) -> tuple[int, bytes]:
        """QEMU 7.2's device-realize sequence; returns (features, 8 config bytes)."""
        features = await self.get_u64(Request.GET_FEATURES)
        protocol = await self.get_u64(Request.GET_PROTOCOL_FEATURES)
        await self.send(Request.SET_PROTOCOL_FEATURES, encode_u64(protocol))
        assert await self.get_u64(Request.GET_QUEUE_NUM) == 2
        await self.send(Request.SET_OWNER)
        assert await self.get_u64(Request.GET_FEATURES) == features
        for i in range(2):
            for request in (Request.SET_VRING_CALL, Request.SET_VRING_ERR):
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.own_fds.append(fd)
                await self.send(request, encode_u64(i), [fd])
        cfg = await self.call(Request.GET_CONFIG, encode_config(ConfigPayload(0, 8, 0, bytes(8))))
        assert cfg[:12] == struct.pack("<III", 0, 8, 0)
        return features, cfg[12:]

    async def start(self, features: int, queue_size: int = 128, bases: tuple[int, ...] = (0, 0),
                    *, event_idx: bool = False) -> None:
        """QEMU 7.2 at DRIVER_OK: features, memory table (need_reply), vrings, enable, call."""
        await self.send(Request.SET_FEATURES, encode_u64(features))
        regions = self.memory.regions
        table = encode_mem_table(
            [MemRegion(r.gpa, r.size, USER_BASE + r.offset, r.offset) for r in regions]
        )
        fds = [r.fd for r in regions if r.fd is not None]
        await self.send(Request.SET_MEM_TABLE, table, fds, flags=F_VERSION | F_NEED_REPLY)
        assert struct.unpack("<Q", await self.reply(Request.SET_MEM_TABLE)) == (0,)
        if not self.queues:
            self.queues = [DriverQueue(i, self.memory, self.allocator, queue_size,
                                       event_idx=event_idx) for i in range(2)]
        for q, base in zip(self.queues, bases, strict=True):
            for old in (q.kick_doorbell, q.call_doorbell):
                if isinstance(old, EventfdDoorbell):
                    old.close()
            q.kick_doorbell = EventfdDoorbell(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            q.call_doorbell = EventfdDoorbell(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            lay = q.layout
            await self.send(Request.SET_VRING_NUM, encode_vring_state(VringState(q.index, q.size)))
            await self.send(Request.SET_VRING_BASE, encode_vring_state(VringState(q.index, base)))
            addr = VringAddr(q.index, 0, self.user_addr(lay.desc_gpa),
                             self.user_addr(lay.used_gpa), self.user_addr(lay.avail_gpa), 0)
            await self.send(Request.SET_VRING_ADDR, encode_vring_addr(addr))
            assert isinstance(q.kick_doorbell, EventfdDoorbell) and q.kick_doorbell.fd is not None
            await self.send(Request.SET_VRING_KICK, encode_u64(q.index), [q.kick_doorbell.fd])
        for q in self.queues:
            await self.send(Request.SET_VRING_ENABLE, encode_vring_state(VringState(q.index, 1)))
        for q in self.queues:
            assert isinstance(q.call_doorbell, EventfdDoorbell) and q.call_doorbell.fd is not None
            await self.send(Request.SET_VRING_CALL, encode_u64(q.index), [q.call_doorbell.fd])

    async def stop(self) -> tuple[int, ...]:
        """QEMU 7.2 at guest poweroff: disable, GET_VRING_BASE each vring; returns the bases."""
        for q in self.queues:
            await self.send(Request.SET_VRING_ENABLE, encode_vring_state(VringState(q.index, 0)))
        bases = []
        for q in self.queues:
            raw = await self.call(Request.GET_VRING_BASE,
                                  encode_vring_state(VringState(q.index, 0)))
            index, base = struct.unpack("<II", raw)
            assert index == q.index
            bases.append(base)
        return tuple(bases)
