"""What a device's hooks are handed: the device context, and the offer of a device without a bus."""

from __future__ import annotations

import logging
from typing import Any

import attrs

from devicehost.handoff import FdStash

__all__ = ["DeviceContext", "LocalOffer"]


@attrs.frozen
class DeviceContext:
    """One configured device, as its hooks see it.

    ``name`` is unique in the host; ``plugin`` is the entry-point name of the device's plugin;
    ``config`` is the plugin's attrs config value; ``host`` is the running host (``None`` when a
    device is driven by the test kit without one) through which a device reaches host services.
    ``fds`` is the device's :class:`~devicehost.handoff.FdStash`: in ``save_open`` a device
    declares the file descriptors its state needs (``handle = ctx.fds.put(sock)``, the handle
    saved in its state), in ``restore_open`` it takes them back (``ctx.fds.take(handle,
    "socket")``), so that a new process can take the device over live (``docs/servicing.md``).
    """

    name: str
    plugin: str
    config: Any
    logger: logging.Logger
    host: Any = None
    fds: FdStash = attrs.field(factory=FdStash, eq=False, repr=False)


@attrs.frozen
class LocalOffer:
    """The offer of a device that needs no bus: the host opens it right after ``offer``.

    ``description`` is a JSON-able summary of what the device found (e.g. nodes and CPUs) that
    ``devicehost run`` logs and ``inspect`` may repeat.
    """

    description: dict[str, Any] = attrs.field(factory=dict)
