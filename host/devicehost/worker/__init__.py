"""Device workers: any device can run in its own supervised process (``isolation = "process"``).

The operator's view is ``docs/workers.md``; this package's public surface is what a device or a
transport author needs:

- :func:`register_codec`, :class:`Encoder`, :class:`Decoder`, :class:`CodecError`: how a type
  crosses the worker boundary (:mod:`devicehost.worker.codec`; ``/work/helpers`` keeps the
  interface notes for transport authors).
- :class:`RestartInfo` (``ctx.host.restart`` in a restarted worker) and ``ctx.host.report(key,
  value)``: what a device keeps across its worker's restarts.
- :func:`register_restart_handler` and :class:`Restart`: a transport's own restart (revoke and
  re-offer) instead of the default reopen.
- :class:`WorkerSettings`: a device's ``isolation``, ``restart*`` and ``memory_limit`` keys.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

__all__ = [
    "CodecError",
    "Decoder",
    "Encoder",
    "Restart",
    "RestartInfo",
    "WorkerFailed",
    "WorkerHookError",
    "WorkerRunner",
    "WorkerSettings",
    "register_codec",
    "register_restart_handler",
]

# Imported on first use: the config reads WorkerSettings without the worker machinery.
_LAZY: Final = {
    "CodecError": "devicehost.worker.codec",
    "Decoder": "devicehost.worker.codec",
    "Encoder": "devicehost.worker.codec",
    "register_codec": "devicehost.worker.codec",
    "Restart": "devicehost.worker.proxy",
    "WorkerFailed": "devicehost.worker.proxy",
    "WorkerHookError": "devicehost.worker.proxy",
    "WorkerRunner": "devicehost.worker.proxy",
    "register_restart_handler": "devicehost.worker.proxy",
    "RestartInfo": "devicehost.worker.settings",
    "WorkerSettings": "devicehost.worker.settings",
}

if TYPE_CHECKING:
    from devicehost.worker.codec import CodecError as CodecError
    from devicehost.worker.codec import Decoder as Decoder
    from devicehost.worker.codec import Encoder as Encoder
    from devicehost.worker.codec import register_codec as register_codec
    from devicehost.worker.proxy import Restart as Restart
    from devicehost.worker.proxy import WorkerFailed as WorkerFailed
    from devicehost.worker.proxy import WorkerHookError as WorkerHookError
    from devicehost.worker.proxy import WorkerRunner as WorkerRunner
    from devicehost.worker.proxy import register_restart_handler as register_restart_handler
    from devicehost.worker.settings import RestartInfo as RestartInfo
    from devicehost.worker.settings import WorkerSettings as WorkerSettings


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'devicehost.worker' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
