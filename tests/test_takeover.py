"""Live servicing end to end: `devicehost run --takeover` processes taking a running host over.

The device is the third-party test plugin ``dh_ticker`` (tests/thirdparty/src/dh_ticker.py): it
sends ``COUNT PID`` lines on a Unix socket connection to the test (the peer) and answers on a
listener. Across a takeover the same connection must carry on with the next count from the new
process: no count lost or repeated, no ``bye`` (the old process must not close the device).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DEADLINE = 60.0


def devicehost_command() -> list[str]:
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
        for raw in iter(lambda: self.proc.stderr.readline(), b""):  # type: ignore[union-attr]
            with self._cond:
                self.output += raw.decode(errors="replace")
                self._cond.notify_all()
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def wait_for(self, text: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: text in self.output or self.done, DEADLINE
                                       ) or text not in self.output:
                pytest.fail(f"{text!r} did not appear; stderr:\n{self.output}")

    def wait(self) -> int:
        code = self.proc.wait(timeout=DEADLINE)
        self._thread.join(DEADLINE)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._thread.join(DEADLINE)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class Peer:
    """The device's peer: accepts its one connection and collects the lines it sends."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.lines: list[str] = []
        self.closed = False
        self._conn: socket.socket | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self._conn = conn
        with conn, conn.makefile("rb") as stream:
            for raw in stream:
                with self._cond:
                    self.lines.append(raw.decode().rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_until(self, what: str, predicate: Callable[[list[str]], bool]) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.lines), DEADLINE):
                pytest.fail(f"the peer never saw {what}; last lines: {self.lines[-5:]}")

    def wait_for_count_from(self, pid: int, more: int = 20) -> None:
        """Wait until ``pid`` has sent ``more`` counts."""
        self.wait_until(f"{more} counts from pid {pid}",
                        lambda lines: sum(1 for x in lines if x.endswith(f" {pid}")
                                          and x.split()[0].isdigit()) >= more)

    def wait_closed(self) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.closed, DEADLINE):
                pytest.fail("the device's connection was not closed")

    def counts(self) -> list[tuple[int, int]]:
        with self._cond:
            return [(int(a), int(b)) for a, b in
                    (x.split() for x in self.lines if x.split()[0].isdigit())]

    def close(self) -> None:
        """Stop reading (the device may still be running)."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        if self._conn is not None:
            with contextlib.suppress(OSError):  # already closed by the reader
                self._conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(DEADLINE)


def ask(path: Path) -> tuple[int, int]:
    """Connect to the device's listener: (count, pid) of the process that answered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(str(path))
        count, pid = sock.makefile("rb").readline().split()
    return int(count), int(pid)


def assert_contiguous(counts: list[tuple[int, int]]) -> None:
    numbers = [c for c, _ in counts]
    assert numbers == list(range(1, len(numbers) + 1)), "a count was lost or repeated"


class Setup:
    def __init__(self, tmp_path: Path, site: Path) -> None:
        self.tmp = tmp_path
        self.peer_path = tmp_path / "peer.sock"
        self.listen_path = tmp_path / "listen.sock"
        self.control = tmp_path / "control.sock"
        self.config = tmp_path / "host.toml"
        self.config.write_text(
            f'[host]\ncontrol_socket = "{self.control}"\n\n'
            f'[[device]]\nplugin = "ticker"\nname = "tick"\npeer = "{self.peer_path}"\n'
            f'listen = "{self.listen_path}"\n')
        self.site = site
        self.procs: list[Watched] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DEVICEHOST_", "DH_TICKER_", "NOTIFY_SOCKET"))}
        env.update({"PYTHONPATH": str(self.site), "DEVICEHOST_LOAD_PLUGINS": "ticker", **extra})
        return env

    def start(self, *extra: str, **env: str) -> Watched:
        proc = Watched([*devicehost_command(), "run", "--config", str(self.config), *extra],
                       self.env(**env))
        self.procs.append(proc)
        return proc


@pytest.fixture
def setup(tmp_path: Path, thirdparty: ModuleType) -> Iterator[Setup]:
    site = tmp_path / "site"
    thirdparty.write_installed(site, thirdparty.TICKER)
    result = Setup(tmp_path, site)
    try:
        yield result
    finally:
        for proc in result.procs:
            proc.stop()


READY = "devicehost.host: ready\n"


