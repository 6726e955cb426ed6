"""A live vhost-user session handed over by `devicehost run --takeover`, the VMM unaware.

The device is the third-party test plugin ``dh_vstream`` (tests/thirdparty/src/dh_vstream.py),
served over vhost-user; this test plays the VMM with :class:`VhostUserFrontend` on one
connection that must never close. A guest->device stream is checked by the device's CRC-32 and
byte count (read back through GET_CONFIG), the device->guest stream against the pattern the
device writes; both run while the host is handed over, and the device holds chains across
awaits, so chains in flight at the stop must be replayed exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import anyio
import pytest

from devicehost.memory import GuestMemory
from devicehost.testing.vhost_user import VhostUserFrontend
from devicehost.virtio import RING_EVENT_IDX
from devicehost.virtio.vhost_message import (
    F_NEED_REPLY,
    F_VERSION,
    ConfigPayload,
    Request,
    encode_config,
    encode_u64,
)

DEADLINE = 60.0
READY = "devicehost.host: ready\n"
PERIOD = 65521
BLOCK = random.Random(7).randbytes(PERIOD + 65536)  # dh_vstream's pattern
CHUNK = 4096

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _command() -> list[str]:
    script = Path(sys.executable).parent / "devicehost"
    return [str(script)] if script.exists() else [sys.executable, "-m", "devicehost.cli"]


class Watched:
    """A child process whose stderr is collected by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env)
        self.output = ""
        self.done = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            with self._cond:
                self.output += raw.decode(errors="replace")
                self._cond.notify_all()
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def _wait_for(self, text: str) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: text in self.output or self.done,
                                       DEADLINE) and text in self.output

    async def wait_for(self, text: str) -> None:
        if not await anyio.to_thread.run_sync(self._wait_for, text):
            pytest.fail(f"{text!r} did not appear; stderr:\n{self.output}")

    async def wait(self) -> int:
        code: int = await anyio.to_thread.run_sync(lambda: self.proc.wait(timeout=DEADLINE))
        await anyio.to_thread.run_sync(self._thread.join, DEADLINE)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._thread.join(DEADLINE)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class Setup:
    def __init__(self, tmp_path: Path, site: Path) -> None:
        self.tmp = tmp_path
        self.socket = tmp_path / "vstream.sock"
        self.control = tmp_path / "control.sock"
        self.config = tmp_path / "host.toml"
        self.config.write_text(
            f'[host]\ncontrol_socket = "{self.control}"\n\n'
            f'[[device]]\nplugin = "vstream"\nname = "vs"\n'
            f'vhost_user_socket = "{self.socket}"\n')
        self.site = site
        self.procs: list[Watched] = []

    def start(self, *extra: str, **env: str) -> Watched:
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("DEVICEHOST_", "DH_VSTREAM_", "NOTIFY_SOCKET"))}
        base.update({"PYTHONPATH": str(self.site), "DEVICEHOST_LOAD_PLUGINS": "vstream", **env})
        proc = Watched([*_command(), "run", "--config", str(self.config), *extra], base)
        self.procs.append(proc)
        return proc


@pytest.fixture
def setup(tmp_path: Path, thirdparty: ModuleType) -> Iterator[Setup]:
    site = tmp_path / "site"
    thirdparty.write_installed(site, thirdparty.VSTREAM)
    result = Setup(tmp_path, site)
    try:
        yield result
    finally:
        for proc in result.procs:
            proc.stop()
        for proc in result.procs:  # shown only when the test fails
            print(f"----- pid {proc.proc.pid} -----\n{proc.output}")


class Guest:
    """The VMM and its guest driver: one vhost-user connection, two streams."""

    def __init__(self, front: VhostUserFrontend) -> None:
        self.front = front
        self.rng = random.Random(11)
        self.sent = 0
        self.crc = 0
        self.received = 0
        self.progress = anyio.Event()
        self.stopping = False

    async def config(self) -> tuple[int, int, int, int]:
        raw = await self.front.call(Request.GET_CONFIG,
                                    encode_config(ConfigPayload(0, 24, 0, bytes(24))))
        tx_bytes, tx_crc, rx_bytes, pid = struct.unpack("<QIQI", raw[12:])
        return tx_bytes, tx_crc, rx_bytes, pid

    def _moved(self) -> None:
        self.progress.set()
        self.progress = anyio.Event()

    async def tx(self) -> None:
        q = self.front.queue(0)
        outstanding = 0
        while not self.stopping or outstanding:
            while not self.stopping and outstanding < 16:
                data = self.rng.randbytes(CHUNK)
                q.add([data])
                self.crc = zlib.crc32(data, self.crc)
                self.sent += len(data)
                outstanding += 1
            q.kick()
            await q.wait_used()
            outstanding -= 1
            self._moved()

    async def rx(self) -> None:
        q = self.front.queue(1)
        outstanding = 0
        while not self.stopping or outstanding:
            while not self.stopping and outstanding < 16:
                q.add(writable=[CHUNK])
                outstanding += 1
            q.kick()
            used = await q.wait_used()
            outstanding -= 1
            start = self.received % PERIOD
            assert used.data == BLOCK[start : start + CHUNK], (
                f"device->guest bytes at {self.received} are not the stream's")
            self.received += len(used.data)
            self._moved()

    async def progressed(self, chunks: int = 8) -> None:
        for _ in range(chunks):
            await self.progress.wait()


