"""The host config file: TOML ``[[device]]`` tables structured into each plugin's attrs config.

Format::

    [[device]]
    plugin = "vmbfs"          # entry-point name of a loaded device plugin (required)
    name = "files"            # unique in the file; defaults to the plugin name when the file has
                              # only one device of that plugin
    hook_deadline = 30        # optional: this device's own deadlines (:class:`DeviceDeadlines`)
    isolation = "process"     # optional: run it in a worker (devicehost.worker.WorkerSettings)
    root = "/srv/share"       # every other key is a field of the plugin's ``config_class``

    [device.backing]          # a nested attrs class is a sub-table
    kind = "memory"

    [host]                    # optional: settings of the host itself (:class:`HostSettings`)
    strict = true

The remaining keys of a device table are validated against the plugin's ``config_class`` (a frozen
attrs class with a default for every field): unknown keys and wrong types are errors, and the
class's attrs validators run. Supported field types: ``str``, ``int``, ``float`` (accepts TOML
integers), ``bool``, ``pathlib.Path`` (a string; relative paths are resolved against the config
file's directory when the config comes from a file), ``list[T]``, ``tuple[T, ...]``,
``dict[str, T]``, ``T | None`` (TOML has no null: leave the key out to get the default),
``Literal[...]``, enums (by value) and nested attrs classes. A field with an attrs converter gets
the raw TOML value. A plugin without ``config_class`` takes no keys and is built with ``None``.

Device names must match ``[A-Za-z0-9][A-Za-z0-9_.-]*`` and have at most :data:`MAX_NAME_LENGTH`
characters: they appear in logs, socket and file names.

Every error is a :class:`~devicehost.errors.ConfigError` whose message names the file, the device
and the key, e.g. ``host.toml: device 'files': key 'root': expected a path string, got 3``.
The file is untrusted input: it must be a regular file (a FIFO or a device is refused without
being opened for reading, :mod:`devicehost.files`), it is size-limited (:data:`MAX_CONFIG_BYTES`)
and parsed with :mod:`tomllib`; nesting deeper than :data:`MAX_CONFIG_DEPTH` levels, or too deep
for the parser, and integers too long to convert are refused. Every value an error message quotes
is shortened (:func:`devicehost.excerpt.excerpt`), so one message stays one readable line.
"""

from __future__ import annotations

import difflib
import enum
import math
import pathlib
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs

from devicehost.errors import ConfigError, ends_the_host
from devicehost.excerpt import bounded_message, excerpt
from devicehost.files import FileRefusedError, read_regular_file
from devicehost.worker.settings import KEYS as WORKER_KEYS
from devicehost.worker.settings import WorkerSettings

if TYPE_CHECKING:
    from devicehost.plugins import Registry

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "MAX_NAME_LENGTH",
    "DeviceConfig",
    "DeviceDeadlines",
    "HostConfig",
    "HostSettings",
    "default_config",
    "load_config",
    "parse_config",
    "structure",
]

#: A config file larger than this is refused before parsing.
MAX_CONFIG_BYTES: Final = 1 << 20
#: Deepest nesting of arrays and tables accepted anywhere in a config file.
MAX_CONFIG_DEPTH: Final = 32

#: Longest device name: names appear in socket paths (at most 108 bytes) and log lines.
MAX_NAME_LENGTH: Final = 64
_NAME: Final = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME_LENGTH - 1}}}")
#: Keys of a [[device]] table that are the host's, not the plugin's (the deadlines: see
#: :class:`DeviceDeadlines`).
_RESERVED_KEYS: Final = ("plugin", "name", "hook_deadline", "stop_deadline", *WORKER_KEYS)


@attrs.frozen
class DeviceConfig:
    """One configured device: its unique ``name``, its ``plugin`` (entry-point name) and the
    plugin's validated ``config`` value (``None`` for a plugin without ``config_class``)."""

    name: str
    plugin: str
    config: Any
    deadlines: DeviceDeadlines | None = None
    #: Its ``isolation``/``restart*``/``memory_limit`` keys (``docs/workers.md``), if any.
    worker: WorkerSettings | None = None


def _deadline(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (math.isfinite(value) and 0 < value <= 3600):
        raise ValueError(
            f"{attribute.name} must be more than 0 and at most 3600 seconds, not {value}")


@attrs.frozen
class DeviceDeadlines:
    """A ``[[device]]`` table's own ``hook_deadline`` and ``stop_deadline`` (seconds), which
    replace the ``[host]`` ones for that device; unset: the host's. These two keys are the
    host's in every device table, so a plugin's config cannot use them."""

    hook_deadline: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_deadline))
    stop_deadline: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_deadline))


