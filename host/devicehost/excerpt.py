"""Bounded echoes of untrusted values in error messages and logs.

An error message that quotes what a config file, a saved-state file or a peer sent must stay one
readable line: a 100,000-character string, a 5,000-digit integer or a list nested 500 deep in
hostile input must not turn into a 100 KB log line (or, for the integer, into a ``ValueError``
from ``repr`` itself). :func:`excerpt` is the one way such a value is quoted; it says how much it
left out::

    excerpt("a" * 100_000) == "'aaaa…aaaa…' (100000 characters, 99940 not shown)"
                               (the first 60 characters between the quotes)
    excerpt("short") == "'short'"

:func:`bounded_message` does the same for a message that is not itself a value but may quote
one (an exception raised by a plugin's validator).

Strings and bytes keep their first ``limit`` characters (bytes) and say how many there were.
Integers with more than ``limit`` digits are described by their bit length. Anything else
(lists, tables, floats) is shown through :mod:`reprlib` with bounded depth and items, cut to at
most ``limit`` characters with the total length of the elided form. The result is at most about
``limit + 60`` characters, whatever the value.
"""

from __future__ import annotations

import reprlib
from typing import Final

__all__ = ["DEFAULT_LIMIT", "MESSAGE_LIMIT", "bounded_message", "excerpt"]

#: Characters of an untrusted value shown in one message.
DEFAULT_LIMIT: Final = 60

#: Characters of a message that may quote untrusted input (an exception's text) kept in a line.
MESSAGE_LIMIT: Final = 200

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


def excerpt(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """A ``repr``-like quote of ``value`` that is never much longer than ``limit`` characters
    and says what it cut. Never raises for values decoded from TOML or JSON."""
    if isinstance(value, str):
        return _cut_text(value, limit, "characters")
    if isinstance(value, bytes | bytearray):
        return _cut_text(bytes(value), limit, "bytes")
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > limit * 3:  # more than ~limit decimal digits
            kind = "a negative" if value < 0 else "an"
            return f"<{kind} integer of {value.bit_length()} bits, not shown>"
        return repr(value)
    try:
        text = _REPR.repr(value)
    except Exception as exc:  # a value whose own repr fails is described by its type
        return f"<{type(value).__name__}: repr failed with {type(exc).__name__}>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters in its shortened form, not shown)"


def bounded_message(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` (an exception's message, which may quote a hostile value whole: attrs
    validators do) unchanged if it has at most ``limit`` characters, else its first ``limit``
    characters followed by how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters, {len(text) - limit} not shown)"
