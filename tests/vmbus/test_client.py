"""The VMBus client against the in-process server: offers, ring memory, open/close, revoke."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.abc
import pytest

from devicehost.memory import PAGE_SIZE, DmaAllocator, GuestMemory
from devicehost.vmbus.channel import ChannelClosed
from devicehost.vmbus.client import VmbusClient
from devicehost.vmbus.guid import Guid
from devicehost.vmbus.pipe import ConnectionReset, MessagePipe
from devicehost.vmbus.protocol import (
    CloseRequest,
    DeviceChannel,
    ModifyRequest,
    OfferParams,
    OpenChannelRequest,
    OpenData,
    OpenRequest,
    OpenResources,
)
from devicehost.vmbus.server import ChannelRequestError, VmbusServer

pytestmark = pytest.mark.anyio

IFACE = Guid.parse("8e4c3f3a-2b1d-4a3e-9f7a-0c1d2e3f4a5b")


class EchoChannel:
    """A server-side device that echoes every pipe message, prefixed, from a task of ``tg``."""

    def __init__(self, tg: anyio.abc.TaskGroup, prefix: bytes = b"echo:") -> None:
        self.tg = tg
        self.prefix = prefix
        self.fail_open = False
        self.opens = 0
        self.closes = 0
        self._scope: anyio.CancelScope | None = None

    async def open(self, resources: OpenResources) -> None:
        if self.fail_open:
            raise RuntimeError("refusing to open")
        self.opens += 1
        pipe = MessagePipe(resources.channel)
        scope = self._scope = anyio.CancelScope()

        async def echo() -> None:
            with scope:
                try:
                    while True:
                        await pipe.send(self.prefix + await pipe.recv())
                except ConnectionReset:
                    pass

        self.tg.start_soon(echo)

    async def close(self) -> None:
        self.closes += 1
        if self._scope is not None:
            self._scope.cancel()

    async def modify(self, request: ModifyRequest) -> int:
        return 0


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.memfd(1024 * PAGE_SIZE)
    yield mem
    mem.close()


@pytest.fixture
async def tg() -> AsyncIterator[anyio.abc.TaskGroup]:
    async with anyio.create_task_group() as group:
        yield group
        group.cancel_scope.cancel()


def offer_params(name: str = "echo") -> OfferParams:
    return OfferParams(name, Guid.new_random(), IFACE, channel_type=DeviceChannel(True))


async def test_offers_stream_and_echo_round_trip(memory: GuestMemory,
                                                 tg: anyio.abc.TaskGroup) -> None:
    server = VmbusServer(memory)
    device = EchoChannel(tg)
    handle = server.add_child(offer_params(), device)
    client = VmbusClient(server)
    with anyio.fail_after(5):
        offer = await client.offers.receive()
    assert offer.offer.key == handle.key
    free_before = client.allocator.free_pages
    with anyio.fail_after(5):
        channel = await client.open(offer, ring_pages=2)
        assert channel.gpadl_id == channel.block.pfns[1]  # the second page, as upstream
        assert channel.ring_offset == 3 and len(channel.block.pfns) == 6
        pipe = channel.message_pipe()
        for message in (b"hello", b"", bytes(range(256)) * 30):
            await pipe.send(message)
            assert await pipe.recv() == b"echo:" + message
    assert client.allocator.free_pages == free_before - 6
    assert server.inspect()["gpadls"] == {f"{channel.gpadl_id:#x}": {"channel_id": 1, "mapped": 1}}
    await client.modify(channel, 2)
    await channel.close()
    await channel.close()  # idempotent
    assert device.closes == 1 and not handle.is_open
    assert client.allocator.free_pages == free_before
    assert server.inspect()["gpadls"] == {}
    # Opening again uses fresh memory and a fresh runner.
    with anyio.fail_after(5):
        async with client.opened(offer) as again:
            await again.message_pipe().send(b"x")
            assert await again.message_pipe().recv() == b"echo:x"
    assert device.opens == 2 and device.closes == 2
    await client.aclose()


async def test_failed_open_frees_everything(memory: GuestMemory, tg: anyio.abc.TaskGroup) -> None:
    server = VmbusServer(memory)
    device = EchoChannel(tg)
    device.fail_open = True
    server.add_child(offer_params(), device)
    client = VmbusClient(server)
    offer = await client.wait_offer(lambda o: True)
    free = client.allocator.free_pages
    with pytest.raises(ChannelRequestError, match="refusing to open") as info:
        await client.open(offer)
    assert info.value.status == 0x8000FFFF
    assert client.allocator.free_pages == free and server.inspect()["gpadls"] == {}
    assert client.channels == {}
    with pytest.raises(ValueError, match="with VmbusClient"):
        await client.request(offer.channel_id, OpenChannelRequest(OpenRequest(OpenData(1, 1))))
    with pytest.raises(ChannelRequestError, match="cannot close"):
        await client.request(offer.channel_id, CloseRequest())


async def test_a_gpadl_the_server_refuses_frees_the_memory(memory: GuestMemory) -> None:
    server = VmbusServer(memory)
    server.add_child(offer_params(), EchoChannel(None))  # type: ignore[arg-type]
    client = VmbusClient(server, DmaAllocator(memory))
    offer = await client.wait_offer(lambda o: True)
    await client.create_gpadl(offer.channel_id, [900], gpadl_id=5)
    free = client.allocator.free_pages
    with pytest.raises(ChannelRequestError, match="already in use"):
        await client.open(offer, gpadl_id=5)
    assert client.allocator.free_pages == free
    with pytest.raises(ValueError, match="at least one data page"):
        await client.open(offer, ring_pages=0)


async def test_revoke_while_open(memory: GuestMemory, tg: anyio.abc.TaskGroup) -> None:
    server = VmbusServer(memory)
    device = EchoChannel(tg)
    handle = server.add_child(offer_params(), device)
    client = VmbusClient(server)
    offer = await client.wait_offer(lambda o: o.offer.key == handle.key)
    free = client.allocator.free_pages
    channel = await client.open(offer)
    pipe = channel.message_pipe()
    await handle.revoke()
    assert channel.revoked and device.closes == 1
    with anyio.fail_after(5), pytest.raises(ConnectionReset):
        await pipe.recv()
    with pytest.raises(ChannelClosed):
        await channel.channel.wait_for_signal()
    await channel.close()  # frees the memory: the server dropped the GPADL already
    assert client.allocator.free_pages == free
    with anyio.fail_after(5):
        later = server.add_child(offer_params("later"), device)
        assert (await client.wait_offer(lambda o: o.offer.key == later.key)).channel_id == 2


async def test_reconnect_after_restore_continues_on_the_same_rings(
    memory: GuestMemory, tg: anyio.abc.TaskGroup
) -> None:
    params = offer_params()
    first = VmbusServer(memory)
    old_device = EchoChannel(tg)
    first.add_child(params, old_device)
    gone = offer_params("gone")
    first.add_child(gone, EchoChannel(tg))
    client = VmbusClient(first)
    offer = await client.wait_offer(lambda o: o.offer.key == params.key)
    gone_offer = await client.wait_offer(lambda o: o.offer.key == gone.key)
    free = client.allocator.free_pages
    channel = await client.open(offer)
    pipe = channel.message_pipe()
    await pipe.send(b"before")
    with anyio.fail_after(5):
        assert await pipe.recv() == b"echo:before"
    state = first.save()
    # The old server's device goes away with its process; its runner must not read on.
    assert old_device._scope is not None
    old_device._scope.cancel()

    second = VmbusServer(memory)
    second.restore(state)
    device = EchoChannel(tg, prefix=b"restored:")
    handle = second.add_child(params, device)
    result = await handle.restore(was_open=True)
    assert result.open_request is not None
    resources = handle.open_resources
    assert resources is not None
    await device.open(resources)
    await client.reconnect(second)
    assert gone_offer.revoked is not None and gone_offer.revoked.is_set()
    pipe = channel.message_pipe()
    with anyio.fail_after(5):
        await pipe.send(b"after")
        assert await pipe.recv() == b"restored:after"
    await client.aclose()
    assert not handle.is_open and device.closes == 1
    assert client.allocator.free_pages == free and second.inspect()["gpadls"] == {}
