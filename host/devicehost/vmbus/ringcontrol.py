"""What both ends of a Hyper-V ring share: the control page's words, the packet size bound, the
empty/full signals, index validation, and the optional C fast paths.

:mod:`devicehost.vmbus.ring` documents the ring; its reader lives there and its writer in
:mod:`devicehost.vmbus.ringwriter`.
"""

from __future__ import annotations

import struct
import sys
from typing import Any, Final

from devicehost import accel
from devicehost.vmbus.packet import IncomingPacket
from devicehost.vmbus.ringmemory import RingError, RingErrorKind, RingMemory

__all__ = [
    "FEATURE_SUPPORTS_PENDING_SEND_SIZE",
    "INBAND_STRUCTS",
    "MAX_PACKET_SIZE",
    "WORD_FEATURES",
    "WORD_IN",
    "WORD_MASK",
    "WORD_OUT",
    "WORD_PSS",
    "ZEROS",
    "RingEmpty",
    "RingEnd",
    "RingFull",
    "accelerator",
    "check_index",
    "inband_struct",
    "validate_size",
]

if sys.byteorder != "little":  # pragma: no cover - every VMBus host is little-endian
    raise ImportError("devicehost.vmbus.ring needs a little-endian machine")

FEATURE_SUPPORTS_PENDING_SEND_SIZE: Final = 1

# Control page, as u32 words (little-endian; we index a native "I" cast of the page):
#   word 0  in (write index)          written by the writer
#   word 1  out (read index)          written by the reader
#   word 2  interrupt_mask            written by the reader (non-zero: do not signal me)
#   word 3  pending_send_size         written by the writer (signal me when this much is free)
#   word 16 feature_bits              written by the writer (bit 0: pending_send_size supported)
WORD_IN: Final = 0
WORD_OUT: Final = 1
WORD_MASK: Final = 2
WORD_PSS: Final = 3
WORD_FEATURES: Final = 16

ZEROS: Final = bytes(8)

#: The largest packet the format can describe: length8 is a u16 count of 8-byte units, so
#: descriptor + payload + padding is at most 0xFFFF * 8 bytes, plus the 8-byte footer. On rings
#: over 512 KiB this, not the ring's size, bounds a packet.
MAX_PACKET_SIZE: Final = 0xFFFF * 8 + 8

# A whole in-band packet with an n-byte payload, written by one pack_into: descriptor, payload,
# zero padding to 8, footer (packet.py has the layout). Cached per payload size, up to a bound.
INBAND_STRUCTS: dict[int, struct.Struct] = {}
_INBAND_STRUCTS_MAX: Final = 1024


def inband_struct(n: int) -> struct.Struct:
    st = INBAND_STRUCTS.get(n)
    if st is None:
        st = struct.Struct(f"<HHHHQ{n}s{-n & 7}xQ")
        if len(INBAND_STRUCTS) < _INBAND_STRUCTS_MAX:
            INBAND_STRUCTS[n] = st
    return st


class RingEmpty(Exception):
    """Raised when the reader finds no packet in the ring."""


class RingFull(Exception):
    """Raised when the writer finds less than ``needed`` free bytes in the ring."""

    def __init__(self, needed: int) -> None:
        self.needed = needed
        super().__init__(f"the ring needs {needed} free bytes")


# The optional C fast paths (devicehost/vmbus/_ringc.c): in-band packets that need no wrapping,
# over contiguous memory. Whatever they do not handle comes back here unchanged.
_ringc = accel.load("devicehost.vmbus._ringc")


def accelerator(mem: RingMemory) -> Any:
    """The C fast paths over ``mem``, or None (not built, turned off, or scattered memory).
    ``_ringc`` is looked up at each call, so tests can switch the accelerator off."""
    data = mem.data
    if _ringc is None or data is None or data.format != "B" or data.readonly:
        return None
    try:
        return _ringc.Ring(mem.control, data, IncomingPacket)
    except (BufferError, TypeError, ValueError):
        return None


def check_index(value: int, size: int, what: str) -> int:
    """``value`` if it is a valid ring index (inside the data area, 8-aligned), else RingError."""
    if value >= size or value & 7:
        raise RingError(RingErrorKind.INVALID_RING_POINTER, f"{what} index {value:#x}")
    return value


def validate_size(mem: RingMemory) -> None:
    """Refuse ring memory whose data area the format cannot address."""
    # Packet lengths are u16 counts of 8-byte units and offsets u32: a ring larger than the
    # format can address is refused up front.
    if mem.data_len > 1 << 31:
        raise RingError(RingErrorKind.INVALID_RING_MEMORY, "the data area is too large")


class RingEnd:
    """What both ends of a ring hold: the ring memory (checked by :func:`validate_size`), its
    control words and data area, and the sizes that follow from it."""

    def __init__(self, mem: RingMemory) -> None:
        validate_size(mem)
        self.mem = mem
        self._words = mem.words
        self._data = mem.data
        self._size = mem.data_len

    @property
    def data_len(self) -> int:
        return self._size

    @property
    def maximum_packet_size(self) -> int:
        """The largest packet (descriptor + payload + footer) the ring can ever hold."""
        return min(self._size - 8, MAX_PACKET_SIZE)
