"""vmbfs and its VMBus socket guest across live handovers, two hosts in this process
(tests/handover.py); the same with real processes is in test_handover_process.py."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from devicehost import hookimpl
from devicehost.config import HostSettings
from devicehost.handoff import Handoff, HandoffError
from devicehost.memory import PAGE_SIZE
from devicehost.savedstate import (
    decode_envelope_untrusted,
    decode_state_untrusted,
    encode_envelope,
    entry_for,
)
from devicehost.takeover import Servicing, serve_takeover
from devicehost.testing.registry import DeviceSpec
from devicehost.vmbus import VmbusTransport
from devicehost.vmbus.handover import (
    HandedGuest,
    ParkedSocket,
    SocketHandoverState,
    takeover_refusal,
)
from devicehost.vmbus.messages import (
    CloseChannel,
    GpadlBody,
    GpadlCreated,
    GpadlHeader,
    GpadlTeardown,
    GpadlTorndown,
    encode_message,
)
from devicehost.vmbus.socketclient import SocketVmbusClient
from devicehost_vmbfs.client import VmbfsClient
from devicehost_vmbfs.client_device import VmbfsClientConfig, VmbfsClientDevice
from devicehost_vmbfs.device import VmbfsConfig, VmbfsDevice
from devicehost_vmbfs.protocol import (
    BOOT_INSTANCE_ID,
    IMC_INSTANCE_ID,
    INTERFACE_ID,
    MAX_READ_SIZE,
)

from .handover import InProcessTakeover, start_host

STEP = 60.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Both hosts and the guest run on both backends (overrides the asyncio-only default)."""
    return str(request.param)


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


def _path(settings: HostSettings) -> Path:
    assert settings.vmbus_socket is not None
    return Path(settings.vmbus_socket)


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
            async with SocketVmbusClient.connect(_path(settings), memory_size=4 << 20
                                                 ) as bus:
                offer = await bus.wait_offer(lambda o: o.offer.interface_id == INTERFACE_ID)
                async with bus.opened(offer, ring_pages=8) as channel:
                    client = VmbfsClient(channel.message_pipe())
                    await client.negotiate()
                    data = await _read(client, 0, third)
                    hosts = [old]
                    handled: list[int] = []  # requests each host's vmbfs handled
                    for part in (1, 2):
                        prior = hosts[-1]
                        assert prior.host is not None
                        runner = prior.host.devices["fs"].runner
                        takeover = InProcessTakeover(prior.host)
                        new = await start_host(tg, CLASSES, specs, settings, takeover)
                        assert new.error is None and takeover.committed
                        assert new.host is not None
                        assert new.host.restore_report == {"fs": "restored"}
                        handled.append(runner.core.messages)
                        await prior.stop()
                        assert os.path.exists(_path(settings))  # not unlinked
                        hosts.append(new)
                        data += await _read(client, part * third,
                                            len(content) if part == 2 else (part + 1) * third)
                        tree = await new.host.inspect()
                        guest = tree["vmbus"]["socket"]["guest"]
                        assert guest["name"] == "socket-guest-1" and guest["state"] == "connected"
                        (opened,) = [c for c in tree["vmbus"]["channels"] if "guest" in c]
                        assert opened["channel_id"] == offer.channel_id
                    assert hashlib.sha256(data).digest() == hashlib.sha256(content).digest()
                    # No request lost or answered twice: the hosts handled, together, exactly
                    # the guest's requests (the version request and one per read), and no reply
                    # is left over in the guest's ring.
                    assert new.host is not None
                    handled.append(new.host.devices["fs"].runner.core.messages)
                    reads = sum(-(-(end - start) // MAX_READ_SIZE) for start, end in (
                        (0, third), (third, 2 * third), (2 * third, len(content))))
                    assert sum(handled) == 1 + reads and all(handled[1:])
                    with pytest.raises(anyio.WouldBlock):
                        channel.message_pipe().try_recv()
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
            async with SocketVmbusClient.connect(_path(settings), memory_size=4 << 20
                                                 ) as bus2:
                offer = await bus2.wait_offer(lambda o: o.offer.interface_id == INTERFACE_ID)
                async with bus2.opened(offer) as channel:
                    client = VmbfsClient(channel.message_pipe())
                    await client.negotiate()
                    assert await _read(client, 0, 100_000) == content[:100_000]
            assert socket_server.connections == 2
            await hosts[-1].stop()
        assert not os.path.exists(_path(settings))  # the last host removes it


