"""The host: config -> devices -> transports, running until it is told to stop.

One :class:`Host` owns an anyio task group (where device ``run`` tasks and transport tasks live),
the devices built from the config, and one instance of each transport in use. Adding a device
never fails the host: a device whose plugin cannot build it, or whose ``offer`` raises, is logged
and left out (or marked failed); the other devices keep serving.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
import anyio.abc

from devicehost.context import DeviceContext
from devicehost.errors import DeviceHostError
from devicehost.lifecycle import Device, DeviceState, new_device_manager
from devicehost.transport import transport_class_for

if TYPE_CHECKING:
    from devicehost.memory import GuestMemory

__all__ = ["DEFAULT_GUEST_MEMORY", "Host", "open_host", "run_host"]

log = logging.getLogger("devicehost.host")

#: Size of the in-process guest memory shared by the VMBus server and client.
DEFAULT_GUEST_MEMORY: Final = 64 * 1024 * 1024

T = TypeVar("T")


class Host:
    """A running set of devices. Build it with :func:`open_host`."""

    def __init__(
        self,
        registry: Any,
        task_group: anyio.abc.TaskGroup,
        *,
        guest_memory_size: int = DEFAULT_GUEST_MEMORY,
        cross_cutting: Iterable[object] = (),
    ) -> None:
        self.registry = registry
        self.task_group = task_group
        self.logger = log
        self.devices: dict[str, Device] = {}
        self.failures: dict[str, str] = {}
        self._transports: dict[Callable[[Host], Any], Any] = {}
        self._device_transport: dict[str, Any] = {}
        self._guest_memory: GuestMemory | None = None
        self._guest_memory_size = guest_memory_size
        self._cross_cutting = list(cross_cutting)

    @property
    def guest_memory(self) -> GuestMemory:
        """The in-process guest memory (memfd-backed), made on first use."""
        if self._guest_memory is None:
            from devicehost.memory import GuestMemory

            self._guest_memory = GuestMemory.memfd(self._guest_memory_size)
        return self._guest_memory

    def transport(self, cls: Callable[[Host], T]) -> T:
        """The host's one instance of transport class ``cls``, made on first use."""
        instance: T | None = self._transports.get(cls)
        if instance is None:
            instance = self._transports[cls] = cls(self)
        return instance

    def transport_of(self, name: str) -> Any:
        """The transport serving device ``name``."""
        return self._device_transport[name]

    async def add_device(self, name: str, plugin: str, config: Any) -> Device | None:
        """Build, offer and attach one device. Returns None (and records why) on failure."""
        if name in self.devices or name in self.failures:
            raise DeviceHostError(f"a device named {name!r} already exists")
        try:
            instance = self.registry.create_device(plugin, config)
            pm = new_device_manager(
                instance, name, [*self.registry.cross_cutting, *self._cross_cutting]
            )
        except Exception as exc:
            self._record_failure(name, f"cannot build device: {exc}")
            return None
        ctx = DeviceContext(
            name=name,
            plugin=plugin,
            config=config,
            logger=logging.getLogger(f"devicehost.device.{name}"),
            host=self,
        )
        device = Device(ctx, pm, self.task_group)
        self.devices[name] = device
        try:
            offer = await device.offer()
            transport = self.transport(transport_class_for(offer))
            await transport.add(device, offer)
        except Exception as exc:
            device.failure = device.failure or str(exc)
            device.state = DeviceState.FAILED
            self._record_failure(name, str(exc))
            return device
        self._device_transport[name] = transport
        return device

    def _record_failure(self, name: str, why: str) -> None:
        self.failures[name] = why
        log.error("device %r is not served: %s", name, why)

    async def remove_device(self, name: str) -> None:
        """Revoke and forget device ``name``; a failure is logged, never raised."""
        device = self.devices.pop(name)
        transport = self._device_transport.pop(name, None)
        try:
            if transport is not None:
                await transport.remove(device)
            else:
                await device.close()
        except Exception:
            log.exception("removing device %r failed", name)

    async def inspect(self) -> dict[str, Any]:
        """A JSON-able view of every device."""
        return {
            "devices": [await d.inspect() for d in self.devices.values()],
            "failures": dict(self.failures),
        }

    async def aclose(self) -> None:
        """Remove every device (last added first), then close the transports."""
        with anyio.CancelScope(shield=True):
            for name in reversed(list(self.devices)):
                await self.remove_device(name)
            for transport in reversed(list(self._transports.values())):
                try:
                    await transport.aclose()
                except Exception:
                    log.exception("closing transport %s failed", type(transport).__name__)
            self._transports.clear()
            if self._guest_memory is not None:
                self._guest_memory.close()
                self._guest_memory = None


@asynccontextmanager
async def open_host(
    registry: Any,
    config: Any,
    *,
    guest_memory_size: int = DEFAULT_GUEST_MEMORY,
    cross_cutting: Iterable[object] = (),
) -> AsyncIterator[Host]:
    """Run a host with the devices of ``config`` (a HostConfig) until the block exits."""
    async with anyio.create_task_group() as tg:
        host = Host(
            registry, tg, guest_memory_size=guest_memory_size, cross_cutting=cross_cutting
        )
        try:
            for device_config in config.devices:
                await host.add_device(device_config.name, device_config.plugin,
                                      device_config.config)
            yield host
        finally:
            await host.aclose()
            tg.cancel_scope.cancel()


async def run_host(
    registry: Any,
    config: Any,
    *,
    ready: Callable[[Host], None] | None = None,
    cross_cutting: Iterable[object] = (),
) -> int:
    """Serve ``config``'s devices until SIGINT or SIGTERM, then stop them gracefully.

    Returns the process exit status: 0 after a graceful stop, 1 if no device could be served.
    """
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_host(registry, config, cross_cutting=cross_cutting) as host:
            for name, device in host.devices.items():
                log.info("serving %s (%s): %s", name, device.ctx.plugin, device.state.value)
            if config.devices and not any(
                d.state is not DeviceState.FAILED for d in host.devices.values()
            ):
                log.error("no device could be served")
                return 1
            if ready is not None:
                ready(host)
            async for signum in signals:
                log.info("received %s, stopping devices", signal.Signals(signum).name)
                break
    return 0
