# SPDX-License-Identifier: MIT
"""``devicehost run --config FILE`` as a subprocess serving one vsock device over vhost-user.

The config file is written here; the process is the project's own CLI started with the running
Python (the ``devicehost`` script next to ``sys.executable`` when it exists, else ``-m
devicehost.cli``), so the test exercises exactly what an operator runs. stdout and stderr go to
files in the work directory and are included in every failure report.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs

__all__ = ["DevicehostRun", "VsockLayout", "devicehost_command"]


@attrs.frozen
class VsockLayout:
    """Where the vsock device's sockets live: all Unix sockets, under one short temp directory."""

    work_dir: Path
    guest_cid: int = 3

    @property
    def config_file(self) -> Path:
        return self.work_dir / "devicehost.toml"

    @property
    def vhost_user_socket(self) -> Path:
        return self.work_dir / "vu.sock"

    @property
    def base_path(self) -> Path:
        """The device's listener for host -> guest ``CONNECT``; guest -> host uses ``_<port>``."""
        return self.work_dir / "vsock"

    def port_path(self, port: int) -> Path:
        return Path(f"{self.base_path}_{port}")

    def config_text(self) -> str:
        return (
            "[[device]]\n"
            'plugin = "vsock"\n'
            'name = "vsock0"\n'
            f"guest_cid = {self.guest_cid}\n"
            f'base_path = "{self.base_path}"\n'
            f'vhost_user_socket = "{self.vhost_user_socket}"\n'
        )


def devicehost_command(config_file: Path) -> list[str]:
    """The command line of ``devicehost run`` for the Python running this code."""
    script = Path(sys.executable).parent / "devicehost"
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "devicehost.cli"]
    return [*prefix, "run", "--config", str(config_file)]


class DevicehostRun:
    """A ``devicehost run`` process; a context manager that always terminates and reaps it."""

    def __init__(self, layout: VsockLayout) -> None:
        self.layout = layout
        layout.config_file.write_text(layout.config_text())
        self.argv = devicehost_command(layout.config_file)
        self._stdout = layout.work_dir / "devicehost.stdout"
        self._stderr = layout.work_dir / "devicehost.stderr"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 30.0) -> DevicehostRun:
        """Start the process and wait until its vhost-user socket exists."""
        with self._stdout.open("wb") as out, self._stderr.open("wb") as err:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )
        deadline = time.monotonic() + ready_timeout
        sock = self.layout.vhost_user_socket
        # A subprocess creating a socket file gives no event to wait on: poll the file system.
        while not sock.exists():
            if self._proc.poll() is not None:
                raise AssertionError(
                    self.report(f"devicehost run exited with {self._proc.returncode}")
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    self.report(f"no vhost-user socket {sock} in {ready_timeout} s")
                )
            time.sleep(0.02)
        return self

    def __enter__(self) -> DevicehostRun:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful stop), then SIGKILL after ``timeout``; returns the exit status."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        return self._proc.returncode

    def output(self) -> str:
        def read(path: Path) -> str:
            return path.read_text(errors="replace") if path.exists() else "(none)"

        return (
            f"--- devicehost stdout ---\n{read(self._stdout)}\n"
            f"--- devicehost stderr ---\n{read(self._stderr)}"
        )

    def report(self, what: str) -> str:
        return (
            f"{what}\n--- devicehost command ---\n{' '.join(self.argv)}\n"
            f"--- config ---\n{self.layout.config_text()}{self.output()}"
        )
