"""A device's worker keys in the config file, and the config table a worker rebuilds its config
from."""

from __future__ import annotations

import enum
import pathlib

import attrs
import pytest

from devicehost.config import parse_config, structure
from devicehost.errors import ConfigError
from devicehost.plugins import Registry
from devicehost.worker.settings import WorkerSettings, config_table, parse_size


class Mode(enum.Enum):
    FAST = "fast"


@attrs.frozen
class Inner:
    n: int = 1


@attrs.frozen
class Config:
    path: pathlib.Path | None = None
    mode: Mode = Mode.FAST
    items: tuple[int, ...] = ()
    inner: Inner = Inner()
    label: str | None = None


class Device:
    config_class = Config

    def __init__(self, config: Config) -> None:
        self.config = config


def registry() -> Registry:
    return Registry({"dev": Device}, [], [])


def test_the_worker_keys_of_a_device_table() -> None:
    config = parse_config(
        '[host]\nisolation = "process"\n\n[[device]]\nplugin = "dev"\nisolation = "inline"\n'
        'restart = "on-failure"\nrestart_burst = 3\nrestart_interval = 30\n'
        'restart_delay = 0.5\nmemory_limit = "512M"\n', registry(), "t.toml")
    assert config.host.isolation == "process"
    (device,) = config.devices
    assert device.worker == WorkerSettings(isolation="inline", restart="on-failure",
                                           restart_burst=3, restart_interval=30.0,
                                           restart_delay=0.5, memory_limit=512 << 20)
    assert device.config == Config()  # the keys are the host's, not the plugin's


@pytest.mark.parametrize("line,match", [
    ('isolation = "thread"', r"t.toml: device 'dev': key 'isolation': expected one of"),
    ('restart = "always"', r"key 'restart': expected one of"),
    ("restart_burst = 0", r"key 'restart_burst': invalid value"),
    ('memory_limit = "lots"', r"memory_limit.*expected a size"),
    ("memory_limit = 1024", r"memory_limit must be at least 64 MiB"),
])
def test_bad_worker_keys_name_file_device_and_key(line: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(f'[[device]]\nplugin = "dev"\n{line}\n', registry(), "t.toml")


def test_sizes() -> None:
    assert parse_size("1G") == 1 << 30
    assert parse_size("256MiB") == 256 << 20
    assert parse_size(128 << 20) == 128 << 20
    assert parse_size(None) is None
    with pytest.raises(ValueError):
        parse_size(True)


def test_a_config_crosses_as_the_table_it_came_from() -> None:
    value = Config(pathlib.Path("/srv/x"), Mode.FAST, (1, 2), Inner(5))
    table = config_table(value)
    assert table == {"path": "/srv/x", "mode": "fast", "items": [1, 2], "inner": {"n": 5}}
    assert structure(Config, table, "worker") == value


def test_a_config_no_file_could_hold_is_refused() -> None:
    with pytest.raises(TypeError, match="cannot be given to a worker"):
        config_table(Inner(n=object()))  # type: ignore[arg-type]
