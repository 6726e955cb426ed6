"""The VMBus server's remote guests: memory per guest, GPADL ids per guest, ownership, cleanup."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devicehost.memory import PAGE_SIZE, GuestMemory, MemoryRegion
from devicehost.vmbus.channel import connected_signals
from devicehost.vmbus.protocol import (
    CloseRequest,
    ModifyChannelRequest,
    ModifyRequest,
    OpenChannelRequest,
    OpenData,
    OpenRequest,
    TeardownGpadlRequest,
)
from devicehost.vmbus.ring import IncomingRing, RingMemory
from devicehost.vmbus.server import ChannelRequestError, RemoteGuest, VmbusServer
from tests.vmbus.test_server import FakeDevice, gpadl, params

pytestmark = pytest.mark.anyio


@pytest.fixture
def host_memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.memfd(16 * PAGE_SIZE)
    yield mem
    mem.close()


@pytest.fixture
def remote() -> Iterator[RemoteGuest]:
    # The remote guest's memory sits at 1 MiB: none of the host memory's addresses.
    mem = GuestMemory([MemoryRegion.memfd(0x100000, 16 * PAGE_SIZE)])
    yield RemoteGuest(mem, "guest-1")
    mem.close()


def open_request(gpadl_id: int, ring_offset: int = 2) -> OpenChannelRequest:
    return OpenChannelRequest(OpenRequest(OpenData(ring_offset=ring_offset,
                                                   ring_gpadl_id=gpadl_id)))


async def test_remote_gpadls_resolve_against_the_remote_guests_memory(
        host_memory: GuestMemory, remote: RemoteGuest) -> None:
    server = VmbusServer(host_memory)
    device = FakeDevice()
    handle = server.add_child(params(), device)
    # Pages 0..3 are host memory, not the remote guest's: refused for the remote guest.
    with pytest.raises(ChannelRequestError, match="outside the guest"):
        await server.request(handle.channel_id, gpadl(1, 0, 4), guest=remote)
    await server.request(handle.channel_id, gpadl(1, 0x100, 4), guest=remote)
    # The in-process guest has its own GPADL id 1 (ids are per guest).
    await server.request(handle.channel_id, gpadl(1, 0, 4))
    host_signal, _guest_end = connected_signals()
    assert await server.request(handle.channel_id, open_request(1), guest=remote,
                                signal=host_signal) is None
    assert device.resources is not None and device.resources.memory is remote.memory
    # The host wrote the packet into the remote guest's pages (host-to-guest ring from page 2).
    device.resources.channel.outgoing.write_inband(b"12345678")
    host_to_guest = IncomingRing(RingMemory.from_pages(remote.memory, range(0x102, 0x104)))
    assert bytes(host_to_guest.read().payload) == b"12345678"
    assert host_memory.read(0, 4 * PAGE_SIZE) == bytes(4 * PAGE_SIZE)
    tree = server.inspect()
    assert tree["gpadls"] == {
        "0x1": {"channel_id": 1, "mapped": 0},
        "guest-1/0x1": {"channel_id": 1, "mapped": 1, "guest": "guest-1"},
    }
    assert tree["channels"][0]["guest"] == "guest-1"


async def test_only_the_opener_closes_or_modifies(host_memory: GuestMemory,
                                                  remote: RemoteGuest) -> None:
    server = VmbusServer(host_memory)
    device = FakeDevice()
    handle = server.add_child(params(), device)
    await server.request(handle.channel_id, gpadl(7, 0x100, 4), guest=remote)
    await server.request(handle.channel_id, open_request(7), guest=remote,
                         signal=connected_signals()[0])
    with pytest.raises(ChannelRequestError, match="another guest"):
        await server.request(handle.channel_id, CloseRequest())
    with pytest.raises(ChannelRequestError, match="another guest"):
        await server.request(handle.channel_id, ModifyChannelRequest(ModifyRequest(1)))
    with pytest.raises(ChannelRequestError, match="cannot open"):
        await server.request(handle.channel_id, open_request(7))
    await server.request(handle.channel_id, CloseRequest(), guest=remote)
    assert device.log == ["open dev", "close dev"]


async def test_a_remote_open_without_a_signal_is_refused(host_memory: GuestMemory,
                                                         remote: RemoteGuest) -> None:
    server = VmbusServer(host_memory)
    handle = server.add_child(params(), FakeDevice())
    await server.request(handle.channel_id, gpadl(7, 0x100, 4), guest=remote)
    with pytest.raises(ChannelRequestError, match="signal"):
        await server.request(handle.channel_id, open_request(7), guest=remote)


async def test_a_failed_remote_open_closes_the_signal_it_was_given(
        host_memory: GuestMemory, remote: RemoteGuest) -> None:
    server = VmbusServer(host_memory)
    handle = server.add_child(params(), FakeDevice())
    signal, _ = connected_signals()
    with pytest.raises(ChannelRequestError, match="does not exist"):
        await server.request(handle.channel_id, open_request(99), guest=remote, signal=signal)
    assert signal.closed


async def test_hidden_offers_are_not_for_remote_guests(host_memory: GuestMemory,
                                                       remote: RemoteGuest) -> None:
    server = VmbusServer(host_memory)
    handle = server.add_child(params(), FakeDevice())
    server.hide_instance(handle.key.instance_id)
    with pytest.raises(ChannelRequestError, match="not offered"):
        await server.request(handle.channel_id, gpadl(1, 0x100, 4), guest=remote)


async def test_disconnect_closes_the_guests_channels_and_drops_its_gpadls(
        host_memory: GuestMemory, remote: RemoteGuest) -> None:
    server = VmbusServer(host_memory)
    device = FakeDevice()
    handle = server.add_child(params(), device)
    await server.request(handle.channel_id, gpadl(7, 0x100, 4), guest=remote)
    await server.request(handle.channel_id, gpadl(8, 0x104, 1), guest=remote)
    await server.request(handle.channel_id, gpadl(8, 4, 1))  # the in-process guest's own
    signal, _ = connected_signals()
    await server.request(handle.channel_id, open_request(7), guest=remote, signal=signal)
    await server.disconnect(remote)
    assert device.log == ["open dev", "close dev"] and signal.closed
    assert server.inspect()["gpadls"] == {"0x8": {"channel_id": 1, "mapped": 0}}
    assert not handle.is_open
    # The channel is free for the in-process guest now.
    await server.request(handle.channel_id, gpadl(9, 8, 4))
    await server.request(handle.channel_id, open_request(9))
    assert handle.is_open


async def test_remote_gpadls_and_opens_are_not_saved(host_memory: GuestMemory,
                                                     remote: RemoteGuest) -> None:
    server = VmbusServer(host_memory)
    handle = server.add_child(params(), FakeDevice())
    await server.request(handle.channel_id, gpadl(7, 0x100, 4), guest=remote)
    await server.request(handle.channel_id, open_request(7), guest=remote,
                         signal=connected_signals()[0])
    (saved,) = server.save().channels
    assert saved.gpadls == () and saved.open is None


async def test_teardown_is_per_guest(host_memory: GuestMemory, remote: RemoteGuest) -> None:
    server = VmbusServer(host_memory)
    handle = server.add_child(params(), FakeDevice())
    await server.request(handle.channel_id, gpadl(3, 0, 1))
    with pytest.raises(ChannelRequestError, match="does not exist"):
        await server.request(handle.channel_id, TeardownGpadlRequest(3), guest=remote)
    assert "0x3" in server.inspect()["gpadls"]
