"""vmbfs in a worker process (``isolation = "process"``): the ring data path stays in the worker;
a worker killed mid-read is revoked and re-offered, and the guest reads the file intact after
reopening; an inline device beside it is unaffected."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from devicehost.host import Host
from devicehost.lifecycle import DeviceState
from devicehost.testing.registry import DeviceSpec, host_with
from devicehost.testing.vmbus import socket_guest_session
from devicehost.vmbus import ChannelClosed, ConnectionReset, IncomingOffer, VmbusTransport
from devicehost.vmbus.client import ClientChannel
from devicehost.worker import WorkerSettings
from devicehost_vmbfs.client import VmbfsClient
from devicehost_vmbfs.device import VmbfsConfig, VmbfsDevice
from devicehost_vmbfs.protocol import BOOT_INSTANCE_ID, IMC_INSTANCE_ID

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The supervisor runs on both backends (the workers run asyncio)."""
    return str(request.param)

STEP = 60.0
SIZE = 4 << 20
ISOLATED = WorkerSettings(isolation="process", restart="on-failure", restart_delay=0.05)


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


async def until(predicate: Callable[[], object]) -> None:
    with anyio.fail_after(STEP):
        while not predicate():
            await anyio.sleep(0.005)


class VsockEcho:
    """An inline vsock device's guest (the in-process virtio driver) echoing what a host
    application sends it through the device's CONNECT socket."""

    def __init__(self, host: Host, base_path: str) -> None:
        self.host = host
        self.base_path = base_path

    async def round_trip(self, size: int) -> None:
        from devicehost.virtio import VirtioTransport
        from devicehost_vsock.guest_stack import GuestSockets, GuestStack

        data = os.urandom(size)
        driver = await self.host.transport(VirtioTransport).connect_driver("vsock",
                                                                            queue_size=256)
        try:
            sockets = GuestSockets(GuestStack(driver, cid=3), rx_buffers=16)
            sockets.listen(1234, echo=True)
            async with anyio.create_task_group() as tg:
                tg.start_soon(sockets.pump)
                stream = await anyio.connect_unix(self.base_path)
                await stream.send(b"CONNECT 1234\n")
                reply = b""
                while b"\n" not in reply:
                    reply += await stream.receive()
                assert reply.startswith(b"OK ")
                echoed = bytearray(reply.partition(b"\n")[2])
                tg.start_soon(stream.send, data)
                while len(echoed) < len(data):
                    echoed += await stream.receive()
                assert digest(echoed) == digest(data)
                await stream.aclose()
                tg.cancel_scope.cancel()
        finally:
            await driver.reset()


def specs(tmp_path: Path, *, content: bytes, beside: bytes | None = None) -> list[DeviceSpec]:
    (tmp_path / "isolated").write_bytes(content)
    out = [DeviceSpec("fs", "vmbfs", VmbfsConfig(file=str(tmp_path / "isolated")),
                      worker=ISOLATED)]
    if beside is not None:
        (tmp_path / "inline").write_bytes(beside)
        out.append(DeviceSpec("inline", "vmbfs",
                              VmbfsConfig(file=str(tmp_path / "inline"), name="boot",
                                          instance_id=str(BOOT_INSTANCE_ID))))
    return out


def worker_pid(host: Host) -> int:
    worker = host.workers.proxies["fs"].worker
    assert worker is not None
    return int(worker.pid)


def channels(host: Host) -> list[dict[str, Any]]:
    tree = host.transport(VmbusTransport).server.inspect()
    return list(tree["channels"])


