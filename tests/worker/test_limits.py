"""A worker ends with its supervisor, even a worker whose event loop a plugin blocks, and even
when the supervisor is killed with SIGKILL (no worker outlives its host)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "thirdparty" / "src"
SUPERVISOR = f'''
import sys, anyio
sys.path.insert(0, {str(SRC)!r})
import dh_crash
from devicehost.config import HostSettings
from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.worker import WorkerSettings

async def main():
    spec = DeviceSpec("c", "crash", dh_crash.CrashConfig(how=sys.argv[1]),
                      WorkerSettings(isolation="process"))
    async with host_with({{"crash": dh_crash.CrashDevice}}, [spec],
                         settings=HostSettings(hook_deadline=600)) as host:
        proxy = host.workers.proxies["c"]
        while "started" not in proxy.reports:
            await anyio.sleep(0.01)
        print(proxy.pids[0], flush=True)
        await anyio.sleep_forever()

anyio.run(main)
'''


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "State:\tZ" in status  # ended; its new parent (init) reaps it


@pytest.mark.parametrize("how", ["none", "busy"])
def test_a_worker_ends_when_its_supervisor_is_killed(tmp_path: Path, how: str) -> None:
    script = tmp_path / "supervisor.py"
    script.write_text(SUPERVISOR)
    proc = subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the supervisor did not start its worker"
        pid = int(line)
        if how == "busy":
            time.sleep(0.5)  # let the plugin's busy loop begin (the proof does not need it)
        assert not _gone(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gone(pid), f"worker {pid} outlived its supervisor"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_the_worker_limits_are_applied_before_plugin_code(tmp_path: Path) -> None:
    probe = ("import resource\n"
             "from devicehost.worker.limits import apply_limits, no_new_privs\n"
             "apply_limits(memory_limit=512 << 20, parent=None)\n"
             "print(no_new_privs(), resource.getrlimit(resource.RLIMIT_AS),"
             " resource.getrlimit(resource.RLIMIT_CORE))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.split("\n")[0] == f"True {(512 << 20, 512 << 20)} (0, 0)"
    assert os.getpid()  # this process is untouched
