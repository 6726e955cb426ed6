"""The host's error vocabulary. Each error says who is to blame."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeviceError",
    "DeviceHostError",
    "LifecycleError",
    "PluginError",
    "SavedStateError",
    "StartupError",
    "ends_the_host",
]


class DeviceHostError(Exception):
    """Base class of every error the host raises on purpose."""


class PluginError(DeviceHostError):
    """Raised when a plugin cannot be used: it failed to import, its hooks do not match the
    specs, it needs another host API, its constructor raised, or two plugins claim one name."""


class ConfigError(DeviceHostError):
    """Raised when a config file is invalid; the message names the file, the device and the key.

    A device's constructor raises it with ``key`` (and the offending ``value``) when a configured
    value cannot be used, e.g. ``ConfigError("cannot be served: no such file", key="file",
    value=config.file)``; the host then names the config file and the device before it
    (:meth:`located`): ``host.toml: device 'imc': key 'file' = '/x': cannot be served: ...``.
    """

    def __init__(self, message: str, *, key: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.key = key
        self.value = value

    def keyed(self) -> str:
        """The message after the key and value it blames (just the message without a key)."""
        if self.key is None:
            return str(self)
        value = "" if self.value is None else f" = {self.value!r}"
        return f"key {self.key!r}{value}: {self}"

    def located(self, where: str) -> str:
        """The one-line error prefixed with ``where`` (``host.toml: device 'imc'``)."""
        return f"{where}: {self.keyed()}"


class SavedStateError(DeviceHostError):
    """Raised when a saved-state file or value cannot be decoded: it is hostile until proven not."""


class StartupError(DeviceHostError):
    """Raised when the host refuses to start serving: strict mode (``--strict``, ``[host]
    strict``) and a device could not be built or offered; the devices already started are
    stopped and nothing is reported ready."""


class LifecycleError(DeviceHostError):
    """Raised when a lifecycle operation is not valid in the device's current state."""


class DeviceError(DeviceHostError):
    """Raised when a device's own hook failed; the device is marked failed, nothing else is."""


def ends_the_host(exc: BaseException) -> bool:
    """True if ``exc``, raised out of a plugin's code, must end the host rather than fail one
    device: the cancellation of the host's own task (asyncio's or trio's), ``KeyboardInterrupt``
    and ``GeneratorExit``, alone or inside an exception group. Anything else a plugin raises,
    ``SystemExit`` included (a plugin calling ``sys.exit``), fails that plugin's device only."""
    import asyncio
    import sys

    exits: tuple[type[BaseException], ...] = (
        KeyboardInterrupt, GeneratorExit, asyncio.CancelledError
    )
    trio = sys.modules.get("trio")
    if trio is not None:
        exits = (*exits, trio.Cancelled)
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(lambda e: isinstance(e, exits)) is not None
    return isinstance(exc, exits)
