"""The VMBus socket server: negotiation, offers, GPADLs, opens, cleanup, and guest faults."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import anyio
import attrs
import pytest

from devicehost.fds import fd_kind
from devicehost.memory import PAGE_SIZE
from devicehost.vmbus.messages import (
    AllOffersDelivered,
    CloseChannel,
    GpadlBody,
    GpadlCreated,
    GpadlHeader,
    GpadlTeardown,
    GpadlTorndown,
    InitiateContact,
    MemoryRegionEntry,
    MemoryTable,
    ModifyChannel,
    ModifyChannelResponse,
    OfferChannelMessage,
    OpenChannel,
    OpenResult,
    RelIdReleased,
    RequestOffers,
    RescindChannelOffer,
    Unload,
    UnloadComplete,
    Version,
    VersionResponse,
    encode_message,
)
from devicehost.vmbus.protocol import STATUS_UNSUCCESSFUL, OfferChannel, OfferFlags
from devicehost.vmbus.ring import IncomingRing, OutgoingRing, RingMemory
from devicehost.vmbus.transport import VmbusTransport
from tests.vmbus.socketharness import (
    GUEST_GPA,
    GUEST_PAGES,
    RawGuest,
    eventfd,
    memfd,
    offer_params,
    raw_guest,
    socket_bus,
)

pytestmark = pytest.mark.anyio

FIRST_PFN = GUEST_GPA // PAGE_SIZE


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The socket's both ends run on both backends (overrides the asyncio-only default)."""
    return str(request.param)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "vmbus.sock"


def gpadl_words(first_pfn: int, pages: int) -> bytes:
    return struct.pack(f"<{pages + 1}Q", pages * PAGE_SIZE, *range(first_pfn, first_pfn + pages))


async def connected(guest: RawGuest) -> list[OfferChannel]:
    """Contact at Copper and take the offers."""
    assert (await guest.contact())[8] == 1
    await guest.send(RequestOffers())
    offers = []
    while not isinstance(message := await guest.recv(), AllOffersDelivered):
        assert isinstance(message, OfferChannelMessage)
        offers.append(message.offer)
    return offers


async def create_gpadl(guest: RawGuest, channel_id: int, gpadl_id: int, first_pfn: int,
                       pages: int) -> int:
    data = gpadl_words(first_pfn, pages)
    await guest.send(GpadlHeader(channel_id, gpadl_id, len(data), 1, data[:8 * 27]))
    for start in range(8 * 27, len(data), 8 * 28):
        await guest.send(GpadlBody(gpadl_id, data[start:start + 8 * 28]))
    created = await guest.recv()
    assert isinstance(created, GpadlCreated) and created.gpadl_id == gpadl_id
    return created.status


async def open_channel(guest: RawGuest, channel_id: int, gpadl_id: int, ring_offset: int
                       ) -> tuple[int, tuple[int, ...]]:
    """OPEN_CHANNEL with a guest-to-host eventfd: the status and the fds to close — the eventfd
    and, when the open succeeded, the host-to-guest pipe's read end the result carries."""
    to_host = eventfd()
    await guest.send(OpenChannel(channel_id, 77, gpadl_id, 0, ring_offset), [to_host])
    result, fds = await guest.recv_fds()
    assert isinstance(result, OpenResult) and (result.channel_id, result.open_id) == (
        channel_id, 77)
    assert len(fds) == (1 if result.status == 0 else 0)
    assert all(fd_kind(fd) == "fifo" for fd in fds)
    return result.status, (to_host, *fds)