@attrs.frozen
class HostSettings:
    """The ``[host]`` table: settings of the host itself, each optional.

    ``strict``: any device that cannot be served at start is fatal (``--strict`` does the same).
    ``vmbus_socket``: serve the host's VMBus devices to a guest in another process on this Unix
    SOCK_SEQPACKET socket (``docs/vmbus-socket.md``); unset: VMBus devices are served in process.
    ``control_socket``: the running host's control socket (``devicehost inspect``); unset: none.
    ``allow_unsealed_memory``: accept guest memory that a peer (a vhost-user VMM, a VMBus socket
    guest) could shrink under the host: a memfd without ``F_SEAL_SHRINK`` or a plain file. The
    peer can then kill the whole process with SIGBUS; see ``docs/security.md``.
    ``vhost_user_deadline``: seconds a vhost-user front-end has for its first message after
    connecting and for the rest of any message it began (``devicehost.virtio.vhost_user``).
    ``hook_deadline``: seconds each device hook (offer, open, close, save_open, restore_open,
    inspect) has to return; ``stop_deadline``: seconds a device's cancelled ``run`` has to end,
    and how long a stopping host waits for an event loop that a plugin blocks
    (:mod:`devicehost.lifecycle`, :mod:`devicehost.watchdog`). A device that misses one is
    abandoned: FAILED, named in the log, and the host goes on without it.
    ``isolation``: ``"process"`` runs every device in a worker process of its own unless its
    table says otherwise (``docs/workers.md``); ``"inline"``: in the host's process.
    """

    strict: bool = False
    vmbus_socket: pathlib.Path | None = None
    control_socket: pathlib.Path | None = None
    allow_unsealed_memory: bool = False
    vhost_user_deadline: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    hook_deadline: float = attrs.field(default=10.0, validator=_deadline)
    stop_deadline: float = attrs.field(default=5.0, validator=_deadline)
    isolation: typing.Literal["inline", "process"] = "inline"


@attrs.frozen
class HostConfig:
    """The devices to serve, in file order, and the ``[host]`` settings; ``source`` names where
    the config came from."""

    devices: tuple[DeviceConfig, ...]
    source: str = "<defaults>"
    host: HostSettings = HostSettings()

    def device(self, name: str) -> DeviceConfig:
        """The device called ``name``; :class:`KeyError` if there is none."""
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(name)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {excerpt(value)}"


