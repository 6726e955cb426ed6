"""The first test of a plugin: the installed host discovers it."""

from __future__ import annotations

import importlib_metadata

import devicehost
from devicehost_sidecar import SidecarDevice
from devicehost_sidecar.demo import run_demo


def test_installed_host_lists_and_loads_the_sidecar_plugin() -> None:
    from devicehost.plugins import list_plugins, load_plugins

    (info,) = [i for i in list_plugins(environ={}) if i.name == "sidecar"]
    assert (info.distribution, info.status) == ("devicehost-sidecar", "available")
    registry = load_plugins(environ={"DEVICEHOST_LOAD_PLUGINS": "sidecar"})
    assert registry.device_classes == {"sidecar": SidecarDevice}
    assert registry.info("sidecar") is not None and registry.errors == []


def test_entry_point_resolves_to_the_device_class() -> None:
    (entry_point,) = importlib_metadata.entry_points(group="devicehost", name="sidecar")
    assert entry_point.value == "devicehost_sidecar:SidecarDevice"
    assert entry_point.load() is SidecarDevice
    assert entry_point.dist is not None and entry_point.dist.name == "devicehost-sidecar"


def test_plugin_declares_the_host_api_it_was_written_against() -> None:
    (api,) = importlib_metadata.entry_points(group="devicehost.api", name="sidecar")
    assert api.load() == devicehost.HOST_API_V1 == devicehost.HOST_API_VERSION


def test_demo_entry_point_names_run_demo() -> None:
    (demo,) = importlib_metadata.entry_points(group="devicehost.demo", name="sidecar")
    assert demo.load() is run_demo