async def _connect(setup: Setup) -> tuple[VhostUserFrontend, GuestMemory]:
    memory = GuestMemory.memfd(4 << 20)
    front = await VhostUserFrontend.connect(str(setup.socket), memory)
    features, _config = await front.realize(24)
    await front.start(features, queue_size=64, event_idx=bool(features >> RING_EVENT_IDX & 1))
    return front, memory


async def _during_handoff(front: VhostUserFrontend) -> None:
    """What the VMM sends while the host is being handed over: a SET_VRING_CALL (a new fd for
    the same eventfd) asking for an ack, and a GET_CONFIG; sent, not yet answered."""
    call = front.queue(1).call_doorbell
    fd = getattr(call, "fd", None)
    assert fd is not None
    dup = os.dup(fd)
    front.own_fds.append(dup)
    await front.send(Request.SET_VRING_CALL, encode_u64(1), [dup],
                     flags=F_VERSION | F_NEED_REPLY)
    await front.send(Request.GET_CONFIG, encode_config(ConfigPayload(0, 24, 0, bytes(24))))


async def _answers_after_handoff(front: VhostUserFrontend) -> int:
    """Each message sent during the handoff answered once, in order; returns the pid that
    answered the GET_CONFIG."""
    assert await front.reply(Request.SET_VRING_CALL) == encode_u64(0)
    raw = await front.reply(Request.GET_CONFIG)
    pid: int = struct.unpack("<QIQI", raw[12:])[3]
    # A duplicated answer would be read here instead of the reply to this request.
    assert await front.get_u64(Request.GET_QUEUE_NUM) == 2
    return pid


async def test_three_handovers_mid_stream_keep_the_vmm_connection_and_every_byte(
        setup: Setup) -> None:
    old = setup.start()
    await old.wait_for(READY)
    front, memory = await _connect(setup)
    guest = Guest(front)
    pids = [old.proc.pid]
    try:
        with anyio.fail_after(2 * DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(guest.tx)
                tg.start_soon(guest.rx)
                await guest.progressed()
                for i in range(3):
                    gate = setup.tmp / f"gate{i}"
                    new = setup.start("--takeover", DH_VSTREAM_RESTORE_GATE=str(gate))
                    await new.wait_for("vstream restoring")  # the old one is parked now
                    await _during_handoff(front)
                    gate.touch()
                    assert await _answers_after_handoff(front) == new.proc.pid
                    await new.wait_for(READY)
                    assert await old.wait() == 0, old.output
                    assert f"handed over to pid {new.proc.pid}" in old.output
                    await guest.progressed()
                    pids.append(new.proc.pid)
                    old = new
                # Stop the streams: every chain comes back, then the totals must agree.
                guest.stopping = True
            tx_bytes, tx_crc, rx_bytes, pid = await guest.config()
        assert pid == pids[-1]
        assert (tx_bytes, tx_crc) == (guest.sent, guest.crc), "a guest->device chunk was lost" \
            " or applied twice"
        assert rx_bytes == guest.received
        assert guest.sent > 0 and guest.received > 0
        assert len(set(pids)) == 4
        for proc in setup.procs:
            assert "broke the protocol" not in proc.output, proc.output
            assert "frontend disconnected" not in proc.output, proc.output
        # A VMM that connects again after the last handover reaches the new process on the
        # same path (the listener moved too).
        await front.aclose()
        front2, memory2 = await _connect(setup)
        try:
            assert (await Guest(front2).config())[3] == pids[-1]
        finally:
            await front2.aclose()
            memory2.close()
    finally:
        await front.aclose()
        memory.close()
    old.proc.send_signal(signal.SIGTERM)
    assert await old.wait() == 0, old.output


@pytest.mark.parametrize("how", ["restore_open raises", "SIGKILL before the confirm"])
async def test_the_old_host_serves_on_the_same_connection_when_the_new_one_fails(
        setup: Setup, how: str) -> None:
    old = setup.start()
    await old.wait_for(READY)
    front, memory = await _connect(setup)
    guest = Guest(front)
    try:
        with anyio.fail_after(2 * DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(guest.tx)
                tg.start_soon(guest.rx)
                await guest.progressed()
                if how == "restore_open raises":
                    new = setup.start("--takeover", DH_VSTREAM_FAIL_RESTORE="1")
                    await _during_handoff(front)
                    assert await new.wait() != 0
                    assert "'vs'" in new.output and "DH_VSTREAM_FAIL_RESTORE" in new.output, \
                        new.output
                else:
                    gate = setup.tmp / "never"
                    new = setup.start("--takeover", DH_VSTREAM_RESTORE_GATE=str(gate))
                    await new.wait_for("vstream restoring")
                    await _during_handoff(front)
                    new.proc.kill()
                    await new.wait()
                await old.wait_for("rolled back, serving on")
                assert await _answers_after_handoff(front) == old.proc.pid
                await guest.progressed()
                guest.stopping = True
            tx_bytes, tx_crc, rx_bytes, pid = await guest.config()
        assert pid == old.proc.pid
        assert (tx_bytes, tx_crc, rx_bytes) == (guest.sent, guest.crc, guest.received)
        assert old.proc.poll() is None
        assert "frontend disconnected" not in old.output, old.output
    finally:
        await front.aclose()
        memory.close()
    old.proc.send_signal(signal.SIGTERM)
    assert await old.wait() == 0, old.output