def _check_depth(document: Any, source: str) -> None:
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source}: nesting deeper than {MAX_CONFIG_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


class _Structurer:
    """Converts TOML values into field types; ``base`` resolves relative paths."""

    def __init__(self, base: pathlib.Path | None) -> None:
        self.base = base

    def fail(self, where: str, key: str, message: str) -> ConfigError:
        return ConfigError(f"{where}: key {excerpt(key)}: {message}")

    def value(self, tp: Any, value: Any, where: str, key: str) -> Any:
        if tp is Any or tp is object:
            return value
        origin = typing.get_origin(tp)
        if origin is typing.Union or origin is types.UnionType:
            return self._union(typing.get_args(tp), value, where, key)
        if origin is typing.Literal:
            options = typing.get_args(tp)
            for option in options:
                if type(option) is type(value) and option == value:
                    return option
            raise self.fail(
                where, key, f"expected one of {excerpt(list(options))}, got {_describe(value)}"
            )
        if origin in (list, tuple) or tp in (list, tuple):
            return self._sequence(tp, origin or tp, value, where, key)
        if origin is dict or tp is dict:
            return self._mapping(tp, value, where, key)
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise self.fail(where, key, f"expected true or false, got {_describe(value)}")
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise self.fail(where, key, f"expected an integer, got {_describe(value)}")
        if tp is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            raise self.fail(where, key, f"expected a number, got {_describe(value)}")
        if tp is str:
            if isinstance(value, str):
                return value
            raise self.fail(where, key, f"expected a string, got {_describe(value)}")
        if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
            if not isinstance(value, str) or not value:
                raise self.fail(where, key, f"expected a path string, got {_describe(value)}")
            path = tp(value)
            if self.base is not None and isinstance(path, pathlib.Path):
                path = self.base / path.expanduser()
            return path
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            for member in tp:
                if type(member.value) is type(value) and member.value == value:
                    return member
            values = [m.value for m in tp]
            raise self.fail(
                where, key, f"expected one of {excerpt(values)}, got {_describe(value)}"
            )
        if isinstance(tp, type) and attrs.has(tp):
            if not isinstance(value, dict):
                raise self.fail(where, key, f"expected a table, got {_describe(value)}")
            return self.instance(tp, value, where, prefix=f"{key}.")
        raise self.fail(where, key, f"the plugin's config_class uses unsupported type {tp!r}")

    def _union(self, options: tuple[Any, ...], value: Any, where: str, key: str) -> Any:
        candidates = [o for o in options if o is not type(None)]
        errors: list[str] = []
        for option in candidates:
            try:
                return self.value(option, value, where, key)
            except ConfigError as exc:
                errors.append(str(exc).rsplit(": ", 1)[-1])
        if len(candidates) == 1:
            raise self.fail(where, key, errors[0])
        wanted = [e.split(", got ")[0].removeprefix("expected ") for e in errors]
        raise self.fail(
            where, key, f"expected {' or '.join(dict.fromkeys(wanted))}, got {_describe(value)}"
        )

    def _sequence(self, tp: Any, origin: Any, value: Any, where: str, key: str) -> Any:
        if not isinstance(value, list):
            raise self.fail(where, key, f"expected an array, got {_describe(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise self.fail(where, key, f"expected {len(args)} items, got {len(value)}")
            return tuple(
                self.value(a, v, where, f"{key}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item_tp = args[0] if args else Any
        items = [self.value(item_tp, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items

    def _mapping(self, tp: Any, value: Any, where: str, key: str) -> Any:
        if not isinstance(value, dict):
            raise self.fail(where, key, f"expected a table, got {_describe(value)}")
        args = typing.get_args(tp)
        item_tp = args[1] if len(args) == 2 else Any
        return {k: self.value(item_tp, v, where, f"{key}.{k}") for k, v in value.items()}

    def instance(self, cls: type, table: Mapping[str, Any], where: str, prefix: str = "") -> Any:
        try:
            hints = typing.get_type_hints(cls)
        except Exception as exc:
            raise ConfigError(
                f"{where}: the plugin's config_class {cls.__qualname__} has unresolvable type"
                f" hints: {exc}"
            ) from exc
        fields = {f.name: f for f in attrs.fields(cls) if f.init}
        kwargs: dict[str, Any] = {}
        for key, raw in table.items():
            field = fields.get(key)
            if field is None:
                close = difflib.get_close_matches(key[:100], list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                known = ", ".join(sorted(fields)) or "none"
                raise self.fail(
                    where, prefix + key, f"unknown key{hint}; known keys: {known}"
                )
            if field.converter is not None:
                converted = raw
            else:
                converted = self.value(hints.get(field.name, Any), raw, where, prefix + key)
            kwargs[field.alias or field.name] = converted
        for field in fields.values():
            if (field.alias or field.name) not in kwargs and field.default is attrs.NOTHING:
                raise self.fail(where, prefix + field.name, "is required")
        self._check_validators(cls, fields, kwargs, where, prefix)
        try:
            return cls(**kwargs)
        except BaseException as exc:  # the plugin's own code (validators, converters) ran here
            if ends_the_host(exc):
                raise
            what = prefix.rstrip(".") or "settings"
            raise ConfigError(f"{where}: invalid {what}: {_why(exc)}") from exc

    def _check_validators(
        self,
        cls: type,
        fields: Mapping[str, attrs.Attribute[Any]],
        kwargs: Mapping[str, Any],
        where: str,
        prefix: str,
    ) -> None:
        """Run each given key's validator on its own, so a failure names its key."""
        try:
            defaults = cls()
        except BaseException as exc:
            if ends_the_host(exc):
                raise
            return  # cls(**kwargs) reports it
        for name, field in fields.items():
            arg = field.alias or field.name
            if field.validator is None or arg not in kwargs or field.converter is not None:
                continue
            try:
                field.validator(defaults, field, kwargs[arg])
            except BaseException as exc:
                if ends_the_host(exc):
                    raise
                raise self.fail(where, prefix + name, f"invalid value: {_why(exc)}") from exc


def _why(exc: BaseException) -> str:
    """What a plugin's validator said (shortened: it may quote the whole refused value)."""
    text = bounded_message(str(exc))
    plain = isinstance(exc, TypeError | ValueError | ConfigError)
    return text if plain else f"{type(exc).__name__}: {text}"


def structure(config_class: type, table: Mapping[str, Any], where: str) -> Any:
    """Build ``config_class`` from a TOML table; ``where`` prefixes every error message."""
    return _Structurer(None).instance(config_class, table, where)


def _plugin_problem(registry: Registry, plugin: str) -> str:
    info = registry.info(plugin)
    if info is not None:
        return f"plugin {plugin!r} is not loaded ({info.status}: {info.error})"
    installed = ", ".join(sorted(registry.device_classes)) or "none"
    return (
        f"no device plugin {excerpt(plugin)} is installed (loaded device plugins: {installed})"
    )


def _device_config(
    registry: Registry, plugin: str, name: str, settings: Mapping[str, Any], where: str,
    base: pathlib.Path | None,
) -> DeviceConfig:
    cls = registry.device_classes.get(plugin)
    if cls is None:
        raise ConfigError(f"{where}: key 'plugin': {_plugin_problem(registry, plugin)}")
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        if settings:
            key = next(iter(settings))
            raise ConfigError(
                f"{where}: key {excerpt(key)}: plugin {excerpt(plugin)} takes no settings"
            )
        return DeviceConfig(name, plugin, None)
    return DeviceConfig(name, plugin, _Structurer(base).instance(config_class, settings, where))


def parse_config(
    text: str, registry: Registry, source: str = "<string>", *, base: pathlib.Path | None = None
) -> HostConfig:
    """Parse config text; ``source`` names it in errors, ``base`` resolves relative paths."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{source}: nesting deeper than {MAX_CONFIG_DEPTH} levels") from exc
    except ValueError as exc:  # an integer beyond the interpreter's digit limit
        raise ConfigError(f"{source}: not valid TOML: {bounded_message(str(exc))}") from exc
    _check_depth(document, source)
    for key in document:
        if key not in ("device", "host"):
            raise ConfigError(
                f"{source}: key {excerpt(key)}: unknown top-level key; use [[device]] tables and"
                " an optional [host] table"
            )
    host_table = document.get("host", {})
    if not isinstance(host_table, dict):
        raise ConfigError(f"{source}: key 'host': write the host's settings as a [host] table")
    host_settings = _Structurer(base).instance(HostSettings, host_table, f"{source}: [host]")
    tables = document.get("device", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{source}: key 'device': write each device as a [[device]] table")

    plugin_counts: dict[str, int] = {}
    for index, table in enumerate(tables, 1):
        plugin = table.get("plugin")
        if not isinstance(plugin, str) or not plugin:
            raise ConfigError(
                f"{source}: device #{index}: key 'plugin': expected the name of a device plugin,"
                f" got {'nothing' if plugin is None else _describe(plugin)}"
            )
        plugin_counts[plugin] = plugin_counts.get(plugin, 0) + 1

    devices: list[DeviceConfig] = []
    seen: dict[str, int] = {}
    for index, table in enumerate(tables, 1):
        plugin = table["plugin"]
        name = table.get("name")
        if name is None:
            if plugin_counts[plugin] > 1:
                raise ConfigError(
                    f"{source}: device #{index} (plugin {excerpt(plugin)}): key 'name': required,"
                    f" as the file has {plugin_counts[plugin]} {excerpt(plugin)} devices"
                )
            name = plugin
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise ConfigError(
                f"{source}: device #{index}: key 'name': expected a name matching"
                f" [A-Za-z0-9][A-Za-z0-9_.-]* of at most {MAX_NAME_LENGTH} characters, got"
                f" {_describe(name)}"
            )
        if name in seen:
            raise ConfigError(
                f"{source}: device #{index}: key 'name': duplicate device name {name!r}"
                f" (also device #{seen[name]})"
            )
        seen[name] = index
        settings = {k: v for k, v in table.items() if k not in _RESERVED_KEYS}
        where = f"{source}: device {name!r}"
        device = _device_config(registry, plugin, name, settings, where, base)
        own = {k: table[k] for k in ("hook_deadline", "stop_deadline") if k in table}
        if own:
            deadlines = _Structurer(base).instance(DeviceDeadlines, own, where)
            device = attrs.evolve(device, deadlines=deadlines)
        worker = {k: table[k] for k in WORKER_KEYS if k in table}
        if worker:
            device = attrs.evolve(
                device, worker=_Structurer(base).instance(WorkerSettings, worker, where))
        devices.append(device)
    return HostConfig(tuple(devices), source, host_settings)


def load_config(path: str | pathlib.Path, registry: Registry) -> HostConfig:
    """Read and parse a config file: a regular file of at most :data:`MAX_CONFIG_BYTES`."""
    path = pathlib.Path(path)
    try:
        data = read_regular_file(path, MAX_CONFIG_BYTES)
    except FileRefusedError as exc:
        raise ConfigError(f"{path}: config file is {exc.strerror}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config file is not UTF-8: {exc}") from exc
    return parse_config(text, registry, str(path), base=path.parent.absolute())


def default_config(registry: Registry) -> HostConfig:
    """One device of each loaded device plugin, named after the plugin, with default settings.

    A device class that sets ``default_device = False`` (one that only makes sense when
    configured, such as a VMBus client device reading chosen files) is left out.
    """
    devices = []
    for plugin in sorted(registry.device_classes):
        if getattr(registry.device_classes[plugin], "default_device", True) is False:
            continue
        where = f"<defaults>: device {plugin!r}"
        devices.append(_device_config(registry, plugin, plugin, {}, where, None))
    return HostConfig(tuple(devices), "<defaults>")
