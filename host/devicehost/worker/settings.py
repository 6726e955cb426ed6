"""A device's worker settings (its ``[[device]]`` keys) and what crosses at a worker's start.

Keys of a ``[[device]]`` table (the host's, like the deadlines: a plugin's config cannot use
them)::

    isolation = "process"        # or "inline"; unset: [host] isolation (default "inline")
    restart = "on-failure"       # or "no" (default): restart a worker that failed while running
    restart_burst = 5            # at most this many restarts within restart_interval, then FAILED
    restart_interval = 60        # seconds
    restart_delay = 0.1          # seconds before the first restart; doubled for each further one
    restart_delay_max = 10       # within restart_interval, up to this
    memory_limit = "512M"        # the worker's address space (RLIMIT_AS): bytes, or K/M/G suffix
"""

from __future__ import annotations

import enum
import math
import pathlib
import re
from typing import Any, Final, Literal

import attrs

__all__ = [
    "KEYS",
    "MIN_MEMORY_LIMIT",
    "RestartInfo",
    "WorkerSettings",
    "config_table",
    "parse_size",
]

#: The ``[[device]]`` keys that are the worker's.
KEYS: Final = ("isolation", "restart", "restart_burst", "restart_interval", "restart_delay",
               "restart_delay_max", "memory_limit")
#: The smallest memory limit accepted: below it the Python runtime of the worker cannot start.
MIN_MEMORY_LIMIT: Final = 64 << 20
_SIZE: Final = re.compile(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", re.IGNORECASE)
_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: int | str | None) -> int | None:
    """``memory_limit`` in bytes, from an int or a string with an optional K/M/G/T suffix
    (``"512M"``); ValueError naming the key."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"memory_limit: expected a size, got {value!r}")
    if isinstance(value, int):
        number = value
    else:
        match = _SIZE.fullmatch(value)
        if match is None:
            raise ValueError(f"memory_limit: expected a size such as 536870912 or \"512M\","
                             f" got {value!r}")
        number = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if number < MIN_MEMORY_LIMIT or number >= 1 << 62:
        raise ValueError(f"memory_limit must be at least {MIN_MEMORY_LIMIT >> 20} MiB (a worker's"
                         f" Python runtime needs it), not {number} bytes")
    return number


def _positive(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (math.isfinite(value) and 0 <= value <= 86400):
        raise ValueError(f"{attribute.name} must be between 0 and 86400 seconds, not {value}")


def _burst(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= 10000:
        raise ValueError(f"{attribute.name} must be between 1 and 10000, not {value}")


@attrs.frozen
class WorkerSettings:
    """One device's worker settings (module docstring); ``isolation`` None: the host's."""

    isolation: Literal["inline", "process"] | None = None
    restart: Literal["no", "on-failure"] = "no"
    restart_burst: int = attrs.field(default=5, validator=_burst)
    restart_interval: float = attrs.field(default=60.0, validator=_positive)
    restart_delay: float = attrs.field(default=0.1, validator=_positive)
    restart_delay_max: float = attrs.field(default=10.0, validator=_positive)
    memory_limit: int | None = attrs.field(default=None, converter=parse_size)


@attrs.frozen
class RestartInfo:
    """What a restarted worker's device learns (``ctx.host.restart`` in the worker): how many
    times its device was restarted, why the last worker failed, and the latest report per key
    that the failed workers sent (``ctx.host.report``)."""

    count: int
    cause: str
    reports: dict[str, Any] = attrs.field(factory=dict)


def config_table(value: Any) -> Any:
    """A config value (an attrs instance) as the TOML-like table :func:`devicehost.config.
    structure` builds it from again: paths as strings, enums by value, tuples as lists.
    TypeError for a value a config file could not hold."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return config_table(value.value)
    if isinstance(value, list | tuple):
        return [config_table(v) for v in value]
    if isinstance(value, dict):
        return {str(k): config_table(v) for k, v in value.items()}
    if attrs.has(type(value)):
        # TOML has no null: a field left at None is left out (its default is None, or the
        # structurer would not have accepted it).
        return {f.name: config_table(getattr(value, f.name))
                for f in attrs.fields(type(value))
                if f.init and getattr(value, f.name) is not None}
    raise TypeError(f"a config value of type {type(value).__qualname__} cannot be given to a"
                    " worker (a config file could not hold it either)")
