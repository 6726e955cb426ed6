# SPDX-License-Identifier: MIT
"""Live servicing downtime: ``devicehost run --takeover`` under a live stream, 20 times.

The device is the serviceable test plugin ``dh_ticker`` (tests/thirdparty/src/dh_ticker.py): it
sends a numbered line every millisecond on a Unix socket connection to this benchmark, which
timestamps every line as it arrives. That stream is the guest-visible progress: a handover that
pauses the device shows up as a gap between two lines.

Rows (milliseconds; the same run's baseline is a plain ``--state`` restart: SIGTERM, then a new
``devicehost run --state`` whose device, which cannot take its connection from a file, connects
anew; the baseline value is the time from the SIGTERM to the first line on the new connection):

- ``takeover_gap_median``: per handover, the longest gap between two consecutive lines from
  the moment the new process is spawned until 100 ms after it reports ready (it includes the
  cost of the new process's imports competing for the CPU); the median over 20 handovers.
- ``takeover_gap_worst``: the worst of those 20.
- ``takeover_switch_median``: per handover, the time between the last line from the old process
  and the first line from the new one (the quiesce-save-send-restore-commit path alone).

Targets (issue 15): worst gap under 100 ms, median under 20 ms. Every count must arrive exactly
once, in order, on the one connection (checked: the benchmark fails otherwise).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["run"]

HANDOVERS = 20
INTERVAL = 0.001
ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 120.0


def _builder() -> Any:
    spec = importlib.util.spec_from_file_location(
        "bench_thirdparty_builder", ROOT / "tests" / "thirdparty" / "builder.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _command() -> list[str]:
    script = Path(sys.executable).parent / "devicehost"
    return [str(script)] if script.exists() else [sys.executable, "-m", "devicehost.cli"]


class _Process:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env)
        self.ready = threading.Event()
        self.ready_at = 0.0
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.output.append(line)
            if line.endswith("devicehost.host: ready\n"):
                self.ready_at = time.monotonic()
                self.ready.set()
        self.ready.set()

    def wait_ready(self) -> None:
        if not self.ready.wait(DEADLINE) or not self.ready_at:
            raise RuntimeError("devicehost did not become ready:\n" + "".join(self.output))


class _Peer:
    """Accepts the device's connections; records (arrival, connection, count, pid) per line."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.lines: list[tuple[float, int, int, int]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        number = 0
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            number += 1
            threading.Thread(target=self._read, args=(conn, number), daemon=True).start()

    def _read(self, conn: socket.socket, number: int) -> None:
        with conn, conn.makefile("rb") as stream:
            for raw in stream:
                now = time.monotonic()
                fields = raw.split()
                if fields and fields[0].isdigit():
                    with self.lock:
                        self.lines.append((now, number, int(fields[0]), int(fields[1])))

    def snapshot(self) -> list[tuple[float, int, int, int]]:
        with self.lock:
            return list(self.lines)

    def wait_for(self, predicate: Any) -> None:
        deadline = time.monotonic() + DEADLINE
        while not predicate(self.snapshot()):
            if time.monotonic() > deadline:
                raise RuntimeError("the device's stream stalled")
            time.sleep(0.005)


def _largest_gap(lines: list[tuple[float, int, int, int]], start: float, end: float) -> float:
    times = [t for t, *_ in lines if start <= t <= end]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def run() -> list[dict[str, Any]]:
    builder = _builder()
    with tempfile.TemporaryDirectory(prefix="dh-bench-takeover-") as tmp:
        base = Path(tmp)
        site = base / "site"
        builder.write_installed(site, builder.TICKER)
        config = base / "host.toml"
        config.write_text(
            f'[host]\ncontrol_socket = "{base / "control.sock"}"\n\n'
            f'[[device]]\nplugin = "ticker"\nname = "tick"\npeer = "{base / "peer.sock"}"\n'
            f'listen = "{base / "listen.sock"}"\ninterval = {INTERVAL}\n')
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DEVICEHOST_", "DH_TICKER_", "NOTIFY_SOCKET"))}
        env.update(PYTHONPATH=str(site), DEVICEHOST_LOAD_PLUGINS="ticker")
        state = base / "state.json"
        argv = [*_command(), "run", "--config", str(config), "--state", str(state)]
        peer = _Peer(base / "peer.sock")
        procs: list[_Process] = []
        try:
            old = _Process(argv, env)
            procs.append(old)
            old.wait_ready()
            gaps: list[float] = []
            switches: list[float] = []
            for _ in range(HANDOVERS):
                spawned = time.monotonic()
                new = _Process([*argv, "--takeover"], env)
                procs.append(new)
                new.wait_ready()
                if old.proc.wait(timeout=DEADLINE) != 0:
                    raise RuntimeError("the old host did not exit 0:\n" + "".join(old.output))
                pid_old, pid_new = old.proc.pid, new.proc.pid
                peer.wait_for(lambda lines, p=pid_new: sum(1 for x in lines if x[3] == p) > 50)
                lines = peer.snapshot()
                gaps.append(_largest_gap(lines, spawned, new.ready_at + 0.1))
                last_old = max(t for t, _, _, pid in lines if pid == pid_old)
                first_new = min(t for t, _, _, pid in lines if pid == pid_new)
                switches.append(first_new - last_old)
                old = new
            lines = peer.snapshot()
            counts = [count for _, _, count, _ in lines]
            if counts != list(range(1, len(counts) + 1)) or {c for _, c, _, _ in lines} != {1}:
                raise RuntimeError("a count was lost, repeated, or came on another connection")
            # The baseline: a plain --state restart of the same host.
            stopped = time.monotonic()
            old.proc.send_signal(signal.SIGTERM)
            old.proc.wait(timeout=DEADLINE)
            restarted = _Process(argv, env)
            procs.append(restarted)
            restarted.wait_ready()
            peer.wait_for(lambda lines: any(x[1] == 2 for x in lines))
            first = min(t for t, c, _, _ in peer.snapshot() if c == 2)
            restart = first - stopped
        finally:
            for proc in procs:
                if proc.proc.poll() is None:
                    proc.proc.kill()
                proc.proc.wait()
            peer.listener.close()
    baseline_ms = restart * 1000
    rows = []
    for name, value in (("takeover_gap_median", statistics.median(gaps)),
                        ("takeover_gap_worst", max(gaps)),
                        ("takeover_switch_median", statistics.median(switches))):
        ms = value * 1000
        rows.append({"name": name, "value": round(ms, 2), "unit": "ms",
                     "baseline_name": "state_restart_gap", "baseline_value": round(baseline_ms, 1),
                     "ratio": round(ms / baseline_ms, 4)})
    return rows
