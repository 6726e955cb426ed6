"""TOML config -> device configs, and errors that name the file, the device and the key."""

from __future__ import annotations

import contextlib
import enum
import json
import os
import pathlib
import re
import sys
from typing import Any, Literal

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.config import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    DeviceConfig,
    HostConfig,
    default_config,
    load_config,
    parse_config,
    structure,
)
from devicehost.errors import ConfigError
from devicehost.plugins import PluginInfo, Registry


class Mode(enum.Enum):
    FAST = "fast"
    SAFE = "safe"


@attrs.frozen
class Backing:
    kind: Literal["memory", "directory"] = "memory"
    limit: int = attrs.field(default=16, validator=attrs.validators.ge(1))


@attrs.frozen
class FilesConfig:
    root: pathlib.Path = pathlib.Path("/srv")
    read_only: bool = True
    ratio: float = 0.5
    names: list[str] = attrs.field(factory=list)
    ports: tuple[int, ...] = ()
    label: str | None = None
    mode: Mode = Mode.SAFE
    backing: Backing = Backing()
    extra: dict[str, int] = attrs.field(factory=dict)


class FilesDevice:
    config_class = FilesConfig


class PlainDevice:
    """A plugin without config_class."""


def registry() -> Registry:
    infos = [
        PluginInfo("files", "dh-files", "1", "loaded"),
        PluginInfo("plain", "dh-plain", "1", "loaded"),
        PluginInfo("broken", "dh-broken", "1", "error", "import failed: boom"),
    ]
    return Registry({"files": FilesDevice, "plain": PlainDevice}, [], infos)


