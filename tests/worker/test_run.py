"""``devicehost run`` with devices in workers that fail in every way beside a vmbfs and a vsock
device inline: vmbfs and vsock keep moving checksummed data, ``devicehost inspect`` shows each
failure's cause, SIGTERM stops the host within a few seconds, the exit code says a device failed
and the log names each one; no worker is left behind.

One host serves them all at once (a worker each): a worker that exits, is killed by SIGKILL,
SIGSEGV or SIGBUS, busy-loops or sleeps (it stops answering), runs out of its memory limit, and
one that ignores SIGTERM and will not stop its run (it is killed at the stop).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import pytest

from devicehost import exitcodes


def _load_watchdog_tests() -> ModuleType:
    # The vmbfs and vsock data movers of the inline-watchdog tests, reused.
    name = "devicehost_tests_watchdog"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "test_watchdog.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


watchdog_tests = _load_watchdog_tests()
short_dir = watchdog_tests.short_dir

#: Each failing device: (how, its extra keys, what its failure says).
FAILING: Final = {
    "exits": ("exit", "", "exited with code 3"),
    "killed": ("sigkill", "", "was killed by SIGKILL"),
    "segv": ("sigsegv", "", "was killed by SIGSEGV"),
    "bus": ("sigbus", "", "was killed by SIGBUS"),
    "busy": ("busy", "", "it stopped answering"),
    "sleeps": ("sleep", "", "it stopped answering"),
    "leaks": ("leak", 'memory_limit = "256M"\n', "MemoryError"),
    "deaf": ("ignore-term", "", "run did not stop within 1 s of its cancel"),
}


class ServedWithWorkers(watchdog_tests.Served):  # type: ignore[misc,name-defined]
    """``devicehost run`` serving vmbfs and vsock inline and every FAILING device in a worker."""

    def __init__(self, sockets: Path, files: Path, thirdparty: Any) -> None:
        self.vmbus = sockets / "vmbus.sock"
        self.vsock = sockets / "vsock"
        self.vhost_user = sockets / "vsock.vu"
        self.control = sockets / "control.sock"
        self.content = os.urandom(watchdog_tests.FILE_BYTES)
        (files / "data.bin").write_bytes(self.content)
        crashers = "".join(
            f'[[device]]\nplugin = "crash"\nname = "{name}"\nhow = "{how}"\n'
            f'isolation = "process"\nhook_deadline = 2\nstop_deadline = 1\n{extra}\n'
            for name, (how, extra, _) in FAILING.items())
        config = files / "host.toml"
        config.write_text(
            f'[host]\nvmbus_socket = "{self.vmbus}"\ncontrol_socket = "{self.control}"\n\n'
            f'[[device]]\nplugin = "vmbfs"\nname = "fs"\nroot = "{files}"\n\n'
            f'[[device]]\nplugin = "vsock"\nname = "vsock0"\nguest_cid = 3\n'
            f'base_path = "{self.vsock}"\nvhost_user_socket = "{self.vhost_user}"\n\n'
            + crashers)
        site = files / "site"
        thirdparty.write_installed(
            site, thirdparty.device_dist("dh-crash", "dh_crash", "crash", "CrashDevice"))
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("DEVICEHOST_") and k != "NOTIFY_SOCKET"}
        env["PYTHONPATH"] = str(site)
        self.log = bytearray()
        self.proc = subprocess.Popen(
            [*watchdog_tests.devicehost_command(), "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    def inspect(self) -> dict[str, Any]:
        done = subprocess.run([*watchdog_tests.devicehost_command(), "inspect", "--socket",
                               str(self.control), "--json"],
                              capture_output=True, timeout=watchdog_tests.STEP, check=True)
        tree: dict[str, Any] = json.loads(done.stdout)
        return tree


def worker_pids(tree: dict[str, Any]) -> list[int]:
    return [d["device"]["worker"]["pid"] for d in tree["devices"]
            if "worker" in d.get("device", {})]


def test_failing_workers_fail_only_their_devices_and_the_host_stops(
    thirdparty: Any, tmp_path: Path, short_dir: Path,
) -> None:
    served = ServedWithWorkers(short_dir, tmp_path, thirdparty)
    try:
        served.wait_for("devicehost.host: ready\n")
        for how, _, _ in FAILING.values():
            served.wait_for(f"crash: run fails ({how}) in pid")
        deadline = time.monotonic() + watchdog_tests.STEP
        while True:  # the failures of all but "deaf" (it fails at the stop) are seen
            tree = served.inspect()
            states = {d["name"]: d for d in tree["devices"]}
            failed = {n for n in FAILING if states[n]["state"] == "failed"}
            if failed == set(FAILING) - {"deaf"} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert failed == set(FAILING) - {"deaf"}, states
        for name in failed:
            assert FAILING[name][2] in states[name]["failure"], states[name]
        assert states["fs"]["state"] != "failed" and states["vsock0"]["state"] != "failed"
        pids = worker_pids(tree)
        assert len(pids) == len(FAILING)
        served.read_file_over_vmbus()
        served.echo_over_vsock()
        start = time.monotonic()
        code, log = served.stop()
        took = time.monotonic() - start
    finally:
        served.kill()
    assert code == exitcodes.FAILED, log
    # Each failure logged once, by its device; the summary names them all.
    for name, (_, _, cause) in FAILING.items():
        lines = [line for line in log.splitlines()
                 if line.startswith(f"ERROR devicehost.device.{name}:")
                 or f" ERROR devicehost.device.{name}: " in line]
        assert len(lines) == 1, (name, lines)
        assert cause in lines[0], lines[0]
    summary = [line for line in log.splitlines() if "device(s) failed:" in line]
    assert len(summary) == 1 and summary[0].endswith(
        f"stopped; {len(FAILING)} of {len(FAILING) + 2} device(s) failed: "
        + ", ".join(FAILING)), summary
    assert took < 10, f"stopped {took:.1f} s after SIGTERM"
    for pid in pids:  # every worker ended with its host
        assert not Path(f"/proc/{pid}").exists() or _is_zombie_of_nobody(pid)
    print(f"stopped {took:.1f} s after SIGTERM")


def _is_zombie_of_nobody(pid: int) -> bool:
    """A pid that still shows belongs to another process now (reused) or is being reaped by
    init; either way not a worker of the ended host."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "devicehost.worker" not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace") \
        or "State:\tZ" in status


pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestAssertRewriteWarning")