# -- negotiation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", list(Version), ids=lambda v: v.name)
async def test_every_version_of_the_facts_is_accepted(path: Path, version: Version) -> None:
    async with socket_bus(path) as bus, raw_guest(path) as guest:
        with anyio.fail_after(30):
            raw = await guest.contact(version)
            # VersionResponse: supported 1, state 0, selected 0; from Copper VersionResponse2
            # with supported_features 0 (no feature of §2.4 is offered).
            expected = bytes.fromhex("0f000000 00000000 01000000 00000000")
            if version >= Version.COPPER:
                expected += bytes(4)
            assert raw == expected
            await guest.send(RequestOffers())
            kinds = [type(await guest.recv()) for _ in bus.handles] + [type(await guest.recv())]
            assert kinds == [OfferChannelMessage] * len(bus.handles) + [AllOffersDelivered]
            assert bus.socket.inspect()["guest"]["version"] == f"{int(version):#010x}"


async def test_an_unknown_version_is_refused_and_a_retry_accepted(path: Path) -> None:
    async with socket_bus(path), raw_guest(path) as guest:
        with anyio.fail_after(30):
            refused = await guest.contact(0x00070000)
            assert refused == bytes.fromhex("0f000000 00000000 00000000 00000000")
            await guest.send(InitiateContact(0x00010000))  # not a version of §2.2
            assert await guest.recv() == VersionResponse(False, 0, 0)
            await guest.send(InitiateContact(Version.WIN10))
            assert await guest.recv() == VersionResponse(True, 0, 0)


# -- offers ----------------------------------------------------------------------------------------


async def test_offers_new_offers_and_rescinds(path: Path) -> None:
    async with socket_bus(path) as bus, raw_guest(path) as guest:
        with anyio.fail_after(30):
            bus.server.hide_instance(offer_params(5).instance_id)
            offers = await connected(guest)
            expected = [attrs.evolve(h.offer, flags=OfferFlags.NAMED_PIPE_MODE)
                        for h in bus.handles]
            assert offers == expected
            # Byte for byte, the OfferChannel body (confidential ring flag cleared: the guest
            # negotiated no confidential channels).
            assert encode_message(OfferChannelMessage(offers[0]))[8 + 48] == 0x10
            bus.server.add_child(offer_params(5), bus.devices[0])  # hidden: not for this guest
            late = bus.server.add_child(offer_params(3), bus.devices[0])
            message = await guest.recv()
            assert isinstance(message, OfferChannelMessage)
            assert message.offer.channel_id == late.channel_id
            await late.revoke()
            assert await guest.recv() == RescindChannelOffer(late.channel_id)
            await guest.send(RelIdReleased(late.channel_id))
            await guest.send(RequestOffers())  # twice is a fault
            assert await guest.until_closed() == []


# -- GPADLs and channels ---------------------------------------------------------------------------


async def test_gpadl_open_signal_close_teardown(path: Path) -> None:
    async with socket_bus(path) as bus, raw_guest(path) as guest:
        with anyio.fail_after(30):
            offers = await connected(guest)
            channel_id = offers[0].channel_id
            # 40 pages: a GPADL_HEADER and a GPADL_BODY.
            assert await create_gpadl(guest, channel_id, 0x10, FIRST_PFN, 40) == 0
            status, (to_host, to_guest) = await open_channel(guest, channel_id, 0x10, 20)
            assert status == 0
            device = bus.devices[0]
            assert device.resources is not None
            assert device.resources.memory.regions[0].gpa == GUEST_GPA
            assert bus.server.inspect()["channels"][0]["guest"] == "socket-guest-1"
            # The host writes the guest's ring in the guest's memfd and signals its eventfd.
            host_channel = device.resources.channel
            guest_memory = device.resources.memory
            host_channel.outgoing.write_inband(b"from host")
            host_channel.signal_remote()
            await anyio.wait_readable(to_guest)
            assert len(os.read(to_guest, 64)) >= 1
            incoming = IncomingRing(RingMemory.from_pages(
                guest_memory, range(FIRST_PFN + 20, FIRST_PFN + 40)))
            assert bytes(incoming.read().payload).rstrip(b"\0") == b"from host"
            # The guest writes its ring and signals: the host's wait returns.
            outgoing = OutgoingRing(RingMemory.from_pages(
                guest_memory, range(FIRST_PFN, FIRST_PFN + 20)))
            outgoing.write_inband(b"from guest")
            os.eventfd_write(to_host, 1)
            await host_channel.wait_for_signal()
            assert bytes(host_channel.incoming.read().payload).rstrip(b"\0") == b"from guest"
            # Teardown of the mapped GPADL completes only after the close.
            await guest.send(GpadlTeardown(channel_id, 0x10))
            await guest.send(CloseChannel(channel_id))
            assert await guest.recv() == GpadlTorndown(0x10)
            assert device.log == ["open dev0", "close dev0"]
            assert bus.remote_state() == ({}, [])
            os.close(to_host)
            os.close(to_guest)