def test_full_config_structures_every_supported_type(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "host.toml"
    path.write_text(
        """
        [[device]]
        plugin = "files"
        name = "share"
        root = "data"
        read_only = false
        ratio = 2
        names = ["a", "b"]
        ports = [1, 2, 3]
        label = "x"
        mode = "fast"
        extra = { one = 1 }
        [device.backing]
        kind = "directory"
        limit = 4

        [[device]]
        plugin = "plain"
        """
    )
    config = load_config(path, registry())
    assert config.source == str(path)
    assert config.devices == (
        DeviceConfig(
            "share",
            "files",
            FilesConfig(
                root=tmp_path / "data",
                read_only=False,
                ratio=2.0,
                names=["a", "b"],
                ports=(1, 2, 3),
                label="x",
                mode=Mode.FAST,
                backing=Backing("directory", 4),
                extra={"one": 1},
            ),
        ),
        DeviceConfig("plain", "plain", None),
    )
    assert isinstance(config.device("share").config.ratio, float)
    with pytest.raises(KeyError):
        config.device("nope")


def test_absolute_path_and_defaults() -> None:
    config = parse_config('[[device]]\nplugin = "files"\nroot = "/abs"\n', registry())
    assert config.devices == (DeviceConfig("files", "files", FilesConfig(pathlib.Path("/abs"))),)


def test_default_config_has_one_device_per_loaded_plugin() -> None:
    assert default_config(registry()) == HostConfig(
        (DeviceConfig("files", "files", FilesConfig()), DeviceConfig("plain", "plain", None)),
        "<defaults>",
    )


def test_default_config_leaves_out_devices_that_opt_out() -> None:
    class OnlyWhenConfigured(PlainDevice):
        default_device = False

    reg = registry()
    reg.device_classes["client"] = OnlyWhenConfigured
    assert [d.name for d in default_config(reg).devices] == ["files", "plain"]
    explicit = parse_config('[[device]]\nplugin = "client"\n', reg)
    assert [d.name for d in explicit.devices] == ["client"]


def error(text: str, reg: Registry | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, reg or registry(), source="host.toml")
    return str(info.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('mode = "turbo"', "host.toml: device 'files': key 'mode': expected one of"
         " ['fast', 'safe'], got str 'turbo'"),
        ("read_only = 1", "host.toml: device 'files': key 'read_only': expected true or false,"
         " got int 1"),
        ("ratio = true", "host.toml: device 'files': key 'ratio': expected a number, got bool"),
        ('root = ""', "host.toml: device 'files': key 'root': expected a path string"),
        ("names = [1]", "host.toml: device 'files': key 'names[0]': expected a string, got int 1"),
        ("names = 'a'", "host.toml: device 'files': key 'names': expected an array, got str"),
        ("ports = [1, true]", "host.toml: device 'files': key 'ports[1]': expected an integer"),
        ("label = 3", "host.toml: device 'files': key 'label': expected a string, got int 3"),
        ("extra = { one = 'x' }", "host.toml: device 'files': key 'extra.one': expected an"
         " integer"),
        ("backing = 3", "host.toml: device 'files': key 'backing': expected a table, got int 3"),
        ("backing = { kind = 'disk' }", "host.toml: device 'files': key 'backing.kind': expected"
         " one of ['memory', 'directory'], got str 'disk'"),
        ("backing = { limit = 0 }", "host.toml: device 'files': key 'backing.limit': invalid"
         " value: 'limit' must be >= 1: 0"),
        ("backing = { size = 0 }", "host.toml: device 'files': key 'backing.size': unknown key;"
         " known keys: kind, limit"),
        ("raed_only = true", "host.toml: device 'files': key 'raed_only': unknown key (did you"
         " mean 'read_only'?)"),
    ],
)
def test_errors_name_file_device_and_key(body: str, message: str) -> None:
    assert error(f'[[device]]\nplugin = "files"\n{body}\n').startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[device]]\nname = 'x'\n", "host.toml: device #1: key 'plugin': expected the name of a"
         " device plugin, got nothing"),
        ("[[device]]\nplugin = 'nope'\n", "host.toml: device 'nope': key 'plugin': no device"
         " plugin 'nope' is installed (loaded device plugins: files, plain)"),
        ("[[device]]\nplugin = 'broken'\n", "host.toml: device 'broken': key 'plugin': plugin"
         " 'broken' is not loaded (error: import failed: boom)"),
        ("[[device]]\nplugin = 'files'\n[[device]]\nplugin = 'files'\nname = 'b'\n",
         "host.toml: device #1 (plugin 'files'): key 'name': required, as the file has 2 'files'"
         " devices"),
        ("[[device]]\nplugin = 'files'\nname='a'\n[[device]]\nplugin = 'plain'\nname = 'a'\n",
         "host.toml: device #2: key 'name': duplicate device name 'a' (also device #1)"),
        ("[[device]]\nplugin = 'files'\nname = 'a b'\n", "host.toml: device #1: key 'name':"
         " expected a name matching"),
        ("[[device]]\nplugin = 'plain'\nspeed = 1\n", "host.toml: device 'plain': key 'speed':"
         " plugin 'plain' takes no settings"),
        ("[hosts]\nx = 1\n", "host.toml: key 'hosts': unknown top-level key"),
        ("[host]\nx = 1\n", "host.toml: [host]: key 'x': unknown key"),
        ("[device]\nplugin = 'files'\n", "host.toml: key 'device': write each device as a"
         " [[device]] table"),
        ("[[device]\n", "host.toml: not valid TOML"),
    ],
)
def test_file_level_errors(text: str, message: str) -> None:
    assert error(text).startswith(message)


def test_missing_unreadable_oversized_and_non_utf8_files(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read config file"):
        load_config(tmp_path / "missing.toml", registry())
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match=r"big\.toml: config file is larger than"):
        load_config(big, registry())
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin\.toml: config file is not UTF-8"):
        load_config(latin, registry())


def test_structure_alone_and_attrs_validators_across_fields() -> None:
    @attrs.frozen
    class Window:
        low: int = 0
        high: int = 10

        def __attrs_post_init__(self) -> None:
            if self.low > self.high:
                raise ValueError(f"low {self.low} is above high {self.high}")

    assert structure(Window, {"low": 3}, "w") == Window(3, 10)
    with pytest.raises(ConfigError, match=r"^w: invalid settings: low 11 is above high 10$"):
        structure(Window, {"low": 11}, "w")


