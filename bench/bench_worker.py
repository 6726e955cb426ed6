# SPDX-License-Identifier: MIT
"""What a device worker costs (``isolation = "process"``, ``devicehost.worker``).

Rows (asyncio; a local device with trivial hooks; best of ``ROUNDS``):

- ``worker_start``: a host whose one device runs in a worker, from nothing to the device
  running (the worker's interpreter start, imports, init, offer, open, run). Baseline: the same
  host with the device inline.
- ``worker_restart``: the worker SIGKILLed while its device runs, until the device runs again in
  a new worker (``restart = "on-failure"``, ``restart_delay = 0``). Baseline: starting a Python
  interpreter that imports anyio (``python -c 'import anyio'``), the bulk of a worker's start.
- ``worker_hook_round_trip``: ``Device.inspect()`` of the device in a worker (encode, frame,
  socketpair, the worker's loop, decode). Baseline: the same call on the device inline.

Lifecycle calls are control-path operations; the data path of a device in a worker stays in the
worker (its sockets, memory and eventfds are handed to it) and is not measured here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Literal

import anyio

from devicehost import DeviceContext, LocalOffer, hookimpl
from devicehost.lifecycle import DeviceState
from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.worker import WorkerSettings

__all__ = ["run"]

ROUNDS = 5
CALLS = 300


class Trivial:
    def __init__(self, config: None) -> None:
        pass

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer()

    @hookimpl
    def open(self, ctx: DeviceContext, resources: LocalOffer) -> dict[str, int]:
        return {"pid": os.getpid()}

    @hookimpl
    def run(self, ctx: DeviceContext, runner: Any) -> Any:
        return anyio.sleep_forever()

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: Any) -> dict[str, Any]:
        return {"runner": runner}


def _spec(isolation: Literal["inline", "process"], **worker: Any) -> list[DeviceSpec]:
    return [DeviceSpec("t", "trivial", None, WorkerSettings(isolation=isolation, **worker))]


async def _start_time(isolation: Literal["inline", "process"]) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        async with host_with({"trivial": Trivial}, _spec(isolation)) as host:
            assert host.devices["t"].state is DeviceState.RUNNING
            best = min(best, time.perf_counter() - start)
    return best


async def _restart_time() -> float:
    best = float("inf")
    specs = _spec("process", restart="on-failure", restart_delay=0.0, restart_burst=ROUNDS + 1)
    async with host_with({"trivial": Trivial}, specs) as host:
        proxy = host.workers.proxies["t"]
        for _ in range(ROUNDS):
            old = proxy.pids[-1]
            start = time.perf_counter()
            os.kill(old, signal.SIGKILL)
            with anyio.fail_after(60):
                # The runner handle moves to the new worker once the device is open there; its
                # run is started right after.
                while host.devices["t"].runner.worker.pid == old:
                    await anyio.sleep(0.001)
            best = min(best, time.perf_counter() - start)
    return best


async def _round_trips(isolation: Literal["inline", "process"]) -> float:
    async with host_with({"trivial": Trivial}, _spec(isolation)) as host:
        device = host.devices["t"]
        best = 0.0
        for _ in range(ROUNDS):
            start = time.perf_counter()
            for _ in range(CALLS):
                await device.inspect()
            best = max(best, CALLS / (time.perf_counter() - start))
    return best


def _interpreter_start() -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import anyio"], check=True)
        best = min(best, time.perf_counter() - start)
    return best


async def _measure() -> list[dict[str, Any]]:
    worker_start, inline_start = await _start_time("process"), await _start_time("inline")
    restart, interpreter = await _restart_time(), _interpreter_start()
    remote, local = await _round_trips("process"), await _round_trips("inline")

    def row(name: str, value: float, unit: str, base_name: str, base: float) -> dict[str, Any]:
        return {"name": name, "value": round(value, 2), "unit": unit, "baseline_name": base_name,
                "baseline_value": round(base, 2), "ratio": round(value / base, 4)}

    return [
        row("worker_start", worker_start * 1000, "ms", "inline_start", inline_start * 1000),
        row("worker_restart", restart * 1000, "ms", "python_import_anyio", interpreter * 1000),
        row("worker_hook_round_trip", remote, "calls/s", "inline_hook_call", local),
    ]


def run() -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = anyio.run(_measure)
    return result


if __name__ == "__main__":
    import json

    for line in run():
        print(json.dumps(line))
