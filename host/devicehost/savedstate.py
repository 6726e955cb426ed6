"""Saved state: versioned saved-state types and the envelope file that holds every device's state.

A saved-state type is a frozen attrs class registered under a stable name and a version::

    @saved_state("vmbfs.SavedState", 1)
    @attrs.frozen
    class SavedState:
        state: ProtocolState          # an enum: saved by value
        pending: bytes = b""

Its fields may hold ``int`` (64-bit range: ``-2**63 <= v < 2**64``), ``str``, ``bool``, ``bytes``,
``None``, ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, enums (saved by value,
which must be an int or a str) and nested attrs classes. As with OpenVMM's saved-state types
(facts §7), the name and the field layout are a wire format: never change them without bumping the
version; a saved-state type is separate from the device's runtime types.

The envelope (UTF-8 JSON, bytes as base64)::

    {"format": "devicehost-saved-state", "version": 1,
     "devices": [{"device": NAME, "plugin": PLUGIN, "type": TYPE_NAME, "type_version": N,
                  "payload": {FIELD: VALUE, ...}}, ...]}

Decoding treats the file as hostile. :func:`decode_envelope_untrusted` and
:func:`decode_state_untrusted` raise only :class:`~devicehost.errors.SavedStateError`, whose message
gives the JSON path of the offending value: size limit (:data:`MAX_ENVELOPE_BYTES`), nesting limit
(:data:`MAX_DEPTH`), device-count limit, strict UTF-8, no NaN/Infinity, no duplicate keys, no
unknown or missing keys, a type check on every field, and precise errors for an unknown format,
envelope version, type name or type version. Every value a message quotes is shortened
(:func:`devicehost.excerpt.excerpt`). Encoding checks the value against the same schema,
so a device that saves a value that does not match its declared types is told so at save time.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar

import attrs

from devicehost.errors import SavedStateError
from devicehost.excerpt import bounded_message, excerpt

__all__ = [
    "ENVELOPE_FORMAT",
    "ENVELOPE_VERSION",
    "MAX_DEPTH",
    "MAX_DEVICES",
    "MAX_ENVELOPE_BYTES",
    "NoSavedState",
    "SavedEntry",
    "decode_envelope_untrusted",
    "decode_state_untrusted",
    "encode_envelope",
    "encode_state",
    "entry_for",
    "saved_state",
    "saved_state_type",
]

ENVELOPE_FORMAT: Final = "devicehost-saved-state"
ENVELOPE_VERSION: Final = 1
#: Larger files are refused before parsing.
MAX_ENVELOPE_BYTES: Final = 16 << 20
#: Deepest JSON nesting accepted anywhere in the file (the envelope itself uses 3 levels).
MAX_DEPTH: Final = 64
MAX_DEVICES: Final = 4096
_MAX_NAME: Final = 256
_INT_MIN: Final = -(1 << 63)
_INT_MAX: Final = (1 << 64) - 1

_TYPE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_ENVELOPE_KEYS: Final = frozenset({"format", "version", "devices"})
_ENTRY_KEYS: Final = frozenset({"device", "plugin", "type", "type_version", "payload"})

_TYPES: dict[str, type] = {}
_HINTS: dict[type, dict[str, Any]] = {}

T = TypeVar("T")


def saved_state(name: str, version: int) -> Callable[[type[T]], type[T]]:
    """Register a frozen attrs class as the saved-state type ``name``, version ``version``.

    ``name`` is dotted (``"<plugin>.<Type>"``) and must never change. Registering another class
    under a name already taken raises :class:`TypeError`.
    """
    if _TYPE_NAME.fullmatch(name) is None:
        raise ValueError(f"saved-state type name {name!r} is not dotted like 'plugin.Type'")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"saved-state type {name!r}: version must be an int >= 1")

    def register(cls: type[T]) -> type[T]:
        if not attrs.has(typing.cast(type, cls)):
            raise TypeError(f"saved-state type {name!r}: {cls.__qualname__} is not an attrs class")
        other = _TYPES.get(name)
        if other is not None and (other.__module__, other.__qualname__) != (
            cls.__module__, cls.__qualname__
        ):
            raise TypeError(
                f"saved-state type name {name!r} is taken by"
                f" {other.__module__}.{other.__qualname__}"
            )
        cls.__devicehost_saved_state__ = (name, version)  # type: ignore[attr-defined]
        _TYPES[name] = cls
        return cls

    return register


def _identity(cls: type) -> tuple[str, int]:
    # Read from the class itself: a subclass of a saved-state type is not that type.
    ident = vars(cls).get("__devicehost_saved_state__")
    if ident is None:
        raise SavedStateError(f"{cls.__qualname__} is not a registered saved-state type")
    name, version = ident
    return str(name), int(version)


def saved_state_type(name: str) -> type | None:
    """The registered saved-state class called ``name``, if its module has been imported."""
    return _TYPES.get(name)


@saved_state("save_restore.NoSavedState", 1)
@attrs.frozen
class NoSavedState:
    """The state of something that has nothing to save (facts §7)."""


@attrs.frozen
class SavedEntry:
    """One device's record in the envelope; ``payload`` is the JSON form of its state value."""

    device: str
    plugin: str
    type_name: str
    type_version: int
    payload: dict[str, Any]