def test_unsupported_field_type_blames_the_plugin() -> None:
    @attrs.frozen
    class Odd:
        value: complex = 0j

    with pytest.raises(ConfigError, match="config_class uses unsupported type"):
        structure(Odd, {"value": 1}, "w")


def test_converter_fields_get_the_raw_value() -> None:
    @attrs.frozen
    class Conv:
        size: int = attrs.field(default=0, converter=int)

    assert structure(Conv, {"size": "42"}, "w") == Conv(42)


def test_union_of_two_types() -> None:
    @attrs.frozen
    class Either:
        value: int | str = 0
        pair: tuple[int, str] = (0, "")

    assert structure(Either, {"value": "x", "pair": [1, "a"]}, "w") == Either("x", (1, "a"))
    expected = "key 'value': expected an integer or a string, got float 1.5"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        structure(Either, {"value": 1.5}, "w")
    with pytest.raises(ConfigError, match="key 'pair': expected 2 items, got 1"):
        structure(Either, {"pair": [1]}, "w")


def test_any_field_accepts_anything() -> None:
    @attrs.frozen
    class Loose:
        blob: Any = None

    assert structure(Loose, {"blob": {"a": [1]}}, "w") == Loose({"a": [1]})


toml_scalars = (
    st.integers(-(2**63), 2**63 - 1)
    | st.booleans()
    | st.text(max_size=12)
    | st.floats(allow_nan=False, allow_infinity=False)
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["kind", "limit", "x"]), inner, max_size=2),
    max_leaves=6,
)
keys = st.sampled_from(
    ["name", "root", "read_only", "ratio", "names", "ports", "label", "mode", "backing", "extra",
     "bogus"]
)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["files", "plain", "broken", "nope"]),
                  st.dictionaries(keys, toml_values, max_size=4)),
        max_size=3,
    )
)
def test_fuzz_device_tables_only_raise_config_error(
    devices: list[tuple[str, dict[str, Any]]],
) -> None:
    text = ""
    for plugin, table in devices:
        text += f"[[device]]\nplugin = {json.dumps(plugin)}\n"
        text += "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
    try:
        config = parse_config(text, registry(), source="fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: ")
        return
    names = [d.name for d in config.devices]
    assert len(set(names)) == len(names) == len(devices)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_arbitrary_text_only_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(text, registry(), source="fuzz.toml")


def test_host_table_is_structured_with_precise_errors(tmp_path: pathlib.Path) -> None:
    from devicehost.config import HostSettings

    registry_ = registry()
    config = parse_config(
        '[host]\nstrict = true\nvmbus_socket = "vm.sock"\n', registry_, "h.toml", base=tmp_path
    )
    assert config.host == HostSettings(strict=True, vmbus_socket=tmp_path / "vm.sock")
    assert parse_config("", registry_).host == HostSettings()
    with pytest.raises(ConfigError, match=r"h.toml: \[host\]: key 'stict': unknown key \(did you"
                       r" mean 'strict'\?\)"):
        parse_config("[host]\nstict = true\n", registry_, "h.toml")
    with pytest.raises(ConfigError, match=r"h.toml: \[host\]: key 'allow_unsealed_memory': "
                       "expected true or false"):
        parse_config("[host]\nallow_unsealed_memory = 1\n", registry_, "h.toml")
    with pytest.raises(ConfigError, match=r"h.toml: key 'host': write the host's settings as a"):
        parse_config("host = 3\n", registry_, "h.toml")


# -- hostile files: FIFOs, deep nesting, huge values (issue 14: 5, 6, 8) -----------------------


def test_a_fifo_config_is_refused_without_being_opened(
    tmp_path: pathlib.Path, call_bounded: Any
) -> None:
    fifo = tmp_path / "host.toml"
    os.mkfifo(fifo)
    error = call_bounded(lambda: load_config(fifo, registry()), fifo)
    assert isinstance(error, ConfigError)
    assert str(error) == f"{fifo}: config file is not a regular file (a FIFO)"


