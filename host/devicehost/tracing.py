"""The tracing plugin: a cross-cutting plugin that logs every device hook call.

Enabled by ``DEVICEHOST_TRACE=1``: the host registers :func:`tracing_plugins`' result beside every
device. Each hook call is logged on the ``devicehost.trace`` logger with the device's name and how
long the call took; a hook that returns an awaitable (``run``, async ``open``/``close``...) is
logged again when that awaitable finishes, is cancelled or raises, with the time it ran.

Every record carries ``device``, ``hook``, ``outcome`` and ``duration`` (seconds) attributes, for
log handlers that want structured data.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Awaitable, Coroutine, Generator, Mapping
from typing import Any, Final

from devicehost import hookimpl

__all__ = ["TracePlugin", "tracing_plugins"]

log: Final = logging.getLogger("devicehost.trace")

_TRACE_ENV: Final = "DEVICEHOST_TRACE"


def _device(ctx: Any) -> str:
    return str(getattr(ctx, "name", "?"))


def _emit(device: str, hook: str, outcome: str, duration: float) -> None:
    log.info(
        "device %r: %s %s in %.3f ms",
        device,
        hook,
        outcome,
        duration * 1000.0,
        extra={"device": device, "hook": hook, "outcome": outcome, "duration": duration},
    )


async def _traced(awaitable: Awaitable[Any], device: str, hook: str) -> Any:
    start = time.perf_counter()
    outcome = "awaitable raised"
    try:
        result = await awaitable
        outcome = "awaitable finished"
        return result
    except BaseException as exc:
        # anyio/trio cancellation is a BaseException that must propagate unchanged.
        if not isinstance(exc, Exception):
            outcome = "awaitable cancelled"
        raise
    finally:
        if inspect.iscoroutine(awaitable):
            awaitable.close()
        _emit(device, hook, outcome, time.perf_counter() - start)


class TracePlugin:
    """Wraps all seven device hooks (``wrapper=True``) and logs each call."""

    def _trace(self, hook: str, ctx: Any) -> Generator[None, Any, Any]:
        device = _device(ctx)
        start = time.perf_counter()
        try:
            result = yield
        except BaseException as exc:
            _emit(device, hook, f"raised {type(exc).__name__}", time.perf_counter() - start)
            raise
        _emit(device, hook, "returned", time.perf_counter() - start)
        if inspect.isawaitable(result):
            wrapped: Coroutine[Any, Any, Any] = _traced(result, device, hook)
            return wrapped
        return result

    @hookimpl(wrapper=True)
    def offer(self, ctx: Any) -> Generator[None, Any, Any]:
        return (yield from self._trace("offer", ctx))

    @hookimpl(wrapper=True)
    def open(self, ctx: Any) -> Generator[None, Any, Any]:
        return (yield from self._trace("open", ctx))

    @hookimpl(wrapper=True)
    def run(self, ctx: Any) -> Generator[None, Any, Any]:
        return (yield from self._trace("run", ctx))

    @hookimpl(wrapper=True)
    def close(self, ctx: Any) -> Generator[None, Any, Any]:
        return (yield from self._trace("close", ctx))

    @hookimpl(wrapper=True)
    def save_open(self, ctx: Any) -> Generator[None, Any, Any]:
        return (yield from self._trace("save_open", ctx))

    @hookimpl(wrapper=True)
    def restore_open(self, ctx: Any) -> Generator[None, Any, Any]:
        return (yield from self._trace("restore_open", ctx))

    @hookimpl(wrapper=True)
    def inspect(self, ctx: Any) -> Generator[None, Any, Any]:
        return (yield from self._trace("inspect", ctx))


def tracing_plugins(environ: Mapping[str, str] | None = None) -> list[object]:
    """``[TracePlugin()]`` if ``DEVICEHOST_TRACE`` is set to a true value, else ``[]``."""
    env = os.environ if environ is None else environ
    value = env.get(_TRACE_ENV, "").strip().lower()
    return [TracePlugin()] if value not in ("", "0", "false", "no", "off") else []
