"""The process's file descriptor limit: raised when ``devicehost run`` starts, and compared by
``devicehost doctor`` with what the configured devices can hold.

Every host connection, vhost-user session, guest-memory region and eventfd is a file descriptor,
and the soft ``RLIMIT_NOFILE`` of most shells and service managers is 1024: less than one vsock
device's 1024 connections need. So ``devicehost run`` raises its own soft limit to the hard one at
start (:func:`raise_soft_limit`), as servers do; it can, because it never uses ``select()`` (the
reason the default is low). The hard limit is the operator's: ``ulimit -Hn``, or
``LimitNOFILE=`` under systemd.

What the devices can hold (:func:`fd_budget`) is an estimate made of:

- :data:`HOST_FDS` for the process itself (standard streams, the event loop, logs, imports);
- :data:`TRANSPORT_FDS` per device for its transport (vhost-user listener and connection, memory
  region fds, kick/call/err eventfds; VMBus ring memory and signal eventfds);
- what the device class declares for itself: a device class may define ``max_fds(config)`` (a
  static or class method taking its config and returning an ``int``): the most descriptors one
  device with that config holds at once besides its transport's, e.g. vsock's 1024 connections
  plus its listener and epoll. A class without it is counted as 0; one whose ``max_fds`` fails
  is reported, not trusted.

Running out anyway does not end the host: accept loops wait (:mod:`devicehost.accepting`).
"""

from __future__ import annotations

import contextlib
import logging
import resource
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from devicehost.config import HostConfig
    from devicehost.plugins import Registry

__all__ = [
    "HOST_FDS",
    "TRANSPORT_FDS",
    "DeviceFds",
    "FdBudget",
    "declared_fds",
    "fd_budget",
    "log_raised_soft_limit",
    "raise_soft_limit",
]

#: Descriptors the host process uses besides its devices.
HOST_FDS: Final = 64
#: Descriptors one device's transport may hold.
TRANSPORT_FDS: Final = 32
_NR_OPEN: Final = "/proc/sys/fs/nr_open"

log = logging.getLogger("devicehost.fdlimit")


def _ceiling(hard: int) -> int:
    """The highest soft limit the kernel allows under ``hard`` (an unlimited hard limit is
    capped by ``fs.nr_open`` for descriptors)."""
    if hard != resource.RLIM_INFINITY:
        return hard
    with contextlib.suppress(OSError, ValueError), open(_NR_OPEN, encoding="ascii") as f:
        return int(f.read().strip())
    return 1 << 20


def raise_soft_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; returns (before, after).

    Never lowers it; if the kernel refuses, the limit stays as it was (after == before).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _ceiling(hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, target


def log_raised_soft_limit() -> None:
    """:func:`raise_soft_limit`, logged (what ``devicehost run`` calls first)."""
    before, after = raise_soft_limit()
    if after != before:
        log.info("file descriptor limit raised from %d to %d (the hard limit)", before, after)
    else:
        log.info("file descriptor limit: %s", "unlimited" if after == resource.RLIM_INFINITY
                 else after)


def declared_fds(device_class: type, config: object) -> int:
    """What ``device_class.max_fds(config)`` declares (0 if the class does not define it).

    Raises :class:`ValueError` naming the class if ``max_fds`` fails or is not a count.
    """
    declare = getattr(device_class, "max_fds", None)
    if declare is None:
        return 0
    try:
        count = declare(config)
    except Exception as exc:
        raise ValueError(f"{device_class.__qualname__}.max_fds failed: {exc!r}") from None
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(
            f"{device_class.__qualname__}.max_fds returned {count!r}, not a count of descriptors"
        )
    return count


@attrs.frozen
class DeviceFds:
    """One configured device's share: its transport's and what its class declared."""

    name: str
    plugin: str
    count: int
    #: Why the declaration could not be used (the count then holds the transport's share only).
    problem: str | None = None


@attrs.frozen
class FdBudget:
    """The descriptor limits of this process against what the configured devices can hold."""

    soft: int
    hard: int
    devices: tuple[DeviceFds, ...]

    @property
    def needed(self) -> int:
        return HOST_FDS + sum(d.count for d in self.devices)

    @property
    def available(self) -> int:
        """The limit ``devicehost run`` works under (it raises the soft limit to the hard)."""
        return _ceiling(self.hard)

    @property
    def enough(self) -> bool:
        return self.available >= self.needed

    def report(self) -> list[str]:
        """What ``devicehost doctor`` prints: the limits, the need per device, the verdict."""
        def show(n: int) -> str:
            return "unlimited" if n == resource.RLIM_INFINITY else str(n)

        parts = [f"host {HOST_FDS}"] + [
            f"{d.plugin} {d.name!r} {d.count}" for d in self.devices
        ]
        lines = [
            f"file descriptors: soft limit {show(self.soft)}, hard limit {show(self.hard)};"
            f" devicehost run raises the soft limit to {self.available}",
            f"file descriptors the devices can hold: up to {self.needed} ({', '.join(parts)})",
        ]
        lines += [f"warning: device {d.name!r}: {d.problem}" for d in self.devices if d.problem]
        if self.enough:
            lines.append("file descriptors: enough")
        else:
            lines.append(
                f"warning: the hard limit {self.available} is below the {self.needed} descriptors"
                " the devices can hold; under load, connections will wait for descriptors."
                " Raise it (ulimit -Hn, systemd LimitNOFILE=) or configure fewer devices"
            )
        return lines


def fd_budget(registry: Registry, config: HostConfig) -> FdBudget:
    """Compare this process's limits with what ``config``'s devices can hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    devices = []
    for device in config.devices:
        cls = registry.device_classes.get(device.plugin)
        problem = None
        declared = 0
        if cls is not None:
            try:
                declared = declared_fds(cls, device.config)
            except ValueError as exc:
                problem = str(exc)
        devices.append(DeviceFds(device.name, device.plugin, TRANSPORT_FDS + declared, problem))
    return FdBudget(soft, hard, tuple(devices))
