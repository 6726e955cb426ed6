"""Packets on a Hyper-V ring (facts §3.3): the descriptor layout and the packet values.

A packet is ``[descriptor 16][type-specific header][payload, padded to 8][footer 8]``. The ring
(:mod:`devicehost.vmbus.ring`) reads and writes packets; this module holds their format.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

import attrs

from devicehost.vmbus.gpadl import MultiPagedRange, decode_gpa_ranges_untrusted, encode_gpa_ranges

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "DESCRIPTOR",
    "FLAG_COMPLETION_REQUESTED",
    "FOOTER",
    "GPA_DIRECT_HEADER",
    "TRANSFER_PAGE_HEADER",
    "TRANSFER_PAGE_RANGE",
    "IncomingPacket",
    "OutgoingPacket",
    "PacketType",
    "TransferPageRange",
    "TransferPages",
    "in_band_size",
]

FLAG_COMPLETION_REQUESTED: Final = 1

# Packet descriptor (16 bytes):
#   0 u16 type   2 u16 data_offset8   4 u16 length8   6 u16 flags   8 u64 transaction_id
DESCRIPTOR: Final = struct.Struct("<HHHHQ")
# Footer (8 bytes): u32 reserved (0), u32 ring offset at which the packet starts.
FOOTER: Final = struct.Struct("<Q")
# GPA-direct extension (8 bytes): u32 reserved, u32 range_count.
GPA_DIRECT_HEADER: Final = struct.Struct("<II")
# Transfer-page extension (8 bytes): u16 transfer_page_set_id, u16 reserved, u32 range_count;
# then range_count x (u32 byte_count, u32 byte_offset).
TRANSFER_PAGE_HEADER: Final = struct.Struct("<HHI")
TRANSFER_PAGE_RANGE: Final = struct.Struct("<II")

class PacketType(enum.IntEnum):
    """The ``type`` field of a packet descriptor."""

    IN_BAND = 6
    TRANSFER_PAGES = 7
    GPA_DIRECT = 9
    COMPLETION = 11


def in_band_size(payload_len: int) -> int:
    """Bytes an in-band (or completion) packet of ``payload_len`` bytes takes in the ring."""
    return 16 + ((payload_len + 7) & ~7) + 8


class TransferPageRange(NamedTuple):
    """One range of a transfer-page packet."""

    byte_count: int
    byte_offset: int


@attrs.frozen
class TransferPages:
    """The extension of a transfer-page packet."""

    set_id: int
    ranges: tuple[TransferPageRange, ...]


class IncomingPacket(NamedTuple):
    """One packet read from an :class:`~devicehost.vmbus.ring.IncomingRing`.

    ``payload`` is a view into the ring (valid until the reader commits); a payload that wraps
    around the ring's end is a view of a copy the ring reuses for the next packet that wraps, a
    lap later (so it too is valid until the commit that releases it). Copy what you keep.
    It includes the packet's padding to 8 bytes; framing layers carry their own exact length.
    ``extension`` is a copy of the bytes between the descriptor and the payload.
    (A NamedTuple rather than an attrs class: it is built once per packet on the hot path.)
    """

    kind: int
    transaction_id: int
    completion_requested: bool
    payload: memoryview | bytes
    extension: bytes
    #: Ring offsets: where the packet starts, where its payload starts, where the next one starts.
    offset: int
    payload_offset: int
    next_offset: int

    def gpa_ranges(self) -> MultiPagedRange:
        """The GPA ranges of a GPA-direct packet (raises GpaRangeError if they are malformed)."""
        if self.kind != PacketType.GPA_DIRECT:
            raise ValueError("not a GPA-direct packet")
        _, count = GPA_DIRECT_HEADER.unpack_from(self.extension)
        return decode_gpa_ranges_untrusted(self.extension[8:], count)

    def transfer_pages(self) -> TransferPages:
        """The transfer-page set and ranges of a transfer-page packet."""
        if self.kind != PacketType.TRANSFER_PAGES:
            raise ValueError("not a transfer-page packet")
        set_id, _, count = TRANSFER_PAGE_HEADER.unpack_from(self.extension)
        ranges = tuple(
            TransferPageRange(*TRANSFER_PAGE_RANGE.unpack_from(self.extension, 8 + 8 * i))
            for i in range(count))
        return TransferPages(set_id, ranges)


@attrs.frozen
class OutgoingPacket:
    """A packet to write: in-band, completion, GPA-direct (``gpa_ranges``) or transfer-page
    (``transfer_pages``). ``payload`` is one buffer or a sequence of buffers written back to back.
    """

    kind: PacketType
    payload: Buffer | Sequence[Buffer] = b""
    transaction_id: int = 0
    completion_requested: bool = False
    gpa_ranges: MultiPagedRange | None = None
    transfer_pages: TransferPages | None = None

    def extension(self) -> bytes:
        if self.kind == PacketType.GPA_DIRECT:
            if self.gpa_ranges is None or not self.gpa_ranges.ranges:
                raise ValueError("a GPA-direct packet needs at least one range")
            return GPA_DIRECT_HEADER.pack(0, len(self.gpa_ranges.ranges)) + encode_gpa_ranges(
                self.gpa_ranges)
        if self.kind == PacketType.TRANSFER_PAGES:
            if self.transfer_pages is None:
                raise ValueError("a transfer-page packet needs its transfer pages")
            tp = self.transfer_pages
            return TRANSFER_PAGE_HEADER.pack(tp.set_id, 0, len(tp.ranges)) + b"".join(
                TRANSFER_PAGE_RANGE.pack(r.byte_count, r.byte_offset) for r in tp.ranges)
        return b""
