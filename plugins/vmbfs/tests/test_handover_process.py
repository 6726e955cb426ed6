"""The issue's proof with real processes: ``devicehost run`` with ``[host] vmbus_socket`` and
vmbfs, a guest process (``devicehost_vmbfs.socketguest --until``) reading a 64 MiB file in a
loop over the VMBus socket, and ``devicehost run --takeover`` processes replacing the host under
it: every pass's SHA-256 is the file's, the guest sees no rescind and no close, and the same
connection and channel carry every pass."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

DEADLINE = 120.0
BIG = 64 << 20
READY = "devicehost.host: ready\n"

#: Imported at the start of a new process by the tests that need a vmbfs whose restore_open
#: fails (rollback) or never returns (the process is killed before it confirms).
_SITECUSTOMIZE = '''
import os, sys, time
import devicehost_vmbfs.device as _device

_mode = os.environ.get("VMBFS_TEST_RESTORE")

@_device.hookimpl
def _restore_open(self, ctx, state, resources):
    if _mode == "raise":
        raise RuntimeError("VMBFS_TEST_RESTORE is set")
    print(f"restoring {os.getpid()}", file=sys.stderr, flush=True)
    gate = os.environ.get("VMBFS_TEST_GATE", "")
    while not (gate and os.path.exists(gate)):
        time.sleep(0.01)
    return _original(self, ctx, state, resources)

_original = _device.VmbfsDevice.restore_open
if _mode:
    _restore_open.__qualname__ = "VmbfsDevice.restore_open"  # a method: pluggy drops self
    _device.VmbfsDevice.restore_open = _restore_open
'''


def _command(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "devicehost"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "devicehost.cli"]
    return [*base, *args]


class Lines:
    """A child process whose output stream (stderr or stdout) is collected by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str], *, stdout: bool = False) -> None:
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if stdout else subprocess.PIPE)
        stream = self.proc.stdout if stdout else self.proc.stderr
        assert stream is not None
        self._stream = stream
        self.lines: list[str] = []
        self.done = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for raw in iter(self._stream.readline, b""):
            with self._cond:
                self.lines.append(raw.decode(errors="replace"))
                self._cond.notify_all()
        with self._cond:
            self.done = True
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_until(self, what: str, predicate: Callable[[list[str]], bool]) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.lines) or self.done, DEADLINE
                                       ) or not predicate(self.lines):
                pytest.fail(f"{what} did not happen; output:\n{''.join(self.lines)[-4000:]}")

    def wait_for(self, text: str) -> None:
        self.wait_until(repr(text), lambda lines: text in "".join(lines))

    def wait(self) -> int:
        code = self.proc.wait(timeout=DEADLINE)
        self._thread.join(DEADLINE)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._thread.join(DEADLINE)
        self._stream.close()