def test_three_takeovers_keep_the_device_counting_on_the_same_connection(setup: Setup) -> None:
    peer = Peer(setup.peer_path)
    try:
        old = setup.start()
        old.wait_for(READY)
        pids = [old.proc.pid]
        peer.wait_for_count_from(old.proc.pid)
        for _ in range(3):
            new = setup.start("--takeover")
            new.wait_for(READY)
            assert old.wait() == 0, old.output
            assert f"handed over to pid {new.proc.pid}" in old.output
            assert f"took over every device from pid {old.proc.pid}" in new.output, (
                old.output + "\n-----\n" + new.output)
            peer.wait_for_count_from(new.proc.pid)
            pids.append(new.proc.pid)
            old = new
        count, pid = ask(setup.listen_path)  # the listener moved too
        assert pid == old.proc.pid and count > 0
        assert oct(setup.control.stat().st_mode & 0o777) == "0o600"
        old.proc.send_signal(signal.SIGTERM)
        assert old.wait() == 0, old.output
        peer.wait_closed()
        counts = peer.counts()
        assert_contiguous(counts)
        assert [p for i, (_, p) in enumerate(counts) if i == 0 or counts[i - 1][1] != p] == pids
        assert [x for x in peer.lines if not x.split()[0].isdigit()] == [f"bye {pids[-1]}"]
        assert not setup.control.exists(), "the last host removes the control socket"
    finally:
        peer.close()


@pytest.mark.parametrize(("old_env", "new_env", "reason"), [
    ({}, {"DH_TICKER_FAIL_RESTORE": "1"},
     "failed in restore_open: DH_TICKER_FAIL_RESTORE is set"),
    ({"DH_TICKER_STATE_VERSION": "2"}, {}, "has version 2, this plugin reads version 1"),
    ({}, {"DH_TICKER_FAIL_BUILD": "1"}, "DH_TICKER_FAIL_BUILD is set"),
], ids=["restore-raises", "newer-state-version", "cannot-build"])
def test_a_failed_restore_rolls_back_and_the_old_host_serves_on(
    setup: Setup, old_env: dict[str, str], new_env: dict[str, str], reason: str
) -> None:
    peer = Peer(setup.peer_path)
    try:
        old = setup.start(**old_env)
        old.wait_for(READY)
        peer.wait_for_count_from(old.proc.pid)
        new = setup.start("--takeover", **new_env)
        assert new.wait() == 3, new.output
        assert "takeover failed: " in new.output and "device 'tick'" in new.output
        assert reason in new.output
        old.wait_for("rolled back, serving on")
        before = len(peer.counts())
        peer.wait_for_count_from(old.proc.pid, before + 20)
        assert ask(setup.listen_path)[1] == old.proc.pid
        # The old host is still serviceable: a good takeover now succeeds.
        good = setup.start("--takeover", **old_env)
        good.wait_for(READY)
        assert old.wait() == 0
        peer.wait_for_count_from(good.proc.pid)
        good.proc.send_signal(signal.SIGTERM)
        assert good.wait() == 0
        peer.wait_closed()
        assert_contiguous(peer.counts())
        assert {p for _, p in peer.counts()} == {old.proc.pid, good.proc.pid}
    finally:
        peer.close()


def test_a_missing_plugin_is_refused_before_anything_is_stopped(setup: Setup) -> None:
    peer = Peer(setup.peer_path)
    try:
        old = setup.start()
        old.wait_for(READY)
        new = Watched([*devicehost_command(), "run", "--config", str(setup.config),
                       "--takeover"], setup.env(DEVICEHOST_LOAD_PLUGINS="nothing"))
        setup.procs.append(new)
        assert new.wait() != 0
        assert "ticker" in new.output
        peer.wait_for_count_from(old.proc.pid, len(peer.counts()) + 20)
        assert "quiescing" not in old.output
    finally:
        peer.close()


def test_an_unserviceable_device_is_closed_and_opened_fresh(setup: Setup) -> None:
    peer_path = setup.peer_path
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(peer_path))
    listener.listen(2)
    try:
        old = setup.start(DH_TICKER_NO_SAVE="1")
        old.wait_for(READY)
        first, _ = listener.accept()
        new = setup.start("--takeover")
        new.wait_for(READY)
        assert old.wait() == 0, old.output
        second, _ = listener.accept()  # the new process opened the device anew
        with first, second, first.makefile("rb") as a, second.makefile("rb") as b:
            lines = [x.decode().split() for x in a]
            assert lines[-1] == ["bye", str(old.proc.pid)]
            assert b.readline().split() == [b"1", str(new.proc.pid).encode()]
            # Stopped before this side closes: a closed peer would fail the device.
            new.proc.send_signal(signal.SIGTERM)
            assert new.wait() == 0, new.output
            assert [x.decode().split() for x in b][-1] == ["bye", str(new.proc.pid)]
    finally:
        listener.close()


