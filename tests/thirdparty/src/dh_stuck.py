"""A third-party device that gets stuck in one hook, in one of the ways plugins do.

``hang`` names the hook (``offer``, ``open``, ``close``, ``save_open``, ``restore_open``,
``inspect`` or ``run``); ``how`` is the way it hangs:

- ``forever``: awaits for ever (a cancellation ends it);
- ``swallow``: awaits in a shielded scope, so its cancellation is swallowed until ``released``;
- ``thread``: blocks in a worker thread until ``thread_released`` (a cancellation cannot end it);
- ``sleep``: ``time.sleep(3600)``, blocking the event loop;
- ``busy``: a busy loop, blocking the event loop.

The device logs ``stuck: <hook> hangs (<how>)`` on the logger ``dh_stuck`` when it starts to hang.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import anyio
import attrs

from devicehost import DeviceContext, LocalOffer, hookimpl
from devicehost.savedstate import saved_state

log = logging.getLogger("dh_stuck")


@attrs.frozen
class StuckConfig:
    hang: str = "run"
    how: str = "forever"


@saved_state("dh_stuck.State", 1)
@attrs.frozen
class StuckState:
    opened: int


class StuckDevice:
    config_class = StuckConfig

    def __init__(self, config: StuckConfig | None) -> None:
        self.config = config or StuckConfig()
        self.released = anyio.Event()
        self.thread_released = threading.Event()
        self.hanging = anyio.Event()

    async def _maybe_hang(self, hook: str) -> None:
        if hook != self.config.hang:
            return
        log.warning("stuck: %s hangs (%s)", hook, self.config.how)
        how = self.config.how
        # ``hanging`` is set once nothing can end the hang any more (for the tests to wait on).
        if how == "forever":
            self.hanging.set()
            await anyio.sleep_forever()
        elif how == "swallow":
            with anyio.CancelScope(shield=True):
                self.hanging.set()
                await self.released.wait()
        elif how == "thread":
            await anyio.to_thread.run_sync(self._block)
        elif how == "sleep":
            time.sleep(3600)
        elif how == "busy":
            while True:
                pass
        else:
            raise ValueError(f"unknown way to hang: {how!r}")

    def _block(self) -> None:
        anyio.from_thread.run_sync(self.hanging.set)
        self.thread_released.wait()

    @hookimpl
    async def offer(self, ctx: DeviceContext) -> LocalOffer:
        await self._maybe_hang("offer")
        return LocalOffer({"hang": self.config.hang})

    @hookimpl
    async def open(self, ctx: DeviceContext, resources: LocalOffer) -> dict[str, Any]:
        await self._maybe_hang("open")
        return {"opened": 1}

    @hookimpl
    def run(self, ctx: DeviceContext, runner: dict[str, Any]) -> Any:
        return self._run()

    async def _run(self) -> None:
        await self._maybe_hang("run")
        await anyio.sleep_forever()

    @hookimpl
    async def close(self, ctx: DeviceContext, runner: dict[str, Any]) -> None:
        await self._maybe_hang("close")

    @hookimpl
    async def save_open(self, ctx: DeviceContext, runner: dict[str, Any]) -> StuckState:
        await self._maybe_hang("save_open")
        return StuckState(runner["opened"])

    @hookimpl
    async def restore_open(
        self, ctx: DeviceContext, state: StuckState, resources: LocalOffer
    ) -> dict[str, Any]:
        await self._maybe_hang("restore_open")
        return {"opened": state.opened + 1}

    @hookimpl
    async def inspect(self, ctx: DeviceContext, runner: dict[str, Any] | None) -> dict[str, Any]:
        await self._maybe_hang("inspect")
        return {"hang": self.config.hang}
