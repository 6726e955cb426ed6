"""``devicehost run`` processes serving one vsock device over vhost-user, taken over live by
``devicehost run --takeover``, with the test kit's vhost-user frontend as the VMM and the guest
stack on its rings; and streams that run both ways until told to stop (so that every handover
falls in the middle of them), checked end to end with SHA-256.

Shared by ``test_takeover_vhost_user.py`` and ``bench/bench_handover.py`` (which loads this file
by path).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import anyio.abc

from devicehost.memory import GuestMemory
from devicehost.testing.vhost_user import VhostUserFrontend
from devicehost.virtio import VERSION_1
from devicehost.virtio.vhost_message import USER_F_PROTOCOL_FEATURES
from devicehost_vsock.guest_stack import GuestConnection, GuestSockets, GuestStack
from devicehost_vsock.protocol import SHUTDOWN_SEND, Op

__all__ = [
    "READY",
    "TOOK_OVER",
    "Flow",
    "Guest",
    "HostProcess",
    "ServedVsock",
    "devicehost_command",
    "guest_flow",
    "host_flow",
]

READY = "devicehost.host: ready\n"
TOOK_OVER = "took over every device from pid"
DEADLINE = 60.0
#: STREAM | SEQPACKET | NO_IMPLIED_STREAM, VERSION_1, vhost-user protocol features.
FEATURES = 1 << VERSION_1 | 1 << USER_F_PROTOCOL_FEATURES | 0x7


def devicehost_command() -> list[str]:
    script = Path(sys.executable).parent / "devicehost"
    return [str(script)] if script.exists() else [sys.executable, "-m", "devicehost.cli"]


class HostProcess:
    """A child ``devicehost run`` whose stderr is collected by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env, start_new_session=True)
        self.output = ""
        self.done = False
        #: time.monotonic() when the process logged that it is ready (0.0 until then).
        self.ready_at = 0.0
        self.spawned_at = time.monotonic()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode(errors="replace")
            with self._cond:
                if not self.ready_at and line.endswith(READY):
                    self.ready_at = time.monotonic()
                self.output += line
                self._cond.notify_all()
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = DEADLINE) -> None:
        """Wait until ``text`` appears in the process's log (AssertionError if it exits or the
        time passes first)."""
        with self._cond:
            self._cond.wait_for(lambda: text in self.output or self.done, timeout)
            if text not in self.output:
                raise AssertionError(f"{text!r} did not appear (pid {self.pid});"
                                     f" log:\n{self.output[-4000:]}")

    def wait(self, timeout: float = DEADLINE) -> int:
        code = self.proc.wait(timeout=timeout)
        self._thread.join(timeout)
        return code

    def stop(self) -> None:
        """SIGKILL (the process group) if still running; reap."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._thread.join(DEADLINE)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class ServedVsock:
    """The config of one vsock device over vhost-user with a control socket, and the processes
    serving it, one after the other (:meth:`take_over`)."""

    def __init__(self, work: Path, guest_cid: int = 3) -> None:
        self.work = work
        self.base_path = work / "vsock"
        self.vhost_user_socket = work / "vu.sock"
        self.control = work / "control.sock"
        self.state = work / "state.json"
        self.config = work / "host.toml"
        self.config.write_text(
            f'[host]\ncontrol_socket = "{self.control}"\n\n'
            f'[[device]]\nplugin = "vsock"\nname = "vsock0"\nguest_cid = {guest_cid}\n'
            f'base_path = "{self.base_path}"\nvhost_user_socket = "{self.vhost_user_socket}"\n')
        self.procs: list[HostProcess] = []

    @property
    def current(self) -> HostProcess:
        return self.procs[-1]

    @staticmethod
    def _env() -> dict[str, str]:
        return {k: v for k, v in os.environ.items()
                if not k.startswith(("DEVICEHOST_", "NOTIFY_SOCKET"))}

    def _spawn(self, *extra: str) -> HostProcess:
        proc = HostProcess([*devicehost_command(), "run", "--config", str(self.config),
                            "--state", str(self.state), *extra], self._env())
        self.procs.append(proc)
        return proc

    def start(self) -> HostProcess:
        proc = self._spawn()
        proc.wait_for(READY)
        return proc

    def take_over(self) -> HostProcess:
        """One live handover: a ``--takeover`` process takes the device; the old one exits 0.
        The new process's ``spawned_at`` is when it was started."""
        old = self.current
        spawned = time.monotonic()
        new = self._spawn("--takeover")
        new.spawned_at = spawned
        new.wait_for(TOOK_OVER)
        new.wait_for(READY)
        code = old.wait()
        if code != 0:
            raise AssertionError(f"the old process exited {code}; log:\n{old.output[-4000:]}")
        return new

    def refused_takeover(self, config: Path) -> HostProcess:
        """A ``--takeover`` process with another ``config`` that must fail: it exits non-zero
        (returned, reaped) and the running process serves on."""
        proc = HostProcess([*devicehost_command(), "run", "--config", str(config),
                            "--takeover"], self._env())
        code = proc.wait()
        proc.stop()
        if code == 0 or self.current.proc.poll() is not None:
            raise AssertionError(f"the takeover did not roll back (exit {code}); log:\n"
                                 f"{proc.output[-3000:]}")
        return proc

    def restart(self) -> HostProcess:
        """A plain restart: SIGTERM, then ``devicehost run --state`` (no live peer)."""
        old = self.current
        old.proc.send_signal(signal.SIGTERM)
        code = old.wait()
        if code != 0:
            raise AssertionError(f"the old process exited {code}; log:\n{old.output[-4000:]}")
        return self.start()

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()


