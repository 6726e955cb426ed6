"""Guid: Windows byte layout, text form, parser errors (facts §1 and its upstream test vectors)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.vmbus.guid import Guid, GuidError, GuidErrorKind


def test_display_is_lowercase_without_braces() -> None:
    guid = Guid.parse("CF127ACC-C960-41E4-9B1E-513E8A89147D")
    assert str(guid) == "cf127acc-c960-41e4-9b1e-513e8a89147d"
    assert guid.upper() == "CF127ACC-C960-41E4-9B1E-513E8A89147D"
    assert repr(guid) == "Guid('cf127acc-c960-41e4-9b1e-513e8a89147d')"


def test_parse_with_and_without_braces() -> None:
    plain = Guid.parse("cf127acc-c960-41e4-9b1e-513e8a89147d")
    braced = Guid.parse("{cf127acc-c960-41e4-9b1e-513e8a89147d}")
    assert plain == braced
    assert plain.data1 == 0xCF127ACC and plain.data2 == 0xC960 and plain.data3 == 0x41E4
    assert plain.data4 == bytes.fromhex("9b1e513e8a89147d")


def test_from_bytes_is_mixed_endian() -> None:
    guid = Guid.from_bytes(bytes([3, 2, 1, 0, 5, 4, 7, 6, *range(8, 16)]))
    assert str(guid) == "00010203-0405-0607-0809-0a0b0c0d0e0f"


def test_wire_bytes_are_uuid_bytes_le() -> None:
    text = "c376c1c3-d276-48d2-90a9-c04748072c60"
    assert Guid.parse(text).bytes_le == uuid.UUID(text).bytes_le
    assert bytes(Guid.parse(text)) == uuid.UUID(text).bytes_le
    assert Guid.from_uuid(uuid.UUID(text)).to_uuid() == uuid.UUID(text)


def test_from_fields() -> None:
    guid = Guid.from_fields(0x00010203, 0x0405, 0x0607, bytes(range(8, 16)))
    assert str(guid) == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    with pytest.raises(GuidError) as info:
        Guid.from_fields(1, 2, 3, b"short")
    assert info.value.kind is GuidErrorKind.LENGTH


def test_zero() -> None:
    assert Guid.ZERO.bytes_le == bytes(16)
    assert str(Guid.ZERO) == "00000000-0000-0000-0000-000000000000"
    assert Guid.ZERO.is_zero()


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("", GuidErrorKind.LENGTH),
        ("cf127acc-c960-41e4-9b1e-513e8a89147", GuidErrorKind.LENGTH),
        ("cf127acc-c960-41e4-9b1e-513e8a89147d0", GuidErrorKind.LENGTH),
        ("{cf127acc-c960-41e4-9b1e-513e8a89147d", GuidErrorKind.LENGTH),
        ("(cf127acc-c960-41e4-9b1e-513e8a89147d)", GuidErrorKind.FORMAT),
        ("{cf127acc-c960-41e4-9b1e-513e8a89147d{", GuidErrorKind.FORMAT),
        ("cf127acc0c960-41e4-9b1e-513e8a89147d", GuidErrorKind.FORMAT),
        ("cf127acc-c960-41e4-9b1e0513e8a89147d", GuidErrorKind.FORMAT),
        ("cf127acc-c960-41e4-9b1e-513e8a89-47d", GuidErrorKind.DIGIT),
        ("gf127acc-c960-41e4-9b1e-513e8a89147d", GuidErrorKind.DIGIT),
        ("cf127acc-c960-41e4-9b1e-513e8a89147\u00e9", GuidErrorKind.DIGIT),
    ],
)
def test_parse_errors(text: str, kind: GuidErrorKind) -> None:
    with pytest.raises(GuidError) as info:
        Guid.parse(text)
    assert info.value.kind is kind
    assert isinstance(info.value, ValueError)


def test_wrong_byte_count_is_a_length_error() -> None:
    with pytest.raises(GuidError) as info:
        Guid.from_bytes(bytes(15))
    assert info.value.kind is GuidErrorKind.LENGTH
    with pytest.raises(TypeError):
        Guid(16)  # type: ignore[arg-type]


def test_new_random_is_version_4() -> None:
    first, second = Guid.new_random(), Guid.new_random()
    assert first != second
    for guid in (first, second):
        assert guid.data3 >> 12 == 4
        assert guid.data4[0] >> 6 == 0b10
        assert guid.to_uuid().version == 4


def test_hashable_and_ordered() -> None:
    a = Guid.parse("00000000-0000-0000-0000-000000000001")
    b = Guid.parse("00000000-0000-0000-0000-000000000002")
    assert len({a, b, Guid.parse(str(a))}) == 2
    assert sorted([b, a]) == [a, b]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=16, max_size=16))
def test_text_round_trip(data: bytes) -> None:
    guid = Guid.from_bytes(data)
    assert Guid.parse(str(guid)) == guid
    assert Guid.parse("{" + guid.upper() + "}") == guid
    assert str(guid) == str(uuid.UUID(bytes_le=data))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_arbitrary_text_raises_only_guid_error(text: str) -> None:
    try:
        guid = Guid.parse(text)
    except GuidError:
        return
    assert str(guid) == text.strip("{}").lower()
