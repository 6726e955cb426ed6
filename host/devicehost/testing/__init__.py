"""The devicehost test kit: what a device author needs to test a device without installing it.

- :class:`StaticRegistry` and :func:`host_with`: a real :class:`devicehost.host.Host` with chosen
  device classes registered directly (no entry points, no installation).
- :class:`DeviceConformance`: a pytest base class; subclass it in your plugin's tests, set
  ``device_class`` (and ``config`` if the defaults won't do), and pytest runs the device contract
  checks against your device.

The pytest plugin (entry point ``pytest11``) provides the ``devicehost_host`` fixture.
"""

from __future__ import annotations

from devicehost.testing.conformance import DeviceConformance
from devicehost.testing.registry import StaticRegistry, host_with

__all__ = ["DeviceConformance", "StaticRegistry", "host_with"]