class Guest:
    """The VMM (the test kit's frontend) and the guest's sockets on its rings."""

    def __init__(self, frontend: VhostUserFrontend, memory: GuestMemory) -> None:
        self.frontend = frontend
        self.memory = memory
        self.stack = GuestStack(frontend, cid=3)
        self.sockets = GuestSockets(self.stack, rx_buffers=64)

    @classmethod
    async def connect(cls, path: Path, memory: GuestMemory) -> Guest:
        frontend = await VhostUserFrontend.connect(str(path), memory)
        await frontend.realize()
        await frontend.start(FEATURES)
        return cls(frontend, memory)

    async def aclose(self) -> None:
        await self.frontend.aclose()


class Flow:
    """One direction of one connection: what was sent and received (SHA-256 each), and when
    bytes arrived (the receiver's progress, for gaps)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.sent_bytes = 0
        self.received_bytes = 0
        self.arrivals: list[float] = []
        self.ended = False

    def got(self, data: bytes | bytearray | memoryview) -> None:
        self.received.update(data)
        self.received_bytes += len(data)
        self.arrivals.append(time.monotonic())

    def check(self) -> None:
        if not self.ended:
            raise AssertionError(f"{self.name}: did not end")
        if (self.sent_bytes, self.sent.hexdigest()) != (
                self.received_bytes, self.received.hexdigest()):
            raise AssertionError(f"{self.name}: sent {self.sent_bytes} bytes, received"
                                 f" {self.received_bytes}, or their SHA-256 differ")


def _chunk(seed: int, index: int, size: int) -> bytes:
    return hashlib.shake_128(f"{seed}:{index}".encode()).digest(size)


async def guest_flow(sockets: GuestSockets, conn: GuestConnection, out: Flow, into: Flow,
                     stop: anyio.Event, chunk: int = 65536) -> None:
    """The guest's side of one connection: sends until ``stop``, then SHUTDOWN(SEND); receives
    until the device relays the host's end of stream (a reset fails)."""

    async def send() -> None:
        index = 0
        while not stop.is_set():
            data = _chunk(id(out), index, chunk)
            await conn.send_all(data)
            out.sent.update(data)
            out.sent_bytes += len(data)
            index += 1
        await sockets.send_control(conn, Op.SHUTDOWN, SHUTDOWN_SEND)

    async def receive() -> None:
        while True:
            if conn.received:
                data = bytes(conn.received)
                conn.received.clear()
                into.got(data)
                continue
            if conn.reset:
                raise ConnectionResetError(f"{into.name}: the guest connection was reset")
            if conn.peer_shutdown:
                into.ended = True
                return
            await conn.wait_changed()

    async with anyio.create_task_group() as tg:
        tg.start_soon(send)
        tg.start_soon(receive)


async def host_flow(stream: anyio.abc.SocketStream, out: Flow, into: Flow, stop: anyio.Event,
                    chunk: int = 65536) -> None:
    """The host program's side: sends until ``stop``, then shuts its write side; reads until
    end of stream (the guest's SHUTDOWN)."""

    async def send() -> None:
        index = 0
        while not stop.is_set():
            data = _chunk(id(out), index, chunk)
            await stream.send(data)
            out.sent.update(data)
            out.sent_bytes += len(data)
            index += 1
        await stream.send_eof()

    async def receive() -> None:
        while True:
            try:
                data = await stream.receive(1 << 20)
            except anyio.EndOfStream:
                into.ended = True
                return
            into.got(data)

    async with anyio.create_task_group() as tg:
        tg.start_soon(send)
        tg.start_soon(receive)
