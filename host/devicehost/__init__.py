"""devicehost: a plugin-based host for virtual devices.

The public API is exactly what ``__all__`` lists. Heavy modules (anyio, attrs-based values) are
imported on first use, so ``devicehost list`` stays fast; see PEP 562.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

__all__ = [
    "HOST_API_V1",
    "HOST_API_VERSION",
    "ConfigError",
    "Device",
    "DeviceContext",
    "DeviceError",
    "DeviceHostError",
    "DeviceState",
    "LifecycleError",
    "LocalOffer",
    "PluginError",
    "SavedStateError",
    "__version__",
    "hookimpl",
    "new_device_manager",
    "saved_state",
]

__version__: Final = "0.1.0"

#: The host API version. A plugin declares the version it was written against with an entry point
#: of group ``devicehost.api`` named like its device entry point, whose value names this constant
#: (``vmbfs = "devicehost:HOST_API_V1"``). The host reads the declaration from metadata and refuses,
#: before importing it, a plugin that declares another version or none.
HOST_API_V1: Final = 1
HOST_API_VERSION: Final = HOST_API_V1

_LAZY: Final = {
    # The hookimpl marker lives with the specs: importing pluggy is a third of what
    # ``devicehost list`` would otherwise spend on imports.
    "hookimpl": "devicehost.hookspecs",
    "ConfigError": "devicehost.errors",
    "DeviceError": "devicehost.errors",
    "DeviceHostError": "devicehost.errors",
    "LifecycleError": "devicehost.errors",
    "PluginError": "devicehost.errors",
    "SavedStateError": "devicehost.errors",
    "DeviceContext": "devicehost.context",
    "LocalOffer": "devicehost.context",
    "Device": "devicehost.lifecycle",
    "DeviceState": "devicehost.lifecycle",
    "new_device_manager": "devicehost.lifecycle",
    "saved_state": "devicehost.savedstate",
}

if TYPE_CHECKING:
    from devicehost.context import DeviceContext as DeviceContext
    from devicehost.context import LocalOffer as LocalOffer
    from devicehost.errors import ConfigError as ConfigError
    from devicehost.errors import DeviceError as DeviceError
    from devicehost.errors import DeviceHostError as DeviceHostError
    from devicehost.errors import LifecycleError as LifecycleError
    from devicehost.errors import PluginError as PluginError
    from devicehost.errors import SavedStateError as SavedStateError
    from devicehost.hookspecs import hookimpl as hookimpl
    from devicehost.lifecycle import Device as Device
    from devicehost.lifecycle import DeviceState as DeviceState
    from devicehost.lifecycle import new_device_manager as new_device_manager
    from devicehost.savedstate import saved_state as saved_state


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'devicehost' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
