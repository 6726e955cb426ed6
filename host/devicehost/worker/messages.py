"""The messages between a supervisor and a device worker (sans I/O).

Every message is one frame of :mod:`devicehost.handoff` (its STATE frame, then its descriptors
with ``SCM_RIGHTS``): the frame's envelope slot holds the message as UTF-8 JSON, the descriptor
table names the message's descriptors in order (device ``"worker"``, handle = index). Values
inside (hook arguments and results) are in the codec form of :mod:`devicehost.worker.codec`.

Supervisor -> worker (the worker trusts its parent, but checks the shapes all the same)::

    {"op": "init", "id": 0, "device": {...}, "config": TABLE, "settings": TABLE, "restart": R}
    {"op": "call", "id": N, "hook": HOOK, "args": {NAME: VALUE}, "carry_fds": BOOL}
    {"op": "run", "runner": R}          the worker answers "ended" when the run ends
    {"op": "stop", "runner": R}         cancel that run; its "ended" follows
    {"op": "ping", "id": N}             "pong" from the worker's event loop
    {"op": "exit"}                      close every runner quietly and exit

Worker -> supervisor (hostile: :func:`decode_from_worker_untrusted`, :class:`WorkerProtocolError`
blaming the worker)::

    {"op": "result", "id": N, "value": VALUE}
    {"op": "error", "id": N, "type": NAME, "message": TEXT, "key": KEY-or-null}
    {"op": "ended", "runner": R, "outcome": "returned"|"raised"|"stopped", "error": TEXT-or-null}
    {"op": "report", "key": KEY, "value": JSON}
    {"op": "pong", "id": N}
"""

from __future__ import annotations

import json
from typing import Any, Final

import attrs

from devicehost.errors import DeviceHostError
from devicehost.excerpt import excerpt

__all__ = [
    "HOOKS",
    "MAX_REPORT_BYTES",
    "MAX_TEXT",
    "Ended",
    "Failure",
    "Pong",
    "Report",
    "Result",
    "WorkerProtocolError",
    "decode_from_worker_untrusted",
    "decode_to_worker",
    "encode_message",
]

#: The hooks a supervisor calls in a worker (``run`` has messages of its own).
HOOKS: Final = frozenset({"offer", "open", "close", "save_open", "restore_open", "inspect"})
#: Longest error text, type name or report key kept from a worker.
MAX_TEXT: Final = 4096
#: Largest JSON form of one report's value.
MAX_REPORT_BYTES: Final = 64 << 10
_MAX_ID: Final = (1 << 63) - 1
_OUTCOMES: Final = frozenset({"returned", "raised", "stopped"})


class WorkerProtocolError(DeviceHostError):
    """Raised when a message across the worker boundary is malformed; the message names the side
    that sent it (usually the worker, whose device code may have corrupted it)."""


@attrs.frozen
class Result:
    """A hook call's value (codec form)."""

    id: int
    value: Any


@attrs.frozen
class Failure:
    """A hook call raised ``type``: ``message`` (``key``: a ConfigError's key)."""

    id: int
    type: str
    message: str
    key: str | None = None


@attrs.frozen
class Ended:
    """A run ended: ``returned``, ``raised`` (``error`` says what) or ``stopped`` (cancelled)."""

    runner: int
    outcome: str
    error: str | None = None


@attrs.frozen
class Report:
    """The worker reports ``value`` under ``key`` (the supervisor keeps the latest per key)."""

    key: str
    value: Any


@attrs.frozen
class Pong:
    """The worker's event loop answered ping ``id``."""

    id: int


WorkerMessage = Result | Failure | Ended | Report | Pong


def encode_message(message: dict[str, Any]) -> bytes:
    """The JSON bytes of a message (either direction)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


def _object(data: bytes, sender: str) -> dict[str, Any]:
    try:
        message = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WorkerProtocolError(f"the {sender} sent a message that is not JSON:"
                                  f" {type(exc).__name__}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise WorkerProtocolError(f"the {sender} sent a message without an op:"
                                  f" {excerpt(message)}")
    return message


def _int(message: dict[str, Any], key: str, sender: str) -> int:
    value = message.get(key)
    if type(value) is not int or not 0 <= value <= _MAX_ID:
        raise WorkerProtocolError(f"the {sender} sent {message['op']!r} with {key}"
                                  f" {excerpt(value)}, not a non-negative integer")
    return value


def _text(message: dict[str, Any], key: str, sender: str, *, optional: bool = False) -> str | None:
    value = message.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise WorkerProtocolError(f"the {sender} sent {message['op']!r} with {key}"
                                  f" {excerpt(value)}, not a string")
    return value[:MAX_TEXT]


def _keys(message: dict[str, Any], names: set[str], sender: str) -> None:
    if set(message) != names | {"op"}:
        raise WorkerProtocolError(f"the {sender} sent {message['op']!r} with the keys"
                                  f" {excerpt(sorted(message))}, expected {sorted(names)}")


def decode_from_worker_untrusted(data: bytes) -> WorkerMessage:
    """A worker's message; :class:`WorkerProtocolError` blaming the worker if it is malformed."""
    sender = "worker"
    message = _object(data, sender)
    op = message["op"]
    if op == "result":
        _keys(message, {"id", "value"}, sender)
        return Result(_int(message, "id", sender), message["value"])
    if op == "error":
        _keys(message, {"id", "type", "message", "key"}, sender)
        return Failure(_int(message, "id", sender), _text(message, "type", sender) or "",
                       _text(message, "message", sender) or "",
                       _text(message, "key", sender, optional=True))
    if op == "ended":
        _keys(message, {"runner", "outcome", "error"}, sender)
        outcome = message["outcome"]
        if outcome not in _OUTCOMES:
            raise WorkerProtocolError(f"the worker sent an unknown run outcome {excerpt(outcome)}")
        return Ended(_int(message, "runner", sender), outcome,
                     _text(message, "error", sender, optional=True))
    if op == "report":
        _keys(message, {"key", "value"}, sender)
        key = _text(message, "key", sender) or ""
        if not key or len(key) > 256:
            raise WorkerProtocolError(f"the worker sent a report key {excerpt(key)} (1..256"
                                      " characters)")
        if len(encode_message({"v": message["value"]})) > MAX_REPORT_BYTES:
            raise WorkerProtocolError(f"the worker sent a report {key!r} over"
                                      f" {MAX_REPORT_BYTES} bytes")
        return Report(key, message["value"])
    if op == "pong":
        _keys(message, {"id"}, sender)
        return Pong(_int(message, "id", sender))
    raise WorkerProtocolError(f"the worker sent an unknown op {excerpt(op)}")


def decode_to_worker(data: bytes) -> dict[str, Any]:
    """A supervisor's message, shape-checked (op and ids); :class:`WorkerProtocolError`."""
    sender = "supervisor"
    message = _object(data, sender)
    op = message["op"]
    if op in ("init", "call", "ping"):
        _int(message, "id", sender)
    elif op in ("run", "stop"):
        _int(message, "runner", sender)
    elif op != "exit":
        raise WorkerProtocolError(f"the supervisor sent an unknown op {excerpt(op)}")
    if op == "call" and message.get("hook") not in HOOKS:
        raise WorkerProtocolError(f"the supervisor called an unknown hook"
                                  f" {excerpt(message.get('hook'))}")
    return message
