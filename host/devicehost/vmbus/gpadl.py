"""GPA range buffers: the page lists of GPADLs and GPA-direct packets (facts §3.6).

A range buffer is a sequence of u64 words. Each range is one header word (low 32 bits
``byte_count``, high 32 bits ``byte_offset`` into the first page) followed by the page numbers it
covers: ``ceil((byte_offset + byte_count) / 4096)`` of them. Buffers come from the guest and are
untrusted: :func:`decode_gpa_ranges_untrusted` raises only :class:`GpaRangeError`.

Decisions:

- Words after the last range are ignored (upstream truncates them).
- [AMBIGUOUS] The page-count computation is checked for overflow in 32-bit arithmetic (the
  header's own width): ``byte_offset + byte_count + 4095`` must fit in a u32, else Overflow.
- Page numbers are not checked against guest memory here; mapping them does that.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator, Sequence
from typing import Final

import attrs

from devicehost.memory import PAGE_SIZE

__all__ = [
    "GpaRangeError",
    "GpaRangeErrorKind",
    "MultiPagedRange",
    "PagedRange",
    "decode_gpa_ranges_untrusted",
    "encode_gpa_ranges",
]

_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
_OFFSET_MAX: Final = PAGE_SIZE - 1

# Header word (8 bytes): u32 byte_count (bits 0-31), u32 byte_offset (bits 32-63); then
# page numbers, u64 each.
_U64: Final = struct.Struct("<Q")


class GpaRangeErrorKind(enum.Enum):
    EMPTY_BYTE_COUNT = "EmptyByteCount"
    OFFSET_TOO_LARGE = "OffsetTooLarge"
    OVERFLOW = "Overflow"
    RANGE_TOO_SMALL = "RangeTooSmall"
    EMPTY_RANGE = "EmptyRange"


class GpaRangeError(Exception):
    """Raised when a GPA range buffer from the guest is malformed (the guest's fault)."""

    def __init__(self, kind: GpaRangeErrorKind, index: int, detail: str) -> None:
        self.kind = kind
        self.index = index
        super().__init__(f"{kind.value} in GPA range {index} (guest's fault): {detail}")


def _page_count(byte_count: int, byte_offset: int) -> int:
    return (byte_offset + byte_count + PAGE_SIZE - 1) // PAGE_SIZE


@attrs.frozen
class PagedRange:
    """``byte_count`` bytes starting ``byte_offset`` bytes into the first of ``gpns``."""

    byte_count: int
    byte_offset: int
    gpns: tuple[int, ...]

    def __attrs_post_init__(self) -> None:
        if not 0 < self.byte_count <= _U32_MAX or not 0 <= self.byte_offset <= _OFFSET_MAX:
            raise ValueError("byte_count must be 1..2**32-1 and byte_offset 0..4095")
        if len(self.gpns) != _page_count(self.byte_count, self.byte_offset):
            raise ValueError("the page list does not match byte_count and byte_offset")
        if any(not 0 <= g <= _U64_MAX for g in self.gpns):
            raise ValueError("page numbers are u64")

    def segments(self) -> Iterator[tuple[int, int]]:
        """(guest physical address, length) of each page-bounded piece, in order."""
        remaining = self.byte_count
        offset = self.byte_offset
        for gpn in self.gpns:
            n = min(PAGE_SIZE - offset, remaining)
            yield gpn * PAGE_SIZE + offset, n
            remaining -= n
            offset = 0


@attrs.frozen
class MultiPagedRange:
    """An ordered list of :class:`PagedRange`."""

    ranges: tuple[PagedRange, ...]

    @property
    def byte_count(self) -> int:
        return sum(r.byte_count for r in self.ranges)

    def words(self) -> tuple[int, ...]:
        """The range buffer as u64 words."""
        out: list[int] = []
        for r in self.ranges:
            out.append(r.byte_count | r.byte_offset << 32)
            out.extend(r.gpns)
        return tuple(out)


def _as_words(buf: bytes | bytearray | memoryview | Sequence[int]) -> Sequence[int]:
    if isinstance(buf, (bytes, bytearray, memoryview)):
        mv = memoryview(buf).cast("B")
        n = len(mv) // 8
        return struct.unpack_from(f"<{n}Q", mv)
    for w in buf:
        if not 0 <= w <= _U64_MAX:
            raise ValueError(f"range buffer words are u64, not {w!r}")
    return buf


def decode_gpa_ranges_untrusted(
    buf: bytes | bytearray | memoryview | Sequence[int], count: int | None = None
) -> MultiPagedRange:
    """Parse ``count`` ranges from ``buf`` (bytes, read as little-endian u64s with any trailing
    partial word dropped, or a sequence of u64 ints). With ``count=None`` ranges are parsed until
    the buffer ends. Raises :class:`GpaRangeError`.
    """
    words = _as_words(buf)
    ranges: list[PagedRange] = []
    pos = 0
    index = 0
    while (count is None and pos < len(words)) or (count is not None and index < count):
        if pos >= len(words):
            raise GpaRangeError(GpaRangeErrorKind.EMPTY_RANGE, index,
                                "the buffer ends before the range header")
        header = words[pos]
        byte_count = header & _U32_MAX
        byte_offset = header >> 32
        if byte_count == 0:
            raise GpaRangeError(GpaRangeErrorKind.EMPTY_BYTE_COUNT, index, "byte_count is 0")
        if byte_offset > _OFFSET_MAX:
            raise GpaRangeError(GpaRangeErrorKind.OFFSET_TOO_LARGE, index,
                                f"byte_offset {byte_offset:#x} > 0xfff")
        if byte_offset + byte_count + PAGE_SIZE - 1 > _U32_MAX:
            raise GpaRangeError(GpaRangeErrorKind.OVERFLOW, index,
                                f"byte_count {byte_count:#x} + byte_offset overflows")
        pages = _page_count(byte_count, byte_offset)
        if pos + 1 + pages > len(words):
            raise GpaRangeError(GpaRangeErrorKind.RANGE_TOO_SMALL, index,
                                f"needs {pages} page numbers, {len(words) - pos - 1} given")
        ranges.append(PagedRange(byte_count, byte_offset, tuple(words[pos + 1 : pos + 1 + pages])))
        pos += 1 + pages
        index += 1
    return MultiPagedRange(tuple(ranges))


def encode_gpa_ranges(ranges: MultiPagedRange) -> bytes:
    """The range buffer as bytes (little-endian u64 words)."""
    words = ranges.words()
    return struct.pack(f"<{len(words)}Q", *words)
