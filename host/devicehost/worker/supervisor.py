"""The supervisor: a host's isolated devices and their workers.

A :class:`Supervisor` belongs to one :class:`~devicehost.host.Host` (``host.workers``, made when
the first isolated device is built). It builds each isolated device's :class:`WorkerProxy`, whose
worker tasks live in the host's task group, and at the host's close stops every worker: each is
asked to exit, killed after its device's stop deadline, and reaped (no worker outlives its host;
one whose supervisor is killed ends at once, :func:`devicehost.worker.limits.exit_with_supervisor`).
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc

from devicehost.detached import Deadlines
from devicehost.errors import PluginError
from devicehost.worker.proxy import WorkerProxy
from devicehost.worker.settings import WorkerSettings

__all__ = ["Supervisor"]


class Supervisor:
    """The isolated devices of one host (module docstring)."""

    def __init__(self, task_group: anyio.abc.TaskGroup) -> None:
        self.task_group = task_group
        self.proxies: dict[str, WorkerProxy] = {}

    def proxy(self, registry: Any, name: str, plugin: str, config: Any,
              settings: WorkerSettings, host_settings: Any, deadlines: Deadlines) -> WorkerProxy:
        """The proxy of device ``name`` of ``plugin`` (a loaded device plugin of ``registry``);
        its worker starts at the device's first hook call."""
        cls = registry.device_classes.get(plugin)
        if cls is None:
            raise PluginError(f"device plugin {plugin!r} is not loaded")
        proxy = WorkerProxy(self.task_group, name, plugin, cls, config, settings, host_settings,
                            deadlines)
        self.proxies[name] = proxy
        return proxy

    async def start(self, name: str) -> None:
        """Start device ``name``'s first worker, if it runs in one and has none yet
        (:meth:`WorkerProxy.start`)."""
        proxy = self.proxies.get(name)
        if proxy is not None:
            await proxy.start()

    async def remove(self, name: str) -> None:
        """Device ``name`` is gone from the host: stop its worker (asked, then killed after its
        stop deadline; reaped). Nothing for a device that has no worker."""
        proxy = self.proxies.pop(name, None)
        if proxy is not None:
            with anyio.CancelScope(shield=True):
                await proxy.aclose()

    async def aclose(self) -> None:
        """Stop every worker (module docstring); returns once every one is reaped."""
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for proxy in self.proxies.values():
                    tg.start_soon(proxy.aclose)
