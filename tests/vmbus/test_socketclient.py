"""SocketVmbusClient: the guest side of the VMBus socket, against the real socket server."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from devicehost.vmbus.messages import Version
from devicehost.vmbus.pipe import ConnectionReset
from devicehost.vmbus.socketclient import SocketClientError, SocketVmbusClient, sealed_memory
from tests.vmbus.socketharness import socket_bus

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "vmbus.sock"


async def test_negotiates_the_newest_version_and_lists_offers(path: Path) -> None:
    async with socket_bus(path) as bus, SocketVmbusClient.connect(path) as client:
        with anyio.fail_after(30):
            assert client.version == Version.COPPER
            assert sorted(client.known) == [h.channel_id for h in bus.handles]


async def test_falls_back_to_an_older_version(path: Path) -> None:
    async with socket_bus(path), SocketVmbusClient.connect(
            path, versions=[0x00070000, Version.WIN8_1]) as client:
        assert client.version == Version.WIN8_1


async def test_no_acceptable_version_is_an_error(path: Path) -> None:
    async with socket_bus(path):
        with pytest.raises(SocketClientError, match="none of the versions"):
            async with SocketVmbusClient.connect(path, versions=[0x00070000]):
                pass


async def test_open_close_frees_memory_and_leaves_nothing_on_the_host(path: Path) -> None:
    async with socket_bus(path) as bus, SocketVmbusClient.connect(path) as client:
        with anyio.fail_after(30):
            free = client.allocator.free_pages
            offer = await client.wait_offer(lambda o: o.channel_id == bus.handles[1].channel_id)
            channel = await client.open(offer, ring_pages=2)
            assert bus.devices[1].log == ["open dev1"]
            assert client.allocator.free_pages == free - 6
            assert await client.modify(channel, 2) == 0
            await channel.close()
            assert bus.devices[1].log == ["open dev1", "modify dev1 2", "close dev1"]
            assert client.allocator.free_pages == free
            assert bus.remote_state() == ({}, [])


async def test_a_refused_open_tears_its_gpadl_down(path: Path) -> None:
    async with socket_bus(path) as bus, SocketVmbusClient.connect(path) as client:
        with anyio.fail_after(30):
            bus.devices[0].fail_open = True
            free = client.allocator.free_pages
            offer = await client.wait_offer(lambda o: o.channel_id == bus.handles[0].channel_id)
            with pytest.raises(SocketClientError, match="refused to open") as info:
                await client.open(offer)
            assert info.value.status == 0x8000FFFF
            assert client.allocator.free_pages == free
            assert bus.remote_state() == ({}, [])


async def test_a_rescind_resets_a_waiting_pipe(path: Path) -> None:
    async with socket_bus(path) as bus, SocketVmbusClient.connect(path) as client:
        with anyio.fail_after(30):
            handle = bus.handles[0]
            offer = await client.wait_offer(lambda o: o.channel_id == handle.channel_id)
            channel = await client.open(offer)
            pipe = channel.message_pipe()
            async with anyio.create_task_group() as tg:
                async def revoke() -> None:
                    await anyio.wait_all_tasks_blocked()
                    await handle.revoke()

                tg.start_soon(revoke)
                # The host's close of its pipe end (or the rescind) resets the waiting pipe.
                with pytest.raises(ConnectionReset):
                    await pipe.recv()
            assert offer.revoked is not None
            await offer.revoked.wait()  # the RESCIND_CHANNEL_OFFER arrives
            assert channel.revoked
            await channel.close()  # frees the memory, releases the id
            assert bus.remote_state() == ({}, [])


async def test_the_host_going_away_resets_waiting_pipes(path: Path) -> None:
    memory = sealed_memory(1 << 20)
    try:
        async with socket_bus(path) as bus, SocketVmbusClient.connect(path, memory=memory) as c:
            with anyio.fail_after(30):
                offer = await c.wait_offer(lambda o: True)
                pipe = (await c.open(offer)).message_pipe()
                async with anyio.create_task_group() as tg:
                    async def stop_host() -> None:
                        await anyio.wait_all_tasks_blocked()
                        await bus.socket.aclose()

                    tg.start_soon(stop_host)
                    with pytest.raises(ConnectionReset):
                        await pipe.recv()
                assert c.closed_reason is not None
                with pytest.raises(SocketClientError, match="closed"):
                    await c.wait_offer(lambda o: False)
    finally:
        memory.close()
