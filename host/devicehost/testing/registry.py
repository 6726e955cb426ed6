"""A registry of device classes given directly, and a host built from it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs

from devicehost.config import HostSettings
from devicehost.host import Host, open_host
from devicehost.lifecycle import new_device_manager

__all__ = ["DeviceSpec", "StaticRegistry", "host_with"]


class StaticRegistry:
    """The registry interface the host uses, over classes handed in by a test.

    Each class is validated against the hook specs exactly as an installed plugin would be.
    """

    def __init__(
        self, device_classes: Mapping[str, type[Any]], cross_cutting: Sequence[object] = ()
    ) -> None:
        for name, cls in device_classes.items():
            new_device_manager(cls, name)  # raises if the hookimpls do not match the specs
        self.device_classes = dict(device_classes)
        self.cross_cutting = list(cross_cutting)

    def create_device(self, plugin: str, config: Any) -> Any:
        return self.device_classes[plugin](config)

    def default_config(self, plugin: str) -> Any:
        """The plugin's default config value (None if it declares no config class)."""
        config_class = getattr(self.device_classes[plugin], "config_class", None)
        return None if config_class is None else config_class()


@attrs.frozen
class DeviceSpec:
    """One device of a test host: its name, plugin and config value."""

    name: str
    plugin: str
    config: Any = None
    #: Its worker settings (e.g. ``WorkerSettings(isolation="process")``); None: the host's.
    worker: Any = None


@attrs.frozen
class _Config:
    devices: tuple[DeviceSpec, ...]
    host: HostSettings | None = None


@asynccontextmanager
async def host_with(
    device_classes: Mapping[str, type[Any]],
    devices: Sequence[DeviceSpec] | None = None,
    *,
    cross_cutting: Sequence[object] = (),
    guest_memory_size: int = 16 * 1024 * 1024,
    settings: HostSettings | None = None,
    isolation: Literal["inline", "process"] | None = None,
) -> AsyncIterator[Host]:
    """Run a host serving ``devices`` (default: one device per class, named after its plugin,
    with the default config) built from ``device_classes``; ``settings`` is its ``[host]``
    table (e.g. ``HostSettings(vmbus_socket=path)``). ``isolation="process"`` runs every device
    in a worker process (a class must then be importable by its module and name; a
    :class:`DeviceSpec`'s ``worker`` settings choose per device)."""
    registry = StaticRegistry(device_classes, cross_cutting)
    if isolation is not None:
        settings = attrs.evolve(settings or HostSettings(), isolation=isolation)
    if devices is None:
        devices = [
            DeviceSpec(name, name, registry.default_config(name)) for name in device_classes
        ]
    async with open_host(
        registry, _Config(tuple(devices), settings), guest_memory_size=guest_memory_size
    ) as host:
        yield host
