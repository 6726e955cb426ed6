"""GPA range buffers (facts §3.6)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.vmbus.gpadl import (
    GpaRangeError,
    GpaRangeErrorKind,
    MultiPagedRange,
    PagedRange,
    decode_gpa_ranges_untrusted,
    encode_gpa_ranges,
)


def header(byte_count: int, byte_offset: int) -> int:
    return byte_count | byte_offset << 32


def test_decode_two_ranges_from_words_and_bytes() -> None:
    words = [header(4096, 0), 10, header(5000, 100), 20, 21]
    expected = MultiPagedRange((PagedRange(4096, 0, (10,)), PagedRange(5000, 100, (20, 21))))
    assert decode_gpa_ranges_untrusted(words, 2) == expected
    assert decode_gpa_ranges_untrusted(struct.pack("<5Q", *words), 2) == expected
    assert decode_gpa_ranges_untrusted(words) == expected


def test_trailing_words_are_ignored() -> None:
    words = [header(1, 0xFFF), 7, 99, 98]
    assert decode_gpa_ranges_untrusted(words, 1).ranges == (PagedRange(1, 0xFFF, (7,)),)


def test_page_count_includes_the_offset() -> None:
    # 4096 bytes starting 1 byte into the first page cover two pages.
    with pytest.raises(GpaRangeError) as info:
        decode_gpa_ranges_untrusted([header(4096, 1), 5], 1)
    assert info.value.kind is GpaRangeErrorKind.RANGE_TOO_SMALL
    assert decode_gpa_ranges_untrusted([header(4096, 1), 5, 6], 1).ranges[0].gpns == (5, 6)


@pytest.mark.parametrize(
    ("words", "count", "kind", "index"),
    [
        ([header(0, 0), 1], 1, GpaRangeErrorKind.EMPTY_BYTE_COUNT, 0),
        ([header(1, 0x1000), 1], 1, GpaRangeErrorKind.OFFSET_TOO_LARGE, 0),  # upstream large_offset
        ([header(0xFFFF_FFFF, 0), 1], 1, GpaRangeErrorKind.OVERFLOW, 0),
        ([header(0xFFFF_F000, 1), 1], 1, GpaRangeErrorKind.OVERFLOW, 0),
        ([header(8192, 0), 1], 1, GpaRangeErrorKind.RANGE_TOO_SMALL, 0),
        ([], 1, GpaRangeErrorKind.EMPTY_RANGE, 0),
        ([header(1, 0), 1], 2, GpaRangeErrorKind.EMPTY_RANGE, 1),
    ],
)
def test_each_validation(words: list[int], count: int, kind: GpaRangeErrorKind,
                         index: int) -> None:
    with pytest.raises(GpaRangeError) as info:
        decode_gpa_ranges_untrusted(words, count)
    assert info.value.kind is kind
    assert info.value.index == index
    assert "guest's fault" in str(info.value)


def test_largest_count_without_overflow_is_accepted_up_to_the_page_list() -> None:
    with pytest.raises(GpaRangeError) as info:
        decode_gpa_ranges_untrusted([header(0xFFFF_F000, 0), 1], 1)
    assert info.value.kind is GpaRangeErrorKind.RANGE_TOO_SMALL


def test_encode_layout() -> None:
    mpr = MultiPagedRange((PagedRange(10, 8, (0x1234,)),))
    assert encode_gpa_ranges(mpr) == struct.pack("<QQ", 10 | 8 << 32, 0x1234)


def test_segments_split_at_page_boundaries() -> None:
    r = PagedRange(5000, 4000, (3, 9, 4))
    assert list(r.segments()) == [(3 * 4096 + 4000, 96), (9 * 4096, 4096), (4 * 4096, 808)]


def test_paged_range_rejects_inconsistent_values() -> None:
    with pytest.raises(ValueError):
        PagedRange(4097, 0, (1,))
    with pytest.raises(ValueError):
        PagedRange(1, 4096, (1,))


@st.composite
def paged_ranges(draw: st.DrawFn) -> PagedRange:
    offset = draw(st.integers(0, 0xFFF))
    count = draw(st.integers(1, 3 * 4096))
    pages = (offset + count + 4095) // 4096
    gpns = draw(st.lists(st.integers(0, 2**64 - 1), min_size=pages, max_size=pages))
    return PagedRange(count, offset, tuple(gpns))


@settings(max_examples=200, deadline=None)
@given(st.lists(paged_ranges(), min_size=0, max_size=5))
def test_encode_decode_round_trip(ranges: list[PagedRange]) -> None:
    mpr = MultiPagedRange(tuple(ranges))
    assert decode_gpa_ranges_untrusted(encode_gpa_ranges(mpr), len(ranges)) == mpr
    assert decode_gpa_ranges_untrusted(mpr.words(), len(ranges)) == mpr


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.one_of(st.none(), st.integers(0, 6)))
def test_arbitrary_buffers_raise_only_gpa_range_error(buf: bytes, count: int | None) -> None:
    try:
        result = decode_gpa_ranges_untrusted(buf, count)
    except GpaRangeError:
        return
    words = len(buf) // 8
    assert sum(1 + len(r.gpns) for r in result.ranges) <= words
