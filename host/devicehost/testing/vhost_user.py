"""A vhost-user frontend for tests: what QEMU 7.2 sends, over a real Unix socket.

Use it to test a virtio device plugin served with ``vhost_user_socket`` the way a VMM drives it,
without a VMM: :meth:`VhostUserFrontend.realize` is QEMU's device-realize sequence (features,
protocol features, queue count, owner, call and error eventfds, the device config),
:meth:`~VhostUserFrontend.start` its DRIVER_OK sequence (features, the memory table with a reply
asked for, every vring's size, base, address, kick, enable and call) and
:meth:`~VhostUserFrontend.stop` its power-off (vrings disabled, their bases read back). Guest
memory is a memfd :class:`~devicehost.memory.GuestMemory` shared through SET_MEM_TABLE; the
rings are laid out by the guest-side :class:`~devicehost.virtio.DriverQueue`, one per vring
(``queue(i)``, so a guest stack written for the in-process driver runs over it unchanged); kicks
and calls are real eventfds. The VMM's "virtual address" of guest memory is a made-up base
(:data:`USER_BASE`), so the backend must translate SET_VRING_ADDR through the memory table.
The backend refuses guest memory that could shrink: :meth:`GuestMemory.memfd` seals its memfd,
and :func:`sealed_memfd` makes one for a test that lays out regions itself.

A reply that is not what the vhost-user protocol prescribes raises AssertionError (this is a test
tool); lower-level calls (:meth:`~VhostUserFrontend.send`, :meth:`~VhostUserFrontend.reply`) let a
test send anything, hostile messages included.
"""

from __future__ import annotations

import fcntl
import os
import struct

import anyio
import anyio.abc

from devicehost.memory import DmaAllocator, GuestMemory
from devicehost.virtio import RING_EVENT_IDX, DriverQueue, EventfdDoorbell
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

__all__ = ["USER_BASE", "VhostUserFrontend", "sealed_memfd"]

#: Where the frontend claims to have mapped guest memory in its own address space.
USER_BASE = 0x7F12_3400_0000