async def test_no_guest_can_make_the_hosts_notify_block(path: Path) -> None:
    # The host-to-guest interrupt is a pipe whose write end only the host holds: a guest that
    # makes its read end blocking and never reads only fills the pipe; the host's notifies go on.
    import threading

    async with socket_bus(path) as bus, raw_guest(path) as guest:
        with anyio.fail_after(30):
            offers = await connected(guest)
            assert await create_gpadl(guest, offers[0].channel_id, 1, FIRST_PFN, 4) == 0
            status, (to_host, to_guest) = await open_channel(guest, offers[0].channel_id, 1, 2)
            assert status == 0
            os.set_blocking(to_guest, True)
            device = bus.devices[0]
            assert device.resources is not None
            channel = device.resources.channel
            done = threading.Event()

            def notify_many() -> None:
                for _ in range(100_000):  # far more than a pipe holds
                    channel.signal_remote()
                done.set()

            thread = threading.Thread(target=notify_many, daemon=True)
            thread.start()
            thread.join(20)
            assert done.is_set(), "the host's notify blocked"
            assert len(os.read(to_guest, 1 << 20)) > 0
            os.close(to_host)
            os.close(to_guest)


async def test_refused_requests_answer_a_status_and_keep_the_connection(path: Path) -> None:
    async with socket_bus(path) as bus, raw_guest(path) as guest:
        with anyio.fail_after(30):
            offers = await connected(guest)
            channel_id = offers[0].channel_id
            # Pages of host memory (0..3) are not the guest's memory.
            assert await create_gpadl(guest, channel_id, 1, 0, 4) == STATUS_UNSUCCESSFUL
            # A ring offset outside the GPADL.
            assert await create_gpadl(guest, channel_id, 2, FIRST_PFN, 4) == 0
            status, fds = await open_channel(guest, channel_id, 2, 4)
            assert status == STATUS_UNSUCCESSFUL
            # The device failing its open.
            bus.devices[0].fail_open = True
            status, more = await open_channel(guest, channel_id, 2, 2)
            assert status == STATUS_UNSUCCESSFUL
            bus.devices[0].fail_open = False
            status, last = await open_channel(guest, channel_id, 2, 2)
            assert status == 0
            await guest.send(ModifyChannel(channel_id, 3))
            assert await guest.recv() == ModifyChannelResponse(channel_id, 0)
            assert bus.devices[0].log == ["open dev0", "modify dev0 3"]
            for fd in (*fds, *more, *last):
                os.close(fd)


async def test_a_guest_that_leaves_loses_its_channels_and_gpadls(path: Path) -> None:
    async with socket_bus(path) as bus:
        with anyio.fail_after(30):
            async with raw_guest(path) as guest:
                offers = await connected(guest)
                for n, offer in enumerate(offers):
                    assert await create_gpadl(guest, offer.channel_id, n, FIRST_PFN + 8 * n,
                                              8) == 0
                    status, fds = await open_channel(guest, offer.channel_id, n, 4)
                    assert status == 0
                    for fd in fds:
                        os.close(fd)
                assert await create_gpadl(guest, offers[0].channel_id, 9, FIRST_PFN + 40, 1) == 0
                assert len(bus.remote_state()[0]) == 3
            await bus.socket.wait_idle()
            assert bus.remote_state() == ({}, [])
            assert [d.log for d in bus.devices] == [["open dev0", "close dev0"],
                                                    ["open dev1", "close dev1"]]
            # The next guest starts clean: same ids, same channels.
            async with raw_guest(path) as guest:
                offers = await connected(guest)
                assert await create_gpadl(guest, offers[0].channel_id, 0, FIRST_PFN, 8) == 0
                status, fds = await open_channel(guest, offers[0].channel_id, 0, 4)
                assert status == 0
                for fd in fds:
                    os.close(fd)
                assert bus.socket.inspect()["guest"]["name"] == "socket-guest-2"


