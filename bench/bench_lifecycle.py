# SPDX-License-Identifier: MIT
"""What a deadline costs a lifecycle call: every hook call and every ``run`` executes in a
detached task the host waits for with a deadline (``devicehost.lifecycle``, ``.detached``).

Rows (asyncio, one device with trivial hooks; best of ``ROUNDS`` rounds of ``CALLS`` calls each):

- ``hook_call_with_deadline``: ``Device.inspect()`` (a detached task, waited for with the hook
  deadline). Baseline: the same hook called and awaited directly (``pm.hook.inspect``).
- ``run_start_stop_with_deadline``: ``Device.start()`` then ``Device.stop()`` (a detached run task,
  cancelled, waited for with the stop deadline). Baseline: a task started in a task group and
  cancelled, as the host ran ``run`` before deadlines.

Lifecycle calls are control-path operations (a guest opening a channel, a host stopping): the
data path inside ``run`` is not touched by the deadlines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from devicehost import DeviceContext, LocalOffer, hookimpl
from devicehost.lifecycle import Device, new_device_manager

__all__ = ["run"]

CALLS = 2000
ROUNDS = 5


class _Trivial:
    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer()

    @hookimpl
    def open(self, ctx: DeviceContext, resources: LocalOffer) -> str:
        return "runner"

    @hookimpl
    def run(self, ctx: DeviceContext, runner: str) -> Any:
        return anyio.sleep_forever()

    @hookimpl
    async def inspect(self, ctx: DeviceContext, runner: str | None) -> dict[str, Any]:
        return {"runner": runner}


async def _rate(step: Callable[[], Awaitable[None]]) -> float:
    best = 0.0
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            await step()
        best = max(best, CALLS / (time.perf_counter() - start))
    return best


async def _measure() -> list[dict[str, Any]]:
    ctx = DeviceContext("bench", "trivial", None, logging.getLogger("bench.lifecycle"))
    device = Device(ctx, new_device_manager(_Trivial(), "bench"))
    await device.offer()
    await device.open(LocalOffer(), start=False)

    async def direct() -> None:
        await device.pm.hook.inspect(ctx=ctx, runner=device.runner)

    async def bounded() -> None:
        await device.inspect()

    async def start_stop() -> None:
        await device.start()
        await device.stop()

    async with anyio.create_task_group() as tg:

        async def plain_task() -> None:
            scope = anyio.CancelScope()
            finished = anyio.Event()

            async def body() -> None:
                with scope:
                    await anyio.sleep_forever()
                finished.set()

            tg.start_soon(body)
            await anyio.lowlevel.checkpoint()
            scope.cancel()
            await finished.wait()

        rows = []
        for name, step, base_name, base in (
            ("hook_call_with_deadline", bounded, "direct_hook_call", direct),
            ("run_start_stop_with_deadline", start_stop, "task_group_start_cancel",
             plain_task),
        ):
            value, baseline = await _rate(step), await _rate(base)
            rows.append({"name": name, "value": round(value, 1), "unit": "calls/s",
                         "baseline_name": base_name, "baseline_value": round(baseline, 1),
                         "ratio": round(value / baseline, 4)})
    await device.close()
    return rows


def run() -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = anyio.run(_measure)
    return result


if __name__ == "__main__":
    import json

    for row in run():
        print(json.dumps(row))