def test_the_old_host_killed_before_it_sent_the_handoff(setup: Setup) -> None:
    peer = Peer(setup.peer_path)
    try:
        old = setup.start(DH_TICKER_HANG_SAVE="1")
        old.wait_for(READY)
        new = setup.start("--takeover")
        peer.wait_until("saving", lambda lines: f"saving {old.proc.pid}" in lines)
        old.proc.kill()
        assert new.wait() == 3
        assert "takeover failed" in new.output and "closed the connection" in new.output
        peer.wait_closed()  # as on any crash: the connection ends, nothing is doubled
        assert_contiguous(peer.counts())
    finally:
        peer.close()


@pytest.mark.parametrize("victim", ["old", "new"])
def test_a_process_killed_between_handoff_and_commit(setup: Setup, victim: str) -> None:
    gate = setup.tmp / "gate"
    peer = Peer(setup.peer_path)
    try:
        old = setup.start()
        old.wait_for(READY)
        new = setup.start("--takeover", DH_TICKER_RESTORE_GATE=str(gate))
        peer.wait_until("restoring", lambda lines: f"restoring {new.proc.pid}" in lines)
        if victim == "old":
            old.proc.kill()
            gate.touch()
            assert new.wait() == 3
            assert "did not commit" in new.output
            peer.wait_closed()
        else:
            new.proc.kill()
            old.wait_for("rolled back, serving on")
            peer.wait_for_count_from(old.proc.pid, len(peer.counts()) + 20)
            old.proc.send_signal(signal.SIGTERM)
            assert old.wait() == 0
            peer.wait_closed()
            assert peer.lines[-1] == f"bye {old.proc.pid}"
        counts = peer.counts()
        assert_contiguous(counts)
        assert {p for _, p in counts} == {old.proc.pid}, "the new process never ran the device"
    finally:
        peer.close()


def test_sigterm_to_the_old_host_during_a_takeover_waits_for_it(setup: Setup) -> None:
    """The stop never cuts a handoff: a SIGTERM that arrives mid-takeover takes effect after it
    (here the takeover commits, so the old host exits 0 without closing the device)."""
    gate = setup.tmp / "gate"
    peer = Peer(setup.peer_path)
    try:
        old = setup.start()
        old.wait_for(READY)
        new = setup.start("--takeover", DH_TICKER_RESTORE_GATE=str(gate))
        peer.wait_until("restoring", lambda lines: f"restoring {new.proc.pid}" in lines)
        old.proc.send_signal(signal.SIGTERM)
        old.wait_for("received SIGTERM")
        gate.touch()
        new.wait_for(READY)
        assert old.wait() == 0
        assert f"handed over to pid {new.proc.pid}" in old.output
        peer.wait_for_count_from(new.proc.pid)
        new.proc.send_signal(signal.SIGTERM)
        assert new.wait() == 0
        peer.wait_closed()
        assert_contiguous(peer.counts())
        assert [x for x in peer.lines if x.startswith("bye")] == [f"bye {new.proc.pid}"]
    finally:
        peer.close()


def test_takeover_needs_a_control_socket(setup: Setup) -> None:
    setup.config.write_text(setup.config.read_text().split("\n\n", 1)[1])
    new = setup.start("--takeover")
    assert new.wait() != 0
    assert "--takeover needs [host] control_socket" in new.output


def test_no_host_to_take_over(setup: Setup) -> None:
    new = setup.start("--takeover")
    assert new.wait() == 3
    assert "no host to take over answers" in new.output



def _frame(value: object) -> bytes:
    payload = json.dumps(value).encode()
    return struct.pack(">I", len(payload)) + payload


def _read_frame(sock: socket.socket) -> dict[str, Any]:
    stream = sock.makefile("rb")
    (length,) = struct.unpack(">I", stream.read(4))
    value: dict[str, Any] = json.loads(stream.read(length))
    return value


