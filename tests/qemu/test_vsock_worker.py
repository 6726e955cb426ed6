# SPDX-License-Identifier: MIT
"""A real Linux guest with the vsock device in a worker process, and the worker SIGKILLed
mid-stream (issue 16, "Must show").

``devicehost run`` serves the vsock device over vhost-user with ``isolation = "process"`` and
``restart = "on-failure"``: the supervisor holds QEMU's connection, the worker runs the device
over the same guest memory and eventfds. The guest streams to host port 5000 (``vsockctl cut``);
once the host application has 1 MiB, the test SIGKILLs the worker. The guest's connection must
then fail (the restarted worker sends an RST for every connection the dead one reported), QEMU
must stay connected (it has no reconnect option here: a dropped vhost-user connection would end
the device for good), and the guest's next connection moves 8 MiB intact (SHA-256 of what the
host received against the pattern the guest sent) while the supervisor is stopped (SIGSTOP): no
packet of it passes through the supervisor.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from .devicehostrun import DevicehostRun, VsockLayout
from .guestimage import GuestImage
from .guestvm import GuestVm
from .hostpeer import pattern

pytestmark = pytest.mark.qemu

CUT_PORT = 5000
CUT_SEED = 0x0707_0000_0000
SEND_PORT = 5001
SEND_LEN = 8 << 20
SEND_SEED = 0x0808_0000_0000
ACK = b"ACK!"
KILL_AFTER = 1 << 20  # bytes the host has taken from the cut connection before the kill
TIMEOUT_S = 90.0  # the timeout wrapper around QEMU; the whole test takes 15-40 s under TCG


@attrs.frozen
class WorkerLayout(VsockLayout):
    """The vsock device of the QEMU tests, run in a worker that is restarted on failure."""

    def config_text(self) -> str:
        return super().config_text() + 'isolation = "process"\nrestart = "on-failure"\n'


class HostReader:
    """A host application on ``<base>_<port>``: accepts one connection, reads until end of
    stream or ``limit`` bytes (then answers ``ACK!``: the guest waits for it before it closes,
    as the guest powering off would drop what the device still buffers for a slow reader),
    keeps the SHA-256 of what arrived and whether it is a prefix of the guest's pattern for
    ``seed``; sets ``halfway`` once ``KILL_AFTER`` bytes arrived."""

    def __init__(self, path: Path, seed: int, limit: int | None = None) -> None:
        self.path = path
        self._seed = seed
        self._limit = limit
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(1)
        self._sock.settimeout(TIMEOUT_S)
        self.halfway = threading.Event()
        self.received = 0
        self.sha256 = hashlib.sha256()
        self.intact = True
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"reader-{path.name}",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._sock.accept()
            with conn:
                conn.settimeout(TIMEOUT_S)
                buf = bytearray(1 << 20)
                while self._limit is None or self.received < self._limit:
                    n = conn.recv_into(buf)
                    if not n:
                        break
                    chunk = bytes(buf[:n])
                    self.sha256.update(chunk)
                    expected = pattern(self._seed, self.received + n)[self.received:]
                    self.intact = self.intact and chunk == expected
                    self.received += n
                    if self.received >= KILL_AFTER:
                        self.halfway.set()
                if self._limit is not None and self.received == self._limit:
                    conn.sendall(ACK)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.halfway.set()
            self._sock.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self.path}: the host side never ended"
        assert self.error is None, f"{self.path}: the host side failed: {self.error!r}"

    def close(self) -> None:
        self._sock.close()
        self._thread.join(5)


def _log_time(stamp: str) -> float:
    """A devicehost log line's timestamp (local time, ``2026-12-06 04:26:55,414``) as
    ``time.time()`` would have shown it."""
    whole, _, millis = stamp.partition(",")
    return time.mktime(time.strptime(whole, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


def _process_state(pid: int) -> str:
    """The state letter of ``pid`` (``T``: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def worker_pids(supervisor: int) -> set[int]:
    """The worker processes of ``devicehost run`` (its child processes)."""
    try:
        text = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text()
    except OSError:
        return set()
    return {int(pid) for pid in text.split()}


@pytest.fixture
def layout(short_tmp: Path) -> Iterator[WorkerLayout]:
    yield WorkerLayout(work_dir=short_tmp, guest_cid=3)


def test_worker_killed_mid_stream_guest_resets_and_reconnects(
    guest_image: GuestImage, layout: WorkerLayout
) -> None:
    with DevicehostRun(layout) as served:
        cut = HostReader(layout.port_path(CUT_PORT), CUT_SEED)
        after = HostReader(layout.port_path(SEND_PORT), SEND_SEED, SEND_LEN)
        steps = [f"cut:{CUT_PORT}:{CUT_SEED}",
                 f"send:{SEND_PORT}:{SEND_LEN}:{SEND_SEED}:{len(ACK)}"]
        try:
            with GuestVm(guest_image, layout.work_dir, vhost_user_socket=layout.vhost_user_socket,
                         steps=steps, timeout_s=TIMEOUT_S) as vm:
                vm.expect(rf"DH CUTSTART port={CUT_PORT}", 60)
                assert cut.halfway.wait(30), vm.report("the host got no data from the guest")
                workers = worker_pids(served.pid)
                assert len(workers) == 1, served.report(f"expected one worker, found {workers}")
                (worker,) = workers
                killed_at = time.monotonic()
                os.kill(worker, signal.SIGKILL)
                cut_line = vm.expect(rf"DH CUT port={CUT_PORT} sent=(?P<sent>\d+) "
                                     r"errno=(?P<errno>[A-Z]+)/\d+ ms=(?P<ms>[0-9.]+)", 60)
                reset_after = time.monotonic() - killed_at
                # The data path does not need the supervisor at all: it is stopped (SIGSTOP)
                # while the new connection moves its 8 MiB, and continued after.
                os.kill(served.pid, signal.SIGSTOP)
                try:
                    send_line = vm.expect(rf"DH SEND port={SEND_PORT} sent=(?P<sent>\d+) "
                                          r"sent_crc=\S+ recv=(?P<recv>\d+) ", 60)
                    after.join(30)
                    stopped = _process_state(served.pid)
                finally:
                    os.kill(served.pid, signal.SIGCONT)
                new_workers = worker_pids(served.pid)
                vm.expect(r"DH DONE", 30)
                status = vm.wait_exit(30)
            cut.join(10)
        finally:
            cut.close()
            after.close()
        log = served.output()
    report = f"{vm.report('')}\n{served.report('')}"
    # The guest's open connection failed with a reset, promptly: the restart is a new Python
    # process and the RST is one rx buffer away. (Linux reports an RST on a connected socket to
    # a blocked writer as EPIPE.)
    assert cut_line.group("errno") in ("EPIPE", "ECONNRESET"), report
    assert reset_after < 20, f"the connection failed {reset_after:.1f} s after the kill\n{report}"
    assert cut.intact and cut.received >= KILL_AFTER, report
    # QEMU stayed connected (it has no reconnect option: a lost connection would have ended the
    # device for good, and no data would have moved after the kill). The backend logs every
    # disconnect: there is one, after the restart (the guest powering off).
    def stamps(what: str) -> list[float]:
        return [_log_time(m.group(1))
                for m in re.finditer(rf"^(\S+ \S+) \S+ \S+: .*{what}", log, re.MULTILINE)]

    restarted = stamps(r"restarted in worker pid \d+")
    disconnects = stamps(r"vhost-user (?:frontend disconnected|connection .* lost)")
    assert len(restarted) == 1 and len(disconnects) == 1, report
    assert disconnects[0] > restarted[0], report
    assert len(new_workers) == 1 and new_workers != workers, report
    assert "restarting it" in log and "SIGKILL" in log, report
    # The new connection moved 8 MiB intact.
    assert int(send_line.group("sent")) == SEND_LEN and after.received == SEND_LEN, (
        f"host received {after.received} bytes\n{report}")
    assert int(send_line.group("recv")) == len(ACK), report
    assert after.intact, report
    assert after.sha256.hexdigest() == hashlib.sha256(pattern(SEND_SEED, SEND_LEN)).hexdigest()
    assert stopped == "T", f"the supervisor was not stopped ({stopped})\n{report}"
    assert status == 0, report
