"""Bounded echoes of untrusted values in error messages and logs.

An error message that quotes what a config file, a saved-state file or a peer sent must stay one
readable line: a 100,000-character string, a 5,000-digit integer or a list nested 500 deep in
hostile input must not turn into a 100 KB log line (or, for the integer, into a ``ValueError``
from ``repr`` itself). :func:`excerpt` is the one way such a value is quoted; it says how much it
left out: ``excerpt("a" * 100_000)`` is the first 60 ``a`` in quotes with an ellipsis, then
``(100000 characters, 99940 not shown)``; ``excerpt("short")`` is ``'short'``.

:func:`bounded_message` does the same for a message that is not itself a value but may quote
one (an exception raised by a plugin's validator).

Strings and bytes keep their first ``limit`` characters (bytes) and say how many there were.
Integers with more than ``limit`` digits are described by their bit length. Lists, tuples and
tables show their first four items (each shortened the same way, to a third of ``limit``) and
how many more there are, three levels deep. Anything else is shown through :mod:`reprlib`. The
result is never longer than ``3 * limit + 130`` characters, whatever the value.
"""

from __future__ import annotations

import reprlib
from typing import Final

__all__ = ["DEFAULT_LIMIT", "MESSAGE_LIMIT", "bounded_message", "excerpt"]

#: Characters of an untrusted value shown in one message.
DEFAULT_LIMIT: Final = 60

#: Characters of a message that may quote untrusted input (an exception's text) kept in a line.
MESSAGE_LIMIT: Final = 200

_MAX_DEPTH: Final = 3
_MAX_ITEMS: Final = 4
_MIN_ITEM: Final = 12

_REPR: Final = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxstring = _REPR.maxother = DEFAULT_LIMIT


def _cut_text(value: str | bytes, limit: int, unit: str) -> str:
    if len(value) <= limit:
        return repr(value)
    shown = repr(value[:limit])
    # repr ends with its closing quote: put the ellipsis inside it.
    return f"{shown[:-1]}…{shown[-1]} ({len(value)} {unit}, {len(value) - limit} not shown)"


def _render(value: object, limit: int, depth: int) -> str:
    """A bounded rendering of ``value``; containers show their first items, each shortened."""
    if isinstance(value, str):
        return _cut_text(value, limit, "characters")
    if isinstance(value, bytes | bytearray):
        return _cut_text(bytes(value), limit, "bytes")
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > limit * 3:  # more than ~limit decimal digits
            kind = "a negative" if value < 0 else "an"
            return f"<{kind} integer of {value.bit_length()} bits, not shown>"
        return repr(value)
    if isinstance(value, list | tuple | dict):
        brackets = {list: "[]", tuple: "()"}.get(type(value), "{}")
        opening, closing = brackets[0], brackets[1]
        if depth >= _MAX_DEPTH:
            return f"{opening}…{closing}"
        items = list(value.items()) if isinstance(value, dict) else list(value[:_MAX_ITEMS])
        inner = max(_MIN_ITEM, limit // 3)
        shown = [
            f"{_render(k, inner, depth + 1)}: {_render(v, inner, depth + 1)}"
            if isinstance(value, dict) else _render(k, inner, depth + 1)
            for k, v in (items[:_MAX_ITEMS] if isinstance(value, dict)
                         else [(item, None) for item in items])
        ]
        if len(value) > _MAX_ITEMS:
            shown.append(f"… {len(value) - _MAX_ITEMS} more")
        trailing = "," if isinstance(value, tuple) and len(value) == 1 else ""
        return opening + ", ".join(shown) + trailing + closing
    try:
        return _REPR.repr(value)
    except Exception as exc:  # a value whose own repr fails is described by its type
        return f"<{type(value).__name__}: repr failed with {type(exc).__name__}>"


def excerpt(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """A ``repr``-like quote of ``value`` that is never much longer than ``limit`` characters
    and says what it cut. Never raises for values decoded from TOML or JSON."""
    text = _render(value, limit, 0)
    hard = 3 * limit + 60
    if len(text) <= hard:
        return text
    return f"{text[:hard]}… ({len(text)} characters in its shortened form, not shown)"


def bounded_message(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` (an exception's message, which may quote a hostile value whole: attrs
    validators do) unchanged if it has at most ``limit`` characters, else its first ``limit``
    characters followed by how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters, {len(text) - limit} not shown)"
