"""The file descriptor limit (devicehost.fdlimit), and ``devicehost run`` running out of them.

The last test is issue 14's scenario: ``devicehost run`` under a low RLIMIT_NOFILE, host peers
holding every descriptor of one vsock device's listener, then a VMM connecting to another device:
the host keeps running, logs one episode per listener, and serves everyone once descriptors free
up; SIGTERM then stops it with exit code 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from devicehost.config import DeviceConfig, HostConfig
from devicehost.fdlimit import HOST_FDS, TRANSPORT_FDS, declared_fds, fd_budget
from devicehost.memory import GuestMemory
from devicehost.testing.vhost_user import VhostUserFrontend
from devicehost.virtio import VERSION_1
from devicehost.virtio.vhost_message import USER_F_PROTOCOL_FEATURES

pytestmark = pytest.mark.anyio


def devicehost_command() -> list[str]:
    script = Path(sys.executable).parent / "devicehost"
    return [str(script)] if script.exists() else [sys.executable, "-m", "devicehost.cli"]


def limited(soft: int, hard: int) -> Any:
    """A preexec_fn that sets the child's RLIMIT_NOFILE."""
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return preexec


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEHOST_")}
    env.update(extra)
    return env


# -- declarations and the budget ---------------------------------------------------------------


@attrs.frozen
class Cfg:
    connections: int = 10


class Declares:
    @staticmethod
    def max_fds(config: Cfg) -> int:
        return config.connections * 2


class Silent:
    pass


class Broken:
    @classmethod
    def max_fds(cls, config: Cfg) -> int:
        raise RuntimeError("boom")


class Nonsense:
    @staticmethod
    def max_fds(config: Cfg) -> object:
        return -3


def test_a_device_declares_its_descriptors_through_max_fds() -> None:
    assert declared_fds(Declares, Cfg(7)) == 14
    assert declared_fds(Silent, Cfg()) == 0
    with pytest.raises(ValueError, match=r"Broken\.max_fds failed: RuntimeError\('boom'\)"):
        declared_fds(Broken, Cfg())
    with pytest.raises(ValueError, match=r"Nonsense\.max_fds returned -3, not a count"):
        declared_fds(Nonsense, Cfg())


class FakeRegistry:
    device_classes = {"declares": Declares, "silent": Silent, "broken": Broken}


def test_the_budget_adds_host_transport_and_declared_descriptors() -> None:
    config = HostConfig((
        DeviceConfig("a", "declares", Cfg(100)), DeviceConfig("b", "silent", Cfg()),
        DeviceConfig("c", "broken", Cfg()),
    ))
    budget = fd_budget(FakeRegistry(), config)  # type: ignore[arg-type]
    assert budget.needed == HOST_FDS + 3 * TRANSPORT_FDS + 200
    assert (budget.soft, budget.hard) == resource.getrlimit(resource.RLIMIT_NOFILE)
    lines = budget.report()
    assert lines[1] == (
        f"file descriptors the devices can hold: up to {budget.needed} (host {HOST_FDS},"
        f" declares 'a' {TRANSPORT_FDS + 200}, silent 'b' {TRANSPORT_FDS},"
        f" broken 'c' {TRANSPORT_FDS})"
    )
    assert "warning: device 'c': Broken.max_fds failed: RuntimeError('boom')" in lines


