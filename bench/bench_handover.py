# SPDX-License-Identifier: MIT
"""vsock handoff downtime: ``devicehost run --takeover`` 20 times under live streams both ways.

The device is vsock served over vhost-user by real ``devicehost run`` processes; the VMM is the
test kit's vhost-user frontend in this process and the guest its guest stack, which streams both
ways without pause on a guest-initiated and a host-initiated connection (64 KiB writes, the
guest's 64 rx buffers of 64 KiB). The guest-visible progress is the data arriving: at the guest
(host -> guest) and at the host programs (guest -> host, which is what frees the guest's credit).

Rows (milliseconds), per handover the longest gap between two arrivals in the window from the new
process's spawn until 100 ms after it logged ready (the new process's imports compete for the two
CPUs; the old one serves meanwhile), over 20 handovers:

- ``handover_gap_down_median`` / ``handover_gap_down_worst``: host -> guest arrivals at the guest;
- ``handover_gap_up_median`` / ``handover_gap_up_worst``: guest -> host arrivals at the host.

The same run's baseline is a plain ``--state`` restart (``state_restart_gap``): SIGTERM, a new
``devicehost run --state``, the VMM reconnects (realize, start) and the guest opens a new
connection; from the SIGTERM to the first byte arriving at the guest on it (a restart loses every
connection; the VMM reconnect is the fastest possible, a real VMM would not reconnect by itself).

Targets (issue 15): worst gap under 100 ms, median under 20 ms. Every byte of every stream must
arrive once (SHA-256 of each direction checked; the benchmark fails otherwise).
"""

from __future__ import annotations

import importlib.util
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio

from devicehost.memory import GuestMemory

__all__ = ["run"]

HANDOVERS = 20
ROOT = Path(__file__).resolve().parents[1]


def _servedrun() -> ModuleType:
    path = ROOT / "plugins" / "vsock" / "tests" / "servedrun.py"
    spec = importlib.util.spec_from_file_location("bench_vsock_servedrun", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _largest_gap(times: list[float], start: float, end: float) -> float:
    inside = sorted(t for t in times if start <= t <= end)
    return max((b - a for a, b in itertools.pairwise(inside)), default=end - start)


async def _measure(sr: ModuleType, served: Any) -> tuple[list[float], list[float], float]:
    await anyio.to_thread.run_sync(served.start)
    memory = GuestMemory.memfd(64 << 20)
    guest = await sr.Guest.connect(served.vhost_user_socket, memory)
    sockets = guest.sockets
    sockets.listen(6000)
    flows = {name: sr.Flow(name) for name in ("a-up", "a-down", "b-up", "b-down")}
    stop = anyio.Event()
    down_gaps: list[float] = []
    up_gaps: list[float] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sockets.pump)
            listener = await anyio.create_unix_listener(f"{served.base_path}_5000")
            a = await sockets.connect(5000, 1024)
            host_a = await listener.accept()
            host_b = await anyio.connect_unix(served.base_path)
            await host_b.send(b"CONNECT 6000\n")
            line = b""
            while not line.endswith(b"\n"):
                line += await host_b.receive(1)
            b = sockets.accepted[-1]
            async with anyio.create_task_group() as streams:
                streams.start_soon(sr.guest_flow, sockets, a, flows["a-up"], flows["a-down"], stop)
                streams.start_soon(sr.host_flow, host_a, flows["a-down"], flows["a-up"], stop)
                streams.start_soon(sr.guest_flow, sockets, b, flows["b-up"], flows["b-down"], stop)
                streams.start_soon(sr.host_flow, host_b, flows["b-down"], flows["b-up"], stop)
                await anyio.sleep(0.5)  # the streams are at full speed
                for _ in range(HANDOVERS):
                    new = await anyio.to_thread.run_sync(served.take_over)
                    await anyio.sleep(0.2)  # arrivals after the window's end are in
                    end = new.ready_at + 0.1
                    down = flows["a-down"].arrivals + flows["b-down"].arrivals
                    up = flows["a-up"].arrivals + flows["b-up"].arrivals
                    down_gaps.append(_largest_gap(down, new.spawned_at, end))
                    up_gaps.append(_largest_gap(up, new.spawned_at, end))
                stop.set()
            for flow in flows.values():
                flow.check()
            for stream in (host_a, host_b):
                await stream.aclose()
            # The baseline: a plain --state restart; the VMM reconnects, the guest connects anew.
            stopped = time.monotonic()
            await anyio.to_thread.run_sync(served.restart)
            memory2 = GuestMemory.memfd(64 << 20)
            guest2 = await sr.Guest.connect(served.vhost_user_socket, memory2)
            try:
                tg.start_soon(guest2.sockets.pump)
                c = await guest2.sockets.connect(5000, 1100)
                host_c = await listener.accept()
                await host_c.send(b"x")
                while not c.received:
                    await c.wait_changed()
                restart = time.monotonic() - stopped
                await host_c.aclose()
            finally:
                await guest2.aclose()
                memory2.close()
            await listener.aclose()
            tg.cancel_scope.cancel()
    finally:
        await guest.aclose()
        memory.close()
    return down_gaps, up_gaps, restart


def run() -> list[dict[str, Any]]:
    sr = _servedrun()
    with tempfile.TemporaryDirectory(prefix="dhbh-") as tmp:
        served = sr.ServedVsock(Path(tmp))
        try:
            down, up, restart = anyio.run(_measure, sr, served)
        finally:
            served.close()
    baseline_ms = restart * 1000
    rows = []
    for name, value in (("handover_gap_down_median", statistics.median(down)),
                        ("handover_gap_down_worst", max(down)),
                        ("handover_gap_up_median", statistics.median(up)),
                        ("handover_gap_up_worst", max(up))):
        ms = value * 1000
        rows.append({"name": name, "value": round(ms, 2), "unit": "ms",
                     "baseline_name": "state_restart_gap", "baseline_value": round(baseline_ms, 1),
                     "ratio": round(ms / baseline_ms, 4)})
    return rows
