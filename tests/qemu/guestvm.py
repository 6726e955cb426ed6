# SPDX-License-Identifier: MIT
"""One QEMU guest run: the exact command line, a serial-console reader, and a sure kill.

QEMU always runs with ``-accel tcg`` (the machine's ``/dev/kvm`` is a PVM nested KVM that cannot
run a Debian kernel), ``-no-reboot`` and ``panic=-1`` (a guest panic exits QEMU), under
``timeout`` and in its own session; :meth:`GuestVm.kill` sends SIGKILL to QEMU's PID (from
``-pidfile``) and to the ``timeout`` wrapper's process group, and is safe to call again.

Guest RAM is a shared memfd (``memory-backend-memfd,share=on``) because a vhost-user backend maps
it; the vsock device is ``vhost-user-vsock-pci`` on a chardev that connects to the backend's socket
(``vsock_options`` appends properties, e.g. ``,seqpacket=on``).

The serial console (QEMU's stdout) is read line by line on a thread; :meth:`GuestVm.expect` waits
for the next line matching a pattern and raises :class:`GuestFailure`, carrying the whole console
transcript, when the deadline passes, when QEMU exits first, or when the guest reports an error.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .guestimage import GuestImage

__all__ = ["GuestFailure", "GuestVm", "qemu_command"]

# Lines that mean the guest cannot go on: expect() fails at once instead of waiting out a deadline.
FATAL_LINE = re.compile(r"DH (ERROR|STEPFAIL)|Kernel panic")
# Terminal control sequences SeaBIOS writes; they share a line with the guest's first output.
ANSI_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[^\[])")


class GuestFailure(AssertionError):
    """Raised when the guest did not print what the test waited for (message has the console)."""


def qemu_command(
    image: GuestImage,
    *,
    vhost_user_socket: Path | None,
    steps: Sequence[str],
    pidfile: Path,
    memory_mib: int = 256,
    vsock_options: str = "",
) -> list[str]:
    """The QEMU command line (without the ``timeout`` wrapper) of one guest run."""
    for step in steps:
        if not re.fullmatch(r"[a-z]+(:[0-9]+)*", step):
            raise ValueError(f"guest step {step!r} is not NAME[:NUMBER...]")
    append = f"console=ttyS0 panic=-1 quiet dhsteps={','.join(steps) or 'none'}"
    argv = [
        str(image.qemu),
        "-accel", "tcg",
        "-machine", "q35,memory-backend=mem",
        "-cpu", "max",
        "-smp", "1",
        "-m", f"{memory_mib}M",
        "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", append,
        "-nographic", "-no-reboot", "-nodefaults",
        "-serial", "stdio",
        "-pidfile", str(pidfile),
    ]  # fmt: skip
    if vhost_user_socket is not None:
        argv += [
            "-chardev", f"socket,id=vsock0,path={vhost_user_socket}",
            "-device", f"vhost-user-vsock-pci,chardev=vsock0{vsock_options}",
        ]  # fmt: skip
    return argv


class GuestVm:
    """A running QEMU guest; use as a context manager so that it is always killed."""

    def __init__(
        self,
        image: GuestImage,
        work_dir: Path,
        *,
        vhost_user_socket: Path | None,
        steps: Sequence[str],
        timeout_s: float = 120.0,
        vsock_options: str = "",
    ) -> None:
        self._pidfile = work_dir / f"qemu-{os.getpid()}-{id(self):x}.pid"
        self.argv = [
            "timeout",
            "--kill-after=5",
            f"{timeout_s:.0f}",
            *qemu_command(
                image, vhost_user_socket=vhost_user_socket, steps=steps, pidfile=self._pidfile,
                vsock_options=vsock_options,
            ),
        ]
        self._lines: list[str] = []
        self._cursor = 0
        self._cond = threading.Condition()
        self._eof = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.started_at = 0.0
        self.line_times: list[float] = []

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> GuestVm:
        self.started_at = time.monotonic()
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="qemu-serial", daemon=True)
        self._reader.start()
        return self

    def __enter__(self) -> GuestVm:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = ANSI_ESCAPE.sub("", raw.decode("utf-8", errors="replace")).rstrip("\r\n")
            with self._cond:
                self._lines.append(line)
                self.line_times.append(time.monotonic())
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def kill(self) -> None:
        """SIGKILL QEMU by its PID and the timeout wrapper's process group; reap both."""
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            qemu_pid = int(self._pidfile.read_text().strip())
            os.kill(qemu_pid, signal.SIGKILL)
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self._pidfile.unlink()

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself; return the status (124: the timeout wrapper fired)."""
        assert self._proc is not None
        try:
            rc = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestFailure(self.report(f"QEMU did not exit within {timeout:.0f} s")) from None
        if self._reader is not None:
            self._reader.join(timeout=5)
        return rc

    # -- console ---------------------------------------------------------------------------
    @property
    def console(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    def report(self, what: str) -> str:
        return (
            f"{what}\n--- QEMU command ---\n{' '.join(self.argv)}\n--- QEMU/guest console ---\n"
            + (self.console)
        )

    def expect(self, pattern: str, timeout: float, *, stop_on_error: bool = True) -> re.Match[str]:
        """Consume console lines up to and including the next one matching ``pattern``.

        With ``stop_on_error`` a guest error line (``DH ERROR``, ``DH STEPFAIL``, a kernel panic)
        seen first raises at once; without it the caller's pattern must match those itself.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._cursor < len(self._lines):
                    line = self._lines[self._cursor]
                    self._cursor += 1
                    match = regex.search(line)
                    if match:
                        return match
                    if stop_on_error and FATAL_LINE.search(line):
                        raise GuestFailure(
                            self.report(f"guest failed while waiting for {pattern!r}")
                        )
                if self._eof:
                    raise GuestFailure(self.report(f"QEMU exited before printing {pattern!r}"))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestFailure(self.report(f"no {pattern!r} within {timeout:.0f} s"))
                self._cond.wait(left)

    def elapsed_of_last_match(self) -> float:
        """Seconds from QEMU start to the arrival of the last line expect() consumed."""
        with self._cond:
            return self.line_times[self._cursor - 1] - self.started_at