async def test_unload_drops_everything_and_allows_a_new_contact(path: Path) -> None:
    async with socket_bus(path) as bus, raw_guest(path) as guest:
        with anyio.fail_after(30):
            offers = await connected(guest)
            assert await create_gpadl(guest, offers[0].channel_id, 1, FIRST_PFN, 4) == 0
            status, fds = await open_channel(guest, offers[0].channel_id, 1, 2)
            assert status == 0
            await guest.send(Unload())
            assert await guest.recv() == UnloadComplete()
            assert bus.remote_state() == ({}, [])
            await guest.send(InitiateContact(Version.WIN10))
            assert await guest.recv() == VersionResponse(True, 0, 0)
            for fd in fds:
                os.close(fd)


async def test_one_guest_at_a_time(path: Path) -> None:
    async with socket_bus(path) as bus, raw_guest(path) as first:
        with anyio.fail_after(30):
            await connected(first)
            async with raw_guest(path) as second:
                assert await second.recv() is None  # closed at once
            assert bus.socket.inspect()["refused"] == 1
            await first.send(RequestOffers())  # the first guest is unaffected (until it faults)
            assert await first.until_closed() == []


# -- faults: each costs the guest its connection, never the host -----------------------------------

U32 = struct.Struct("<I")


def _table(size: int = GUEST_PAGES * PAGE_SIZE, gpa: int = GUEST_GPA, offset: int = 0) -> bytes:
    return encode_message(MemoryTable((MemoryRegionEntry(gpa, size, offset),)))


FAULTS = {
    # name: (contact first?, message bytes, fd factory)
    "unknown type": (True, struct.pack("<II", 99, 0), None),
    "short body": (True, struct.pack("<II", 7, 0) + b"\x01", None),
    "too long": (True, struct.pack("<II", 3, 0) + bytes(300), None),
    "host message from the guest": (True, encode_message(VersionResponse(True)), None),
    "fds on a message that takes none": (True, encode_message(CloseChannel(1)), "eventfd"),
    "open without fds": (True, encode_message(OpenChannel(1, 1, 1, 0, 1)), None),
    "open with a memfd for the eventfd": (True, encode_message(OpenChannel(1, 1, 1, 0, 1)),
                                          "memfd"),
    "open with two eventfds": (True, encode_message(OpenChannel(1, 1, 1, 0, 1)), "eventfd2"),
    "gpadl body without header": (True, encode_message(GpadlBody(5, bytes(8))), None),
    "gpadl data past its length": (True, encode_message(GpadlHeader(1, 5, 8, 1, bytes(16))),
                                   None),
    "gpadl length not whole words": (True, encode_message(GpadlHeader(1, 5, 7, 1)), None),
    "teardown of an unknown gpadl": (True, encode_message(GpadlTeardown(1, 5)), None),
    "request before contact": (False, encode_message(RequestOffers()), None),
    "contact before memory": (False, encode_message(InitiateContact(Version.COPPER)), None),
    "unsealed memory": (False, _table(), "unsealed"),
    "an eventfd as memory": (False, _table(), "eventfd"),
    "memory table without fds": (False, _table(), None),
    "memory region not whole pages": (False, _table(size=PAGE_SIZE + 1), "memfd"),
    "memory region past the fd's end": (False, _table(offset=PAGE_SIZE), "memfd"),
    "modify before Win10Rs3_0": (True, encode_message(ModifyChannel(1, 0)), None),
}


