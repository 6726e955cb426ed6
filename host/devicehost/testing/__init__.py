"""The devicehost test kit: what a device author needs to test a device without installing it.

- :class:`StaticRegistry` and :func:`host_with`: a real :class:`devicehost.host.Host` with chosen
  device classes registered directly (no entry points, no installation). These need no pytest,
  so demos and tools may use them too.
- :class:`DeviceConformance`: a pytest base class; subclass it in your plugin's tests, set
  ``device_class`` (and ``config`` if the defaults won't do), and pytest runs the device contract
  checks against your device. Importing it imports pytest.
- :mod:`devicehost.testing.vhost_user`: ``VhostUserFrontend``, QEMU 7.2's vhost-user message
  sequence over a real Unix socket, for testing a virtio device served over vhost-user.

The pytest plugin (entry point ``pytest11``) provides the ``devicehost_host`` fixture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from devicehost.testing.registry import StaticRegistry, host_with

if TYPE_CHECKING:
    from devicehost.testing.conformance import DeviceConformance as DeviceConformance

__all__ = ["DeviceConformance", "StaticRegistry", "host_with"]


def __getattr__(name: str) -> Any:
    # The conformance suite imports pytest; only its users pay for that.
    if name == "DeviceConformance":
        from devicehost.testing.conformance import DeviceConformance

        return DeviceConformance
    raise AttributeError(f"module 'devicehost.testing' has no attribute {name!r}")
