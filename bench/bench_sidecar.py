# SPDX-License-Identifier: MIT
"""Sidecar client against the simulated sidecar kernel.

Rows:

- ``sidecar_test_round_trips``: synchronous ``test`` commands (NONE) per second on one CPU: the
  client writes the command page, the sidecar "ioctl" wakes the simulated CPU thread, which
  dispatches and wakes the caller again.
- ``sidecar_run_intercept_cycles``: run -> intercept -> wait cycles per second on one CPU, with a
  VP script that intercepts at once: start, the CPU thread runs RUN_VP and writes the CPU number to
  the completion pipe, the node's anyio wait loop reads it and wakes the waiter, which decodes the
  HvMessage.

Baseline for both, measured in the same run and interleaved (best round of each kept): a bare
round trip between two threads over two pipes (4-byte write, blocking read, 4-byte write back,
blocking read), i.e. the cost of the two thread hand-offs every sidecar command needs at least.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio

from devicehost_sidecar import SidecarClient, SimulatedSidecar, VpScript

__all__ = ["run"]

ROUNDS = 5
TEST_COUNT = 3000
RUN_COUNT = 1000
PIPE_COUNT = 3000


def _pipe_round_trips() -> float:
    """Seconds per thread-to-thread pipe round trip."""
    to_peer_r, to_peer_w = os.pipe()
    back_r, back_w = os.pipe()

    def peer() -> None:
        for _ in range(PIPE_COUNT):
            os.write(back_w, os.read(to_peer_r, 4))

    thread = threading.Thread(target=peer)
    thread.start()
    started = time.perf_counter()
    for _ in range(PIPE_COUNT):
        os.write(to_peer_w, b"\0\0\0\0")
        os.read(back_r, 4)
    elapsed = time.perf_counter() - started
    thread.join()
    for fd in (to_peer_r, to_peer_w, back_r, back_w):
        os.close(fd)
    return elapsed / PIPE_COUNT


def _test_round_trips() -> float:
    sim = SimulatedSidecar(1, 1)
    client = SidecarClient.open(sim)
    assert client is not None
    try:
        with client.vp(0) as vp:
            test = vp.test
            started = time.perf_counter()
            for _ in range(TEST_COUNT):
                test()
            elapsed = time.perf_counter() - started
    finally:
        client.close()
    return elapsed / TEST_COUNT


def _run_cycles() -> float:
    sim = SimulatedSidecar(1, 1, script=VpScript(intercept_after=0))
    client = SidecarClient.open(sim)
    assert client is not None
    elapsed = 0.0

    async def cycles() -> None:
        nonlocal elapsed
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run_wait_loops)
            with client.vp(0) as vp:
                started = time.perf_counter()
                for _ in range(RUN_COUNT):
                    async with vp.run() as handle:
                        if not await handle.wait():
                            raise AssertionError("the simulated VP did not intercept")
                elapsed = time.perf_counter() - started
            tg.cancel_scope.cancel()

    try:
        anyio.run(cycles)
    finally:
        client.close()
    return elapsed / RUN_COUNT


def _best(fn: Callable[[], float], best: float) -> float:
    return min(best, fn())


def run() -> list[dict[str, Any]]:
    pipe = test = cycle = float("inf")
    for _ in range(ROUNDS):
        pipe = _best(_pipe_round_trips, pipe)
        test = _best(_test_round_trips, test)
        cycle = _best(_run_cycles, cycle)
    baseline = 1 / pipe
    rows = []
    for name, seconds in (
        ("sidecar_test_round_trips", test),
        ("sidecar_run_intercept_cycles", cycle),
    ):
        value = 1 / seconds
        rows.append(
            {
                "name": name,
                "value": round(value, 1),
                "unit": "ops/s",
                "baseline_name": "pipe_thread_round_trips",
                "baseline_value": round(baseline, 1),
                "ratio": round(value / baseline, 3),
            }
        )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