# -- schema-driven conversion ----------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        try:
            hints = typing.get_type_hints(cls)
        except Exception as exc:
            raise SavedStateError(
                f"saved-state type {cls.__qualname__} has unresolvable type hints: {exc}"
            ) from exc
        _HINTS[cls] = hints
    return hints


def _optional_arg(tp: Any) -> Any | None:
    """``X`` for ``X | None``; ``None`` for anything else. Other unions are unsupported."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
        raise SavedStateError(f"unsupported saved-state field type {tp!r} (only X | None)")
    return None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _to_json(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against ``tp`` and return its JSON form."""
    inner = _optional_arg(tp)
    if inner is not None:
        return None if value is None else _to_json(inner, value, path)
    origin = typing.get_origin(tp)
    if tp is None or tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not _INT_MIN <= value <= _INT_MAX:
                raise SavedStateError(f"{path}: integer {value} is out of the 64-bit range")
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            return base64.b64encode(bytes(value)).decode("ascii")
    elif origin in (tuple, list):
        if isinstance(value, tuple | list):
            args = typing.get_args(tp)
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if len(value) != len(args):
                    raise SavedStateError(f"{path}: expected {len(args)} items, got {len(value)}")
                return [_to_json(a, v, f"{path}[{i}]") for i, (a, v) in
                        enumerate(zip(args, value, strict=True))]
            return [_to_json(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            if not isinstance(value.value, int | str) or isinstance(value.value, bool):
                raise SavedStateError(f"{path}: enum {tp.__qualname__} values must be int or str")
            return value.value
    elif isinstance(tp, type) and attrs.has(tp):
        if isinstance(value, tp):
            hints = _hints(tp)
            return {
                f.name: _to_json(hints.get(f.name, Any), getattr(value, f.name), f"{path}.{f.name}")
                for f in attrs.fields(tp)
            }
    else:
        raise SavedStateError(f"{path}: unsupported saved-state field type {tp!r}")
    raise SavedStateError(f"{path}: expected {_type_label(tp)}, got {_kind(value)}")


def _type_label(tp: Any) -> str:
    if typing.get_origin(tp) in (list, tuple):
        return "array"
    if tp is None or tp is type(None):
        return "null"
    return getattr(tp, "__qualname__", None) or repr(tp)


def _from_json(tp: Any, data: Any, path: str) -> Any:
    """Build a value of type ``tp`` from untrusted JSON ``data``."""
    inner = _optional_arg(tp)
    if inner is not None:
        return None if data is None else _from_json(inner, data, path)
    origin = typing.get_origin(tp)
    if tp is None or tp is type(None):
        if data is None:
            return None
    elif tp is bool:
        if isinstance(data, bool):
            return data
    elif tp is int:
        if isinstance(data, int) and not isinstance(data, bool):
            if not _INT_MIN <= data <= _INT_MAX:
                raise SavedStateError(f"{path}: integer is out of the 64-bit range")
            return data
    elif tp is str:
        if isinstance(data, str):
            _check_text(data, path)
            return data
    elif tp is bytes:
        if isinstance(data, str):
            try:
                return base64.b64decode(data.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError) as exc:
                raise SavedStateError(f"{path}: invalid base64 bytes") from exc
    elif origin in (tuple, list):
        if isinstance(data, list):
            args = typing.get_args(tp)
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if len(data) != len(args):
                    raise SavedStateError(f"{path}: expected {len(args)} items, got {len(data)}")
                return tuple(_from_json(a, v, f"{path}[{i}]") for i, (a, v) in
                             enumerate(zip(args, data, strict=True)))
            items = [_from_json(args[0], v, f"{path}[{i}]") for i, v in enumerate(data)]
            return tuple(items) if origin is tuple else items
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(data, int | str) and not isinstance(data, bool):
            for member in tp:
                if type(member.value) is type(data) and member.value == data:
                    return member
            raise SavedStateError(f"{path}: {excerpt(data)} is not a {tp.__qualname__} value")
    elif isinstance(tp, type) and attrs.has(tp):
        if isinstance(data, dict):
            return _instance(tp, data, path)
    else:
        raise SavedStateError(f"{path}: unsupported saved-state field type {tp!r}")
    raise SavedStateError(f"{path}: expected {_type_label(tp)}, got {_kind(data)}")


def _instance(cls: type, data: dict[str, Any], path: str) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise SavedStateError(f"{path}: unknown field {excerpt(key)} for {cls.__qualname__}")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in data:
            raise SavedStateError(f"{path}: missing field {name!r} of {cls.__qualname__}")
        kwargs[field.alias or name] = _from_json(hints.get(name, Any), data[name], f"{path}.{name}")
    try:
        return cls(**kwargs)
    except Exception as exc:
        raise SavedStateError(
            f"{path}: {cls.__qualname__} rejected the value: {bounded_message(str(exc))}"
        ) from exc


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SavedStateError(f"{path}: string holds a lone surrogate") from exc


# -- values <-> entries ---------------------------------------------------------------------------


def encode_state(value: object) -> dict[str, Any]:
    """The JSON payload of a saved-state value; :class:`SavedStateError` if it breaks its schema."""
    cls = type(value)
    name, _ = _identity(cls)
    payload = _to_json(cls, value, name)
    assert isinstance(payload, dict)
    return payload


def entry_for(device: str, plugin: str, value: object) -> SavedEntry:
    """The envelope entry holding ``value``, the saved state of ``device`` of ``plugin``."""
    name, version = _identity(type(value))
    return SavedEntry(device, plugin, name, version, encode_state(value))


def decode_state_untrusted(entry: SavedEntry, expected_type: type[T] | None = None) -> T | Any:
    """Rebuild the saved-state value of ``entry``.

    With ``expected_type``, the entry's type name and version must be exactly that type's; without
    it, the type is looked up among the registered saved-state types (its module must have been
    imported). Raises only :class:`SavedStateError`.
    """
    where = f"device {excerpt(entry.device)}"
    if expected_type is None:
        cls = _TYPES.get(entry.type_name)
        if cls is None:
            raise SavedStateError(
                f"{where}: unknown saved-state type {excerpt(entry.type_name)}"
            )
    else:
        cls = expected_type
    name, version = _identity(cls)
    if entry.type_name != name:
        raise SavedStateError(
            f"{where}: saved state has type {excerpt(entry.type_name)}, expected {name!r}"
        )
    if entry.type_version != version:
        raise SavedStateError(
            f"{where}: saved state {name!r} has version {excerpt(entry.type_version)}, this"
            f" plugin reads"
            f" version {version}"
        )
    try:
        return _from_json(cls, entry.payload, f"{where}: {name}")
    except RecursionError as exc:
        raise SavedStateError(f"{where}: saved state is nested too deeply") from exc


# -- the envelope ---------------------------------------------------------------------------------


def encode_envelope(entries: Iterable[SavedEntry]) -> bytes:
    """Serialise the envelope; refuses what :func:`decode_envelope_untrusted` would refuse."""
    devices = [
        {
            "device": e.device,
            "plugin": e.plugin,
            "type": e.type_name,
            "type_version": e.type_version,
            "payload": e.payload,
        }
        for e in entries
    ]
    document = {"format": ENVELOPE_FORMAT, "version": ENVELOPE_VERSION, "devices": devices}
    try:
        data = json.dumps(
            document, allow_nan=False, ensure_ascii=False, separators=(",", ":")
        ).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise SavedStateError(f"saved state cannot be encoded: {exc}") from exc
    decode_envelope_untrusted(data)  # the writer holds itself to the reader's limits
    return data


def _reject_constant(name: str) -> Any:
    raise SavedStateError(f"saved state: {name} is not allowed")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise SavedStateError(f"saved state: duplicate key {excerpt(key)}")
        result[key] = value
    return result


def _check_depth(document: Any) -> None:
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SavedStateError(f"saved state: nesting deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _text(entry: dict[str, Any], key: str, path: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME:
        raise SavedStateError(f"{path}.{key}: expected a non-empty string of at most {_MAX_NAME}"
                              f" characters, got {_kind(value)}")
    _check_text(value, f"{path}.{key}")
    return value


def _entry(raw: Any, index: int, seen: set[str]) -> SavedEntry:
    path = f"saved state: devices[{index}]"
    if not isinstance(raw, dict):
        raise SavedStateError(f"{path}: expected an object, got {_kind(raw)}")
    keys = set(raw)
    if keys != _ENTRY_KEYS:
        extra, missing = sorted(keys - _ENTRY_KEYS), sorted(_ENTRY_KEYS - keys)
        detail = f"unknown keys {excerpt(extra)}" if extra else f"missing keys {missing}"
        raise SavedStateError(f"{path}: {detail}")
    device = _text(raw, "device", path)
    if device in seen:
        raise SavedStateError(f"{path}.device: device {excerpt(device)} appears twice")
    seen.add(device)
    plugin = _text(raw, "plugin", path)
    type_name = _text(raw, "type", path)
    if _TYPE_NAME.fullmatch(type_name) is None:
        raise SavedStateError(f"{path}.type: {excerpt(type_name)} is not a saved-state type name")
    type_version = raw["type_version"]
    if isinstance(type_version, bool) or not isinstance(type_version, int) or not (
        1 <= type_version <= _INT_MAX
    ):
        raise SavedStateError(f"{path}.type_version: expected a positive integer")
    payload = raw["payload"]
    if not isinstance(payload, dict):
        raise SavedStateError(f"{path}.payload: expected an object, got {_kind(payload)}")
    return SavedEntry(device, plugin, type_name, type_version, payload)


def decode_envelope_untrusted(data: bytes) -> list[SavedEntry]:
    """Parse a saved-state file into its entries; raises only :class:`SavedStateError`."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise SavedStateError(f"saved state: file is larger than {MAX_ENVELOPE_BYTES} bytes")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SavedStateError(f"saved state: not UTF-8 at byte {exc.start}") from exc
    try:
        document = json.loads(
            text, object_pairs_hook=_unique_object, parse_constant=_reject_constant
        )
    except RecursionError as exc:
        raise SavedStateError(f"saved state: nesting deeper than {MAX_DEPTH} levels") from exc
    except ValueError as exc:  # JSONDecodeError, and ints beyond the digit limit
        raise SavedStateError(f"saved state: not valid JSON: {exc}") from exc
    _check_depth(document)
    if not isinstance(document, dict):
        raise SavedStateError(f"saved state: expected a JSON object, got {_kind(document)}")
    fmt = document.get("format")
    if fmt != ENVELOPE_FORMAT:
        raise SavedStateError(
            f"saved state: not a devicehost saved-state file (format {excerpt(fmt)}, expected"
            f" {ENVELOPE_FORMAT!r})"
        )
    version = document.get("version")
    if type(version) is not int or version != ENVELOPE_VERSION:
        raise SavedStateError(
            f"saved state: envelope version {excerpt(version)} is not supported (this host reads"
            f" version {ENVELOPE_VERSION})"
        )
    if set(document) != _ENVELOPE_KEYS:
        extra = sorted(set(document) - _ENVELOPE_KEYS)
        raise SavedStateError(f"saved state: unknown keys {excerpt(extra)} or missing 'devices'")
    devices = document["devices"]
    if not isinstance(devices, list):
        raise SavedStateError(f"saved state: devices: expected an array, got {_kind(devices)}")
    if len(devices) > MAX_DEVICES:
        raise SavedStateError(f"saved state: more than {MAX_DEVICES} devices")
    seen: set[str] = set()
    return [_entry(raw, index, seen) for index, raw in enumerate(devices)]
