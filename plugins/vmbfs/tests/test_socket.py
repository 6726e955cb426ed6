"""vmbfs over the VMBus socket: a guest in another process (or over the socket in this one)."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from devicehost.config import HostSettings
from devicehost.testing.registry import DeviceSpec, host_with
from devicehost.testing.vmbus import socket_guest_session
from devicehost.vmbus import VmbusTransport
from devicehost_vmbfs.client import VmbfsClient
from devicehost_vmbfs.client_device import VmbfsClientConfig, VmbfsClientDevice, VmbfsReadRunner
from devicehost_vmbfs.device import VmbfsConfig, VmbfsDevice
from devicehost_vmbfs.protocol import BOOT_INSTANCE_ID, IMC_INSTANCE_ID, INTERFACE_ID

STEP = 60.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The socket's both ends run on both backends (overrides the asyncio-only default)."""
    return str(request.param)
BIG = 64 << 20


def no_leftovers(tree: dict[str, Any]) -> None:
    """The host's VMBus inspect tree holds no GPADL and no open channel of any socket guest."""
    vmbus = tree["vmbus"]
    assert [g for g in vmbus["gpadls"].values() if "guest" in g] == []
    assert [c for c in vmbus["channels"] if "guest" in c] == []
    assert vmbus["socket"]["guest"] is None


async def _until(predicate: Callable[[], object]) -> None:
    with anyio.fail_after(STEP):
        while not predicate():
            await anyio.sleep(0.002)


@pytest.mark.anyio
async def test_a_socket_guest_reads_a_file(tmp_path: Path) -> None:
    content = os.urandom(300_000)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "data.bin").write_bytes(content)
    spec = DeviceSpec("fs", "vmbfs", VmbfsConfig(root=str(tmp_path / "dir")))
    async with socket_guest_session({"vmbfs": VmbfsDevice}, [spec]) as session:
        with anyio.fail_after(STEP):
            offer = await session.client.wait_offer(lambda o: o.offer.interface_id == INTERFACE_ID)
            async with session.client.opened(offer) as channel:
                client = VmbfsClient(channel.message_pipe())
                await client.negotiate()
                assert await client.read_file("/data.bin", window=4) == content
                tree = await session.host.inspect()
                (opened,) = [c for c in tree["vmbus"]["channels"] if "guest" in c]
                assert opened["state"] == "open"
            tree = await session.host.inspect()
            assert [c for c in tree["vmbus"]["channels"] if "guest" in c] == []
            assert [g for g in tree["vmbus"]["gpadls"].values() if "guest" in g] == []


@pytest.mark.anyio
async def test_a_socket_guest_and_the_intercept_relay_share_one_host(tmp_path: Path) -> None:
    imc, boot = os.urandom(50_000), os.urandom(70_000)
    (tmp_path / "imc").write_bytes(imc)
    (tmp_path / "boot").write_bytes(boot)
    specs = [DeviceSpec("imc", "vmbfs", VmbfsConfig(file=str(tmp_path / "imc"))),
             DeviceSpec("boot", "vmbfs", VmbfsConfig(file=str(tmp_path / "boot"), name="boot",
                                                     instance_id=str(BOOT_INSTANCE_ID))),
             DeviceSpec("reader", "vmbfs-client", VmbfsClientConfig())]
    classes = {"vmbfs": VmbfsDevice, "vmbfs-client": VmbfsClientDevice}
    async with socket_guest_session(classes, specs) as session:
        with anyio.fail_after(STEP):
            host = session.host
            assert not host.failures, host.failures
            bus = session.client
            offer = await bus.wait_offer(lambda o: o.offer.instance_id == BOOT_INSTANCE_ID)
            # The relay intercepts the IMC instance: the socket guest is never offered it.
            assert [o.offer.instance_id for o in bus.known.values()] == [BOOT_INSTANCE_ID]
            async with bus.opened(offer) as channel:
                client = VmbfsClient(channel.message_pipe())
                await client.negotiate()
                assert await client.read_file("/boot") == boot
            await _until(lambda: host.devices["reader"].runner is not None)
            runner = host.devices["reader"].runner
            assert isinstance(runner, VmbfsReadRunner)
            await runner.finished.wait()
            (read,) = runner.files
            assert read.data == imc
            tree = (await host.inspect())["vmbus"]
            # The relay's channel (host memory) is open; nothing of the socket guest remains.
            (imc_channel,) = [c for c in tree["channels"] if IMC_INSTANCE_ID.__str__() in c["key"]]
            assert imc_channel["state"] == "open" and "guest" not in imc_channel
            assert [g for g in tree["gpadls"].values() if "guest" in g] == []


def _guest_command(socket_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "devicehost_vmbfs.socketguest", str(socket_path), *args]


def _result(stdout: bytes) -> dict[str, Any]:
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]
    (result,) = [line for line in lines if "sha256" in line]
    assert isinstance(result, dict)
    return result


