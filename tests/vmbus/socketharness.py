"""A VMBus socket server over fake devices, and a raw guest that speaks bytes to it."""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from devicehost.memory import PAGE_SIZE, GuestMemory
from devicehost.vmbus.controlsocket import ControlSocket, close_fds
from devicehost.vmbus.guid import Guid
from devicehost.vmbus.messages import (
    InitiateContact,
    MemoryRegionEntry,
    MemoryTable,
    Message,
    Version,
    decode_message_untrusted,
    encode_message,
)
from devicehost.vmbus.protocol import DeviceChannel, OfferParams
from devicehost.vmbus.server import ChannelHandle, VmbusServer
from devicehost.vmbus.socketserver import VmbusSocketServer
from tests.vmbus.test_server import FakeDevice

IFACE = Guid.parse("11111111-2222-3333-4444-555555555555")
#: The raw guest's memory: 64 pages at guest address 1 MiB.
GUEST_GPA = 0x100000
GUEST_PAGES = 64


def instance(n: int) -> Guid:
    return Guid.parse(f"66666666-7777-8888-9999-{n:012x}")


def offer_params(n: int) -> OfferParams:
    return OfferParams(f"dev{n}", instance(n), IFACE, channel_type=DeviceChannel(pipe_packets=True))


def memfd(size: int = GUEST_PAGES * PAGE_SIZE, *, seal: bool = True) -> int:
    fd = os.memfd_create("test-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class SocketBus:
    """A server with fake devices behind a VMBus socket."""

    def __init__(self, server: VmbusServer, socket_server: VmbusSocketServer, path: Path,
                 handles: list[ChannelHandle], devices: list[FakeDevice]) -> None:
        self.server = server
        self.socket = socket_server
        self.path = path
        self.handles = handles
        self.devices = devices

    def remote_state(self) -> tuple[dict[str, object], list[str]]:
        """GPADLs of remote guests and channels opened by them (both empty when clean)."""
        tree = self.server.inspect()
        gpadls = {k: v for k, v in tree["gpadls"].items() if "/" in k}
        opened = [c["key"] for c in tree["channels"] if "guest" in c]
        return gpadls, opened


@asynccontextmanager
async def socket_bus(path: Path, *, devices: int = 2, allow_unsealed_memory: bool = False
                     ) -> AsyncIterator[SocketBus]:
    memory = GuestMemory.memfd(16 * PAGE_SIZE)
    server = VmbusServer(memory)
    fakes = [FakeDevice(name=f"dev{i}") for i in range(devices)]
    handles = [server.add_child(offer_params(i), fakes[i]) for i in range(devices)]
    socket_server = VmbusSocketServer(server, path, allow_unsealed_memory=allow_unsealed_memory)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(socket_server.serve)
            try:
                yield SocketBus(server, socket_server, path, handles, fakes)
            finally:
                await socket_server.aclose()
                tg.cancel_scope.cancel()
    finally:
        await server.aclose()
        memory.close()


class RawGuest:
    """A guest that sends and receives raw socket messages."""

    def __init__(self, sock: ControlSocket) -> None:
        self.sock = sock
        self.version: int | None = None

    async def send(self, message: Message | bytes, fds: Sequence[int] = ()) -> None:
        data = message if isinstance(message, bytes) else encode_message(message)
        await self.sock.send(data, tuple(fds))

    async def recv_raw(self) -> bytes:
        data, fds = await self.sock.receive()
        close_fds(fds)
        return data

    async def recv(self) -> Message | None:
        """The next message (None at end of stream)."""
        data = await self.recv_raw()
        return decode_message_untrusted(data, self.version) if data else None

    async def recv_fds(self) -> tuple[Message | None, list[int]]:
        """The next message and the fds that came with it (the caller closes them)."""
        data, fds = await self.sock.receive()
        return (decode_message_untrusted(data, self.version) if data else None), fds

    async def contact(self, version: int = Version.COPPER, *, fd: int | None = None) -> bytes:
        """MEMORY_TABLE (GUEST_PAGES at GUEST_GPA) + INITIATE_CONTACT; the raw response."""
        own = fd is None
        memory_fd = memfd() if fd is None else fd
        try:
            await self.send(MemoryTable((MemoryRegionEntry(GUEST_GPA, GUEST_PAGES * PAGE_SIZE),)),
                            [memory_fd])
        finally:
            if own:
                os.close(memory_fd)
        await self.send(InitiateContact(version))
        raw = await self.recv_raw()
        self.version = version
        return raw

    async def until_closed(self) -> list[Message]:
        """Every message until the host closes the connection."""
        seen = []
        while (message := await self.recv()) is not None:
            seen.append(message)
        return seen


@asynccontextmanager
async def raw_guest(path: Path) -> AsyncIterator[RawGuest]:
    sock = await ControlSocket.connect(path)
    try:
        yield RawGuest(sock)
    finally:
        sock.close()