@pytest.mark.anyio
async def test_a_failed_restore_open_rolls_back_and_the_guest_reads_on(tmp_path: Path) -> None:
    content, specs, settings = _setup(tmp_path, 1 << 20)
    half = len(content) // 2
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(STEP):
            old = await start_host(tg, CLASSES, specs, settings)
            assert old.host is not None
            async with SocketVmbusClient.connect(_path(settings), memory_size=4 << 20
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


class NoSave(VmbfsDevice):
    """vmbfs that cannot save its open channel."""

    @hookimpl
    def save_open(self, ctx: Any, runner: Any) -> Any:
        return None


def _two_devices(tmp_path: Path) -> tuple[bytes, list[DeviceSpec], HostSettings]:
    content, specs, settings = _setup(tmp_path, 200_000)
    specs.append(DeviceSpec("boot", "vmbfs", VmbfsConfig(
        file=str(tmp_path / "hive"), name="boot", instance_id=str(BOOT_INSTANCE_ID))))
    return content, specs, settings


@pytest.mark.anyio
async def test_half_sent_gpadls_pending_teardowns_and_closed_offers_travel(
        tmp_path: Path) -> None:
    """What the guest is in the middle of moves too: a GPADL whose header was sent before the
    handover is completed by its body after it; a teardown of a mapped ring GPADL requested
    before is answered once the channel closes after; an offer the guest has not opened is
    opened on the new host under the same channel id, with no rescind."""
    content, specs, settings = _two_devices(tmp_path)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(STEP):
            old = await start_host(tg, CLASSES, specs, settings)
            assert old.host is not None
            async with SocketVmbusClient.connect(_path(settings), memory_size=4 << 20
                                                 ) as bus:
                imc = await bus.wait_offer(lambda o: o.offer.instance_id == IMC_INSTANCE_ID)
                boot = await bus.wait_offer(lambda o: o.offer.instance_id == BOOT_INSTANCE_ID)
                channel = await bus.open(imc, ring_pages=4)
                # Half a GPADL (one page of two), then a teardown of the open ring's GPADL.
                block = bus.allocator.alloc(2)
                gpadl_id = bus.new_gpadl_id()
                words = (2 * PAGE_SIZE, *block.pfns)
                data = b"".join(w.to_bytes(8, "little") for w in words)
                created = bus._expect(GpadlCreated, gpadl_id)
                connection = _connection(old)
                handled = connection.messages
                await bus.send(GpadlHeader(imc.channel_id, gpadl_id, len(data), 1, data[:16]))
                torndown = bus._expect(GpadlTorndown, channel.gpadl_id)
                await bus.send(GpadlTeardown(imc.channel_id, channel.gpadl_id))
                await _until(lambda: connection.messages == handled + 2)  # both arrived

                takeover = InProcessTakeover(old.host)
                new = await start_host(tg, CLASSES, specs, settings, takeover)
                assert new.error is None and takeover.committed, new.error
                assert new.host is not None
                assert new.host.restore_report["fs"] == "restored"
                await old.stop()

                await bus.send(GpadlBody(gpadl_id, data[16:]))
                reply = await created.wait()
                assert isinstance(reply, GpadlCreated) and reply.status == 0
                tree = await new.host.inspect()
                assert tree["vmbus"]["gpadls"][f"socket-guest-1/{gpadl_id:#x}"]["mapped"] == 0
                await bus.send(CloseChannel(imc.channel_id))
                assert isinstance(await torndown.wait(), GpadlTorndown)
                channel.is_open = False
                bus.channels.pop(imc.channel_id)
                await bus.teardown_gpadl(imc.channel_id, gpadl_id)
                # The offer the guest had not opened: opened on the new host.
                async with bus.opened(boot) as opened:
                    client = VmbfsClient(opened.message_pipe())
                    await client.negotiate()
                    assert await client.read_file("/boot") == content
                assert bus.known.keys() == {imc.channel_id, boot.channel_id}
                assert not any(o.revoked is not None and o.revoked.is_set()
                               for o in (imc, boot))
                assert bus.closed_reason is None
            await new.stop()


async def _until_relay_opened(host: Any) -> None:
    while not host._vmbus_transport().server.in_process_opens():
        await anyio.sleep(0.001)


def _connection(running: Any) -> Any:
    """The host's VMBus socket guest connection."""
    return running.host.transport(VmbusTransport).socket.connected


@pytest.mark.anyio
async def test_a_device_that_cannot_save_its_open_channel_is_named_and_rolled_back(
        tmp_path: Path) -> None:
    content, specs, settings = _setup(tmp_path, 100_000)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(STEP):
            old = await start_host(tg, {"vmbfs": NoSave}, specs, settings)
            assert old.host is not None
            async with SocketVmbusClient.connect(_path(settings), memory_size=4 << 20
                                                 ) as bus:
                offer = await bus.wait_offer(lambda o: o.offer.interface_id == INTERFACE_ID)
                async with bus.opened(offer) as channel:
                    client = VmbfsClient(channel.message_pipe())
                    await client.negotiate()
                    takeover = InProcessTakeover(old.host)
                    new = await start_host(tg, CLASSES, specs, settings, takeover)
                    assert new.error is not None and not takeover.committed
                    assert "device 'fs'" in str(new.error) and "saved nothing" in str(new.error)
                    assert await client.read_file("/imc.hiv") == content
                    assert bus.closed_reason is None
            await old.stop()


@pytest.mark.anyio
async def test_a_host_with_intercepted_client_devices_refuses_naming_the_device(
        tmp_path: Path) -> None:
    """Decision: intercept's client devices (here vmbfs-client over the relay) and channels open
    inside the host are not handed over; the takeover is refused before anything stops, with a
    message naming the device, and the socket guest reads on."""
    content, specs, settings = _two_devices(tmp_path)
    specs.append(DeviceSpec("reader", "vmbfs-client", VmbfsClientConfig()))
    classes = {**CLASSES, "vmbfs-client": VmbfsClientDevice}
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(STEP):
            old = await start_host(tg, classes, specs, settings)
            host = old.host
            assert host is not None and not host.failures
            host.servicing = Servicing(None)
            async with SocketVmbusClient.connect(_path(settings), memory_size=4 << 20
                                                 ) as bus:
                offer = await bus.wait_offer(lambda o: o.offer.instance_id == BOOT_INSTANCE_ID)
                async with bus.opened(offer) as channel:
                    client = VmbfsClient(channel.message_pipe())
                    await client.negotiate()
                    a, b = socket.socketpair()
                    with a, b, pytest.raises(HandoffError) as refused:
                        await serve_takeover(host, {"handoff": 1}, a)
                    assert "device 'reader' is served by InterceptTransport" in str(refused.value)
                    assert await client.read_file("/boot") == content
                    # Behind it: the relay's own channel (host memory) is open, named too.
                    await _until_relay_opened(host)
                    why = takeover_refusal(host)
                    assert why is not None and "device 'fs'" in why
                    assert "open by a client inside this host" in why
                    assert await client.read_file("/boot") == content
            await old.stop()


@pytest.mark.anyio
@pytest.mark.parametrize("other", ["other.sock", None])
async def test_a_new_config_naming_another_vmbus_socket_is_refused(
        tmp_path: Path, other: str | None) -> None:
    content, specs, settings = _setup(tmp_path, 100_000)
    mismatched = HostSettings(vmbus_socket=None if other is None else tmp_path / other)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(STEP):
            old = await start_host(tg, CLASSES, specs, settings)
            assert old.host is not None
            async with SocketVmbusClient.connect(_path(settings), memory_size=4 << 20) as bus:
                offer = await bus.wait_offer(lambda o: o.offer.interface_id == INTERFACE_ID)
                async with bus.opened(offer) as channel:
                    client = VmbfsClient(channel.message_pipe())
                    await client.negotiate()
                    new = await start_host(tg, CLASSES, specs, mismatched,
                                           InProcessTakeover(old.host))
                    assert new.error is not None
                    assert ("this config names" if other else "has no [host] vmbus_socket") in (
                        str(new.error))
                    assert await client.read_file("/imc.hiv") == content
            await old.stop()


@pytest.mark.anyio
async def test_a_guest_connecting_during_the_handover_is_served_by_the_new_host(
        tmp_path: Path) -> None:
    """While parked, the old host accepts no guest: one that connects meanwhile waits in the
    listener's backlog, which moves with the listener, and the new host serves it."""
    _content, specs, settings = _setup(tmp_path, 100_000)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as late:
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(STEP):
                old = await start_host(tg, CLASSES, specs, settings)
                assert old.host is not None
                takeover = InProcessTakeover(
                    old.host, before_confirm=lambda: late.connect(str(_path(settings))))
                new = await start_host(tg, CLASSES, specs, settings, takeover)
                assert new.error is None and new.host is not None
                old_socket = old.host.transport(VmbusTransport).socket
                assert old_socket is not None and old_socket.connections == 0
                await old.stop()
                new_socket = new.host.transport(VmbusTransport).socket
                assert new_socket is not None
                await _until(lambda: new_socket.connections == 1)
                late.shutdown(socket.SHUT_RDWR)
                await new_socket.wait_idle()
                assert new_socket.last_disconnect == "the guest closed the connection"
                await new.stop()


async def _until(predicate: Callable[[], object]) -> None:
    while not predicate():
        await anyio.sleep(0.001)


class TamperingTakeover(InProcessTakeover):
    """Hands the new host a VMBus socket state changed by ``change`` (a hostile old host)."""

    def __init__(self, old: Any, change: Callable[[HandedGuest], HandedGuest]) -> None:
        super().__init__(old)
        self.change = change

    async def request(self) -> Handoff:
        handoff = await super().request()
        entries = decode_envelope_untrusted(handoff.envelope)
        for index, entry in enumerate(entries):
            if entry.device == "@vmbus-socket":
                state = decode_state_untrusted(entry, SocketHandoverState)
                assert state.guest is not None
                state = attrs.evolve(state, guest=self.change(state.guest))
                entries[index] = entry_for("@vmbus-socket", "host", state)
        return Handoff(encode_envelope(entries), handoff.fds)


def _ring_outside_memory(guest: HandedGuest) -> HandedGuest:
    (gpadl,) = guest.gpadls
    pfns = (1 << 40,) * (len(gpadl.buf) - 1)  # pages far outside the guest's memory
    return attrs.evolve(guest, gpadls=(attrs.evolve(gpadl, buf=(gpadl.buf[0], *pfns)),))


def _open_swapped_signals(guest: HandedGuest) -> HandedGuest:
    (opened,) = guest.opens
    return attrs.evolve(guest, opens=(attrs.evolve(
        opened, to_host=opened.to_guest, to_guest=opened.to_host),))


def _offer_of_another_device(guest: HandedGuest) -> HandedGuest:
    (offer,) = guest.sent
    return attrs.evolve(guest, sent=(attrs.evolve(
        offer, instance_id="00000000-0000-0000-0000-000000000001"),))


@pytest.mark.anyio
@pytest.mark.parametrize(("change", "blame"), [
    (_ring_outside_memory, "device 'fs'"),
    (_open_swapped_signals, "guest-to-host signal"),
    (_offer_of_another_device, "which no configured device offers"),
])
async def test_a_hostile_handed_over_state_is_refused_and_the_old_host_serves_on(
        tmp_path: Path, change: Callable[[HandedGuest], HandedGuest], blame: str) -> None:
    content, specs, settings = _setup(tmp_path, 100_000)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(STEP):
            old = await start_host(tg, CLASSES, specs, settings)
            assert old.host is not None
            async with SocketVmbusClient.connect(_path(settings), memory_size=4 << 20) as bus:
                offer = await bus.wait_offer(lambda o: o.offer.interface_id == INTERFACE_ID)
                async with bus.opened(offer) as channel:
                    client = VmbfsClient(channel.message_pipe())
                    await client.negotiate()
                    takeover = TamperingTakeover(old.host, change)
                    new = await start_host(tg, CLASSES, specs, settings, takeover)
                    assert new.error is not None and not takeover.committed
                    assert blame in str(new.error)
                    assert await client.read_file("/imc.hiv") == content
                    assert bus.closed_reason is None
            await old.stop()


@pytest.mark.anyio
@pytest.mark.parametrize("commit", [True, False])
async def test_replies_queued_while_parked_are_sent_once_by_whoever_serves_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        commit: bool) -> None:
    """A reply a background step makes while the connection is parked (here: a GPADL_TORNDOWN,
    queued just before the capture) reaches the guest once: from the new host after a commit,
    from the old one after a rollback."""
    content, specs, settings = _setup(tmp_path, 100_000)
    original = ParkedSocket.capture

    def capture(self: ParkedSocket, envelope: bytes) -> Any:
        assert self.connection is not None
        self.connection.outbox.append(encode_message(GpadlTorndown(0x77)))
        return original(self, envelope)

    monkeypatch.setattr(ParkedSocket, "capture", capture)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(STEP):
            old = await start_host(tg, CLASSES, specs, settings)
            assert old.host is not None
            async with SocketVmbusClient.connect(_path(settings), memory_size=4 << 20) as bus:
                offer = await bus.wait_offer(lambda o: o.offer.interface_id == INTERFACE_ID)
                async with bus.opened(offer) as channel:
                    client = VmbfsClient(channel.message_pipe())
                    await client.negotiate()
                    torndown = bus._expect(GpadlTorndown, 0x77)
                    classes = CLASSES if commit else {"vmbfs": FailingRestore}
                    takeover = InProcessTakeover(old.host)
                    new = await start_host(tg, classes, specs, settings, takeover)
                    assert takeover.committed is commit
                    if commit:
                        await old.stop()
                    assert await torndown.wait() == GpadlTorndown(0x77)
                    assert await client.read_file("/imc.hiv") == content
            await (new if commit else old).stop()
    assert "unexpected GpadlTorndown" not in caplog.text
