# SPDX-License-Identifier: MIT
"""Issue 15's proof: a real Linux guest streams over vsock while devicehost is replaced under it.

The guest (QEMU, ``-accel tcg``) connects to host port 5000 and sends 64 MiB while reading 64 MiB
on the same connection (``vsockctl duplex``); the host program here does the opposite. While the
streams run, ``devicehost run --takeover`` replaces the serving process three times. Then:

- SHA-256 of each direction matches on both sides (the guest prints its own two digests);
- the same connection carried everything: the host accepted exactly one connection at port 5000
  and the guest saw no error on it (a reset would be a ``DH ERROR``);
- QEMU's vhost-user connection never closed: QEMU logs nothing about vhost-user, no devicehost
  process logged the frontend leaving, and QEMU's guest powers off normally at the end;
- a new connection after the last handover works (the guest's next step connects to port 5001).

The host holds back the last 8 MiB of each direction until the third handover has committed, so
every handover falls in the middle of both streams whatever the machine's speed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from .guestimage import GuestImage
from .guestvm import GuestFailure, GuestVm
from .hostpeer import PortListener, pattern

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parents[2]
PORT = 5000
NEW_PORT = 5001
SIZE = 64 << 20
UP_SEED = 0x1515_0000_0000  # guest -> host
DOWN_SEED = 0x5151_0000_0000  # host -> guest
HANDOVERS = 3
HELD_BACK = 8 << 20
CHUNK = 1 << 20


def _servedrun() -> ModuleType:
    """The vsock tests' ``servedrun`` (devicehost run processes and takeovers), by path."""
    path = ROOT / "plugins" / "vsock" / "tests" / "servedrun.py"
    spec = importlib.util.spec_from_file_location("qemu_vsock_servedrun", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class DuplexPeer:
    """The host program at ``<base_path>_5000``: one connection, 64 MiB each way at once; counts
    every connection it accepts (a second one would be a reconnect)."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.accepted = 0
        self.sent = 0
        self.received = 0
        self.received_sha = hashlib.sha256()
        self.errors: list[BaseException] = []
        self.release = threading.Event()  # the last HELD_BACK bytes each way may go
        self.done = threading.Event()
        self._cond = threading.Condition()
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._cond:
                self.accepted += 1
                first = self._conn is None
                if first:
                    self._conn = conn
            if first:
                threading.Thread(target=self._send, daemon=True).start()
                threading.Thread(target=self._receive, daemon=True).start()

    def _send(self) -> None:
        assert self._conn is not None
        data = memoryview(pattern(DOWN_SEED, SIZE))
        try:
            for at in range(0, SIZE, CHUNK):
                if at >= SIZE - HELD_BACK:
                    self.release.wait(300)
                self._conn.sendall(data[at:at + CHUNK])
                with self._cond:
                    self.sent = at + CHUNK
                    self._cond.notify_all()
        except BaseException as exc:
            self.errors.append(exc)

    def _receive(self) -> None:
        assert self._conn is not None
        buf = bytearray(CHUNK)
        try:
            while self.received < SIZE:
                if self.received >= SIZE - HELD_BACK:
                    self.release.wait(300)
                n = self._conn.recv_into(buf, min(CHUNK, SIZE - self.received))
                if n == 0:
                    raise ConnectionError(f"end of stream after {self.received} bytes")
                self.received_sha.update(memoryview(buf)[:n])
                with self._cond:
                    self.received += n
                    self._cond.notify_all()
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.done.set()

    def wait_progress(self, amount: int, timeout: float) -> None:
        """Wait until both directions moved ``amount`` bytes."""
        with self._cond:
            if not self._cond.wait_for(
                    lambda: min(self.sent, self.received) >= amount or self.errors, timeout):
                raise AssertionError(f"the streams stalled at {self.sent}/{self.received} bytes")
        if self.errors:
            raise AssertionError(f"host peer failed: {self.errors[0]!r}") from self.errors[0]

    def close(self) -> None:
        self.listener.close()
        if self._conn is not None:
            self._conn.close()
        self._thread.join(10)


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dhh-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_three_takeovers_mid_stream_under_a_real_guest(guest_image: GuestImage,
                                                       work: Path) -> None:
    servedrun = _servedrun()
    served = servedrun.ServedVsock(work)
    peer: DuplexPeer | None = None
    after: PortListener | None = None
    try:
        served.start()
        peer = DuplexPeer(Path(f"{served.base_path}_{PORT}"))
        after = PortListener(Path(f"{served.base_path}_{NEW_PORT}"),
                             expect=pattern(7, 256 << 10), reply=b"done", timeout=100)
        vm = GuestVm(
            guest_image, work, vhost_user_socket=served.vhost_user_socket,
            steps=[f"duplex:{PORT}:{SIZE}:{UP_SEED}:{SIZE}", f"send:{NEW_PORT}:{256 << 10}:7:4"],
            timeout_s=110,
        )
        pids = [served.current.pid]
        with vm:
            try:
                for i in range(HANDOVERS):
                    peer.wait_progress((i + 1) * (SIZE - HELD_BACK) // (HANDOVERS + 1), 90)
                    pids.append(served.take_over().pid)
                    assert peer.received < SIZE and peer.sent < SIZE
                peer.release.set()
                sent = vm.expect(r"DH DUPLEXSENT port=\d+ bytes=(\d+) sha256=([0-9a-f]+)", 90)
                got = vm.expect(r"DH DUPLEX port=\d+ recv=(\d+) sha256=([0-9a-f]+)", 90)
                new = vm.expect(r"DH SEND port=\d+ sent=(\d+) \S+ recv=(\d+)", 60)
                # Before the guest powers off (QEMU then closes its connection, as always).
                logs_before_poweroff = [p.output for p in served.procs]
                vm.expect(r"DH DONE", 30)
                status = vm.wait_exit(30)
            except (AssertionError, GuestFailure) as exc:
                logs = "\n".join(f"--- devicehost pid {p.pid} ---\n{p.output[-3000:]}"
                                 for p in served.procs)
                pytest.fail(vm.report(f"{exc}") + "\n" + logs, pytrace=False)
        report = vm.report("after the handovers")
        assert peer.done.wait(30), report
        assert not peer.errors, f"{peer.errors!r}\n{report}"
        up = hashlib.sha256(pattern(UP_SEED, SIZE)).hexdigest()
        down = hashlib.sha256(pattern(DOWN_SEED, SIZE)).hexdigest()
        assert (int(sent.group(1)), sent.group(2)) == (SIZE, up), report
        assert peer.received_sha.hexdigest() == up, report
        assert (int(got.group(1)), got.group(2)) == (SIZE, down), report
        assert peer.accepted == 1, f"the guest connected {peer.accepted} times\n{report}"
        assert len(set(pids)) == HANDOVERS + 1
        received = after.join(30)
        assert received.intact and int(new.group(2)) == 4, report
        assert status == 0, report
        assert "vhost" not in vm.console.lower(), report  # QEMU logs a vhost-user disconnect
        for log in logs_before_poweroff:  # no process saw the VMM's connection end before
            for gone in ("frontend disconnected", "connection on", "broke the protocol"):
                assert gone not in log, log[-3000:]
    finally:
        if after is not None:
            after.close()
        if peer is not None:
            peer.close()
        served.close()