def held(pid: int) -> tuple[int, int]:
    """How many descriptors process ``pid`` holds and how many mappings of guest memory."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as maps:
        mapped = sum("devicehost-guest" in line for line in maps)
    return fds, mapped


async def read_with(channel: ClientChannel, path: str, *, window: int = 4) -> bytes:
    client = VmbfsClient(channel.message_pipe())
    await client.negotiate()
    return await client.read_file(path, window=window)


async def test_in_process_guest_reads_from_a_worker(tmp_path: Path) -> None:
    content = os.urandom(SIZE)
    async with host_with({"vmbfs": VmbfsDevice}, specs(tmp_path, content=content)) as host:
        transport = host.transport(VmbusTransport)
        client = transport.client()
        with anyio.fail_after(STEP):
            offer = await client.wait_offer(lambda o: o.offer.instance_id == IMC_INSTANCE_ID)
            pid = worker_pid(host)  # the worker answered the offer
            before = held(pid)
            assert before[1] == 0
            async with client.opened(offer) as channel:
                assert digest(await read_with(channel, "/imc.hiv")) == digest(content)
                assert held(pid)[1] > 0  # the worker maps the guest memory itself
                assert pid != os.getpid()
                (fs,) = [d for d in (await host.inspect())["devices"] if d["name"] == "fs"]
                assert fs["state"] == "running"
                # The runner that served the reads is the worker's.
                assert fs["device"]["worker"]["pid"] == pid
                assert fs["device"]["messages"] > SIZE // 12276
            # Closed: the worker released the channel (its mapping and descriptors are gone, the
            # close answered after the release); the supervisor holds no GPADL.
            assert held(pid) == before
            assert transport.server.inspect()["gpadls"] == {}
            # A second open goes to the same worker and works.
            async with client.opened(offer) as channel:
                assert digest(await read_with(channel, "/imc.hiv", window=1)) == digest(content)
            assert worker_pid(host) == pid
            await client.aclose()


async def _kill_mid_read(host: Host, client: VmbfsClient) -> None:
    """Read the file until a reply is in, then SIGKILL the worker; the read must end (the
    guest's channel is closed by the revoke) instead of hanging."""
    first = await client.read("/imc.hiv", 0, 4096)
    assert len(first) == 4096
    os.kill(worker_pid(host), signal.SIGKILL)
    with pytest.raises((ConnectionReset, ChannelClosed)):
        while True:
            await client.read("/imc.hiv", 0, 4096)


async def test_worker_killed_mid_read_is_revoked_and_reoffered(tmp_path: Path) -> None:
    from devicehost_vsock import VsockConfig, VsockDevice

    content, beside = os.urandom(SIZE), os.urandom(1 << 20)
    with tempfile.TemporaryDirectory(prefix="vs") as sock_dir:  # short: a socket path limit
        base = f"{sock_dir}/vsock"
        devices = [*specs(tmp_path, content=content, beside=beside),
                   DeviceSpec("vsock", "vsock", VsockConfig(guest_cid=3, base_path=base))]
        async with host_with({"vmbfs": VmbfsDevice, "vsock": VsockDevice}, devices) as host:
            await _kill_and_reoffer(host, content, beside, VsockEcho(host, base))


async def _kill_and_reoffer(host: Host, content: bytes, beside: bytes, vsock: VsockEcho
                        ) -> None:
    transport = host.transport(VmbusTransport)
    client = transport.client()
    with anyio.fail_after(STEP):
        offer = await client.wait_offer(lambda o: o.offer.instance_id == IMC_INSTANCE_ID)
        inline_offer = await client.wait_offer(
            lambda o: o.offer.instance_id == BOOT_INSTANCE_ID)
        async with client.opened(inline_offer) as inline_channel:
            inline = VmbfsClient(inline_channel.message_pipe())
            await inline.negotiate()
            async with client.opened(offer) as channel:
                first_pid = worker_pid(host)
                old_id = offer.offer.channel_id
                client_fs = VmbfsClient(channel.message_pipe())
                await client_fs.negotiate()
                await _kill_mid_read(host, client_fs)
                assert offer.revoked is not None
                await offer.revoked.wait()  # the guest saw the rescind
                # The inline devices kept serving meanwhile.
                assert digest(await inline.read_file("/boot", window=4)) == digest(beside)
                await vsock.round_trip(1 << 20)
            # Re-offered under a new channel id, served by a new worker.
            again = await client.wait_offer(
                lambda o: o.offer.instance_id == IMC_INSTANCE_ID
                and o.offer.channel_id != old_id)
            async with client.opened(again) as channel:
                assert digest(await read_with(channel, "/imc.hiv")) == digest(content)
                assert worker_pid(host) != first_pid
            assert [g for g in transport.server.inspect()["gpadls"].values()
                    if g["channel_id"] in (old_id, again.offer.channel_id)] == []
            assert digest(await inline.read_file("/boot", window=4)) == digest(beside)
            await vsock.round_trip(1 << 20)
        device = host.devices["fs"]
        assert device.state is not DeviceState.FAILED
        tree = await host.inspect()
        assert tree is not None
        await client.aclose()


async def test_worker_killed_for_good_revokes_the_offer(tmp_path: Path) -> None:
    """``restart = "no"``: the worker SIGKILLed mid-read fails its device (FAILED, with the
    cause) and the host revokes its offer: the guest's read fails and it sees a rescind instead
    of waiting on a device that is gone; no new offer; no GPADL left; the inline device serves."""
    content, beside = os.urandom(SIZE), os.urandom(1 << 20)
    devices = specs(tmp_path, content=content, beside=beside)
    devices[0] = attrs.evolve(devices[0], worker=WorkerSettings(isolation="process"))
    async with host_with({"vmbfs": VmbfsDevice}, devices) as host:
        transport = host.transport(VmbusTransport)
        client = transport.client()
        with anyio.fail_after(STEP):
            offer = await client.wait_offer(lambda o: o.offer.instance_id == IMC_INSTANCE_ID)
            inline_offer = await client.wait_offer(
                lambda o: o.offer.instance_id == BOOT_INSTANCE_ID)
            async with client.opened(offer) as channel:
                fs = VmbfsClient(channel.message_pipe())
                await fs.negotiate()
                await _kill_mid_read(host, fs)
                assert offer.revoked is not None
                await offer.revoked.wait()
            device = host.devices["fs"]
            assert device.state is DeviceState.FAILED
            assert device.failure is not None and "SIGKILL" in device.failure
            assert [c for c in transport.server.inspect()["channels"]
                    if c["key"] == str(offer.offer.key)] == []
            assert transport.server.inspect()["gpadls"] == {}
            async with client.opened(inline_offer) as inline_channel:
                assert digest(await read_with(inline_channel, "/boot")) == digest(beside)
            await client.aclose()


async def test_socket_guest_reads_from_a_worker_and_survives_its_death(tmp_path: Path) -> None:
    content = os.urandom(SIZE)
    async with socket_guest_session({"vmbfs": VmbfsDevice},
                                    specs(tmp_path, content=content)) as session:
        host = session.host
        with anyio.fail_after(STEP):
            offer = await session.client.wait_offer(
                lambda o: o.offer.instance_id == IMC_INSTANCE_ID)
            async with session.client.opened(offer) as channel:
                client = VmbfsClient(channel.message_pipe())
                await client.negotiate()
                assert digest(await client.read_file("/imc.hiv", window=4)) == digest(content)
                old_id = offer.offer.channel_id
                await _kill_mid_read(host, client)
                assert offer.revoked is not None
                await offer.revoked.wait()
            again: IncomingOffer = await session.client.wait_offer(
                lambda o: o.offer.instance_id == IMC_INSTANCE_ID
                and o.offer.channel_id != old_id)
            async with session.client.opened(again) as channel:
                assert digest(await read_with(channel, "/imc.hiv")) == digest(content)
            tree = await host.inspect()
            vmbus = tree["vmbus"]
            assert [g for g in vmbus["gpadls"].values() if "guest" in g] == []


async def test_socket_guest_sees_the_rescind_of_a_worker_dead_for_good(tmp_path: Path) -> None:
    content = os.urandom(SIZE)
    devices = [attrs.evolve(specs(tmp_path, content=content)[0],
                            worker=WorkerSettings(isolation="process"))]
    async with socket_guest_session({"vmbfs": VmbfsDevice}, devices) as session:
        with anyio.fail_after(STEP):
            offer = await session.client.wait_offer(
                lambda o: o.offer.instance_id == IMC_INSTANCE_ID)
            async with session.client.opened(offer) as channel:
                client = VmbfsClient(channel.message_pipe())
                await client.negotiate()
                await _kill_mid_read(session.host, client)
                assert offer.revoked is not None
                await offer.revoked.wait()
            assert session.host.devices["fs"].state is DeviceState.FAILED
            vmbus = (await session.host.inspect())["vmbus"]
            assert vmbus["channels"] == [] and vmbus["gpadls"] == {}


def _children(pid: int, needle: str) -> list[int]:
    """The processes whose parent is ``pid`` and whose command line holds ``needle``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and needle.encode() in command:
            found.append(int(entry))
    return found


def _read_until(stream: Any, text: str, seen: bytearray) -> None:
    deadline = time.monotonic() + STEP
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"{text!r} did not appear:\n{seen.decode(errors='replace')}")
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                pytest.fail(f"stream closed before {text!r}:\n{seen.decode(errors='replace')}")
            seen += chunk


def test_devicehost_run_reoffers_vmbfs_when_its_worker_is_killed(tmp_path: Path) -> None:
    """``devicehost run`` with vmbfs in a worker and a guest process on the VMBus socket: the
    worker SIGKILLed mid-read fails that read, the device is offered again, a new guest process
    reads the file intact, and SIGTERM stops the host cleanly (exit 0: the restart succeeded)."""
    content = os.urandom(SIZE)
    (tmp_path / "hive").write_bytes(content)
    socket_path = tmp_path / "vmbus.sock"
    config = tmp_path / "host.toml"
    config.write_text(f'[host]\nvmbus_socket = "{socket_path}"\n\n'
                      f'[[device]]\nplugin = "vmbfs"\nname = "fs"\nfile = "{tmp_path / "hive"}"\n'
                      'isolation = "process"\nrestart = "on-failure"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEHOST_")}
    script = Path(sys.executable).parent / "devicehost"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "devicehost.cli"]
    guest = [sys.executable, "-m", "devicehost_vmbfs.socketguest", str(socket_path), "/imc.hiv"]
    host = subprocess.Popen([*command, "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert host.stderr is not None
    log = bytearray()
    try:
        _read_until(host.stderr, "serving VMBus to a guest process", log)
        first = subprocess.Popen([*guest, "--progress"], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)
        try:
            assert first.stdout is not None
            _read_until(first.stdout, "progress", bytearray())
            (worker,) = _children(host.pid, "devicehost.worker")
            os.kill(worker, signal.SIGKILL)
            assert first.wait(timeout=STEP) not in (0, -signal.SIGKILL)  # its read failed
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
            assert first.stdout is not None
            first.stdout.close()
        _read_until(host.stderr, "offered again", log)
        second = subprocess.run([*guest, "--window", "8"], capture_output=True, timeout=300,
                                check=True)
        result = json.loads(second.stdout.decode().splitlines()[-1])
        assert (result["size"], result["sha256"]) == (SIZE, digest(content))
        (new_worker,) = _children(host.pid, "devicehost.worker")
        assert new_worker != worker
        host.send_signal(signal.SIGTERM)
        assert host.wait(timeout=STEP) == 0, log.decode(errors="replace")
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        log += host.stderr.read()
        host.stderr.close()
    text = log.decode(errors="replace")
    assert "was killed by SIGKILL" in text
    assert _children(host.pid, "devicehost.worker") == []
