"""Optional C accelerators: loading them, and the switch that turns them off.

An accelerator is an extension module that implements the common case of a hot path (see
``devicehost/vmbus/_ringc.c``); the pure-Python module that uses it keeps every other case and
every error, and behaves the same without it. Accelerators are built at install time when a C
compiler is present (``setup.py``); when one is missing or fails to import, devicehost runs on the
pure-Python paths. ``DEVICEHOST_PURE_PYTHON=1`` turns every accelerator off (tests run both ways);
``devicehost doctor`` reports which are in use.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["ACCELERATORS", "PURE_PYTHON_ENV", "load", "status"]

#: Setting this environment variable to a non-empty value other than ``0`` disables accelerators.
PURE_PYTHON_ENV = "DEVICEHOST_PURE_PYTHON"

#: Every accelerator devicehost knows, by module name, with what it speeds up.
ACCELERATORS: dict[str, str] = {
    "devicehost.vmbus._ringc": "VMBus ring in-band packets",
    "devicehost.virtio._queuec": "virtqueue device side: popping chains, returning used buffers",
    "devicehost.virtio._driverc": "virtqueue driver side: posting buffers, collecting used ones",
}


def _disabled() -> bool:
    return os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")


def load(name: str) -> ModuleType | None:
    """The accelerator module ``name``, or None if it is turned off, not built or broken."""
    if name not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r}")
    if _disabled():
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def status() -> dict[str, str]:
    """For each accelerator: ``"in use"``, ``"turned off"`` or ``"not built"``."""
    result = {}
    for name in ACCELERATORS:
        if _disabled():
            result[name] = "turned off"
        else:
            result[name] = "in use" if load(name) is not None else "not built"
    return result
