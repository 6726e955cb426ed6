"""Bounded echoes of untrusted values: short values whole, long ones cut with what was cut."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.excerpt import DEFAULT_LIMIT, bounded_message, excerpt


def test_short_values_are_their_repr() -> None:
    for value in ("short", b"\x00b", 42, -1, 1.5, True, None, [1, "a"], {"k": 1}, (1,), ()):
        assert excerpt(value) == repr(value)


def test_long_strings_and_bytes_say_how_much_was_cut() -> None:
    assert excerpt("a" * 100_000) == f"'{'a' * 60}…' (100000 characters, 99940 not shown)"
    assert excerpt(b"b" * 61) == f"b'{'b' * 60}…' (61 bytes, 1 not shown)"
    assert excerpt("c" * 61, limit=10) == f"'{'c' * 10}…' (61 characters, 51 not shown)"


def test_huge_integers_are_described_not_converted() -> None:
    # repr() of a 5,000-digit integer raises ValueError: the excerpt never calls it.
    assert excerpt(10**5000) == "<an integer of 16610 bits, not shown>"
    assert excerpt(-(10**5000)) == "<a negative integer of 16610 bits, not shown>"


def test_deep_and_wide_containers_are_bounded() -> None:
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    assert excerpt(deep) == "[[[[…]]]]"
    assert excerpt(["a" * 100_000, 2, 3, 4, 5, 6]) == (
        f"['{'a' * 20}…' (100000 characters, 99980 not shown), 2, 3, 4, … 2 more]")
    wide = {f"key{i}": ["v" * 1000] * 10 for i in range(1000)}
    text = excerpt(wide)
    assert len(text) <= 3 * DEFAULT_LIMIT + 130 and "characters in its shortened form" in text


def test_bounded_message_keeps_short_messages_and_cuts_long_ones() -> None:
    assert bounded_message("'size' must be >= 0: -1") == "'size' must be >= 0: -1"
    assert bounded_message("x" * 250) == "x" * 200 + "… (250 characters, 50 not shown)"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=50,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(1, 200))
def test_any_value_gives_a_bounded_excerpt(value: Any, limit: int) -> None:
    assert len(excerpt(value, limit)) <= 3 * limit + 130
