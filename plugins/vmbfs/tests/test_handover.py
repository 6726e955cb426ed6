"""vmbfs and its VMBus socket guest across live handovers, two hosts in this process
(tests/handover.py); the same with real processes is in test_handover_process.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from devicehost import hookimpl
from devicehost.config import HostSettings
from devicehost.testing.registry import DeviceSpec
from devicehost.vmbus import VmbusTransport
from devicehost.vmbus.socketclient import SocketVmbusClient
from devicehost_vmbfs.client import VmbfsClient
from devicehost_vmbfs.device import VmbfsConfig, VmbfsDevice
from devicehost_vmbfs.protocol import INTERFACE_ID, MAX_READ_SIZE

from .handover import InProcessTakeover, start_host

STEP = 60.0
CLASSES: dict[str, type[Any]] = {"vmbfs": VmbfsDevice}


class FailingRestore(VmbfsDevice):
    """vmbfs whose restore_open raises (a new plugin version that cannot continue)."""

    @hookimpl
    def restore_open(self, ctx: Any, state: Any, resources: Any) -> Any:
        raise RuntimeError("this vmbfs cannot continue the channel")


def _setup(tmp_path: Path, size: int) -> tuple[bytes, list[DeviceSpec], HostSettings]:
    content = os.urandom(size)
    (tmp_path / "hive").write_bytes(content)
    specs = [DeviceSpec("fs", "vmbfs", VmbfsConfig(file=str(tmp_path / "hive")))]
    return content, specs, HostSettings(vmbus_socket=tmp_path / "vmbus.sock")


async def _read(client: VmbfsClient, start: int, end: int) -> bytes:
    out = bytearray()
    for offset in range(start, end, MAX_READ_SIZE):
        out += await client.read("/imc.hiv", offset, min(MAX_READ_SIZE, end - offset))
    return bytes(out)


@pytest.mark.anyio
async def test_the_socket_guest_reads_on_across_two_handovers(tmp_path: Path) -> None:
    content, specs, settings = _setup(tmp_path, 3 << 20)
    third = len(content) // 3
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(STEP):
            old = await start_host(tg, CLASSES, specs, settings)
            assert old.host is not None
            async with SocketVmbusClient.connect(settings.vmbus_socket, memory_size=4 << 20
                                                 ) as bus:
                offer = await bus.wait_offer(lambda o: o.offer.interface_id == INTERFACE_ID)
                async with bus.opened(offer, ring_pages=8) as channel:
                    client = VmbfsClient(channel.message_pipe())
                    await client.negotiate()
                    data = await _read(client, 0, third)
                    hosts = [old]
                    for part in (1, 2):
                        prior = hosts[-1]
                        assert prior.host is not None
                        takeover = InProcessTakeover(prior.host)
                        new = await start_host(tg, CLASSES, specs, settings, takeover)
                        assert new.error is None and takeover.committed
                        assert new.host is not None
                        assert new.host.restore_report == {"fs": "restored"}
                        await prior.stop()
                        assert os.path.exists(settings.vmbus_socket)  # not unlinked
                        hosts.append(new)
                        data += await _read(client, part * third,
                                            len(content) if part == 2 else (part + 1) * third)
                        tree = await new.host.inspect()
                        guest = tree["vmbus"]["socket"]["guest"]
                        assert guest["name"] == "socket-guest-1" and guest["state"] == "connected"
                        (opened,) = [c for c in tree["vmbus"]["channels"] if "guest" in c]
                        assert opened["channel_id"] == offer.channel_id
                    assert hashlib.sha256(data).digest() == hashlib.sha256(content).digest()
                    # The guest saw no rescind and no close.
                    assert offer.revoked is None or not offer.revoked.is_set()
                    assert bus.closed_reason is None
                    assert bus.known.keys() == {offer.channel_id}
                # A close after the handovers reaches the new host.
                last = hosts[-1].host
                assert last is not None
                tree = await last.inspect()
                assert [c for c in tree["vmbus"]["channels"] if "guest" in c] == []
            socket_server = last.transport(VmbusTransport).socket
            assert socket_server is not None
            await socket_server.wait_idle()
            # A later guest connects to the same path, served by the last host.
            async with SocketVmbusClient.connect(settings.vmbus_socket, memory_size=4 << 20
                                                 ) as bus2:
                offer = await bus2.wait_offer(lambda o: o.offer.interface_id == INTERFACE_ID)
                async with bus2.opened(offer) as channel:
                    client = VmbfsClient(channel.message_pipe())
                    await client.negotiate()
                    assert await _read(client, 0, 100_000) == content[:100_000]
            assert socket_server.connections == 2
            await hosts[-1].stop()
        assert not os.path.exists(settings.vmbus_socket)  # the last host removes it


@pytest.mark.anyio
async def test_a_failed_restore_open_rolls_back_and_the_guest_reads_on(tmp_path: Path) -> None:
    content, specs, settings = _setup(tmp_path, 1 << 20)
    half = len(content) // 2
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(STEP):
            old = await start_host(tg, CLASSES, specs, settings)
            assert old.host is not None
            async with SocketVmbusClient.connect(settings.vmbus_socket, memory_size=4 << 20
                                                 ) as bus:
                offer = await bus.wait_offer(lambda o: o.offer.interface_id == INTERFACE_ID)
                async with bus.opened(offer, ring_pages=8) as channel:
                    client = VmbfsClient(channel.message_pipe())
                    await client.negotiate()
                    data = await _read(client, 0, half)
                    takeover = InProcessTakeover(old.host)
                    new = await start_host(tg, {"vmbfs": FailingRestore}, specs, settings,
                                           takeover)
                    assert new.error is not None and not takeover.committed
                    assert "device 'fs'" in str(new.error)
                    assert "this vmbfs cannot continue the channel" in str(new.error)
                    data += await _read(client, half, len(content))
                    assert data == content
                    assert bus.closed_reason is None
                    assert offer.revoked is None or not offer.revoked.is_set()
            await old.stop()
