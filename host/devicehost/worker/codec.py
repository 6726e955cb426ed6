"""The codec registry: how values cross the worker boundary (offers, resources, saved states).

A device in a worker (``isolation = "process"``) has its hooks called with values the supervisor
holds (a transport's resources, a restored state) and answers with values the supervisor needs (an
offer, a saved state). Each value crosses as JSON plus file descriptors (the descriptors travel
with ``SCM_RIGHTS`` through :mod:`devicehost.handoff`):

- ``None``, ``bool``, ``int`` (64-bit), ``float`` (finite) and ``str`` cross as themselves;
  ``bytes``, ``list``, ``tuple`` and ``dict`` (``str`` keys) as tagged objects; their items
  recursively.
- Every registered saved-state type (:func:`devicehost.saved_state`) crosses without a codec, as
  its saved-state payload (:mod:`devicehost.savedstate`, the same schema and checks as a state
  file): the generic saved-state path.
- Anything else needs a codec, registered once per type (exact type, not subclasses) by the module
  that defines the type (or by the transport that hands it to devices)::

      def encode_offer(value: LocalOffer, out: Encoder) -> JSON:
          return {"description": out.value(value.description)}

      def decode_offer(data: JSON, inp: Decoder) -> LocalOffer:
          fields = inp.fields(data, "description")
          description = inp.value(fields["description"])
          if not isinstance(description, dict):
              raise CodecError("LocalOffer: description is not a table")
          return LocalOffer(description)

      register_codec(LocalOffer, "devicehost.LocalOffer", encode_offer, decode_offer)

  ``out.fd(sock)`` attaches a descriptor (the receiver gets its own duplicate; the sender keeps
  its own) and returns the index to write into the JSON; ``inp.fd(index, "socket")`` takes the
  received descriptor back (it is then the decoder's to close; its kind is checked).
  ``out.value``/``inp.value`` encode and decode a nested value through the registry.

Decoding is hostile: a decoder also runs in the supervisor, on what a worker sent (an offer, a
saved state), so it raises :class:`CodecError` (and only it) for anything malformed; the caller
blames the sending side. Nesting is limited to :data:`MAX_DEPTH`, the message size by the frame
(:data:`devicehost.handoff.MAX_PAYLOAD`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

import attrs

from devicehost.errors import DeviceHostError, SavedStateError
from devicehost.excerpt import excerpt
from devicehost.fds import fd_kind

__all__ = [
    "MAX_DEPTH",
    "Codec",
    "CodecError",
    "Decoder",
    "Encoder",
    "codec_for",
    "decode_value",
    "encode_value",
    "register_codec",
    "release_value",
]

#: Deepest nesting of tagged values accepted.
MAX_DEPTH: Final = 64
_INT_MIN: Final = -(1 << 63)
_INT_MAX: Final = (1 << 64) - 1
#: The tag key of a tagged value; the payload is under ``"v"``.
_TAG: Final = "@"

JSON = Any


class CodecError(DeviceHostError):
    """Raised when a value cannot be encoded to cross the worker boundary (no codec for its type)
    or a received encoding is malformed; the caller says which side sent it."""


class _FileLike(Protocol):
    def fileno(self) -> int: ...


class Encoder:
    """What an encode function gets: attach descriptors, encode nested values."""

    def __init__(self) -> None:
        #: The descriptors attached so far (the caller's: they are not duplicated here).
        self.fds: list[int] = []
        self._depth = 0

    def fd(self, fd: int | _FileLike) -> int:
        """Attach descriptor ``fd`` (or an object with ``fileno()``); its index in the message.
        It must stay open until the message is sent."""
        number = fd if isinstance(fd, int) else fd.fileno()
        if number < 0:
            raise CodecError(f"cannot attach descriptor {number}: it is closed")
        self.fds.append(number)
        return len(self.fds) - 1

    def value(self, value: Any) -> JSON:
        """The JSON form of ``value`` (module docstring); :class:`CodecError` if it has a type
        without a codec."""
        if self._depth >= MAX_DEPTH:
            raise CodecError(f"the value nests deeper than {MAX_DEPTH} levels")
        self._depth += 1
        try:
            return self._value(value)
        finally:
            self._depth -= 1

    def _value(self, value: Any) -> JSON:
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int):
            if not _INT_MIN <= value <= _INT_MAX:
                raise CodecError(f"an integer of {value.bit_length()} bits cannot cross")
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise CodecError(f"the float {value} cannot cross (JSON has no {value})")
            return value
        codec = _BY_TYPE.get(type(value))
        if codec is not None:
            return {_TAG: codec.tag, "v": codec.encode(value, self)}
        if isinstance(value, bytes | bytearray | memoryview):
            return {_TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, list | tuple):
            return {_TAG: "list" if isinstance(value, list) else "tuple",
                    "v": [self.value(item) for item in value]}
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    raise CodecError(f"a dict key {excerpt(key)} is not a string")
            return {_TAG: "dict", "v": {k: self.value(v) for k, v in value.items()}}
        if vars(type(value)).get("__devicehost_saved_state__") is not None:
            from devicehost.savedstate import entry_for

            try:
                entry = entry_for("worker", "worker", value)
            except SavedStateError as exc:
                raise CodecError(str(exc)) from exc
            return {_TAG: "saved-state", "v": {"type": entry.type_name,
                                               "version": entry.type_version,
                                               "payload": entry.payload}}
        raise CodecError(
            f"a {type(value).__module__}.{type(value).__qualname__} cannot cross the worker"
            " boundary: no codec is registered for its type (devicehost.worker.register_codec)")


class Decoder:
    """What a decode function gets: received descriptors, nested values, field checks."""

    def __init__(self, fds: Iterable[int] = ()) -> None:
        self._fds: dict[int, int] = dict(enumerate(fds))
        self._depth = 0

    def fd(self, index: Any, kind: str) -> int:
        """The received descriptor at ``index``, now the caller's; CodecError if there is none
        (or it was taken already) or it is not of ``kind`` (it is closed then)."""
        if type(index) is not int or index not in self._fds:
            raise CodecError(f"no descriptor at index {excerpt(index)}")
        fd = self._fds.pop(index)
        actual = fd_kind(fd)
        if actual != kind:
            _close(fd)
            raise CodecError(f"descriptor {index} is a {actual}, not a {kind}")
        return fd

    def value(self, data: JSON) -> Any:
        """Decode a nested value (module docstring); CodecError if it is malformed."""
        if self._depth >= MAX_DEPTH:
            raise CodecError(f"the value nests deeper than {MAX_DEPTH} levels")
        self._depth += 1
        try:
            return self._value(data)
        finally:
            self._depth -= 1

    def _value(self, data: JSON) -> Any:
        if data is None or isinstance(data, bool | str):
            return data
        if isinstance(data, int):
            if not _INT_MIN <= data <= _INT_MAX:
                raise CodecError("an integer out of the 64-bit range")
            return data
        if isinstance(data, float):
            if not math.isfinite(data):
                raise CodecError(f"a non-finite float {data}")
            return data
        if not isinstance(data, dict):
            raise CodecError(f"expected a value, got {excerpt(data)}")
        fields = self.fields(data, _TAG, "v")
        tag, payload = fields[_TAG], fields["v"]
        if tag == "bytes":
            if not isinstance(payload, str):
                raise CodecError("bytes: the payload is not a base64 string")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise CodecError(f"bytes: not base64: {exc}") from exc
        if tag in ("list", "tuple"):
            if not isinstance(payload, list):
                raise CodecError(f"{tag}: the payload is not a list")
            items = [self.value(item) for item in payload]
            return items if tag == "list" else tuple(items)
        if tag == "dict":
            if not isinstance(payload, dict):
                raise CodecError("dict: the payload is not an object")
            return {str(k): self.value(v) for k, v in payload.items()}
        if tag == "saved-state":
            return _decode_saved_state(self, payload)
        codec = _BY_TAG.get(tag) if isinstance(tag, str) else None
        if codec is None:
            raise CodecError(f"unknown value tag {excerpt(tag)} (is the module that registers"
                             " its codec imported on this side?)")
        try:
            return codec.decode(payload, self)
        except CodecError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # A decoder that trusted its input too far: still the sender's malformed value.
            raise CodecError(f"{tag}: {type(exc).__name__}: {exc}") from exc

    def fields(self, data: JSON, *names: str) -> dict[str, Any]:
        """``data`` as an object with exactly the keys ``names``; CodecError otherwise."""
        if not isinstance(data, dict):
            raise CodecError(f"expected an object with keys {list(names)}, got {excerpt(data)}")
        if set(data) != set(names):
            raise CodecError(f"expected the keys {sorted(names)}, got {excerpt(sorted(data))}")
        return data

    def close_untaken(self) -> list[int]:
        """Close the received descriptors no decoder took; their indexes."""
        untaken = sorted(self._fds)
        for fd in self._fds.values():
            _close(fd)
        self._fds.clear()
        return untaken


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _decode_saved_state(inp: Decoder, payload: Any) -> Any:
    from devicehost.savedstate import SavedEntry, decode_state_untrusted

    fields = inp.fields(payload, "type", "version", "payload")
    name, version, body = fields["type"], fields["version"], fields["payload"]
    if not isinstance(name, str) or type(version) is not int or not isinstance(body, dict):
        raise CodecError("saved-state: expected a type name, a version and a payload object")
    try:
        return decode_state_untrusted(SavedEntry("worker", "worker", name, version, body))
    except SavedStateError as exc:
        raise CodecError(f"saved-state: {exc}") from exc


@attrs.frozen
class Codec:
    """How one type crosses: ``tag`` names it on the wire (unique, stable);
    ``encode(value, Encoder) -> JSON`` and ``decode(JSON, Decoder) -> value``."""

    type: type
    tag: str
    encode: Callable[[Any, Encoder], JSON]
    decode: Callable[[JSON, Decoder], Any]
    #: Releases what a decoded value holds (mappings, descriptors) once its user is done with it
    #: (:func:`release_value`); None: nothing to release.
    release: Callable[[Any], None] | None = None


_BY_TYPE: dict[type, Codec] = {}
_BY_TAG: dict[str, Codec] = {}
_RESERVED: Final = frozenset({"bytes", "list", "tuple", "dict", "saved-state"})


def register_codec(
    cls: type,
    tag: str,
    encode: Callable[[Any, Encoder], JSON],
    decode: Callable[[JSON, Decoder], Any],
    release: Callable[[Any], None] | None = None,
) -> None:
    """Register how values of exactly type ``cls`` cross the worker boundary (module docstring).
    ``release``: what the receiver calls on a decoded value once done with it (the worker, on a
    hook argument of ``open``/``restore_open``, after the runner's ``close`` or a failed open).
    Registering the same type again under the same tag replaces the functions (a module reloaded);
    a tag or type taken by another registration is a :class:`ValueError`."""
    if not tag or tag in _RESERVED:
        raise ValueError(f"codec tag {tag!r} is reserved or empty")
    by_tag = _BY_TAG.get(tag)
    if by_tag is not None and by_tag.type is not cls and (
        by_tag.type.__module__, by_tag.type.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"codec tag {tag!r} is taken by {by_tag.type.__qualname__}")
    by_type = _BY_TYPE.get(cls)
    if by_type is not None and by_type.tag != tag:
        raise ValueError(f"{cls.__qualname__} already has the codec {by_type.tag!r}")
    codec = Codec(cls, tag, encode, decode, release)
    _BY_TYPE[cls] = codec
    _BY_TAG[tag] = codec


def release_value(value: Any) -> None:
    """Release a decoded ``value`` through its codec's ``release`` (if it has one); an error in
    the release is logged, never raised."""
    codec = _BY_TYPE.get(type(value))
    if codec is None or codec.release is None:
        return
    try:
        codec.release(value)
    except Exception:
        import logging

        logging.getLogger("devicehost.worker").exception("releasing a %s failed",
                                                          type(value).__qualname__)


def codec_for(cls: type) -> Codec | None:
    """The codec registered for exactly ``cls``, if any."""
    return _BY_TYPE.get(cls)


def encode_value(value: Any) -> tuple[JSON, list[int]]:
    """``value``'s JSON form and the descriptors it attached (still the caller's)."""
    out = Encoder()
    return out.value(value), out.fds


def decode_value(data: JSON, fds: Iterable[int] = ()) -> Any:
    """Decode ``data`` with the received descriptors ``fds`` (every one the value did not take
    is closed); :class:`CodecError` if it is malformed (every descriptor is closed then)."""
    inp = Decoder(fds)
    try:
        return inp.value(data)
    finally:
        inp.close_untaken()


# -- the host's own types -------------------------------------------------------------------------


def _encode_local_offer(value: Any, out: Encoder) -> JSON:
    return {"description": out.value(value.description)}


def _decode_local_offer(data: JSON, inp: Decoder) -> Any:
    from devicehost.context import LocalOffer

    description = inp.value(inp.fields(data, "description")["description"])
    if not isinstance(description, dict):
        raise CodecError("LocalOffer: the description is not a table")
    return LocalOffer(description)


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported at its first call (the VMBus codecs need the ring machinery,
    which a worker of another transport never loads)."""

    def call(*args: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(*args)

    return call


def _register_builtin() -> None:
    from devicehost.context import LocalOffer
    from devicehost.vmbus.protocol import OfferParams, OpenResources

    register_codec(LocalOffer, "devicehost.LocalOffer", _encode_local_offer, _decode_local_offer)
    vmbus = "devicehost.vmbus.remote"
    register_codec(OfferParams, "devicehost.vmbus.OfferParams",
                   _lazy(vmbus, "encode_offer_value"), _lazy(vmbus, "decode_offer_value"))
    register_codec(OpenResources, "devicehost.vmbus.OpenResources",
                   _lazy(vmbus, "encode_open_value"), _lazy(vmbus, "decode_open_value"),
                   _lazy(vmbus, "release_open_value"))


_register_builtin()
