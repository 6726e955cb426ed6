"""What ``devicehost run`` tells its operator once the devices are started, and at the end.

- One ``ready:`` line per served device saying where it is reached
  (:func:`devicehost.endpoints.endpoints`): socket paths, CID, offer and instance ids, a local
  device's ``LocalOffer.description``.
- Warnings when nothing will happen: a VMBus client device whose claimed instance no device of
  the host offers.
- The summary: ``serving 5 of 5 devices`` or ``serving 3 of 5 devices; failed: imc (key 'file'
  = '/var/lib/vm/imc.hiv': ...), vsock0 (...)``, also the sd_notify ``STATUS=``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from devicehost.endpoints import endpoints, format_endpoints, unclaimed_intercepts
from devicehost.lifecycle import DeviceState

if TYPE_CHECKING:
    from devicehost.host import Host

__all__ = ["announce", "failed_devices", "summary"]

#: The longest reason shown for one failed device in the summary line.
_MAX_WHY: Final = 400


def failed_devices(host: Host, names: Sequence[str]) -> dict[str, str]:
    """Each of ``names`` that is not served or has failed since, with why (in config order)."""
    failed: dict[str, str] = {}
    for name in names:
        device = host.devices.get(name)
        if name in host.failures:
            failed[name] = host.failures[name]
        elif device is None:
            failed[name] = "not served"
        elif device.state is DeviceState.FAILED:
            failed[name] = device.failure or "failed"
    return failed


def _short(why: str) -> str:
    line = " ".join(why.split())
    return line if len(line) <= _MAX_WHY else line[: _MAX_WHY - 3] + "..."


def summary(host: Host, names: Sequence[str]) -> str:
    """``serving N of M devices`` and, if any failed, ``; failed: name (why), ...``."""
    failed = failed_devices(host, names)
    plural = "s" if len(names) != 1 else ""
    text = f"serving {len(names) - len(failed)} of {len(names)} device{plural}"
    if failed:
        text += "; failed: " + ", ".join(f"{n} ({_short(w)})" for n, w in failed.items())
    return text


async def announce(host: Host, names: Sequence[str], log: logging.Logger) -> int:
    """Log a ``ready:`` line per served device and the nothing-will-happen warnings; returns
    how many of ``names`` are served."""
    failed = failed_devices(host, names)
    for name in names:
        device = host.devices.get(name)
        if name in failed or device is None:
            continue
        where = format_endpoints(await endpoints(host, device))
        log.info("ready: %s (%s, %s): %s", name, device.ctx.plugin, device.state.value, where)
    for name, instance in unclaimed_intercepts(host):
        log.warning("device %r intercepts VMBus instance %s, but no device of this host offers"
                    " it: it will wait and do nothing (configure the device that offers it)",
                    name, instance)
    return len(names) - len(failed)