def sealed_memfd(size: int, name: str = "guest") -> int:
    """A new memfd of ``size`` bytes sealed against shrinking and growing (as QEMU's
    ``memory-backend-memfd`` seals guest RAM); the caller closes it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class VhostUserFrontend:
    """One VMM connection to a vhost-user backend (see the module docstring)."""

    def __init__(
        self, stream: anyio.abc.SocketStream, memory: GuestMemory,
        allocator: DmaAllocator | None = None,
    ) -> None:
        self.stream = stream
        self.memory = memory
        self.allocator = allocator or DmaAllocator(memory)
        #: The vring count the backend reported (GET_QUEUE_NUM), once :meth:`realize` ran.
        self.queue_count: int | None = None
        self.queues: list[DriverQueue] = []
        #: Eventfds this frontend made and closes in :meth:`aclose` (a test may add its own).
        self.own_fds: list[int] = []

    @classmethod
    async def connect(
        cls, path: str, memory: GuestMemory, allocator: DmaAllocator | None = None
    ) -> VhostUserFrontend:
        return cls(await anyio.connect_unix(path), memory, allocator)

    def queue(self, index: int) -> DriverQueue:
        """The driver side of vring ``index`` (after :meth:`start`)."""
        return self.queues[index]

    def user_addr(self, gpa: int) -> int:
        """The VMM's virtual address of ``gpa``: the memfd is mapped whole at USER_BASE."""
        for r in self.memory.regions:
            if r.gpa <= gpa < r.end:
                return USER_BASE + r.offset + gpa - r.gpa
        raise ValueError(f"gpa {gpa:#x} is not guest memory")

    async def aclose(self) -> None:
        await self.stream.aclose()
        for q in self.queues:
            for bell in (q.kick_doorbell, q.call_doorbell):
                if isinstance(bell, EventfdDoorbell):
                    bell.close()
        for fd in self.own_fds:
            os.close(fd)
        self.own_fds.clear()

    # -- messages ----------------------------------------------------------------------------------

    async def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            data += await self.stream.receive(n - len(data))
        return data

    async def send(
        self, request: int, payload: bytes = b"", fds: list[int] | None = None, *,
        flags: int = F_VERSION,
    ) -> None:
        """Send one message (with ``fds`` as SCM_RIGHTS), as given."""
        message = encode_message(request, payload, flags=flags)
        if fds:
            if not isinstance(self.stream, anyio.abc.UNIXSocketStream):
                raise TypeError("file descriptors need a Unix socket stream")
            await self.stream.send_fds(message, fds)
        else:
            await self.stream.send(message)

    async def reply(self, request: int) -> bytes:
        """Read the backend's reply to ``request``; returns its payload."""
        code, flags, size = HEADER.unpack(await self._recv_exact(HEADER.size))
        if (code, flags) != (request, F_VERSION | F_REPLY):
            raise AssertionError(
                f"expected the reply to request {request}, got request {code} flags {flags:#x}"
            )
        return await self._recv_exact(size)

    async def call(self, request: int, payload: bytes = b"") -> bytes:
        await self.send(request, payload)
        return await self.reply(request)

    async def get_u64(self, request: int) -> int:
        raw = await self.call(request)
        if len(raw) != 8:
            raise AssertionError(f"request {request} answered {len(raw)} bytes, not a u64")
        value: int = struct.unpack("<Q", raw)[0]
        return value

    # -- QEMU 7.2's sequences ----------------------------------------------------------------------

    async def realize(self, config_size: int = 8) -> tuple[int, bytes]:
        """QEMU 7.2's device-realize sequence; returns (features, ``config_size`` config bytes)
        and records the vring count in :attr:`queue_count`."""
        features = await self.get_u64(Request.GET_FEATURES)
        protocol = await self.get_u64(Request.GET_PROTOCOL_FEATURES)
        await self.send(Request.SET_PROTOCOL_FEATURES, encode_u64(protocol))
        count = await self.get_u64(Request.GET_QUEUE_NUM)
        if not 1 <= count <= 64:
            raise AssertionError(f"the backend reported {count} vrings")
        self.queue_count = count
        await self.send(Request.SET_OWNER)
        again = await self.get_u64(Request.GET_FEATURES)
        if again != features:
            raise AssertionError(f"features changed from {features:#x} to {again:#x}")
        for i in range(count):
            for request in (Request.SET_VRING_CALL, Request.SET_VRING_ERR):
                fd = _eventfd()
                self.own_fds.append(fd)
                await self.send(request, encode_u64(i), [fd])
        cfg = await self.call(
            Request.GET_CONFIG, encode_config(ConfigPayload(0, config_size, 0, bytes(config_size)))
        )
        if cfg[:12] != struct.pack("<III", 0, config_size, 0) or len(cfg) != 12 + config_size:
            raise AssertionError(f"GET_CONFIG answered {cfg[:12].hex()} with {len(cfg)} bytes")
        return features, cfg[12:]

    async def start(self, features: int, queue_size: int = 128,
                    bases: tuple[int, ...] | None = None, *, event_idx: bool | None = None
                    ) -> None:
        """QEMU 7.2 at DRIVER_OK: features, memory table (need_reply), vrings, enable, call.
        Every vring of :attr:`queue_count` is started, at ``bases`` (default 0); the driver
        queues are made on the first start and kept across later ones (a restart after
        :meth:`stop`). The driver queues use EVENT_IDX exactly when ``features`` acks it
        (``event_idx`` may only say the same: a driver that disagrees with the device about it
        loses interrupts)."""
        if self.queue_count is None:
            raise RuntimeError("realize() first: the vring count comes from GET_QUEUE_NUM")
        acked = bool(features >> RING_EVENT_IDX & 1)
        if event_idx is not None and event_idx != acked:
            raise ValueError(f"event_idx={event_idx} but the features "
                             f"{'ack' if acked else 'do not ack'} RING_EVENT_IDX")
        event_idx = acked
        if bases is None:
            bases = (0,) * self.queue_count
        await self.send(Request.SET_FEATURES, encode_u64(features))
        regions = self.memory.regions
        table = encode_mem_table(
            [MemRegion(r.gpa, r.size, USER_BASE + r.offset, r.offset) for r in regions]
        )
        fds = [r.fd for r in regions if r.fd is not None]
        await self.send(Request.SET_MEM_TABLE, table, fds, flags=F_VERSION | F_NEED_REPLY)
        if await self.reply(Request.SET_MEM_TABLE) != encode_u64(0):
            raise AssertionError("the backend refused the memory table")
        if not self.queues:
            self.queues = [DriverQueue(i, self.memory, self.allocator, queue_size,
                                       event_idx=event_idx) for i in range(self.queue_count)]
        calls: list[int] = []
        for q, base in zip(self.queues, bases, strict=True):
            for old in (q.kick_doorbell, q.call_doorbell):
                if isinstance(old, EventfdDoorbell):
                    old.close()
            kick, call = _eventfd(), _eventfd()
            q.kick_doorbell = EventfdDoorbell(kick)
            q.call_doorbell = EventfdDoorbell(call)
            calls.append(call)
            lay = q.layout
            await self.send(Request.SET_VRING_NUM, encode_vring_state(VringState(q.index, q.size)))
            await self.send(Request.SET_VRING_BASE, encode_vring_state(VringState(q.index, base)))
            addr = VringAddr(q.index, 0, self.user_addr(lay.desc_gpa),
                             self.user_addr(lay.used_gpa), self.user_addr(lay.avail_gpa), 0)
            await self.send(Request.SET_VRING_ADDR, encode_vring_addr(addr))
            await self.send(Request.SET_VRING_KICK, encode_u64(q.index), [kick])
        for q in self.queues:
            await self.send(Request.SET_VRING_ENABLE, encode_vring_state(VringState(q.index, 1)))
        for q, call in zip(self.queues, calls, strict=True):
            await self.send(Request.SET_VRING_CALL, encode_u64(q.index), [call])

    async def stop(self) -> tuple[int, ...]:
        """QEMU 7.2 at guest power-off: disable, GET_VRING_BASE each vring; returns the bases."""
        for q in self.queues:
            await self.send(Request.SET_VRING_ENABLE, encode_vring_state(VringState(q.index, 0)))
        bases = []
        for q in self.queues:
            raw = await self.call(Request.GET_VRING_BASE,
                                  encode_vring_state(VringState(q.index, 0)))
            index, base = struct.unpack("<II", raw)
            if index != q.index:
                raise AssertionError(f"GET_VRING_BASE for vring {q.index} answered vring {index}")
            bases.append(base)
        return tuple(bases)