@pytest.mark.anyio
async def test_a_guest_process_killed_mid_read_leaves_nothing_behind(tmp_path: Path) -> None:
    content = os.urandom(8 << 20)
    (tmp_path / "hive").write_bytes(content)
    socket_path = tmp_path / "vmbus.sock"
    spec = DeviceSpec("fs", "vmbfs", VmbfsConfig(file=str(tmp_path / "hive")))
    settings = HostSettings(vmbus_socket=socket_path)
    async with host_with({"vmbfs": VmbfsDevice}, [spec], settings=settings) as host:
        socket_server = host.transport(VmbusTransport).socket
        assert socket_server is not None
        with anyio.fail_after(STEP):
            async with await anyio.open_process(
                _guest_command(socket_path, "/imc.hiv", "--progress"),
                stderr=subprocess.DEVNULL,
            ) as first:
                assert first.stdout is not None
                line = await first.stdout.receive()
                assert b"progress" in line
                tree = await host.inspect()
                assert tree["vmbus"]["socket"]["guest"]["name"] == "socket-guest-1"
                assert [c["state"] for c in tree["vmbus"]["channels"]] == ["open"]
                first.kill()
                assert await first.wait() == -signal.SIGKILL
            await socket_server.wait_idle()
            no_leftovers(await host.inspect())
            assert host.devices["fs"].runner is None  # the device was closed
            second = await anyio.run_process(_guest_command(socket_path, "/imc.hiv"))
            result = _result(second.stdout)
            assert result["size"] == len(content)
            assert result["sha256"] == hashlib.sha256(content).hexdigest()
            await socket_server.wait_idle()
            no_leftovers(await host.inspect())


def _devicehost_command() -> list[str]:
    script = Path(sys.executable).parent / "devicehost"
    return [str(script)] if script.exists() else [sys.executable, "-m", "devicehost.cli"]


def _read_until(stream: Any, text: str, timeout: float, seen: bytearray) -> None:
    deadline = time.monotonic() + timeout
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


def test_devicehost_run_serves_a_guest_process_over_the_vmbus_socket(tmp_path: Path) -> None:
    content = os.urandom(BIG)
    root = tmp_path / "files"
    root.mkdir()
    (root / "big.bin").write_bytes(content)
    socket_path = tmp_path / "vmbus.sock"
    config = tmp_path / "host.toml"
    config.write_text(f'[host]\nvmbus_socket = "{socket_path}"\n\n'
                      f'[[device]]\nplugin = "vmbfs"\nname = "fs"\nroot = "{root}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEHOST_")}
    host = subprocess.Popen([*_devicehost_command(), "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert host.stderr is not None
    log = bytearray()
    try:
        _read_until(host.stderr, "serving VMBus to a guest process", STEP, log)
        # A guest killed in the middle of a read...
        first = subprocess.Popen(_guest_command(socket_path, "/big.bin", "--progress"),
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert first.stdout is not None
            _read_until(first.stdout, "progress", STEP, bytearray())
            first.kill()
            assert first.wait(timeout=STEP) == -signal.SIGKILL
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
            assert first.stdout is not None
            first.stdout.close()
        _read_until(host.stderr, "guest socket-guest-1 disconnected", STEP, log)
        # ... and the next guest reads the whole 64 MiB file.
        second = subprocess.run(_guest_command(socket_path, "/big.bin", "--window", "8",
                                               "--ring-pages", "32"),
                                capture_output=True, timeout=300, check=True)
        result = _result(second.stdout)
        assert result["size"] == BIG
        assert result["sha256"] == hashlib.sha256(content).hexdigest()
        _read_until(host.stderr, "guest socket-guest-2 disconnected", STEP, log)
        host.send_signal(signal.SIGTERM)
        assert host.wait(timeout=STEP) == 0
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        log += host.stderr.read()
        host.stderr.close()
    lines = log.decode().splitlines()
    for name in ("socket-guest-1", "socket-guest-2"):
        (line,) = [line for line in lines if f"guest {name} disconnected" in line]
        # The host's own account after cleaning up: nothing of the guest remains.
        assert line.endswith("it left no GPADL and no open channel"), line
        assert "guest fault" not in line


@pytest.mark.anyio
async def test_the_test_kit_fixture_serves_a_socket_guest(
        devicehost_vmbus_socket_guest: Callable[..., Any], tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"hello over the socket")
    spec = DeviceSpec("fs", "vmbfs", VmbfsConfig(root=str(tmp_path)))
    async with devicehost_vmbus_socket_guest({"vmbfs": VmbfsDevice}, [spec]) as session:
        with anyio.fail_after(STEP):
            assert session.path.exists()
            offer = await session.client.wait_offer(lambda o: True)
            async with session.client.opened(offer) as channel:
                client = VmbfsClient(channel.message_pipe())
                await client.negotiate()
                assert await client.read_file("/a.txt") == b"hello over the socket"
            assert session.transport.socket is not None


@pytest.mark.anyio
async def test_a_socket_guests_open_waits_at_the_gate_of_a_saved_host(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"after the resume")
    spec = DeviceSpec("fs", "vmbfs", VmbfsConfig(root=str(tmp_path)))
    async with socket_guest_session({"vmbfs": VmbfsDevice}, [spec]) as session:
        with anyio.fail_after(STEP):
            host, bus = session.host, session.client
            offer = await bus.wait_offer(lambda o: True)
            await host.save()  # quiesced: nothing a guest asks for runs a device now
            opened = anyio.Event()

            async def open_and_read() -> None:
                async with bus.opened(offer) as channel:
                    opened.set()
                    client = VmbfsClient(channel.message_pipe())
                    await client.negotiate()
                    assert await client.read_file("/a.txt") == b"after the resume"

            async with anyio.create_task_group() as tg:
                tg.start_soon(open_and_read)
                await host.gate.until_waiting(1)  # the socket guest's open, held at the gate
                assert not opened.is_set() and host.devices["fs"].runner is None
                await host.resume()
            assert opened.is_set()