@pytest.mark.parametrize("depth", [MAX_CONFIG_DEPTH + 1, 500, 5000])
@pytest.mark.parametrize("kind", ["array", "table"])
def test_deep_nesting_is_a_config_error_naming_the_file(
    tmp_path: pathlib.Path, depth: int, kind: str
) -> None:
    opening, closing = ("[", "]") if kind == "array" else ("{a=", "}")
    path = tmp_path / "deep.toml"
    path.write_text(f"x = {opening * depth}1{closing * depth}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, registry())
    assert str(info.value) == f"{path}: nesting deeper than {MAX_CONFIG_DEPTH} levels"


def test_nesting_up_to_the_limit_is_parsed() -> None:
    nested = "[" * (MAX_CONFIG_DEPTH - 1) + "1" + "]" * (MAX_CONFIG_DEPTH - 1)
    # Parsed and checked: the only complaint is the unknown key, not the nesting.
    assert "unknown top-level key" in error(f"x = {nested}\n")


def test_an_integer_too_long_to_convert_is_a_config_error() -> None:
    message = error(f"[[device]]\nplugin = 'files'\nratio = {'9' * 5000}\n")
    assert message.startswith("host.toml: not valid TOML: Exceeds the limit")
    assert len(message) < 300


def test_a_huge_value_is_echoed_shortened_with_what_was_cut() -> None:
    message = error(f"[[device]]\nplugin = 'files'\nread_only = '{'a' * 100_000}'\n")
    assert message == (
        "host.toml: device 'files': key 'read_only': expected true or false, got str"
        f" '{'a' * 60}…' (100000 characters, 99940 not shown)"
    )
    message = error(f"[[device]]\nplugin = '{'p' * 100_000}'\n")
    assert "(100000 characters, 99940 not shown)" in message and len(message) < 400
    message = error(f"[[device]]\nplugin = 'files'\n{'k' * 100_000} = 1\n")
    assert "(100000 characters, 99940 not shown)" in message and len(message) < 600
    message = error(f"[[device]]\nplugin = 'files'\nname = '{'n' * 100_000}'\n")
    assert "of at most 64 characters" in message and len(message) < 400


def test_a_validator_that_calls_sys_exit_is_a_config_error() -> None:
    def leave(instance: Any, attribute: Any, value: Any) -> None:
        sys.exit(3)

    @attrs.frozen
    class Exiting:
        size: int = attrs.field(default=1, validator=leave)

    with pytest.raises(ConfigError, match=r"^w: invalid settings: SystemExit: 3$"):
        structure(Exiting, {}, "w")


def _nested(depth: int, leaf: str, table: bool) -> str:
    return ("{a=" if table else "[") * depth + leaf + ("}" if table else "]") * depth


hostile_values = st.one_of(
    st.builds(_nested, st.integers(0, 700), st.sampled_from(["1", "'x'", "[]", "{}"]),
              st.booleans()),
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.integers(0, 20_000).map(lambda n: "'" + "a" * n + "'"),
    st.text(max_size=40).map(json.dumps),
)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["x", "root", "read_only", "names", "extra", "backing", "plugin", "name",
                        "k" * 500]),
       hostile_values, st.booleans())
def test_fuzz_hostile_values_only_raise_bounded_config_errors(
    key: str, value: str, in_device: bool
) -> None:
    head = "[[device]]\nplugin = 'files'\n" if in_device and key != "plugin" else (
        "[[device]]\n" if in_device else "")
    try:
        parse_config(f"{head}{key} = {value}\n", registry(), source="fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: ")
        assert len(str(exc)) < 1000


def test_host_vhost_user_deadline_is_a_positive_number_of_seconds() -> None:
    registry_ = registry()
    assert parse_config("[host]\nvhost_user_deadline = 2\n", registry_).host.vhost_user_deadline \
        == 2.0
    assert parse_config("", registry_).host.vhost_user_deadline == 10.0
    with pytest.raises(ConfigError, match=r"h.toml: \[host\]: key 'vhost_user_deadline': invalid"
                       r" value: 'vhost_user_deadline' must be > 0"):
        parse_config("[host]\nvhost_user_deadline = 0\n", registry_, "h.toml")