def _fds(kind: str | None) -> list[int]:
    if kind is None:
        return []
    if kind == "eventfd":
        return [eventfd()]
    if kind == "memfd":
        return [memfd()]
    if kind == "eventfd2":
        return [eventfd(), eventfd()]
    assert kind == "unsealed"
    return [memfd(seal=False)]


@pytest.mark.parametrize("name", list(FAULTS))
async def test_a_fault_costs_only_the_connection(path: Path, name: str) -> None:
    contact, data, fd_kind = FAULTS[name]
    async with socket_bus(path) as bus:
        with anyio.fail_after(30):
            async with raw_guest(path) as guest:
                if contact:
                    await guest.contact(Version.WIN10)
                fds = _fds(fd_kind)
                await guest.send(data, fds)
                for fd in fds:
                    os.close(fd)
                assert await guest.until_closed() == []
            await bus.socket.wait_idle()
            assert bus.socket.inspect()["last_disconnect"].startswith("guest fault")
            assert bus.remote_state() == ({}, [])
            async with raw_guest(path) as guest:  # the host serves the next guest
                await connected(guest)


async def test_unsealed_memory_is_accepted_when_the_operator_allows_it(path: Path) -> None:
    async with socket_bus(path, allow_unsealed_memory=True), raw_guest(path) as guest:
        with anyio.fail_after(30):
            fd = memfd(seal=False)
            try:
                assert (await guest.contact(fd=fd))[8] == 1
            finally:
                os.close(fd)


async def test_the_accept_loop_survives_running_out_of_fds(
        path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import errno
    import socket

    from devicehost.vmbus.socketserver import VmbusSocketServer

    class Exhausted(socket.socket):
        # Out of fds twice, then one connection aborted before it was accepted.
        failures = [errno.EMFILE, errno.EMFILE, errno.ECONNABORTED]

        def accept(self) -> tuple[socket.socket, object]:
            if Exhausted.failures:
                code = Exhausted.failures.pop(0)
                raise OSError(code, os.strerror(code))
            return super().accept()

    listen = VmbusSocketServer._listen

    def exhausted_listen(self: VmbusSocketServer) -> socket.socket:
        sock = listen(self)
        return Exhausted(sock.family, sock.type, sock.proto, fileno=sock.detach())

    monkeypatch.setattr(VmbusSocketServer, "_listen", exhausted_listen)
    caplog.set_level("INFO", logger="devicehost.vmbus.socket")
    async with socket_bus(path) as bus, raw_guest(path) as guest:
        with anyio.fail_after(30):
            await connected(guest)  # accepted once fds are available again
            assert Exhausted.failures == [] and bus.socket.inspect()["connections"] == 1
    assert caplog.text.count("cannot accept") == 2
    assert caplog.text.count("accept failed") == 1


async def test_a_second_host_on_the_same_socket_does_not_start(path: Path) -> None:
    from devicehost.config import HostSettings
    from devicehost.errors import ConfigError
    from devicehost.testing.registry import host_with

    settings = HostSettings(vmbus_socket=path)
    async with host_with({}, [], settings=settings) as host:
        assert host.transport(VmbusTransport).socket is not None
        with pytest.raises(ConfigError, match="in use by another running host"):
            async with host_with({}, [], settings=settings):
                pass
    assert not path.exists()  # the first host removed its socket when it stopped
    path.write_text("")  # a stale socket file is replaced, anything else is refused
    with pytest.raises(ConfigError, match="cannot listen on the VMBus socket"):
        async with host_with({}, [], settings=settings):
            pass


async def test_a_stale_socket_of_an_earlier_run_is_replaced(tmp_path: Path) -> None:
    import socket

    from devicehost.config import HostSettings
    from devicehost.testing.registry import host_with

    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()  # the file stays; nobody listens
    async with host_with({}, [], settings=HostSettings(vmbus_socket=path)), raw_guest(path) as g:
        with anyio.fail_after(30):
            assert (await g.contact())[8] == 1
