"""The watchdog, and ``devicehost run`` with a stuck device beside a vmbfs and a vsock device.

In process: a device step that blocks the event loop is named, and once a stop was asked for the
process would be ended (``end`` is replaced by the test). As a process: a device hanging in a hook
is abandoned while vmbfs and vsock keep moving checksummed data; one that blocks the event loop
(``time.sleep``, a busy loop) is named and the process ends; in every case SIGTERM ends the host
within a few seconds, with a non-zero exit code and a log naming the device and the hook.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from devicehost import detached, exitcodes
from devicehost.watchdog import Watchdog


def test_a_blocked_event_loop_is_named_and_a_stop_then_ends_the_process() -> None:
    ended: list[int] = []
    unblock = threading.Event()

    def end(code: int) -> None:
        ended.append(code)
        unblock.set()

    def block() -> None:
        # The plugin blocks the loop until the watchdog ends "the process" (bounded: 60 s).
        os.kill(os.getpid(), signal.SIGTERM)
        assert unblock.wait(60)

    async def blocked_run() -> None:
        block()

    async def main() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async with watchdog.watch():
                task = detached.spawn("device 'spin' run", blocked_run)
                with anyio.fail_after(60):
                    await task.done.wait()
                    async for _ in signals:
                        break  # the loop's own handler still got the signal

    watchdog = Watchdog(0.3, interval=0.02, end=end)
    with watchdog:
        anyio.run(main)
    assert ended == [exitcodes.ABANDONED]
    assert watchdog.last_report is not None
    assert "device 'spin' run blocks the event loop" in watchdog.last_report
    assert "ending the process" in watchdog.last_report


def test_without_a_stop_a_blocked_loop_is_only_reported(caplog: pytest.LogCaptureFixture) -> None:
    ended: list[int] = []
    reported = threading.Event()

    async def main(watchdog: Watchdog) -> None:
        async with watchdog.watch():
            async def slow() -> None:
                deadline = time.monotonic() + 60
                while watchdog.last_report is None and time.monotonic() < deadline:
                    time.sleep(0.01)  # blocks the loop until the watchdog has reported it
                reported.set()

            task = detached.spawn("device 'slow' open", slow)
            with anyio.fail_after(60):
                await task.done.wait()

    watchdog = Watchdog(0.2, interval=0.02, end=ended.append)
    with watchdog:
        anyio.run(main, watchdog)
    assert reported.is_set() and ended == []
    assert watchdog.last_report is not None
    assert watchdog.last_report.startswith("the event loop has not turned for ")
    assert watchdog.last_report.endswith("running: device 'slow' open blocks the event loop")
    assert watchdog.last_report in caplog.text


# -- devicehost run ------------------------------------------------------------------------------

STEP = 60.0
#: What the other devices move while the stuck one hangs.
FILE_BYTES = 1 << 20
ECHO_BYTES = 256 << 10


def devicehost_command() -> list[str]:
    script = Path(sys.executable).parent / "devicehost"
    return [str(script)] if script.exists() else [sys.executable, "-m", "devicehost.cli"]


def read_until(stream: Any, text: str, seen: bytearray, timeout: float = STEP) -> None:
    """Read ``stream`` into ``seen`` until ``text`` appears; fail after ``timeout`` seconds."""
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


class Served:
    """A ``devicehost run`` process serving vmbfs, vsock and the stuck device."""

    def __init__(self, sockets: Path, files: Path, thirdparty: Any, hang: str, how: str,
                 *, host_stop_deadline: bool = False) -> None:
        self.vmbus = sockets / "vmbus.sock"
        self.vsock = sockets / "vsock"
        self.vhost_user = sockets / "vsock.vu"
        self.content = os.urandom(FILE_BYTES)
        (files / "data.bin").write_bytes(self.content)
        config = files / "host.toml"
        # Only the stuck device has 1 s deadlines: vmbfs and vsock keep the defaults, so a busy
        # machine cannot make them miss one. The watchdog's bound after a stop is the host's
        # stop_deadline: 1 s where a test needs the watchdog to end the process.
        host_table = f'[host]\nvmbus_socket = "{self.vmbus}"\n'
        if host_stop_deadline:
            host_table += "stop_deadline = 1\n"
        config.write_text(
            host_table + "\n"
            f'[[device]]\nplugin = "vmbfs"\nname = "fs"\nroot = "{files}"\n\n'
            f'[[device]]\nplugin = "vsock"\nname = "vsock0"\nguest_cid = 3\n'
            f'base_path = "{self.vsock}"\nvhost_user_socket = "{self.vhost_user}"\n\n'
            f'[[device]]\nplugin = "stuck"\nname = "stuck"\nhang = "{hang}"\nhow = "{how}"\n'
            'hook_deadline = 1\nstop_deadline = 1\n')
        site = files / "site"
        thirdparty.write_installed(
            site, thirdparty.device_dist("dh-stuck", "dh_stuck", "stuck", "StuckDevice"))
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("DEVICEHOST_") and k != "NOTIFY_SOCKET"}
        env["PYTHONPATH"] = str(site)
        self.log = bytearray()
        self.proc = subprocess.Popen([*devicehost_command(), "run", "--config", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    def wait_for(self, text: str) -> None:
        read_until(self.proc.stderr, text, self.log)

    def stop(self) -> tuple[int, str]:
        """SIGTERM; the exit code and the whole log."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=STEP)
        assert self.proc.stderr is not None
        self.log += self.proc.stderr.read()
        return code, self.log.decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        self.proc.stderr.close()

    def read_file_over_vmbus(self) -> None:
        """A guest process reads the vmbfs file over the VMBus socket: every byte arrives."""
        guest = subprocess.run(
            [sys.executable, "-m", "devicehost_vmbfs.socketguest", str(self.vmbus), "/data.bin"],
            capture_output=True, timeout=STEP, check=True)
        lines = [json.loads(line) for line in guest.stdout.decode().splitlines() if line.strip()]
        (result,) = [line for line in lines if "sha256" in line]
        assert result["size"] == len(self.content)
        assert result["sha256"] == hashlib.sha256(self.content).hexdigest()

    def echo_over_vsock(self) -> None:
        """A guest (over vhost-user) echoes what a host application sends through vsock."""
        anyio.run(self._echo_over_vsock)

    async def _echo_over_vsock(self) -> None:
        from devicehost.memory import GuestMemory
        from devicehost.testing.vhost_user import VhostUserFrontend
        from devicehost.virtio import VERSION_1
        from devicehost.virtio.vhost_message import USER_F_PROTOCOL_FEATURES
        from devicehost_vsock.guest_stack import GuestSockets, GuestStack

        data = os.urandom(ECHO_BYTES)
        memory = GuestMemory.memfd(8 << 20)
        try:
            with anyio.fail_after(STEP):
                frontend = await VhostUserFrontend.connect(str(self.vhost_user), memory)
                _, cid = await frontend.realize()
                assert struct.unpack("<Q", cid) == (3,)
                await frontend.start(1 << VERSION_1 | 1 << USER_F_PROTOCOL_FEATURES | 0x1)
                sockets = GuestSockets(GuestStack(frontend, cid=3), rx_buffers=16)
                sockets.listen(1234, echo=True)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(sockets.pump)
                    # The device opens (and listens at its CONNECT socket) once the driver is.
                    await anyio.to_thread.run_sync(self.wait_for, "host sockets at")
                    stream = await anyio.connect_unix(str(self.vsock))
                    await stream.send(b"CONNECT 1234\n")
                    reply = b""
                    while b"\n" not in reply:
                        reply += await stream.receive()
                    assert reply.startswith(b"OK ")
                    echoed = bytearray(reply.partition(b"\n")[2])

                    async def send() -> None:
                        await stream.send(data)

                    tg.start_soon(send)
                    while len(echoed) < len(data):
                        echoed += await stream.receive()
                    assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
                    await stream.aclose()
                    tg.cancel_scope.cancel()
                await frontend.aclose()
        finally:
            memory.close()


