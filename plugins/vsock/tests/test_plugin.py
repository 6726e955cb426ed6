"""The installed host discovers the plugin; the test kit's conformance suite passes."""

from __future__ import annotations

from devicehost.plugins import list_plugins, load_plugins
from devicehost.testing import DeviceConformance
from devicehost_vsock import VsockDevice


def test_the_host_discovers_the_plugin() -> None:
    (info,) = [i for i in list_plugins(environ={}) if i.name == "vsock"]
    assert info.distribution == "devicehost-vsock"
    assert info.status == "available"
    registry = load_plugins(["vsock"], environ={"DEVICEHOST_LOAD_PLUGINS": "vsock"})
    assert registry.device_classes["vsock"] is VsockDevice


class TestVsockConformance(DeviceConformance):
    device_class = VsockDevice
    #: Every check inline and then with the device in a worker process (always: a device that
    #: could not cross would fail here instead of being run inline only).
    isolations = ("inline", "process")
