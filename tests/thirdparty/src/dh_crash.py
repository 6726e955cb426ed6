"""A third-party device that fails in its worker in one of the ways plugins and C code do.

``how`` is the way (``none`` runs quietly): ``exit`` (``os._exit(3)``), ``sigkill``, ``sigsegv``
(reads address 0), ``sigbus`` (touches a memfd mapping truncated under it), ``busy`` (a busy
loop), ``sleep`` (``time.sleep(3600)``), ``ignore-term`` (ignores SIGTERM and swallows the
cancellation of its run), ``leak`` (allocates until MemoryError) or ``raise`` (RuntimeError);
``construct`` (the constructor raises ValueError), ``slow-build`` (the constructor takes
1.5 s); ``hook`` is where (``run``, ``open`` or ``close``); ``once``: only in the device's
first worker (a restarted one runs quietly). The device reports ``{"pid": PID}`` under
``"started"`` when its run starts and logs ``crash: <hook> fails (<how>) in pid <pid>`` on logger
``dh_crash`` just before it fails.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import signal
import time
from typing import Any

import anyio
import attrs

from devicehost import DeviceContext, LocalOffer, hookimpl

log = logging.getLogger("dh_crash")


@attrs.frozen
class CrashConfig:
    how: str = "none"
    hook: str = "run"
    once: bool = False


def _restart(ctx: DeviceContext) -> Any:
    return getattr(ctx.host, "restart", None)


class CrashDevice:
    config_class = CrashConfig

    def __init__(self, config: CrashConfig | None) -> None:
        self.config = config or CrashConfig()
        if self.config.how == "construct":
            raise ValueError("dh_crash refuses to be built")
        if self.config.how == "slow-build":
            time.sleep(1.5)  # a heavy import or constructor: slower than a short hook deadline
        self.runs = 0

    async def _maybe_fail(self, ctx: DeviceContext, hook: str) -> None:
        how = self.config.how
        if hook != self.config.hook or how == "none":
            return
        if self.config.once and _restart(ctx) is not None:
            return
        log.warning("crash: %s fails (%s) in pid %d", hook, how, os.getpid())
        if how == "exit":
            os._exit(3)
        elif how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "sigsegv":
            ctypes.string_at(0)
        elif how == "sigbus":
            fd = os.memfd_create("dh-crash")
            os.ftruncate(fd, mmap.PAGESIZE)
            mapping = mmap.mmap(fd, mmap.PAGESIZE)
            os.ftruncate(fd, 0)
            mapping[0] = 1
        elif how == "busy":
            while True:
                pass
        elif how == "sleep":
            time.sleep(3600)
        elif how == "ignore-term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            with anyio.CancelScope(shield=True):
                await anyio.sleep(3600)
        elif how == "leak":
            hoard = []
            while True:
                hoard.append(bytearray(8 << 20))
                await anyio.sleep(0)
        elif how == "raise":
            raise RuntimeError(f"dh_crash fails in {hook}")
        elif how == "spam":  # floods its log, then goes on working
            for i in range(20_000):
                log.warning("spam line %d", i)
        else:
            raise ValueError(f"unknown way to fail: {how!r}")

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer({"how": self.config.how})

    @hookimpl
    async def open(self, ctx: DeviceContext, resources: LocalOffer) -> dict[str, Any]:
        await self._maybe_fail(ctx, "open")
        return {"pid": os.getpid()}

    @hookimpl
    def run(self, ctx: DeviceContext, runner: dict[str, Any]) -> Any:
        return self._run(ctx, runner)

    async def _run(self, ctx: DeviceContext, runner: dict[str, Any]) -> None:
        self.runs += 1
        report = getattr(ctx.host, "report", None)
        if report is not None:
            report("started", {"pid": os.getpid(), "runs": self.runs})
            # A report is sent by the worker's event loop: give it a moment before failing.
            await anyio.sleep(0.2)
        await self._maybe_fail(ctx, "run")
        await anyio.sleep_forever()

    @hookimpl
    async def close(self, ctx: DeviceContext, runner: dict[str, Any]) -> None:
        await self._maybe_fail(ctx, "close")

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: dict[str, Any] | None) -> dict[str, Any]:
        restart = _restart(ctx)
        return {
            "pid": os.getpid(),
            "runs": self.runs,
            "restart": None if restart is None else {
                "count": restart.count, "cause": restart.cause, "reports": restart.reports},
        }