def test_run_raises_its_soft_limit_to_the_hard_one() -> None:
    code = ("import resource; from devicehost.fdlimit import raise_soft_limit;"
            " print(raise_soft_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60, preexec_fn=limited(100, 333)).stdout
    assert out.strip() == "(100, 333) (333, 333)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60, preexec_fn=limited(333, 333)).stdout
    assert out.strip() == "(333, 333) (333, 333)"


VSOCK_CONFIG = """\
[[device]]
plugin = "vsock"
name = "vsock0"
base_path = "{d}/v0"
"""


@pytest.mark.parametrize(("hard", "verdict"), [
    (512, "warning: the hard limit 512 is below the {need} descriptors the devices can hold"),
    (4096, "file descriptors: enough"),
])
def test_doctor_reports_the_limit_against_the_configured_devices(
    tmp_path: Path, hard: int, verdict: str
) -> None:
    config = tmp_path / "host.toml"
    config.write_text(VSOCK_CONFIG.format(d=tmp_path))
    proc = subprocess.run(
        [*devicehost_command(), "doctor", "--config", str(config)], capture_output=True,
        text=True, timeout=60, env=clean_env(DEVICEHOST_LOAD_PLUGINS="vsock"),
        preexec_fn=limited(256, hard),
    )
    assert proc.returncode == 0, proc.stderr
    # vsock: 1024 connections, two listeners (stream, SEQPACKET), epoll, 64 being refused.
    vsock = 1024 + 3 + 64
    need = HOST_FDS + TRANSPORT_FDS + vsock
    lines = proc.stdout.splitlines()
    assert (f"file descriptors: soft limit 256, hard limit {hard}; devicehost run raises the"
            f" soft limit to {hard}") in lines
    assert (f"file descriptors the devices can hold: up to {need}"
            f" (host {HOST_FDS}, vsock 'vsock0' {TRANSPORT_FDS + vsock})") in lines
    assert [line for line in lines if line.startswith(verdict.format(need=need))]


# -- devicehost run out of descriptors ----------------------------------------------------------

RUN_CONFIG = """\
[[device]]
plugin = "vsock"
name = "busy"
base_path = "{d}/busy"
vhost_user_socket = "{d}/busy.vu"
connect_timeout = 600

[[device]]
plugin = "vsock"
name = "calm"
guest_cid = 4
base_path = "{d}/calm"
vhost_user_socket = "{d}/calm.vu"
"""
#: The child's descriptor limits: it raises its soft limit to the hard one, then runs out.
SOFT, HARD = 200, 300


class Stderr:
    """The child's stderr, read as it comes."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        self.fd = proc.stderr.fileno()
        os.set_blocking(self.fd, False)
        self.proc = proc
        self.text = ""

    async def wait_for(self, pattern: str) -> None:
        while not re.search(pattern, self.text):
            if self.proc.poll() is not None:
                pytest.fail(f"devicehost run ended ({self.proc.returncode}):\n{self.text}")
            await anyio.wait_readable(self.fd)
            with contextlib.suppress(BlockingIOError):
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    pytest.fail(f"stderr closed before {pattern!r}:\n{self.text}")
                self.text += chunk.decode()

    def drain(self) -> str:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.fd, 65536):
                self.text += chunk.decode()
        return self.text


@pytest.fixture
def short_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="fx")  # Unix socket paths must stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


FEATURES = 1 << VERSION_1 | 1 << USER_F_PROTOCOL_FEATURES | 0x1


async def test_run_survives_running_out_of_descriptors(short_dir: str) -> None:
    from devicehost_vsock.guest_stack import GuestSockets, GuestStack

    d = short_dir
    config = Path(d) / "host.toml"
    config.write_text(RUN_CONFIG.format(d=d))
    proc = subprocess.Popen(
        [*devicehost_command(), "run", "--config", str(config)], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env=clean_env(DEVICEHOST_LOAD_PLUGINS="vsock"),
        preexec_fn=limited(SOFT, HARD),
    )
    err = Stderr(proc)
    memories = [GuestMemory.memfd(size) for size in (4 << 20, 16 << 20)]
    peers: list[socket.socket] = []
    try:
        with anyio.fail_after(120):
            await err.wait_for(r"ready: calm \(vsock, ")
            assert f"file descriptor limit raised from {SOFT} to {HARD}" in err.text
            # The busy device's VMM starts it (its listener is bound) and keeps rx buffers posted.
            vmm_a = await VhostUserFrontend.connect(f"{d}/busy.vu", memories[0])
            await vmm_a.realize()
            await vmm_a.start(FEATURES)
            GuestStack(vmm_a, cid=3).post_rx(8)
            await err.wait_for(re.escape(f"host sockets at {d}/busy"))
            # Host peers connect and say nothing, more than the host has descriptors for: it
            # takes what it can, the rest wait in the listener's backlog (blocking connects wait
            # for room in it; the connect deadline is 10 minutes).
            def connect_peers() -> None:
                for _ in range(HARD + 20):
                    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    peers.append(peer)
                    peer.connect(f"{d}/busy")  # blocking: waits for room in the backlog

            # (If the backlog stayed full the thread is abandoned at the timeout; killing the
            # host in ``finally`` ends its connect.)
            await anyio.to_thread.run_sync(connect_peers, abandon_on_cancel=True)
            await err.wait_for(re.escape(f"vsock listener {d}/busy: cannot accept connections:"
                                         " Too many open files (EMFILE)"))
            # Another device's VMM connects: queued, not accepted yet, and nothing breaks.
            vmm_b = await VhostUserFrontend.connect(f"{d}/calm.vu", memories[1])
            async with anyio.create_task_group() as tg:
                tg.start_soon(vmm_b.realize)
                await err.wait_for(re.escape(f"vhost-user socket {d}/calm.vu: cannot accept"
                                             " connections: Too many open files (EMFILE)"))
                assert proc.poll() is None
                for peer in peers:  # descriptors come free: the host catches up
                    peer.close()
            await err.wait_for(re.escape(f"vhost-user socket {d}/calm.vu: accepting connections"
                                         " again"))
            await err.wait_for(re.escape(f"vsock listener {d}/busy: accepting connections again"))
            # The second device is served for real: data through it, checksummed.
            await vmm_b.start(FEATURES)
            sockets = GuestSockets(GuestStack(vmm_b, cid=4), rx_buffers=16)
            sockets.listen(1234, echo=True)
            tg_pump = anyio.create_task_group()
            async with tg_pump:
                tg_pump.start_soon(sockets.pump)
                await err.wait_for(re.escape(f"host sockets at {d}/calm"))
                host = await anyio.connect_unix(f"{d}/calm")
                await host.send(b"CONNECT 1234\n")
                reply = b""
                while not reply.endswith(b"\n"):
                    reply += await host.receive(1)
                assert reply.startswith(b"OK ")
                data = os.urandom(256 * 1024)
                await host.send(data)
                echoed = b""
                while len(echoed) < len(data):
                    echoed += await host.receive()
                assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
                await host.aclose()
                tg_pump.cancel_scope.cancel()
            await vmm_a.aclose()
            await vmm_b.aclose()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        for peer in peers:
            peer.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        text = err.drain()
        print(text)
        assert proc.stderr is not None
        proc.stderr.close()
        for memory in memories:
            memory.close()
    # One episode per listener: one warning and one recovery line each, no traceback.
    assert text.count(f"vsock listener {d}/busy: cannot accept connections") == 1, text
    assert text.count(f"vhost-user socket {d}/calm.vu: cannot accept connections") == 1, text
    assert text.count("accepting connections again") == 2, text
    assert "Traceback" not in text