@pytest.mark.parametrize("answer", [b"\xff\xff\xff\xff", b"\0\0\0\2{}", b"", "hold-and-close"])
def test_a_hostile_new_process_gets_a_rollback(setup: Setup, answer: bytes | str) -> None:
    """A peer that asks for the handoff and then answers garbage, an oversized or wrong frame,
    or nothing: the old host rolls back and counts on."""
    peer = Peer(setup.peer_path)
    try:
        old = setup.start()
        old.wait_for(READY)
        peer.wait_for_count_from(old.proc.pid)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(DEADLINE)
            sock.connect(str(setup.control))
            sock.sendall(_frame({"version": 1, "command": "takeover", "args": {"handoff": 1}}))
            msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 8)
            assert msg[:4] == b"DHHO" and fds == []
            for fd in fds:
                os.close(fd)
            if isinstance(answer, bytes) and answer:
                sock.sendall(answer)
        old.wait_for("rolled back, serving on")
        peer.wait_for_count_from(old.proc.pid, len(peer.counts()) + 20)
        assert ask(setup.listen_path)[1] == old.proc.pid
        old.proc.send_signal(signal.SIGTERM)
        assert old.wait() == 0
        peer.wait_closed()
        assert_contiguous(peer.counts())
    finally:
        peer.close()


@pytest.mark.parametrize(("args", "blame"), [
    ({"handoff": 2}, "asks for handoff version 2"),
    ({}, "asks for handoff version None"),
    ({"handoff": 1, "more": 1}, "asks for handoff version 1"),
])
def test_a_takeover_request_of_another_version_is_refused_before_anything_stops(
    setup: Setup, args: dict[str, Any], blame: str
) -> None:
    peer = Peer(setup.peer_path)
    try:
        old = setup.start()
        old.wait_for(READY)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(DEADLINE)
            sock.connect(str(setup.control))
            sock.sendall(_frame({"version": 1, "command": "takeover", "args": args}))
            reply = _read_frame(sock)
        assert reply["ok"] is False and blame in reply["error"]
        assert "quiescing" not in old.output
        peer.wait_for_count_from(old.proc.pid, len(peer.counts()) + 20)
    finally:
        peer.close()


def test_systemd_is_told_the_new_main_pid(setup: Setup) -> None:
    notify_path = setup.tmp / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(DEADLINE)
        peer = Peer(setup.peer_path)
        try:
            old = setup.start(NOTIFY_SOCKET=str(notify_path))
            old.wait_for(READY)
            assert notify.recv(4096).decode().splitlines()[0] == "READY=1"
            new = setup.start("--takeover", NOTIFY_SOCKET=str(notify_path))
            new.wait_for(READY)
            assert old.wait() == 0
            messages = [notify.recv(4096).decode() for _ in range(3)]
            main_pid = f"MAINPID={new.proc.pid}"
            # The old main process names its successor; the successor says it is ready.
            assert messages.count(main_pid) == 2, messages
            ready = next(m for m in messages if m.startswith("READY=1"))
            assert messages.index(ready) > messages.index(main_pid)
        finally:
            peer.close()


def test_a_host_serving_the_vmbus_socket_hands_its_listener_over(setup: Setup) -> None:
    """With no VMBus guest connected, the VMBus socket's listener moves with the devices: the
    new process serves the next guest on the same path (docs/servicing.md; the connected guest's
    handover is tested with vmbfs in plugins/vmbfs/tests/test_handover_process.py)."""
    vmbus = setup.tmp / "vmbus.sock"
    text = setup.config.read_text().replace("[host]\n", f'[host]\nvmbus_socket = "{vmbus}"\n')
    setup.config.write_text(text)
    peer = Peer(setup.peer_path)
    try:
        old = setup.start()
        old.wait_for(READY)
        new = setup.start("--takeover")
        new.wait_for(READY)
        assert old.wait() == 0, old.output
        assert vmbus.exists(), "the old host must not unlink the socket it handed over"
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as guest:
            guest.connect(str(vmbus))
        new.wait_for("guest socket-guest-1 disconnected")
        new.proc.send_signal(signal.SIGTERM)
        assert new.wait() == 0, new.output
        assert not vmbus.exists()
        assert_contiguous(peer.counts())
    finally:
        peer.close()


def test_the_new_host_killed_after_the_commit_is_a_crash_of_the_new_host(setup: Setup) -> None:
    peer = Peer(setup.peer_path)
    try:
        old = setup.start()
        old.wait_for(READY)
        new = setup.start("--takeover")
        new.wait_for(READY)
        assert old.wait() == 0
        peer.wait_for_count_from(new.proc.pid)
        new.proc.kill()
        peer.wait_closed()  # the connection ends as on any crash; nothing is doubled
        assert_contiguous(peer.counts())
        assert not any(x.startswith("bye") for x in peer.lines)
    finally:
        peer.close()
