"""Plugin discovery, selection and isolation, over fake distributions on sys.path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devicehost.errors import PluginError
from devicehost.plugins import PluginInfo, Registry, list_plugins, load_plugins

ALL = ("good", "broken", "badhook", "clash_a", "clash_b", "future", "counter")


def by_name(infos: list[PluginInfo]) -> dict[str, list[PluginInfo]]:
    out: dict[str, list[PluginInfo]] = {}
    for info in infos:
        out.setdefault(info.name, []).append(info)
    return out


def one(infos: list[PluginInfo], name: str) -> PluginInfo:
    (info,) = by_name(infos)[name]
    return info


def test_listing_reads_metadata_only(fake_site: Any) -> None:
    fake_site.install_catalog(*ALL)
    infos = list_plugins()
    assert not [m for m in sys.modules if m.startswith("dh_")]
    good = one(infos, "good")
    assert (good.distribution, good.version, good.status, good.error) == (
        "dh-good", "1.2.0", "available", None
    )
    assert good.to_json() == {
        "name": "good", "distribution": "dh-good", "version": "1.2.0", "status": "available",
        "error": None,
    }
    # Import problems are invisible to metadata: listing cannot see them, and does not claim
    # more than it knows ("available", not "loaded").
    assert one(infos, "broken").status == "available"
    future = one(infos, "future")
    assert future.status == "error"
    assert future.error is not None and "needs host API 2" in future.error
    clash = by_name(infos)["clash"]
    assert [c.distribution for c in clash] == ["dh-clash-a", "dh-clash-b"]
    for info in clash:
        assert info.status == "error"
        assert info.error is not None
        assert "'dh-clash-a'" in info.error and "'dh-clash-b'" in info.error


def test_loading_isolates_each_broken_plugin(fake_site: Any) -> None:
    fake_site.install_catalog(*ALL)
    registry = load_plugins()
    assert set(registry.device_classes) == {"good"}
    assert registry.device_classes["good"].__name__ == "GoodDevice"
    assert [type(p).__name__ for p in registry.cross_cutting] == ["module"]
    assert one(registry.infos, "good").kind == "device"
    assert one(registry.infos, "counter").kind == "cross-cutting"

    broken = one(registry.infos, "broken")
    assert broken.status == "error"
    assert broken.error == "import failed: RuntimeError: dh_broken refuses to import"
    badhook = one(registry.infos, "badhook")
    assert badhook.status == "error"
    assert badhook.error is not None
    assert "do not match the specs" in badhook.error and "flavour" in badhook.error
    # A plugin for another host API is refused before import (its import would raise).
    assert "dh_future" not in sys.modules
    assert one(registry.infos, "future").status == "error"
    # Neither claimant of one name is imported.
    assert "dh_clash_a" not in sys.modules and "dh_clash_b" not in sys.modules
    assert sorted(i.name for i in registry.errors) == [
        "badhook", "broken", "clash", "clash", "future"
    ]
    problems = registry.problems()
    assert len(problems) == 5
    assert any(p.startswith("broken (dh-broken 1.0): import failed") for p in problems)


def test_strict_mode_raises_naming_every_broken_plugin(fake_site: Any) -> None:
    fake_site.install_catalog("good", "broken", "badhook")
    with pytest.raises(PluginError) as info:
        load_plugins(strict=True)
    assert "broken (dh-broken 1.0)" in str(info.value)
    assert "badhook (dh-badhook 1.0)" in str(info.value)
    fake_site.install_catalog()
    assert load_plugins(["no:broken", "no:badhook"], strict=True).device_classes.keys() == {"good"}


@pytest.mark.parametrize("block", ["no:broken", "no:dh-broken", "no:DH_Broken", " no:dh.broken"])
def test_block_by_entry_point_or_distribution_name_before_import(
    fake_site: Any, block: str
) -> None:
    fake_site.install_catalog("good", "broken")
    registry = load_plugins([block])
    broken = one(registry.infos, "broken")
    assert broken.status == "blocked"
    assert broken.error == f"blocked by -p {block.strip()}"
    assert "dh_broken" not in sys.modules
    assert registry.errors == []
    assert one(registry.infos, "good").status == "loaded"


def test_blocking_one_claimant_resolves_a_name_clash(fake_site: Any) -> None:
    fake_site.install_catalog("clash_a", "clash_b")
    registry = load_plugins(["no:dh-clash-a"])
    a, b = by_name(registry.infos)["clash"]
    assert (a.status, b.status) == ("blocked", "loaded")
    device = registry.create_device("clash", None)
    assert type(device).__module__ == "dh_clash_b"
    assert "dh_clash_a" not in sys.modules


def test_allow_list(fake_site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_site.install_catalog("good", "broken", "counter")
    monkeypatch.setenv("DEVICEHOST_LOAD_PLUGINS", " good , dh-counter")
    registry = load_plugins()
    assert {i.name: i.status for i in registry.infos} == {
        "good": "loaded", "counter": "loaded", "broken": "blocked"
    }
    assert one(registry.infos, "broken").error == "not in DEVICEHOST_LOAD_PLUGINS"
    assert "dh_broken" not in sys.modules
    # -p NAME adds to the allow-list; -p no:NAME still wins over it.
    registry = load_plugins(["broken", "no:good"])
    assert {i.name: i.status for i in registry.infos} == {
        "good": "blocked", "counter": "loaded", "broken": "error"
    }
    monkeypatch.setenv("DEVICEHOST_LOAD_PLUGINS", "")
    assert {i.status for i in load_plugins().infos} == {"blocked"}


def test_autoload_off_loads_only_named_plugins(
    fake_site: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_site.install_catalog("good", "broken")
    monkeypatch.setenv("DEVICEHOST_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = load_plugins()
    assert {i.status for i in registry.infos} == {"blocked"}
    assert "DEVICEHOST_DISABLE_PLUGIN_AUTOLOAD" in (one(registry.infos, "good").error or "")
    registry = load_plugins(["dh-good"])
    assert registry.device_classes.keys() == {"good"}
    assert one(registry.infos, "broken").status == "blocked"
    monkeypatch.setenv("DEVICEHOST_DISABLE_PLUGIN_AUTOLOAD", "0")
    assert load_plugins().device_classes.keys() == {"good"}


def test_requested_plugin_that_is_not_installed(
    fake_site: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_site.install_catalog("good")
    monkeypatch.setenv("DEVICEHOST_LOAD_PLUGINS", "good,ghost")
    registry = load_plugins(["spectre"])
    assert registry.missing == ["ghost", "spectre"]
    assert registry.problems() == [
        "spectre: requested with -p, but no installed plugin has this name",
        "ghost: named in DEVICEHOST_LOAD_PLUGINS, but no installed plugin has this name",
    ]
    with pytest.raises(PluginError, match="ghost"):
        load_plugins(strict=True)


def test_a_typo_in_a_block_or_a_request_is_reported_with_the_closest_name(
    fake_site: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_site.install_catalog("good", "counter")
    registry = load_plugins(["no:countr", "goood"])
    assert registry.unknown == [
        "goood: requested with -p, but no installed plugin has this name (did you mean 'good'?)",
        "no:countr: blocks nothing, no installed plugin has this name (did you mean 'counter'?)",
    ]
    assert registry.problems() == registry.unknown
    assert registry.missing == ["goood"]  # a block that matches nothing is not "missing"
    with pytest.raises(PluginError, match="no:countr"):
        load_plugins(["no:countr"], strict=True)
    # Names that match (entry-point or distribution, normalised) are not reported.
    assert load_plugins(["no:dh_counter", "good"]).unknown == []


@pytest.mark.parametrize(
    ("declaration", "expected"),
    [
        (None, "declares no host API"),
        ("devicehost:HOST_API_V2", "needs host API 2, but devicehost 0.1.0 provides host API 1"),
        ("devicehost:HOST_API_VERSION", "is not a host API constant"),
        ("otherhost:HOST_API_V1", "is not a host API constant"),
        ("devicehost : HOST_API_V1", None),
    ],
)
def test_host_api_declaration(
    fake_site: Any, thirdparty: Any, declaration: str | None, expected: str | None
) -> None:
    fake_site.install(
        thirdparty.device_dist("dh-api", "dh_good", "api", "GoodDevice", api=declaration)
    )
    info = one(load_plugins().infos, "api")
    if expected is None:
        assert (info.status, info.error) == ("loaded", None)
    else:
        assert info.status == "error"
        assert info.error is not None and expected in info.error
        assert "dh_good" not in sys.modules


def test_api_declaration_of_another_distribution_does_not_count(
    fake_site: Any, thirdparty: Any
) -> None:
    fake_site.install(
        thirdparty.device_dist("dh-one", "dh_good", "one", "GoodDevice", api=None),
        thirdparty.Dist("dh-other", "1.0", {}, {"devicehost.api": {"one": thirdparty.API_V1}}),
    )
    assert "declares no host API" in (one(list_plugins(), "one").error or "")


INVALID_PLUGINS = {
    "no_offer": (
        "from devicehost import hookimpl\n"
        "class Device:\n"
        "    @hookimpl\n"
        "    def close(self, ctx): pass\n",
        "Device",
        "implements no 'offer' hook",
    ),
    "unknown_hook": (
        "from devicehost import hookimpl\n"
        "class Device:\n"
        "    @hookimpl\n"
        "    def offer(self, ctx): pass\n"
        "    @hookimpl\n"
        "    def reboot(self, ctx): pass\n",
        "Device",
        "unknown hook 'reboot'",
    ),
    "sync_wrapper": (
        "from devicehost import hookimpl\n"
        "@hookimpl(wrapper=True)\n"
        "def offer(ctx): return None\n",
        "",
        "do not match the specs",
    ),
    "config_without_default": (
        "import attrs\n"
        "from devicehost import hookimpl\n"
        "@attrs.frozen\n"
        "class Config:\n"
        "    path: str\n"
        "class Device:\n"
        "    config_class = Config\n"
        "    @hookimpl\n"
        "    def offer(self, ctx): pass\n",
        "Device",
        "config_class field 'path' has no default",
    ),
    "config_not_attrs": (
        "from devicehost import hookimpl\n"
        "class Device:\n"
        "    config_class = dict\n"
        "    @hookimpl\n"
        "    def offer(self, ctx): pass\n",
        "Device",
        "config_class is not an attrs class",
    ),
    "no_hooks": ("VALUE = 3\n", "VALUE", "neither a device class nor an object with hook"),
    "exits": ("import sys\nsys.exit(3)\n", "X", "import failed: SystemExit: 3"),
}


@pytest.mark.parametrize("case", sorted(INVALID_PLUGINS))
def test_invalid_plugins_are_errors_of_their_own(
    fake_site: Any, thirdparty: Any, case: str
) -> None:
    source, obj, expected = INVALID_PLUGINS[case]
    module = f"dh_{case}"
    dist = thirdparty.device_dist(f"dh-{case}", module, case, obj)
    fake_site.install(
        thirdparty.Dist(dist.name, dist.version, {module: source}, dist.entry_points),
        thirdparty.CATALOG["good"],
    )
    registry = load_plugins()
    info = one(registry.infos, case)
    assert info.status == "error"
    assert info.error is not None and expected in info.error
    assert registry.device_classes.keys() == {"good"}


def test_constructor_exception_is_recorded_against_the_plugin(
    fake_site: Any, thirdparty: Any
) -> None:
    source = (
        "from devicehost import hookimpl\n"
        "class Device:\n"
        "    def __init__(self, config):\n"
        "        raise OSError('no such backing store')\n"
        "    @hookimpl\n"
        "    def offer(self, ctx): pass\n"
    )
    dist = thirdparty.device_dist("dh-ctor", "dh_ctor", "ctor", "Device")
    fake_site.install(
        thirdparty.Dist(dist.name, dist.version, {"dh_ctor": source}, dist.entry_points),
        thirdparty.CATALOG["good"],
    )
    registry = load_plugins()
    assert registry.errors == []
    with pytest.raises(PluginError, match="constructor raised OSError: no such backing store"):
        registry.create_device("ctor", None)
    info = one(registry.infos, "ctor")
    assert info.status == "error"
    assert info.error == "constructor raised OSError: no such backing store"
    good = registry.create_device("good", None)
    assert type(good).__name__ == "GoodDevice"
    with pytest.raises(PluginError, match="'nothing' is not loaded"):
        registry.create_device("nothing", None)


def test_create_device_of_a_broken_plugin_says_why(fake_site: Any) -> None:
    fake_site.install_catalog("broken")
    registry = load_plugins()
    with pytest.raises(PluginError, match="refuses to import"):
        registry.create_device("broken", None)


def test_registry_repr_and_lookup() -> None:
    info = PluginInfo("x", "dh-x", "1", "error", "boom")
    registry = Registry({}, [], [info])
    assert registry.info("x") is info
    assert registry.info("y") is None
    assert "errors=['x']" in repr(registry)


def test_shipped_plugins_load_in_the_dev_install() -> None:
    registry = load_plugins(environ={})
    shipped = {"vmbfs", "vsock", "intercept", "sidecar"}
    assert shipped <= registry.device_classes.keys()
    for name in shipped:
        info = registry.info(name)
        assert info is not None and info.distribution == f"devicehost-{name}"


# -- installed into a real virtual environment ----------------------------------------------------


def venv_cli(python: Any, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DEVICEHOST_", "PYTHON"))}
    return subprocess.run(
        [str(python), "-m", "devicehost.cli", *argv],
        capture_output=True, text=True, timeout=60, env=clean | env,
    )


@pytest.mark.slow
def test_venv_list_sees_every_installed_plugin_and_imports_none(plugin_venv: Any) -> None:
    proc = venv_cli(plugin_venv, "-v", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["name"], r["distribution"], r["version"], r["status"]) for r in rows] == [
        ("badhook", "dh-badhook", "1.0", "available"),
        ("broken", "dh-broken", "1.0", "available"),
        ("clash", "dh-clash-a", "1.0", "error"),
        ("clash", "dh-clash-b", "2.0", "error"),
        ("counter", "dh-counter", "1.0", "available"),
        ("future", "dh-future", "1.0", "error"),
        ("good", "dh-good", "1.2.0", "available"),
    ]
    # The shipped plugins are not in this environment; nothing of the throwaway ones was imported
    # (dh_future and dh_broken raise when imported).
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_venv_doctor_names_each_broken_plugin_and_the_rest_load(plugin_venv: Any) -> None:
    proc = venv_cli(plugin_venv, "doctor")
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert "loaded   good (dh-good 1.2.0)" in lines
    assert "loaded   counter (dh-counter 1.0)" in lines
    broken = lines[lines.index("5 broken:") + 1:]
    assert [line.split(":")[0].strip() for line in broken] == [
        "badhook (dh-badhook 1.0)",
        "broken (dh-broken 1.0)",
        "clash (dh-clash-a 1.0)",
        "clash (dh-clash-b 2.0)",
        "future (dh-future 1.0)",
    ]
    assert "import failed: RuntimeError: dh_broken refuses to import" in broken[1]
    assert "flavour" in broken[0]
    assert "'dh-clash-a' (1.0) and 'dh-clash-b' (2.0)" in broken[2]
    assert "needs host API 2" in broken[4]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("broken", "block"),
    [
        ("broken", "no:broken"),
        ("badhook", "no:dh-badhook"),
        ("clash", "no:clash"),
        ("future", "no:future"),
    ],
)
def test_venv_each_broken_plugin_alone_fails_doctor(
    plugin_venv: Any, broken: str, block: str
) -> None:
    """With only one broken plugin selected, doctor fails naming exactly it; blocking it heals."""
    allow = f"good,counter,{broken}"
    proc = venv_cli(plugin_venv, "doctor", DEVICEHOST_LOAD_PLUGINS=allow)
    assert proc.returncode == 1
    named = proc.stdout.split("broken:\n")[1].splitlines()
    assert named and all(line.strip().startswith(f"{broken} (") for line in named)
    assert "loaded   good (dh-good 1.2.0)" in proc.stdout
    healed = venv_cli(plugin_venv, "-p", block, "doctor", DEVICEHOST_LOAD_PLUGINS=allow)
    assert healed.returncode == 0, healed.stdout
    assert "2 loaded plugins: all healthy" in healed.stdout.splitlines()


@pytest.mark.slow
def test_venv_good_plugin_is_used_by_the_host(plugin_venv: Any, tmp_path: Path) -> None:
    """The host builds the third-party device from config and drives its lifecycle, while the
    broken plugins sit beside it; the cross-cutting third-party plugin sees the device's offer."""
    journal = tmp_path / "journal.txt"
    script = f"""
import anyio, dh_counter
from devicehost.config import parse_config
from devicehost.host import open_host
from devicehost.plugins import load_plugins

async def main():
    registry = load_plugins()
    config = parse_config('[[device]]\\nplugin = "good"\\nname = "g"\\njournal = "{journal}"\\n'
                          'greeting = "from the venv"\\n', registry)
    async with open_host(registry, config) as host:
        print(host.devices["g"].state.value)
    print(",".join(dh_counter.OFFERS))

anyio.run(main)
"""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DEVICEHOST_", "PYTHON"))}
    proc = subprocess.run(
        [str(plugin_venv), "-c", script], capture_output=True, text=True, timeout=60, env=clean
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["running", "g"]
    assert journal.read_text().splitlines() == ["offer g", "open", "run from the venv", "close"]


def test_create_device_contains_a_constructor_that_calls_sys_exit() -> None:
    from devicehost.plugins import PluginInfo, Registry

    class Exiting:
        def __init__(self, config: Any) -> None:
            sys.exit(7)

    class Interrupting:
        def __init__(self, config: Any) -> None:
            raise KeyboardInterrupt

    infos = [PluginInfo("exiting", "dh-exiting", "1", "loaded"),
             PluginInfo("interrupting", "dh-interrupting", "1", "loaded")]
    registry = Registry({"exiting": Exiting, "interrupting": Interrupting}, [], infos)
    with pytest.raises(PluginError, match="constructor raised SystemExit: 7"):
        registry.create_device("exiting", None)
    assert one(registry.infos, "exiting").status == "error"
    # The user's Ctrl-C is not a plugin failure: it still ends the host.
    with pytest.raises(KeyboardInterrupt):
        registry.create_device("interrupting", None)
