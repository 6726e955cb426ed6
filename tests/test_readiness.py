"""What ``devicehost run`` reports: devices built before any is served, keyed one-line errors,
strict mode, the ready lines and the summary (readiness.py, endpoints.py, Host.add_devices)."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import attrs
import pytest

from devicehost import ConfigError, DeviceContext, LocalOffer, hookimpl
from devicehost.config import parse_config
from devicehost.errors import StartupError
from devicehost.host import open_host
from devicehost.readiness import announce, summary
from devicehost.testing import StaticRegistry
from devicehost.testing.registry import DeviceSpec

OFFERED: list[str] = []


@attrs.frozen
class PathConfig:
    path: str = ""


class Picky:
    """Refuses an empty path when built, as a device refusing a configured value does."""

    config_class = PathConfig

    def __init__(self, config: PathConfig) -> None:
        if not config.path:
            raise ConfigError("cannot be served: no such file", key="path", value=config.path)
        self.config = config

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        OFFERED.append(ctx.name)
        return LocalOffer({"path": self.config.path})

    @hookimpl
    def open(self, ctx: DeviceContext, resources: Any) -> dict[str, Any]:
        return {}

    @hookimpl
    def run(self, ctx: DeviceContext, runner: Any) -> Any:
        return anyio.sleep_forever()

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: Any) -> dict[str, Any]:
        return {"endpoints": {"socket": f"{self.config.path}.sock"}}


@attrs.frozen
class _Config:
    devices: tuple[DeviceSpec, ...]
    source: str = "host.toml"


SPECS = (DeviceSpec("good", "picky", PathConfig("/srv/a")), DeviceSpec("bad", "picky",
                                                                       PathConfig("")))


@pytest.mark.anyio
async def test_every_device_is_built_before_any_is_offered_and_errors_name_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    OFFERED.clear()
    registry = StaticRegistry({"picky": Picky})
    with caplog.at_level(logging.ERROR, logger="devicehost.host"):
        async with open_host(registry, _Config(SPECS)) as host:
            assert host.failures == {"bad": "key 'path' = '': cannot be served: no such file"}
            assert OFFERED == ["good"]
            names = [s.name for s in SPECS]
            assert summary(host, names) == (
                "serving 1 of 2 devices; failed: bad (key 'path' = '': cannot be served: no such"
                " file)")
            log = logging.getLogger("test.readiness")
            with caplog.at_level(logging.INFO, logger="test.readiness"):
                assert await announce(host, names, log) == 1
    lines = [r.getMessage() for r in caplog.records]
    # The error was logged before anything was offered, as one line naming file/device/key.
    assert "host.toml: device 'bad': key 'path' = '': cannot be served: no such file" in lines
    assert "ready: good (picky, running): path=/srv/a, socket=/srv/a.sock" in lines
    assert not any(r.exc_info for r in caplog.records if r.name == "devicehost.host")


@pytest.mark.anyio
async def test_strict_refuses_before_anything_is_offered() -> None:
    OFFERED.clear()
    registry = StaticRegistry({"picky": Picky})
    ran = False
    with pytest.raises(StartupError, match="1 device\\(s\\) cannot be built \\(strict mode\\)"):
        async with open_host(registry, _Config(SPECS), strict=True):
            ran = True
    assert OFFERED == [] and not ran


class Exploding(Picky):
    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        if ctx.name == "boom":
            raise RuntimeError("offer exploded")
        return super().offer(ctx)


@pytest.mark.anyio
async def test_strict_refuses_when_a_device_fails_at_offer_and_stops_the_started_ones() -> None:
    OFFERED.clear()
    registry = StaticRegistry({"picky": Exploding})
    specs = (DeviceSpec("first", "picky", PathConfig("/a")),
             DeviceSpec("boom", "picky", PathConfig("/b")))
    with pytest.raises(StartupError, match="1 of 2 device\\(s\\) failed at start"):
        async with open_host(registry, _Config(specs), strict=True):
            pytest.fail("the block must not run")
    async with open_host(registry, _Config(specs)) as host:  # without strict: served
        assert list(host.failures) == ["boom"]
        assert host.devices["first"].state.value == "running"


def test_a_validator_raising_config_error_is_prefixed_with_file_device_and_key() -> None:
    def check(_inst: Any, _attr: Any, value: int) -> None:
        if value < 1:
            raise ConfigError(f"must be at least 1, not {value}")

    @attrs.frozen
    class Counted:
        count: int = attrs.field(default=1, validator=check)

    class Device:
        config_class = Counted

    with pytest.raises(ConfigError) as info:
        registry: Any = StaticRegistry({"c": Device})
        parse_config('[[device]]\nplugin = "c"\ncount = 0\n', registry, "host.toml")
    assert str(info.value) == (
        "host.toml: device 'c': key 'count': invalid value: must be at least 1, not 0")


class RefusesAtOffer(Picky):
    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        raise ConfigError("cannot listen: No such file or directory", key="path",
                          value=self.config.path)


@pytest.mark.anyio
async def test_a_hook_refusing_a_configured_value_is_one_line_naming_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = StaticRegistry({"picky": RefusesAtOffer})
    specs = (DeviceSpec("sock", "picky", PathConfig("/run/x")),)
    with caplog.at_level(logging.DEBUG):
        async with open_host(registry, _Config(specs)) as host:
            assert host.failures == {
                "sock": "key 'path' = '/run/x': cannot listen: No such file or directory"}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "host.toml: device 'sock': key 'path' = '/run/x': cannot listen: No such file or directory"]