@pytest.fixture
def short_dir() -> Any:
    """A directory with a short path, for Unix sockets (their paths are at most 107 bytes)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="dh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("hang,how,failure", [
    ("offer", "forever", "failed in offer: no answer within 1 s; the device is abandoned"),
    ("open", "swallow", "failed in open: no answer within 1 s; the device is abandoned"),
    ("close", "swallow", "failed in close: no answer within 1 s; the device is abandoned"),
    ("run", "swallow", "failed in run: did not stop within 1 s of its cancel; the device is"
                       " abandoned"),
    ("run", "thread", "failed in run: did not stop within 1 s of its cancel; the device is"
                      " abandoned"),
])
def test_run_with_a_hanging_device_serves_the_others_and_stops_naming_it(
    thirdparty: Any, tmp_path: Path, short_dir: Path, hang: str, how: str, failure: str,
) -> None:
    served = Served(short_dir, tmp_path, thirdparty, hang, how)
    try:
        served.wait_for("devicehost.host: ready\n")
        if hang == "run":
            served.wait_for(f"stuck: run hangs ({how})")
        served.read_file_over_vmbus()
        served.echo_over_vsock()
        start = time.monotonic()
        code, log = served.stop()
        took = time.monotonic() - start
    finally:
        served.kill()
    assert code == exitcodes.FAILED, log
    assert f"ERROR devicehost.device.stuck: device 'stuck' {failure}\n" in log
    # Logged once by the device (the host's summaries repeat it).
    assert log.count("ERROR devicehost.device.stuck:") == 1, log
    assert "stopped; 1 of 3 device(s) failed: stuck\n" in log
    # What an abandoned task started (a thread) might keep the process alive: it is ended.
    assert ("ending the process: what abandoned device tasks started may never end: device"
            f" 'stuck' {hang}\n" in log)
    print(f"{hang}/{how}: stopped {took:.1f} s after SIGTERM")


@pytest.mark.parametrize("hang,how", [("run", "sleep"), ("run", "busy"), ("open", "sleep")])
def test_run_with_a_device_that_blocks_the_event_loop_still_ends_on_sigterm(
    thirdparty: Any, tmp_path: Path, short_dir: Path, hang: str, how: str,
) -> None:
    served = Served(short_dir, tmp_path, thirdparty, hang, how, host_stop_deadline=True)
    try:
        served.wait_for(f"stuck: {hang} hangs ({how})")
        start = time.monotonic()
        code, log = served.stop()
        took = time.monotonic() - start
    finally:
        served.kill()
    assert code == exitcodes.ABANDONED, log
    assert (f"CRITICAL devicehost.watchdog: the host did not stop within 1 s of being asked to:"
            f" device 'stuck' {hang} blocks the event loop; ending the process\n") in log
    print(f"{hang}/{how}: ended {took:.1f} s after SIGTERM")


def test_finish_ends_the_process_only_for_what_was_abandoned_during_the_run() -> None:
    ended: list[int] = []

    async def stuck() -> None:
        with anyio.CancelScope(shield=True):
            await release.wait()

    async def abandon_one() -> detached.Detached:
        task = detached.spawn("device 'old' run", stuck)
        task.abandon()
        return task

    async def main() -> None:
        task = await abandon_one()
        release.set()
        with anyio.fail_after(60):
            await task.done.wait()

    release = anyio.Event()
    anyio.run(main)  # abandoned before the watchdog (another run in this process)
    with Watchdog(5, end=ended.append) as watchdog:
        assert watchdog.finish(0) == 0
    assert ended == []
    with Watchdog(5, end=ended.append) as watchdog:
        release = anyio.Event()
        anyio.run(main)
        assert watchdog.finish(1) == 1
    assert ended == [1]