class Guest(Lines):
    """The socketguest process reading the file in a loop."""

    def passes(self) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(x) for x in self.lines if x.startswith('{"pass"')]

    def wait_passes(self, count: int) -> None:
        self.wait_until(f"{count} passes", lambda lines: sum(
            1 for x in lines if x.startswith('{"pass"')) >= count)


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.content = os.urandom(BIG)
        root = tmp_path / "files"
        root.mkdir()
        (root / "big.bin").write_bytes(self.content)
        self.sha = hashlib.sha256(self.content).hexdigest()
        self.vmbus = tmp_path / "vmbus.sock"
        self.control = tmp_path / "control.sock"
        self.config = tmp_path / "host.toml"
        self.config.write_text(
            f'[host]\nvmbus_socket = "{self.vmbus}"\ncontrol_socket = "{self.control}"\n\n'
            f'[[device]]\nplugin = "vmbfs"\nname = "fs"\nroot = "{root}"\n')
        self.site = tmp_path / "site"
        self.site.mkdir()
        (self.site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        self.stop_file = tmp_path / "stop"
        self.procs: list[Lines] = []

    def env(self, restore: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DEVICEHOST_", "NOTIFY_SOCKET", "VMBFS_TEST_"))}
        if restore is not None:
            env["VMBFS_TEST_RESTORE"] = restore
            env["VMBFS_TEST_GATE"] = str(self.tmp / "gate")
            env["PYTHONPATH"] = os.pathsep.join(
                [str(self.site), *filter(None, [env.get("PYTHONPATH")])])
        return env

    def host(self, *extra: str, restore: str | None = None) -> Lines:
        proc = Lines(_command("run", "--config", str(self.config), *extra), self.env(restore))
        self.procs.append(proc)
        return proc

    def guest(self) -> Guest:
        proc = Guest([sys.executable, "-m", "devicehost_vmbfs.socketguest", str(self.vmbus),
                      "/big.bin", "--window", "8", "--ring-pages", "32", "--until",
                      str(self.stop_file)], self.env(), stdout=True)
        self.procs.append(proc)
        return proc

    def finish(self, guest: Guest) -> dict[str, Any]:
        """Stop the guest's loop; its final report."""
        self.stop_file.touch()
        assert guest.wait() == 0, guest.output
        passes = guest.passes()
        assert [p["pass"] for p in passes] == list(range(1, len(passes) + 1))
        assert all(p["sha256"] == self.sha and p["size"] == BIG for p in passes), (
            "a pass read wrong bytes")
        report: dict[str, Any] = json.loads(guest.lines[-1])
        assert report["passes"] == len(passes)
        return report


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    result = Setup(tmp_path)
    try:
        yield result
    finally:
        for proc in result.procs:
            proc.stop()


def test_a_guest_process_reads_on_across_three_takeovers(setup: Setup) -> None:
    old = setup.host()
    old.wait_for(READY)
    guest = setup.guest()
    guest.wait_passes(1)
    for _ in range(3):
        new = setup.host("--takeover")
        new.wait_for(READY)
        assert old.wait() == 0, old.output
        assert f"handed over to pid {new.proc.pid}" in old.output
        assert f"took over every device from pid {old.proc.pid}" in new.output
        # Reading goes on, served by the new process (the old one has exited).
        guest.wait_passes(len(guest.passes()) + 1)
        old = new
    report = setup.finish(guest)
    assert report["rescinded"] is False and report["closed"] is None
    assert report["passes"] >= 4
    assert "disconnected" not in "".join(p.output for p in setup.procs[:-1])
    # A later guest connects to the same socket, served by the last host.
    setup.stop_file.unlink()
    old.wait_for("guest socket-guest-1 disconnected")
    second = setup.guest()
    second.wait_passes(1)
    assert setup.finish(second)["closed"] is None
    old.wait_for("guest socket-guest-2 disconnected")
    assert "it left no GPADL and no open channel" in old.output
    old.proc.send_signal(signal.SIGTERM)
    assert old.wait() == 0, old.output
    assert not setup.vmbus.exists()


@pytest.mark.parametrize("failure", ["raise", "kill"])
def test_the_old_host_serves_on_when_the_new_one_fails(setup: Setup, failure: str) -> None:
    """restore_open raising in the new process, or the new process SIGKILLed before it
    confirms: the old host rolls back and the guest reads on, unaware."""
    old = setup.host()
    old.wait_for(READY)
    guest = setup.guest()
    guest.wait_passes(1)
    new = setup.host("--takeover", restore="raise" if failure == "raise" else "hang")
    if failure == "raise":
        assert new.wait() == 3, new.output
        assert "takeover failed" in new.output and "device 'fs'" in new.output
        assert "VMBFS_TEST_RESTORE is set" in new.output
    else:
        new.wait_for("restoring")
        new.proc.kill()
        assert new.wait() == -signal.SIGKILL
    old.wait_for("rolled back, serving on")
    guest.wait_passes(len(guest.passes()) + 2)
    # Still serviceable: a good takeover now succeeds and the guest reads on.
    good = setup.host("--takeover")
    good.wait_for(READY)
    assert old.wait() == 0, old.output
    guest.wait_passes(len(guest.passes()) + 1)
    report = setup.finish(guest)
    assert report["rescinded"] is False and report["closed"] is None
    good.proc.send_signal(signal.SIGTERM)
    assert good.wait() == 0, good.output


def test_the_old_host_killed_between_handoff_and_commit_is_a_crash(setup: Setup) -> None:
    """The old process SIGKILLed after it sent the handoff, before it committed: the new one
    starts nothing and exits 3; the guest sees its connection end, as on any crash of the host,
    and never a wrong byte."""
    old = setup.host()
    old.wait_for(READY)
    guest = setup.guest()
    guest.wait_passes(1)
    new = setup.host("--takeover", restore="gate")
    new.wait_for("restoring")
    old.proc.kill()
    assert old.wait() == -signal.SIGKILL
    (setup.tmp / "gate").touch()
    assert new.wait() == 3, new.output
    assert "did not commit" in new.output
    assert guest.wait() == 1  # the connection ended under a read: no final report
    assert guest.lines[-1].startswith('{"pass"')
    passes = guest.passes()
    assert passes and all(p["sha256"] == setup.sha for p in passes)
